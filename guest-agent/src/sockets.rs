//! Closing the sockets of removed backends, as kube-proxy flushes the
//! conntrack entries of a removed endpoint: a connected UDP socket (statsd,
//! syslog, a tracing exporter) translated to a backend that no service has
//! any more would otherwise keep sending to it for good, to a dead pod or
//! to whichever pod gets its address next. The application sees an error
//! on its next send or receive, connects again and gets a live backend.
//!
//! The kernel closes a socket on `SOCK_DESTROY` (sock_diag, which needs
//! `CONFIG_INET_DIAG_DESTROY`). Sockets are found by dumping each network
//! namespace that a process of the attached cgroup is in, from a thread
//! that enters it, and kept when they were opened in the attached cgroup
//! or below it, outside opted-out cgroups: the sockets the programs
//! translate.
//! A socket connected to the backend's address directly is closed too:
//! the dump can carry a socket's `CONNECTED_VIP` storage, which would tell
//! the two apart, but only for TCP (for a UDP socket the kernel's
//! `inet_sk_diag_fill` returns before the storage), so both protocols are
//! matched by the socket's peer alone.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, Nla as _,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use nix::sched::{CloneFlags, setns};
use slog::{Logger, info, warn};

/// A backend endpoint no service has any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemovedBackend {
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    pub addr: SocketAddr,
}

/// What one pass closed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Closed {
    pub sockets: usize,
    pub namespaces: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    #[error(
        "the kernel cannot close sockets: it lacks {0} (sockets of removed backends stay \
         connected until the application reconnects)"
    )]
    Unsupported(&'static str),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Closes the sockets of removed backends after each write: UDP always,
/// TCP only when asked (kube-proxy leaves established TCP alone).
pub struct SocketCloser {
    cgroup: PathBuf,
    close_tcp: bool,
    /// The kernel's lack is logged once, not on every write.
    unsupported_logged: AtomicBool,
    log: Logger,
}

impl SocketCloser {
    pub fn new(cgroup: PathBuf, close_tcp: bool, log: &Logger) -> SocketCloser {
        SocketCloser {
            cgroup,
            close_tcp,
            unsupported_logged: AtomicBool::new(false),
            log: log.new(slog::o!("component" => "sockets")),
        }
    }

    /// Closes the sockets connected to `removed` (TCP ones only with
    /// `close_tcp`) that processes of the attached cgroup opened, except in
    /// the `opted_out` cgroups (ids) and below, and logs what it did. A
    /// write has succeeded by then, so a failure here is logged, not
    /// returned.
    pub fn close(&self, mut removed: BTreeSet<RemovedBackend>, opted_out: &BTreeSet<u64>) {
        if !self.close_tcp {
            removed.retain(|backend| backend.protocol != IPPROTO_TCP);
        }
        if removed.is_empty() {
            return;
        }
        let started = Instant::now();
        match close_sockets_to(&removed, &Scope::of(&self.cgroup, opted_out)) {
            Ok(closed) => info!(self.log, "closed sockets of removed backends";
                "backends" => removed.len(), "sockets" => closed.sockets,
                "namespaces" => closed.namespaces,
                "elapsed_us" => started.elapsed().as_micros() as u64),
            Err(err @ CloseError::Unsupported(_)) => {
                if !self.unsupported_logged.swap(true, Ordering::Relaxed) {
                    warn!(self.log, "{err}");
                }
            }
            Err(err) => warn!(self.log, "closing sockets of removed backends failed";
                "error" => format!("{err:#}")),
        }
    }
}

/// Whose sockets may be closed: those opened in the attached cgroup or
/// below it, outside opted-out cgroups (a socket carries the cgroup it was
/// opened in), found in the network namespaces of those cgroups' processes.
struct Scope {
    cgroup_ids: HashSet<u64>,
    /// One open namespace file per network namespace (device, inode).
    namespaces: BTreeMap<(u64, u64), fs::File>,
}

impl Scope {
    /// A cgroup2 directory's inode number is its cgroup id. A process that
    /// exits meanwhile is skipped.
    fn of(cgroup: &Path, opted_out: &BTreeSet<u64>) -> Scope {
        let mut scope = Scope {
            cgroup_ids: HashSet::new(),
            namespaces: BTreeMap::new(),
        };
        let mut dirs = vec![cgroup.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            if opted_out.contains(&meta.ino()) {
                continue;
            }
            scope.cgroup_ids.insert(meta.ino());
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        dirs.push(entry.path());
                    }
                }
            }
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                if let Ok(file) = fs::File::open(format!("/proc/{pid}/ns/net"))
                    && let Ok(meta) = file.metadata()
                {
                    scope
                        .namespaces
                        .entry((meta.dev(), meta.ino()))
                        .or_insert(file);
                }
            }
        }
        scope
    }
}

/// Closes every socket in `scope` that is connected to one of `removed`.
/// A namespace that fails does not stop the others; the first error (a
/// missing kernel feature first) is returned after all were tried.
fn close_sockets_to(
    removed: &BTreeSet<RemovedBackend>,
    scope: &Scope,
) -> Result<Closed, CloseError> {
    if !Path::new("/proc/self/ns/net").exists() {
        // A kernel without network namespaces (CONFIG_NET_NS) has one.
        return Ok(Closed {
            sockets: close_in_current_namespace(removed, &scope.cgroup_ids)?,
            namespaces: 1,
        });
    }
    let mut closed = Closed {
        namespaces: scope.namespaces.len(),
        ..Closed::default()
    };
    let mut first_error: Option<CloseError> = None;
    for netns in scope.namespaces.values() {
        let result = std::thread::scope(|threads| {
            threads
                .spawn(|| {
                    // Only this thread enters the namespace, and it ends
                    // with the pass.
                    setns(netns, CloneFlags::CLONE_NEWNET)
                        .map_err(|err| anyhow::anyhow!("entering a network namespace: {err}"))?;
                    close_in_current_namespace(removed, &scope.cgroup_ids)
                })
                .join()
                .expect("the socket-closing thread panicked")
        });
        match result {
            Ok(sockets) => closed.sockets += sockets,
            Err(err) => {
                let keep = match (&first_error, &err) {
                    (None, _) => true,
                    (Some(CloseError::Unsupported(_)), _) => false,
                    (Some(_), unsupported) => matches!(unsupported, CloseError::Unsupported(_)),
                };
                if keep {
                    first_error = Some(err);
                }
            }
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(closed),
    }
}

fn close_in_current_namespace(
    removed: &BTreeSet<RemovedBackend>,
    cgroup_ids: &HashSet<u64>,
) -> Result<usize, CloseError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)
        .map_err(|err| anyhow::anyhow!("opening a sock_diag socket: {err}"))?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(|err| anyhow::anyhow!("connecting the sock_diag socket: {err}"))?;
    let protocols: BTreeSet<u8> = removed.iter().map(|r| r.protocol).collect();
    let mut closed = 0;
    for protocol in protocols {
        for family in [AF_INET, AF_INET6] {
            for id in connected_sockets(&mut socket, family, protocol, removed, cgroup_ids)? {
                closed += usize::from(destroy(&mut socket, family, protocol, id)?);
            }
        }
    }
    Ok(closed)
}

/// The ids of the sockets of `family` and `protocol` connected to one of
/// `removed` (an AF_INET6 socket may be connected to a v4-mapped address).
fn connected_sockets(
    socket: &mut Socket,
    family: u8,
    protocol: u8,
    removed: &BTreeSet<RemovedBackend>,
    cgroup_ids: &HashSet<u64>,
) -> Result<Vec<SocketId>, CloseError> {
    // A connected UDP socket is in TCP_ESTABLISHED; for TCP, every state of
    // a connection that still has a peer.
    let states = if protocol == IPPROTO_UDP {
        StateFlags::ESTABLISHED
    } else {
        StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT - StateFlags::CLOSE
    };
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id: if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        },
    });
    send(socket, request, NLM_F_REQUEST | NLM_F_DUMP)?;
    let mut matching = Vec::new();
    let mut done = false;
    while !done {
        for message in receive::<SockDiagMessage>(socket)? {
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let id = response.header.socket_id;
                    if is_to_close(protocol, &id, &response.nlas, removed, cgroup_ids) {
                        matching.push(id);
                    }
                }
                // A dump that fails once started reports its error in
                // NLMSG_DONE, one that cannot start in NLMSG_ERROR.
                NetlinkPayload::Done(end) if end.code == 0 => done = true,
                NetlinkPayload::Done(end) => return Err(dump_error(end.code, protocol)),
                NetlinkPayload::Error(err) if err.code.is_some() => {
                    return Err(dump_error(err.raw_code(), protocol));
                }
                _ => {}
            }
        }
    }
    Ok(matching)
}

/// Whether a dumped socket of `protocol` is one to close: its peer (a
/// v4-mapped one read as v4) is one of `removed`, and it was opened in one
/// of `cgroup_ids`.
fn is_to_close(
    protocol: u8,
    id: &SocketId,
    nlas: &[Nla],
    removed: &BTreeSet<RemovedBackend>,
    cgroup_ids: &HashSet<u64>,
) -> bool {
    let peer = RemovedBackend {
        protocol,
        addr: SocketAddr::new(id.destination_address.to_canonical(), id.destination_port),
    };
    // A kernel before 5.7 sends no cgroup: the peer decides.
    let in_scope = cgroup_id(nlas).is_none_or(|id| cgroup_ids.contains(&id));
    in_scope && removed.contains(&peer)
}

/// `INET_DIAG_CGROUP_ID`: the cgroup the socket was opened in.
const INET_DIAG_CGROUP_ID: u16 = 21;

fn cgroup_id(nlas: &[Nla]) -> Option<u64> {
    nlas.iter().find_map(|nla| match nla {
        Nla::Other(attribute) if attribute.kind() == INET_DIAG_CGROUP_ID => {
            let mut value = [0; 8];
            (attribute.value_len() == value.len()).then(|| {
                attribute.emit_value(&mut value);
                u64::from_ne_bytes(value)
            })
        }
        _ => None,
    })
}

/// Why a dump failed: ENOENT means no sock_diag handler for the family or
/// protocol (the kernel lacks INET_DIAG or its UDP part).
fn dump_error(code: i32, protocol: u8) -> CloseError {
    if code == -libc::ENOENT {
        CloseError::Unsupported(if protocol == IPPROTO_TCP {
            "CONFIG_INET_DIAG (or the inet_diag module)"
        } else {
            "CONFIG_INET_UDP_DIAG (or the udp_diag module)"
        })
    } else {
        anyhow::anyhow!(
            "listing sockets: {}",
            std::io::Error::from_raw_os_error(-code)
        )
        .into()
    }
}

/// Closes one socket; false if it was gone already.
fn destroy(
    socket: &mut Socket,
    family: u8,
    protocol: u8,
    id: SocketId,
) -> Result<bool, CloseError> {
    let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: id,
    }));
    send(socket, request, NLM_F_REQUEST | NLM_F_ACK)?;
    for message in receive::<SockDiagDestroy>(socket)? {
        if let NetlinkPayload::Error(err) = message.payload {
            return match err.raw_code() {
                0 => Ok(true),
                code if code == -libc::ENOENT => Ok(false),
                code if code == -libc::EOPNOTSUPP => {
                    Err(CloseError::Unsupported("CONFIG_INET_DIAG_DESTROY"))
                }
                _ => Err(anyhow::anyhow!("closing a socket: {}", err.to_io()).into()),
            };
        }
    }
    Err(anyhow::anyhow!("closing a socket: no acknowledgement").into())
}

fn send<T: NetlinkSerializable + std::fmt::Debug>(
    socket: &mut Socket,
    payload: T,
    flags: u16,
) -> Result<(), CloseError>
where
    NetlinkPayload<T>: From<T>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket
        .send(&buffer, 0)
        .map_err(|err| anyhow::anyhow!("sending to sock_diag: {err}"))?;
    Ok(())
}

/// The messages of one datagram from the kernel.
fn receive<T: NetlinkDeserializable>(
    socket: &mut Socket,
) -> Result<Vec<NetlinkMessage<T>>, CloseError> {
    let (buffer, _) = socket
        .recv_from_full()
        .map_err(|err| anyhow::anyhow!("reading from sock_diag: {err}"))?;
    let mut messages = Vec::new();
    let mut offset = 0;
    while offset < buffer.len() {
        let message = NetlinkMessage::<T>::deserialize(&buffer[offset..])
            .map_err(|err| anyhow::anyhow!("a sock_diag message: {err}"))?;
        let length = message.header.length as usize;
        if length == 0 {
            break;
        }
        offset += (length + 3) & !3;
        messages.push(message);
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::DefaultNla;

    use super::*;

    const CGROUP: u64 = 7;

    fn removed_udp(addr: &str) -> BTreeSet<RemovedBackend> {
        [RemovedBackend {
            protocol: IPPROTO_UDP,
            addr: addr.parse().unwrap(),
        }]
        .into()
    }

    /// A dumped v4 socket connected to `peer`.
    fn socket_to(peer: &str) -> SocketId {
        let peer: SocketAddr = peer.parse().unwrap();
        SocketId {
            destination_address: peer.ip(),
            destination_port: peer.port(),
            ..SocketId::new_v4()
        }
    }

    /// The cgroup attribute of a socket opened in `cgroup`.
    fn opened_in(cgroup: u64) -> Vec<Nla> {
        vec![Nla::Other(DefaultNla::new(
            INET_DIAG_CGROUP_ID,
            cgroup.to_ne_bytes().to_vec(),
        ))]
    }

    fn in_scope() -> HashSet<u64> {
        [CGROUP].into()
    }

    #[test]
    fn a_socket_of_the_cgroup_to_a_removed_backend_is_closed() {
        let removed = removed_udp("10.244.1.1:53");
        let id = socket_to("10.244.1.1:53");
        assert!(is_to_close(
            IPPROTO_UDP,
            &id,
            &opened_in(CGROUP),
            &removed,
            &in_scope()
        ));
        // An AF_INET6 socket shows a v4 peer as v4-mapped.
        let mapped = SocketId {
            destination_address: "::ffff:10.244.1.1".parse().unwrap(),
            destination_port: 53,
            ..SocketId::new_v6()
        };
        assert!(is_to_close(
            IPPROTO_UDP,
            &mapped,
            &opened_in(CGROUP),
            &removed,
            &in_scope()
        ));
        // A kernel before 5.7 says no cgroup: the peer decides.
        assert!(is_to_close(IPPROTO_UDP, &id, &[], &removed, &in_scope()));
    }

    #[test]
    fn a_socket_to_a_live_backend_stays() {
        let removed = removed_udp("10.244.1.1:53");
        for live in ["10.244.1.2:53", "10.244.1.1:54"] {
            let id = socket_to(live);
            assert!(
                !is_to_close(IPPROTO_UDP, &id, &opened_in(CGROUP), &removed, &in_scope()),
                "{live}"
            );
        }
        // The same endpoint over the other protocol is another backend.
        let id = socket_to("10.244.1.1:53");
        assert!(!is_to_close(
            IPPROTO_TCP,
            &id,
            &opened_in(CGROUP),
            &removed,
            &in_scope()
        ));
    }

    #[test]
    fn a_socket_of_another_cgroup_stays() {
        let removed = removed_udp("10.244.1.1:53");
        let id = socket_to("10.244.1.1:53");
        assert!(!is_to_close(
            IPPROTO_UDP,
            &id,
            &opened_in(CGROUP + 1),
            &removed,
            &in_scope()
        ));
    }

    /// A cgroup2 directory's id is its inode number: plain directories
    /// stand in for a cgroup tree.
    #[test]
    fn the_scope_is_the_cgroup_and_below_without_opted_out_subtrees() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pod");
        for sub in ["app", "meshed/sidecar"] {
            fs::create_dir_all(pod.join(sub)).unwrap();
        }
        let id = |sub: &str| fs::metadata(pod.join(sub)).unwrap().ino();
        let opted_out = [id("meshed")].into();
        let scope = Scope::of(&pod, &opted_out);
        let expected: HashSet<u64> = [id(""), id("app")].into();
        assert_eq!(scope.cgroup_ids, expected);
        // Nothing in these directories runs: no namespace to enter.
        assert!(scope.namespaces.is_empty());
    }
}
