//! Where a client finds the agent: `vsock://CID[:PORT]`,
//! `hvsock:///path/to/uds[:PORT]` or `unix:///path`, read by the one
//! grammar of [`socklb_protocols::address`]; a client needs the CID (not
//! any) and takes the agent's port when none is given.

use std::{fmt, path::PathBuf, str::FromStr};

use socklb_protocols::{
    DEFAULT_AGENT_PORT,
    address::{Address, AddressError, Fault},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddr {
    Vsock { cid: u32, port: u32 },
    HybridVsock { uds: PathBuf, port: u32 },
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
#[error(
    "agent address {0} (vsock://CID[:PORT], hvsock:///path/to/uds[:PORT] or unix:///path; PORT defaults to {DEFAULT_AGENT_PORT})"
)]
pub struct AddrError(#[from] AddressError);

impl FromStr for AgentAddr {
    type Err = AddrError;

    fn from_str(text: &str) -> Result<AgentAddr, AddrError> {
        Ok(match text.parse()? {
            Address::Vsock { cid: None, .. } => Err(AddressError::new(text, Fault::AnyCid))?,
            Address::Vsock {
                cid: Some(cid),
                port,
            } => AgentAddr::Vsock {
                cid,
                port: port.unwrap_or(DEFAULT_AGENT_PORT),
            },
            Address::HybridVsock { uds, port } => AgentAddr::HybridVsock {
                uds,
                port: port.unwrap_or(DEFAULT_AGENT_PORT),
            },
            Address::Unix(path) => AgentAddr::Unix(path),
        })
    }
}

impl AgentAddr {
    /// As written: every part given.
    fn written(&self) -> Address {
        match self {
            AgentAddr::Vsock { cid, port } => Address::Vsock {
                cid: Some(*cid),
                port: Some(*port),
            },
            AgentAddr::HybridVsock { uds, port } => Address::HybridVsock {
                uds: uds.clone(),
                port: Some(*port),
            },
            AgentAddr::Unix(path) => Address::Unix(path.clone()),
        }
    }
}

impl fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.written().fmt(f)
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

    #[test]
    fn a_client_needs_the_agents_cid() {
        for any in [
            "vsock://-1:1100",
            "vsock://:1100",
            "vsock://",
            "vsock://4294967295:1100",
        ] {
            let AddrError(err) = any.parse::<AgentAddr>().unwrap_err();
            assert_eq!(err.fault, Fault::AnyCid, "{any}");
        }
    }
}
