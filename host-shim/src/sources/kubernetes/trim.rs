//! What of each watched object the translation keeps: its own small
//! types holding only what `kubernetes/` reads, made as each object
//! arrives, so a node daemon holds the cluster's Services and
//! EndpointSlices at a fraction of their size. The k8s-openapi structs
//! carry every field the API has (an `Endpoint` is 352 bytes with none
//! set), and a whole cluster of them was most of the daemon's memory.
//! Addresses are parsed here, once; values translation cannot use (an
//! address that does not parse, an endpoint without one) are dropped here
//! as translation would skip them. Lists are boxed slices: collected in
//! place from the API's `Vec`s, a `Vec` would keep their allocation.

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use socklb_table::DEFAULT_AFFINITY_TIMEOUT_SECS;

use crate::sources::kubernetes::{ObjectKey, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};

/// What translation reads of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrimmedService {
    pub key: ObjectKey,
    /// Without a spec, ExternalName, or served by another proxy (labelled
    /// `service.kubernetes.io/service-proxy-name`): nothing to translate.
    pub ignored: bool,
    /// clusterIPs (clusterIP when the list is absent or empty).
    pub cluster_ips: Box<[IpAddr]>,
    pub external_ips: Box<[IpAddr]>,
    /// LoadBalancer ingress IPs, except those of `ipMode: Proxy`.
    pub ingress_ips: Box<[IpAddr]>,
    pub ports: Box<[ServicePort]>,
    /// sessionAffinity ClientIP's timeout.
    pub affinity_timeout_secs: Option<u32>,
    /// internalTrafficPolicy Local.
    pub local_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: i32,
    /// As written (TCP when absent).
    pub protocol: String,
}

/// What translation reads of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrimmedSlice {
    pub key: ObjectKey,
    /// The Service it belongs to (`kubernetes.io/service-name`).
    pub service: Option<Arc<str>>,
    /// addressType: IPv4, IPv6 (FQDN slices have no family).
    pub family: Option<Family>,
    pub ports: Box<[SlicePort]>,
    pub endpoints: Box<[TrimmedEndpoint]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    /// As written (TCP when absent).
    pub protocol: String,
    pub port: Option<i32>,
}

/// An endpoint with an address, its conditions resolved as Kubernetes
/// defines their absence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrimmedEndpoint {
    /// The first of its addresses.
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone_hints: Box<[String]>,
    pub node_hints: Box<[String]>,
}

fn parsed(ips: impl IntoIterator<Item = String>) -> Box<[IpAddr]> {
    ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

impl From<core::Service> for TrimmedService {
    fn from(service: core::Service) -> TrimmedService {
        let key = ObjectKey::of(&service.metadata);
        let other_proxy = service
            .metadata
            .labels
            .is_some_and(|labels| labels.contains_key(SERVICE_PROXY_NAME_LABEL));
        let Some(spec) = service.spec.filter(|_| !other_proxy) else {
            return TrimmedService {
                key,
                ignored: true,
                cluster_ips: Box::default(),
                external_ips: Box::default(),
                ingress_ips: Box::default(),
                ports: Box::default(),
                affinity_timeout_secs: None,
                local_only: false,
            };
        };
        let cluster_ips = match spec.cluster_ips {
            Some(ips) if !ips.is_empty() => parsed(ips),
            _ => parsed(spec.cluster_ip),
        };
        let ingress_ips = service
            .status
            .and_then(|status| status.load_balancer)
            .and_then(|lb| lb.ingress)
            .into_iter()
            .flatten()
            .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ingress| ingress.ip?.parse().ok())
            .collect();
        let affinity_timeout_secs =
            (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                spec.session_affinity_config
                    .and_then(|config| config.client_ip)
                    .and_then(|client_ip| client_ip.timeout_seconds)
                    .and_then(|secs| u32::try_from(secs).ok())
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS)
            });
        TrimmedService {
            key,
            ignored: spec.type_.as_deref() == Some("ExternalName"),
            cluster_ips,
            external_ips: parsed(spec.external_ips.into_iter().flatten()),
            ingress_ips,
            ports: spec
                .ports
                .into_iter()
                .flatten()
                .map(|port| ServicePort {
                    name: port.name.unwrap_or_default(),
                    port: port.port,
                    protocol: port.protocol.unwrap_or_else(|| "TCP".into()),
                })
                .collect(),
            affinity_timeout_secs,
            local_only: spec.internal_traffic_policy.as_deref() == Some("Local"),
        }
    }
}

impl From<discovery::EndpointSlice> for TrimmedSlice {
    fn from(slice: discovery::EndpointSlice) -> TrimmedSlice {
        let key = ObjectKey::of(&slice.metadata);
        let names = |hints: Option<Vec<String>>| hints.unwrap_or_default().into_boxed_slice();
        TrimmedSlice {
            key,
            service: slice
                .metadata
                .labels
                .and_then(|mut labels| labels.remove(SERVICE_NAME_LABEL))
                .map(Arc::from),
            family: match slice.address_type.as_str() {
                "IPv4" => Some(Family::V4),
                "IPv6" => Some(Family::V6),
                _ => None,
            },
            ports: slice
                .ports
                .into_iter()
                .flatten()
                .map(|port| SlicePort {
                    name: port.name.unwrap_or_default(),
                    protocol: port.protocol.unwrap_or_else(|| "TCP".into()),
                    port: port.port,
                })
                .collect(),
            endpoints: slice
                .endpoints
                .into_iter()
                .filter_map(|endpoint| {
                    let address = endpoint.addresses.first()?.parse().ok()?;
                    let conditions = endpoint.conditions.unwrap_or_default();
                    // Kubernetes: a missing ready means ready, a missing
                    // serving means the same as ready, a missing
                    // terminating means not.
                    let ready = conditions.ready.unwrap_or(true);
                    let hints = endpoint.hints.unwrap_or_default();
                    Some(TrimmedEndpoint {
                        address,
                        ready,
                        serving: conditions.serving.unwrap_or(ready),
                        terminating: conditions.terminating.unwrap_or(false),
                        node: endpoint.node_name,
                        zone_hints: names(
                            hints
                                .for_zones
                                .map(|zones| zones.into_iter().map(|z| z.name).collect()),
                        ),
                        node_hints: names(
                            hints
                                .for_nodes
                                .map(|nodes| nodes.into_iter().map(|n| n.name).collect()),
                        ),
                    })
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A Service as a real API server returns it, with the kinds of fields
    /// translation never reads.
    fn full_service() -> core::Service {
        serde_json::from_value(json!({
            "metadata": {
                "namespace": "default", "name": "web", "uid": "1234", "resourceVersion": "77",
                "labels": {"app": "web", SERVICE_PROXY_NAME_LABEL: "other"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "managedFields": [{"manager": "kubectl", "operation": "Update"}]
            },
            "spec": {
                "type": "LoadBalancer", "selector": {"app": "web"},
                "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "externalIPs": ["192.0.2.9"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                           "targetPort": "http", "nodePort": 30080}],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}},
                "internalTrafficPolicy": "Cluster", "externalTrafficPolicy": "Cluster",
                "healthCheckNodePort": 31000, "loadBalancerSourceRanges": ["0.0.0.0/0"]
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.7", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]},
                {"hostname": "lb.example"}
            ]}}
        }))
        .unwrap()
    }

    fn full_slice() -> discovery::EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {
                "namespace": "default", "name": "web-abc", "generateName": "web-",
                "labels": {SERVICE_NAME_LABEL: "web", "endpointslice.kubernetes.io/managed-by": "x"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "1234"}],
                "managedFields": [{"manager": "kube-controller-manager"}]
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{
                "addresses": ["10.244.1.1"], "conditions": {"ready": true},
                "nodeName": "node-a", "zone": "zone-a", "hostname": "web-0",
                "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "default"},
                "hints": {"forZones": [{"name": "zone-a"}]}
            }]
        }))
        .unwrap()
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_service_keeps_what_translation_reads() {
        let mut ours = full_service();
        ours.metadata.labels = None;
        assert_eq!(
            TrimmedService::from(ours),
            TrimmedService {
                key: key("web"),
                ignored: false,
                cluster_ips: [ip("10.96.0.20")].into(),
                external_ips: [ip("192.0.2.9")].into(),
                ingress_ips: [ip("198.51.100.7")].into(),
                ports: [ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: "TCP".into(),
                }]
                .into(),
                affinity_timeout_secs: Some(30),
                local_only: false,
            }
        );
        // The label translation reads survives as "not ours".
        assert!(TrimmedService::from(full_service()).ignored);
    }

    #[test]
    fn a_slice_keeps_what_translation_reads_with_conditions_resolved() {
        let mut slice = full_slice();
        slice.endpoints.extend(
            serde_json::from_value::<Vec<discovery::Endpoint>>(json!([
                {"addresses": ["10.244.1.2"], "conditions": {"ready": false, "terminating": true}},
                {"addresses": ["not an address"]},
                {"addresses": []}
            ]))
            .unwrap(),
        );
        assert_eq!(
            TrimmedSlice::from(slice),
            TrimmedSlice {
                key: key("web-abc"),
                service: Some("web".into()),
                family: Some(Family::V4),
                ports: [SlicePort {
                    name: "http".into(),
                    protocol: "TCP".into(),
                    port: Some(8080),
                }]
                .into(),
                endpoints: [
                    TrimmedEndpoint {
                        address: ip("10.244.1.1"),
                        ready: true,
                        serving: true,
                        terminating: false,
                        node: Some("node-a".into()),
                        zone_hints: ["zone-a".to_string()].into(),
                        node_hints: [].into(),
                    },
                    TrimmedEndpoint {
                        address: ip("10.244.1.2"),
                        ready: false,
                        serving: false,
                        terminating: true,
                        node: None,
                        zone_hints: [].into(),
                        node_hints: [].into(),
                    },
                ]
                .into(),
            }
        );
    }
}
