//! Keeps the agent's table equal to what kube-proxy would program: watches
//! Services and EndpointSlices with kube-rs, syncs the whole table once
//! both lists are in, then sends each batch of changed services as Upserts
//! and Deletes, at most one batch per `batch` interval. A relist (after a
//! dropped watch or 410 Gone) replaces what was known and sends only what
//! differs; a failed write is followed by a full Sync.

use std::{collections::BTreeSet, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use slog::{Logger, info, warn};
use socklb_table::Table;

use crate::{
    client::AgentClient,
    sources::kubernetes::{Cluster, ObjectKey, Policy, Translation},
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

/// Runs until the watch streams end (they do not, short of an error the
/// caller's runtime ends).
pub async fn run(
    kube: Client,
    agent: &mut AgentClient,
    policy: Policy,
    batch: Duration,
    log: &Logger,
) {
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
    loop {
        tokio::select! {
            event = services.next() => match event {
                Some(Ok(event)) => dirty.extend(on_event(
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
            _ = tick.tick() => {
                if !(service_listing.synced && slice_listing.synced) {
                    continue;
                }
                if !in_sync {
                    in_sync = full_sync(agent, &cluster, &mut translation, &policy, log).await;
                    if in_sync {
                        dirty.clear();
                    }
                } else if !dirty.is_empty() {
                    let changed = std::mem::take(&mut dirty);
                    in_sync = send_changes(agent, &cluster, &mut translation, changed, &policy, log).await;
                }
            }
        }
    }
}

/// Feeds one watcher event into `cluster`; returns the services it touched.
fn on_event<K: Resource>(
    event: watcher::Event<K>,
    listing: &mut Listing<K>,
    cluster: &mut Cluster,
    apply: fn(&mut Cluster, K) -> Vec<ObjectKey>,
    delete: fn(&mut Cluster, &K) -> Vec<ObjectKey>,
    replace: fn(&mut Cluster, Vec<K>) -> Vec<ObjectKey>,
) -> Vec<ObjectKey> {
    match event {
        watcher::Event::Init => {
            listing.items = Some(Vec::new());
            Vec::new()
        }
        watcher::Event::InitApply(object) => {
            listing.items.get_or_insert_with(Vec::new).push(object);
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

async fn full_sync(
    agent: &mut AgentClient,
    cluster: &Cluster,
    translation: &mut Translation,
    policy: &Policy,
    log: &Logger,
) -> bool {
    let services = translation.full(cluster, policy, log);
    let table = match Table::new(services) {
        Ok(table) => table,
        Err(err) => {
            warn!(log, "the cluster's services do not fit the datapath"; "error" => err.to_string());
            return false;
        }
    };
    match agent.sync(table).await {
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

/// Sends the changes of `changed` services; false asks for a full sync.
async fn send_changes(
    agent: &mut AgentClient,
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
    if !plan.upserts.is_empty()
        && let Err(err) = agent.upsert(plan.upserts.clone()).await
    {
        warn!(log, "upsert failed; a full sync follows"; "error" => err.to_string());
        return false;
    }
    if !plan.deletes.is_empty()
        && let Err(err) = agent.delete(plan.deletes.clone()).await
    {
        warn!(log, "delete failed; a full sync follows"; "error" => err.to_string());
        return false;
    }
    translation.commit(plan);
    info!(log, "batch applied"; "kubernetes_services" => changed.len(), "upserts" => upserts, "deletes" => deletes);
    true
}
