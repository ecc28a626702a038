//! Who may program the agent over vsock.
//!
//! Over vhost-vsock every host process can connect to a guest's CID, and the
//! guest sees each of them as CID 2. What tells a privileged host process
//! from any other is its source port: the host kernel lets only a process
//! with CAP_NET_BIND_SERVICE bind a vsock port below 1024, and vhost-vsock
//! hands the guest the host socket's own port. So by default the agent
//! admits a peer only if its CID is allowed (the host, plus `--allow-cid`)
//! and its source port is below 1024; socklb-shim binds such a port.
//!
//! Hybrid vsock (Firecracker, Cloud Hypervisor, Dragonball, vhost-device-
//! vsock) cannot keep that rule: the host connects to a unix socket and the
//! VMM's muxer picks the source port the guest sees (Firecracker, Cloud
//! Hypervisor and Dragonball from 2^30 up; vhost-device-vsock counting up
//! from 0, so below 1024 only for its first connections). The unix socket's
//! file permissions are the boundary there, and the guest cannot tell the
//! two transports apart: such guests run with `--allow-unprivileged-port`.

use std::io;

use futures::{Stream, StreamExt as _};
use slog::{Logger, warn};

/// vsock ports below this need CAP_NET_BIND_SERVICE to bind (the kernel's
/// LAST_RESERVED_PORT is 1023).
pub const FIRST_UNPRIVILEGED_PORT: u32 = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRule {
    /// CIDs allowed to call; always includes the host's.
    pub allowed_cids: Vec<u32>,
    /// Admit source ports of 1024 and above too (hybrid vsock, tests).
    pub allow_unprivileged_port: bool,
}

impl PeerRule {
    /// `Err` says why a peer is refused.
    pub fn admits(&self, cid: u32, port: u32) -> Result<(), String> {
        if !self.allowed_cids.contains(&cid) {
            return Err(format!(
                "peer CID {cid} is not allowed (allowed: {:?})",
                self.allowed_cids
            ));
        }
        if port >= FIRST_UNPRIVILEGED_PORT && !self.allow_unprivileged_port {
            return Err(format!(
                "source port {port} is unprivileged: over vhost-vsock any host process can \
                 connect from it (socklb-shim binds a port below {FIRST_UNPRIVILEGED_PORT}); \
                 over hybrid vsock, where the VMM picks the port, run the agent with \
                 --allow-unprivileged-port"
            ));
        }
        Ok(())
    }
}

/// Passes accepted connections whose peer (CID, port) the rule admits;
/// logs and drops the others.
pub fn admitted<S: Send + 'static>(
    accepts: impl Stream<Item = io::Result<(S, u32, u32)>> + Send + 'static,
    rule: PeerRule,
    log: Logger,
) -> impl Stream<Item = io::Result<S>> + Send + 'static {
    accepts.filter_map(move |accepted| {
        let passed = match accepted {
            Ok((stream, cid, port)) => match rule.admits(cid, port) {
                Ok(()) => Some(Ok(stream)),
                Err(reason) => {
                    warn!(log, "refused an API connection"; "peer_cid" => cid, "peer_port" => port,
                          "reason" => reason);
                    None
                }
            },
            Err(err) => Some(Err(err)),
        };
        std::future::ready(passed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::HOST_CID;

    fn strict() -> PeerRule {
        PeerRule {
            allowed_cids: vec![HOST_CID, 3],
            allow_unprivileged_port: false,
        }
    }

    #[test]
    fn the_host_from_a_privileged_port_only() {
        let rule = strict();
        assert!(rule.admits(HOST_CID, 1).is_ok());
        assert!(rule.admits(HOST_CID, 1023).is_ok());
        assert!(rule.admits(3, 700).is_ok());
        let unprivileged = rule.admits(HOST_CID, 1024).unwrap_err();
        assert!(
            unprivileged.contains("source port 1024 is unprivileged")
                && unprivileged.contains("--allow-unprivileged-port"),
            "{unprivileged}"
        );
        // Where Firecracker and Cloud Hypervisor start host connections.
        assert!(rule.admits(HOST_CID, 1 << 30).is_err());
        let other_guest = rule.admits(5, 100).unwrap_err();
        assert!(other_guest.contains("peer CID 5"), "{other_guest}");
    }

    #[test]
    fn unprivileged_ports_when_allowed_but_never_other_cids() {
        let rule = PeerRule {
            allow_unprivileged_port: true,
            ..strict()
        };
        assert!(rule.admits(HOST_CID, 1 << 30).is_ok());
        assert!(rule.admits(HOST_CID, 40_000).is_ok());
        assert!(rule.admits(5, 100).is_err());
        assert!(rule.admits(5, 40_000).is_err());
    }

    #[tokio::test]
    async fn only_admitted_peers_pass() {
        let log = Logger::root(slog::Discard, slog::o!());
        let accepts = futures::stream::iter(vec![
            Ok(("host, privileged", HOST_CID, 900)),
            Ok(("host, unprivileged", HOST_CID, 50_000)),
            Ok(("another guest", 5, 900)),
            Err(io::Error::other("accept failed")),
            Ok(("allowed test peer", 3, 1)),
        ]);
        let passed: Vec<_> = admitted(accepts, strict(), log).collect().await;
        let passed: Vec<String> = passed
            .into_iter()
            .map(|r| r.map_or_else(|e| e.to_string(), String::from))
            .collect();
        assert_eq!(
            passed,
            ["host, privileged", "accept failed", "allowed test peer"]
        );
    }
}
