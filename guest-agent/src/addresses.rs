//! The guest's own addresses, which getsockname shows in place of an
//! address only a local backend caused: `--pod-ip` when given, else the
//! first global address of each family on a non-loopback interface, kept
//! current from rtnetlink's address and link notifications (Kata adds the
//! pod's interface and addresses after the guest has booted).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use netlink_sys::{AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket, protocols};
use nix::net::if_::InterfaceFlags;
use slog::{Logger, error, info, warn};

use crate::service_table::ServiceTable;

/// rtnetlink multicast groups (linux/rtnetlink.h): interfaces going up or
/// down, IPv4 and IPv6 addresses added or removed.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
/// Changes come in bursts (an interface up, then its addresses): one
/// re-read after the burst settles.
const SETTLE: Duration = Duration::from_millis(20);

/// The address of each family getsockname shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl GuestAddrs {
    /// The first address of each family in `ips`.
    pub fn first_of_each_family(ips: &[IpAddr]) -> GuestAddrs {
        GuestAddrs {
            v4: ips.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }),
            v6: ips.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            }),
        }
    }

    /// The configured pod IPs, else what the interfaces hold now.
    pub fn current(pod_ips: &[IpAddr]) -> GuestAddrs {
        if pod_ips.is_empty() {
            GuestAddrs::first_of_each_family(&interface_ips())
        } else {
            GuestAddrs::first_of_each_family(pod_ips)
        }
    }
}

/// Writes `addrs` into the datapath and logs them.
pub fn program(service_table: &mut ServiceTable, addrs: GuestAddrs, log: &Logger) -> Result<()> {
    info!(log, "guest addresses for getsockname";
          "v4" => addrs.v4.map(|ip| ip.to_string()), "v6" => addrs.v6.map(|ip| ip.to_string()));
    service_table
        .datapath_mut()
        .context("the table has no kernel datapath to tell its addresses")?
        .set_guest_addrs(addrs.v4, addrs.v6)
}

/// Global addresses of the interfaces that are up, loopback excluded: a
/// pod's address lives on its network interface, and what sits on `lo`
/// (127.0.0.1, ::1, or a test's stand-in backends) is not the pod's.
fn interface_ips() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter(|a| a.flags.contains(InterfaceFlags::IFF_UP))
        .filter(|a| !a.flags.contains(InterfaceFlags::IFF_LOOPBACK))
        .filter_map(|a| {
            let addr = a.address?;
            let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            (!ip.is_loopback() && !link_local).then_some(ip)
        })
        .collect()
}

/// Subscribes to rtnetlink's address and link notifications. Done before
/// the first read of the interfaces, so no change between the two is lost.
pub fn subscribe() -> Result<TokioSocket> {
    let mut socket = TokioSocket::new(protocols::NETLINK_ROUTE)
        .context("opening an rtnetlink socket to follow the guest's addresses")?;
    socket
        .socket_mut()
        .bind(&SocketAddr::new(
            0,
            RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
        ))
        .context("subscribing to rtnetlink address notifications")?;
    Ok(socket)
}

/// Re-reads the interfaces after every burst of notifications and programs
/// them (also when a SIGHUP reload wrote them meanwhile: one small write per
/// burst, and no state to keep in step); runs for as long as the agent does.
pub async fn follow(socket: TokioSocket, service_table: Arc<Mutex<ServiceTable>>, log: Logger) {
    loop {
        match socket.recv_from_full().await {
            Ok(_) => {}
            // Notifications were dropped (the buffer overflowed): a re-read
            // covers them.
            Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => {
                warn!(
                    log,
                    "rtnetlink notifications lost; re-reading the interfaces"
                )
            }
            Err(err) => {
                error!(
                    log,
                    "rtnetlink socket failed: {err}; guest addresses are no longer \
                             followed until the agent restarts"
                );
                return;
            }
        }
        tokio::time::sleep(SETTLE).await;
        // Drain what arrived while settling: one re-read covers all of it.
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::ZERO, socket.recv_from_full()).await {}
        let now = GuestAddrs::first_of_each_family(&interface_ips());
        let mut service_table = service_table.lock().expect("table lock");
        if let Err(err) = program(&mut service_table, now, &log) {
            warn!(log, "guest addresses not programmed: {err:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_address_of_each_family() {
        let ips: Vec<IpAddr> = ["fd00::5", "10.244.0.5", "10.244.0.6", "fd00::6"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        assert_eq!(
            GuestAddrs::first_of_each_family(&ips),
            GuestAddrs {
                v4: Some("10.244.0.5".parse().unwrap()),
                v6: Some("fd00::5".parse().unwrap()),
            }
        );
        assert_eq!(GuestAddrs::first_of_each_family(&[]), GuestAddrs::default());
    }

    #[test]
    fn configured_pod_ips_win() {
        let pod: Vec<IpAddr> = vec!["10.244.9.9".parse().unwrap()];
        assert_eq!(
            GuestAddrs::current(&pod).v4,
            Some("10.244.9.9".parse().unwrap())
        );
    }
}
