//! The agent's lifecycle with real sockets: killed and restarted under
//! load, reloaded, stopped, detached, refusing a bad table, healing an
//! interrupted update, checking the kernel; Stats beside writes.
//! Needs root (CI runs as root); `cargo xtask test` runs these.

use std::{
    os::unix::process::CommandExt as _,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use socklb_tests::{
    Sandbox, agent_bin,
    workload::{backend_counts, errno, now_us, one, start_backends, tcp_backends, web_table},
};

const ENETUNREACH: i64 = 101;

#[test]
fn a_reload_bumps_the_generation() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 2);
    let table = web_table(&sandbox, 1);
    let agent = sandbox.start_agent(Some(&table));
    let runtime = socklb_tests::runtime();
    let mut client = socklb_tests::agent_client(&sandbox.api_addr(), Default::default());
    let (before, _, _) = runtime.block_on(client.list()).expect("list");
    web_table(&sandbox, 2);
    agent.reload();
    let (after, listed, _) = runtime.block_on(client.list()).expect("list");
    assert_eq!(listed.services[0].backends.len(), 2);
    assert_eq!(
        after,
        before + 1,
        "the reloaded table kept generation {before}"
    );
}

#[test]
fn stats_does_not_hold_up_writes() {
    socklb_tests::require_root!();
    use aya::maps::{HashMap, Map, MapData};
    use socklb_common::{Affinity, AffinityKey, map_names};
    use socklb_table::Table;

    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = web_table(&sandbox, 1);
    let _agent = sandbox.start_agent(Some(&table));
    // A full AFFINITY map: what many clients of affinity services leave.
    // Counting it is one syscall per entry.
    let pin = sandbox.bpffs.join("maps").join(map_names::AFFINITY);
    let mut affinity: HashMap<MapData, AffinityKey, Affinity> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(&pin).unwrap())).unwrap();
    for netns_cookie in 0..u64::from(socklb_common::AFFINITY_ENTRIES) {
        let key = AffinityKey {
            netns_cookie,
            ..Default::default()
        };
        affinity.insert(key, Affinity::default(), 0).unwrap();
    }

    // Each call's (start, end) as its client saw it: a write sent and
    // answered while one Stats was outstanding ran during its walk.
    type Span = (Instant, Instant);
    let addr = sandbox.api_addr();
    let stats_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stats_thread = {
        let addr = addr.clone();
        let stats_done = stats_done.clone();
        std::thread::spawn(move || {
            let runtime = socklb_tests::runtime();
            let mut client = socklb_tests::agent_client(&addr, Default::default());
            let mut spans: Vec<Span> = Vec::new();
            for _ in 0..4 {
                let started = Instant::now();
                let stats = runtime.block_on(client.stats()).expect("stats");
                spans.push((started, Instant::now()));
                let affinity = stats.maps.iter().find(|m| m.map == map_names::AFFINITY);
                let affinity = affinity.unwrap();
                assert!(affinity.entries > 60_000, "{affinity:?}");
            }
            stats_done.store(true, std::sync::atomic::Ordering::SeqCst);
            spans
        })
    };
    let runtime = socklb_tests::runtime();
    let mut client = socklb_tests::agent_client(&addr, Default::default());
    let service = Table::parse(&std::fs::read_to_string(&table).unwrap())
        .unwrap()
        .services
        .remove(0);
    let mut writes: Vec<Span> = Vec::new();
    while !stats_done.load(std::sync::atomic::Ordering::SeqCst) {
        let started = Instant::now();
        runtime
            .block_on(client.upsert(vec![service.clone()]))
            .expect("upsert");
        writes.push((started, Instant::now()));
        sleep(Duration::from_millis(1));
    }
    let stats = stats_thread.join().unwrap();
    let took = |(start, end): &Span| end.duration_since(*start);
    // Without a long walk the test proves nothing.
    let shortest = stats.iter().map(took).min().unwrap();
    assert!(
        shortest > Duration::from_millis(50),
        "Stats took {shortest:?}"
    );
    // A Stats that held the table through its walk lets at most one write
    // in before the walk and one out as it ends: every Stats must see more,
    // however slow the machine makes both.
    let during: Vec<usize> = stats
        .iter()
        .map(|(start, end)| {
            writes
                .iter()
                .filter(|(sent, answered)| sent >= start && answered <= end)
                .count()
        })
        .collect();
    assert!(
        during.iter().all(|&writes| writes >= 3),
        "writes sent and answered during each Stats: {during:?} (Stats took {:?})",
        stats.iter().map(took).collect::<Vec<_>>()
    );
}

#[test]
fn agent_killed_and_restarted_while_clients_connect() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 3);
    let table = web_table(&sandbox, 3);
    let mut agent = sandbox.start_agent(Some(&table));
    let client = sandbox.spawn_client(&["tcp-loop", "10.96.0.20:80", "--ms", "4000"]);
    sleep(Duration::from_millis(500));
    agent.signal(Signal::SIGKILL);
    let killed = now_us();
    sleep(Duration::from_millis(700));
    let restarted = now_us();
    let _agent = sandbox.start_agent(Some(&table));
    let results = client.finish();
    let counts = backend_counts(&results);
    assert_eq!(counts.len(), 3, "{counts:?}");
    let without_agent = results
        .iter()
        .filter(|r| (killed..restarted).contains(&r["start_us"].as_u64().unwrap()))
        .count();
    let starts: Vec<u64> = results
        .iter()
        .map(|r| r["start_us"].as_u64().unwrap())
        .collect();
    assert!(
        without_agent > 0,
        "no connection was tried while no agent ran ({killed}..{restarted}): {} results, first {:?} last {:?}",
        results.len(),
        starts.first(),
        starts.last()
    );
}

#[test]
fn a_loopback_backend_is_refused_unless_allowed() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    let table = sandbox.table(
        "t.yaml",
        "services:
  - {name: web, vip: 10.96.0.20, port: 80, backends: [{ip: 10.244.1.1, port: 80}]}
  - {name: sidecar, vip: 10.96.0.21, port: 80, backends: [{ip: 10.244.1.1, port: 80}, {ip: 127.0.0.1, port: 15001}]}",
    );
    let path = table.to_str().unwrap();
    let check = sandbox.agent_once(&["--check", "--table", path]);
    let message = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "{message}");
    assert!(
        message.contains(
            r#"service "sidecar" (10.96.0.21:80/TCP): backends[1].ip: 127.0.0.1 is a loopback address"#
        ),
        "{message}"
    );
    let allowed = sandbox.agent_once(&["--check", "--allow-loopback-backends", "--table", path]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
}

#[test]
fn bad_table_is_refused_and_changes_nothing() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let good = format!(
        "services: [{{name: web, vip: 10.96.0.20, port: 80, backends: [{}]}}]",
        tcp_backends(1)
    );
    let table = sandbox.table("t.yaml", &good);
    let check = sandbox.agent_once(&["--check", "--table", table.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let agent = sandbox.start_agent(Some(&table));
    let bad = "services:
  - {name: web, vip: 10.96.0.20, port: 80, backends: []}
  - {name: dns, vip: 10.96.0.10, port: 53, protocol: SCTP}";
    sandbox.table("t.yaml", bad);
    let check = sandbox.agent_once(&["--check", "--table", table.to_str().unwrap()]);
    let message = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success());
    assert!(
        message.contains(r#"service "dns" (services[1]): protocol: "SCTP""#),
        "{message}"
    );

    nix::sys::signal::kill(agent.pid(), Signal::SIGHUP).unwrap();
    let error = agent
        .next_error(Duration::from_secs(10))
        .expect("the agent reports the bad table");
    assert!(
        error.contains("SCTP") && error.contains("unchanged"),
        "{error}"
    );
    // The first service of the bad table (no backends) was not applied.
    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"],
        "b1"
    );
}

#[test]
fn sigterm_leaves_the_datapath_and_detach_removes_it() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = web_table(&sandbox, 1);
    let mut agent = sandbox.start_agent(Some(&table));
    assert!(agent.signal(Signal::SIGTERM).success());
    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"],
        "b1"
    );

    let detach = sandbox.agent_once(&["--detach"]);
    assert!(
        detach.status.success(),
        "{}",
        String::from_utf8_lossy(&detach.stderr)
    );
    assert!(!sandbox.bpffs.exists(), "pins left behind");
    // The kernel releases an unpinned link after an RCU grace period,
    // which a loaded machine can stretch.
    let mut last = serde_json::Value::Null;
    let detached = socklb_tests::vm::eventually(Duration::from_secs(5), || {
        last = sandbox.client(&["tcp", "10.96.0.20:80"]).remove(0);
        last.get("errno").and_then(|e| e.as_i64()) == Some(ENETUNREACH)
    });
    assert!(detached, "still translated after --detach: {last}");
}

#[test]
fn kernel_check_names_what_is_missing() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    let missing_cgroup = sandbox.workdir.path().join("no-such-cgroup");
    let not_bpffs = sandbox.workdir.path().join("plain").join("socklb");
    std::fs::create_dir_all(&not_bpffs).unwrap();
    let output = Command::new(agent_bin())
        .env("SOCKLB_LISTEN", sandbox.api_addr())
        .arg("--cgroup")
        .arg(&missing_cgroup)
        .arg("--bpffs")
        .arg(&not_bpffs)
        .uid(65534)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let log = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "must run as root",
        &format!("cgroup {}: does not exist", missing_cgroup.display()),
        "is not on a bpf filesystem",
    ] {
        assert!(log.contains(expected), "{expected:?} missing from {log}");
    }
}

#[test]
fn a_restarted_agent_removes_leftovers_of_an_interrupted_update() {
    socklb_tests::require_root!();
    use aya::maps::{HashMap, MapData};
    use socklb_common::{BackendSlotKey, Endpoint, MemberKey, map_names};

    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = web_table(&sandbox, 1);
    let mut agent = sandbox.start_agent(Some(&table));
    assert!(agent.signal(Signal::SIGTERM).success());

    // What an agent killed between writing slots and the service entry
    // leaves: a slot and a member of a service id nothing uses.
    let map = |name: &str| MapData::from_pin(sandbox.bpffs.join("maps").join(name)).unwrap();
    let mut slots: HashMap<MapData, BackendSlotKey, Endpoint> =
        HashMap::try_from(aya::maps::Map::HashMap(map(map_names::BACKEND_SLOTS))).unwrap();
    let mut members: HashMap<MapData, MemberKey, u8> =
        HashMap::try_from(aya::maps::Map::HashMap(map(map_names::MEMBERS))).unwrap();
    let orphan_slot = BackendSlotKey {
        service_id: 4242,
        slot: 1,
    };
    let orphan_member = MemberKey {
        service_id: 4242,
        backend: Endpoint::default(),
    };
    slots.insert(orphan_slot, Endpoint::default(), 0).unwrap();
    members.insert(orphan_member, 1, 0).unwrap();
    // And a VIP whose service was never written: it would refuse connects.
    let mut vips: HashMap<MapData, socklb_common::Addr, u8> =
        HashMap::try_from(aya::maps::Map::HashMap(map(map_names::VIPS))).unwrap();
    let orphan_vip = socklb_common::v4_mapped(u32::from_ne_bytes([10, 96, 0, 99]));
    vips.insert(orphan_vip, 1, 0).unwrap();
    // What an agent killed between writing a service entry and removing
    // the old members leaves: a backend in none of the live service's slots
    // still a member (its sticky clients would keep it for good). And the
    // member of the backend that is in its slot gone.
    let services: HashMap<MapData, socklb_common::ServiceEntryKey, socklb_common::ServiceEntry> =
        HashMap::try_from(aya::maps::Map::HashMap(map(map_names::SERVICES))).unwrap();
    let (_, web) = services.iter().next().unwrap().unwrap();
    let b1 = slots
        .get(
            &BackendSlotKey {
                service_id: web.id,
                slot: 1,
            },
            0,
        )
        .unwrap();
    let removed_backend = MemberKey {
        service_id: web.id,
        backend: Endpoint {
            port: 9999u16.to_be(),
            ..b1
        },
    };
    let live_member = MemberKey {
        service_id: web.id,
        backend: b1,
    };
    members.insert(removed_backend, 1, 0).unwrap();
    members.remove(&live_member).unwrap();

    let _agent = sandbox.start_agent(Some(&table));
    assert!(
        members.get(&removed_backend, 0).is_err(),
        "a backend in none of the slots is still a member"
    );
    assert!(
        members.get(&live_member, 0).is_ok(),
        "the backend in slot 1 is no member"
    );
    assert!(slots.get(&orphan_slot, 0).is_err(), "orphan slot kept");
    assert!(
        members.get(&orphan_member, 0).is_err(),
        "orphan member kept"
    );
    assert!(vips.get(&orphan_vip, 0).is_err(), "orphan VIP kept");
    assert_eq!(
        errno(&sandbox.client(&["tcp", "10.96.0.99:80"])[0]),
        ENETUNREACH,
        "a VIP without a service passes untranslated"
    );
    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"],
        "b1"
    );
}

/// Pins an empty per-CPU array as an agent of the previous layout left it:
/// `SERVICE_STATS`, 16-byte per-service counters. Raw bpf(2): aya creates
/// maps only from an object file.
fn pin_previous_counters_map(path: &std::path::Path) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let bpf = |cmd: libc::c_long, attr: &[u8; 128]| {
        // SAFETY: `attr` is a zero-filled bpf_attr of the size passed, and
        // any pointer in it outlives the call.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) }
    };
    let mut create = [0u8; 128];
    for (i, word) in [BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, 65_536]
        .iter()
        .enumerate()
    {
        create[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let fd = bpf(BPF_MAP_CREATE, &create);
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u8; 128];
    pin[..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    pin[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    let pinned = bpf(BPF_OBJ_PIN, &pin);
    assert_eq!(pinned, 0, "pin: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was returned by BPF_MAP_CREATE above and is not used again.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn an_agent_upgraded_in_place_retires_the_previous_counters_map() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let maps = sandbox.bpffs.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let previous = maps.join("SERVICE_STATS");
    pin_previous_counters_map(&previous);

    let table = web_table(&sandbox, 1);
    // The new agent creates SERVICE_COUNTERS beside it and must not leave
    // the retired pin behind.
    let _agent = sandbox.start_agent(Some(&table));
    assert!(
        !previous.exists(),
        "the previous counters map is still pinned"
    );
    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"],
        "b1"
    );
}

/// Attaches the agent's own connect4 program to the sandbox's cgroup a
/// second time, after the first, as an in-place upgrade does for a moment
/// (the new agent's programs are attached, over the same pinned maps,
/// before the old links are dropped); dropping the returned link detaches
/// it. Raw bpf(2): aya attaches only programs it loaded.
fn attach_connect4_again(sandbox: &Sandbox) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    let bpf = |cmd: libc::c_long, attr: &[u8; 128]| {
        // SAFETY: `attr` is a zero-filled bpf_attr of the size passed.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) }
    };
    let link = aya::programs::links::PinnedLink::from_pin(sandbox.bpffs.join("links/connect4"))
        .expect("the agent's connect4 link");
    let program_id = aya::programs::links::FdLink::from(link)
        .info()
        .expect("link info")
        .program_id();
    let mut by_id = [0u8; 128];
    by_id[..4].copy_from_slice(&program_id.to_ne_bytes());
    let program = bpf(BPF_PROG_GET_FD_BY_ID, &by_id);
    assert!(
        program >= 0,
        "program fd: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor BPF_PROG_GET_FD_BY_ID returned, owned here.
    let program = unsafe { std::os::fd::OwnedFd::from_raw_fd(program as i32) };
    let cgroup = std::fs::File::open(&sandbox.cgroup).expect("open the sandbox's cgroup");
    let mut create = [0u8; 128];
    for (i, word) in [
        program.as_raw_fd() as u32,
        cgroup.as_raw_fd() as u32,
        BPF_CGROUP_INET4_CONNECT,
    ]
    .iter()
    .enumerate()
    {
        create[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let link = bpf(BPF_LINK_CREATE, &create);
    assert!(
        link >= 0,
        "link create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor BPF_LINK_CREATE returned, owned here.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(link as i32) }
}

#[test]
fn connected_udp_keeps_its_vip_while_an_upgrade_runs_two_programs() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = sandbox.table(
        "dns.yaml",
        &format!(
            "services: [{{vip: 10.96.0.10, port: 53, protocol: UDP, \
             backends: [{{ip: {}, port: 5353}}]}}]",
            socklb_tests::backend_ip(1)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    // The second program sees the destination the first one wrote (the
    // backend): it must not drop the translation the first one made.
    let _second = attach_connect4_again(&sandbox);
    let replies = sandbox.client(&["udp", "10.96.0.10:53", "--connected", "--count", "3"]);
    assert_eq!(replies.len(), 3, "{replies:?}");
    for reply in &replies {
        assert_eq!(reply["backend"], "b1", "{reply}");
        assert_eq!(
            reply["source"], "10.96.0.10:53",
            "a reply from the VIP: {reply}"
        );
        assert_eq!(reply["peer"], "10.96.0.10:53", "getpeername: {reply}");
    }
}
