//! The datapath with real sockets: the agent binary on a test cgroup,
//! clients in a client namespace, backends in a backends namespace.
//! Needs root (CI runs as root); `cargo xtask test` runs these.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::process::CommandExt as _,
    process::Command,
    thread::sleep,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use socklb_tests::{Sandbox, agent_bin, backend_ip, backend_ip6};

const ENETUNREACH: i64 = 101;
const ECONNREFUSED: i64 = 111;

fn tcp_backends(n: u8) -> String {
    (1..=n)
        .map(|i| format!("{{ip: {}, port: 8080}}", backend_ip(i)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A table file with one service, 10.96.0.20:80/TCP, on b1..=bN:8080.
fn web_table(sandbox: &Sandbox, n: u8) -> std::path::PathBuf {
    sandbox.table(
        "t.yaml",
        &format!(
            "services: [{{vip: 10.96.0.20, port: 80, backends: [{}]}}]",
            tcp_backends(n)
        ),
    )
}

/// Starts backends b1..=bN serving TCP :8080 and UDP :5353, v4 and v6.
fn start_backends(sandbox: &Sandbox, n: u8) {
    for i in 1..=n {
        let tcp4 = format!("{}:8080", backend_ip(i));
        let tcp6 = format!("[{}]:8080", backend_ip6(i));
        let udp4 = format!("{}:5353", backend_ip(i));
        let udp6 = format!("[{}]:5353", backend_ip6(i));
        sandbox.backend(&format!("b{i}"), &[&tcp4, &tcp6], &[&udp4, &udp6]);
    }
}

fn ok(results: &[Value]) -> &[Value] {
    for r in results {
        assert!(r.get("error").is_none(), "exchange failed: {r}");
    }
    results
}

/// The one successful exchange of a client run.
fn one(results: Vec<Value>) -> Value {
    assert_eq!(ok(&results).len(), 1, "{results:?}");
    results.into_iter().next().unwrap()
}

fn backend_counts(results: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in ok(results) {
        *counts
            .entry(r["backend"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

fn errno(result: &Value) -> i64 {
    result["errno"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error, got {result}"))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[test]
fn tcp_via_vip_with_port_remap() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services: [{{name: default/web, vip: 10.96.0.20, port: 80, backends: [{}]}}]",
            tcp_backends(1)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    let results = sandbox.client(&["tcp", "10.96.0.20:80"]);
    let r = &ok(&results)[0];
    assert_eq!(r["backend"], "b1");
    assert_eq!(r["peer"], "10.96.0.20:80", "getpeername shows the VIP");
    assert!(
        r["local"].as_str().unwrap().starts_with("10.244.0.1:"),
        "{r}"
    );
}

#[test]
fn spreads_over_three_backends() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 3);
    let table = web_table(&sandbox, 3);
    let _agent = sandbox.start_agent(Some(&table));
    let counts = backend_counts(&sandbox.client(&["tcp", "10.96.0.20:80", "--count", "300"]));
    assert_eq!(counts.len(), 3, "{counts:?}");
    // Expected 100 each; below 50 is six standard deviations off.
    assert!(
        counts.values().all(|&n| n >= 50),
        "uneven spread: {counts:?}"
    );
}

#[test]
fn udp_via_vip_replies_come_from_the_vip() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 3);
    let backends = (1..=3)
        .map(|i| format!("{{ip: {}, port: 5353}}", backend_ip(i)))
        .collect::<Vec<_>>()
        .join(", ");
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services: [{{vip: 10.96.0.10, port: 53, protocol: UDP, backends: [{backends}]}}]"
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));

    let connected = sandbox.client(&["udp", "10.96.0.10:53", "--connected", "--count", "5"]);
    for r in ok(&connected) {
        assert_eq!(r["source"], "10.96.0.10:53");
        assert_eq!(
            r["peer"], "10.96.0.10:53",
            "getpeername of connected UDP shows the VIP"
        );
    }
    assert_eq!(backend_counts(&connected).len(), 1);

    // Unconnected: every datagram of one socket goes to one backend.
    for _ in 0..3 {
        let unconnected = sandbox.client(&["udp", "10.96.0.10:53", "--count", "20"]);
        for r in ok(&unconnected) {
            assert_eq!(
                r["source"], "10.96.0.10:53",
                "recvmsg shows the VIP as source"
            );
        }
        assert_eq!(
            backend_counts(&unconnected).len(),
            1,
            "one socket, one backend"
        );
    }
}

#[test]
fn one_socket_talks_to_several_vips() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 2);
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services:
  - {{vip: 10.96.0.11, port: 53, protocol: UDP, backends: [{{ip: {}, port: 5353}}]}}
  - {{vip: 10.96.0.12, port: 53, protocol: UDP, backends: [{{ip: {}, port: 5353}}]}}",
            backend_ip(1),
            backend_ip(2)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    let results = sandbox.client(&["udp-multi", "10.96.0.11:53", "10.96.0.12:53"]);
    assert_eq!(ok(&results).len(), 6);
    for r in &results {
        assert_eq!(r["source"], r["to"], "each reply maps back to its own VIP");
        let expected = if r["to"] == "10.96.0.11:53" {
            "b1"
        } else {
            "b2"
        };
        assert_eq!(r["backend"], expected);
    }
}

#[test]
fn glibc_resolver_through_a_dns_vip() {
    let mut sandbox = Sandbox::create();
    sandbox.dns_server(
        &format!("{}:5353", backend_ip(1)),
        "web.socklb.test",
        "10.96.0.20",
    );
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services: [{{name: kube-system/kube-dns, vip: 10.96.0.10, port: 53, protocol: UDP, \
             backends: [{{ip: {}, port: 5353}}]}}]",
            backend_ip(1)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    sandbox.resolv_conf("nameserver 10.96.0.10\noptions timeout:2 attempts:1\n");
    let output = sandbox.pod_exec("getent", &["ahostsv4", "web.socklb.test"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "getent failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("10.96.0.20 "), "{stdout}");
}

#[test]
fn ipv6_vip() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 2);
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services:
  - {{vip: 'fd00:96::20', port: 80, backends: [{{ip: '{}', port: 8080}}]}}
  - {{vip: 'fd00:96::10', port: 53, protocol: UDP, backends: [{{ip: '{}', port: 5353}}]}}",
            backend_ip6(1),
            backend_ip6(2)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    let tcp = sandbox.client(&["tcp", "[fd00:96::20]:80"]);
    assert_eq!(ok(&tcp)[0]["backend"], "b1");
    assert_eq!(tcp[0]["peer"], "[fd00:96::20]:80");
    for args in [
        &["udp", "[fd00:96::10]:53", "--connected"][..],
        &["udp", "[fd00:96::10]:53", "--count", "3"],
    ] {
        for r in ok(&sandbox.client(args)) {
            assert_eq!(r["backend"], "b2");
            assert_eq!(r["source"], "[fd00:96::10]:53");
        }
    }
}

#[test]
fn v4_vip_through_an_inet6_socket() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services:
  - {{vip: 10.96.0.20, port: 80, backends: [{}]}}
  - {{vip: 10.96.0.10, port: 53, protocol: UDP, backends: [{{ip: {}, port: 5353}}]}}",
            tcp_backends(1),
            backend_ip(1)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    let tcp = sandbox.client(&["tcp", "[::ffff:10.96.0.20]:80"]);
    assert_eq!(ok(&tcp)[0]["backend"], "b1");
    assert_eq!(tcp[0]["peer"], "[::ffff:10.96.0.20]:80");
    let connected = sandbox.client(&["udp", "[::ffff:10.96.0.10]:53", "--connected"]);
    assert_eq!(ok(&connected)[0]["peer"], "[::ffff:10.96.0.10]:53");
    for r in ok(&sandbox.client(&["udp", "[::ffff:10.96.0.10]:53", "--count", "3"])) {
        assert_eq!(r["source"], "[::ffff:10.96.0.10]:53");
    }
}

#[test]
fn client_ip_affinity_keeps_a_backend_until_timeout_or_removal() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 3);
    let table_text = |n: u8, skip: Option<&str>| {
        let backends: Vec<String> = (1..=n)
            .filter(|i| Some(format!("b{i}").as_str()) != skip)
            .map(|i| format!("{{ip: {}, port: 8080}}", backend_ip(i)))
            .collect();
        format!(
            "services: [{{vip: 10.96.0.20, port: 80, affinity: {{clientIP: {{timeoutSeconds: 1}}}}, backends: [{}]}}]",
            backends.join(", ")
        )
    };
    let table = sandbox.table("t.yaml", &table_text(3, None));
    let agent = sandbox.start_agent(Some(&table));

    let sticky = backend_counts(&sandbox.client(&["tcp", "10.96.0.20:80", "--count", "20"]));
    assert_eq!(
        sticky.len(),
        1,
        "within the timeout one backend: {sticky:?}"
    );

    // After each expiry the choice is random again: eight rounds all on one
    // backend would happen with probability (1/3)^7.
    let mut after_expiry = BTreeSet::new();
    for _ in 0..8 {
        sleep(Duration::from_millis(1300));
        after_expiry.insert(one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"].to_string());
    }
    assert!(
        after_expiry.len() > 1,
        "affinity outlived its timeout: {after_expiry:?}"
    );

    let kept = one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"]
        .as_str()
        .unwrap()
        .to_string();
    sandbox.table("t.yaml", &table_text(3, Some(&kept)));
    agent.reload();
    let moved = backend_counts(&sandbox.client(&["tcp", "10.96.0.20:80", "--count", "10"]));
    assert_eq!(moved.len(), 1, "a new affinity after removal: {moved:?}");
    assert!(
        !moved.contains_key(&kept),
        "removed backend {kept} still chosen"
    );
}

#[test]
fn no_backends_refuses_at_once() {
    let sandbox = Sandbox::create();
    let table = sandbox.table(
        "t.yaml",
        "services:
  - {vip: 10.96.0.30, port: 80, backends: []}
  - {vip: 10.96.0.31, port: 53, protocol: UDP}",
    );
    let _agent = sandbox.start_agent(Some(&table));
    for args in [
        &["tcp", "10.96.0.30:80"][..],
        &["udp", "10.96.0.31:53"],
        &["udp", "10.96.0.31:53", "--connected"],
    ] {
        let r = &sandbox.client(args)[0];
        assert_eq!(errno(r), ECONNREFUSED, "{args:?}: {r}");
        assert!(
            r["elapsed_ms"].as_u64().unwrap() < 1000,
            "{args:?} was not refused at once: {r}"
        );
    }
}

#[test]
fn a_known_vip_on_an_unknown_port_is_refused_at_once() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services:
  - {{vip: 10.96.0.20, port: 80, backends: [{}]}}
  - {{vip: 'fd00:96::20', port: 80, backends: [{{ip: '{}', port: 8080}}]}}",
            tcp_backends(1),
            backend_ip6(1)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    // Another port, and the service's port with the other protocol: no
    // service has either, so they are refused (kube-proxy's nftables
    // mode); before, they passed untranslated and the client namespace,
    // which has no route to the VIPs, said ENETUNREACH.
    for vip in ["10.96.0.20", "[::ffff:10.96.0.20]", "[fd00:96::20]"] {
        for (args, what) in [
            (vec!["tcp", "81"], "TCP connect"),
            (vec!["udp", "80", "--connected"], "UDP connect"),
            (vec!["udp", "53"], "UDP sendmsg"),
        ] {
            let target = format!("{vip}:{}", args[1]);
            let mut args = args.clone();
            args[1] = &target;
            let r = &sandbox.client(&args)[0];
            assert_eq!(errno(r), ECONNREFUSED, "{what} to {target}: {r}");
            assert!(
                r["elapsed_ms"].as_u64().unwrap() < 1000,
                "{what} to {target} was not refused at once: {r}"
            );
        }
    }
    // The service itself still works, and a VIP socklb does not know passes.
    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"],
        "b1"
    );
    assert_eq!(
        one(sandbox.client(&["tcp", "[fd00:96::20]:80"]))["backend"],
        "b1"
    );
    assert_eq!(
        errno(&sandbox.client(&["tcp", "10.96.0.21:81"])[0]),
        ENETUNREACH
    );
}

#[test]
fn non_vip_destinations_and_other_cgroups_are_untouched() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 2);
    let table = web_table(&sandbox, 1);
    let _agent = sandbox.start_agent(Some(&table));
    let direct = sandbox.client(&["tcp", &format!("{}:8080", backend_ip(2))]);
    assert_eq!(ok(&direct)[0]["backend"], "b2");
    assert_eq!(direct[0]["peer"], format!("{}:8080", backend_ip(2)));
    // The client namespace has no route to 10.96/16: an untranslated
    // connect fails at once with ENETUNREACH and never leaves the namespace.
    assert_eq!(
        errno(&sandbox.client(&["tcp", "10.96.0.21:80"])[0]),
        ENETUNREACH,
        "other VIP"
    );
    assert_eq!(
        errno(&sandbox.client_outside_cgroup(&["tcp", "10.96.0.20:80"])[0]),
        ENETUNREACH,
        "a process outside the cgroup is not translated"
    );
}

/// Runs `ip` with `args`, failing the test on an error.
fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

#[test]
fn an_opted_out_cgroup_reaches_the_vip_itself() {
    let mut sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    // The VIP as an address of the backends namespace with a listener on
    // it, and a route to it from the pod: only an untranslated connect or
    // datagram gets there (as a sidecar's redirect would see it).
    ip(&[
        "-n",
        &sandbox.backend_ns,
        "addr",
        "add",
        "10.96.0.20/32",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &sandbox.client_ns,
        "route",
        "add",
        "10.96.0.0/16",
        "dev",
        "eth0",
    ]);
    sandbox.backend("vip-itself", &["10.96.0.20:80"], &["10.96.0.20:53"]);
    let table = web_table(&sandbox, 1);
    let mut agent = sandbox.start_agent(Some(&table));
    let meshed = sandbox.child_cgroup("meshed");
    let sidecar = sandbox.child_cgroup("meshed/sidecar");
    let plain = sandbox.child_cgroup("plain");
    let backend_in = |cgroup: &std::path::Path, args: &[&str]| {
        one(sandbox.client_in_cgroup(cgroup, args))["backend"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(backend_in(&meshed, &["tcp", "10.96.0.20:80"]), "b1");

    let runtime = socklb_tests::runtime();
    let mut client = socklb_tests::agent_client(&sandbox.api_addr(), Default::default());
    let set = runtime
        .block_on(client.set_opt_out_cgroups(&["meshed".into()]))
        .expect("set opt-out cgroups");
    assert_eq!(set.len(), 1);
    assert_eq!(set[0].path, "meshed");
    assert_eq!(
        set[0].id,
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&meshed).unwrap())
    );
    for cgroup in [&meshed, &sidecar] {
        let r = one(sandbox.client_in_cgroup(cgroup, &["tcp", "10.96.0.20:80"]));
        assert_eq!(r["backend"], "vip-itself", "{cgroup:?}: {r}");
        assert_eq!(r["peer"], "10.96.0.20:80");
        // Not refused either: 53/UDP is no service port of this VIP.
        assert_eq!(backend_in(cgroup, &["udp", "10.96.0.20:53"]), "vip-itself");
    }
    assert_eq!(backend_in(&plain, &["tcp", "10.96.0.20:80"]), "b1");
    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"],
        "b1"
    );
    assert_eq!(
        errno(&sandbox.client_in_cgroup(&plain, &["udp", "10.96.0.20:53"])[0]),
        ECONNREFUSED
    );

    // A bad list changes nothing; the list outlives the agent.
    let refused = runtime.block_on(client.set_opt_out_cgroups(&["nope".into(), "plain".into()]));
    let message = format!("{:?}", refused.expect_err("an unknown cgroup"));
    assert!(
        message.contains("INVALID_ARGUMENT") && message.contains("nope"),
        "{message}"
    );
    assert!(agent.signal(Signal::SIGTERM).success());
    let _agent = sandbox.start_agent(Some(&table));
    let mut client = socklb_tests::agent_client(&sandbox.api_addr(), Default::default());
    let listed = runtime
        .block_on(client.list_opt_out_cgroups())
        .expect("list opt-out cgroups");
    assert_eq!(
        listed.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
        ["meshed"]
    );
    assert_eq!(
        backend_in(&sidecar, &["tcp", "10.96.0.20:80"]),
        "vip-itself"
    );

    runtime
        .block_on(client.set_opt_out_cgroups(&[]))
        .expect("clear opt-out cgroups");
    assert_eq!(backend_in(&meshed, &["tcp", "10.96.0.20:80"]), "b1");
}

#[test]
fn a_reload_bumps_the_generation() {
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
    use aya::maps::{HashMap, Map, MapData};
    use socklb_common::{Endpoint, ReverseKey};
    use socklb_table::Table;

    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = web_table(&sandbox, 1);
    let _agent = sandbox.start_agent(Some(&table));
    // A full REVERSE map: what a busy pod's translations leave. Counting it
    // is one syscall per entry.
    let pin = sandbox.bpffs.join("maps").join("REVERSE");
    let mut reverse: HashMap<MapData, ReverseKey, Endpoint> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(&pin).unwrap())).unwrap();
    for cookie in 0..u64::from(socklb_common::REVERSE_ENTRIES) {
        let key = ReverseKey {
            cookie,
            ..Default::default()
        };
        reverse.insert(key, Endpoint::default(), 0).unwrap();
    }

    let addr = sandbox.api_addr();
    let stats_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stats_thread = {
        let addr = addr.clone();
        let stats_done = stats_done.clone();
        std::thread::spawn(move || {
            let runtime = socklb_tests::runtime();
            let mut client = socklb_tests::agent_client(&addr, Default::default());
            let mut durations = Vec::new();
            for _ in 0..4 {
                let started = std::time::Instant::now();
                let stats = runtime.block_on(client.stats()).expect("stats");
                durations.push(started.elapsed());
                let reverse = stats.maps.iter().find(|m| m.map == "REVERSE").unwrap();
                assert!(reverse.entries > 100_000, "{reverse:?}");
            }
            stats_done.store(true, std::sync::atomic::Ordering::SeqCst);
            durations
        })
    };
    let runtime = socklb_tests::runtime();
    let mut client = socklb_tests::agent_client(&addr, Default::default());
    let service = Table::parse(&std::fs::read_to_string(&table).unwrap())
        .unwrap()
        .services
        .remove(0);
    let mut writes = Vec::new();
    while !stats_done.load(std::sync::atomic::Ordering::SeqCst) {
        let started = std::time::Instant::now();
        runtime
            .block_on(client.upsert(vec![service.clone()]))
            .expect("upsert");
        writes.push(started.elapsed());
        sleep(Duration::from_millis(5));
    }
    let mut stats = stats_thread.join().unwrap();
    stats.sort();
    let slowest_write = writes.iter().max().unwrap();
    // Without a long walk the test proves nothing.
    assert!(stats[0] > Duration::from_millis(50), "stats took {stats:?}");
    assert!(
        *slowest_write < stats[0] / 2,
        "a write waited for Stats: slowest write {slowest_write:?}, Stats {stats:?}, {} writes",
        writes.len()
    );
}

#[test]
fn getsockname_hides_a_backend_local_to_the_pod() {
    let sandbox = Sandbox::create();
    sandbox.local_server("loopback", "127.0.0.1:9090");
    sandbox.add_client_address("10.244.0.9/32");
    sandbox.local_server("local", "10.244.0.9:9090");
    let table = sandbox.table(
        "t.yaml",
        "services:
  - {vip: 10.96.0.50, port: 80, backends: [{ip: 127.0.0.1, port: 9090}]}
  - {vip: 10.96.0.51, port: 80, backends: [{ip: 10.244.0.9, port: 9090}]}",
    );
    let _agent = sandbox.start_agent(Some(&table));
    for (vip, backend) in [("10.96.0.50:80", "loopback"), ("10.96.0.51:80", "local")] {
        let via_vip = one(sandbox.client(&["tcp", vip]));
        assert_eq!(via_vip["backend"], backend);
        assert_eq!(via_vip["peer"], vip);
        assert!(
            via_vip["local"]
                .as_str()
                .unwrap()
                .starts_with("10.244.0.1:"),
            "the pod's address, not the backend's: {via_vip}"
        );
    }
    // Sockets that were not translated keep what routing gave them.
    let direct = one(sandbox.client(&["tcp", "127.0.0.1:9090"]));
    assert!(
        direct["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{direct}"
    );
    let direct = one(sandbox.client(&["tcp", "10.244.0.9:9090"]));
    assert!(
        direct["local"].as_str().unwrap().starts_with("10.244.0.9:"),
        "{direct}"
    );
}

#[test]
fn backend_set_changes_while_clients_connect() {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 4);
    let table = web_table(&sandbox, 3);
    let agent = sandbox.start_agent(Some(&table));
    let client = sandbox.spawn_client(&["tcp-loop", "10.96.0.20:80", "--ms", "3000"]);
    sleep(Duration::from_millis(800));
    sandbox.table(
        "t.yaml",
        &format!(
            "services: [{{vip: 10.96.0.20, port: 80, backends: [{{ip: {}, port: 8080}}, {{ip: {}, port: 8080}}, {{ip: {}, port: 8080}}]}}]",
            backend_ip(1),
            backend_ip(2),
            backend_ip(4)
        ),
    );
    agent.reload();
    let acknowledged = now_us();
    let results = client.finish();
    let (before, after): (Vec<Value>, Vec<Value>) = ok(&results)
        .iter()
        .cloned()
        .partition(|r| r["start_us"].as_u64().unwrap() < acknowledged);
    let before = backend_counts(&before);
    let after = backend_counts(&after);
    // The new set takes effect before the agent acknowledges it, so b4 may
    // already appear in the last connections before the acknowledgement.
    assert!(before.contains_key("b3"), "{before:?}");
    assert!(
        !after.contains_key("b3"),
        "removed backend chosen after the update: {after:?}"
    );
    assert!(after.contains_key("b4"), "{after:?}");
}

#[test]
fn agent_killed_and_restarted_while_clients_connect() {
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
fn bad_table_is_refused_and_changes_nothing() {
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
    assert_eq!(
        errno(&sandbox.client(&["tcp", "10.96.0.20:80"])[0]),
        ENETUNREACH
    );
}

#[test]
fn kernel_check_names_what_is_missing() {
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
    use aya::maps::{HashMap, MapData};
    use socklb_common::{BackendSlotKey, Endpoint, MemberKey};

    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = web_table(&sandbox, 1);
    let mut agent = sandbox.start_agent(Some(&table));
    assert!(agent.signal(Signal::SIGTERM).success());

    // What an agent killed between writing slots and the service entry
    // leaves: a slot and a member of a service id nothing uses.
    let map = |name: &str| MapData::from_pin(sandbox.bpffs.join("maps").join(name)).unwrap();
    let mut slots: HashMap<MapData, BackendSlotKey, Endpoint> =
        HashMap::try_from(aya::maps::Map::HashMap(map("BACKEND_SLOTS"))).unwrap();
    let mut members: HashMap<MapData, MemberKey, u8> =
        HashMap::try_from(aya::maps::Map::HashMap(map("MEMBERS"))).unwrap();
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
        HashMap::try_from(aya::maps::Map::HashMap(map("VIPS"))).unwrap();
    let orphan_vip = socklb_common::v4_mapped(u32::from_ne_bytes([10, 96, 0, 99]));
    vips.insert(orphan_vip, 1, 0).unwrap();
    // What an agent killed between writing a service entry and removing
    // the old members leaves: a backend in none of the live service's slots
    // still a member (its sticky clients would keep it for good). And the
    // member of the backend that is in its slot gone.
    let services: HashMap<MapData, socklb_common::ServiceKey, socklb_common::Service> =
        HashMap::try_from(aya::maps::Map::HashMap(map("SERVICES"))).unwrap();
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
