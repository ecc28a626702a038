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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use slog::{Logger, warn};
use socklb_table::{DEFAULT_AFFINITY_TIMEOUT_SECS, Protocol, Service, ServiceKey};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service with this label is served by the proxy it names, not by us
/// (kube-proxy skips it the same way).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The Node label with the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
        ObjectKey {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
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

/// The Services and EndpointSlices seen so far. Every change returns the
/// services whose translation may have changed.
#[derive(Default)]
pub struct Cluster {
    services: BTreeMap<ObjectKey, core::Service>,
    /// Slices by the service they belong to, then by slice name.
    slices: BTreeMap<ObjectKey, BTreeMap<String, discovery::EndpointSlice>>,
    /// The service each slice was filed under (its label may change).
    slice_owner: HashMap<ObjectKey, ObjectKey>,
}

impl Cluster {
    pub fn apply_service(&mut self, service: core::Service) -> Vec<ObjectKey> {
        let key = ObjectKey::of(&service.metadata);
        self.services.insert(key.clone(), service);
        vec![key]
    }

    pub fn delete_service(&mut self, service: &core::Service) -> Vec<ObjectKey> {
        let key = ObjectKey::of(&service.metadata);
        self.services.remove(&key);
        vec![key]
    }

    pub fn apply_slice(&mut self, slice: discovery::EndpointSlice) -> Vec<ObjectKey> {
        let mut dirty = self.delete_slice(&slice);
        let slice_key = ObjectKey::of(&slice.metadata);
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        else {
            return dirty;
        };
        let owner = ObjectKey {
            namespace: slice_key.namespace.clone(),
            name: service.clone(),
        };
        self.slices
            .entry(owner.clone())
            .or_default()
            .insert(slice_key.name.clone(), slice);
        self.slice_owner.insert(slice_key, owner.clone());
        dirty.push(owner);
        dirty
    }

    pub fn delete_slice(&mut self, slice: &discovery::EndpointSlice) -> Vec<ObjectKey> {
        let slice_key = ObjectKey::of(&slice.metadata);
        let Some(owner) = self.slice_owner.remove(&slice_key) else {
            return Vec::new();
        };
        if let Some(slices) = self.slices.get_mut(&owner) {
            slices.remove(&slice_key.name);
            if slices.is_empty() {
                self.slices.remove(&owner);
            }
        }
        vec![owner]
    }

    /// A relist of Services: they replace all known ones.
    pub fn replace_services(&mut self, services: Vec<core::Service>) -> Vec<ObjectKey> {
        let mut dirty: Vec<ObjectKey> = self.services.keys().cloned().collect();
        self.services.clear();
        for service in services {
            dirty.extend(self.apply_service(service));
        }
        dirty
    }

    /// A relist of EndpointSlices: they replace all known ones.
    pub fn replace_slices(&mut self, slices: Vec<discovery::EndpointSlice>) -> Vec<ObjectKey> {
        let mut dirty: Vec<ObjectKey> = self.slices.keys().cloned().collect();
        self.slices.clear();
        self.slice_owner.clear();
        for slice in slices {
            dirty.extend(self.apply_slice(slice));
        }
        dirty
    }

    pub fn service_keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.services.keys()
    }

    /// The socklb services one Kubernetes Service stands for (none when it
    /// is absent, headless or ExternalName).
    pub fn translate(&self, key: &ObjectKey, policy: &Policy, log: &Logger) -> Vec<Service> {
        let Some(service) = self.services.get(key) else {
            return Vec::new();
        };
        let Some(spec) = &service.spec else {
            return Vec::new();
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return Vec::new();
        }
        let labels = service.metadata.labels.as_ref();
        if labels.is_some_and(|labels| labels.contains_key(SERVICE_PROXY_NAME_LABEL)) {
            return Vec::new();
        }
        let cluster_ips: Vec<IpAddr> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
            _ => spec
                .cluster_ip
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .collect(),
        };
        let mut vips: Vec<(IpAddr, VipKind)> = cluster_ips
            .into_iter()
            .map(|ip| (ip, VipKind::Cluster))
            .collect();
        if policy.external_vips {
            vips.extend(
                spec.external_ips
                    .iter()
                    .flatten()
                    .filter_map(|ip| Some((ip.parse::<IpAddr>().ok()?, VipKind::External))),
            );
            let ingress = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            vips.extend(
                ingress
                    .iter()
                    .copied()
                    .flatten()
                    .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                    .filter_map(|i| Some((i.ip.as_ref()?.parse().ok()?, VipKind::External))),
            );
        }
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS)
        });
        let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
        if local_only && policy.node.is_none() {
            warn!(log, "internalTrafficPolicy Local without --node: no endpoint counts as local";
                  "service" => key.to_string());
        }
        let slices = self.slices.get(key);
        let mut translated = Vec::new();
        for port in spec.ports.iter().flatten() {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => {
                    warn!(log, "skipping a port of an unsupported protocol";
                          "service" => key.to_string(), "port" => port.port, "protocol" => other);
                    continue;
                }
            };
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            let port_name = port.name.as_deref().unwrap_or_default();
            for (vip, kind) in &vips {
                // From a pod, external VIPs always reach cluster endpoints
                // (kube-proxy short-circuits pod traffic to them).
                let local_only = local_only && *kind == VipKind::Cluster;
                let endpoints = endpoints(slices, vip, port_name, protocol);
                let backends = categorize(&endpoints, local_only, policy);
                let candidate = Service {
                    name: Some(if port_name.is_empty() {
                        key.to_string()
                    } else {
                        format!("{key}:{port_name}")
                    }),
                    key: ServiceKey {
                        vip: vip.to_canonical(),
                        port: service_port,
                        protocol,
                    },
                    affinity_timeout_secs: affinity,
                    backends,
                };
                match candidate.validate() {
                    Ok(service) => translated.push(service),
                    Err(err) => warn!(log, "skipping a service socklb cannot program";
                                      "service" => key.to_string(), "error" => err.to_string()),
                }
            }
        }
        translated
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VipKind {
    /// A clusterIP.
    Cluster,
    /// An externalIP or a LoadBalancer ingress IP.
    External,
}

/// One endpoint as kube-proxy's categorization sees it.
#[derive(Debug)]
struct Endpoint<'a> {
    backend: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<&'a str>,
    zone_hints: Vec<&'a str>,
    node_hints: Vec<&'a str>,
}

/// Where traffic stays, by the endpoints' hints (kube-proxy's topology mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    Anywhere,
    SameNode,
    SameZone,
}

/// kube-proxy's `topologyModeFromHints`: same node when every ready
/// endpoint has node hints and one is for this node; else same zone when
/// every ready endpoint has zone hints and one is for this node's zone.
fn topology(endpoints: &[Endpoint], policy: &Policy) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    let hinted_for = |hints: &[&[&str]], target: Option<&str>| {
        hints.iter().all(|h| !h.is_empty())
            && hints.iter().any(|h| target.is_some_and(|t| h.contains(&t)))
    };
    let node_hints: Vec<&[&str]> = ready.iter().map(|e| e.node_hints.as_slice()).collect();
    let zone_hints: Vec<&[&str]> = ready.iter().map(|e| e.zone_hints.as_slice()).collect();
    if hinted_for(&node_hints, policy.node.as_deref()) {
        Topology::SameNode
    } else if hinted_for(&zone_hints, policy.zone.as_deref()) {
        Topology::SameZone
    } else {
        Topology::Anywhere
    }
}

/// The backends kube-proxy would use from this node (`CategorizeEndpoints`):
/// ready endpoints (on this node only for `local_only`, else those the
/// topology allows), else the serving terminating ones.
fn categorize(endpoints: &[Endpoint], local_only: bool, policy: &Policy) -> Vec<SocketAddr> {
    let node = policy.node.as_deref();
    let chosen: Vec<&Endpoint> = if local_only {
        let local: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| node.is_some() && e.node == node)
            .collect();
        let ready: Vec<&Endpoint> = local.iter().copied().filter(|e| e.ready).collect();
        if ready.is_empty() {
            local
                .into_iter()
                .filter(|e| e.serving && e.terminating)
                .collect()
        } else {
            ready
        }
    } else {
        let topology = topology(endpoints, policy);
        let available = |e: &Endpoint| match topology {
            Topology::Anywhere => true,
            Topology::SameNode => node.is_some_and(|n| e.node_hints.contains(&n)),
            Topology::SameZone => policy
                .zone
                .as_deref()
                .is_some_and(|z| e.zone_hints.contains(&z)),
        };
        let ready: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| e.ready && available(e))
            .collect();
        if ready.is_empty() {
            // No ready endpoint anywhere (topology never empties the set).
            endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .collect()
        } else {
            ready
        }
    };
    let backends: BTreeSet<SocketAddr> = chosen.into_iter().map(|e| e.backend).collect();
    backends.into_iter().collect()
}

/// The endpoints for one VIP family and service port.
fn endpoints<'a>(
    slices: Option<&'a BTreeMap<String, discovery::EndpointSlice>>,
    vip: &IpAddr,
    port_name: &str,
    protocol: Protocol,
) -> Vec<Endpoint<'a>> {
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut found = Vec::new();
    for slice in slices.into_iter().flat_map(|s| s.values()) {
        if slice.address_type != family {
            continue;
        }
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol.to_string()
        }) else {
            continue;
        };
        let Some(target_port) = target
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            // Kubernetes: a missing ready means ready, a missing serving
            // means the same as ready, a missing terminating means not.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let hints = endpoint.hints.as_ref();
            found.push(Endpoint {
                backend: SocketAddr::new(ip.to_canonical(), target_port),
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                node: endpoint.node_name.as_deref(),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.as_str())
                    .collect(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.as_str())
                    .collect(),
            });
        }
    }
    found
}

/// What the agent was given, per Kubernetes Service, so that each batch of
/// changed services becomes Upserts and Deletes of just what changed.
#[derive(Default)]
pub struct Translation {
    applied: BTreeMap<ServiceKey, Service>,
    owners: BTreeMap<ObjectKey, BTreeSet<ServiceKey>>,
    /// The reverse of `owners`: which Kubernetes Service has a VIP:port.
    owner_of: BTreeMap<ServiceKey, ObjectKey>,
    /// Services refused a VIP:port another one owns: recomputed with its
    /// owner, so one of them gets it when the owner lets go.
    waiting: BTreeMap<ServiceKey, BTreeSet<ObjectKey>>,
}

/// Changes to send, and the state to keep once the agent has them.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub upserts: Vec<Service>,
    pub deletes: Vec<ServiceKey>,
    owners: BTreeMap<ObjectKey, BTreeSet<ServiceKey>>,
    waiting: BTreeMap<ServiceKey, BTreeSet<ObjectKey>>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

impl Translation {
    /// Everything `cluster` translates to; becomes what was applied.
    pub fn full(&mut self, cluster: &Cluster, policy: &Policy, log: &Logger) -> Vec<Service> {
        *self = Translation::default();
        let keys: Vec<ObjectKey> = cluster.service_keys().cloned().collect();
        let plan = self.plan(cluster, keys, policy, log);
        let services = plan.upserts.clone();
        self.commit(plan);
        services
    }

    /// What to send for the services in `dirty`.
    pub fn plan(
        &self,
        cluster: &Cluster,
        dirty: impl IntoIterator<Item = ObjectKey>,
        policy: &Policy,
        log: &Logger,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut dirty: BTreeSet<ObjectKey> = dirty.into_iter().collect();
        let waiting: Vec<ObjectKey> = dirty
            .iter()
            .filter_map(|key| self.owners.get(key))
            .flatten()
            .filter_map(|vip| self.waiting.get(vip))
            .flatten()
            .cloned()
            .collect();
        dirty.extend(waiting);
        let translated: Vec<(&ObjectKey, Vec<Service>)> = dirty
            .iter()
            .map(|key| (key, cluster.translate(key, policy, log)))
            .collect();
        // An owner keeps what it still claims; others queue behind it.
        let mut claimed: BTreeMap<ServiceKey, &ObjectKey> = BTreeMap::new();
        for (key, services) in &translated {
            if let Some(owned) = self.owners.get(*key) {
                for service in services.iter().filter(|s| owned.contains(&s.key)) {
                    claimed.insert(service.key, *key);
                }
            }
        }
        for (key, services) in translated {
            let previous = self.owners.get(key).cloned().unwrap_or_default();
            let mut owned = BTreeSet::new();
            for service in services {
                // Owners being recomputed count by their new claims only.
                let owner = claimed.get(&service.key).copied().or_else(|| {
                    self.owner_of
                        .get(&service.key)
                        .filter(|owner| !dirty.contains(*owner))
                });
                if owner.is_some_and(|owner| owner != key) {
                    warn!(log, "VIP already served by another service; skipped";
                          "service" => key.to_string(), "vip" => service.key.to_string());
                    plan.waiting
                        .entry(service.key)
                        .or_default()
                        .insert(key.clone());
                    continue;
                }
                owned.insert(service.key);
                claimed.insert(service.key, key);
                if self.applied.get(&service.key) != Some(&service) {
                    plan.upserts.push(service);
                }
            }
            plan.deletes.extend(previous.difference(&owned).copied());
            plan.owners.insert(key.clone(), owned);
        }
        // A VIP that moved to another service is replaced, not removed.
        let upserted: BTreeSet<ServiceKey> = plan.upserts.iter().map(|s| s.key).collect();
        plan.deletes.retain(|key| !upserted.contains(key));
        plan
    }

    /// Records a plan the agent acknowledged.
    pub fn commit(&mut self, plan: Plan) {
        for key in &plan.deletes {
            self.applied.remove(key);
        }
        for service in plan.upserts {
            self.applied.insert(service.key, service);
        }
        self.waiting.retain(|_, claimants| {
            claimants.retain(|claimant| !plan.owners.contains_key(claimant));
            !claimants.is_empty()
        });
        for (vip, claimants) in plan.waiting {
            self.waiting.entry(vip).or_default().extend(claimants);
        }
        for (owner, keys) in plan.owners {
            for key in self.owners.remove(&owner).into_iter().flatten() {
                self.owner_of.remove(&key);
            }
            for key in &keys {
                self.owner_of.insert(*key, owner.clone());
            }
            if !keys.is_empty() {
                self.owners.insert(owner, keys);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn log() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    fn service(name: &str, spec: Value) -> core::Service {
        serde_json::from_value(
            json!({"metadata": {"namespace": "default", "name": name}, "spec": spec}),
        )
        .unwrap()
    }

    fn slice(
        name: &str,
        service: &str,
        family: &str,
        ports: Value,
        endpoints: Value,
    ) -> discovery::EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name,
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": family, "ports": ports, "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn ready(ip: &str) -> Value {
        json!({"addresses": [ip], "conditions": {"ready": true}})
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn lines(services: &[Service]) -> Vec<String> {
        services.iter().map(ToString::to_string).collect()
    }

    fn translate(cluster: &Cluster, name: &str, policy: &Policy) -> Vec<String> {
        lines(&cluster.translate(&key(name), policy, &log()))
    }

    #[test]
    fn dual_stack_ports_protocols_and_named_target_ports() {
        let mut cluster = Cluster::default();
        cluster.apply_service(service(
            "web",
            json!({
                "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::20"],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http"},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                    {"name": "sctp", "port": 9, "protocol": "SCTP"}
                ]
            }),
        ));
        // The named port resolves to 8080 on one slice and 8081 on another.
        cluster.apply_slice(slice("web-a", "web", "IPv4",
            json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
            json!([ready("10.244.1.1")])));
        cluster.apply_slice(slice(
            "web-b",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8081}]),
            json!([ready("10.244.1.2"), ready("10.244.1.1")]),
        ));
        cluster.apply_slice(slice(
            "web-6",
            "web",
            "IPv6",
            json!([{"name": "http", "port": 8080}]),
            json!([ready("fd00:244::1")]),
        ));
        assert_eq!(
            translate(&cluster, "web", &Policy::default()),
            [
                "10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.1:8081 10.244.1.2:8081]",
                "[fd00:96::20]:80/TCP -> [[fd00:244::1]:8080]",
                "10.96.0.20:53/UDP -> [10.244.1.1:5353]",
                "[fd00:96::20]:53/UDP -> []",
            ]
        );
    }

    #[test]
    fn ready_endpoints_first_then_serving_terminating_ones() {
        let mut cluster = Cluster::default();
        cluster.apply_service(service(
            "web",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
        ));
        let endpoints = json!([
            {"addresses": ["10.244.1.1"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.1.2"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            {"addresses": ["10.244.1.3"], "conditions": {"ready": false}},
            {"addresses": ["10.244.1.4"]}
        ]);
        cluster.apply_slice(slice(
            "s",
            "web",
            "IPv4",
            json!([{"port": 8080}]),
            endpoints.clone(),
        ));
        // A missing ready condition means ready.
        assert_eq!(
            translate(&cluster, "web", &Policy::default()),
            ["10.96.0.20:80/TCP -> [10.244.1.4:8080]"]
        );
        let mut without_ready = endpoints.as_array().unwrap().clone();
        without_ready.pop();
        cluster.apply_slice(slice(
            "s",
            "web",
            "IPv4",
            json!([{"port": 8080}]),
            Value::Array(without_ready),
        ));
        assert_eq!(
            translate(&cluster, "web", &Policy::default()),
            ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
        );
    }

    #[test]
    fn skipped_kinds_affinity_local_policy_and_external_vips() {
        let mut cluster = Cluster::default();
        cluster.apply_service(service(
            "headless",
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
        ));
        cluster.apply_service(service(
            "ext",
            json!({"type": "ExternalName", "externalName": "x.example"}),
        ));
        cluster.apply_service(service(
            "sticky",
            json!({
            "clusterIP": "10.96.0.30", "ports": [{"port": 80}], "sessionAffinity": "ClientIP"}),
        ));
        cluster.apply_service(service(
            "sticky-30",
            json!({
            "clusterIP": "10.96.0.31", "ports": [{"port": 80}], "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}}}),
        ));
        cluster.apply_service(service(
            "local",
            json!({
            "clusterIP": "10.96.0.40", "ports": [{"port": 80}], "internalTrafficPolicy": "Local"}),
        ));
        let mut lb: core::Service = service(
            "lb",
            json!({
            "type": "LoadBalancer", "clusterIP": "10.96.0.50", "externalIPs": ["192.0.2.10"],
            "ports": [{"port": 443}]}),
        );
        lb.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"hostname": "lb.example"}]}})).unwrap();
        cluster.apply_service(lb);
        cluster.apply_slice(slice(
            "local-1",
            "local",
            "IPv4",
            json!([{"port": 8080}]),
            json!([
                {"addresses": ["10.244.1.1"], "nodeName": "node-a"},
                {"addresses": ["10.244.2.1"], "nodeName": "node-b"}
            ]),
        ));
        let policy = Policy {
            node: Some("node-b".into()),
            ..Policy::default()
        };
        assert!(translate(&cluster, "headless", &policy).is_empty());
        assert!(translate(&cluster, "ext", &policy).is_empty());
        assert_eq!(
            translate(&cluster, "sticky", &policy),
            ["10.96.0.30:80/TCP -> [] affinity 10800"]
        );
        assert_eq!(
            translate(&cluster, "sticky-30", &policy),
            ["10.96.0.31:80/TCP -> [] affinity 30"]
        );
        assert_eq!(
            translate(&cluster, "local", &policy),
            ["10.96.0.40:80/TCP -> [10.244.2.1:8080]"]
        );
        assert_eq!(
            translate(&cluster, "local", &Policy::default()),
            ["10.96.0.40:80/TCP -> []"]
        );
        assert_eq!(
            translate(&cluster, "lb", &policy),
            ["10.96.0.50:443/TCP -> []"]
        );
        let external = Policy {
            external_vips: true,
            ..policy
        };
        assert_eq!(
            translate(&cluster, "lb", &external),
            [
                "10.96.0.50:443/TCP -> []",
                "192.0.2.10:443/TCP -> []",
                "198.51.100.7:443/TCP -> []",
            ]
        );
    }

    #[test]
    fn any_order_and_slices_that_change_service() {
        let web = || {
            service(
                "web",
                json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
            )
        };
        let web_slice = || {
            slice(
                "s",
                "web",
                "IPv4",
                json!([{"port": 8080}]),
                json!([ready("10.244.1.1")]),
            )
        };
        let mut slices_first = Cluster::default();
        slices_first.apply_slice(web_slice());
        slices_first.apply_service(web());
        let mut services_first = Cluster::default();
        services_first.apply_service(web());
        services_first.apply_slice(web_slice());
        let expected = ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"];
        assert_eq!(
            translate(&slices_first, "web", &Policy::default()),
            expected
        );
        assert_eq!(
            translate(&services_first, "web", &Policy::default()),
            expected
        );
        // Relabelled to another service: it leaves the first one.
        let dirty = services_first.apply_slice(slice(
            "s",
            "api",
            "IPv4",
            json!([{"port": 8080}]),
            json!([ready("10.244.1.1")]),
        ));
        assert_eq!(dirty, [key("web"), key("api")]);
        assert_eq!(
            translate(&services_first, "web", &Policy::default()),
            ["10.96.0.20:80/TCP -> []"]
        );
    }

    #[test]
    fn plans_send_only_what_changed() {
        let log = log();
        let policy = Policy::default();
        let mut cluster = Cluster::default();
        cluster.apply_service(service(
            "web",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}, {"name": "b", "port": 81}]}),
        ));
        cluster.apply_service(service(
            "api",
            json!({"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}),
        ));
        let mut translation = Translation::default();
        assert_eq!(translation.full(&cluster, &policy, &log).len(), 3);

        let dirty = cluster.apply_slice(slice(
            "s",
            "web",
            "IPv4",
            json!([{"port": 8080}]),
            json!([ready("10.244.1.1")]),
        ));
        let plan = translation.plan(&cluster, dirty, &policy, &log);
        assert_eq!(
            lines(&plan.upserts),
            ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
        );
        assert!(plan.deletes.is_empty());
        translation.commit(plan);
        assert!(
            translation
                .plan(&cluster, [key("web"), key("api")], &policy, &log)
                .is_empty()
        );

        let dirty = cluster.delete_service(&service("web", json!({})));
        let plan = translation.plan(&cluster, dirty, &policy, &log);
        assert!(plan.upserts.is_empty());
        assert_eq!(plan.deletes.len(), 2);
    }

    #[test]
    fn a_vip_claimed_twice_stays_with_its_first_owner() {
        let log = log();
        let policy = Policy {
            external_vips: true,
            ..Policy::default()
        };
        let mut cluster = Cluster::default();
        cluster.apply_service(service(
            "a",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
        ));
        let mut translation = Translation::default();
        translation.full(&cluster, &policy, &log);
        let dirty = cluster.apply_service(service(
            "b",
            json!({
            "clusterIP": "10.96.0.21", "externalIPs": ["10.96.0.20"], "ports": [{"port": 80}]}),
        ));
        let plan = translation.plan(&cluster, dirty, &policy, &log);
        assert_eq!(lines(&plan.upserts), ["10.96.0.21:80/TCP -> []"]);
        translation.commit(plan);
        // While "a" changes but keeps the VIP, "b" waits.
        let dirty = cluster.apply_slice(slice(
            "a",
            "a",
            "IPv4",
            json!([{"port": 8080}]),
            json!([ready("10.244.1.1")]),
        ));
        let plan = translation.plan(&cluster, dirty, &policy, &log);
        assert_eq!(
            lines(&plan.upserts),
            ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
        );
        translation.commit(plan);
        // Once "a" lets go, "b" gets the VIP without an event of its own.
        let dirty = cluster.delete_service(&service("a", json!({})));
        assert_eq!(dirty, [key("a")]);
        let plan = translation.plan(&cluster, dirty, &policy, &log);
        assert_eq!(lines(&plan.upserts), ["10.96.0.20:80/TCP -> []"]);
        assert!(
            plan.deletes.is_empty(),
            "the VIP moves, it is not removed: {plan:?}"
        );
        translation.commit(plan);
        assert!(
            translation
                .plan(&cluster, [key("a"), key("b")], &policy, &log)
                .is_empty()
        );
    }

    #[test]
    fn an_owner_recomputed_with_its_rival_keeps_the_vip() {
        let log = log();
        let policy = Policy {
            external_vips: true,
            ..Policy::default()
        };
        let mut cluster = Cluster::default();
        // "z" owns the VIP; "a" sorts first and claims it too.
        cluster.apply_service(service(
            "z",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
        ));
        let mut translation = Translation::default();
        translation.full(&cluster, &policy, &log);
        cluster.apply_service(service(
            "a",
            json!({"clusterIP": "10.96.0.21", "externalIPs": ["10.96.0.20"], "ports": [{"port": 80}]}),
        ));
        let plan = translation.plan(&cluster, [key("a"), key("z")], &policy, &log);
        assert_eq!(lines(&plan.upserts), ["10.96.0.21:80/TCP -> []"]);
        assert!(plan.deletes.is_empty(), "{plan:?}");
    }

    #[test]
    fn services_of_another_proxy_and_proxied_load_balancers_are_not_ours() {
        let mut cluster = Cluster::default();
        let mut other: core::Service = service(
            "other",
            json!({"clusterIP": "10.96.0.60", "ports": [{"port": 80}]}),
        );
        other.metadata.labels = Some(
            [(
                SERVICE_PROXY_NAME_LABEL.to_string(),
                "other-proxy".to_string(),
            )]
            .into(),
        );
        cluster.apply_service(other);
        let mut lb: core::Service = service(
            "lb",
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.50", "ports": [{"port": 443}]}),
        );
        lb.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [
            {"ip": "198.51.100.7", "ipMode": "VIP"},
            {"ip": "198.51.100.8", "ipMode": "Proxy"},
            {"ip": "198.51.100.9"}
        ]}}))
        .unwrap();
        cluster.apply_service(lb);
        let policy = Policy {
            external_vips: true,
            ..Policy::default()
        };
        assert!(translate(&cluster, "other", &policy).is_empty());
        assert_eq!(
            translate(&cluster, "lb", &policy),
            [
                "10.96.0.50:443/TCP -> []",
                "198.51.100.7:443/TCP -> []",
                "198.51.100.9:443/TCP -> []",
            ]
        );
    }

    #[test]
    fn a_ready_terminating_endpoint_counts_as_ready() {
        let mut cluster = Cluster::default();
        cluster.apply_service(service(
            "web",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
        ));
        cluster.apply_slice(slice(
            "s",
            "web",
            "IPv4",
            json!([{"port": 8080}]),
            json!([
                {"addresses": ["10.244.1.1"], "conditions": {"ready": true, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}
            ]),
        ));
        assert_eq!(
            translate(&cluster, "web", &Policy::default()),
            ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
        );
    }

    /// A ready endpoint with topology hints, as the EndpointSlice controller
    /// writes them for the service's trafficDistribution.
    fn hinted(ip: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Value {
        let mut hints = serde_json::Map::new();
        if !zones.is_empty() {
            hints.insert(
                "forZones".into(),
                zones.iter().map(|z| json!({"name": z})).collect(),
            );
        }
        if !nodes.is_empty() {
            hints.insert(
                "forNodes".into(),
                nodes.iter().map(|n| json!({"name": n})).collect(),
            );
        }
        json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true},
               "hints": hints})
    }

    fn topology_cluster(endpoints: Value) -> Cluster {
        let mut cluster = Cluster::default();
        cluster.apply_service(service(
            "web",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}],
                   "trafficDistribution": "PreferClose"}),
        ));
        cluster.apply_slice(slice(
            "s",
            "web",
            "IPv4",
            json!([{"port": 8080}]),
            endpoints,
        ));
        cluster
    }

    fn on(node: &str, zone: Option<&str>) -> Policy {
        Policy {
            node: Some(node.into()),
            zone: zone.map(Into::into),
            ..Policy::default()
        }
    }

    #[test]
    fn zone_hints_keep_traffic_in_the_zone_when_kube_proxy_would() {
        // PreferClose and PreferSameZone: the controller hints every
        // endpoint for its own zone.
        let cluster = topology_cluster(json!([
            hinted("10.244.1.1", "node-a", &["zone-a"], &[]),
            hinted("10.244.1.2", "node-b", &["zone-b"], &[]),
            hinted("10.244.1.3", "node-c", &["zone-a"], &[])
        ]));
        let all = ["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080 10.244.1.3:8080]"];
        assert_eq!(
            translate(&cluster, "web", &on("node-x", Some("zone-a"))),
            ["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.3:8080]"]
        );
        assert_eq!(
            translate(&cluster, "web", &on("node-x", Some("zone-b"))),
            ["10.96.0.20:80/TCP -> [10.244.1.2:8080]"]
        );
        // No zone label on the node, or no endpoint hinted for its zone:
        // the hints are ignored.
        assert_eq!(translate(&cluster, "web", &on("node-x", None)), all);
        assert_eq!(
            translate(&cluster, "web", &on("node-x", Some("zone-c"))),
            all
        );

        // One ready endpoint without hints: ignored too; a not-ready one
        // does not count.
        let cluster = topology_cluster(json!([
            hinted("10.244.1.1", "node-a", &["zone-a"], &[]),
            {"addresses": ["10.244.1.2"], "conditions": {"ready": true}}
        ]));
        assert_eq!(
            translate(&cluster, "web", &on("node-x", Some("zone-a"))),
            ["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080]"]
        );
        let cluster = topology_cluster(json!([
            hinted("10.244.1.1", "node-a", &["zone-a"], &[]),
            {"addresses": ["10.244.1.2"], "conditions": {"ready": false}}
        ]));
        assert_eq!(
            translate(&cluster, "web", &on("node-x", Some("zone-a"))),
            ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
        );
    }

    #[test]
    fn node_hints_keep_traffic_on_the_node_before_zone_hints() {
        // PreferSameNode: node hints, and zone hints as the fallback.
        let cluster = topology_cluster(json!([
            hinted("10.244.1.1", "node-a", &["zone-a"], &["node-a"]),
            hinted("10.244.1.2", "node-b", &["zone-a"], &["node-b"]),
            hinted("10.244.1.3", "node-c", &["zone-b"], &["node-c"])
        ]));
        assert_eq!(
            translate(&cluster, "web", &on("node-b", Some("zone-a"))),
            ["10.96.0.20:80/TCP -> [10.244.1.2:8080]"]
        );
        // No endpoint on this node: the zone's.
        assert_eq!(
            translate(&cluster, "web", &on("node-x", Some("zone-a"))),
            ["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080]"]
        );
    }

    #[test]
    fn serving_terminating_fallback_and_local_policy_ignore_hints() {
        // No ready endpoint: the serving terminating ones, wherever hinted.
        let cluster = topology_cluster(json!([
            {"addresses": ["10.244.1.1"], "nodeName": "node-a",
             "conditions": {"ready": false, "serving": true, "terminating": true},
             "hints": {"forZones": [{"name": "zone-b"}]}}
        ]));
        assert_eq!(
            translate(&cluster, "web", &on("node-a", Some("zone-a"))),
            ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
        );

        // internalTrafficPolicy Local: this node's ready endpoints, else its
        // serving terminating ones; hints play no part. External VIPs take
        // the cluster's endpoints.
        let mut cluster = Cluster::default();
        cluster.apply_service(service(
            "local",
            json!({"clusterIP": "10.96.0.40", "externalIPs": ["192.0.2.40"],
                   "ports": [{"port": 80}], "internalTrafficPolicy": "Local"}),
        ));
        let terminating_here = json!({"addresses": ["10.244.1.3"], "nodeName": "node-a",
            "conditions": {"ready": false, "serving": true, "terminating": true}});
        cluster.apply_slice(slice(
            "s",
            "local",
            "IPv4",
            json!([{"port": 8080}]),
            json!([
                hinted("10.244.1.1", "node-a", &["zone-b"], &[]),
                hinted("10.244.1.2", "node-b", &["zone-a"], &[]),
                terminating_here.clone()
            ]),
        ));
        let policy = Policy {
            external_vips: true,
            ..on("node-a", Some("zone-a"))
        };
        assert_eq!(
            translate(&cluster, "local", &policy),
            [
                "10.96.0.40:80/TCP -> [10.244.1.1:8080]",
                "192.0.2.40:80/TCP -> [10.244.1.2:8080]",
            ]
        );
        cluster.apply_slice(slice(
            "s",
            "local",
            "IPv4",
            json!([{"port": 8080}]),
            json!([hinted("10.244.1.2", "node-b", &[], &[]), terminating_here]),
        ));
        assert_eq!(
            translate(&cluster, "local", &policy)[0],
            "10.96.0.40:80/TCP -> [10.244.1.3:8080]"
        );
    }
}
