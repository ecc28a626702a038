//! What of each watched object the translation keeps: a copy holding only
//! the fields `kubernetes.rs` reads, made before an object is stored, so a
//! node daemon holds the cluster's Services and EndpointSlices at a
//! fraction of their size (no managedFields, annotations, selectors,
//! target references, ...).

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::sources::kubernetes::{SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};

/// An object reduced to what translation reads.
pub trait Trim {
    fn trimmed(self) -> Self;
}

/// Name, namespace and the one label translation reads.
fn meta(meta: ObjectMeta, label: &str) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        labels: meta
            .labels
            .map(|labels| labels.into_iter().filter(|(key, _)| key == label).collect())
            .filter(|labels: &std::collections::BTreeMap<_, _>| !labels.is_empty()),
        ..ObjectMeta::default()
    }
}

impl Trim for core::Service {
    fn trimmed(self) -> core::Service {
        let spec = self.spec.map(|spec| core::ServiceSpec {
            type_: spec.type_,
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            external_ips: spec.external_ips,
            ports: spec.ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|port| core::ServicePort {
                        name: port.name,
                        port: port.port,
                        protocol: port.protocol,
                        ..core::ServicePort::default()
                    })
                    .collect()
            }),
            session_affinity: spec.session_affinity,
            session_affinity_config: spec.session_affinity_config,
            internal_traffic_policy: spec.internal_traffic_policy,
            ..core::ServiceSpec::default()
        });
        let ingress = self
            .status
            .and_then(|status| status.load_balancer)
            .and_then(|lb| lb.ingress)
            .map(|ingress| {
                ingress
                    .into_iter()
                    .filter(|i| i.ip.is_some())
                    .map(|i| core::LoadBalancerIngress {
                        ip: i.ip,
                        ip_mode: i.ip_mode,
                        ..core::LoadBalancerIngress::default()
                    })
                    .collect()
            });
        core::Service {
            metadata: meta(self.metadata, SERVICE_PROXY_NAME_LABEL),
            spec,
            status: ingress.map(|ingress| core::ServiceStatus {
                load_balancer: Some(core::LoadBalancerStatus {
                    ingress: Some(ingress),
                }),
                ..core::ServiceStatus::default()
            }),
        }
    }
}

impl Trim for discovery::EndpointSlice {
    fn trimmed(self) -> discovery::EndpointSlice {
        discovery::EndpointSlice {
            metadata: meta(self.metadata, SERVICE_NAME_LABEL),
            address_type: self.address_type,
            endpoints: self
                .endpoints
                .into_iter()
                .map(|endpoint| discovery::Endpoint {
                    addresses: endpoint.addresses,
                    conditions: endpoint.conditions,
                    node_name: endpoint.node_name,
                    hints: endpoint.hints,
                    ..discovery::Endpoint::default()
                })
                .collect(),
            ports: self.ports,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use slog::Logger;

    use super::*;
    use crate::sources::kubernetes::{Cluster, ObjectKey, Policy};

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

    fn table_of(service: core::Service, slice: discovery::EndpointSlice) -> Vec<String> {
        let mut cluster = Cluster::default();
        cluster.apply_service(service);
        cluster.apply_slice(slice);
        let policy = Policy {
            node: Some("node-a".into()),
            external_vips: true,
            ..Policy::default()
        };
        let key = ObjectKey {
            namespace: "default".into(),
            name: "web".into(),
        };
        let log = Logger::root(slog::Discard, slog::o!());
        cluster
            .translate(&key, &policy, &log)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn trimmed_objects_translate_the_same() {
        let (service, slice) = (full_service(), full_slice());
        // Without the other proxy's label the service is ours.
        let mut ours = service.clone();
        ours.metadata.labels = None;
        let full = table_of(ours.clone(), slice.clone());
        assert!(!full.is_empty());
        assert_eq!(table_of(ours.trimmed(), slice.clone().trimmed()), full);
        // The label translation reads survives, so the service stays not ours.
        assert!(table_of(service.trimmed(), slice.trimmed()).is_empty());
    }

    #[test]
    fn trimmed_objects_keep_only_what_translation_reads() {
        let service = serde_json::to_value(full_service().trimmed()).unwrap();
        assert_eq!(
            service,
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": "default", "name": "web",
                             "labels": {SERVICE_PROXY_NAME_LABEL: "other"}},
                "spec": {
                    "type": "LoadBalancer", "clusterIP": "10.96.0.20",
                    "clusterIPs": ["10.96.0.20"], "externalIPs": ["192.0.2.9"],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                    "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}},
                    "internalTrafficPolicy": "Cluster"
                },
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7", "ipMode": "VIP"}]}}
            })
        );
        let slice = serde_json::to_value(full_slice().trimmed()).unwrap();
        assert_eq!(
            slice,
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": "default", "name": "web-abc",
                             "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.1.1"], "conditions": {"ready": true},
                               "nodeName": "node-a",
                               "hints": {"forZones": [{"name": "zone-a"}]}}]
            })
        );
    }
}
