//! One Service to socklb services: its VIPs (clusterIPs, and with
//! `external_vips` externalIPs and LoadBalancer ingress), ports and
//! affinity, with backends from `endpoints`.

use std::net::IpAddr;

use slog::{Logger, warn};
use socklb_table::{Protocol, Service, ServiceKey, VipKind};

use super::{
    Cluster, ObjectKey, Policy,
    endpoints::{categorize, endpoints},
};

/// What one Kubernetes Service translates to.
#[derive(Debug, Default)]
pub struct Translated {
    pub services: Vec<Service>,
    /// Its socklb services that no table may hold (a VIP of the guest's
    /// own address classes, a backend that is its own VIP:port): left out
    /// and logged, so the rest of the cluster is still programmed.
    pub refused: usize,
}

impl Cluster {
    /// The socklb services one Kubernetes Service stands for (none when it
    /// is absent, headless, ExternalName or another proxy's).
    pub fn translate(&self, key: &ObjectKey, policy: &Policy, log: &Logger) -> Translated {
        let mut translated = Translated::default();
        let Some(service) = self.services.get(key).filter(|s| !s.ignored) else {
            return translated;
        };
        let mut vips: Vec<(IpAddr, VipKind)> = service
            .cluster_ips
            .iter()
            .map(|ip| (*ip, VipKind::Cluster))
            .collect();
        if policy.external_vips {
            vips.extend(
                service
                    .external_ips
                    .iter()
                    .chain(&service.ingress_ips)
                    .map(|ip| (*ip, VipKind::External)),
            );
        }
        let affinity = service.affinity_timeout_secs;
        let local_only = service.local_only;
        if local_only && policy.node.is_none() {
            warn!(log, "internalTrafficPolicy Local without --node: no endpoint counts as local";
                  "service" => key.to_string());
        }
        let slices = self.slices.get(key);
        for port in &service.ports {
            let protocol = match port.protocol.as_str() {
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
            let port_name = port.name.as_str();
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
                    // Other ports of an externalIP or LoadBalancer IP pass.
                    vip_kind: *kind,
                    affinity_timeout_secs: affinity,
                    backends,
                };
                match candidate.validate() {
                    Ok(service) => translated.services.push(service),
                    Err(err) => {
                        translated.refused += 1;
                        warn!(log, "skipping a service socklb cannot program";
                              "service" => key.to_string(), "error" => err.to_string());
                    }
                }
            }
        }
        translated
    }
}
