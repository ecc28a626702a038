//! Keeps a table equal to what kube-proxy would program: watches Services
//! and EndpointSlices with kube-rs, hands a [`TableSink`] the whole table
//! once both lists are in, then each batch of changed services as Upserts
//! and Deletes, at most one batch per `batch` interval. A relist (after a
//! dropped watch or 410 Gone) replaces what was known and sends only what
//! differs; a sink that fails a batch gets the whole table next.
//!
//! The sink is one agent (`socklb-shim kube`, [`AgentClient`]) or the node
//! daemon's fan-out to every sandbox on the node.
//!
//! With a node name, this node's Node is watched too (read-only, that one
//! object): its zone label feeds topology hints, and a change of it
//! re-translates every service.

use std::{collections::BTreeSet, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use slog::{Logger, info, warn};
use socklb_table::{Service, ServiceKey, Table, fit_capacity, release_freed_memory};

use crate::{
    client::AgentClient,
    sources::kubernetes::{Cluster, ObjectKey, Policy, Translation, ZONE_LABEL},
};

/// One kind's list as it arrives during a (re)list.
struct Listing<K> {
    items: Option<Vec<K>>,
    synced: bool,
}

impl<K> Listing<K> {
    fn new() -> Listing<K> {
        Listing {
            items: None,
            synced: false,
        }
    }
}

/// Where translated tables go.
pub trait TableSink {
    /// The whole table; false if it was not taken (asked again next batch).
    fn replace(&mut self, table: Table, log: &Logger) -> impl Future<Output = bool>;
    /// Changes to the last table taken; false asks for the whole table.
    fn change(
        &mut self,
        upserts: &[Service],
        deletes: &[ServiceKey],
        log: &Logger,
    ) -> impl Future<Output = bool>;
    /// One watch event arrived (for metrics).
    fn observed_event(&mut self) {}
    /// A watch failed (logged; the watcher retries by itself).
    fn observed_failure(&mut self) {}
    /// The services the last whole table left out because the datapath
    /// cannot hold them (none once the cluster fits again).
    fn left_out(&mut self, _keys: &BTreeSet<ServiceKey>) {}
    /// How many of the cluster's services no table may hold (each logged
    /// when translated), after every table or batch taken.
    fn refused(&mut self, _services: usize) {}
    /// Called every [`AGENT_CHECK_INTERVAL`] while the cluster is quiet,
    /// so an agent that restarted empty is noticed without a change;
    /// false asks for the whole table. A sink that checks its agents by
    /// itself (the node daemon) keeps the default.
    fn check(&mut self, _log: &Logger) -> impl Future<Output = bool> {
        async { true }
    }
}

/// How often a quiet cluster's agent is checked (the node daemon checks
/// its idle sandboxes as often).
pub const AGENT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

impl TableSink for AgentClient {
    async fn replace(&mut self, table: Table, log: &Logger) -> bool {
        match self.sync(table).await {
            Ok(result) => {
                info!(log, "table synced"; "services" => result.services, "generation" => result.generation);
                true
            }
            Err(err) => {
                warn!(log, "full sync failed; retrying"; "error" => err.to_string());
                false
            }
        }
    }

    async fn change(&mut self, upserts: &[Service], deletes: &[ServiceKey], log: &Logger) -> bool {
        match self.apply_changes(upserts.to_vec(), deletes.to_vec()).await {
            Ok(_) => true,
            Err(err) => {
                warn!(log, "changes failed; a full sync follows"; "error" => err.to_string());
                false
            }
        }
    }

    /// A Health.Check: an agent that restarted broke the connection, and
    /// the client's reconnect syncs the whole table it holds.
    async fn check(&mut self, log: &Logger) -> bool {
        match AgentClient::check(self).await {
            Ok(_) => true,
            Err(err) => {
                warn!(log, "agent check failed; a full sync follows"; "error" => err.to_string());
                false
            }
        }
    }
}

/// Runs until the watch streams end (they do not, short of an error the
/// caller's runtime ends).
pub async fn run(
    kube: Client,
    sink: &mut impl TableSink,
    mut policy: Policy,
    batch: Duration,
    log: &Logger,
) {
    let mut this_node = match &policy.node {
        Some(node) => watcher(
            Api::<core::Node>::all(kube.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
        )
        .default_backoff()
        .boxed(),
        None => futures::stream::pending().boxed(),
    };
    let mut node_listed = false;
    let mut services = watcher(
        Api::<core::Service>::all(kube.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let mut slices = watcher(
        Api::<discovery::EndpointSlice>::all(kube),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let mut cluster = Cluster::default();
    let mut translation = Translation::default();
    let mut service_listing = Listing::new();
    let mut slice_listing = Listing::new();
    let mut dirty: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut in_sync = false;
    let mut tick = tokio::time::interval(batch);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut agent_check = tokio::time::interval(AGENT_CHECK_INTERVAL);
    agent_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = services.next() => match event {
                Some(Ok(event)) => dirty.extend(on_event(
                    sink,
                    event,
                    &mut service_listing,
                    &mut cluster,
                    Cluster::apply_service,
                    Cluster::delete_service,
                    Cluster::replace_services,
                )),
                Some(Err(err)) => {
                    warn!(log, "watching Services"; "error" => err.to_string());
                    sink.observed_failure();
                }
                None => return,
            },
            event = slices.next() => match event {
                Some(Ok(event)) => dirty.extend(on_event(
                    sink,
                    event,
                    &mut slice_listing,
                    &mut cluster,
                    Cluster::apply_slice,
                    Cluster::delete_slice,
                    Cluster::replace_slices,
                )),
                Some(Err(err)) => {
                    warn!(log, "watching EndpointSlices"; "error" => err.to_string());
                    sink.observed_failure();
                }
                None => return,
            },
            event = this_node.next() => match event {
                Some(Ok(event)) => {
                    if let Some(zone) = zone_change(event, &mut node_listed)
                        && zone != policy.zone
                    {
                        info!(log, "this node's zone"; "zone" => zone.as_deref().unwrap_or("(none)"));
                        policy.zone = zone;
                        dirty.extend(cluster.service_keys().cloned());
                    }
                }
                Some(Err(err)) => {
                    warn!(log, "watching this Node"; "error" => err.to_string());
                    sink.observed_failure();
                }
                None => return,
            },
            _ = agent_check.tick(), if in_sync && dirty.is_empty() => {
                in_sync = sink.check(log).await;
            }
            _ = tick.tick() => {
                if !(service_listing.synced && slice_listing.synced) {
                    continue;
                }
                if !in_sync {
                    in_sync = full_sync(sink, &cluster, &mut translation, &policy, log).await;
                    if in_sync {
                        dirty.clear();
                    }
                } else if !dirty.is_empty() {
                    let changed = std::mem::take(&mut dirty);
                    in_sync = send_changes(sink, &cluster, &mut translation, changed, &policy, log).await;
                }
            }
        }
    }
}

/// Feeds one watcher event into `cluster`; returns the services it
/// touched. A (re)list's objects wait trimmed (`T`) for the list's end.
fn on_event<K: Resource + Into<T>, T>(
    sink: &mut impl TableSink,
    event: watcher::Event<K>,
    listing: &mut Listing<T>,
    cluster: &mut Cluster,
    apply: fn(&mut Cluster, K) -> Vec<ObjectKey>,
    delete: fn(&mut Cluster, &K) -> Vec<ObjectKey>,
    replace: fn(&mut Cluster, Vec<T>) -> Vec<ObjectKey>,
) -> Vec<ObjectKey> {
    sink.observed_event();
    match event {
        watcher::Event::Init => {
            listing.items = Some(Vec::new());
            Vec::new()
        }
        watcher::Event::InitApply(object) => {
            listing
                .items
                .get_or_insert_with(Vec::new)
                .push(object.into());
            Vec::new()
        }
        watcher::Event::InitDone => {
            listing.synced = true;
            replace(cluster, listing.items.take().unwrap_or_default())
        }
        watcher::Event::Apply(object) => apply(cluster, object),
        watcher::Event::Delete(object) => delete(cluster, &object),
    }
}

/// The node's zone as of `event`, if the event tells it: a relist that
/// finds no Node means no zone.
fn zone_change(event: watcher::Event<core::Node>, listed: &mut bool) -> Option<Option<String>> {
    let zone_of = |node: &core::Node| {
        node.metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(ZONE_LABEL).cloned())
    };
    match event {
        watcher::Event::Init => {
            *listed = false;
            None
        }
        watcher::Event::InitApply(node) => {
            *listed = true;
            Some(zone_of(&node))
        }
        watcher::Event::InitDone => (!*listed).then_some(None),
        watcher::Event::Apply(node) => Some(zone_of(&node)),
        watcher::Event::Delete(_) => Some(None),
    }
}

async fn full_sync(
    sink: &mut impl TableSink,
    cluster: &Cluster,
    translation: &mut Translation,
    policy: &Policy,
    log: &Logger,
) -> bool {
    let (services, left_out) = fit_capacity(translation.full(cluster, policy, log));
    translation.leave_out(&left_out);
    if !left_out.is_empty() {
        let first: Vec<String> = left_out.iter().take(10).map(ToString::to_string).collect();
        warn!(log, "the cluster's services do not fit the datapath: programming what fits";
              "left_out" => left_out.len(), "programmed" => services.len(),
              "first_left_out" => first.join(","));
    }
    sink.left_out(translation.left_out());
    sink.refused(translation.refused());
    match Table::new(services) {
        Ok(table) => {
            let taken = sink.replace(table, log).await;
            // The lists' objects and the table's other forms are gone.
            release_freed_memory();
            taken
        }
        Err(err) => {
            warn!(log, "the translated table is invalid"; "error" => err.to_string());
            false
        }
    }
}

/// Sends the changes of `changed` services; false asks for a full sync.
async fn send_changes(
    sink: &mut impl TableSink,
    cluster: &Cluster,
    translation: &mut Translation,
    changed: BTreeSet<ObjectKey>,
    policy: &Policy,
    log: &Logger,
) -> bool {
    let plan = translation.plan(cluster, changed.iter().cloned(), policy, log);
    translation.count_refused(&plan);
    sink.refused(translation.refused());
    if plan.is_empty() {
        return true;
    }
    // Past capacity, which services fit is decided over the whole table
    // (see `fit_capacity`), so a change that would pass it, or any change
    // while services are left out, takes a whole translation.
    if !translation.left_out().is_empty() || !translation.fits(&plan) {
        return full_sync(sink, cluster, translation, policy, log).await;
    }
    let (upserts, deletes) = (plan.upserts.len(), plan.deletes.len());
    if !sink.change(&plan.upserts, &plan.deletes, log).await {
        return false;
    }
    translation.commit(plan);
    info!(log, "batch applied"; "kubernetes_services" => changed.len(), "upserts" => upserts, "deletes" => deletes);
    true
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;
    use serde_json::json;
    use socklb_table::MAX_SERVICES;

    use super::*;

    /// A sink that takes everything and keeps what it was given.
    #[derive(Default)]
    struct Recorded {
        table: Vec<Service>,
        replaces: usize,
        left_out: BTreeSet<ServiceKey>,
        refused: usize,
    }

    impl TableSink for Recorded {
        async fn replace(&mut self, table: Table, _log: &Logger) -> bool {
            self.table = table.services;
            self.replaces += 1;
            true
        }

        async fn change(
            &mut self,
            upserts: &[Service],
            deletes: &[ServiceKey],
            _: &Logger,
        ) -> bool {
            self.table.retain(|s| !deletes.contains(&s.key));
            self.table
                .retain(|s| !upserts.iter().any(|u| u.key == s.key));
            self.table.extend(upserts.iter().cloned());
            true
        }

        fn left_out(&mut self, keys: &BTreeSet<ServiceKey>) {
            self.left_out = keys.clone();
        }

        fn refused(&mut self, services: usize) {
            self.refused = services;
        }
    }

    /// A ClusterIP Service `10.96.<n>` with `ports` ports (no endpoints:
    /// each port is a service that refuses).
    fn service(n: u16, ports: u16) -> core::Service {
        let ports: Vec<_> = (1..=ports)
            .map(|port| json!({"name": format!("p{port}"), "port": port}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": format!("s{n}")},
            "spec": {"clusterIP": format!("10.96.{}.{}", n >> 8, n & 0xff), "ports": ports},
        }))
        .unwrap()
    }

    /// One batch of the Services `changed` to `sink`, as the watch sends it.
    fn send(
        sink: &mut Recorded,
        cluster: &Cluster,
        translation: &mut Translation,
        changed: Vec<ObjectKey>,
    ) -> bool {
        let log = Logger::root(slog::Discard, slog::o!());
        let changed = changed.into_iter().collect();
        block_on(send_changes(
            sink,
            cluster,
            translation,
            changed,
            &Policy::default(),
            &log,
        ))
    }

    /// Services no table may hold are skipped, not the table, and the
    /// sink hears how many after a whole table and after each batch.
    #[test]
    fn refused_services_are_counted_for_the_sink_until_they_go() {
        let log = Logger::root(slog::Discard, slog::o!());
        let mut cluster = Cluster::default();
        // A link-local clusterIP would take over the guest's own traffic.
        let link_local: core::Service = serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": "metadata"},
            "spec": {"clusterIP": "169.254.169.254", "ports": [{"port": 80}, {"port": 443}]},
        }))
        .unwrap();
        cluster.apply_service(link_local.clone());
        cluster.apply_service(service(1, 1));
        let mut sink = Recorded::default();
        let mut translation = Translation::default();
        let policy = Policy::default();
        assert!(block_on(full_sync(
            &mut sink,
            &cluster,
            &mut translation,
            &policy,
            &log
        )));
        assert_eq!((sink.table.len(), sink.refused), (1, 2));
        let gone = cluster.delete_service(&link_local).into_iter().collect();
        assert!(send(&mut sink, &cluster, &mut translation, gone));
        assert_eq!((sink.table.len(), sink.refused), (1, 0));
    }

    #[test]
    fn past_capacity_what_fits_is_programmed_and_the_rest_named() {
        let log = Logger::root(slog::Discard, slog::o!());
        let policy = Policy::default();
        let mut cluster = Cluster::default();
        // 256 x 256 ports fill the datapath; one more service passes it.
        let per_service = 256;
        for n in 0..(MAX_SERVICES / per_service) as u16 {
            cluster.apply_service(service(n, per_service as u16));
        }
        let extra = service(300, 1);
        cluster.apply_service(extra.clone());
        let mut sink = Recorded::default();
        let mut translation = Translation::default();

        assert!(block_on(full_sync(
            &mut sink,
            &cluster,
            &mut translation,
            &policy,
            &log
        )));
        assert_eq!(
            sink.table.len(),
            MAX_SERVICES as usize,
            "what fits is programmed"
        );
        let left_out: Vec<String> = sink.left_out.iter().map(ToString::to_string).collect();
        assert_eq!(
            left_out,
            ["10.96.1.44:1/TCP"],
            "the last in key order is named"
        );

        // A change while one is left out re-fits the whole table: the
        // left-out service's turn comes once another goes.
        let changed = cluster.delete_service(&service(0, per_service as u16));
        assert!(send(&mut sink, &cluster, &mut translation, changed));
        assert_eq!(sink.replaces, 2, "re-fitted whole");
        assert!(sink.left_out.is_empty(), "{:?}", sink.left_out);
        assert_eq!(sink.table.len(), MAX_SERVICES as usize - 255);
        assert!(
            sink.table
                .iter()
                .any(|s| s.key.to_string() == "10.96.1.44:1/TCP")
        );

        // Below capacity, changes go out as changes again.
        let changed = cluster.apply_service(service(0, 1));
        assert!(send(&mut sink, &cluster, &mut translation, changed));
        assert_eq!(sink.replaces, 2, "an Upsert, not a whole table");
        assert_eq!(sink.table.len(), MAX_SERVICES as usize - 254);
    }

    fn node(zone: Option<&str>) -> core::Node {
        let labels = zone.map(|zone| [(ZONE_LABEL.to_string(), zone.to_string())].into());
        core::Node {
            metadata: kube::api::ObjectMeta {
                name: Some("node-a".into()),
                labels,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_zone_follows_this_node() {
        let mut listed = false;
        let mut zone = |event| zone_change(event, &mut listed);
        assert_eq!(zone(watcher::Event::Init), None);
        assert_eq!(
            zone(watcher::Event::InitApply(node(Some("zone-a")))),
            Some(Some("zone-a".into()))
        );
        assert_eq!(zone(watcher::Event::InitDone), None);
        assert_eq!(zone(watcher::Event::Apply(node(None))), Some(None));
        assert_eq!(
            zone(watcher::Event::Apply(node(Some("zone-b")))),
            Some(Some("zone-b".into()))
        );
        assert_eq!(
            zone(watcher::Event::Delete(node(Some("zone-b")))),
            Some(None)
        );
        // A relist without the Node: no zone.
        assert_eq!(zone(watcher::Event::Init), None);
        assert_eq!(zone(watcher::Event::InitDone), Some(None));
    }
}
