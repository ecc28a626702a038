//! Services, keys and tables, and the validation every table passes
//! whichever form it arrives in.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use serde::{Deserialize, Serialize};
use socklb_common::{MAX_BACKEND_SLOTS, MAX_SERVICES};

use crate::TableError;

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// Kubernetes' upper bound for `timeoutSeconds`.
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;
/// Backends one service may have.
pub const MAX_BACKENDS_PER_SERVICE: usize = 16_384;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => socklb_common::PROTO_TCP,
            Protocol::Udp => socklb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// What identifies a service in the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.vip, self.port),
            self.protocol
        )
    }
}

/// What a service's VIP is, which decides what its other ports get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VipKind {
    /// A clusterIP: a port of it that no service has is refused
    /// (ECONNREFUSED), as kube-proxy rejects it.
    #[default]
    #[serde(rename = "cluster")]
    Cluster,
    /// An externalIP or a LoadBalancer ingress IP, often an address that
    /// serves other things too (a node's SSH, kubelet, NodePorts): a port
    /// of it that no service has passes untouched. A VIP that is a
    /// clusterIP of any service stays a cluster VIP.
    #[serde(rename = "external")]
    External,
}

/// A validated service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: Option<String>,
    pub key: ServiceKey,
    pub vip_kind: VipKind,
    /// ClientIP session affinity timeout; `None` = no affinity.
    pub affinity_timeout_secs: Option<u32>,
    pub backends: Vec<SocketAddr>,
}

/// One line: `VIP:port/proto -> [backend ...]`, ` affinity N` with
/// ClientIP affinity and ` external` on an external VIP.
impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backends: Vec<String> = self.backends.iter().map(|b| b.to_string()).collect();
        write!(f, "{} -> [{}]", self.key, backends.join(" "))?;
        if let Some(timeout) = self.affinity_timeout_secs {
            write!(f, " affinity {timeout}")?;
        }
        if self.vip_kind == VipKind::External {
            f.write_str(" external")?;
        }
        Ok(())
    }
}

/// A validated table: unique keys, families consistent, within capacity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub services: Vec<Service>,
}

impl Table {
    /// Checks what spans services: unique keys and capacity.
    pub fn new(services: Vec<Service>) -> Result<Table, TableError> {
        let mut seen: HashMap<ServiceKey, &Service> = HashMap::with_capacity(services.len());
        for service in &services {
            if let Some(first) = seen.insert(service.key, service) {
                return Err(TableError::Field {
                    service: service.label(),
                    field: "vip/port/protocol".into(),
                    message: format!(
                        "{} is already used by service {}",
                        service.key,
                        first.label()
                    ),
                });
            }
        }
        let backends = services.iter().map(|s| s.backends.len()).sum();
        check_capacity(services.len(), backends)?;
        Ok(Table { services })
    }
}

/// Refuses a table of more services or backends than the datapath's maps
/// hold.
pub fn check_capacity(services: usize, backends: usize) -> Result<(), TableError> {
    if services > MAX_SERVICES as usize {
        return Err(TableError::Capacity {
            what: "services",
            count: services,
            limit: MAX_SERVICES as usize,
        });
    }
    if backends > MAX_BACKEND_SLOTS as usize {
        return Err(TableError::Capacity {
            what: "backends (summed over services)",
            count: backends,
            limit: MAX_BACKEND_SLOTS as usize,
        });
    }
    Ok(())
}

/// What of `services` fits the datapath's capacity, and the keys of the
/// rest. Services are taken in key order (VIP, port, protocol), each one
/// that would pass a limit left out, so the same cluster always gives the
/// same table whatever order its events came in, on every node.
pub fn fit_capacity(mut services: Vec<Service>) -> (Vec<Service>, Vec<ServiceKey>) {
    services.sort_by_key(|s| s.key);
    let (mut kept, mut left_out) = (Vec::new(), Vec::new());
    let mut backends = 0;
    for service in services {
        if kept.len() < MAX_SERVICES as usize
            && backends + service.backends.len() <= MAX_BACKEND_SLOTS as usize
        {
            backends += service.backends.len();
            kept.push(service);
        } else {
            left_out.push(service.key);
        }
    }
    (kept, left_out)
}

impl Service {
    /// How errors and logs name the service: its name, else its key.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("{name:?} ({})", self.key),
            None => self.key.to_string(),
        }
    }

    /// Checks what concerns one service alone.
    pub fn validate(self) -> Result<Service, TableError> {
        let field = |field: &str, message: String| TableError::Field {
            service: self.label(),
            field: field.into(),
            message,
        };
        if self.key.port == 0 {
            return Err(field("port", "0 is not a service port (1..65535)".into()));
        }
        if let Some(class) = guest_own_class(self.key.vip) {
            return Err(field(
                "vip",
                format!(
                    "{} is {class}: a VIP there would take over the guest's own traffic",
                    self.key.vip
                ),
            ));
        }
        if let Some(timeout) = self.affinity_timeout_secs
            && !(1..=MAX_AFFINITY_TIMEOUT_SECS).contains(&timeout)
        {
            return Err(field(
                "affinity.clientIP.timeoutSeconds",
                format!("{timeout} is outside 1..{MAX_AFFINITY_TIMEOUT_SECS}"),
            ));
        }
        if self.backends.len() > MAX_BACKENDS_PER_SERVICE {
            return Err(field(
                "backends",
                format!(
                    "{} backends; a service holds at most {MAX_BACKENDS_PER_SERVICE}",
                    self.backends.len()
                ),
            ));
        }
        let mut seen = HashSet::with_capacity(self.backends.len());
        for (index, backend) in self.backends.iter().enumerate() {
            // Named only when refused: this runs for every backend of every
            // Sync.
            let name = || format!("backends[{index}]");
            if backend.is_ipv4() != self.key.vip.is_ipv4() {
                return Err(field(
                    &format!("{}.ip", name()),
                    format!(
                        "{} is not of the VIP's family ({})",
                        backend.ip(),
                        self.key.vip
                    ),
                ));
            }
            if backend.ip().is_unspecified() {
                return Err(field(
                    &format!("{}.ip", name()),
                    format!("{} is unspecified", backend.ip()),
                ));
            }
            if backend.port() == 0 {
                return Err(field(
                    &format!("{}.port", name()),
                    "0 is not a port (1..65535)".into(),
                ));
            }
            if !seen.insert(*backend) {
                return Err(field(&name(), format!("{backend} is listed twice")));
            }
            if backend.ip().to_canonical() == self.key.vip && backend.port() == self.key.port {
                return Err(field(
                    &name(),
                    format!(
                        "{backend} is the service's own VIP:port: a connect would come back to it"
                    ),
                ));
            }
        }
        Ok(self)
    }
}

/// The class of addresses `ip` (or the IPv4 address it maps) belongs to,
/// when that class is the guest's own: unspecified, loopback, link-local,
/// multicast or broadcast. A VIP there would turn the guest's own traffic
/// to it (local agents, health checks, the metadata address) into
/// translations or ECONNREFUSED.
fn guest_own_class(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("multicast"),
        _ => None,
    }
}

/// A service's fields as a request or a file gives them, not yet checked:
/// the one path from either form to a [`Service`].
pub(crate) struct Fields<'a> {
    pub(crate) name: Option<String>,
    /// Names the service in errors when it has no name: its position.
    pub(crate) index: usize,
    pub(crate) vip: &'a str,
    pub(crate) port: i64,
    /// The protocol's name, or a description of what was given instead.
    pub(crate) protocol: String,
    pub(crate) vip_kind: VipKind,
    /// `None`: no affinity; `Some(None)`: affinity, default timeout.
    pub(crate) affinity_timeout_secs: Option<Option<i64>>,
    pub(crate) backends: Vec<(&'a str, i64)>,
}

impl Fields<'_> {
    pub(crate) fn validate(self) -> Result<Service, TableError> {
        // Made only for an error: every Sync validates 10,000 services.
        let label = || match &self.name {
            Some(name) => format!("{name:?} (services[{}])", self.index),
            None => format!("services[{}] ({}:{})", self.index, self.vip, self.port),
        };
        let field = |field: &str, message: String| TableError::Field {
            service: label(),
            field: field.into(),
            message,
        };
        let vip = parse_ip(self.vip).map_err(|m| field("vip", m))?;
        let port = parse_port(self.port).map_err(|m| field("port", m))?;
        let protocol = match self.protocol.as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                return Err(field(
                    "protocol",
                    format!("{other:?} is not supported (TCP or UDP)"),
                ));
            }
        };
        let affinity_timeout_secs = match self.affinity_timeout_secs {
            None => None,
            Some(timeout) => {
                let timeout = timeout.unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS.into());
                Some(u32::try_from(timeout).map_err(|_| {
                    field(
                        "affinity.clientIP.timeoutSeconds",
                        format!("{timeout} is outside 1..{MAX_AFFINITY_TIMEOUT_SECS}"),
                    )
                })?)
            }
        };
        let backends = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, (ip, port))| {
                let ip = parse_ip(ip).map_err(|m| field(&format!("backends[{i}].ip"), m))?;
                let port =
                    parse_port(*port).map_err(|m| field(&format!("backends[{i}].port"), m))?;
                Ok(SocketAddr::new(ip, port))
            })
            .collect::<Result<Vec<_>, TableError>>()?;
        Service {
            name: self.name,
            key: ServiceKey {
                vip,
                port,
                protocol,
            },
            vip_kind: self.vip_kind,
            affinity_timeout_secs,
            backends,
        }
        .validate()
    }
}

/// Parses an address; a v4-mapped IPv6 address is its IPv4 address.
pub(crate) fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.trim()
        .parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| format!("{text:?} is not an IP address"))
}

pub(crate) fn parse_port(port: i64) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{port} is not a port (1..65535)")),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn service(vip: [u8; 4], backends: usize) -> Service {
        Service {
            name: None,
            key: ServiceKey {
                vip: IpAddr::from(vip),
                port: 80,
                protocol: Protocol::Tcp,
            },
            vip_kind: VipKind::Cluster,
            affinity_timeout_secs: None,
            backends: (0..backends)
                .map(|i| SocketAddr::from(([10, 244, (i / 250) as u8, (i % 250) as u8], 8080)))
                .collect(),
        }
    }

    #[test]
    fn vips_of_the_guests_own_address_classes_are_refused() {
        for (vip, class) in [
            ("127.0.0.1", "loopback"),
            ("127.3.2.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("169.254.1.1", "link-local"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("::ffff:169.254.1.1", "link-local"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            let mut candidate = service([10, 96, 0, 1], 1);
            candidate.key.vip = vip.parse().unwrap();
            let err = candidate.validate().unwrap_err().to_string();
            assert!(
                err.contains("vip") && err.contains(class) && err.contains("guest's own traffic"),
                "{vip}: {err}"
            );
        }
        for vip in ["10.96.0.1", "192.0.2.10", "fd00:96::1", "100.64.0.1"] {
            let mut candidate = service([10, 96, 0, 1], 0);
            candidate.key.vip = vip.parse().unwrap();
            if candidate.key.vip.is_ipv6() {
                candidate.backends = vec!["[fd00:244::1]:8080".parse().unwrap()];
            }
            candidate
                .validate()
                .unwrap_or_else(|err| panic!("{vip}: {err}"));
        }
    }

    #[test]
    fn a_backend_that_is_its_own_vip_port_is_refused() {
        let mut candidate = service([10, 96, 0, 1], 1);
        candidate.backends.push("10.96.0.1:80".parse().unwrap());
        let err = candidate.validate().unwrap_err().to_string();
        assert!(
            err.contains("backends[1]") && err.contains("own VIP:port"),
            "{err}"
        );
        // The same address on another port is an ordinary backend.
        let mut candidate = service([10, 96, 0, 1], 0);
        candidate.backends.push("10.96.0.1:8080".parse().unwrap());
        candidate.validate().unwrap();
    }

    #[test]
    fn what_fits_is_taken_in_key_order_and_the_rest_named() {
        let limit = MAX_BACKEND_SLOTS as usize;
        // In reverse key order: the result must not depend on it.
        let services = vec![
            service([10, 96, 0, 4], 1),
            service([10, 96, 0, 3], limit),
            service([10, 96, 0, 2], limit - 2),
            service([10, 96, 0, 1], 1),
        ];
        let (kept, left_out) = fit_capacity(services);
        let kept: Vec<String> = kept.iter().map(|s| s.key.to_string()).collect();
        assert_eq!(
            kept,
            ["10.96.0.1:80/TCP", "10.96.0.2:80/TCP", "10.96.0.4:80/TCP"]
        );
        assert_eq!(
            left_out.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.96.0.3:80/TCP"]
        );

        let many: Vec<Service> = (0..=MAX_SERVICES)
            .map(|i| service([10, 97 + (i >> 16) as u8, (i >> 8) as u8, i as u8], 0))
            .collect();
        let (kept, left_out) = fit_capacity(many);
        assert_eq!((kept.len(), left_out.len()), (MAX_SERVICES as usize, 1));
        assert!(Table::new(kept).is_ok(), "what is kept is a valid table");
    }
}
