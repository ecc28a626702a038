//! Every `unsafe` of the programs: reads and writes of the `bpf_sock_addr`
//! context and of the socket behind it, map lookups, and helper calls. The
//! hooks' logic (`main.rs`) uses only the safe functions here, as Cilium's
//! `ctx_*` helpers and aya's integration programs keep raw access in one
//! place.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock, bpf_sock_addr},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_set_retval,
    },
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use socklb_common::{Addr, Endpoint, v4_mapped};

/// Whether `SockAddr::storage` makes a value for a socket that has none.
/// Every caller names a constant, so after inlining no branch is left.
#[derive(Clone, Copy)]
pub(crate) enum Storage {
    /// A zeroed value is made if the socket has none (a forward hook about
    /// to remember a translation).
    Create,
    /// Only a value the socket already has (a hook that reads or forgets).
    Existing,
}

/// The address family of a hook: which fields of the context and of its
/// socket hold the addresses. Every caller names a constant, as for
/// `Storage`.
#[derive(Clone, Copy)]
pub(crate) enum Family {
    /// A v4 hook: `user_ip4` and the socket's `dst_ip4`, seen v4-mapped.
    V4,
    /// A v6 hook: `user_ip6` and the socket's `dst_ip6` (a v4 address
    /// reached through an AF_INET6 socket is v4-mapped there already).
    V6,
}

/// The `bpf_sock_addr` a `sock_addr` program was called with.
pub(crate) struct SockAddr<'a> {
    ctx: &'a SockAddrContext,
    sa: *mut bpf_sock_addr,
}

impl<'a> SockAddr<'a> {
    #[inline(always)]
    pub(crate) fn new(ctx: &'a SockAddrContext) -> SockAddr<'a> {
        SockAddr {
            ctx,
            sa: ctx.sock_addr,
        }
    }

    /// The address (v4-mapped for `Family::V4`) and port the hook was
    /// called with: the destination of a connect or sendmsg, the source of
    /// a recvmsg, the peer of getpeername, the local end of getsockname.
    #[inline(always)]
    pub(crate) fn user_endpoint(&self, family: Family) -> Endpoint {
        Endpoint {
            addr: self.user_addr(family),
            port: self.user_port(),
            _pad: 0,
        }
    }

    /// Rewrites what `user_endpoint` read (for `Family::V4`, `endpoint`'s
    /// address is v4-mapped).
    #[inline(always)]
    pub(crate) fn set_user_endpoint(&self, family: Family, endpoint: &Endpoint) {
        self.set_user_addr(family, &endpoint.addr);
        self.set_user_port(endpoint.port);
    }

    /// The address half of `user_endpoint`.
    #[inline(always)]
    pub(crate) fn user_addr(&self, family: Family) -> Addr {
        match family {
            Family::V4 => v4_mapped(self.user_ip4()),
            Family::V6 => self.user_ip6(),
        }
    }

    /// The address half of `set_user_endpoint`.
    #[inline(always)]
    pub(crate) fn set_user_addr(&self, family: Family, addr: &Addr) {
        match family {
            Family::V4 => self.set_user_ip4(addr[3]),
            Family::V6 => self.set_user_ip6(addr),
        }
    }

    /// The IPv4 address (network byte order) of a v4 hook.
    #[inline(always)]
    fn user_ip4(&self) -> u32 {
        // SAFETY: `sa` is the context the kernel passed to this program,
        // valid for its whole run; the verifier checks the field's offset.
        unsafe { (*self.sa).user_ip4 }
    }

    #[inline(always)]
    fn set_user_ip4(&self, ip4: u32) {
        // SAFETY: as in `user_ip4`; user_ip4 is writable in connect4,
        // sendmsg4, recvmsg4, getpeername4 and getsockname4.
        unsafe { (*self.sa).user_ip4 = ip4 }
    }

    /// The IPv6 address of a v6 hook, read one 4-byte word at a time, the
    /// only width the verifier accepts for user_ip6.
    #[inline(always)]
    fn user_ip6(&self) -> Addr {
        // SAFETY: as in `user_ip4`; volatile so the compiler does not merge
        // the four loads into wider ones.
        unsafe {
            [
                (&raw const (*self.sa).user_ip6[0]).read_volatile(),
                (&raw const (*self.sa).user_ip6[1]).read_volatile(),
                (&raw const (*self.sa).user_ip6[2]).read_volatile(),
                (&raw const (*self.sa).user_ip6[3]).read_volatile(),
            ]
        }
    }

    #[inline(always)]
    fn set_user_ip6(&self, addr: &Addr) {
        // SAFETY: as in `user_ip6`, for stores.
        unsafe {
            (&raw mut (*self.sa).user_ip6[0]).write_volatile(addr[0]);
            (&raw mut (*self.sa).user_ip6[1]).write_volatile(addr[1]);
            (&raw mut (*self.sa).user_ip6[2]).write_volatile(addr[2]);
            (&raw mut (*self.sa).user_ip6[3]).write_volatile(addr[3]);
        }
    }

    /// The port, network byte order (the low half of the word).
    #[inline(always)]
    fn user_port(&self) -> u16 {
        // SAFETY: as in `user_ip4`.
        unsafe { (*self.sa).user_port as u16 }
    }

    #[inline(always)]
    fn set_user_port(&self, port: u16) {
        // SAFETY: as in `set_user_ip4`.
        unsafe { (*self.sa).user_port = u32::from(port) }
    }

    /// IPPROTO_TCP or IPPROTO_UDP.
    #[inline(always)]
    pub(crate) fn protocol(&self) -> u8 {
        // SAFETY: as in `user_ip4`.
        unsafe { (*self.sa).protocol as u8 }
    }

    /// The socket's value in the socket-local storage `map` (with
    /// `Storage::Create`, a zeroed one made if it has none). `None` without
    /// a value, or when the kernel cannot allocate one.
    #[inline(always)]
    pub(crate) fn storage<T>(
        &self,
        map: &SkStorage<T>,
        storage: Storage,
    ) -> Option<&'static mut T> {
        // Without an initial value the kernel zeroes a created element.
        let value = match storage {
            Storage::Create => map.get_or_insert_ptr_mut(self.ctx, None),
            Storage::Existing => map.get_ptr_mut(self.ctx),
        };
        // SAFETY: a non-null result is the socket's element of type `T`,
        // valid while the program runs (the syscall holds the socket).
        // Another thread using the same socket at the same moment may race
        // on it, which at worst leaves the other's translation.
        unsafe { value.as_mut() }
    }

    /// Drops the socket's value in `map`, if it has one.
    #[inline(always)]
    pub(crate) fn forget_storage<T>(&self, map: &SkStorage<T>) {
        if let Some(sk) = self.sock() {
            // ENOENT (nothing remembered) is the common case and harmless.
            let _ = map.delete(sk);
        }
    }

    /// The socket the syscall works on.
    #[inline(always)]
    fn sock(&self) -> Option<*mut bpf_sock> {
        // SAFETY: as in `user_ip4`. The verifier types this field
        // PTR_TO_SOCKET (`sock_addr_is_valid_access`), so it is never null
        // in a sock_addr program; the check keeps the accessor safe to call
        // on any context and costs one compare.
        let sk: *mut bpf_sock = unsafe { (*self.sa).__bindgen_anon_1.sk };
        (!sk.is_null()).then_some(sk)
    }

    #[inline(always)]
    pub(crate) fn netns_cookie(&self) -> u64 {
        // SAFETY: the helper takes the program's context, which this is.
        unsafe { bpf_get_netns_cookie(self.ctx.as_ptr()) }
    }

    /// The socket's peer address (v4-mapped for `Family::V4`) and port
    /// (network byte order) as the kernel holds them, or `None` without a
    /// socket.
    #[inline(always)]
    pub(crate) fn socket_peer(&self, family: Family) -> Option<(Addr, u16)> {
        let sk = self.sock()?;
        // SAFETY: `sk` is not null; its fields are read one 4-byte word at a
        // time, the width the verifier accepts for dst_ip6.
        let (addr, port) = unsafe {
            let addr = match family {
                Family::V4 => v4_mapped((*sk).dst_ip4),
                Family::V6 => [
                    (&raw const (*sk).dst_ip6[0]).read_volatile(),
                    (&raw const (*sk).dst_ip6[1]).read_volatile(),
                    (&raw const (*sk).dst_ip6[2]).read_volatile(),
                    (&raw const (*sk).dst_ip6[3]).read_volatile(),
                ],
            };
            (addr, (*sk).dst_port)
        };
        Some((addr, port))
    }
}

/// A copy of the value under `key`.
#[inline(always)]
pub(crate) fn hash_get<K, V: Copy>(map: &HashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: aya marks `get` unsafe because the value may change under the
    // reference; it is copied at once. User space replaces whole entries
    // (no-prealloc maps free a replaced element only after an RCU grace
    // period), so the copy is one entry's value, old or new.
    unsafe { map.get(key) }.copied()
}

/// The value under `key`, to update in place.
#[inline(always)]
pub(crate) fn lru_get_mut<K, V>(map: &LruHashMap<K, V>, key: &K) -> Option<&'static mut V> {
    // SAFETY: the pointer is to the map's element, valid while the program
    // runs (the kernel frees elements only after an RCU grace period). A
    // concurrent writer on another CPU may race on the same field, which
    // only loses one of two timestamps.
    map.get_ptr_mut(key).map(|value| unsafe { &mut *value })
}

/// This CPU's element `index`.
#[inline(always)]
pub(crate) fn per_cpu_mut<T>(map: &PerCpuArray<T>, index: u32) -> Option<&'static mut T> {
    // SAFETY: per-CPU elements are this CPU's alone while the program runs
    // (programs are not preempted on their CPU), so the reference is
    // exclusive; the array never frees elements.
    map.get_ptr_mut(index).map(|value| unsafe { &mut *value })
}

/// The id of the calling process's cgroup ancestor at `level` (0: the
/// root), or 0 when `level` is below its cgroup.
#[inline(always)]
pub(crate) fn current_ancestor_cgroup_id(level: i32) -> u64 {
    // SAFETY: a helper without pointer arguments.
    unsafe { bpf_get_current_ancestor_cgroup_id(level) }
}

/// The id of the calling process's cgroup.
#[inline(always)]
pub(crate) fn current_cgroup_id() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_current_cgroup_id() }
}

#[inline(always)]
pub(crate) fn random_u32() -> u32 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

#[inline(always)]
pub(crate) fn monotonic_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Makes the syscall return `-errno` once the program denies it.
#[inline(always)]
pub(crate) fn set_syscall_error(errno: i32) {
    // SAFETY: a helper without pointer arguments, allowed in cgroup
    // sock_addr programs.
    unsafe { bpf_set_retval(-errno) };
}

// SAFETY: the kernel reads the program's license from this section by its
// symbol; nothing else is named `LICENSE` in the object.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
