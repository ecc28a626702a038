//! socklb's cgroup `sock_addr` programs.
//!
//! Forward hooks (connect4/6, sendmsg4/6) rewrite a service VIP:port to a
//! backend once per connection (per datagram for unconnected UDP) and
//! remember the translation in the socket's own storage (`CONNECTED_VIP`,
//! `DATAGRAM_VIPS`), which the kernel frees with the socket: nothing evicts
//! a live socket's translation. Reverse hooks (recvmsg4/6, getpeername4/6)
//! use it to show the application the VIP it asked for. getsockname4/6 hide
//! a loopback local address that only exists because the backend is
//! loopback (see `local_view`).
//!
//! Each kind of hook has one body for both families (`forward`, `reverse`,
//! `local_address`); each entry point names its `Family` as a constant, so
//! after inlining the v4 and v6 programs are the ones separate v4 and v6
//! functions gave, instruction for instruction.
//!
//! A destination that is not a service VIP costs one hash lookup (`VIPS`,
//! keyed by the address alone); a cluster VIP on a port that is no service
//! port is refused with ECONNREFUSED, as kube-proxy's nftables mode rejects
//! it, while such a port of an external VIP (`VIP_EXTERNAL`: an
//! externalIP or LoadBalancer IP) passes untouched.
//!
//! Each forward hook has a traced twin (`traced_connect4`, ...), the same
//! body that also writes each decision to the `TRACE_EVENTS` ring buffer,
//! at most `per_cpu_per_second` a second on each CPU, the rest counted as
//! dropped (`TRACE_BUDGET`). The agent swaps the twins into the hooks'
//! links only while a tracer is attached, so without one no tracing code
//! runs: even a flag read cost a no-VIP connect4 ~30 ns, a cache line the
//! path touches for nothing else. Every decision on a VIP destination is
//! counted, traced or not: a translation or a refusal for no endpoints in
//! its service's `SERVICE_COUNTERS`, the rest by verdict in `DECISIONS`
//! (a counter of its own cost a VIP connect4 ~3%).
//!
//! Raw access (context fields, map lookups, helpers) lives in `access`;
//! the logic here is safe Rust.
#![no_std]
#![no_main]

mod access;

use access::{
    Family, SockAddr, Storage, current_ancestor_cgroup_id, current_cgroup_id, hash_get,
    lru_get_mut, monotonic_ns, per_cpu_mut, random_u32, set_syscall_error,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::SockAddrContext,
};
use socklb_common::{
    AFFINITY_ENTRIES, Addr, Affinity, AffinityKey, BackendSlotKey, DECISION_KINDS, DatagramVips,
    Endpoint, GUEST_ADDR_V4, GUEST_ADDR_V6, MAX_BACKEND_SLOTS, MAX_CGROUP_LEVELS,
    MAX_OPT_OUT_CGROUPS, MAX_SERVICES, MAX_VIPS, MemberKey, PROTO_UDP, ServiceCounters,
    ServiceEntry, ServiceEntryKey, TRACE_HOOK_CONNECT4, TRACE_HOOK_CONNECT6, TRACE_HOOK_SENDMSG4,
    TRACE_HOOK_SENDMSG6, TRACE_PASSED_EXTERNAL_PORT, TRACE_PASSED_NOT_A_VIP,
    TRACE_PASSED_OPTED_OUT, TRACE_REFUSED_NO_ENDPOINTS, TRACE_REFUSED_UNKNOWN_PORT,
    TRACE_RING_BYTES, TRACE_TRANSLATED, TraceBudget, TraceConfig, TraceEvent, Translation,
    VIP_EXTERNAL, is_loopback, is_v4_mapped,
};

// Services are rewritten by user space while programs read them: without
// preallocation a replaced element is freed only after an RCU grace period,
// so a reader never sees it reused.
#[map]
static SERVICES: HashMap<ServiceEntryKey, ServiceEntry> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);
/// Every VIP of `SERVICES`, with its kind (`VIP_CLUSTER`, `VIP_EXTERNAL`):
/// the prefilter that lets a non-VIP destination pass after one lookup of
/// a 16-byte key.
#[map]
static VIPS: HashMap<Addr, u8> = HashMap::pinned(MAX_VIPS, BPF_F_NO_PREALLOC);
#[map]
static BACKEND_SLOTS: HashMap<BackendSlotKey, Endpoint> =
    HashMap::pinned(MAX_BACKEND_SLOTS, BPF_F_NO_PREALLOC);
#[map]
static MEMBERS: HashMap<MemberKey, u8> = HashMap::pinned(MAX_BACKEND_SLOTS, BPF_F_NO_PREALLOC);
/// ClientIP affinity: the backend a client namespace last used per service.
#[map]
static AFFINITY: LruHashMap<AffinityKey, Affinity> = LruHashMap::pinned(AFFINITY_ENTRIES, 0);
/// The translation of a connected socket (TCP, connected UDP). Pinned by
/// name: a later agent adopts the map, and with it the translations of
/// sockets opened before it started.
#[btf_map(pin_by_name)]
static CONNECTED_VIP: SkStorage<Translation> = SkStorage::new();
/// The translations of an unconnected UDP socket, one per VIP.
#[btf_map(pin_by_name)]
static DATAGRAM_VIPS: SkStorage<DatagramVips> = SkStorage::new();
#[map]
static SERVICE_COUNTERS: PerCpuArray<ServiceCounters> = PerCpuArray::pinned(MAX_SERVICES, 0);
/// Cgroup ids (the value is unused) whose processes' sockets, and those of
/// their descendants, are left untranslated.
#[map]
static OPT_OUT_CGROUPS: HashMap<u64, u8> = HashMap::pinned(MAX_OPT_OUT_CGROUPS, BPF_F_NO_PREALLOC);
/// Entries in `OPT_OUT_CGROUPS`, so a VIP connect skips the ancestor walk
/// while there are none.
#[map]
static OPT_OUT_COUNT: Array<u32> = Array::pinned(1, 0);
/// The guest's own addresses (v4-mapped, v6), all-zero when unknown.
#[map]
static GUEST_ADDRS: Array<Addr> = Array::pinned(2, 0);
/// Decisions for a tracer (see the top of this file). Not pinned: each
/// agent's programs trace to their own, and a tracer of an agent that
/// stopped is gone with it.
#[map]
static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);
#[map]
static TRACE_CONFIG: Array<TraceConfig> = Array::with_max_entries(1, 0);
#[map]
static TRACE_BUDGET: PerCpuArray<TraceBudget> = PerCpuArray::with_max_entries(1, 0);
/// Decisions on VIP destinations that no service's counters count (opted
/// out, a port no service has), per CPU, indexed by their `TRACE_*`
/// verdict. Not pinned: counters start again with each agent, as a
/// process's do.
#[map]
static DECISIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECISION_KINDS, 0);

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const NS_PER_SEC: u64 = 1_000_000_000;

/// What a forward hook does, and what a tracer is told of it. Every field
/// is set on every path: a value the compiler may leave unset on one
/// (an enum's payload) is a register the verifier refuses to read.
struct Verdict {
    /// `TRACE_*`: translated, refused or passed, and why.
    reason: u8,
    /// The backend (translated only; else zero).
    backend: Endpoint,
}

impl Verdict {
    /// Refused or passed, for `reason`.
    #[inline(always)]
    fn without_backend(reason: u8) -> Verdict {
        Verdict {
            reason,
            backend: Endpoint::default(),
        }
    }

    #[inline(always)]
    fn translate(backend: Endpoint) -> Verdict {
        Verdict {
            reason: TRACE_TRANSLATED,
            backend,
        }
    }
}

/// What a forward hook translates. Each hook names a constant, so after
/// inlining no branch is left.
#[derive(Clone, Copy)]
enum Forward {
    /// A connect (TCP, or UDP becoming connected): the socket's one
    /// translation, in `CONNECTED_VIP`.
    Connect,
    /// A datagram of an unconnected UDP socket (sendmsg): one of its
    /// translations per VIP, in `DATAGRAM_VIPS`.
    UnconnectedDatagram,
}

/// Whether a forward hook writes its decisions for a tracer; like
/// `Forward`, a constant of each program.
#[derive(Clone, Copy)]
enum Tracing {
    Off,
    On,
}

/// Which translations a reverse hook looks in; like `Forward`, a constant
/// of each hook.
#[derive(Clone, Copy)]
enum Lookup {
    /// The connect's translation alone (getpeername, getsockname).
    Connected,
    /// The connect's translation while the socket is still connected to
    /// that peer, then its unconnected ones (recvmsg).
    Datagrams,
}

#[cgroup_sock_addr(connect4)]
pub(crate) fn lb_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, Forward::Connect, Tracing::Off)
}

#[cgroup_sock_addr(connect6)]
pub(crate) fn lb_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V6, Forward::Connect, Tracing::Off)
}

// The kernel runs sendmsg hooks only for datagrams that carry a destination,
// that is, on unconnected UDP sockets.
#[cgroup_sock_addr(sendmsg4)]
pub(crate) fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, Forward::UnconnectedDatagram, Tracing::Off)
}

#[cgroup_sock_addr(sendmsg6)]
pub(crate) fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V6, Forward::UnconnectedDatagram, Tracing::Off)
}

// The traced twins. Names fit the kernel's 15 characters.
#[cgroup_sock_addr(connect4)]
pub(crate) fn traced_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, Forward::Connect, Tracing::On)
}

#[cgroup_sock_addr(connect6)]
pub(crate) fn traced_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V6, Forward::Connect, Tracing::On)
}

#[cgroup_sock_addr(sendmsg4)]
pub(crate) fn traced_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, Forward::UnconnectedDatagram, Tracing::On)
}

#[cgroup_sock_addr(sendmsg6)]
pub(crate) fn traced_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V6, Forward::UnconnectedDatagram, Tracing::On)
}

#[cgroup_sock_addr(recvmsg4)]
pub(crate) fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4, Lookup::Datagrams)
}

#[cgroup_sock_addr(recvmsg6)]
pub(crate) fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6, Lookup::Datagrams)
}

#[cgroup_sock_addr(getpeername4)]
pub(crate) fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4, Lookup::Connected)
}

#[cgroup_sock_addr(getpeername6)]
pub(crate) fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6, Lookup::Connected)
}

#[cgroup_sock_addr(getsockname4)]
pub(crate) fn lb_getsockname4(ctx: SockAddrContext) -> i32 {
    local_address(&ctx, Family::V4)
}

#[cgroup_sock_addr(getsockname6)]
pub(crate) fn lb_getsockname6(ctx: SockAddrContext) -> i32 {
    local_address(&ctx, Family::V6)
}

/// connect and sendmsg: a VIP destination becomes a backend, or the call
/// is refused.
#[inline(always)]
fn forward(ctx: &SockAddrContext, family: Family, forward: Forward, tracing: Tracing) -> i32 {
    let sa = &SockAddr::new(ctx);
    let dst = sa.user_endpoint(family);
    let hook = match (forward, family) {
        (Forward::Connect, Family::V4) => TRACE_HOOK_CONNECT4,
        (Forward::Connect, Family::V6) => TRACE_HOOK_CONNECT6,
        (Forward::UnconnectedDatagram, Family::V4) => TRACE_HOOK_SENDMSG4,
        (Forward::UnconnectedDatagram, Family::V6) => TRACE_HOOK_SENDMSG6,
    };
    // Most destinations are no VIP: their path stays the shortest, with
    // no verdict built unless a tracer wants it.
    let Some(vip_kind) = hash_get(&VIPS, &dst.addr) else {
        untranslated(sa, &dst, forward);
        if let Some(config) = tracer_wanting(tracing, true) {
            trace(
                sa,
                config,
                hook,
                &dst,
                &Verdict::without_backend(TRACE_PASSED_NOT_A_VIP),
            );
        }
        return ALLOW;
    };
    let verdict = translate(sa, &dst, forward, vip_kind);
    if let Some(config) = tracer_wanting(tracing, false) {
        trace(sa, config, hook, &dst, &verdict);
    }
    match verdict.reason {
        TRACE_TRANSLATED => {
            sa.set_user_endpoint(family, &verdict.backend);
            ALLOW
        }
        TRACE_REFUSED_NO_ENDPOINTS | TRACE_REFUSED_UNKNOWN_PORT => refuse(),
        _ => ALLOW,
    }
}

/// The tracers' settings if this program traces and they want this
/// decision (`not_a_vip`: a destination that is no VIP, which only some
/// want).
#[inline(always)]
fn tracer_wanting(tracing: Tracing, not_a_vip: bool) -> Option<&'static TraceConfig> {
    if matches!(tracing, Tracing::Off) {
        return None;
    }
    let config = TRACE_CONFIG.get(0)?;
    (!not_a_vip || config.passes != 0).then_some(config)
}

/// Writes `verdict` for the attached tracer if this CPU's rate allows;
/// else counts it as dropped.
#[inline(always)]
fn trace(sa: &SockAddr, config: &TraceConfig, hook: u8, dst: &Endpoint, verdict: &Verdict) {
    let Some(budget) = per_cpu_mut(&TRACE_BUDGET, 0) else {
        return;
    };
    let now = monotonic_ns();
    if now.wrapping_sub(budget.window_ns) >= NS_PER_SEC {
        budget.window_ns = now;
        budget.written = 0;
    }
    if budget.written >= u64::from(config.per_cpu_per_second) {
        budget.dropped += 1;
        return;
    }
    let event = TraceEvent {
        time_ns: now,
        cgroup_id: current_cgroup_id(),
        dst: *dst,
        backend: verdict.backend,
        hook,
        proto: sa.protocol(),
        verdict: verdict.reason,
        _pad: [0; 5],
    };
    match TRACE_EVENTS.output(&event, 0) {
        Ok(()) => budget.written += 1,
        // The ring is full: the tracer reads slower than connects come.
        Err(_) => budget.dropped += 1,
    }
}

/// Fails the connect or sendmsg with ECONNREFUSED, as kube-proxy's REJECT.
#[inline(always)]
fn refuse() -> i32 {
    set_syscall_error(ECONNREFUSED);
    DENY
}

/// A destination that is a VIP (of `vip_kind`): its backend, a refusal,
/// or left alone.
#[inline(always)]
fn translate(sa: &SockAddr, dst: &Endpoint, forward: Forward, vip_kind: u8) -> Verdict {
    if opted_out() {
        untranslated(sa, dst, forward);
        return uncounted(TRACE_PASSED_OPTED_OUT);
    }
    let key = ServiceEntryKey {
        vip: dst.addr,
        port: dst.port,
        proto: sa.protocol(),
        _pad: 0,
    };
    // A known VIP on a port (or protocol) no service has: refused on a
    // cluster VIP, left alone on an external one (a node's own address
    // keeps its SSH, kubelet and NodePorts).
    let Some(service) = hash_get(&SERVICES, &key) else {
        if vip_kind == VIP_EXTERNAL {
            untranslated(sa, dst, forward);
            return uncounted(TRACE_PASSED_EXTERNAL_PORT);
        }
        return uncounted(TRACE_REFUSED_UNKNOWN_PORT);
    };
    let backend = match forward {
        Forward::Connect => connected_backend(sa, dst, &key, &service),
        Forward::UnconnectedDatagram => datagram_backend(sa, dst, &key, &service),
    };
    let Some(backend) = backend else {
        count(service.id, |c| c.rejects += 1);
        return Verdict::without_backend(TRACE_REFUSED_NO_ENDPOINTS);
    };
    count(service.id, |c| c.translations += 1);
    Verdict::translate(backend)
}

/// The verdict of a decision no service's counters count (opted out, a
/// port no service has), counted in `DECISIONS` by `reason`.
#[inline(always)]
fn uncounted(reason: u8) -> Verdict {
    if let Some(count) = per_cpu_mut(&DECISIONS, u32::from(reason)) {
        *count += 1;
    }
    Verdict::without_backend(reason)
}

/// A destination left as it is. A UDP socket connected again, elsewhere,
/// drops its earlier translation, which no longer describes its peer.
#[inline(always)]
fn untranslated(sa: &SockAddr, dst: &Endpoint, forward: Forward) {
    if matches!(forward, Forward::Connect)
        && sa.protocol() == PROTO_UDP
        && sa
            .storage(&CONNECTED_VIP, Storage::Existing)
            .is_some_and(|translation| translation.backend != *dst)
    {
        // A destination that is the socket's backend is the rewrite of an
        // earlier program of this same datapath (during an in-place
        // upgrade both agents' programs run for a moment), not a new peer.
        sa.forget_storage(&CONNECTED_VIP);
    }
}

/// The backend of a connect, remembered as the socket's one translation.
#[inline(always)]
fn connected_backend(
    sa: &SockAddr,
    dst: &Endpoint,
    key: &ServiceEntryKey,
    service: &ServiceEntry,
) -> Option<Endpoint> {
    let backend = choose_backend(sa, key, service)?;
    match sa.storage(&CONNECTED_VIP, Storage::Create) {
        Some(translation) => *translation = Translation { vip: *dst, backend },
        // The reverse hooks will show this socket the backend, not the VIP.
        None => count(service.id, |c| c.insert_failures += 1),
    }
    Some(backend)
}

/// The backend of a datagram: the one this socket already uses for `dst`
/// while it is a member, else a new choice that replaces the translation
/// remembered longest ago.
#[inline(always)]
fn datagram_backend(
    sa: &SockAddr,
    dst: &Endpoint,
    key: &ServiceEntryKey,
    service: &ServiceEntry,
) -> Option<Endpoint> {
    let Some(vips) = sa.storage(&DATAGRAM_VIPS, Storage::Create) else {
        count(service.id, |c| c.insert_failures += 1);
        return choose_backend(sa, key, service);
    };
    let mut slot = vips.next;
    for (index, translation) in vips.translations.iter().enumerate() {
        if translation.vip == *dst {
            if is_member(service.id, &translation.backend) {
                vips.latest = index as u32;
                if vips.latest == vips.next {
                    // The busiest VIP is not the next to be replaced.
                    vips.next = (vips.next + 1) % vips.translations.len() as u32;
                }
                return Some(translation.backend);
            }
            slot = index as u32;
        }
    }
    let backend = choose_backend(sa, key, service)?;
    let translation = Translation { vip: *dst, backend };
    // `slot` is below DATAGRAM_VIPS_PER_SOCKET; `get_mut` keeps the
    // verifier from having to prove it.
    if let Some(entry) = vips.translations.get_mut(slot as usize) {
        *entry = translation;
        vips.latest = slot;
        if slot == vips.next {
            vips.next = (slot + 1) % vips.translations.len() as u32;
        }
    }
    Some(backend)
}

#[inline(always)]
fn is_member(service_id: u32, backend: &Endpoint) -> bool {
    let member = MemberKey {
        service_id,
        backend: *backend,
    };
    hash_get(&MEMBERS, &member).is_some()
}

/// Whether the calling process's cgroup, or one above it, opted out.
#[inline(always)]
fn opted_out() -> bool {
    if OPT_OUT_COUNT.get(0).is_none_or(|count| *count == 0) {
        return false;
    }
    for level in 0..MAX_CGROUP_LEVELS {
        // 0 once `level` is below the process's own cgroup.
        let id = current_ancestor_cgroup_id(level);
        if id == 0 {
            return false;
        }
        if hash_get(&OPT_OUT_CGROUPS, &id).is_some() {
            return true;
        }
    }
    false
}

/// Under ClientIP affinity, the backend this client namespace used last if
/// it is still fresh and a member; else (and without affinity) a random one.
#[inline(always)]
fn choose_backend(
    sa: &SockAddr,
    key: &ServiceEntryKey,
    service: &ServiceEntry,
) -> Option<Endpoint> {
    if service.backend_count == 0 {
        return None;
    }
    if service.affinity_timeout_secs == 0 {
        return random_backend(key, service);
    }
    let affinity_key = AffinityKey {
        netns_cookie: sa.netns_cookie(),
        service_id: service.id,
        _pad: 0,
    };
    let now = monotonic_ns();
    if let Some(affinity) = lru_get_mut(&AFFINITY, &affinity_key) {
        let timeout_ns = u64::from(service.affinity_timeout_secs) * NS_PER_SEC;
        let fresh = now.wrapping_sub(affinity.last_used_ns) <= timeout_ns;
        if fresh && is_member(service.id, &affinity.backend) {
            // kube-proxy's `recent` match restarts the timeout on every use.
            affinity.last_used_ns = now;
            return Some(affinity.backend);
        }
    }
    let backend = random_backend(key, service)?;
    let affinity = Affinity {
        backend,
        _pad: 0,
        last_used_ns: now,
    };
    if AFFINITY.insert(&affinity_key, &affinity, 0).is_err() {
        // The next connect or datagram chooses afresh.
        count(service.id, |c| c.insert_failures += 1);
    }
    Some(backend)
}

#[inline(always)]
fn random_backend(key: &ServiceEntryKey, service: &ServiceEntry) -> Option<Endpoint> {
    if let Some(backend) = backend_in_slot(service) {
        return Some(backend);
    }
    // The service shrank between reading its entry and its slot (the agent
    // removes surplus slots after writing the entry): re-read it once.
    let service = hash_get(&SERVICES, key)?;
    backend_in_slot(&service)
}

#[inline(always)]
fn backend_in_slot(service: &ServiceEntry) -> Option<Endpoint> {
    let index = random_u32().checked_rem(service.backend_count)?;
    let slot = BackendSlotKey {
        service_id: service.id,
        slot: index + 1,
    };
    hash_get(&BACKEND_SLOTS, &slot)
}

#[inline(always)]
fn count(service_id: u32, bump: impl FnOnce(&mut ServiceCounters)) {
    if let Some(counters) = per_cpu_mut(&SERVICE_COUNTERS, service_id) {
        bump(counters);
    }
}

/// The VIP endpoint the application asked for, if this socket was
/// translated to `peer`: its connect's translation, or with
/// `Lookup::Datagrams` (recvmsg, of the hook's `family`) one of its
/// unconnected translations, the latest first.
#[inline(always)]
fn original_vip(
    sa: &SockAddr,
    peer: &Endpoint,
    lookup: Lookup,
    family: Family,
) -> Option<Endpoint> {
    if let Some(translation) = sa.storage(&CONNECTED_VIP, Storage::Existing)
        && translation.backend == *peer
        // A UDP socket disconnected (AF_UNSPEC, or closed under it) keeps
        // its storage but is no longer connected to the backend.
        && (matches!(lookup, Lookup::Connected)
            || sa
                .socket_peer(family)
                .is_some_and(|(addr, port)| addr == peer.addr && port == peer.port))
    {
        return Some(translation.vip);
    }
    if matches!(lookup, Lookup::Connected) {
        return None;
    }
    let vips = sa.storage(&DATAGRAM_VIPS, Storage::Existing)?;
    if let Some(latest) = vips.translations.get(vips.latest as usize)
        && latest.backend == *peer
    {
        return Some(latest.vip);
    }
    vips.translations
        .iter()
        .find(|translation| translation.backend == *peer)
        .map(|translation| translation.vip)
}

/// recvmsg and getpeername: a translated peer is shown as its VIP.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: Family, lookup: Lookup) -> i32 {
    let sa = &SockAddr::new(ctx);
    let peer = sa.user_endpoint(family);
    if let Some(vip) = original_vip(sa, &peer, lookup, family) {
        sa.set_user_endpoint(family, &vip);
    }
    ALLOW
}

/// getsockname: shows `local_view` of the socket's local address.
#[inline(always)]
fn local_address(ctx: &SockAddrContext, family: Family) -> i32 {
    let sa = &SockAddr::new(ctx);
    let local = sa.user_addr(family);
    if let Some(shown) = local_view(sa, &local, family) {
        sa.set_user_addr(family, &shown);
    }
    ALLOW
}

/// What getsockname should show instead of `local`, if anything.
///
/// A socket translated from a VIP to a backend local to the guest gets its
/// local address from routing towards that backend: loopback for a
/// loopback backend, the backend's own address for another local one.
/// Either is an address the application never asked for and could not have
/// had towards the VIP; it is shown the guest's own address of that family
/// instead, the address it would have had with kube-proxy. Every other
/// local address (and any socket not translated) is shown as it is.
#[inline(always)]
fn local_view(sa: &SockAddr, local: &Addr, family: Family) -> Option<Addr> {
    let (peer_addr, peer_port) = sa.socket_peer(family)?;
    let peer = Endpoint {
        addr: peer_addr,
        port: peer_port,
        _pad: 0,
    };
    if !is_loopback(local) && *local != peer.addr {
        return None;
    }
    let vip = original_vip(sa, &peer, Lookup::Connected, family)?;
    if is_loopback(&vip.addr) {
        return None;
    }
    let index = if is_v4_mapped(local) {
        GUEST_ADDR_V4
    } else {
        GUEST_ADDR_V6
    };
    let guest = *GUEST_ADDRS.get(index)?;
    (guest != [0; 4]).then_some(guest)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
