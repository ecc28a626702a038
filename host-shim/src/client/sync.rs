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

/// A whole table as a Sync carries it, encoded once, and its digest:
/// made once per table version and sent to any number of agents (the node
/// daemon's fan-out). Each request is put together from the services'
/// encoded messages, not encoded again per agent.
pub struct SyncPayload {
    generation: u64,
    /// The services' protobuf messages back to back: service `i` ends at
    /// `ends[i]` and starts where service `i - 1` ends.
    encoded: Vec<u8>,
    ends: Vec<usize>,
    backends: u64,
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
        let mut encoded = Vec::new();
        let mut ends = Vec::with_capacity(table.services.len());
        for service in &table.services {
            service
                .to_api()
                .write_to_vec(&mut encoded)
                .expect("encoding into memory");
            ends.push(encoded.len());
        }
        SyncPayload {
            generation,
            encoded,
            ends,
            backends: table.services.iter().map(|s| s.backends.len() as u64).sum(),
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
        self.generation
    }

    pub fn services(&self) -> usize {
        self.ends.len()
    }

    /// Each service's encoded message.
    fn service_messages(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.encoded[start..end])
    }

    /// The bytes of the whole table as one SyncRequest.
    fn one_message_bytes(&self) -> usize {
        field_bytes(self.generation) + self.service_messages().map(embedded_bytes).sum::<usize>()
    }

    /// The whole table as one SyncRequest.
    fn one_message(&self) -> Vec<u8> {
        encode(&[(1, self.generation)], 2, self.service_messages())
    }

    /// The services of each part: at most `PART_BYTES` of them (or one
    /// service, should one alone be larger).
    fn parts(&self) -> Vec<Vec<&[u8]>> {
        let mut parts: Vec<Vec<&[u8]>> = Vec::new();
        let mut bytes = 0;
        for service in self.service_messages() {
            let size = embedded_bytes(service);
            match parts.last_mut() {
                Some(part) if bytes + size <= PART_BYTES => part.push(service),
                _ => {
                    parts.push(vec![service]);
                    bytes = 0;
                }
            }
            bytes += size;
        }
        parts
    }
}

/// `fields` (varints, all below field 16) and then `services` as the
/// repeated message field `services_field`: protobuf's encoding of the
/// request, whatever the order the fields are written in.
fn encode<'a>(
    fields: &[(u32, u64)],
    services_field: u32,
    services: impl Iterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut out = protobuf::CodedOutputStream::vec(&mut bytes);
    let written: protobuf::Result<()> = (|| {
        for &(field, value) in fields {
            out.write_uint64(field, value)?;
        }
        for service in services {
            out.write_bytes(services_field, service)?;
        }
        out.flush()
    })();
    written.expect("encoding into memory");
    drop(out);
    bytes
}

/// A varint field's bytes (tag, value), for a field below 16.
fn field_bytes(value: u64) -> usize {
    1 + protobuf::rt::compute_raw_varint64_size(value) as usize
}

/// An embedded message's bytes in a field below 16 (tag, length, message).
fn embedded_bytes(message: &[u8]) -> usize {
    field_bytes(message.len() as u64) + message.len()
}

impl AgentClient {
    /// Makes the agent hold exactly `payload`'s table and checks the digest
    /// of the table it applied, but keeps no copy and so does not resync
    /// after a reconnect: for a caller that shares one table among many
    /// agents (the node daemon) and resyncs by itself.
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

    /// Makes the agent hold exactly `table`, checks the digest of the table
    /// it applied, and remembers the table to sync again after any
    /// reconnect.
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
        // In parts beyond one part's size, where the agent takes parts
        // (API 1.1); else in one message when it fits.
        let bytes = payload.one_message_bytes();
        let in_one =
            bytes <= PART_BYTES || (connection.api_minor == 0 && bytes <= ONE_MESSAGE_BYTES);
        let outcome = if in_one {
            let context = ttrpc::context::with_duration(self.options.call_timeout);
            let request = payload.one_message();
            connection.call_encoded("Sync", request, context).await
        } else if connection.api_minor >= 1 {
            self.sync_in_parts(&connection, payload).await
        } else {
            return Err(ClientError::TooLarge {
                what: format!("a Sync of {} services", payload.services()),
                bytes,
                limit: TTRPC_MESSAGE_LIMIT,
                hint: ", and the agent's API 1.0 has no Sync in parts (upgrade the agent)".into(),
            });
        };
        let response: api::WriteResponse = outcome.map_err(|err| match failure(err) {
            Failure::Final(err) => err,
            Failure::Connection(reason) => self.unreachable(reason),
        })?;
        if response.digest != payload.digest {
            return Err(ClientError::DigestMismatch {
                got: response.digest,
                expected: payload.digest.clone(),
            });
        }
        Ok(write_result(response))
    }

    /// SyncBegin, parts of at most `PART_BYTES`, SyncCommit; each call has
    /// the call timeout. The agent applies nothing before the commit.
    pub(super) async fn sync_in_parts(
        &self,
        connection: &Connection,
        payload: &SyncPayload,
    ) -> ttrpc::Result<api::WriteResponse> {
        let context = || ttrpc::context::with_duration(self.options.call_timeout);
        let begin = api::SyncBeginRequest {
            generation: payload.generation,
            services: payload.services() as u32,
            backends: payload.backends,
            ..Default::default()
        };
        let sync_id = connection
            .services
            .sync_begin(context(), &begin)
            .await?
            .sync_id;
        let parts = payload.parts();
        for (index, services) in parts.iter().enumerate() {
            let request = encode(
                &[(1, sync_id), (2, index as u64)],
                3,
                services.iter().copied(),
            );
            let _: api::SyncPartResponse = connection
                .call_encoded("SyncPart", request, context())
                .await?;
        }
        info!(self.log, "table sent in parts"; "sync" => sync_id, "parts" => parts.len(),
              "services" => begin.services);
        let commit = api::SyncCommitRequest {
            sync_id,
            digest: payload.digest.clone(),
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use socklb_table::{Protocol, Service, ServiceKey};

    use super::*;

    /// `services` services of 8 backends each.
    fn table(services: u32) -> Table {
        let services = (0..services)
            .map(|i| Service {
                name: Some(format!("default/svc-{i}")),
                key: ServiceKey {
                    vip: IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i)),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                vip_kind: VipKind::Cluster,
                affinity_timeout_secs: (i % 2 == 0).then_some(30),
                backends: (0..8)
                    .map(|b| SocketAddr::new(Ipv4Addr::from(0x0af4_0000 + i * 8 + b).into(), 8080))
                    .collect(),
            })
            .collect();
        Table::new(services).unwrap()
    }

    #[test]
    fn requests_put_together_decode_as_the_generated_types_encode_them() {
        let table = table(5_000);
        let payload = SyncPayload::new(&table, 7);
        let whole = payload.one_message();
        assert_eq!(payload.one_message_bytes(), whole.len());
        let expected = api::SyncRequest {
            generation: 7,
            services: table.to_api(),
            ..Default::default()
        };
        assert_eq!(
            api::SyncRequest::parse_from_bytes(&whole).unwrap(),
            expected
        );
        assert_eq!(expected.compute_size() as usize, whole.len());

        let parts = payload.parts();
        assert!(parts.len() > 1, "{} parts", parts.len());
        let mut rejoined = Vec::new();
        for (index, services) in parts.iter().enumerate() {
            let bytes = encode(&[(1, 42), (2, index as u64)], 3, services.iter().copied());
            // The part's services, and the two small fields beside them.
            assert!(
                bytes.len() <= PART_BYTES + 16,
                "part {index}: {} bytes",
                bytes.len()
            );
            let part = api::SyncPartRequest::parse_from_bytes(&bytes).unwrap();
            assert_eq!((part.sync_id, part.index), (42, index as u32));
            rejoined.extend(part.services);
        }
        assert_eq!(rejoined, expected.services);
    }
}
