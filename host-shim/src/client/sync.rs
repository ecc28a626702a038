//! Whole tables: a Sync in one message or, beyond one message, in parts
//! (API 1.1), the digest checked either way; the List read back in pages.

use protobuf::Message as _;
use slog::info;
use socklb_protocols::{
    PART_BYTES, TTRPC_MESSAGE_LIMIT,
    socklb::{self as api},
};
use socklb_table::{Table, VipKind};
use ttrpc::Code;

use super::{
    connection::{Failure, failure},
    *,
};

/// A whole table as a Sync carries it (the API form at a generation) and
/// its digest: made once and sent to any number of agents, as the node
/// daemon does for every sandbox at one table version.
pub struct SyncPayload {
    request: api::SyncRequest,
    digest: String,
    /// The table as agents before API 1.4 hold it (`before_external_vips`),
    /// when that differs: what they are sent instead.
    before_external_vips: Option<Box<SyncPayload>>,
}

impl SyncPayload {
    pub fn new(table: &Table, generation: u64) -> SyncPayload {
        let has_external_vips = table
            .services
            .iter()
            .any(|service| service.vip_kind == VipKind::External);
        let for_older_agents = has_external_vips.then(|| {
            let services = table.services.iter().map(before_external_vips).collect();
            Box::new(SyncPayload::new(&Table { services }, generation))
        });
        SyncPayload {
            request: api::SyncRequest {
                generation,
                services: table.to_api(),
                ..Default::default()
            },
            digest: table.digest(),
            before_external_vips: for_older_agents,
        }
    }

    /// The form an agent knowing external VIPs or not is sent.
    fn for_agent(&self, knows_external_vips: bool) -> &SyncPayload {
        match (&self.before_external_vips, knows_external_vips) {
            (Some(before), false) => before,
            _ => self,
        }
    }

    pub fn generation(&self) -> u64 {
        self.request.generation
    }

    pub fn services(&self) -> usize {
        self.request.services.len()
    }
}

impl AgentClient {
    /// Makes the agent hold exactly `payload`'s table and checks the digest
    /// it read back, but keeps no copy and so does not resync after a
    /// reconnect: for a caller that shares one table among many agents
    /// (the node daemon) and resyncs by itself.
    pub async fn sync_once(&mut self, payload: &SyncPayload) -> Result<WriteResult, ClientError> {
        let mut result = Err(self.unreachable("not tried".into()));
        for _attempt in 0..2 {
            let connection = self.connected().await?;
            result = self.send_sync(connection, payload).await;
            match result {
                Err(ClientError::Unreachable { .. }) => self.connection = None,
                _ => break,
            }
        }
        result
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

    pub(super) async fn sync_desired(&mut self) -> Result<WriteResult, ClientError> {
        let desired = self.desired.as_ref().expect("a desired table");
        let connection = self.connection.clone().expect("connected");
        let payload = SyncPayload::new(&desired.table, desired.generation);
        let result = self.send_sync(connection, &payload).await;
        if matches!(result, Err(ClientError::Unreachable { .. })) {
            self.connection = None;
        }
        result
    }

    pub(super) async fn send_sync(
        &self,
        connection: Connection,
        payload: &SyncPayload,
    ) -> Result<WriteResult, ClientError> {
        let payload = payload.for_agent(connection.knows_external_vips());
        let (request, expected) = (&payload.request, &payload.digest);
        // In parts beyond one part's size, where the agent takes parts
        // (API 1.1); else in one message when it fits.
        let bytes = request.compute_size() as usize;
        let in_one =
            bytes <= PART_BYTES || (connection.api_minor == 0 && bytes <= ONE_MESSAGE_BYTES);
        let outcome = if in_one {
            let context = ttrpc::context::with_duration(self.options.call_timeout);
            connection.services.sync(context, request).await
        } else if connection.api_minor >= 1 {
            self.sync_in_parts(&connection, request, expected).await
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
        if response.digest != *expected {
            return Err(ClientError::DigestMismatch {
                got: response.digest,
                expected: expected.clone(),
            });
        }
        Ok(write_result(response))
    }

    /// SyncBegin, parts of at most `PART_BYTES`, SyncCommit; each call has
    /// the call timeout. The agent applies nothing before the commit.
    pub(super) async fn sync_in_parts(
        &self,
        connection: &Connection,
        request: &api::SyncRequest,
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
        for service in &request.services {
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
            part.services.push(service.clone());
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

    /// Whether [`AgentClient::digest`] costs the agent's whole table (a
    /// List, from an agent older than API 1.3) rather than a few bytes.
    pub async fn digest_reads_the_table(&mut self) -> Result<bool, ClientError> {
        Ok(self.connected().await?.api_minor < 3)
    }

    /// Whether the agent knows external VIPs (API 1.4); an older one is
    /// sent them as cluster VIPs and holds the digest of that table
    /// (`before_external_vips`).
    pub async fn knows_external_vips(&mut self) -> Result<bool, ClientError> {
        Ok(self.connected().await?.knows_external_vips())
    }

    /// The generation and digest of the table the agent's maps hold: by
    /// Digest from an API 1.3 agent, by a whole List from an older one.
    pub async fn digest(&mut self) -> Result<(u64, String), ClientError> {
        if self.connected().await?.api_minor < 3 {
            let (generation, _, digest) = self.list().await?;
            return Ok((generation, digest));
        }
        let response = self
            .call(|c, ctx| async move { c.services.digest(ctx, &api::DigestRequest::new()).await })
            .await?;
        Ok((response.generation, response.digest))
    }

    pub(super) async fn list_pages(&mut self) -> Result<(u64, Table, String), ClientError> {
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
}

/// The largest request that fits one ttrpc message: the envelope (service
/// and method names, timeout) needs far less than the rest.
const ONE_MESSAGE_BYTES: usize = TTRPC_MESSAGE_LIMIT - 4096;

/// Refuses, before sending, a request ttrpc would refuse.
pub(super) fn fits_one_message(
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
