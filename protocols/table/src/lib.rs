//! The service table both ends of socklb share: its file format (YAML or
//! JSON), its API form (the `socklb.v1` messages), validation and digest.
//!
//! A table is validated whole before anything touches the kernel; every
//! error names the service and the field.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use socklb_common::{MAX_BACKEND_SLOTS, MAX_SERVICES};
use socklb_protocols::socklb as api;

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

/// A validated service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: Option<String>,
    pub key: ServiceKey,
    /// ClientIP session affinity timeout; `None` = no affinity.
    pub affinity_timeout_secs: Option<u32>,
    pub backends: Vec<SocketAddr>,
}

/// One line: `VIP:port/proto -> [backend ...]`, and ` affinity N` with
/// ClientIP affinity.
impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backends: Vec<String> = self.backends.iter().map(|b| b.to_string()).collect();
        write!(f, "{} -> [{}]", self.key, backends.join(" "))?;
        if let Some(timeout) = self.affinity_timeout_secs {
            write!(f, " affinity {timeout}")?;
        }
        Ok(())
    }
}

/// A validated table: unique keys, families consistent, within capacity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub services: Vec<Service>,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot read table file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("table file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("service {service}: {field}: {message}")]
    Field {
        service: String,
        field: String,
        message: String,
    },
    #[error("service {key} is not programmed")]
    UnknownService { key: String },
    #[error("table has {count} {what}; the datapath holds at most {limit}")]
    Capacity {
        what: &'static str,
        count: usize,
        limit: usize,
    },
}

/// The file format, as people write it (and as `list -o json` prints it).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableFile {
    #[serde(default)]
    services: Vec<ServiceEntry>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    vip: String,
    port: i64,
    #[serde(default = "default_protocol")]
    protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    affinity: Option<AffinityEntry>,
    #[serde(default)]
    backends: Vec<BackendEntry>,
}

fn default_protocol() -> String {
    "TCP".into()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AffinityEntry {
    #[serde(rename = "clientIP")]
    client_ip: ClientIpEntry,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ClientIpEntry {
    #[serde(rename = "timeoutSeconds")]
    timeout_seconds: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BackendEntry {
    ip: String,
    port: i64,
}

impl Table {
    /// Reads and validates a table file (YAML; JSON is YAML too).
    pub fn from_file(path: &Path) -> Result<Table, TableError> {
        let text = std::fs::read_to_string(path).map_err(|source| TableError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Table::parse(&text).map_err(|err| match err {
            TableError::Syntax { message, .. } => TableError::Syntax {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates table text (YAML or JSON).
    pub fn parse(text: &str) -> Result<Table, TableError> {
        let file: TableFile = serde_yaml::from_str(text).map_err(|err| TableError::Syntax {
            path: "<text>".into(),
            message: err.to_string(),
        })?;
        let services = file
            .services
            .into_iter()
            .enumerate()
            .map(|(index, entry)| entry.validate(index))
            .collect::<Result<Vec<_>, _>>()?;
        Table::new(services)
    }

    /// Reads and validates the services of an API request.
    pub fn from_api(services: &[api::Service]) -> Result<Table, TableError> {
        Table::new(
            services
                .iter()
                .enumerate()
                .map(|(index, service)| Service::from_api(index, service))
                .collect::<Result<_, _>>()?,
        )
    }

    pub fn to_api(&self) -> Vec<api::Service> {
        self.services.iter().map(Service::to_api).collect()
    }

    /// The table in its file format, for printing.
    pub fn to_file(&self) -> TableFile {
        TableFile {
            services: self.services.iter().map(Service::to_entry).collect(),
        }
    }

    /// SHA-256 (hex) of what the datapath holds: every service's key,
    /// affinity and backend set, independent of order and names. Both ends
    /// compute it: the agent from the maps, the host from what it sent.
    pub fn digest(&self) -> String {
        let mut lines: Vec<String> = self
            .services
            .iter()
            .map(|service| {
                let mut backends: Vec<SocketAddr> = service.backends.clone();
                backends.sort();
                let backends: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
                format!(
                    "{} {} {}\n",
                    service.key,
                    service.affinity_timeout_secs.unwrap_or(0),
                    backends.join(",")
                )
            })
            .collect();
        lines.sort();
        let hash = Sha256::digest(lines.concat().as_bytes());
        hash.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Checks what spans services: unique keys and capacity.
    pub fn new(services: Vec<Service>) -> Result<Table, TableError> {
        let mut seen: HashMap<ServiceKey, String> = HashMap::new();
        for service in &services {
            if let Some(first) = seen.insert(service.key, service.label()) {
                return Err(TableError::Field {
                    service: service.label(),
                    field: "vip/port/protocol".into(),
                    message: format!("{} is already used by service {first}", service.key),
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
        if self.key.vip.is_unspecified() {
            return Err(field("vip", format!("{} is unspecified", self.key.vip)));
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
        let mut seen = HashSet::new();
        for (index, backend) in self.backends.iter().enumerate() {
            let name = format!("backends[{index}]");
            if backend.is_ipv4() != self.key.vip.is_ipv4() {
                return Err(field(
                    &format!("{name}.ip"),
                    format!(
                        "{} is not of the VIP's family ({})",
                        backend.ip(),
                        self.key.vip
                    ),
                ));
            }
            if backend.ip().is_unspecified() {
                return Err(field(
                    &format!("{name}.ip"),
                    format!("{} is unspecified", backend.ip()),
                ));
            }
            if backend.port() == 0 {
                return Err(field(
                    &format!("{name}.port"),
                    "0 is not a port (1..65535)".into(),
                ));
            }
            if !seen.insert(*backend) {
                return Err(field(&name, format!("{backend} is listed twice")));
            }
        }
        Ok(self)
    }
}

impl Service {
    /// Reads and validates one service of an API request (`index` names it
    /// in errors).
    pub fn from_api(index: usize, service: &api::Service) -> Result<Service, TableError> {
        let key = service.key.get_or_default();
        let entry = ServiceEntry {
            name: (!service.name.is_empty()).then(|| service.name.clone()),
            vip: key.vip.clone(),
            port: key.port.into(),
            protocol: protocol_name(key.protocol),
            affinity: (service.affinity_timeout_seconds != 0).then(|| AffinityEntry {
                client_ip: ClientIpEntry {
                    timeout_seconds: Some(service.affinity_timeout_seconds.into()),
                },
            }),
            backends: service
                .backends
                .iter()
                .map(|b| BackendEntry {
                    ip: b.ip.clone(),
                    port: b.port.into(),
                })
                .collect(),
        };
        entry.validate(index)
    }

    pub fn to_api(&self) -> api::Service {
        api::Service {
            name: self.name.clone().unwrap_or_default(),
            key: protobuf::MessageField::some(self.key.to_api()),
            affinity_timeout_seconds: self.affinity_timeout_secs.unwrap_or(0),
            backends: self
                .backends
                .iter()
                .map(|b| api::Backend {
                    ip: b.ip().to_string(),
                    port: b.port().into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn to_entry(&self) -> ServiceEntry {
        ServiceEntry {
            name: self.name.clone(),
            vip: self.key.vip.to_string(),
            port: self.key.port.into(),
            protocol: self.key.protocol.to_string(),
            affinity: self.affinity_timeout_secs.map(|secs| AffinityEntry {
                client_ip: ClientIpEntry {
                    timeout_seconds: Some(secs.into()),
                },
            }),
            backends: self
                .backends
                .iter()
                .map(|b| BackendEntry {
                    ip: b.ip().to_string(),
                    port: b.port().into(),
                })
                .collect(),
        }
    }
}

impl ServiceKey {
    /// Reads a key of an API request (`what` names it in errors).
    pub fn from_api(what: &str, key: &api::ServiceKey) -> Result<ServiceKey, TableError> {
        let field = |field: &str, message: String| TableError::Field {
            service: what.to_string(),
            field: field.into(),
            message,
        };
        let protocol = match protocol_name(key.protocol).as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => return Err(field("protocol", format!("{other} is not supported"))),
        };
        Ok(ServiceKey {
            vip: parse_ip(&key.vip).map_err(|m| field("vip", m))?,
            port: parse_port(key.port.into()).map_err(|m| field("port", m))?,
            protocol,
        })
    }

    pub fn to_api(&self) -> api::ServiceKey {
        api::ServiceKey {
            vip: self.vip.to_string(),
            port: self.port.into(),
            protocol: protobuf::EnumOrUnknown::new(match self.protocol {
                Protocol::Tcp => api::Protocol::TCP,
                Protocol::Udp => api::Protocol::UDP,
            }),
            ..Default::default()
        }
    }
}

fn protocol_name(protocol: protobuf::EnumOrUnknown<api::Protocol>) -> String {
    match protocol.enum_value() {
        Ok(api::Protocol::TCP) => "TCP".into(),
        Ok(api::Protocol::UDP) => "UDP".into(),
        Err(number) => format!("protocol number {number}"),
    }
}

impl ServiceEntry {
    fn validate(self, index: usize) -> Result<Service, TableError> {
        let label = match &self.name {
            Some(name) => format!("{name:?} (services[{index}])"),
            None => format!("services[{index}] ({}:{})", self.vip, self.port),
        };
        let field = |field: &str, message: String| TableError::Field {
            service: label.clone(),
            field: field.into(),
            message,
        };
        let vip = parse_ip(&self.vip).map_err(|m| field("vip", m))?;
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
        let affinity_timeout_secs = match self.affinity {
            None => None,
            Some(AffinityEntry { client_ip }) => {
                let timeout = client_ip
                    .timeout_seconds
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS.into());
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
            .map(|(i, b)| {
                let ip = parse_ip(&b.ip).map_err(|m| field(&format!("backends[{i}].ip"), m))?;
                let port =
                    parse_port(b.port).map_err(|m| field(&format!("backends[{i}].port"), m))?;
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
            affinity_timeout_secs,
            backends,
        }
        .validate()
    }
}

/// Parses an address; a v4-mapped IPv6 address is its IPv4 address.
fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.trim()
        .parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| format!("{text:?} is not an IP address"))
}

fn parse_port(port: i64) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{port} is not a port (1..65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: default/web
    vip: 10.96.0.20
    port: 80
    protocol: TCP
    affinity: {clientIP: {timeoutSeconds: 30}}
    backends:
      - {ip: 10.244.1.2, port: 8080}
      - {ip: 10.244.1.3, port: 8080}
  - vip: fd00:96::a
    port: 53
    protocol: UDP
    backends: [{ip: "fd00:244::2", port: 5353}]
  - vip: 10.96.0.30
    port: 443
"#;

    fn error(text: &str) -> String {
        Table::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_good_table() {
        let table = Table::parse(GOOD).unwrap();
        assert_eq!(table.services.len(), 3);
        let web = &table.services[0];
        assert_eq!(web.key.to_string(), "10.96.0.20:80/TCP");
        assert_eq!(web.affinity_timeout_secs, Some(30));
        assert_eq!(web.backends[1], "10.244.1.3:8080".parse().unwrap());
        assert_eq!(table.services[1].key.protocol, Protocol::Udp);
        assert_eq!(table.services[2].key.protocol, Protocol::Tcp);
        assert!(table.services[2].backends.is_empty());
    }

    #[test]
    fn json_is_accepted() {
        let table = Table::parse(
            r#"{"services":[{"vip":"10.96.0.1","port":443,"protocol":"TCP",
                "affinity":{"clientIP":{}},
                "backends":[{"ip":"10.0.0.1","port":6443}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            table.services[0].affinity_timeout_secs,
            Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
        );
    }

    #[test]
    fn v4_mapped_vip_is_ipv4() {
        let table = Table::parse(
            "services: [{vip: '::ffff:10.96.0.9', port: 80, backends: [{ip: 10.1.1.1, port: 80}]}]",
        )
        .unwrap();
        assert!(table.services[0].key.vip.is_ipv4());
    }

    #[test]
    fn errors_name_service_and_field() {
        let cases = [
            (
                "services: [{name: a, vip: 10.96.0.1, port: 80, protocol: SCTP}]",
                r#"service "a" (services[0]): protocol: "SCTP" is not supported"#,
            ),
            (
                "services: [{name: a, vip: 10.96.0.1, port: 0}]",
                "port: 0 is not a port",
            ),
            (
                "services: [{name: a, vip: 10.96.0.1, port: 65536}]",
                "port: 65536 is not a port",
            ),
            (
                "services: [{name: a, vip: 10.96.0.999, port: 80}]",
                r#"vip: "10.96.0.999" is not an IP address"#,
            ),
            (
                "services: [{name: a, vip: 10.96.0.1, port: 80, backends: [{ip: x, port: 1}]}]",
                r#"backends[0].ip: "x" is not an IP address"#,
            ),
            (
                "services: [{name: a, vip: 10.96.0.1, port: 80, backends: [{ip: 10.0.0.1, port: 70000}]}]",
                "backends[0].port: 70000 is not a port",
            ),
            (
                "services: [{name: a, vip: 10.96.0.1, port: 80, backends: [{ip: 'fd00::1', port: 80}]}]",
                "backends[0].ip: fd00::1 is not of the VIP's family (10.96.0.1)",
            ),
            (
                "services: [{name: a, vip: 10.96.0.1, port: 80, backends: [{ip: 10.0.0.1, port: 80}, {ip: 10.0.0.1, port: 80}]}]",
                "backends[1]: 10.0.0.1:80 is listed twice",
            ),
            (
                "services: [{name: a, vip: 10.96.0.1, port: 80}, {name: b, vip: 10.96.0.1, port: 80}]",
                r#"service "b" (10.96.0.1:80/TCP): vip/port/protocol: 10.96.0.1:80/TCP is already used by service "a""#,
            ),
            (
                "services: [{name: a, vip: 10.96.0.1, port: 80, affinity: {clientIP: {timeoutSeconds: 0}}}]",
                "affinity.clientIP.timeoutSeconds: 0 is outside 1..86400",
            ),
            (
                "services: [{name: a, vip: 10.96.0.1, port: 80, weight: 3}]",
                "unknown field `weight`",
            ),
        ];
        for (text, expected) in cases {
            let message = error(text);
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn udp_and_tcp_on_one_vip_port_are_distinct() {
        Table::parse(
            "services: [{vip: 10.96.0.10, port: 53, protocol: UDP}, {vip: 10.96.0.10, port: 53, protocol: TCP}]",
        )
        .unwrap();
    }

    #[test]
    fn too_many_services_is_refused() {
        let services = (0..=MAX_SERVICES)
            .map(|i| Service {
                name: None,
                key: ServiceKey {
                    vip: IpAddr::from([10, 96, (i >> 8) as u8, i as u8]),
                    port: 1 + (i >> 16) as u16,
                    protocol: Protocol::Tcp,
                },
                affinity_timeout_secs: None,
                backends: vec![],
            })
            .collect();
        let message = Table::new(services).unwrap_err().to_string();
        assert!(message.contains("at most 65536"), "{message}");
    }
}
