//! Opening a byte stream to the agent. Over vsock the connection comes
//! from a privileged source port (below 1024), the proof the agent asks of
//! a host process over vhost-vsock (see the agent's `peers` module).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};
use ttrpc::r#async::transport::Socket;

use super::addr::AgentAddr;

/// The longest reply line the hybrid vsock handshake is allowed.
const MAX_HANDSHAKE_LINE: usize = 64;

/// A failed connect, and whether waiting may mend it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No agent can be behind the address now: no socket at a unix path,
    /// nothing listening on it, or a host that may not open vsock at all.
    #[error("{0}")]
    Final(io::Error),
    /// The agent may be starting: a VM booting, a guest port not listening
    /// yet, a hybrid vsock handshake not answered.
    #[error("{0}")]
    MayBeStarting(io::Error),
}

/// Connects to `addr` and returns a socket ready for ttrpc.
pub async fn connect(addr: &AgentAddr) -> Result<Socket, ConnectError> {
    let starting = ConnectError::MayBeStarting;
    match addr {
        AgentAddr::Unix(path) => Ok(Socket::new(connect_unix(path).await?)),
        AgentAddr::Vsock { cid, port } => {
            let (cid, port) = (*cid, *port);
            // A blocking connect, bounded by the kernel's vsock connect
            // timeout (2 s by default).
            let stream = tokio::task::spawn_blocking(move || connect_vsock(cid, port))
                .await
                .map_err(|err| starting(io::Error::other(err)))?
                .map_err(|err| match err.kind() {
                    // A capability, a seccomp profile or a kernel without
                    // vsock (see vsock_socket_error): no wait mends them.
                    io::ErrorKind::PermissionDenied | io::ErrorKind::Unsupported => {
                        ConnectError::Final(err)
                    }
                    _ => starting(err),
                })?;
            Ok(Socket::new(
                tokio_vsock::VsockStream::new(stream).map_err(starting)?,
            ))
        }
        AgentAddr::HybridVsock { uds, port } => {
            let mut stream = connect_unix(uds).await?;
            hybrid_handshake(&mut stream, *port)
                .await
                .map_err(starting)?;
            Ok(Socket::new(stream))
        }
    }
}

/// Connects to the unix socket at `path`; a missing socket or one nobody
/// listens on is final, in words that name the path (the agent or the VMM
/// that would listen there is not running, and waiting will not start it).
async fn connect_unix(path: &Path) -> Result<UnixStream, ConnectError> {
    UnixStream::connect(path).await.map_err(|err| {
        let path = path.display();
        match err.raw_os_error() {
            Some(libc::ENOENT) => {
                ConnectError::Final(io::Error::new(err.kind(), format!("no socket at {path}")))
            }
            Some(libc::ECONNREFUSED) => ConnectError::Final(io::Error::new(
                err.kind(),
                format!("nothing listens on {path} (connection refused)"),
            )),
            Some(libc::EACCES | libc::ENOTSOCK) => {
                ConnectError::Final(io::Error::new(err.kind(), format!("{path}: {err}")))
            }
            _ => ConnectError::MayBeStarting(err),
        }
    })
}

/// vsock ports a host process needs CAP_NET_BIND_SERVICE to bind: 1..=1023
/// (the kernel's LAST_RESERVED_PORT is 1023; port 0 is not bindable).
const PRIVILEGED_PORTS: u32 = 1023;

/// Connects to `cid:port` from a privileged source port. A process that may
/// not bind one gets an error naming the capability it lacks, never a
/// connection from a port the kernel picks: an agent keeping the default
/// rule would refuse that, and say why only in the guest's log.
fn connect_vsock(cid: u32, port: u32) -> io::Result<vsock::VsockStream> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(vsock_socket_error(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let sockaddr = |cid: u32, port: u32| {
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        addr
    };
    let call = |result: libc::c_int| {
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let start = std::process::id().wrapping_add(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos()),
    );
    let bind = |local_port| {
        let addr = sockaddr(libc::VMADDR_CID_ANY, local_port);
        // SAFETY: `addr` is a valid sockaddr_vm of the length given.
        call(unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })
    };
    let connect = || {
        let addr = sockaddr(cid, port);
        // SAFETY: as for bind.
        call(unsafe {
            libc::connect(
                socket.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })
    };
    connect_from_privileged_port(start, bind, connect)?;
    Ok(vsock::VsockStream::from(socket))
}

/// Why `socket(AF_VSOCK)` failed, in words that say what to change.
fn vsock_socket_error(err: io::Error) -> io::Error {
    match err.raw_os_error() {
        // Container runtimes' default seccomp profiles answer EPERM.
        Some(libc::EPERM) => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "socket(AF_VSOCK) refused: a seccomp profile blocks AF_VSOCK (container \
                 runtimes' RuntimeDefault does; run under the profile in deploy/seccomp/): {err}"
            ),
        ),
        Some(libc::EAFNOSUPPORT) => io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "socket(AF_VSOCK): this kernel has no vsock (QEMU's vhost_vsock module loads \
                 it when a VM starts): {err}"
            ),
        ),
        _ => err,
    }
}

/// Binds a privileged source port with `bind` (see
/// [`bind_privileged_port`]), then connects with `connect`; returns the
/// port. A bind that fails is the answer: `connect` is not tried from a
/// port the kernel would pick.
fn connect_from_privileged_port(
    start: u32,
    bind: impl FnMut(u32) -> io::Result<()>,
    connect: impl FnOnce() -> io::Result<()>,
) -> io::Result<u32> {
    let local_port = bind_privileged_port(start, bind)?;
    connect()?;
    Ok(local_port)
}

/// Binds a free port of 1..=1023 with `bind`, trying them in turn from
/// one derived from `start` (so concurrent clients rarely collide); one
/// connection per agent, so a node daemon needs one port per sandbox.
/// PermissionDenied, naming CAP_NET_BIND_SERVICE: this process may not bind
/// privileged ports.
fn bind_privileged_port(
    start: u32,
    mut bind: impl FnMut(u32) -> io::Result<()>,
) -> io::Result<u32> {
    for offset in 0..PRIVILEGED_PORTS {
        let port = 1 + (start.wrapping_add(offset)) % PRIVILEGED_PORTS;
        match bind(port) {
            Ok(()) => return Ok(port),
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => continue,
            // af_vsock.c: capable(CAP_NET_BIND_SERVICE), which looks at the
            // initial user namespace only.
            Err(err) if err.raw_os_error() == Some(libc::EACCES) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "binding vsock source port {port} needs CAP_NET_BIND_SERVICE in the \
                         host's initial user namespace, which this process lacks (an agent \
                         admits a host peer only from a port below 1024): {err}"
                    ),
                ));
            }
            Err(err) => return Err(err),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "every vsock source port below 1024 is in use",
    ))
}

/// Hybrid vsock: send `CONNECT <port>\n` and read the reply a byte at a time
/// up to its newline, so no byte of the agent's stream is consumed here.
/// The reply is `OK <host port>\n`; anything else means the guest port is
/// not listening (yet).
pub async fn hybrid_handshake<S>(stream: &mut S, port: u32) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await.map_err(|err| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("hybrid vsock: connection closed before OK (guest port {port} not listening?): {err}"),
            )
        })?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hybrid vsock: reply line too long",
            ));
        }
    }
    let line = String::from_utf8_lossy(&line);
    if line.starts_with("OK ") {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock: expected \"OK <port>\", got {line:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixListener;

    use super::*;

    #[tokio::test]
    async fn handshake_consumes_only_the_reply_line() {
        let (mut host, mut muxer) = tokio::io::duplex(256);
        let muxer_side = tokio::spawn(async move {
            let mut request = [0u8; 13];
            muxer.read_exact(&mut request).await.unwrap();
            assert_eq!(&request, b"CONNECT 1025\n");
            // The reply and the agent's first bytes arrive together.
            muxer.write_all(b"OK 1073741824\nAGENT").await.unwrap();
            muxer
        });
        hybrid_handshake(&mut host, 1025).await.unwrap();
        let mut rest = [0u8; 5];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"AGENT");
        drop(muxer_side.await.unwrap());
    }

    #[test]
    fn privileged_source_ports_skip_those_in_use() {
        let mut tried = Vec::new();
        let port = bind_privileged_port(1021, |port| {
            tried.push(port);
            if port == 1 {
                Ok(())
            } else {
                Err(io::Error::from(io::ErrorKind::AddrInUse))
            }
        })
        .unwrap();
        // From 1 + 1021 % 1023, wrapping below 1024 back to 1.
        assert_eq!(port, 1);
        assert_eq!(tried, [1022, 1023, 1]);

        let mut tried = 0;
        let err = bind_privileged_port(0, |_| {
            tried += 1;
            Err(io::Error::from(io::ErrorKind::AddrInUse))
        })
        .unwrap_err();
        assert_eq!(tried, 1023, "every privileged port is tried once");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);

        let err = bind_privileged_port(5, |_| Err(io::Error::from_raw_os_error(libc::EACCES)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("CAP_NET_BIND_SERVICE"), "{err}");
        let err = bind_privileged_port(5, |_| Err(io::Error::from_raw_os_error(libc::EINVAL)))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn a_refused_privileged_bind_is_the_answer_never_an_ephemeral_port() {
        let mut connected = false;
        let err = connect_from_privileged_port(
            5,
            |_| Err(io::Error::from_raw_os_error(libc::EACCES)),
            || {
                connected = true;
                Ok(())
            },
        )
        .unwrap_err();
        assert!(!connected, "connected from a port the kernel picks");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("CAP_NET_BIND_SERVICE"), "{err}");

        let port = connect_from_privileged_port(
            5,
            |_| Ok(()),
            || {
                connected = true;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(port, 6);
        assert!(connected, "a bound socket connects");
    }

    #[test]
    fn vsock_socket_errors_say_what_to_change() {
        let seccomp = vsock_socket_error(io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(seccomp.kind(), io::ErrorKind::PermissionDenied);
        assert!(seccomp.to_string().contains("seccomp"), "{seccomp}");
        let no_vsock = vsock_socket_error(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        assert!(no_vsock.to_string().contains("no vsock"), "{no_vsock}");
        let other = vsock_socket_error(io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(other.raw_os_error(), Some(libc::EMFILE));
    }

    /// No socket, or nothing listening on one, is final (named by its
    /// path); a hybrid vsock muxer that hangs up before OK may be waiting
    /// for its guest to boot.
    #[tokio::test]
    async fn only_an_unanswered_handshake_may_mend_by_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let unix = AgentAddr::Unix(path.clone());
        let Err(ConnectError::Final(err)) = connect(&unix).await else {
            panic!("a missing socket is not final");
        };
        assert_eq!(err.to_string(), format!("no socket at {}", path.display()));

        // A listener gone, its socket file left: connect(2) answers
        // ECONNREFUSED.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let Err(ConnectError::Final(err)) = connect(&unix).await else {
            panic!("a refused connection is not final");
        };
        assert!(err.to_string().contains("nothing listens on"), "{err}");
        std::fs::remove_file(&path).unwrap();

        let muxer = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = muxer.accept().await.unwrap();
            let mut request = [0u8; 13];
            stream.read_exact(&mut request).await.unwrap();
        });
        let hybrid = AgentAddr::HybridVsock {
            uds: path,
            port: 1025,
        };
        assert!(matches!(
            connect(&hybrid).await,
            Err(ConnectError::MayBeStarting(_))
        ));
    }

    #[tokio::test]
    async fn refused_and_closed_handshakes_fail() {
        let (mut host, mut muxer) = tokio::io::duplex(256);
        tokio::spawn(async move {
            let mut request = [0u8; 13];
            muxer.read_exact(&mut request).await.unwrap();
            muxer.write_all(b"ERR no listener\n").await.unwrap();
        });
        let err = hybrid_handshake(&mut host, 1025).await.unwrap_err();
        assert!(err.to_string().contains("ERR no listener"), "{err}");

        let (mut host, muxer) = tokio::io::duplex(256);
        drop(muxer);
        assert!(hybrid_handshake(&mut host, 1025).await.is_err());
    }
}
