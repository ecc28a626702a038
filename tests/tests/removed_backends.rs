//! Sockets of a removed backend are closed, as kube-proxy flushes the
//! conntrack entries of a removed endpoint: a connected UDP socket gets an
//! error and, connected again, reaches a live backend; TCP connections are
//! left alone unless the agent runs with --close-tcp-of-removed-backends.
//! Sockets the removal does not concern stay open. Needs root.

use std::{
    net::SocketAddr,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::Value;
use socklb_shim::Options;
use socklb_table::{Protocol, Service, ServiceKey, Table, VipKind};
use socklb_tests::{Sandbox, agent_client, backend_ip, runtime, workload::now_us};

/// `vip:port`/`protocol` on the backends numbered in `set`, at `backend_port`.
fn service(vip: &str, protocol: Protocol, set: &[u8], backend_port: u16) -> Service {
    Service {
        name: None,
        key: ServiceKey {
            vip: vip.parse().unwrap(),
            port: 53,
            protocol,
        },
        vip_kind: VipKind::Cluster,
        affinity_timeout_secs: None,
        backends: set
            .iter()
            .map(|n| SocketAddr::new(backend_ip(*n).parse().unwrap(), backend_port))
            .collect(),
    }
}

#[test]
fn a_connected_udp_socket_of_a_removed_backend_gets_an_error_and_reconnects() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    for n in 1..=2 {
        sandbox.backend(&format!("b{n}"), &[], &[&format!("{}:5353", backend_ip(n))]);
    }
    let _agent = sandbox.start_agent(None);
    let runtime = runtime();
    let mut client = agent_client(&sandbox.api_addr(), Options::default());
    let dns = |set: &[u8]| service("10.96.0.10", Protocol::Udp, set, 5353);
    runtime
        .block_on(client.sync(Table::new(vec![dns(&[1])]).unwrap()))
        .expect("first sync");

    // One connected socket, a datagram every 50 ms for about 3 s; on an
    // error it connects again.
    let sending = sandbox.spawn_client(&[
        "udp",
        "10.96.0.10:53",
        "--connected",
        "--reconnect",
        "--count",
        "60",
        "--interval-ms",
        "50",
    ]);
    sleep(Duration::from_millis(1000));
    let begun_us = now_us();
    runtime
        .block_on(client.upsert(vec![dns(&[2])]))
        .expect("upsert");
    let acknowledged_us = now_us();
    let results = sending.finish();

    let started = |r: &Value| r["start_us"].as_u64().unwrap();
    let before: Vec<&Value> = results.iter().filter(|r| started(r) < begun_us).collect();
    assert!(before.len() > 10, "{results:?}");
    assert!(
        before.iter().all(|r| r["backend"] == "b1"),
        "before the update: {before:?}"
    );
    // Sockets are closed before the acknowledgement, so the first error may
    // start while the update runs.
    let after: Vec<&Value> = results.iter().filter(|r| started(r) >= begun_us).collect();
    let first_error = after
        .iter()
        .position(|r| r.get("error").is_some())
        .unwrap_or_else(|| panic!("no send failed after the update: {after:?}"));
    let error_us = started(after[first_error]);
    assert!(
        error_us < acknowledged_us + 1_000_000,
        "the first error came {} ms after the acknowledgement",
        (error_us - acknowledged_us) / 1000
    );
    // The closed socket's pending error (ECONNABORTED) may surface once
    // more, on the first receive after connecting again.
    let first_reply = first_error
        + after[first_error..]
            .iter()
            .position(|r| r.get("error").is_none())
            .unwrap_or_else(|| panic!("no reply after the error: {after:?}"));
    assert!(first_reply - first_error <= 2, "{after:?}");
    let reconnected = &after[first_reply..];
    assert!(reconnected.len() > 10, "{after:?}");
    assert!(
        reconnected.iter().all(|r| r["backend"] == "b2"),
        "after reconnecting: {reconnected:?}"
    );
}

/// A connected UDP socket to `target` sending a datagram every 50 ms for
/// about 2.5 s.
fn connected_udp(target: &str) -> [&str; 7] {
    [
        "udp",
        target,
        "--connected",
        "--count",
        "50",
        "--interval-ms",
        "50",
    ]
}

/// Only the sockets a removal concerns are closed. Services A and B share
/// b1; A drops it first, B later. A socket connected through B stays open
/// while B still has b1 and is closed once B drops it too (which shows the
/// pass ran); one through A is closed by then (not already when A dropped
/// b1: the kernel's dump shows no UDP socket's translation, so UDP is
/// matched by the peer, closed once no service has it; TCP is matched by
/// its translation: `tcp_is_closed_by_its_own_translation`). Sockets to
/// the live backend b2, and sockets connected to b1 from another cgroup
/// and from an opted-out cgroup, stay open throughout.
#[test]
fn sockets_a_removal_does_not_concern_stay_open() {
    socklb_tests::require_root!();
    let mut sandbox = Sandbox::create();
    for n in 1..=2 {
        sandbox.backend(&format!("b{n}"), &[], &[&format!("{}:5353", backend_ip(n))]);
    }
    let meshed = sandbox.child_cgroup("meshed");
    let _agent = sandbox.start_agent(None);
    let runtime = runtime();
    let mut client = agent_client(&sandbox.api_addr(), Options::default());
    let dns = |vip: &str, set: &[u8]| service(vip, Protocol::Udp, set, 5353);
    let table = vec![
        dns("10.96.0.10", &[1]),
        dns("10.96.0.11", &[1]),
        dns("10.96.0.12", &[2]),
    ];
    runtime
        .block_on(client.sync(Table::new(table).unwrap()))
        .expect("first sync");
    runtime
        .block_on(client.set_opt_out_cgroups(&["meshed".into()]))
        .expect("opt out");

    let b1 = format!("{}:5353", backend_ip(1));
    let through_a = sandbox.spawn_client(&connected_udp("10.96.0.10:53"));
    let through_b = sandbox.spawn_client(&connected_udp("10.96.0.11:53"));
    let to_live = sandbox.spawn_client(&connected_udp("10.96.0.12:53"));
    let other_cgroup = sandbox.spawn_client_outside_cgroup(&connected_udp(&b1));
    let opted_out = sandbox.spawn_client_in_cgroup(&meshed, &connected_udp(&b1));
    sleep(Duration::from_millis(700));
    let a_dropped_us = now_us();
    runtime
        .block_on(client.upsert(vec![dns("10.96.0.10", &[2])]))
        .expect("A loses b1");
    sleep(Duration::from_millis(700));
    let b1_removed_us = now_us();
    runtime
        .block_on(client.upsert(vec![dns("10.96.0.11", &[2])]))
        .expect("B loses b1");

    let started = |r: &Value| r["start_us"].as_u64().unwrap();
    let through_b = through_b.finish();
    let (kept, closed): (Vec<&Value>, Vec<&Value>) =
        through_b.iter().partition(|r| started(r) < b1_removed_us);
    // However late the client started, it sent while only A had lost b1.
    let while_b_had_b1 = kept.iter().filter(|r| started(r) >= a_dropped_us).count();
    assert!(
        while_b_had_b1 >= 3 && kept.iter().all(|r| r["backend"] == "b1"),
        "through B while B had b1: {kept:?}"
    );
    let failed = |r: &&Value| r.get("error").is_some();
    assert!(
        closed.iter().any(failed),
        "through B once b1 was in no service: {closed:?}"
    );
    let through_a = through_a.finish();
    assert!(
        through_a.iter().any(|r| failed(&r)),
        "through A, b1 in no service at the end: {through_a:?}"
    );
    for (socket, results, backend) in [
        ("to the live backend", to_live.finish(), "b2"),
        ("of another cgroup", other_cgroup.finish(), "b1"),
        ("of an opted-out cgroup", opted_out.finish(), "b1"),
    ] {
        assert!(
            results.len() == 50 && results.iter().all(|r| r["backend"] == backend),
            "a socket {socket} was closed: {results:?}"
        );
    }
}

/// With TCP closing asked for, a connection is closed by its own
/// translation. Services A and B share b1, C has b3; one write takes b1
/// from A (B keeps it) and b3 from C (no service has it then). The streams
/// through A and through C are closed; one through B, and one connected to
/// b3 directly (as a headless Service's client talks to a pod), stay.
#[test]
fn tcp_is_closed_by_its_own_translation() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    for n in 1..=3 {
        sandbox.backend_bulk(&format!("{}:9000", backend_ip(n)));
    }
    let _agent = sandbox.start_agent_with(None, &["--close-tcp-of-removed-backends"]);
    let runtime = runtime();
    let mut client = agent_client(&sandbox.api_addr(), Options::default());
    let bulk = |vip: &str, set: &[u8]| service(vip, Protocol::Tcp, set, 9000);
    let (a, b, c) = ("10.96.0.30", "10.96.0.31", "10.96.0.32");
    runtime
        .block_on(
            client.sync(Table::new(vec![bulk(a, &[1]), bulk(b, &[1]), bulk(c, &[3])]).unwrap()),
        )
        .expect("first sync");
    let stream = |target: &str| sandbox.spawn_client(&["stream", target, "--ms", STREAM_MS]);
    let b3 = format!("{}:9000", backend_ip(3));
    let streams = [
        ("through A", stream(&format!("{a}:53"))),
        ("through B", stream(&format!("{b}:53"))),
        ("through C", stream(&format!("{c}:53"))),
        ("to b3 directly", stream(&b3)),
    ];
    wait_connected(&sandbox, streams.len());
    runtime
        .block_on(client.upsert(vec![bulk(a, &[2]), bulk(c, &[2])]))
        .expect("A loses b1, C loses b3");
    let results: Vec<(&str, Value)> = streams
        .into_iter()
        .map(|(socket, running)| (socket, running.finish().remove(0)))
        .collect();
    let closed: Vec<(&str, bool)> = results
        .iter()
        .map(|(socket, result)| (*socket, result["end"] != "time"))
        .collect();
    assert_eq!(
        closed,
        [
            ("through A", true),
            ("through B", false),
            ("through C", true),
            ("to b3 directly", false)
        ],
        "{results:?}"
    );
}

/// How long a stream runs: the write and the closing pass that follow its
/// connect fit well inside it on a loaded machine.
const STREAM_MS: &str = "5000";

/// Waits until the pod has `streams` TCP connections established: each
/// stream is connected (and translated) before the write that drops its
/// backend, whatever the machine's load.
fn wait_connected(sandbox: &Sandbox, streams: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = Command::new("ip")
            .args(["netns", "exec", &sandbox.client_ns])
            .args(["ss", "-Htn", "state", "established"])
            .output()
            .expect("ss in the pod's namespace");
        if String::from_utf8_lossy(&listed.stdout).lines().count() >= streams {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{streams} streams did not connect"
        );
        sleep(Duration::from_millis(20));
    }
}

/// A TCP stream from a bulk backend whose service loses it once the stream
/// is connected: how the stream ended. The agent is started by `launcher` (none: directly).
fn tcp_stream_across_removal(launcher: &[String], agent_args: &[&str]) -> Value {
    let sandbox = Sandbox::create();
    sandbox.backend_bulk(&format!("{}:9000", backend_ip(1)));
    let _agent = sandbox.start_agent_via(launcher, None, agent_args);
    let runtime = runtime();
    let mut client = agent_client(&sandbox.api_addr(), Options::default());
    let bulk = |set: &[u8]| service("10.96.0.30", Protocol::Tcp, set, 9000);
    runtime
        .block_on(client.sync(Table::new(vec![bulk(&[1])]).unwrap()))
        .expect("first sync");
    let streaming = sandbox.spawn_client(&["stream", "10.96.0.30:53", "--ms", STREAM_MS]);
    wait_connected(&sandbox, 1);
    runtime
        .block_on(client.upsert(vec![bulk(&[2])]))
        .expect("upsert");
    let mut results = streaming.finish();
    assert_eq!(results.len(), 1, "{results:?}");
    results.remove(0)
}

#[test]
fn tcp_to_a_removed_backend_is_left_alone_by_default() {
    socklb_tests::require_root!();
    let result = tcp_stream_across_removal(&[], &[]);
    assert_eq!(result["end"], "time", "{result}");
}

#[test]
fn tcp_to_a_removed_backend_is_closed_when_asked() {
    socklb_tests::require_root!();
    let result = tcp_stream_across_removal(&[], &["--close-tcp-of-removed-backends"]);
    let end = result["end"].as_str().unwrap();
    assert!(
        end.starts_with("error"),
        "the stream was not closed: {result}"
    );
}

/// The Kata image's unit bounds the agent's capabilities and sets
/// NoNewPrivileges: under exactly those the agent still attaches,
/// translates, takes writes and closes sockets in a pod's namespace.
#[test]
fn the_units_capabilities_are_all_the_agent_needs() {
    socklb_tests::require_root!();
    let unit = include_str!("../../rootfs/kata/socklb-agent.service");
    let setting = |name: &str| {
        unit.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("the unit sets {name}"))
    };
    let bounding_set: String = setting("CapabilityBoundingSet")
        .split_whitespace()
        .map(|cap| {
            let cap = cap.strip_prefix("CAP_").expect("a capability name");
            format!(",+{}", cap.to_lowercase())
        })
        .collect();
    let mut launcher: Vec<String> = ["setpriv", "--inh-caps", "-all", "--bounding-set"]
        .map(String::from)
        .into();
    launcher.push(format!("-all{bounding_set}"));
    assert_eq!(setting("NoNewPrivileges"), "yes");
    launcher.push("--no-new-privs".into());
    let result = tcp_stream_across_removal(&launcher, &["--close-tcp-of-removed-backends"]);
    let end = result["end"].as_str().unwrap();
    assert!(
        end.starts_with("error"),
        "the stream was not closed: {result}"
    );
}
