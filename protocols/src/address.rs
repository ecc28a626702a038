//! Agent addresses as written, one grammar for every side that reads one:
//! the shim's `--agent`, Kata's `/agent-url` answer and the agent's
//! `--listen`. Each side then applies its own rules: a client needs a CID
//! where a listener takes any, Kata always names a port (the node daemon
//! puts socklb's in its place), the agent serves no hybrid vsock.
//!
//! - `vsock://CID[:PORT]`, CID `-1`, `4294967295` (VMADDR_CID_ANY, the
//!   same value unsigned) or nothing for any CID;
//! - `hvsock:///path/to/uds[:PORT]` (hybrid vsock, as Firecracker, Cloud
//!   Hypervisor and vhost-device-vsock offer it); a socket path may hold
//!   ':' itself, so only digits after the last one make a port;
//! - `unix:///path`.

use std::{fmt, path::PathBuf, str::FromStr};

/// The any-CID value (linux/vm_sockets.h), `-1` as a signed number.
const VMADDR_CID_ANY: u32 = u32::MAX;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `cid` None: any CID, as a listener binds (`-1`, VMADDR_CID_ANY).
    Vsock {
        cid: Option<u32>,
        port: Option<u32>,
    },
    HybridVsock {
        uds: PathBuf,
        port: Option<u32>,
    },
    Unix(PathBuf),
}

/// What is wrong with an address: of its grammar, or of a side's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("unknown scheme")]
    UnknownScheme,
    #[error("bad CID")]
    BadCid,
    #[error("bad port")]
    BadPort,
    #[error("the socket path must be absolute")]
    RelativePath,
    #[error("no port")]
    NoPort,
    #[error("a connection needs the peer's CID, not any (-1, 4294967295)")]
    AnyCid,
    #[error("the agent listens on any CID: vsock://-1:PORT")]
    NotAnyCid,
    #[error("a scheme not taken here")]
    SchemeNotTaken,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {fault}")]
pub struct AddressError {
    pub text: String,
    pub fault: Fault,
}

impl AddressError {
    pub fn new(text: &str, fault: Fault) -> AddressError {
        AddressError {
            text: text.into(),
            fault,
        }
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Address, AddressError> {
        let error = |fault| AddressError::new(text, fault);
        // `vsock://3:` as `vsock://3`: an empty port is no port.
        let port = |port: Option<&str>| match port {
            None | Some("") => Ok(None),
            Some(port) => port.parse().map(Some).map_err(|_| error(Fault::BadPort)),
        };
        if let Some(rest) = text.strip_prefix("vsock://") {
            let (cid, given_port) = match rest.split_once(':') {
                Some((cid, port)) => (cid, Some(port)),
                None => (rest, None),
            };
            let cid = match cid {
                "-1" | "" => None,
                cid => match cid.parse().map_err(|_| error(Fault::BadCid))? {
                    VMADDR_CID_ANY => None,
                    cid => Some(cid),
                },
            };
            return Ok(Address::Vsock {
                cid,
                port: port(given_port)?,
            });
        }
        if let Some(rest) = text.strip_prefix("hvsock://") {
            let (uds, given_port) = match rest.rsplit_once(':') {
                Some((uds, port)) if port.bytes().all(|b| b.is_ascii_digit()) => (uds, Some(port)),
                _ => (rest, None),
            };
            return Ok(Address::HybridVsock {
                uds: absolute(uds).ok_or_else(|| error(Fault::RelativePath))?,
                port: port(given_port)?,
            });
        }
        if let Some(path) = text.strip_prefix("unix://") {
            return Ok(Address::Unix(
                absolute(path).ok_or_else(|| error(Fault::RelativePath))?,
            ));
        }
        Err(error(Fault::UnknownScheme))
    }
}

fn absolute(path: &str) -> Option<PathBuf> {
    path.starts_with('/').then(|| path.into())
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = |port: &Option<u32>| port.map(|port| format!(":{port}")).unwrap_or_default();
        match self {
            Address::Vsock { cid: None, port: p } => write!(f, "vsock://-1{}", port(p)),
            Address::Vsock {
                cid: Some(cid),
                port: p,
            } => write!(f, "vsock://{cid}{}", port(p)),
            Address::HybridVsock { uds, port: p } => {
                write!(f, "hvsock://{}{}", uds.display(), port(p))
            }
            Address::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back() {
        for (text, address) in [
            (
                "vsock://4:1025",
                Address::Vsock {
                    cid: Some(4),
                    port: Some(1025),
                },
            ),
            (
                "vsock://3",
                Address::Vsock {
                    cid: Some(3),
                    port: None,
                },
            ),
            (
                "vsock://-1:1100",
                Address::Vsock {
                    cid: None,
                    port: Some(1100),
                },
            ),
            (
                "vsock://-1",
                Address::Vsock {
                    cid: None,
                    port: None,
                },
            ),
            (
                "hvsock:///run/vm/vsock.sock:1025",
                Address::HybridVsock {
                    uds: "/run/vm/vsock.sock".into(),
                    port: Some(1025),
                },
            ),
            (
                "hvsock:///run/vm/vsock.sock",
                Address::HybridVsock {
                    uds: "/run/vm/vsock.sock".into(),
                    port: None,
                },
            ),
            (
                "hvsock:///a:b/c.sock:99",
                Address::HybridVsock {
                    uds: "/a:b/c.sock".into(),
                    port: Some(99),
                },
            ),
            (
                "unix:///run/agent.sock",
                Address::Unix("/run/agent.sock".into()),
            ),
        ] {
            assert_eq!(text.parse::<Address>(), Ok(address.clone()), "{text}");
            assert_eq!(address.to_string(), text);
        }
    }

    #[test]
    fn empty_parts_are_any_cid_and_no_port() {
        for (text, address) in [
            (
                "vsock://:7",
                Address::Vsock {
                    cid: None,
                    port: Some(7),
                },
            ),
            (
                "vsock://",
                Address::Vsock {
                    cid: None,
                    port: None,
                },
            ),
            // VMADDR_CID_ANY unsigned is any CID, never a peer's.
            (
                "vsock://4294967295:7",
                Address::Vsock {
                    cid: None,
                    port: Some(7),
                },
            ),
            (
                "vsock://3:",
                Address::Vsock {
                    cid: Some(3),
                    port: None,
                },
            ),
            (
                "hvsock:///run/vm.sock:",
                Address::HybridVsock {
                    uds: "/run/vm.sock".into(),
                    port: None,
                },
            ),
        ] {
            assert_eq!(text.parse::<Address>(), Ok(address), "{text}");
        }
    }

    #[test]
    fn each_fault_is_named_with_the_text() {
        for (text, fault) in [
            ("vsock://x:1", Fault::BadCid),
            ("vsock://-2:1", Fault::BadCid),
            ("vsock://3:x", Fault::BadPort),
            ("vsock://3:99999999999", Fault::BadPort),
            ("hvsock://rel:1", Fault::RelativePath),
            ("hvsock:///run/vm.sock:99999999999", Fault::BadPort),
            ("unix://rel", Fault::RelativePath),
            ("tcp://a:1", Fault::UnknownScheme),
            ("", Fault::UnknownScheme),
        ] {
            let err = text.parse::<Address>().unwrap_err();
            assert_eq!(err, AddressError::new(text, fault));
            assert!(err.to_string().contains(&format!("{text:?}")), "{err}");
        }
    }
}
