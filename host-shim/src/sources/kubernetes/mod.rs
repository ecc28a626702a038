//! Kubernetes Services + EndpointSlices (discovery.k8s.io/v1) to socklb
//! tables, as kube-proxy programs them:
//!
//! - every clusterIP (dual stack) and every port; TCP and UDP (SCTP is
//!   skipped with a log line); headless and ExternalName services, and
//!   services labelled `service.kubernetes.io/service-proxy-name` (another
//!   proxy's), are skipped; with `external_vips`, externalIPs and
//!   LoadBalancer ingress IPs are further VIPs, except ingress of `ipMode:
//!   Proxy` (the load balancer proxies: traffic must go to it);
//! - backends from every EndpointSlice labelled with the service's name, of
//!   the VIP's address family, on the slice port whose name matches the
//!   service port (which resolves targetPort, by number or by name, per
//!   endpoint); the first address of each endpoint;
//! - kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go): ready
//!   endpoints (terminating or not); if none is ready, the serving and
//!   terminating ones; to a clusterIP with internalTrafficPolicy Local only
//!   endpoints on `node`; otherwise topology hints narrow the ready ones:
//!   to those hinted for `node` when every ready endpoint has node hints and
//!   one is for `node` (trafficDistribution PreferSameNode), else to those
//!   hinted for the node's `zone` when every ready endpoint has zone hints
//!   and one is for that zone (PreferClose, PreferSameZone, topology-aware
//!   routing); the EndpointSlice controller writes the hints from the
//!   service's trafficDistribution, so kube-proxy, and socklb, read only them;
//! - sessionAffinity ClientIP with its timeoutSeconds (default 10800).
//!
//! The translation depends only on the objects present, so they may arrive
//! in any order. When two services claim one VIP, the first keeps it; when
//! it lets go, the next claimant gets it.

mod endpoints;
pub mod kube_watch;
mod service;
mod translation;
mod trim;

pub use service::Translated;
pub use translation::{Plan, Translation};
pub use trim::{TrimmedService, TrimmedSlice};

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service with this label is served by the proxy it names, not by us
/// (kube-proxy skips it the same way).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The Node label with the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A namespaced object's identity. Shared strings: the cluster and the
/// translation file each object under its key several times (10,000
/// services made that a tenth of the node daemon's heap as Strings).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
        ObjectKey {
            namespace: meta.namespace.as_deref().unwrap_or_default().into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How the translation treats what kube-proxy makes configurable.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// This node, for internalTrafficPolicy Local and node hints.
    pub node: Option<String>,
    /// Also serve externalIPs and LoadBalancer ingress IPs as VIPs.
    pub external_vips: bool,
    /// This node's zone (its Node's `topology.kubernetes.io/zone`), for
    /// zone hints; `None` ignores them, as kube-proxy does.
    pub zone: Option<String>,
}

/// The Services and EndpointSlices seen so far, as much of them as
/// translation reads. Every change returns the services whose translation
/// may have changed.
#[derive(Default)]
pub struct Cluster {
    services: BTreeMap<ObjectKey, TrimmedService>,
    /// Slices by the service they belong to (most services have one).
    slices: BTreeMap<ObjectKey, Vec<TrimmedSlice>>,
    /// The service each slice was filed under (its label may change).
    slice_owner: HashMap<ObjectKey, ObjectKey>,
}

impl Cluster {
    pub fn apply_service(&mut self, service: core::Service) -> Vec<ObjectKey> {
        self.insert_service(service.into())
    }

    fn insert_service(&mut self, service: TrimmedService) -> Vec<ObjectKey> {
        let key = service.key.clone();
        self.services.insert(key.clone(), service);
        vec![key]
    }

    pub fn delete_service(&mut self, service: &core::Service) -> Vec<ObjectKey> {
        let key = ObjectKey::of(&service.metadata);
        self.services.remove(&key);
        vec![key]
    }

    pub fn apply_slice(&mut self, slice: discovery::EndpointSlice) -> Vec<ObjectKey> {
        self.insert_slice(slice.into())
    }

    fn insert_slice(&mut self, slice: TrimmedSlice) -> Vec<ObjectKey> {
        let mut dirty = self.remove_slice(&slice.key);
        let Some(service) = &slice.service else {
            return dirty;
        };
        let owner = ObjectKey {
            namespace: slice.key.namespace.clone(),
            name: service.clone(),
        };
        self.slice_owner.insert(slice.key.clone(), owner.clone());
        // Most services have one slice: a Vec's first push would make room
        // for four.
        self.slices
            .entry(owner.clone())
            .or_insert_with(|| Vec::with_capacity(1))
            .push(slice);
        dirty.push(owner);
        dirty
    }

    pub fn delete_slice(&mut self, slice: &discovery::EndpointSlice) -> Vec<ObjectKey> {
        self.remove_slice(&ObjectKey::of(&slice.metadata))
    }

    fn remove_slice(&mut self, slice_key: &ObjectKey) -> Vec<ObjectKey> {
        let Some(owner) = self.slice_owner.remove(slice_key) else {
            return Vec::new();
        };
        if let Some(slices) = self.slices.get_mut(&owner) {
            slices.retain(|slice| slice.key != *slice_key);
            if slices.is_empty() {
                self.slices.remove(&owner);
            }
        }
        vec![owner]
    }

    /// A relist of Services (trimmed as they arrived): they replace all
    /// known ones.
    pub fn replace_services(&mut self, services: Vec<TrimmedService>) -> Vec<ObjectKey> {
        let mut dirty: Vec<ObjectKey> = self.services.keys().cloned().collect();
        self.services.clear();
        for service in services {
            dirty.extend(self.insert_service(service));
        }
        dirty
    }

    /// A relist of EndpointSlices (trimmed as they arrived): they replace
    /// all known ones.
    pub fn replace_slices(&mut self, slices: Vec<TrimmedSlice>) -> Vec<ObjectKey> {
        let mut dirty: Vec<ObjectKey> = self.slices.keys().cloned().collect();
        self.slices.clear();
        self.slice_owner.clear();
        for slice in slices {
            dirty.extend(self.insert_slice(slice));
        }
        dirty
    }

    pub fn service_keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.services.keys()
    }
}

#[cfg(test)]
mod tests;
