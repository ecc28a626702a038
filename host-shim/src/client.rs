//! A client for socklb-agent that survives agent restarts: every call has a
//! timeout, a broken connection is re-opened with backoff, and after every
//! (re)connect the client syncs the whole table it wants the agent to hold.
//! A table larger than one ttrpc message is synced in parts and listed in
//! pages (API 1.1); a request that cannot fit a message is an error of its
//! own, never taken for an unreachable agent.

use std::{future::Future, time::Duration};

use protobuf::Message as _;
use slog::{Logger, info, warn};
use socklb_protocols::{
    API_VERSION, PART_BYTES, TTRPC_MESSAGE_LIMIT,
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
    #[error("{what} is {bytes} bytes, over the {limit}-byte limit of one ttrpc message{hint}")]
    TooLarge {
        what: String,
        bytes: usize,
        limit: usize,
        /// How to get it through, when there is a way.
        hint: String,
    },
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
    /// The agent's API minor version: 1 and above take a Sync in parts and
    /// serve List in pages.
    api_minor: u32,
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
    /// Connections opened so far, for callers that resync by themselves.
    connections_opened: u64,
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
            connections_opened: 0,
        }
    }

    /// How many connections were opened so far. A caller that syncs with
    /// [`AgentClient::sync_once`] compares it before and after its writes:
    /// a change means the agent behind may be a new one that needs the
    /// whole table.
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened
    }

    /// Makes the agent hold exactly `table` at `generation` and checks the
    /// digest it read back, but keeps no copy and so does not resync after
    /// a reconnect: for a caller that shares one table among many agents
    /// (the node daemon) and resyncs by itself.
    pub async fn sync_once(
        &mut self,
        table: &Table,
        generation: u64,
    ) -> Result<WriteResult, ClientError> {
        let mut result = Err(self.unreachable("not tried".into()));
        for _attempt in 0..2 {
            let connection = self.connected().await?;
            result = self.send_sync(connection, table, generation).await;
            match result {
                Err(ClientError::Unreachable { .. }) => self.connection = None,
                _ => break,
            }
        }
        result
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
            Err(ClientError::Refused { .. }
                | ClientError::DigestMismatch { .. }
                | ClientError::TooLarge { .. })
        ) {
            self.desired = previous;
        }
        result
    }

    /// The generation a write expects the agent's table at: that of the
    /// table this client synced and wrote since (a reconnect resyncs it
    /// under the same one), so a write of an earlier call that the agent
    /// runs late is refused; 0 (not checked) before the first sync.
    fn expected_generation(&self) -> u64 {
        self.desired.as_ref().map_or(0, |d| d.generation)
    }

    /// Adds or replaces services by key.
    pub async fn upsert(&mut self, services: Vec<Service>) -> Result<WriteResult, ClientError> {
        let request = api::UpsertRequest {
            services: services.iter().map(Service::to_api).collect(),
            expected_generation: self.expected_generation(),
            ..Default::default()
        };
        fits_one_message(
            &request,
            &format!("an Upsert of {} services", services.len()),
            " (send fewer services per Upsert, or a Sync)",
        )?;
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
            expected_generation: self.expected_generation(),
            ..Default::default()
        };
        fits_one_message(
            &request,
            &format!("a Delete of {} keys", keys.len()),
            " (send fewer keys per Delete, or a Sync)",
        )?;
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

    /// The generation, the table read back from the agent's maps, and its
    /// digest, page by page; checks the pages add up to that digest.
    pub async fn list(&mut self) -> Result<(u64, Table, String), ClientError> {
        // A listing the agent dropped (others replaced it) is started again.
        const ATTEMPTS: usize = 3;
        let mut result = Err(self.unreachable("not tried".into()));
        for _attempt in 0..ATTEMPTS {
            result = self.list_pages().await;
            if !matches!(&result, Err(err) if err.code() == Some(Code::ABORTED)) {
                break;
            }
        }
        result
    }

    async fn list_pages(&mut self) -> Result<(u64, Table, String), ClientError> {
        let mut services = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = api::ListRequest {
                page_token: std::mem::take(&mut page_token),
                ..Default::default()
            };
            let response = self
                .call(move |c, ctx| {
                    let request = request.clone();
                    async move { c.services.list(ctx, &request).await }
                })
                .await?;
            services.extend(response.services);
            if response.next_page_token.is_empty() {
                let table = Table::from_api(&services)?;
                let got = table.digest();
                if got != response.digest {
                    return Err(ClientError::DigestMismatch {
                        got,
                        expected: response.digest,
                    });
                }
                return Ok((response.generation, table, response.digest));
            }
            page_token = response.next_page_token;
        }
    }

    pub async fn stats(&mut self) -> Result<api::StatsResponse, ClientError> {
        self.call(|c, ctx| async move { c.services.stats(ctx, &api::StatsRequest::new()).await })
            .await
    }

    /// Replaces the agent's opt-out cgroups (paths below the cgroup its
    /// hooks are attached to; sockets there are left untranslated) and
    /// returns them with their cgroup ids. Needs an API 1.2 agent.
    pub async fn set_opt_out_cgroups(
        &mut self,
        cgroups: &[String],
    ) -> Result<Vec<api::OptOutCgroup>, ClientError> {
        let request = api::SetOptOutCgroupsRequest {
            cgroups: cgroups.to_vec(),
            ..Default::default()
        };
        let response = self
            .call(|c, ctx| {
                let request = request.clone();
                async move { c.services.set_opt_out_cgroups(ctx, &request).await }
            })
            .await?;
        Ok(response.cgroups)
    }

    pub async fn list_opt_out_cgroups(&mut self) -> Result<Vec<api::OptOutCgroup>, ClientError> {
        let response = self
            .call(|c, ctx| async move {
                c.services
                    .list_opt_out_cgroups(ctx, &api::ListOptOutCgroupsRequest::new())
                    .await
            })
            .await?;
        Ok(response.cgroups)
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
    async fn connected(&mut self) -> Result<Connection, ClientError> {
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

    /// Opens a connection, retrying with backoff for up to `connect_timeout`.
    async fn reopen(&mut self) -> Result<Connection, ClientError> {
        let deadline = tokio::time::Instant::now() + self.options.connect_timeout;
        let mut backoff = self.options.backoff_initial;
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
                Err(OpenError::Unreachable(reason))
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    warn!(self.log, "cannot reach the agent; retrying"; "error" => &reason,
                          "in_ms" => backoff.as_millis() as u64);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.backoff_max);
                }
                Err(OpenError::Unreachable(reason)) => return Err(self.unreachable(reason)),
            }
        }
    }

    /// Opens a connection and checks the agent is serving and compatible.
    async fn open(&self) -> Result<Connection, OpenError> {
        let unreachable = |reason: String| OpenError::Unreachable(reason);
        let socket = tokio::time::timeout(self.options.call_timeout, connect(&self.addr))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|err| unreachable(err.to_string()))?;
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
            services: ServicesClient::new(client),
            api_minor: got_minor.parse().map_err(|_| incompatible())?,
        })
    }

    async fn sync_desired(&mut self) -> Result<WriteResult, ClientError> {
        let desired = self.desired.as_ref().expect("a desired table");
        let connection = self.connection.clone().expect("connected");
        let result = self
            .send_sync(connection, &desired.table, desired.generation)
            .await;
        if matches!(result, Err(ClientError::Unreachable { .. })) {
            self.connection = None;
        }
        result
    }

    async fn send_sync(
        &self,
        connection: Connection,
        table: &Table,
        generation: u64,
    ) -> Result<WriteResult, ClientError> {
        let expected = table.digest();
        let request = api::SyncRequest {
            generation,
            services: table.to_api(),
            ..Default::default()
        };
        // In one message when it fits (as any agent takes it), else in parts.
        let bytes = request.compute_size() as usize;
        let outcome = if bytes <= ONE_MESSAGE_BYTES {
            let context = ttrpc::context::with_duration(self.options.call_timeout);
            connection.services.sync(context, &request).await
        } else if connection.api_minor >= 1 {
            self.sync_in_parts(&connection, request, &expected).await
        } else {
            return Err(ClientError::TooLarge {
                what: format!("a Sync of {} services", request.services.len()),
                bytes,
                limit: TTRPC_MESSAGE_LIMIT,
                hint: ", and the agent's API 1.0 has no Sync in parts (upgrade the agent)".into(),
            });
        };
        let response = outcome.map_err(|err| match failure(err) {
            Failure::Final(err) => err,
            Failure::Connection(reason) => self.unreachable(reason),
        })?;
        if response.digest != expected {
            return Err(ClientError::DigestMismatch {
                got: response.digest,
                expected,
            });
        }
        Ok(write_result(response))
    }

    /// SyncBegin, parts of at most `PART_BYTES`, SyncCommit; each call has
    /// the call timeout. The agent applies nothing before the commit.
    async fn sync_in_parts(
        &self,
        connection: &Connection,
        request: api::SyncRequest,
        digest: &str,
    ) -> ttrpc::Result<api::WriteResponse> {
        let context = || ttrpc::context::with_duration(self.options.call_timeout);
        let begin = api::SyncBeginRequest {
            generation: request.generation,
            services: request.services.len() as u32,
            backends: request
                .services
                .iter()
                .map(|s| s.backends.len() as u64)
                .sum(),
            ..Default::default()
        };
        let sync_id = connection
            .services
            .sync_begin(context(), &begin)
            .await?
            .sync_id;
        let mut parts = 0;
        let mut part = api::SyncPartRequest {
            sync_id,
            ..Default::default()
        };
        let mut bytes = 0;
        for service in request.services {
            // The field's tag and length prefix: at most 6 bytes.
            let size = service.compute_size() as usize + 6;
            if !part.services.is_empty() && bytes + size > PART_BYTES {
                connection.services.sync_part(context(), &part).await?;
                part.index += 1;
                part.services.clear();
                bytes = 0;
                parts += 1;
            }
            bytes += size;
            part.services.push(service);
        }
        if !part.services.is_empty() {
            connection.services.sync_part(context(), &part).await?;
            parts += 1;
        }
        info!(self.log, "table sent in parts"; "sync" => sync_id, "parts" => parts,
              "services" => begin.services);
        let commit = api::SyncCommitRequest {
            sync_id,
            digest: digest.into(),
            ..Default::default()
        };
        connection.services.sync_commit(context(), &commit).await
    }

    fn unreachable(&self, reason: String) -> ClientError {
        ClientError::Unreachable {
            addr: self.addr.to_string(),
            reason,
        }
    }
}

/// Why a connection could not be opened: worth retrying, or not.
enum OpenError {
    Unreachable(String),
    Incompatible(ClientError),
}

/// How a failed call ends: a final answer, or a connection to re-open.
enum Failure {
    Final(ClientError),
    Connection(String),
}

fn failure(err: ttrpc::Error) -> Failure {
    // ttrpc's words for a message over its limit, from either end.
    const OVERSIZE: &str = "exceed maximum message size";
    match err {
        ttrpc::Error::RpcStatus(status) if status.message.contains(OVERSIZE) => {
            Failure::Final(too_large_from(status.message))
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
fn too_large_from(message: String) -> ClientError {
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

/// The largest request that fits one ttrpc message: the envelope (service
/// and method names, timeout) needs far less than the rest.
const ONE_MESSAGE_BYTES: usize = TTRPC_MESSAGE_LIMIT - 4096;

/// Refuses, before sending, a request ttrpc would refuse.
fn fits_one_message(
    request: &impl protobuf::Message,
    what: &str,
    hint: &str,
) -> Result<(), ClientError> {
    let bytes = request.compute_size() as usize;
    if bytes > ONE_MESSAGE_BYTES {
        return Err(ClientError::TooLarge {
            what: what.into(),
            bytes,
            limit: TTRPC_MESSAGE_LIMIT,
            hint: hint.into(),
        });
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use socklb_protocols::socklb_ttrpc;
    use ttrpc::r#async::{Server, TtrpcContext};

    use super::*;

    /// Answers Health with another API major, counting Version calls.
    struct NewerAgent {
        versions_asked: Arc<AtomicU32>,
    }

    #[async_trait::async_trait]
    impl socklb_ttrpc::Health for NewerAgent {
        async fn check(
            &self,
            _ctx: &TtrpcContext,
            _: api::CheckRequest,
        ) -> ttrpc::Result<api::CheckResponse> {
            Ok(api::CheckResponse::new())
        }

        async fn version(
            &self,
            _ctx: &TtrpcContext,
            _: api::VersionRequest,
        ) -> ttrpc::Result<api::VersionResponse> {
            self.versions_asked.fetch_add(1, Ordering::SeqCst);
            Ok(api::VersionResponse {
                api_version: "2.0".into(),
                ..Default::default()
            })
        }
    }

    /// An API 1.2 agent whose second Sync fails (as a kernel error half way
    /// would), counting Syncs.
    struct SecondSyncFails {
        syncs: Arc<AtomicU32>,
    }

    #[async_trait::async_trait]
    impl socklb_ttrpc::Health for SecondSyncFails {
        async fn check(
            &self,
            _ctx: &TtrpcContext,
            _: api::CheckRequest,
        ) -> ttrpc::Result<api::CheckResponse> {
            Ok(api::CheckResponse {
                status: Status::SERVING.into(),
                ..Default::default()
            })
        }

        async fn version(
            &self,
            _ctx: &TtrpcContext,
            _: api::VersionRequest,
        ) -> ttrpc::Result<api::VersionResponse> {
            Ok(api::VersionResponse {
                api_version: API_VERSION.into(),
                ..Default::default()
            })
        }
    }

    #[async_trait::async_trait]
    impl socklb_ttrpc::Services for SecondSyncFails {
        async fn sync(
            &self,
            _ctx: &TtrpcContext,
            request: api::SyncRequest,
        ) -> ttrpc::Result<api::WriteResponse> {
            if self.syncs.fetch_add(1, Ordering::SeqCst) == 1 {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    Code::INTERNAL,
                    "writing the table failed half way",
                )));
            }
            Ok(api::WriteResponse {
                generation: request.generation,
                digest: Table::from_api(&request.services).unwrap().digest(),
                ..Default::default()
            })
        }

        async fn stats(
            &self,
            _ctx: &TtrpcContext,
            _: api::StatsRequest,
        ) -> ttrpc::Result<api::StatsResponse> {
            Ok(api::StatsResponse::new())
        }
    }

    fn serve(socket: &std::path::Path, agent: Arc<SecondSyncFails>) -> Server {
        let _ = std::fs::remove_file(socket);
        let mut services = socklb_ttrpc::create_health(agent.clone());
        services.extend(socklb_ttrpc::create_services(agent));
        Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(services)
    }

    #[tokio::test]
    async fn a_failed_resync_is_tried_again_on_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let syncs = Arc::new(AtomicU32::new(0));
        let agent = Arc::new(SecondSyncFails {
            syncs: syncs.clone(),
        });
        let mut server = serve(&socket, agent.clone());
        server.start().await.unwrap();
        let addr = format!("unix://{}", socket.display()).parse().unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let options = Options {
            connect_timeout: Duration::from_secs(2),
            ..Options::default()
        };
        let mut client = AgentClient::new(addr, options, &log);
        client.sync(Table::default()).await.unwrap();

        // The agent restarts: the client reconnects and its resync fails.
        server.shutdown().await.unwrap();
        let mut server = serve(&socket, agent);
        server.start().await.unwrap();
        let err = client.stats().await.unwrap_err();
        assert!(matches!(err, ClientError::Refused { .. }), "{err}");
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
        // The next call syncs again before it goes on.
        client.stats().await.unwrap();
        assert_eq!(
            syncs.load(Ordering::SeqCst),
            3,
            "the failed resync was not retried"
        );
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn an_incompatible_agent_is_an_error_at_once_not_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let versions_asked = Arc::new(AtomicU32::new(0));
        let health = socklb_ttrpc::create_health(Arc::new(NewerAgent {
            versions_asked: versions_asked.clone(),
        }));
        let mut server = Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(health);
        server.start().await.unwrap();

        let addr = format!("unix://{}", socket.display()).parse().unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let mut client = AgentClient::new(addr, Options::default(), &log);
        let err = client.check().await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Incompatible { got } if got == "2.0"),
            "{err}"
        );
        assert_eq!(versions_asked.load(Ordering::SeqCst), 1, "retried: {err}");
        server.shutdown().await.unwrap();
    }
}
