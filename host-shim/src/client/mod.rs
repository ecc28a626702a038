//! A client for socklb-agent that survives agent restarts: every call has a
//! timeout, a broken connection is re-opened with backoff, and after every
//! (re)connect the client syncs the whole table it wants the agent to hold.
//! A table larger than one ttrpc message is synced in parts and listed in
//! pages (API 1.1); a request that cannot fit a message is an error of its
//! own, never taken for an unreachable agent.

use std::time::Duration;

use slog::Logger;
use socklb_protocols::{
    API_VERSION,
    socklb::{self as api, check_response::Status},
    socklb_ttrpc::{HealthClient, ServicesClient},
};
use socklb_table::{Service, ServiceKey, Table, TableError, VipKind};
use ttrpc::Code;

pub mod addr;
pub mod connect;
mod connection;
mod sync;

pub use addr::AgentAddr;
use connection::{Failure, failure};
pub use sync::SyncPayload;
use sync::fits_one_message;
#[cfg(test)]
mod tests;

#[derive(Clone, Debug)]
pub struct Options {
    /// Limit for one call (Sync of a large table included).
    pub call_timeout: Duration,
    /// How long to keep trying to (re)connect before a call fails.
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// For one-shot commands: give up at once where waiting cannot help
    /// (no socket at a unix path, nothing listening on it), and log the
    /// wait for an agent that may be starting once rather than per retry.
    /// Daemons leave it off: a sandbox's socket may appear at any time.
    pub fail_fast: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            fail_fast: false,
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

/// One write of a batch of changes (see
/// [`AgentClient::apply_changes_expecting`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeWrite {
    Upsert,
    Delete,
}

#[derive(Clone)]
struct Connection {
    health: HealthClient,
    services: ServicesClient,
    /// The same connection, for requests encoded beforehand (a Sync's).
    raw: ttrpc::r#async::Client,
    /// The agent's API minor version: 1 and above take a Sync in parts and
    /// serve List in pages, 3 and above answer Digest, 4 and above know
    /// external VIPs.
    api_minor: u32,
}

impl Connection {
    /// Whether the agent knows external VIPs (API 1.4).
    fn knows_external_vips(&self) -> bool {
        self.api_minor >= 4
    }
}

/// `service` as an agent before API 1.4 holds it: such an agent ignores
/// `vip_kind`, so it is sent every VIP as the cluster VIP it would take it
/// for (a port of it that no service has is refused there, as it was
/// before 1.4), and what it reads back, and its digest, match what was
/// sent. During a rolling upgrade each agent gets what it can hold.
pub fn before_external_vips(service: &Service) -> Service {
    Service {
        vip_kind: VipKind::Cluster,
        ..service.clone()
    }
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

    pub fn addr(&self) -> &AgentAddr {
        &self.addr
    }

    /// How many connections were opened so far. A caller that syncs with
    /// [`AgentClient::sync_once`] compares it before and after its writes:
    /// a change means the agent behind may be a new one that needs the
    /// whole table.
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened
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

    /// The generation a write expects the agent's table at: that of the
    /// table this client synced and wrote since (a reconnect resyncs it
    /// under the same one), so a write of an earlier call that the agent
    /// runs late is refused; 0 (not checked) before the first sync.
    fn expected_generation(&self) -> u64 {
        self.desired.as_ref().map_or(0, |d| d.generation)
    }

    /// Adds or replaces services by key.
    pub async fn upsert(&mut self, services: Vec<Service>) -> Result<WriteResult, ClientError> {
        self.upsert_expecting(self.expected_generation(), services)
            .await
    }

    /// [`AgentClient::upsert`] that the agent refuses (FailedPrecondition,
    /// nothing changed) unless its table is at generation `expected` (0:
    /// not checked): for a caller that tracks the generation its own
    /// writes left the agent at, as one of [`AgentClient::sync_once`]
    /// does. A resend after a timeout, its original still queued in the
    /// agent, is then refused instead of applied a second time.
    pub async fn upsert_expecting(
        &mut self,
        expected: u64,
        services: Vec<Service>,
    ) -> Result<WriteResult, ClientError> {
        let request = |knows_external_vips: bool| api::UpsertRequest {
            services: services
                .iter()
                .map(|service| match knows_external_vips {
                    true => service.to_api(),
                    false => before_external_vips(service).to_api(),
                })
                .collect(),
            expected_generation: expected,
            ..Default::default()
        };
        let current = request(true);
        fits_one_message(
            &current,
            &format!("an Upsert of {} services", services.len()),
            " (send fewer services per Upsert, or a Sync)",
        )?;
        let for_older_agents = services
            .iter()
            .any(|service| service.vip_kind == VipKind::External)
            .then(|| request(false));
        // The form is chosen by the connection that carries the call: a
        // reconnect may reach an agent of another version.
        let response = self
            .call(move |c, ctx| {
                let request = match (&for_older_agents, c.knows_external_vips()) {
                    (Some(older), false) => older.clone(),
                    _ => current.clone(),
                };
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
        self.delete_expecting(self.expected_generation(), keys)
            .await
    }

    /// [`AgentClient::delete`] checked against the agent's generation as
    /// [`AgentClient::upsert_expecting`].
    pub async fn delete_expecting(
        &mut self,
        expected: u64,
        keys: Vec<ServiceKey>,
    ) -> Result<WriteResult, ClientError> {
        let request = api::DeleteRequest {
            keys: keys.iter().map(ServiceKey::to_api).collect(),
            expected_generation: expected,
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

    /// Applies one batch of changes: upserts, then deletes, each refused
    /// unless the agent's table is at the generation the previous step left
    /// it (`expected` first; 0: not checked); `done` is told each write and
    /// whether it was applied (an Upsert refused for capacity and tried
    /// again after the Deletes counts once, as its second try). Upserts go first so a VIP whose services are
    /// all replaced is never unknown in between; at capacity the agent
    /// refuses them (ResourceExhausted, nothing changed) and the deletes go
    /// first instead, making room as a whole Sync's own removals would,
    /// rather than sending the whole table.
    pub async fn apply_changes_expecting(
        &mut self,
        expected: u64,
        upserts: Vec<Service>,
        deletes: Vec<ServiceKey>,
        mut done: impl FnMut(ChangeWrite, bool),
    ) -> Result<u64, ClientError> {
        let mut generation = expected;
        let mut deletes_left = Some(deletes).filter(|deletes| !deletes.is_empty());
        if !upserts.is_empty() {
            let mut outcome = self.upsert_expecting(generation, upserts.clone()).await;
            if let Err(err) = &outcome
                && err.code() == Some(Code::RESOURCE_EXHAUSTED)
                && let Some(deletes) = deletes_left.take()
            {
                // Refused whole, and tried again below: not a failed write.
                let deleted = self.delete_expecting(generation, deletes).await;
                done(ChangeWrite::Delete, deleted.is_ok());
                generation = deleted?.generation;
                outcome = self.upsert_expecting(generation, upserts).await;
            }
            done(ChangeWrite::Upsert, outcome.is_ok());
            generation = outcome?.generation;
        }
        if let Some(deletes) = deletes_left {
            let deleted = self.delete_expecting(generation, deletes).await;
            done(ChangeWrite::Delete, deleted.is_ok());
            generation = deleted?.generation;
        }
        Ok(generation)
    }

    /// [`AgentClient::apply_changes_expecting`] from the generation of the
    /// table this client synced and wrote since.
    pub async fn apply_changes(
        &mut self,
        upserts: Vec<Service>,
        deletes: Vec<ServiceKey>,
    ) -> Result<u64, ClientError> {
        self.apply_changes_expecting(self.expected_generation(), upserts, deletes, |_, _| {})
            .await
    }

    /// The agent's decisions as its datapath makes them (API 1.5), until
    /// the stream is dropped; no call timeout applies.
    pub async fn trace(
        &mut self,
        request: &api::TraceRequest,
    ) -> Result<ttrpc::r#async::ClientStreamReceiver<api::TraceEvent>, ClientError> {
        let connection = self.connected().await?;
        connection
            .services
            .trace(ttrpc::context::Context::default(), request)
            .await
            .map_err(|err| match failure(err) {
                Failure::Final(err) => err,
                Failure::Connection(reason) => self.unreachable(reason),
            })
    }

    /// The agent's decisions on VIPs by verdict since it started (API 1.5).
    pub async fn decisions(&mut self) -> Result<api::DecisionsResponse, ClientError> {
        self.call(|c, ctx| async move {
            c.services
                .decisions(ctx, &api::DecisionsRequest::new())
                .await
        })
        .await
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
}

fn write_result(response: api::WriteResponse) -> WriteResult {
    WriteResult {
        generation: response.generation,
        services: response.services,
        digest: (!response.digest.is_empty()).then_some(response.digest),
    }
}
