//! The digest both ends compare after a Sync.

use std::{borrow::Cow, fmt::Write as _, net::SocketAddr};

use sha2::{Digest as _, Sha256};

use crate::{Service, Table, VipKind};

impl Table {
    /// SHA-256 (hex) of what the datapath holds: every service's key,
    /// affinity and backend set, independent of order and names. Both ends
    /// compute it: the agent from the maps, the host from what it sent.
    pub fn digest(&self) -> String {
        digest(&self.services)
    }
}

/// [`Table::digest`] of any services (a table's, without copying them).
/// What is hashed: one line per service, `KEY AFFINITY BACKEND,BACKEND\n`
/// with the backends sorted (`KEY AFFINITY external BACKEND,...` on an
/// external VIP, so a table without one keeps the digest it had before
/// API 1.4), the lines sorted; one `String` per line, as this runs over
/// 10,000 services on every Sync at both ends.
pub fn digest<'a>(services: impl IntoIterator<Item = &'a Service>) -> String {
    let mut lines: Vec<String> = services.into_iter().map(line).collect();
    lines.sort_unstable();
    let mut hash = Sha256::new();
    for line in &lines {
        hash.update(line.as_bytes());
    }
    let mut hex = String::with_capacity(64);
    for byte in hash.finalize() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

fn line(service: &Service) -> String {
    let mut backends = Cow::Borrowed(service.backends.as_slice());
    if !backends.is_sorted() {
        backends.to_mut().sort_unstable();
    }
    let mut line = String::with_capacity(32 + 24 * backends.len());
    push_socket_addr(
        &mut line,
        &SocketAddr::new(service.key.vip, service.key.port),
    );
    let _ = write!(
        line,
        "/{} {} ",
        service.key.protocol,
        service.affinity_timeout_secs.unwrap_or(0)
    );
    if service.vip_kind == VipKind::External {
        line.push_str("external ");
    }
    for (i, backend) in backends.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        push_socket_addr(&mut line, backend);
    }
    line.push('\n');
    line
}

/// Appends `addr` as `Display` writes it. IPv4 by hand: through the
/// formatting machinery the 80,000 addresses of a 10,000-service table
/// were most of the digest's time.
fn push_socket_addr(line: &mut String, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    line.push('.');
                }
                push_decimal(line, octet.into());
            }
            line.push(':');
            push_decimal(line, v4.port());
        }
        SocketAddr::V6(_) => {
            let _ = write!(line, "{addr}");
        }
    }
}

fn push_decimal(line: &mut String, mut value: u16) {
    let mut digits = [0u8; 5];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    line.extend(digits[start..].iter().map(|&digit| char::from(digit)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Protocol, Service, ServiceKey};

    fn service(vip: &str, port: u16, affinity: Option<u32>, backends: &[&str]) -> Service {
        Service {
            name: Some(format!("default/{vip}")),
            key: ServiceKey {
                vip: vip.parse().unwrap(),
                port,
                protocol: Protocol::Tcp,
            },
            vip_kind: VipKind::Cluster,
            affinity_timeout_secs: affinity,
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
        }
    }

    /// The digest is compared across versions (a node daemon and agents of
    /// another release): its value for a known table never changes.
    #[test]
    fn a_known_table_keeps_its_digest() {
        let table = Table::new(vec![
            service("10.96.0.2", 53, None, &["10.244.0.9:53", "10.244.0.10:53"]),
            service("10.96.0.1", 443, Some(30), &["192.0.2.1:6443"]),
            service("fd00::1", 80, None, &["[fd00::20]:8080", "[fd00::3]:8080"]),
            service("10.96.0.3", 80, None, &[]),
        ])
        .unwrap();
        assert_eq!(
            table.digest(),
            "b1bbd06269bc33644df0254b879e0650bafab9fbee45edb8e44a72f2fbe087e3"
        );
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for addr in [
            "0.0.0.0:1",
            "10.244.0.9:53",
            "192.0.2.100:8080",
            "255.255.255.255:65535",
            "[fd00::3]:80",
            "[::ffff:10.0.0.1]:443",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut line = String::new();
            push_socket_addr(&mut line, &addr);
            assert_eq!(line, addr.to_string());
        }
    }

    #[test]
    fn the_vip_kind_is_part_of_the_digest() {
        let cluster = service("192.0.2.10", 80, None, &["10.244.0.9:80"]);
        let external = Service {
            vip_kind: VipKind::External,
            ..cluster.clone()
        };
        assert_ne!(digest([&cluster]), digest([&external]));
    }
}
