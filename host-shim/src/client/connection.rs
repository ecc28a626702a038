//! The connection under every call: opened with backoff, checked for a
//! compatible API, re-opened (and the table resynced) when it breaks; which
//! failures mean "unreachable" and which are final.

use std::future::Future;

use slog::{info, warn};
use socklb_protocols::{
    API_VERSION, TTRPC_MESSAGE_LIMIT,
    socklb::{self as api},
    socklb_ttrpc::{HealthClient, ServicesClient},
};
use ttrpc::{context::Context, proto::RequestInit as _};

use crate::{
    backoff::Backoff,
    client::connect::{ConnectError, connect},
};

use super::*;

impl AgentClient {
    /// Runs one call; a broken connection is re-opened (and the table
    /// re-synced) and the call tried once more. A refusal by the agent is
    /// final.
    pub(super) async fn call<T, F, Fut>(&mut self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Connection, Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        let mut last_failure = String::new();
        for _attempt in 0..2 {
            let connection = self.connected().await?;
            let context = ttrpc::context::with_duration(self.options.call_timeout);
            let outcome =
                tokio::time::timeout(self.options.call_timeout, call(connection, context)).await;
            match outcome {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(err)) => match failure(err) {
                    Failure::Final(err) => return Err(err),
                    Failure::Connection(reason) => last_failure = reason,
                },
                Err(_) => {
                    last_failure = format!("no answer within {:?}", self.options.call_timeout)
                }
            }
            warn!(self.log, "call failed; reconnecting"; "error" => &last_failure);
            self.connection = None;
        }
        Err(self.unreachable(last_failure))
    }

    /// The open connection, or a new one with the desired table synced.
    pub(super) async fn connected(&mut self) -> Result<Connection, ClientError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let connection = self.reopen().await?;
        if self.desired.is_some() {
            info!(self.log, "connected; syncing the table");
            if let Err(err) = self.sync_desired().await {
                // Not synced: the next call connects and syncs again rather
                // than use this connection as if the agent held the table.
                self.connection = None;
                return Err(err);
            }
        }
        Ok(connection)
    }

    /// Opens a connection, retrying with backoff for up to `connect_timeout`
    /// (with `fail_fast`, only while the agent may be starting, and saying
    /// so once).
    pub(super) async fn reopen(&mut self) -> Result<Connection, ClientError> {
        let deadline = tokio::time::Instant::now() + self.options.connect_timeout;
        let mut backoff = Backoff::new(self.options.backoff_initial, self.options.backoff_max);
        let mut announced = false;
        loop {
            match self.open().await {
                Ok(connection) => {
                    info!(self.log, "connected");
                    self.connections_opened += 1;
                    self.connection = Some(connection.clone());
                    return Ok(connection);
                }
                // Another API major will not change by retrying.
                Err(OpenError::Incompatible(err)) => return Err(err),
                Err(OpenError::Absent(reason)) if self.options.fail_fast => {
                    return Err(self.unreachable(reason));
                }
                Err(OpenError::Unreachable(reason) | OpenError::Absent(reason))
                    if tokio::time::Instant::now() + backoff.delay() < deadline =>
                {
                    let wait = backoff.failed();
                    if !self.options.fail_fast {
                        warn!(self.log, "cannot reach the agent; retrying"; "error" => &reason,
                              "in_ms" => wait.as_millis() as u64);
                    } else if !announced {
                        announced = true;
                        warn!(self.log, "the agent is not answering yet; waiting";
                              "error" => &reason,
                              "up_to_s" => self.options.connect_timeout.as_secs());
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(OpenError::Unreachable(reason) | OpenError::Absent(reason)) => {
                    return Err(self.unreachable(reason));
                }
            }
        }
    }

    /// Opens a connection and checks the agent is serving and compatible.
    pub(super) async fn open(&self) -> Result<Connection, OpenError> {
        let unreachable = |reason: String| OpenError::Unreachable(reason);
        let socket = tokio::time::timeout(self.options.call_timeout, connect(&self.addr))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|err| match err {
                ConnectError::Final(err) => OpenError::Absent(err.to_string()),
                ConnectError::MayBeStarting(err) => unreachable(err.to_string()),
            })?;
        let client = ttrpc::r#async::Client::new(socket);
        let health = HealthClient::new(client.clone());
        let context = ttrpc::context::with_duration(self.options.call_timeout);
        let version = health
            .version(context, &api::VersionRequest::new())
            .await
            .map_err(|err| unreachable(err.to_string()))?;
        let incompatible = || {
            OpenError::Incompatible(ClientError::Incompatible {
                got: version.api_version.clone(),
            })
        };
        let (got_major, got_minor) = version
            .api_version
            .split_once('.')
            .ok_or_else(incompatible)?;
        if got_major != major(API_VERSION) {
            return Err(incompatible());
        }
        Ok(Connection {
            health,
            services: ServicesClient::new(client.clone()),
            raw: client,
            api_minor: got_minor.parse().map_err(|_| incompatible())?,
        })
    }

    pub(super) fn unreachable(&self, reason: String) -> ClientError {
        ClientError::Unreachable {
            addr: self.addr.to_string(),
            reason,
        }
    }
}

/// Why a connection could not be opened: worth retrying, or not.
pub(super) enum OpenError {
    /// The agent may be starting.
    Unreachable(String),
    /// No agent is behind the address now (see [`ConnectError::Final`]):
    /// a one-shot caller gives up, a daemon waits for one to appear.
    Absent(String),
    Incompatible(ClientError),
}

/// How a failed call ends: a final answer, or a connection to re-open.
pub(super) enum Failure {
    Final(ClientError),
    Connection(String),
}

pub(super) fn failure(err: ttrpc::Error) -> Failure {
    // ttrpc's words for a message over its limit, from either end.
    const OVERSIZE: &str = "exceed maximum message size";
    match err {
        ttrpc::Error::RpcStatus(status) if status.message.contains(OVERSIZE) => {
            Failure::Final(too_large_from(status.message))
        }
        // The agent's ttrpc server ran out of the call's deadline first:
        // the same as the client's own timeout (the request may still be
        // applied), which of the two comes first being a race.
        ttrpc::Error::RpcStatus(status) if status.code() == Code::DEADLINE_EXCEEDED => {
            Failure::Connection(format!(
                "no answer within the deadline ({})",
                status.message
            ))
        }
        ttrpc::Error::RpcStatus(status) => Failure::Final(ClientError::Refused {
            code: status.code(),
            message: status.message,
        }),
        ttrpc::Error::Others(message) if message.contains(OVERSIZE) => {
            Failure::Final(too_large_from(message))
        }
        err => Failure::Connection(err.to_string()),
    }
}

/// A size error ttrpc raised (the client's own checks should come first).
pub(super) fn too_large_from(message: String) -> ClientError {
    let bytes = message
        .split_whitespace()
        .find_map(|word| word.parse().ok())
        .unwrap_or_default();
    ClientError::TooLarge {
        what: "a message".into(),
        bytes,
        limit: TTRPC_MESSAGE_LIMIT,
        hint: format!(" (ttrpc: {message})"),
    }
}

pub(super) fn major(version: &str) -> &str {
    version.split('.').next().unwrap_or_default()
}

impl Connection {
    /// A `socklb.v1.Services` call whose request is encoded already, as
    /// the generated client would send it.
    pub(super) async fn call_encoded<R: protobuf::Message>(
        &self,
        method: &str,
        request: Vec<u8>,
        context: Context,
    ) -> ttrpc::Result<R> {
        let mut envelope = ttrpc::Request::init_request(
            SERVICES.into(),
            method.into(),
            context.timeout_nano,
            ttrpc::context::to_pb(context.metadata),
        );
        envelope.set_payload(request);
        let response = self.raw.request(envelope).await?;
        R::parse_from_bytes(&response.payload)
            .map_err(|err| ttrpc::Error::Others(format!("decoding the {method} response: {err}")))
    }
}

/// The agent's table service, as ttrpc names it.
const SERVICES: &str = "socklb.v1.Services";
