//! One Service to socklb services: its VIPs (clusterIPs, and with
//! `external_vips` externalIPs and LoadBalancer ingress), ports and
//! affinity, with backends from `endpoints`.

use std::net::IpAddr;

use slog::{Logger, warn};
use socklb_table::{DEFAULT_AFFINITY_TIMEOUT_SECS, Protocol, Service, ServiceKey};

use super::{
    Cluster, ObjectKey, Policy, SERVICE_PROXY_NAME_LABEL,
    endpoints::{categorize, endpoints},
};

impl Cluster {
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
