//! The file format, as people write it (YAML; JSON is YAML too) and as
//! `list -o json` prints it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Service, Table, TableError, VipKind, model::Fields};

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
    /// `cluster` (the default) or `external`.
    #[serde(rename = "vipKind", default, skip_serializing_if = "is_cluster")]
    vip_kind: VipKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    affinity: Option<AffinityEntry>,
    #[serde(default)]
    backends: Vec<BackendEntry>,
}

fn default_protocol() -> String {
    "TCP".into()
}

fn is_cluster(kind: &VipKind) -> bool {
    *kind == VipKind::Cluster
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

    /// The table in its file format, for printing.
    pub fn to_file(&self) -> TableFile {
        TableFile {
            services: self.services.iter().map(Service::to_entry).collect(),
        }
    }
}

impl Service {
    fn to_entry(&self) -> ServiceEntry {
        ServiceEntry {
            name: self.name.clone(),
            vip: self.key.vip.to_string(),
            port: self.key.port.into(),
            protocol: self.key.protocol.to_string(),
            vip_kind: self.vip_kind,
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

impl ServiceEntry {
    fn validate(self, index: usize) -> Result<Service, TableError> {
        Fields {
            name: self.name,
            index,
            vip: &self.vip,
            port: self.port,
            protocol: self.protocol,
            vip_kind: self.vip_kind,
            affinity_timeout_secs: self.affinity.map(|a| a.client_ip.timeout_seconds),
            backends: self
                .backends
                .iter()
                .map(|b| (b.ip.as_str(), b.port))
                .collect(),
        }
        .validate()
    }
}

#[cfg(test)]
mod tests {
    use socklb_common::MAX_SERVICES;

    use super::*;
    use std::net::IpAddr;

    use crate::{DEFAULT_AFFINITY_TIMEOUT_SECS, Protocol, ServiceKey};

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
  - vip: 192.0.2.30
    port: 443
    vipKind: external
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
        assert_eq!(web.vip_kind, VipKind::Cluster, "cluster unless said");
        assert_eq!(table.services[2].vip_kind, VipKind::External);
        // Written back, only the external one names its kind.
        let written = serde_yaml::to_string(&table.to_file()).unwrap();
        assert_eq!(written.matches("vipKind: external").count(), 1, "{written}");
        assert!(!written.contains("cluster"), "{written}");
        assert_eq!(Table::parse(&written).unwrap(), table);
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
            (
                "services: [{name: a, vip: 10.96.0.1, port: 80, vipKind: nodePort}]",
                "unknown variant `nodePort`, expected `cluster` or `external`",
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
                vip_kind: VipKind::Cluster,
                affinity_timeout_secs: None,
                backends: vec![],
            })
            .collect();
        let message = Table::new(services).unwrap_err().to_string();
        assert!(message.contains("at most 65536"), "{message}");
    }
}
