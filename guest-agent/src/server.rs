//! Where the agent serves its API: `vsock://-1:PORT` in a guest (only the
//! peers `peers::PeerRule` admits) or `unix:///path` for tests and local
//! use, read by the one grammar of [`socklb_protocols::address`].

use std::{os::fd::AsRawFd as _, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use slog::Logger;
use socklb_protocols::{
    DEFAULT_AGENT_PORT,
    address::{Address, AddressError, Fault},
};
use ttrpc::r#async::{Server, transport::Listener};

use crate::{
    peers::{self, PeerRule},
    rpc::Rpc,
};

/// The host's CID, the only vsock peer allowed by default.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock { port: u32 },
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
#[error(
    "listen address {0} (vsock://-1[:PORT] or unix:///path; PORT defaults to {DEFAULT_AGENT_PORT})"
)]
pub struct ListenAddrError(#[from] AddressError);

impl std::str::FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(text: &str) -> Result<ListenAddr, ListenAddrError> {
        let error = |fault| AddressError::new(text, fault);
        Ok(match text.parse()? {
            Address::Vsock { cid: None, port } => ListenAddr::Vsock {
                port: port.unwrap_or(DEFAULT_AGENT_PORT),
            },
            Address::Vsock { cid: Some(_), .. } => Err(error(Fault::NotAnyCid))?,
            // The guest's end of hybrid vsock is plain vsock.
            Address::HybridVsock { .. } => Err(error(Fault::SchemeNotTaken))?,
            Address::Unix(path) => ListenAddr::Unix(path),
        })
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let written = match self {
            ListenAddr::Vsock { port } => Address::Vsock {
                cid: None,
                port: Some(*port),
            },
            ListenAddr::Unix(path) => Address::Unix(path.clone()),
        };
        written.fmt(f)
    }
}

/// This guest's own vsock CID, as the kernel tells it on /dev/vsock (no
/// socket is opened); VMADDR_CID_ANY when no guest-to-host transport is
/// loaded.
pub fn local_vsock_cid() -> Result<u32> {
    let device = std::fs::File::open("/dev/vsock")
        .context("cannot open /dev/vsock to read this guest's own CID")?;
    let mut cid: u32 = libc::VMADDR_CID_ANY;
    // SAFETY: this ioctl writes one u32 through the pointer, to `cid`,
    // which outlives the call; the descriptor is open.
    let result = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID,
            &raw mut cid,
        )
    };
    if result < 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading this guest's own CID from /dev/vsock");
    }
    Ok(cid)
}

/// linux/vm_sockets.h: `_IO(7, 0xb9)`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::Ioctl = 0x7b9;

/// Starts serving `rpc` on `addr`.
pub async fn start(
    addr: &ListenAddr,
    peer_rule: &PeerRule,
    rpc: Arc<Rpc>,
    log: &Logger,
) -> Result<Server> {
    let listener = match addr {
        ListenAddr::Unix(path) => {
            // A socket file left by an earlier agent would make bind fail.
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            Listener::from(listener)
        }
        ListenAddr::Vsock { port } => {
            let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                tokio_vsock::VMADDR_CID_ANY,
                *port,
            ))
            .with_context(|| format!("cannot listen on vsock port {port}"))?;
            let accepts = futures::stream::unfold(listener, |listener| async move {
                let accepted = listener
                    .accept()
                    .await
                    .map(|(stream, peer)| (stream, peer.cid(), peer.port()));
                Some((accepted, listener))
            });
            Listener::new(peers::admitted(accepts, peer_rule.clone(), log.clone()))
        }
    };
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(rpc.services());
    server.start().await.context("starting the ttrpc server")?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "vsock://-1:1100".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock { port: 1100 }
        );
        assert_eq!(
            "vsock://-1".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock { port: 1100 }
        );
        assert_eq!(
            "vsock://:7".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock { port: 7 }
        );
        assert_eq!(
            "unix:///run/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        for bad in [
            "vsock://3:1025",
            "vsock://-1:x",
            "unix://rel.sock",
            "tcp://1.2.3.4:5",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_agent_listens_on_any_cid_and_never_on_hybrid_vsock() {
        for (text, fault) in [
            ("vsock://3:1100", Fault::NotAnyCid),
            ("hvsock:///run/vm.sock:1100", Fault::SchemeNotTaken),
        ] {
            let ListenAddrError(err) = text.parse::<ListenAddr>().unwrap_err();
            assert_eq!(err.fault, fault, "{text}");
        }
        assert_eq!(
            ListenAddr::Vsock { port: 1100 }.to_string(),
            "vsock://-1:1100"
        );
    }
}
