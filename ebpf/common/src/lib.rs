//! Map layouts shared by the socklb eBPF programs and user space.
//!
//! Every type here is `#[repr(C)]` without implicit padding, so the kernel,
//! the programs and the agent agree on each byte. Addresses are four 32-bit
//! words in network byte order, as the kernel hands them to `sock_addr`
//! programs; IPv4 is stored v4-mapped (`::ffff:a.b.c.d`), so one key serves
//! AF_INET sockets and AF_INET6 sockets that use v4-mapped destinations.
#![no_std]

/// An IPv6 or v4-mapped IPv4 address: four words in network byte order.
pub type Addr = [u32; 4];

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Capacity of `SERVICES`: service keys (VIP, port, protocol).
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of `VIPS`: every service may have a VIP of its own.
pub const MAX_VIPS: u32 = MAX_SERVICES;
/// Capacity of the backend slots, summed over all services.
pub const MAX_BACKEND_SLOTS: u32 = 262_144;
/// Capacity of `OPT_OUT_CGROUPS`: cgroups whose sockets are left
/// untranslated (a sidecar-meshed container, a debugging shell).
pub const MAX_OPT_OUT_CGROUPS: u32 = 1_024;
/// Ancestor levels (the root is level 0) checked against `OPT_OUT_CGROUPS`:
/// an opted-out cgroup deeper than this is not seen.
pub const MAX_CGROUP_LEVELS: i32 = 16;
/// ClientIP affinity choices remembered (`AFFINITY`): one per client
/// network namespace and affinity service. A Kata guest runs one pod, so
/// this is about the affinity services times the pod's namespaces; past it
/// the least recently used choice is forgotten and chosen afresh.
pub const AFFINITY_ENTRIES: u32 = 65_536;
/// VIPs one unconnected UDP socket remembers a backend for at once; a
/// further VIP replaces the one remembered longest ago, or the next one
/// when that is the VIP the socket keeps sending to.
pub const DATAGRAM_VIPS_PER_SOCKET: usize = 4;

/// The third word of a v4-mapped address (`0000:ffff` in network byte order).
pub const V4_MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);

/// Converts an IPv4 address word (network byte order) to its v4-mapped form.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Whether `addr` is a v4-mapped IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// Whether `addr` is a loopback address (`127.0.0.0/8` v4-mapped, or `::1`).
#[inline(always)]
pub const fn is_loopback(addr: &Addr) -> bool {
    if is_v4_mapped(addr) {
        // The first octet is the lowest-addressed byte of the word.
        u32::from_be(addr[3]) >> 24 == 127
    } else {
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_be(1)
    }
}

/// An address and a port: a backend, or the VIP a translated socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Endpoint {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceEntryKey {
    pub vip: Addr,
    /// Network byte order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `SERVICES`: the service's master entry. Its backends sit in
/// `BACKEND_SLOTS` under `(id, 1..=backend_count)`; the agent writes those
/// slots before this entry and removes surplus slots after it, so a
/// concurrent lookup always sees a complete set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceEntry {
    /// Agent-assigned, below `MAX_SERVICES`; indexes `SERVICE_COUNTERS`.
    pub id: u32,
    /// 0: connect and sendmsg are refused with ECONNREFUSED.
    pub backend_count: u32,
    /// ClientIP session affinity; 0 = none.
    pub affinity_timeout_secs: u32,
    /// `SERVICE_EXTERNAL_VIP`, or 0 (as agents before API 1.4 wrote).
    pub flags: u32,
}

/// In `ServiceEntry::flags`: the service's VIP is an externalIP or a
/// LoadBalancer IP (see `VIP_EXTERNAL`); without it, a clusterIP.
pub const SERVICE_EXTERNAL_VIP: u32 = 1;

/// The value of `VIPS` for a cluster VIP: a port of it that no service has
/// is refused with ECONNREFUSED (agents before API 1.4 wrote 1 for every
/// VIP, which reads as this).
pub const VIP_CLUSTER: u8 = 1;
/// The value of `VIPS` for a VIP that is only an externalIP or a
/// LoadBalancer IP (often a node's own address): a port of it that no
/// service has passes untouched, as kube-proxy intercepts only the listed
/// IP:port.
pub const VIP_EXTERNAL: u8 = 2;

/// Key of `BACKEND_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendSlotKey {
    pub service_id: u32,
    /// 1..=backend_count.
    pub slot: u32,
}

/// Key of `MEMBERS`: present while `backend` belongs to the service, so a
/// remembered choice can be checked in one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MemberKey {
    pub service_id: u32,
    pub backend: Endpoint,
}

/// Key of `AFFINITY`: every socket of a pod shares its IP and network
/// namespace, so the namespace's cookie stands for kube-proxy's client IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Affinity {
    pub backend: Endpoint,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last connection that used it.
    pub last_used_ns: u64,
}

/// A translation one socket remembers: the VIP endpoint the application
/// asked for and the backend it was sent to. All zero when unused (no VIP
/// is `[::]:0`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Translation {
    pub vip: Endpoint,
    pub backend: Endpoint,
}

/// Value of `DATAGRAM_VIPS` (socket-local storage of unconnected UDP
/// sockets): a backend per VIP the socket sends to, so its datagrams to one
/// VIP keep one backend and replies show that VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatagramVips {
    pub translations: [Translation; DATAGRAM_VIPS_PER_SOCKET],
    /// The translation of the latest datagram: a reply from a backend that
    /// two remembered VIPs share is shown as this one's VIP.
    pub latest: u32,
    /// The translation a VIP not yet remembered replaces.
    pub next: u32,
}

/// Per-service counters (`SERVICE_COUNTERS`, per CPU, indexed by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCounters {
    /// Connects and datagrams sent to a backend.
    pub translations: u64,
    /// Connects and datagrams refused because the service had no backend.
    pub rejects: u64,
    /// Socket-local storage the kernel could not allocate (the socket is
    /// then shown the backend, not the VIP) and failed inserts into
    /// `AFFINITY` (the next choice is made afresh).
    pub insert_failures: u64,
}

impl ServiceCounters {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &ServiceCounters) {
        self.translations += other.translations;
        self.rejects += other.rejects;
        self.insert_failures += other.insert_failures;
    }

    /// What was counted since `earlier` was read of the same counters.
    pub fn since(&self, earlier: &ServiceCounters) -> ServiceCounters {
        ServiceCounters {
            translations: self.translations.saturating_sub(earlier.translations),
            rejects: self.rejects.saturating_sub(earlier.rejects),
            insert_failures: self.insert_failures.saturating_sub(earlier.insert_failures),
        }
    }
}

/// One decision of a forward hook, written to `TRACE_EVENTS` by the traced
/// programs, attached only while a tracer is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceEvent {
    /// CLOCK_MONOTONIC.
    pub time_ns: u64,
    /// The calling process's cgroup (cgroup v2 id: its directory's inode).
    pub cgroup_id: u64,
    /// The destination the socket asked for.
    pub dst: Endpoint,
    /// The backend it was sent to (`TRACE_TRANSLATED` only). The service
    /// is the one of `dst` and `proto`: no id is needed.
    pub backend: Endpoint,
    /// `TRACE_HOOK_*`.
    pub hook: u8,
    pub proto: u8,
    /// `TRACE_*` verdict.
    pub verdict: u8,
    pub _pad: [u8; 5],
}

/// Hooks that decide (the forward ones), as `TraceEvent::hook`.
pub const TRACE_HOOK_CONNECT4: u8 = 0;
pub const TRACE_HOOK_CONNECT6: u8 = 1;
pub const TRACE_HOOK_SENDMSG4: u8 = 2;
pub const TRACE_HOOK_SENDMSG6: u8 = 3;

/// Verdicts, as `TraceEvent::verdict`.
pub const TRACE_TRANSLATED: u8 = 1;
/// A service with no backend.
pub const TRACE_REFUSED_NO_ENDPOINTS: u8 = 2;
/// A cluster VIP on a port (or protocol) no service has.
pub const TRACE_REFUSED_UNKNOWN_PORT: u8 = 3;
/// A VIP, from an opted-out cgroup.
pub const TRACE_PASSED_OPTED_OUT: u8 = 4;
/// An external VIP on a port no service has (its node's SSH, say).
pub const TRACE_PASSED_EXTERNAL_PORT: u8 = 5;
/// No VIP: written only when a tracer asks (`TraceConfig::passes`).
pub const TRACE_PASSED_NOT_A_VIP: u8 = 6;

/// `TRACE_CONFIG`'s one entry, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceConfig {
    /// Nonzero to write `TRACE_PASSED_NOT_A_VIP` too.
    pub passes: u32,
    /// Events each CPU may write per second; the rest are counted in
    /// `TraceBudget::dropped`.
    pub per_cpu_per_second: u32,
}

/// `TRACE_BUDGET`'s per-CPU entry: the rate limit's window and the events
/// not written.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceBudget {
    /// Start of the current one-second window (CLOCK_MONOTONIC).
    pub window_ns: u64,
    /// Events written in it.
    pub written: u64,
    /// Events not written: past the rate, or the ring buffer full.
    pub dropped: u64,
}

/// Entries of `DECISIONS`: one per verdict code, indexed by it.
pub const DECISION_KINDS: u32 = 8;

/// Bytes of `TRACE_EVENTS` (a power of two pages): 8,192 events.
pub const TRACE_RING_BYTES: u32 = 1 << 19;

/// Indexes of `GUEST_ADDRS`.
pub const GUEST_ADDR_V4: u32 = 0;
pub const GUEST_ADDR_V6: u32 = 1;

/// Map names as the programs declare them (and as they are pinned).
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const VIPS: &str = "VIPS";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const MEMBERS: &str = "MEMBERS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const CONNECTED_VIP: &str = "CONNECTED_VIP";
    pub const DATAGRAM_VIPS: &str = "DATAGRAM_VIPS";
    pub const SERVICE_COUNTERS: &str = "SERVICE_COUNTERS";
    pub const GUEST_ADDRS: &str = "GUEST_ADDRS";
    // The kernel keeps 15 bytes of a map's name.
    pub const OPT_OUT_CGROUPS: &str = "OPT_OUT_CGROUPS";
    pub const OPT_OUT_COUNT: &str = "OPT_OUT_COUNT";
    // Not pinned: each agent's programs trace to their own.
    pub const TRACE_EVENTS: &str = "TRACE_EVENTS";
    pub const TRACE_CONFIG: &str = "TRACE_CONFIG";
    pub const TRACE_BUDGET: &str = "TRACE_BUDGET";
    pub const DECISIONS: &str = "DECISIONS";
}

/// A map's name and the sizes of its key and value: what an agent checks
/// before it adopts a map another agent pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub key_size: usize,
    pub value_size: usize,
}

impl MapLayout {
    const fn of<K, V>(name: &'static str) -> MapLayout {
        MapLayout {
            name,
            key_size: core::mem::size_of::<K>(),
            value_size: core::mem::size_of::<V>(),
        }
    }
}

/// Every map of the programs, with its key and value types. The agent's
/// tests hold the built programs to this list.
pub const MAP_LAYOUTS: [MapLayout; 15] = [
    MapLayout::of::<ServiceEntryKey, ServiceEntry>(map_names::SERVICES),
    MapLayout::of::<Addr, u8>(map_names::VIPS),
    MapLayout::of::<BackendSlotKey, Endpoint>(map_names::BACKEND_SLOTS),
    MapLayout::of::<MemberKey, u8>(map_names::MEMBERS),
    MapLayout::of::<AffinityKey, Affinity>(map_names::AFFINITY),
    // Socket-local storage is keyed by a socket's file descriptor.
    MapLayout::of::<i32, Translation>(map_names::CONNECTED_VIP),
    MapLayout::of::<i32, DatagramVips>(map_names::DATAGRAM_VIPS),
    MapLayout::of::<u32, ServiceCounters>(map_names::SERVICE_COUNTERS),
    MapLayout::of::<u32, Addr>(map_names::GUEST_ADDRS),
    MapLayout::of::<u64, u8>(map_names::OPT_OUT_CGROUPS),
    MapLayout::of::<u32, u32>(map_names::OPT_OUT_COUNT),
    // A ring buffer has neither keys nor values.
    MapLayout::of::<(), ()>(map_names::TRACE_EVENTS),
    MapLayout::of::<u32, TraceConfig>(map_names::TRACE_CONFIG),
    MapLayout::of::<u32, TraceBudget>(map_names::TRACE_BUDGET),
    MapLayout::of::<u32, u64>(map_names::DECISIONS),
];

#[cfg(feature = "user")]
mod pod {
    use super::*;

    /// Map keys and values user space reads and writes as bytes.
    macro_rules! pod {
        ($($type:ty),* $(,)?) => {$(
            // SAFETY: plain `#[repr(C)]` data of integers and arrays of
            // integers, no padding (the layout tests below pin the sizes),
            // no pointers: every bit pattern is a valid value.
            unsafe impl aya::Pod for $type {}
        )*};
    }

    pod!(
        Endpoint,
        ServiceEntryKey,
        ServiceEntry,
        BackendSlotKey,
        MemberKey,
        AffinityKey,
        Affinity,
        ServiceCounters,
        TraceEvent,
        TraceConfig,
        TraceBudget,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Endpoint>(), 20);
        assert_eq!(size_of::<ServiceEntryKey>(), 20);
        assert_eq!(size_of::<ServiceEntry>(), 16);
        assert_eq!(size_of::<BackendSlotKey>(), 8);
        assert_eq!(size_of::<MemberKey>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<Affinity>(), 32);
        assert_eq!(size_of::<Translation>(), 40);
        assert_eq!(size_of::<DatagramVips>(), 168);
        assert_eq!(size_of::<ServiceCounters>(), 24);
        assert_eq!(size_of::<TraceEvent>(), 64);
        assert_eq!(size_of::<TraceConfig>(), 8);
        assert_eq!(size_of::<TraceBudget>(), 24);
    }

    #[test]
    fn address_classes() {
        let v4 = |a: [u8; 4]| v4_mapped(u32::from_ne_bytes(a));
        assert!(is_v4_mapped(&v4([10, 96, 0, 1])));
        assert!(is_loopback(&v4([127, 0, 0, 1])));
        assert!(is_loopback(&v4([127, 1, 2, 3])));
        assert!(!is_loopback(&v4([10, 0, 0, 127])));
        let v6_loopback = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert!(is_loopback(&v6_loopback));
        assert!(!is_v4_mapped(&v6_loopback));
    }
}
