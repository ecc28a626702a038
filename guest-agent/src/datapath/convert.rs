//! Conversions between the table's types (`socklb_table`) and the maps'
//! (`socklb_common`): addresses as four network-order words, v4 stored
//! v4-mapped; ports in network byte order. And a service as the maps hold
//! it (`Programmed`), what table programming reads and writes.

use std::{
    collections::BTreeMap,
    mem::{offset_of, size_of},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socklb_common::{
    Addr, Endpoint, SERVICE_EXTERNAL_VIP, ServiceEntry, ServiceEntryKey, Translation, is_v4_mapped,
    v4_mapped,
};
use socklb_table::{Protocol, Service, ServiceKey, Table, VipKind};

/// An address as the programs see it (v4 as v4-mapped).
pub fn addr_words(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

fn ip_of(addr: &Addr) -> IpAddr {
    if is_v4_mapped(addr) {
        IpAddr::V4(Ipv4Addr::from(addr[3].to_ne_bytes()))
    } else {
        let mut octets = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    }
}

pub(super) fn endpoint(addr: &SocketAddr) -> Endpoint {
    Endpoint {
        addr: addr_words(addr.ip()),
        port: addr.port().to_be(),
        _pad: 0,
    }
}

pub(super) fn socket_addr(endpoint: &Endpoint) -> SocketAddr {
    SocketAddr::new(ip_of(&endpoint.addr), u16::from_be(endpoint.port))
}

/// A socket's `CONNECTED_VIP` value as the kernel hands it out (sock_diag):
/// the VIP endpoint the socket asked for and the backend it was sent to.
/// None if the value is not a `Translation`.
pub fn translation_from_bytes(value: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    if value.len() != size_of::<Translation>() {
        return None;
    }
    let endpoint_at = |offset: usize| {
        let bytes = &value[offset..offset + size_of::<Endpoint>()];
        let word = |at: usize| u32::from_ne_bytes(std::array::from_fn(|i| bytes[at + i]));
        let port = offset_of!(Endpoint, port);
        socket_addr(&Endpoint {
            addr: std::array::from_fn(|i| word(4 * i)),
            port: u16::from_ne_bytes([bytes[port], bytes[port + 1]]),
            _pad: 0,
        })
    };
    Some((
        endpoint_at(offset_of!(Translation, vip)),
        endpoint_at(offset_of!(Translation, backend)),
    ))
}

/// The bytes of the `CONNECTED_VIP` value of a socket translated from
/// `vip` to `backend`, as the kernel hands them out.
#[cfg(test)]
pub(crate) fn translation_bytes(vip: &SocketAddr, backend: &SocketAddr) -> Vec<u8> {
    let translation = Translation {
        vip: endpoint(vip),
        backend: endpoint(backend),
    };
    // SAFETY: `Translation` is `#[repr(C)]` integers without padding
    // (socklb_common's layout tests), so all its bytes are initialized.
    unsafe {
        std::slice::from_raw_parts(
            std::ptr::from_ref(&translation).cast::<u8>(),
            size_of::<Translation>(),
        )
    }
    .to_vec()
}

/// A service as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Programmed {
    pub(super) entry: ServiceEntry,
    pub(super) backends: Vec<Endpoint>,
}

/// Programmed services as a table (without names: the maps keep none).
pub(super) fn table_of(programmed: BTreeMap<ServiceEntryKey, Programmed>) -> Table {
    let services = programmed
        .into_iter()
        .map(|(key, programmed)| Service {
            name: None,
            key: table_key(&key),
            vip_kind: vip_kind_of(programmed.entry.flags),
            affinity_timeout_secs: match programmed.entry.affinity_timeout_secs {
                0 => None,
                secs => Some(secs),
            },
            backends: programmed.backends.iter().map(socket_addr).collect(),
        })
        .collect();
    Table { services }
}

/// `ServiceEntry::flags` of a service on a VIP of `kind`.
pub(super) fn entry_flags(kind: VipKind) -> u32 {
    match kind {
        VipKind::Cluster => 0,
        VipKind::External => SERVICE_EXTERNAL_VIP,
    }
}

/// The kind of VIP `ServiceEntry::flags` say the service has.
pub(super) fn vip_kind_of(flags: u32) -> VipKind {
    if flags & SERVICE_EXTERNAL_VIP != 0 {
        VipKind::External
    } else {
        VipKind::Cluster
    }
}

pub(super) fn map_key(key: &ServiceKey) -> ServiceEntryKey {
    ServiceEntryKey {
        vip: addr_words(key.vip),
        port: key.port.to_be(),
        proto: key.protocol.number(),
        _pad: 0,
    }
}

pub(super) fn table_key(key: &ServiceEntryKey) -> ServiceKey {
    ServiceKey {
        vip: ip_of(&key.vip),
        port: u16::from_be(key.port),
        protocol: if key.proto == socklb_common::PROTO_UDP {
            Protocol::Udp
        } else {
            Protocol::Tcp
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for text in [
            "10.96.0.20:80",
            "[fd00::a]:53",
            "[::1]:1",
            "127.0.0.1:65535",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(socket_addr(&endpoint(&addr)), addr);
            let key = ServiceKey {
                vip: addr.ip(),
                port: addr.port(),
                protocol: Protocol::Udp,
            };
            assert_eq!(table_key(&map_key(&key)), key);
        }
    }

    #[test]
    fn a_translation_reads_back_from_the_kernels_bytes() {
        for (vip, backend) in [
            ("10.96.0.10:53", "10.244.1.1:5353"),
            ("[fd00::a]:80", "[fd00:244::1]:8080"),
        ] {
            let (vip, backend): (SocketAddr, SocketAddr) =
                (vip.parse().unwrap(), backend.parse().unwrap());
            let bytes = translation_bytes(&vip, &backend);
            assert_eq!(translation_from_bytes(&bytes), Some((vip, backend)));
            // Another map's value, of another size, is no translation.
            assert_eq!(translation_from_bytes(&bytes[..20]), None);
        }
    }

    #[test]
    fn v4_is_stored_v4_mapped_in_network_order() {
        let words = addr_words("10.96.0.20".parse().unwrap());
        let v6: Ipv6Addr = "::ffff:10.96.0.20".parse().unwrap();
        assert_eq!(words, addr_words(IpAddr::V6(v6)));
        assert_eq!(words[3].to_ne_bytes(), [10, 96, 0, 20]);
    }
}
