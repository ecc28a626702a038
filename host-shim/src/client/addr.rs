//! Agent addresses: `vsock://CID[:PORT]`, `hvsock:///path/to/uds[:PORT]`
//! (hybrid vsock, as Firecracker, Cloud Hypervisor and vhost-device-vsock
//! offer it) and `unix:///path`.

use std::{fmt, path::PathBuf, str::FromStr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddr {
    Vsock { cid: u32, port: u32 },
    HybridVsock { uds: PathBuf, port: u32 },
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
#[error(
    "agent address {text:?}: {reason} (vsock://CID[:PORT], hvsock:///path/to/uds[:PORT] or unix:///path; PORT defaults to 1100)"
)]
pub struct AddrError {
    text: String,
    reason: &'static str,
}

impl FromStr for AgentAddr {
    type Err = AddrError;

    fn from_str(text: &str) -> Result<AgentAddr, AddrError> {
        let error = |reason| AddrError {
            text: text.into(),
            reason,
        };
        // Without a port: the agent's default (DEFAULT_AGENT_PORT).
        if let Some(rest) = text.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').unwrap_or((rest, ""));
            return Ok(AgentAddr::Vsock {
                cid: cid.parse().map_err(|_| error("bad CID"))?,
                port: parse_port(port).ok_or_else(|| error("bad port"))?,
            });
        }
        if let Some(rest) = text.strip_prefix("hvsock://") {
            // A socket path may hold ':' itself: only digits after the last
            // one make a port.
            let (uds, port) = match rest.rsplit_once(':') {
                Some((uds, port)) if port.bytes().all(|b| b.is_ascii_digit()) => (uds, port),
                _ => (rest, ""),
            };
            if !uds.starts_with('/') {
                return Err(error("the socket path must be absolute"));
            }
            return Ok(AgentAddr::HybridVsock {
                uds: uds.into(),
                port: parse_port(port).ok_or_else(|| error("bad port"))?,
            });
        }
        if let Some(path) = text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(error("the socket path must be absolute"));
            }
            return Ok(AgentAddr::Unix(path.into()));
        }
        Err(error("unknown scheme"))
    }
}

fn parse_port(text: &str) -> Option<u32> {
    if text.is_empty() {
        Some(socklb_protocols::DEFAULT_AGENT_PORT)
    } else {
        text.parse().ok()
    }
}

impl fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            AgentAddr::HybridVsock { uds, port } => write!(f, "hvsock://{}:{port}", uds.display()),
            AgentAddr::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for text in [
            "vsock://4:1025",
            "hvsock:///run/vm/vsock.sock:1025",
            "unix:///run/agent.sock",
        ] {
            assert_eq!(text.parse::<AgentAddr>().unwrap().to_string(), text);
        }
        assert_eq!(
            "hvsock:///a:b/c.sock:99".parse::<AgentAddr>().unwrap(),
            AgentAddr::HybridVsock {
                uds: "/a:b/c.sock".into(),
                port: 99
            }
        );
        assert_eq!(
            "vsock://3".parse::<AgentAddr>().unwrap(),
            AgentAddr::Vsock { cid: 3, port: 1100 }
        );
        assert_eq!(
            "hvsock:///run/vm/vsock.sock".parse::<AgentAddr>().unwrap(),
            AgentAddr::HybridVsock {
                uds: "/run/vm/vsock.sock".into(),
                port: 1100
            }
        );
        for bad in [
            "vsock://x:1",
            "vsock://3:x",
            "vsock://3:99999999999",
            "hvsock://rel:1",
            "unix://rel",
            "tcp://a:1",
        ] {
            let err = bad.parse::<AgentAddr>().unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
