//! A client for socklb-agent that survives agent restarts: every call has a
//! timeout, a broken connection is re-opened with backoff, and after every
//! (re)connect the client syncs the whole table it wants the agent to hold.

use std::{future::Future, time::Duration};

use slog::{Logger, info, warn};
use socklb_protocols::{
    API_VERSION,
    socklb::{self as api, check_response::Status},
    socklb_ttrpc::{HealthClient, ServicesClient},
};
use socklb_table::{Service, ServiceKey, Table, TableError};
use ttrpc::{Code, context::Context};

use crate::{addr::AgentAddr, connect::connect};

#[derive(Clone, Debug)]
pub struct Options {
    /// Limit for one call (Sync of a large table included).
    pub call_timeout: Duration,
    /// How long to keep trying to (re)connect before a call fails.
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("agent refused the request ({code:?}): {message}")]
    Refused { code: Code, message: String },
    #[error("agent holds another table than was sent: digest {got}, expected {expected}")]
    DigestMismatch { got: String, expected: String },
    #[error("agent speaks API {got}, this client {API_VERSION}")]
    Incompatible { got: String },
    #[error(transparent)]
    Table(#[from] TableError),
}

impl ClientError {
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[derive(Clone)]
struct Connection {
    health: HealthClient,
    services: ServicesClient,
}

/// What the host wants the agent to hold.
struct Desired {
    table: Table,
    generation: u64,
}

pub struct AgentClient {
    addr: AgentAddr,
    options: Options,
    connection: Option<Connection>,
    desired: Option<Desired>,
    log: Logger,
}

/// The outcome of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteResult {
    pub generation: u64,
    pub services: u32,
    /// Sync only: the digest the agent read back, equal to the table's.
    pub digest: Option<String>,
}

impl AgentClient {
    pub fn new(addr: AgentAddr, options: Options, log: &Logger) -> AgentClient {
        AgentClient {
            log: log.new(slog::o!("agent" => addr.to_string())),
            addr,
            options,
            connection: None,
            desired: None,
        }
    }

    pub async fn check(&mut self) -> Result<Status, ClientError> {
        let response = self
            .call(|c, ctx| async move { c.health.check(ctx, &api::CheckRequest::new()).await })
            .await?;
        Ok(response.status.enum_value_or_default())
    }

    pub async fn version(&mut self) -> Result<api::VersionResponse, ClientError> {
        self.call(|c, ctx| async move { c.health.version(ctx, &api::VersionRequest::new()).await })
            .await
    }

    /// Makes the agent hold exactly `table`, checks the digest it read back,
    /// and remembers the table to sync again after any reconnect.
    pub async fn sync(&mut self, table: Table) -> Result<WriteResult, ClientError> {
        let generation = self.desired.as_ref().map_or(0, |d| d.generation) + 1;
        let previous = self.desired.replace(Desired { table, generation });
        let mut result = Err(self.unreachable("not tried".into()));
        for _attempt in 0..2 {
            if self.connection.is_none()
                && let Err(err) = self.reopen().await
            {
                result = Err(err);
                break;
            }
            result = self.sync_desired().await;
            if !matches!(result, Err(ClientError::Unreachable { .. })) {
                break;
            }
        }
        // A refused table is not what the host wants: keep the last good one.
        if matches!(
            result,
            Err(ClientError::Refused { .. } | ClientError::DigestMismatch { .. })
        ) {
            self.desired = previous;
        }
        result
    }

    /// Adds or replaces services by key.
    pub async fn upsert(&mut self, services: Vec<Service>) -> Result<WriteResult, ClientError> {
        let request = api::UpsertRequest {
            services: services.iter().map(Service::to_api).collect(),
            ..Default::default()
        };
        let response = self
            .call(move |c, ctx| {
                let request = request.clone();
                async move { c.services.upsert(ctx, &request).await }
            })
            .await?;
        if let Some(desired) = &mut self.desired {
            for service in services {
                desired.table.services.retain(|s| s.key != service.key);
                desired.table.services.push(service);
            }
            desired.generation = response.generation;
        }
        Ok(write_result(response))
    }

    /// Removes services by key.
    pub async fn delete(&mut self, keys: Vec<ServiceKey>) -> Result<WriteResult, ClientError> {
        let request = api::DeleteRequest {
            keys: keys.iter().map(ServiceKey::to_api).collect(),
            ..Default::default()
        };
        let response = self
            .call(move |c, ctx| {
                let request = request.clone();
                async move { c.services.delete(ctx, &request).await }
            })
            .await?;
        if let Some(desired) = &mut self.desired {
            desired.table.services.retain(|s| !keys.contains(&s.key));
            desired.generation = response.generation;
        }
        Ok(write_result(response))
    }

    /// The generation, the table read back from the agent's maps, and its digest.
    pub async fn list(&mut self) -> Result<(u64, Table, String), ClientError> {
        let response = self
            .call(|c, ctx| async move { c.services.list(ctx, &api::ListRequest::new()).await })
            .await?;
        let table = Table::from_api(&response.services)?;
        Ok((response.generation, table, response.digest))
    }

    pub async fn stats(&mut self) -> Result<api::StatsResponse, ClientError> {
        self.call(|c, ctx| async move { c.services.stats(ctx, &api::StatsRequest::new()).await })
            .await
    }

    pub async fn metrics(&mut self) -> Result<String, ClientError> {
        let response = self
            .call(
                |c, ctx| async move { c.services.metrics(ctx, &api::MetricsRequest::new()).await },
            )
            .await?;
        Ok(response.text)
    }

    /// Runs one call; a broken connection is re-opened (and the table
    /// re-synced) and the call tried once more. A refusal by the agent is
    /// final.
    async fn call<T, F, Fut>(&mut self, call: F) -> Result<T, ClientError>
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
                Ok(Err(ttrpc::Error::RpcStatus(status))) => {
                    return Err(ClientError::Refused {
                        code: status.code(),
                        message: status.message,
                    });
                }
                Ok(Err(err)) => last_failure = err.to_string(),
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
    async fn connected(&mut self) -> Result<Connection, ClientError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let connection = self.reopen().await?;
        if self.desired.is_some() {
            info!(self.log, "connected; syncing the table");
            self.sync_desired().await?;
        }
        Ok(connection)
    }

    /// Opens a connection, retrying with backoff for up to `connect_timeout`.
    async fn reopen(&mut self) -> Result<Connection, ClientError> {
        let deadline = tokio::time::Instant::now() + self.options.connect_timeout;
        let mut backoff = self.options.backoff_initial;
        loop {
            match self.open().await {
                Ok(connection) => {
                    info!(self.log, "connected");
                    self.connection = Some(connection.clone());
                    return Ok(connection);
                }
                Err(reason) if tokio::time::Instant::now() + backoff < deadline => {
                    warn!(self.log, "cannot reach the agent; retrying"; "error" => &reason,
                          "in_ms" => backoff.as_millis() as u64);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.backoff_max);
                }
                Err(reason) => return Err(self.unreachable(reason)),
            }
        }
    }

    /// Opens a connection and checks the agent is serving and compatible.
    async fn open(&self) -> Result<Connection, String> {
        let socket = tokio::time::timeout(self.options.call_timeout, connect(&self.addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|err| err.to_string())?;
        let client = ttrpc::r#async::Client::new(socket);
        let connection = Connection {
            health: HealthClient::new(client.clone()),
            services: ServicesClient::new(client),
        };
        let context = ttrpc::context::with_duration(self.options.call_timeout);
        let version = connection
            .health
            .version(context, &api::VersionRequest::new())
            .await
            .map_err(|err| err.to_string())?;
        if major(&version.api_version) != major(API_VERSION) {
            return Err(ClientError::Incompatible {
                got: version.api_version,
            }
            .to_string());
        }
        Ok(connection)
    }

    async fn sync_desired(&mut self) -> Result<WriteResult, ClientError> {
        let desired = self.desired.as_ref().expect("a desired table");
        let expected = desired.table.digest();
        let request = api::SyncRequest {
            generation: desired.generation,
            services: desired.table.to_api(),
            ..Default::default()
        };
        let connection = self.connection.clone().expect("connected");
        let context = ttrpc::context::with_duration(self.options.call_timeout);
        let response = match connection.services.sync(context, &request).await {
            Ok(response) => response,
            Err(ttrpc::Error::RpcStatus(status)) => {
                return Err(ClientError::Refused {
                    code: status.code(),
                    message: status.message,
                });
            }
            Err(err) => {
                self.connection = None;
                return Err(self.unreachable(err.to_string()));
            }
        };
        if response.digest != expected {
            return Err(ClientError::DigestMismatch {
                got: response.digest,
                expected,
            });
        }
        Ok(write_result(response))
    }

    fn unreachable(&self, reason: String) -> ClientError {
        ClientError::Unreachable {
            addr: self.addr.to_string(),
            reason,
        }
    }
}

fn major(version: &str) -> &str {
    version.split('.').next().unwrap_or_default()
}

fn write_result(response: api::WriteResponse) -> WriteResult {
    WriteResult {
        generation: response.generation,
        services: response.services,
        digest: (!response.digest.is_empty()).then_some(response.digest),
    }
}
