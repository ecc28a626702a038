//! The `socklb.v1` message form of services, keys and tables.

use socklb_protocols::socklb as api;

use crate::{
    Protocol, Service, ServiceKey, Table, TableError, VipKind,
    model::{Fields, parse_ip, parse_port},
};

impl Table {
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
}

impl Service {
    /// Reads and validates one service of an API request (`index` names it
    /// in errors).
    pub fn from_api(index: usize, service: &api::Service) -> Result<Service, TableError> {
        let key = service.key.get_or_default();
        Fields {
            name: (!service.name.is_empty()).then(|| service.name.clone()),
            index,
            vip: &key.vip,
            port: key.port.into(),
            protocol: protocol_name(key.protocol),
            vip_kind: match service.vip_kind.enum_value() {
                Ok(api::VipKind::EXTERNAL) => VipKind::External,
                // A kind this agent does not know refuses like a cluster VIP.
                Ok(api::VipKind::CLUSTER) | Err(_) => VipKind::Cluster,
            },
            affinity_timeout_secs: (service.affinity_timeout_seconds != 0)
                .then_some(Some(service.affinity_timeout_seconds.into())),
            backends: service
                .backends
                .iter()
                .map(|b| (b.ip.as_str(), b.port.into()))
                .collect(),
        }
        .validate()
    }

    pub fn to_api(&self) -> api::Service {
        api::Service {
            name: self.name.clone().unwrap_or_default(),
            key: protobuf::MessageField::some(self.key.to_api()),
            affinity_timeout_seconds: self.affinity_timeout_secs.unwrap_or(0),
            vip_kind: protobuf::EnumOrUnknown::new(match self.vip_kind {
                VipKind::Cluster => api::VipKind::CLUSTER,
                VipKind::External => api::VipKind::EXTERNAL,
            }),
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

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "services:
  - {name: default/web, vip: 10.96.0.20, port: 80, affinity: {clientIP: {timeoutSeconds: 30}},
     backends: [{ip: 10.244.1.2, port: 8080}, {ip: 10.244.1.3, port: 8080}]}
  - {vip: 'fd00::10', port: 53, protocol: UDP, backends: [{ip: 'fd00::2', port: 5353}]}
  - {vip: 192.0.2.10, port: 80, vipKind: external}";

    #[test]
    fn the_api_form_round_trips_and_validates_like_the_file() {
        let table = Table::parse(TABLE).unwrap();
        let api = table.to_api();
        assert_eq!(Table::from_api(&api).unwrap(), table);
        assert_eq!(
            api.iter()
                .map(|s| s.vip_kind.enum_value())
                .collect::<Vec<_>>(),
            [
                Ok(api::VipKind::CLUSTER),
                Ok(api::VipKind::CLUSTER),
                Ok(api::VipKind::EXTERNAL)
            ]
        );

        let mut bad = api.clone();
        bad[1].backends[0].ip = "fd00::x".into();
        assert_eq!(
            Table::from_api(&bad).unwrap_err().to_string(),
            "service services[1] (fd00::10:53): backends[0].ip: \"fd00::x\" is not an IP address"
        );
        let mut unknown = api;
        unknown[0].key.mut_or_insert_default().protocol = protobuf::EnumOrUnknown::from_i32(7);
        assert_eq!(
            Table::from_api(&unknown).unwrap_err().to_string(),
            "service \"default/web\" (services[0]): protocol: \"protocol number 7\" is not \
             supported (TCP or UDP)"
        );
    }
}
