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
use socklb_table::{Service, ServiceKey, Table};

use crate::{
    client::AgentClient,
    sources::{
        kubernetes::{Cluster, ObjectKey, Policy, Translation, ZONE_LABEL},
        trim::Trim,
    },
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
        if !upserts.is_empty()
            && let Err(err) = self.upsert(upserts.to_vec()).await
        {
            warn!(log, "upsert failed; a full sync follows"; "error" => err.to_string());
            return false;
        }
        if !deletes.is_empty()
            && let Err(err) = self.delete(deletes.to_vec()).await
        {
            warn!(log, "delete failed; a full sync follows"; "error" => err.to_string());
            return false;
        }
        true
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
                Some(Err(err)) => warn!(log, "watching Services"; "error" => err.to_string()),
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
                Some(Err(err)) => warn!(log, "watching EndpointSlices"; "error" => err.to_string()),
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
                Some(Err(err)) => warn!(log, "watching this Node"; "error" => err.to_string()),
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

/// Feeds one watcher event into `cluster`; returns the services it touched.
fn on_event<K: Resource + Trim>(
    sink: &mut impl TableSink,
    event: watcher::Event<K>,
    listing: &mut Listing<K>,
    cluster: &mut Cluster,
    apply: fn(&mut Cluster, K) -> Vec<ObjectKey>,
    delete: fn(&mut Cluster, &K) -> Vec<ObjectKey>,
    replace: fn(&mut Cluster, Vec<K>) -> Vec<ObjectKey>,
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
                .push(object.trimmed());
            Vec::new()
        }
        watcher::Event::InitDone => {
            listing.synced = true;
            replace(cluster, listing.items.take().unwrap_or_default())
        }
        watcher::Event::Apply(object) => apply(cluster, object.trimmed()),
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
    let services = translation.full(cluster, policy, log);
    match Table::new(services) {
        Ok(table) => sink.replace(table, log).await,
        Err(err) => {
            warn!(log, "the cluster's services do not fit the datapath"; "error" => err.to_string());
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
    if plan.is_empty() {
        return true;
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
    use super::*;

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
