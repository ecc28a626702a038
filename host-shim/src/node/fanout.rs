//! One table for the node, many agents: the [`Hub`] holds the newest
//! complete table and the recent batches of changes, each numbered with a
//! version; one task per sandbox ([`serve_sandbox`]) brings its agent from
//! the version it acknowledged to the newest. A sandbox that is behind gets
//! the changes since its version merged into one write (the newest state of
//! each service, not every batch in between), or the whole table when the
//! batches it missed are no longer kept. A slow or dead agent holds up only
//! its own task. The table exists once in memory, however many sandboxes.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    hash::{BuildHasher as _, RandomState},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use slog::{Logger, info, warn};
use socklb_table::{Service, ServiceKey, Table};
use tokio::sync::{Semaphore, watch};

use crate::{
    backoff::Backoff,
    client::{AgentClient, ChangeWrite, ClientError, SyncPayload, before_external_vips},
    node::{
        health::WatchHealth,
        metrics::Metrics,
        status::{DecisionCounts, Registry, State},
    },
    sources::kubernetes::kube_watch::TableSink,
};

/// Batches kept for sandboxes that are behind; one further behind gets
/// the whole table.
const KEPT_BATCHES: usize = 64;
/// How often an idle sandbox's agent is checked, so that a restarted
/// agent or a rebooted sandbox is resynced without waiting for a change.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// The first wait after a failed write; each failure in a row doubles it.
pub const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// A sandbox that keeps failing is parked: tried again this often at most.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Failures in a row after which the agent's address is asked again (a
/// sandbox's VM started again may have another CID or socket).
const RESOLVE_AGAIN_AFTER: u32 = 3;

/// One batch of changes and the version it made.
struct Batch {
    version: u64,
    upserts: Vec<Service>,
    /// Only keys the table held: an agent at the version before holds
    /// exactly that table, and refuses to delete a key it does not hold.
    deletes: Vec<ServiceKey>,
    /// Keys of `upserts` the table did not hold before.
    created: BTreeSet<ServiceKey>,
    published: Instant,
}

#[derive(Default)]
struct HubState {
    /// 0 until the first complete table.
    version: u64,
    services: BTreeMap<ServiceKey, Service>,
    batches: VecDeque<Arc<Batch>>,
    /// The digest of the table at a version, computed when first asked;
    /// and of the table as agents before API 1.4 hold it.
    digest: Option<(u64, String)>,
    digest_before_external_vips: Option<(u64, String)>,
}

/// The node's table, shared by every sandbox's task.
pub struct Hub {
    state: Mutex<HubState>,
    /// The newest version's table as a Sync carries it, made on the first
    /// whole Sync of that version and shared by every sandbox's (held
    /// while it is made, so concurrent Syncs wait for one conversion).
    payload: tokio::sync::Mutex<Option<Arc<SyncPayload>>>,
    version: watch::Sender<u64>,
}

/// What brings an agent from the version it acknowledged to the newest.
#[derive(Debug, PartialEq)]
pub enum CatchUp {
    Current,
    Changes {
        version: u64,
        upserts: Vec<Service>,
        deletes: Vec<ServiceKey>,
        /// When the oldest of these changes was published.
        since: Instant,
    },
    /// The whole table ([`Hub::whole`]).
    Whole,
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::default(),
            payload: tokio::sync::Mutex::default(),
            version: watch::channel(0).0,
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The newest version (0: no complete table yet).
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    pub fn service_count(&self) -> usize {
        self.state.lock().unwrap().services.len()
    }

    /// The first table; after it, a whole table goes out as the batch of
    /// what differs from the one before, so sandboxes get only that (the
    /// watch replaces the table whole after a failure, and on every change
    /// while the cluster is past capacity).
    fn publish_whole(&self, table: Table) {
        let mut state = self.state.lock().unwrap();
        let services: BTreeMap<ServiceKey, Service> =
            table.services.into_iter().map(|s| (s.key, s)).collect();
        if state.version == 0 {
            state.version = 1;
            state.services = services;
            self.version.send_replace(state.version);
            return;
        }
        let deletes: Vec<ServiceKey> = state
            .services
            .keys()
            .filter(|key| !services.contains_key(key))
            .copied()
            .collect();
        let upserts: Vec<Service> = services
            .into_values()
            .filter(|s| state.services.get(&s.key) != Some(s))
            .collect();
        self.push_batch(&mut state, &upserts, &deletes);
    }

    fn publish_changes(&self, upserts: &[Service], deletes: &[ServiceKey]) {
        let mut state = self.state.lock().unwrap();
        self.push_batch(&mut state, upserts, deletes);
    }

    fn push_batch(&self, state: &mut HubState, upserts: &[Service], deletes: &[ServiceKey]) {
        state.version += 1;
        let deletes: Vec<ServiceKey> = deletes
            .iter()
            .filter(|key| state.services.remove(key).is_some())
            .copied()
            .collect();
        let mut created = BTreeSet::new();
        for service in upserts {
            if state
                .services
                .insert(service.key, service.clone())
                .is_none()
            {
                created.insert(service.key);
            }
        }
        let batch = Batch {
            version: state.version,
            upserts: upserts.to_vec(),
            deletes,
            created,
            published: Instant::now(),
        };
        state.batches.push_back(Arc::new(batch));
        if state.batches.len() > KEPT_BATCHES {
            state.batches.pop_front();
        }
        self.version.send_replace(state.version);
    }

    /// The newest version and its whole table: a copy, made only when it is
    /// about to be sent.
    pub fn whole(&self) -> (u64, Table) {
        let state = self.state.lock().unwrap();
        let services = state.services.values().cloned().collect();
        (state.version, Table { services })
    }

    /// The newest version's table in the form a whole Sync sends, made once
    /// per version however many sandboxes need it.
    pub async fn payload(&self) -> Arc<SyncPayload> {
        let mut payload = self.payload.lock().await;
        if let Some(made) = payload.as_ref()
            && made.generation() == self.version()
        {
            return made.clone();
        }
        let (version, table) = self.whole();
        let made = Arc::new(SyncPayload::new(&table, version));
        *payload = Some(made.clone());
        made
    }

    /// The newest version and the digest of its table as an agent that
    /// knows external VIPs, or one before API 1.4, holds it (see
    /// `before_external_vips`); cached per version: every sandbox's
    /// verification compares against the same one.
    pub fn digest(&self, knows_external_vips: bool) -> (u64, String) {
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        let version = state.version;
        let cache = match knows_external_vips {
            true => &mut state.digest,
            false => &mut state.digest_before_external_vips,
        };
        if let Some((cached, digest)) = cache
            && *cached == version
        {
            return (version, digest.clone());
        }
        let digest = match knows_external_vips {
            true => socklb_table::digest::digest(state.services.values()),
            false => {
                let held: Vec<Service> =
                    state.services.values().map(before_external_vips).collect();
                socklb_table::digest::digest(&held)
            }
        };
        *cache = Some((version, digest.clone()));
        (version, digest)
    }

    /// What an agent that acknowledged `acked` (None: nothing, or unknown)
    /// needs.
    pub fn catch_up(&self, acked: Option<u64>) -> CatchUp {
        let state = self.state.lock().unwrap();
        let Some(acked) = acked else {
            return CatchUp::Whole;
        };
        if acked == state.version {
            return CatchUp::Current;
        }
        let missed: Vec<&Arc<Batch>> = state.batches.iter().filter(|b| b.version > acked).collect();
        let complete = missed.first().is_some_and(|b| b.version == acked + 1);
        if !complete {
            return CatchUp::Whole;
        }
        // Newest wins: a later batch's upsert or delete of a key replaces
        // an earlier one's. Whether the agent holds a key comes from the
        // first batch that names it: one that created it says no.
        struct Merged<'a> {
            held: bool,
            newest: Option<&'a Service>,
        }
        let mut merged: BTreeMap<ServiceKey, Merged> = BTreeMap::new();
        for batch in &missed {
            for key in &batch.deletes {
                let first = Merged {
                    held: true,
                    newest: None,
                };
                merged.entry(*key).or_insert(first).newest = None;
            }
            for service in &batch.upserts {
                let first = Merged {
                    held: !batch.created.contains(&service.key),
                    newest: None,
                };
                merged.entry(service.key).or_insert(first).newest = Some(service);
            }
        }
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for (key, merged) in merged {
            match merged {
                Merged {
                    newest: Some(service),
                    ..
                } => upserts.push(service.clone()),
                Merged { held: true, .. } => deletes.push(key),
                // Created and deleted since the agent's version.
                Merged { held: false, .. } => {}
            }
        }
        CatchUp::Changes {
            version: state.version,
            upserts,
            deletes,
            since: missed[0].published,
        }
    }
}

/// The watch side: every table and batch the Kubernetes watch produces
/// goes to the hub, which always takes it.
pub struct HubSink {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub watch: Arc<WatchHealth>,
}

impl TableSink for HubSink {
    async fn replace(&mut self, table: Table, log: &Logger) -> bool {
        let services = table.services.len();
        self.hub.publish_whole(table);
        info!(log, "node table replaced"; "services" => services, "version" => self.hub.version());
        true
    }

    async fn change(&mut self, upserts: &[Service], deletes: &[ServiceKey], _log: &Logger) -> bool {
        self.hub.publish_changes(upserts, deletes);
        true
    }

    fn observed_event(&mut self) {
        self.metrics.watch_event();
        self.watch.event();
    }

    fn observed_failure(&mut self) {
        self.watch.failed(Instant::now());
    }

    fn left_out(&mut self, keys: &BTreeSet<ServiceKey>) {
        self.metrics.set_left_out(keys);
    }

    fn refused(&mut self, services: usize) {
        self.metrics.set_refused(services);
    }
}

/// What one sandbox's task shares with the others.
#[derive(Clone)]
pub struct Shared {
    pub hub: Arc<Hub>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Bounds how many whole tables are being sent, or read back for an
    /// older agent's digest, at once (a Sync is encoded in memory while it
    /// is sent).
    pub whole_syncs: Arc<Semaphore>,
    /// The longest one whole table's send may hold a permit.
    pub permit_hold: Duration,
    /// How often an idle agent's table is read back and its digest
    /// compared with the node's (None: never).
    pub verify_every: Option<Duration>,
    /// How often an idle agent's decision counts are read (None: never).
    pub decisions_every: Option<Duration>,
}

/// Keeps one sandbox's agent at the hub's newest version until aborted,
/// or until it has failed [`RESOLVE_AGAIN_AFTER`] times in a row (and
/// waited out `retry`): then the caller asks for its address again.
pub async fn serve_sandbox(
    id: &str,
    client: &mut AgentClient,
    retry: &mut Backoff,
    shared: &Shared,
    log: &Logger,
) {
    let mut newest = shared.hub.subscribe();
    let mut acked: Option<Acked> = None;
    // Connections the client had opened when the agent last got the whole
    // table: another one since means the agent may be a new one.
    let mut opened_at_sync = client.connections_opened();
    let mut health = tokio::time::interval(HEALTH_INTERVAL);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_verified = jittered_start(Instant::now(), shared.verify_every);
    let mut last_counted = jittered_start(Instant::now(), shared.decisions_every);
    loop {
        if shared.hub.version() == 0 {
            shared.registry.set_state(id, State::WaitingForTable);
            newest.changed().await.expect(HUB_SENDS);
            continue;
        }
        let outcome = match (shared.hub.catch_up(acked.map(|a| a.version)), acked) {
            (CatchUp::Current, _) => {
                tokio::select! {
                    changed = newest.changed() => changed.expect(HUB_SENDS),
                    _ = health.tick() => {
                        let verify = shared
                            .verify_every
                            .is_some_and(|every| last_verified.elapsed() >= every);
                        let mut alive = if verify {
                            last_verified = Instant::now();
                            verify_digest(client, shared, acked, log).await
                        } else {
                            client.check().await.map(|_| true)
                        };
                        // Asked of an agent that just answered, before the
                        // reconnect check below, which then covers it too.
                        if matches!(alive, Ok(true))
                            && shared
                                .decisions_every
                                .is_some_and(|every| last_counted.elapsed() >= every)
                        {
                            last_counted = Instant::now();
                            match client.decisions().await {
                                Ok(counts) => shared
                                    .registry
                                    .set_decisions(id, Some(DecisionCounts::from_api(&counts))),
                                // An agent before API 1.5 (or one keeping
                                // its table in memory) counts nothing.
                                Err(ClientError::Refused { .. }) => {
                                    shared.registry.set_decisions(id, None)
                                }
                                // The last counts stay shown; the sandbox
                                // is failing, not its counters gone.
                                Err(err) => alive = Err(err),
                            }
                        }
                        match alive {
                            Ok(same) if same && client.connections_opened() == opened_at_sync => {}
                            Ok(_) => acked = None,
                            Err(err) => {
                                acked = None;
                                shared.registry.failed(id, &err.to_string());
                            }
                        }
                    }
                }
                continue;
            }
            (
                CatchUp::Changes {
                    version,
                    upserts,
                    deletes,
                    since,
                },
                Some(from),
            ) => {
                let result = client
                    .apply_changes_expecting(from.generation, upserts, deletes, |write, ok| {
                        match write {
                            ChangeWrite::Upsert => shared.metrics.upsert_done(ok),
                            ChangeWrite::Delete => shared.metrics.delete_done(ok),
                        }
                    })
                    .await;
                if result.is_ok() {
                    shared.metrics.acknowledged(since.elapsed());
                }
                result.map(|generation| Acked {
                    version,
                    generation,
                })
            }
            // Changes follow an acknowledged version only.
            (CatchUp::Whole, _) | (CatchUp::Changes { .. }, None) => {
                shared.registry.set_state(id, State::Syncing);
                let result = sync_whole(client, shared, log).await;
                opened_at_sync = client.connections_opened();
                result
            }
        };
        match outcome {
            Ok(written) if client.connections_opened() == opened_at_sync => {
                acked = Some(written);
                retry.reset();
                shared.registry.acknowledged(id, written.version);
            }
            // The client reconnected during an incremental write: the
            // agent behind may have restarted with another table.
            Ok(_) => acked = None,
            Err(err) => {
                acked = None;
                let err = err.to_string();
                let wait = retry.failed();
                warn!(log, "agent write failed; retrying with the whole table";
                      "error" => &err, "in_ms" => wait.as_millis() as u64,
                      "failures" => retry.failures());
                shared.registry.failed(id, &err);
                tokio::time::sleep(wait).await;
                if retry.failures() >= RESOLVE_AGAIN_AFTER {
                    return;
                }
            }
        }
    }
}

/// What an agent acknowledged last: the hub's version its table is at, and
/// the generation the agent gave that table, which the next write expects
/// (so a write the agent runs late, after a newer one, is refused).
#[derive(Clone, Copy, Debug)]
struct Acked {
    version: u64,
    generation: u64,
}

/// When a sandbox's digest check counts as last done at its start: a random
/// point of the last `every`, so the sandboxes found together (every one,
/// when the daemon starts) spread their checks over the interval instead
/// of reading their tables back at the same moment.
fn jittered_start(now: Instant, every: Option<Duration>) -> Instant {
    let Some(every) = every.filter(|every| !every.is_zero()) else {
        return now;
    };
    let span_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    let offset = RandomState::new().hash_one(now) % span_ms.max(1);
    now.checked_sub(Duration::from_millis(offset))
        .unwrap_or(now)
}

/// `newest.changed()` fails only once the hub's sender is gone, and every
/// sandbox task holds the hub.
const HUB_SENDS: &str = "the hub outlives its sandboxes' tasks";

/// Sends the hub's whole table; its version is acknowledged. The agent is
/// reached and asked Health before a permit is taken, so an agent that
/// does not answer (a paused VM, a guest without socklb) waits out its
/// timeouts holding no permit; an agent that answers and then hangs in the
/// Sync holds its permit for `permit_hold` at most.
async fn sync_whole(
    client: &mut AgentClient,
    shared: &Shared,
    log: &Logger,
) -> Result<Acked, ClientError> {
    client.check().await?;
    let _permit = shared
        .whole_syncs
        .acquire()
        .await
        .expect("the permits are never closed");
    let payload = shared.hub.payload().await;
    let version = payload.generation();
    let result = tokio::time::timeout(shared.permit_hold, client.sync_once(&payload))
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Unreachable {
                addr: client.addr().to_string(),
                reason: format!(
                    "the whole table was not acknowledged within {:?}",
                    shared.permit_hold
                ),
            })
        });
    shared.metrics.sync_done(result.is_ok());
    result.map(|written| {
        info!(log, "table synced"; "version" => version, "services" => payload.services());
        Acked {
            version,
            generation: written.generation,
        }
    })
}

/// Asks the digest of the table the agent's maps hold (not the table: a
/// few bytes, see `AgentClient::digest`) and its generation, and compares
/// them with the node's table at `acked` and the generation the agent
/// acknowledged: false when either differs (someone else wrote to the
/// agent, or a write landed late). A node table that moved on is not
/// compared: the changes are on their way. An agent older than API 1.3
/// answers with its whole table (a List), which costs as much as a Sync:
/// that check is asked Health first and then holds a permit, for
/// `permit_hold` at most, as a whole Sync does.
async fn verify_digest(
    client: &mut AgentClient,
    shared: &Shared,
    acked: Option<Acked>,
    log: &Logger,
) -> Result<bool, ClientError> {
    let Some(acked) = acked.filter(|acked| acked.version == shared.hub.version()) else {
        return Ok(true);
    };
    let _permit = if client.digest_reads_the_table().await? {
        client.check().await?;
        Some(
            shared
                .whole_syncs
                .acquire()
                .await
                .expect("the permits are never closed"),
        )
    } else {
        None
    };
    let (generation, agent_digest) = tokio::time::timeout(shared.permit_hold, client.digest())
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Unreachable {
                addr: client.addr().to_string(),
                reason: format!("no digest within {:?}", shared.permit_hold),
            })
        })?;
    let knows_external_vips = client.knows_external_vips().await?;
    let (version, node_digest) = shared.hub.digest(knows_external_vips);
    if version != acked.version || generation == acked.generation && agent_digest == node_digest {
        return Ok(true);
    }
    warn!(log, "the agent holds another table than it acknowledged; syncing the whole table";
          "version" => version, "generation" => generation, "acknowledged_generation" => acked.generation,
          "agent_digest" => agent_digest, "node_digest" => node_digest);
    Ok(false)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use socklb_table::{Protocol, VipKind};

    use super::*;

    fn service(vip: &str, backend: &str) -> Service {
        Service {
            name: None,
            key: ServiceKey {
                vip: vip.parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            vip_kind: VipKind::Cluster,
            affinity_timeout_secs: None,
            backends: vec![backend.parse::<SocketAddr>().unwrap()],
        }
    }

    #[test]
    fn digest_checks_start_spread_over_their_interval() {
        let now = Instant::now();
        let every = Duration::from_secs(300);
        let starts: BTreeSet<Instant> =
            (0..200).map(|_| jittered_start(now, Some(every))).collect();
        assert!(starts.iter().all(|s| *s <= now && now - *s < every));
        // 200 sandboxes found together: not one moment, but spread.
        assert!(starts.len() > 150, "{} distinct starts", starts.len());
        let spread = *starts.last().unwrap() - *starts.first().unwrap();
        assert!(spread > every / 2, "spread over {spread:?}");
        assert_eq!(jittered_start(now, None), now);
    }

    #[test]
    fn laggards_get_the_newest_state_of_each_service_once() {
        let hub = Hub::new();
        assert_eq!(hub.version(), 0);
        let a = service("10.96.0.1", "10.244.0.1:8080");
        let b = service("10.96.0.2", "10.244.0.2:8080");
        hub.publish_whole(Table::new(vec![a.clone()]).unwrap());
        assert_eq!(hub.catch_up(Some(1)), CatchUp::Current);

        let a2 = service("10.96.0.1", "10.244.0.9:8080");
        hub.publish_changes(std::slice::from_ref(&b), &[]);
        hub.publish_changes(std::slice::from_ref(&a2), &[]);
        hub.publish_changes(&[], &[b.key]);
        hub.publish_changes(std::slice::from_ref(&b), &[]);
        let CatchUp::Changes {
            version,
            upserts,
            deletes,
            ..
        } = hub.catch_up(Some(1))
        else {
            panic!("changes expected");
        };
        assert_eq!(version, 5);
        assert_eq!(upserts, vec![a2.clone(), b.clone()]);
        assert!(deletes.is_empty());

        let CatchUp::Changes {
            upserts, deletes, ..
        } = hub.catch_up(Some(3))
        else {
            panic!("changes expected");
        };
        assert_eq!(upserts, vec![b.clone()]);
        assert!(deletes.is_empty(), "deleted then re-added: only the upsert");

        // Unknown state and a new sandbox get the whole newest table.
        assert_eq!(hub.catch_up(None), CatchUp::Whole);
        let (version, table) = hub.whole();
        assert_eq!(version, 5);
        assert_eq!(table.digest(), Table::new(vec![a2, b]).unwrap().digest());
        assert_eq!(hub.digest(true), (5, table.digest()));
        hub.publish_changes(&[], &[table.services[0].key]);
        let (version, digest) = hub.digest(true);
        assert_eq!(version, 6);
        assert_ne!(digest, table.digest(), "a new version, a new digest");
    }

    #[test]
    fn an_agent_before_external_vips_is_compared_with_the_table_it_can_hold() {
        let hub = Hub::new();
        let cluster = service("10.96.0.1", "10.244.0.1:8080");
        let mut external = service("192.0.2.10", "10.244.0.2:8080");
        external.vip_kind = VipKind::External;
        hub.publish_whole(Table::new(vec![cluster.clone(), external.clone()]).unwrap());
        let (_, knowing) = hub.digest(true);
        let (_, before) = hub.digest(false);
        assert_ne!(knowing, before);
        external.vip_kind = VipKind::Cluster;
        let held = Table::new(vec![cluster, external]).unwrap();
        assert_eq!(before, held.digest());
        // Cached per version, each kind apart.
        assert_eq!(hub.digest(true).1, knowing);
        assert_eq!(hub.digest(false).1, before);
    }

    #[test]
    fn laggards_are_not_asked_to_delete_what_they_never_had() {
        let hub = Hub::new();
        let a = service("10.96.0.1", "10.244.0.1:8080");
        let b = service("10.96.0.2", "10.244.0.2:8080");
        let never = service("10.96.0.3", "10.244.0.3:8080");
        hub.publish_whole(Table::new(vec![a.clone()]).unwrap());
        // b comes and goes; a key the table never held is deleted.
        hub.publish_changes(std::slice::from_ref(&b), &[]);
        hub.publish_changes(&[], &[b.key]);
        hub.publish_changes(&[], &[never.key]);
        let changes = |acked| match hub.catch_up(Some(acked)) {
            CatchUp::Changes {
                version,
                upserts,
                deletes,
                ..
            } => (version, upserts, deletes),
            other => panic!("changes expected, got {other:?}"),
        };
        assert_eq!(changes(1), (4, vec![], vec![]), "b was never there");
        assert_eq!(changes(2), (4, vec![], vec![b.key]), "b was there");
        assert_eq!(changes(3), (4, vec![], vec![]));

        // a was held: deleted, created again and deleted, it goes.
        hub.publish_changes(&[], &[a.key]);
        hub.publish_changes(std::slice::from_ref(&a), &[]);
        hub.publish_changes(&[], &[a.key]);
        assert_eq!(changes(4), (7, vec![], vec![a.key]));
        assert_eq!(changes(5), (7, vec![], vec![]), "a was not there");
    }

    #[test]
    fn too_far_behind_gets_the_whole_table() {
        let hub = Hub::new();
        hub.publish_whole(Table::new(Vec::new()).unwrap());
        for i in 0..KEPT_BATCHES + 2 {
            let vip = format!("10.96.1.{}", i % 250);
            hub.publish_changes(&[service(&vip, "10.244.0.1:80")], &[]);
        }
        assert_eq!(hub.catch_up(Some(1)), CatchUp::Whole);
        assert!(matches!(
            hub.catch_up(Some(hub.version() - 1)),
            CatchUp::Changes { .. }
        ));
    }

    #[test]
    fn a_table_replaced_whole_goes_out_as_its_differences() {
        let hub = Hub::new();
        let a = service("10.96.0.1", "10.244.0.1:8080");
        let b = service("10.96.0.2", "10.244.0.2:8080");
        let c = service("10.96.0.3", "10.244.0.3:8080");
        hub.publish_whole(Table::new(vec![a.clone(), b.clone()]).unwrap());
        let b2 = service("10.96.0.2", "10.244.0.9:8080");
        hub.publish_whole(Table::new(vec![b2.clone(), c.clone()]).unwrap());
        assert_eq!(hub.version(), 2);
        let CatchUp::Changes {
            version,
            upserts,
            deletes,
            ..
        } = hub.catch_up(Some(1))
        else {
            panic!("changes expected, not the whole table");
        };
        assert_eq!(version, 2);
        assert_eq!(upserts, vec![b2.clone(), c.clone()], "changed and added");
        assert_eq!(deletes, vec![a.key], "gone");
        assert_eq!(hub.whole().1, Table::new(vec![b2, c]).unwrap());
    }
}
