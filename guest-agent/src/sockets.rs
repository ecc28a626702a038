//! Closing the sockets of removed backends, as kube-proxy flushes the
//! conntrack entries of a removed endpoint: a connected UDP socket (statsd,
//! syslog, a tracing exporter) translated to a backend that its service no
//! longer has would otherwise keep sending to it for good, to a pod taken
//! out of the service or to whichever pod gets its address next. The
//! application sees an error on its next send or receive, connects again
//! and gets a live backend.
//!
//! The kernel closes a socket on `SOCK_DESTROY` (sock_diag, which needs
//! `CONFIG_INET_DIAG_DESTROY`). Sockets are found by dumping each network
//! namespace that a process of the attached cgroup is in, from a thread
//! that enters it, and kept when they were opened in the attached cgroup
//! or below it, outside opted-out cgroups: the sockets the programs
//! translate.
//!
//! A socket is closed by its own translation, which the dump carries when
//! asked (`INET_DIAG_REQ_SK_BPF_STORAGES` with `CONNECTED_VIP`): only when
//! the service it was translated through lost its backend. A socket
//! connected to a pod's address directly has none and stays. The kernel
//! carries the storage for TCP only (`inet_sk_diag_fill` returns before it
//! for sockets without a connection state, which UDP's are, Linux 6.1 to
//! at least 6.18), so a UDP socket that shows no translation is matched by
//! its peer: closed when no service has that backend any more (a direct
//! one too).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    net::SocketAddr,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use netlink_packet_core::{
    DefaultNla, NLA_F_NESTED, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    Nla as _, NlasIterator,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use nix::sched::{CloneFlags, setns};
use slog::{Logger, info, warn};

use crate::datapath::translation_from_bytes;

/// A backend endpoint no service of its protocol has any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemovedBackend {
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    pub addr: SocketAddr,
}

/// A backend a write took out of one service (or the service with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DroppedBackend {
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    /// The service's VIP and port.
    pub vip: SocketAddr,
    pub backend: SocketAddr,
}

/// What a write took away, in the two forms sockets are matched against.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removals {
    /// Each service's lost backends: a socket whose translation names one
    /// is closed.
    pub dropped: BTreeSet<DroppedBackend>,
    /// Those of the dropped backends that no service has any more: a
    /// socket that shows no translation (UDP) is closed when its peer is
    /// one.
    pub unused: BTreeSet<RemovedBackend>,
}

impl Removals {
    fn retain_protocol(&mut self, keep: impl Fn(u8) -> bool) {
        self.dropped.retain(|dropped| keep(dropped.protocol));
        self.unused.retain(|unused| keep(unused.protocol));
    }
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
    /// `CONNECTED_VIP`, whose value for each socket a dump carries when
    /// asked with it; None when the kernel refused that (then every socket
    /// is matched by its peer).
    connected_vip: Option<OwnedFd>,
    /// The kernel's lack is logged once, not on every write.
    unsupported_logged: AtomicBool,
    log: Logger,
}

impl SocketCloser {
    /// A closer for the sockets opened below `cgroup`, reading each one's
    /// translation from `connected_vip` (the programs' map). Whether the
    /// kernel hands translations out is asked here, once: if it does not,
    /// that is logged and sockets are matched by their peer alone.
    pub fn new(
        cgroup: PathBuf,
        close_tcp: bool,
        connected_vip: OwnedFd,
        log: &Logger,
    ) -> SocketCloser {
        let log = log.new(slog::o!("component" => "sockets"));
        let connected_vip = match translations_refused(connected_vip.as_fd()) {
            None => Some(connected_vip),
            Some(reason) => {
                warn!(log, "the kernel does not hand out sockets' translations: a socket \
                            connected to a removed backend directly is closed too";
                      "reason" => reason);
                None
            }
        };
        SocketCloser {
            cgroup,
            close_tcp,
            connected_vip,
            unsupported_logged: AtomicBool::new(false),
            log,
        }
    }

    /// Closes the sockets translated to a backend their service lost (and
    /// UDP ones connected to a backend in no service: see the module), TCP
    /// ones only with `close_tcp`, that processes of the attached cgroup
    /// opened, except in the `opted_out` cgroups (ids) and below, and logs
    /// what it did. A write has succeeded by then, so a failure here is
    /// logged, not returned.
    pub fn close(&self, mut removals: Removals, opted_out: &BTreeSet<u64>) {
        if !self.close_tcp {
            removals.retain_protocol(|protocol| protocol != IPPROTO_TCP);
        }
        // Every unused backend was dropped by some service.
        if removals.dropped.is_empty() {
            return;
        }
        let started = Instant::now();
        let matching = Matching {
            removals: &removals,
            connected_vip: self.connected_vip.as_ref().map(|fd| fd.as_fd()),
        };
        match close_sockets(&matching, &Scope::of(&self.cgroup, opted_out)) {
            Ok(closed) => info!(self.log, "closed sockets of removed backends";
                "dropped" => removals.dropped.len(), "sockets" => closed.sockets,
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

/// What one pass closes: the removals, and the map to read sockets'
/// translations from (None: matched by peer).
struct Matching<'a> {
    removals: &'a Removals,
    connected_vip: Option<BorrowedFd<'a>>,
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

/// Closes every socket in `scope` that `matching` concerns. A namespace
/// that fails does not stop the others; the first error (a missing kernel
/// feature first) is returned after all were tried.
fn close_sockets(matching: &Matching, scope: &Scope) -> Result<Closed, CloseError> {
    if !Path::new("/proc/self/ns/net").exists() {
        // A kernel without network namespaces (CONFIG_NET_NS) has one.
        return Ok(Closed {
            sockets: close_in_current_namespace(matching, &scope.cgroup_ids)?,
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
                    close_in_current_namespace(matching, &scope.cgroup_ids)
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

fn sock_diag_socket() -> Result<Socket, CloseError> {
    let socket = Socket::new(NETLINK_SOCK_DIAG)
        .map_err(|err| anyhow::anyhow!("opening a sock_diag socket: {err}"))?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(|err| anyhow::anyhow!("connecting the sock_diag socket: {err}"))?;
    Ok(socket)
}

fn close_in_current_namespace(
    matching: &Matching,
    cgroup_ids: &HashSet<u64>,
) -> Result<usize, CloseError> {
    let mut socket = sock_diag_socket()?;
    let protocols: BTreeSet<u8> = matching
        .removals
        .dropped
        .iter()
        .map(|dropped| dropped.protocol)
        .collect();
    let mut closed = 0;
    for protocol in protocols {
        for family in [AF_INET, AF_INET6] {
            for id in sockets_to_close(&mut socket, family, protocol, matching, cgroup_ids)? {
                closed += usize::from(destroy(&mut socket, family, protocol, id)?);
            }
        }
    }
    Ok(closed)
}

/// Whether a dumped socket that shows no translation was translated.
#[derive(Clone, Copy, Debug)]
enum Untranslated {
    /// It was not: the dump shows every translated socket's (TCP, with
    /// `CONNECTED_VIP` asked for). It is left alone.
    Direct,
    /// Unknown (UDP, whose dump leaves the storage out; or the kernel
    /// refused to hand translations out): its peer decides.
    ByPeer,
}

/// A dump request of the connected sockets of `family` and `protocol`,
/// asking for their `CONNECTED_VIP` if given.
fn dump_request(family: u8, protocol: u8, connected_vip: Option<BorrowedFd>) -> Vec<u8> {
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
    let attributes = connected_vip.map(storages_attribute).unwrap_or_default();
    message(request, NLM_F_REQUEST | NLM_F_DUMP, &attributes)
}

/// `INET_DIAG_REQ_SK_BPF_STORAGES`: the socket storage maps whose values a
/// dump is to carry, by file descriptor.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;

fn storages_attribute(map: BorrowedFd) -> Vec<u8> {
    let map_fd = DefaultNla::new(
        SK_DIAG_BPF_STORAGE_REQ_MAP_FD,
        (map.as_raw_fd() as u32).to_ne_bytes().to_vec(),
    );
    let storages = DefaultNla::new(
        INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED,
        emitted(&map_fd),
    );
    emitted(&storages)
}

fn emitted(attribute: &DefaultNla) -> Vec<u8> {
    use netlink_packet_core::Emitable as _;
    let mut bytes = vec![0; attribute.buffer_len()];
    attribute.emit(&mut bytes);
    bytes
}

/// Why the kernel will not hand out sockets' translations from
/// `connected_vip`, if it will not: a dump of this namespace's TCP sockets
/// asking for them fails (EPERM without CAP_BPF or CAP_SYS_ADMIN). The
/// request attribute came with Linux 5.7, before every kernel the programs
/// load on (`bpf_set_retval`), so it is never ignored. A kernel without
/// sock_diag (ENOENT) cannot close sockets at all: said on the first pass.
fn translations_refused(connected_vip: BorrowedFd) -> Option<String> {
    let dump = || -> Result<(), CloseError> {
        let mut socket = sock_diag_socket()?;
        send(
            &mut socket,
            &dump_request(AF_INET, IPPROTO_TCP, Some(connected_vip)),
        )?;
        read_dump(&mut socket, IPPROTO_TCP, |_| {})
    };
    match dump() {
        Ok(()) | Err(CloseError::Unsupported(_)) => None,
        Err(err) => Some(format!("{err:#}")),
    }
}

/// The ids of the sockets of `family` and `protocol` that `matching`
/// concerns (an AF_INET6 socket may be connected to a v4-mapped address).
fn sockets_to_close(
    socket: &mut Socket,
    family: u8,
    protocol: u8,
    matching: &Matching,
    cgroup_ids: &HashSet<u64>,
) -> Result<Vec<SocketId>, CloseError> {
    let untranslated = if protocol == IPPROTO_TCP && matching.connected_vip.is_some() {
        Untranslated::Direct
    } else {
        Untranslated::ByPeer
    };
    send(
        socket,
        &dump_request(family, protocol, matching.connected_vip),
    )?;
    let mut to_close = Vec::new();
    read_dump(socket, protocol, |response| {
        let id = &response.header.socket_id;
        if Dumped::new(protocol, id, &response.nlas).is_to_close(
            matching.removals,
            untranslated,
            cgroup_ids,
        ) {
            to_close.push(id.clone());
        }
    })?;
    Ok(to_close)
}

/// Reads a dump to its end, handing each socket to `each`.
fn read_dump(
    socket: &mut Socket,
    protocol: u8,
    mut each: impl FnMut(&netlink_packet_sock_diag::inet::InetResponse),
) -> Result<(), CloseError> {
    loop {
        for message in receive::<SockDiagMessage>(socket)? {
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    each(&response);
                }
                // A dump that fails once started reports its error in
                // NLMSG_DONE, one that cannot start in NLMSG_ERROR.
                NetlinkPayload::Done(end) if end.code == 0 => return Ok(()),
                NetlinkPayload::Done(end) => return Err(dump_error(end.code, protocol)),
                NetlinkPayload::Error(err) if err.code.is_some() => {
                    return Err(dump_error(err.raw_code(), protocol));
                }
                _ => {}
            }
        }
    }
}

/// A socket as a dump shows it.
struct Dumped<'a> {
    /// IPPROTO_TCP or IPPROTO_UDP.
    protocol: u8,
    /// Its peer, a v4-mapped one read as v4.
    peer: SocketAddr,
    nlas: &'a [Nla],
}

impl<'a> Dumped<'a> {
    fn new(protocol: u8, id: &SocketId, nlas: &'a [Nla]) -> Dumped<'a> {
        Dumped {
            protocol,
            peer: SocketAddr::new(id.destination_address.to_canonical(), id.destination_port),
            nlas,
        }
    }

    /// Whether the socket is one to close: it was opened in one of
    /// `cgroup_ids`, and its translation names a backend its service lost;
    /// or, showing none and `ByPeer`, its peer is in no service.
    fn is_to_close(
        &self,
        removals: &Removals,
        untranslated: Untranslated,
        cgroup_ids: &HashSet<u64>,
    ) -> bool {
        // A kernel before 5.7 sends no cgroup: the peer decides.
        let in_scope = self.cgroup_id().is_none_or(|id| cgroup_ids.contains(&id));
        if !in_scope {
            return false;
        }
        match (self.translation(), untranslated) {
            (Some(vip), _) => removals.dropped.contains(&DroppedBackend {
                protocol: self.protocol,
                vip,
                backend: self.peer,
            }),
            (None, Untranslated::Direct) => false,
            (None, Untranslated::ByPeer) => removals.unused.contains(&RemovedBackend {
                protocol: self.protocol,
                addr: self.peer,
            }),
        }
    }

    /// `INET_DIAG_CGROUP_ID`: the cgroup the socket was opened in.
    fn cgroup_id(&self) -> Option<u64> {
        let value = self.attribute(INET_DIAG_CGROUP_ID)?;
        Some(u64::from_ne_bytes(value.try_into().ok()?))
    }

    /// The VIP endpoint the socket was translated from to its peer, from
    /// its `CONNECTED_VIP` (`INET_DIAG_SK_BPF_STORAGES`, which holds only
    /// the map asked for). A translation to another backend is a stale
    /// one (see `untranslated` in the programs): none.
    fn translation(&self) -> Option<SocketAddr> {
        let storages = self.attribute(INET_DIAG_SK_BPF_STORAGES)?;
        let storage = NlasIterator::new(&storages[..])
            .flatten()
            .find(|nla| nla.kind() == SK_DIAG_BPF_STORAGE)?;
        let value = NlasIterator::new(storage.value())
            .flatten()
            .find(|nla| nla.kind() == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
        let (vip, backend) = translation_from_bytes(value.value())?;
        (backend == self.peer).then_some(vip)
    }

    fn attribute(&self, kind: u16) -> Option<Vec<u8>> {
        self.nlas.iter().find_map(|nla| match nla {
            // A nested attribute's kind carries NLA_F_NESTED.
            Nla::Other(attribute) if attribute.kind() & NLA_TYPE_MASK == kind => {
                let mut value = vec![0; attribute.value_len()];
                attribute.emit_value(&mut value);
                Some(value)
            }
            _ => None,
        })
    }
}

/// Attributes of a dumped socket (linux/inet_diag.h, linux/sock_diag.h).
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;

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
    send(socket, &message(request, NLM_F_REQUEST | NLM_F_ACK, &[]))?;
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

/// A netlink message of `payload` followed by `attributes`.
fn message<T: NetlinkSerializable + std::fmt::Debug>(
    payload: T,
    flags: u16,
    attributes: &[u8],
) -> Vec<u8>
where
    NetlinkPayload<T>: From<T>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    buffer.extend_from_slice(attributes);
    // nlmsg_len, the header's first field, counts the attributes too.
    let length = buffer.len() as u32;
    buffer[..4].copy_from_slice(&length.to_ne_bytes());
    buffer
}

fn send(socket: &mut Socket, message: &[u8]) -> Result<(), CloseError> {
    socket
        .send(message, 0)
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
    use crate::datapath::translation_bytes;

    const CGROUP: u64 = 7;
    const A: &str = "10.96.0.10:53";
    const B: &str = "10.96.0.11:53";
    const B1: &str = "10.244.1.1:5353";
    const B2: &str = "10.244.1.2:5353";

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Service `vip` lost `backend`, which `in_no_service` says whether
    /// any service still has.
    fn lost(protocol: u8, vip: &str, backend: &str, in_no_service: bool) -> Removals {
        let mut removals = Removals::default();
        removals.dropped.insert(DroppedBackend {
            protocol,
            vip: addr(vip),
            backend: addr(backend),
        });
        if in_no_service {
            removals.unused.insert(RemovedBackend {
                protocol,
                addr: addr(backend),
            });
        }
        removals
    }

    /// A dumped v4 socket connected to `peer`.
    fn socket_to(peer: &str) -> SocketId {
        let peer = addr(peer);
        SocketId {
            destination_address: peer.ip(),
            destination_port: peer.port(),
            ..SocketId::new_v4()
        }
    }

    /// The attributes of a socket opened in `cgroup` and, if given,
    /// translated from the VIP to the backend, as the kernel nests them.
    fn attributes(cgroup: u64, translation: Option<(&str, &str)>) -> Vec<Nla> {
        let mut nlas = vec![Nla::Other(DefaultNla::new(
            INET_DIAG_CGROUP_ID,
            cgroup.to_ne_bytes().to_vec(),
        ))];
        if let Some((vip, backend)) = translation {
            let map_id = DefaultNla::new(2, 42u32.to_ne_bytes().to_vec());
            let value = DefaultNla::new(
                SK_DIAG_BPF_STORAGE_MAP_VALUE,
                translation_bytes(&addr(vip), &addr(backend)),
            );
            let storage = DefaultNla::new(
                SK_DIAG_BPF_STORAGE | NLA_F_NESTED,
                [emitted(&map_id), emitted(&value)].concat(),
            );
            nlas.push(Nla::Other(DefaultNla::new(
                INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED,
                emitted(&storage),
            )));
        }
        nlas
    }

    fn in_scope() -> HashSet<u64> {
        [CGROUP].into()
    }

    /// Whether a socket of `protocol` to `peer` with `nlas` is closed.
    fn closes(
        protocol: u8,
        peer: &SocketId,
        nlas: &[Nla],
        removals: &Removals,
        untranslated: Untranslated,
    ) -> bool {
        Dumped::new(protocol, peer, nlas).is_to_close(removals, untranslated, &in_scope())
    }

    #[test]
    fn a_socket_translated_through_the_service_that_lost_its_backend_is_closed() {
        for (protocol, untranslated) in [
            (IPPROTO_TCP, Untranslated::Direct),
            (IPPROTO_UDP, Untranslated::ByPeer),
        ] {
            for in_no_service in [true, false] {
                let removals = lost(protocol, A, B1, in_no_service);
                let translated = attributes(CGROUP, Some((A, B1)));
                assert!(closes(
                    protocol,
                    &socket_to(B1),
                    &translated,
                    &removals,
                    untranslated
                ));
            }
        }
    }

    #[test]
    fn a_socket_translated_through_a_service_that_keeps_the_backend_stays() {
        let removals = lost(IPPROTO_TCP, A, B1, false);
        let through_b = attributes(CGROUP, Some((B, B1)));
        for untranslated in [Untranslated::Direct, Untranslated::ByPeer] {
            assert!(!closes(
                IPPROTO_TCP,
                &socket_to(B1),
                &through_b,
                &removals,
                untranslated
            ));
        }
    }

    #[test]
    fn a_direct_socket_stays_where_the_dump_shows_translations() {
        let removals = lost(IPPROTO_TCP, A, B1, true);
        let direct = attributes(CGROUP, None);
        assert!(!closes(
            IPPROTO_TCP,
            &socket_to(B1),
            &direct,
            &removals,
            Untranslated::Direct
        ));
        // A translation to another backend than the peer is stale: none.
        let stale = attributes(CGROUP, Some((A, B2)));
        assert!(!closes(
            IPPROTO_TCP,
            &socket_to(B1),
            &stale,
            &removals,
            Untranslated::Direct
        ));
    }

    #[test]
    fn where_translations_are_not_shown_the_peer_in_no_service_decides() {
        let direct = attributes(CGROUP, None);
        assert!(closes(
            IPPROTO_UDP,
            &socket_to(B1),
            &direct,
            &lost(IPPROTO_UDP, A, B1, true),
            Untranslated::ByPeer
        ));
        // Another service still has it.
        assert!(!closes(
            IPPROTO_UDP,
            &socket_to(B1),
            &direct,
            &lost(IPPROTO_UDP, A, B1, false),
            Untranslated::ByPeer
        ));
        // An AF_INET6 socket shows a v4 peer as v4-mapped.
        let mapped = SocketId {
            destination_address: "::ffff:10.244.1.1".parse().unwrap(),
            destination_port: 5353,
            ..SocketId::new_v6()
        };
        assert!(closes(
            IPPROTO_UDP,
            &mapped,
            &direct,
            &lost(IPPROTO_UDP, A, B1, true),
            Untranslated::ByPeer
        ));
    }

    #[test]
    fn a_socket_to_a_live_backend_stays() {
        let removals = lost(IPPROTO_UDP, A, B1, true);
        for untranslated in [Untranslated::Direct, Untranslated::ByPeer] {
            for (peer, translation) in [(B2, Some((A, B2))), (B2, None), ("10.244.1.1:5354", None)]
            {
                let nlas = attributes(CGROUP, translation);
                assert!(
                    !closes(
                        IPPROTO_UDP,
                        &socket_to(peer),
                        &nlas,
                        &removals,
                        untranslated
                    ),
                    "{peer} {translation:?}"
                );
            }
            // The same endpoint over the other protocol is another backend.
            let nlas = attributes(CGROUP, Some((A, B1)));
            assert!(!closes(
                IPPROTO_TCP,
                &socket_to(B1),
                &nlas,
                &removals,
                untranslated
            ));
        }
    }

    #[test]
    fn a_socket_of_another_cgroup_stays() {
        let removals = lost(IPPROTO_UDP, A, B1, true);
        let elsewhere = attributes(CGROUP + 1, Some((A, B1)));
        assert!(!closes(
            IPPROTO_UDP,
            &socket_to(B1),
            &elsewhere,
            &removals,
            Untranslated::ByPeer
        ));
        // A kernel before 5.7 says no cgroup: the rest decides.
        assert!(closes(
            IPPROTO_UDP,
            &socket_to(B1),
            &[],
            &removals,
            Untranslated::ByPeer
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
