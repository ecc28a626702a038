//! `sockets`: what per-socket state costs. Kernel memory per translated
//! socket (its socket-local storage), against the same number of sockets
//! connected to the backend directly as the baseline; and the time an
//! Upsert that removes a backend takes when it closes 10,000 connected UDP
//! sockets, against the same Upsert with 10,000 other sockets to list and
//! none to close.

use std::{fmt::Write as _, net::SocketAddr, thread::sleep, time::Duration, time::Instant};

use socklb_shim::Options;
use socklb_table::{Protocol, Service, ServiceKey, Table, VipKind};
use socklb_tests::{RunningClient, Sandbox, agent_client, backend_ip, runtime};

use crate::*;

const SOCKETS: usize = 10_000;
/// Rounds of the memory measure; the median round is reported.
const MEMORY_ROUNDS: usize = 3;
/// How long a client holds its sockets; the measures fit well inside.
const HOLD_MS: &str = "4000";
/// Upserts without a socket to close (the baseline), even so that the
/// service ends on b1.
const BASELINE_UPSERTS: usize = 10;
/// Upserts closing SOCKETS sockets, each over sockets opened for it.
const CLOSING_UPSERTS: usize = 5;

fn dns(backend: u8) -> Service {
    Service {
        name: None,
        key: ServiceKey {
            vip: "10.96.0.10".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        },
        vip_kind: VipKind::Cluster,
        affinity_timeout_secs: None,
        backends: vec![SocketAddr::new(backend_ip(backend).parse().unwrap(), 5353)],
    }
}

/// Bytes in use in the memory-cgroup-accounted kmalloc caches, where the
/// kernel allocates socket-local storage (`kmalloc-cg-*` in /proc/slabinfo).
fn accounted_kmalloc_bytes() -> i64 {
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").expect("/proc/slabinfo");
    slabinfo
        .lines()
        .filter(|line| line.starts_with("kmalloc-cg-"))
        .map(|line| {
            let fields: Vec<i64> = line
                .split_whitespace()
                .skip(1)
                .take(3)
                .map(|f| f.parse().expect("a slabinfo number"))
                .collect();
            // active_objs * objsize
            fields[0] * fields[2]
        })
        .sum()
}

/// Waits until the accounted kmalloc caches stop shrinking or growing
/// (what earlier benchmarks freed is released by RCU and deferred work,
/// megabytes at a time), at most 20 s.
fn settled_kmalloc_bytes() -> i64 {
    let mut last = accounted_kmalloc_bytes();
    for _ in 0..20 {
        sleep(Duration::from_secs(1));
        let now = accounted_kmalloc_bytes();
        if (now - last).abs() < 64 * 1024 {
            return now;
        }
        last = now;
    }
    last
}

/// A client holding SOCKETS UDP sockets connected to `target`, once they
/// are all open.
fn hold_sockets(sandbox: &Sandbox, target: &str) -> RunningClient {
    let holding = sandbox.spawn_client(&[
        "udp-hold",
        target,
        "--sockets",
        &SOCKETS.to_string(),
        "--ms",
        HOLD_MS,
    ]);
    sleep(Duration::from_millis(2000));
    holding
}

/// Extra accounted kernel memory while a client holds SOCKETS sockets
/// connected to `target`.
fn held_sockets_bytes(sandbox: &Sandbox, target: &str) -> i64 {
    let before = settled_kmalloc_bytes();
    let holding = hold_sockets(sandbox, target);
    let during = accounted_kmalloc_bytes();
    let results = holding.finish();
    assert_eq!(results[0]["sockets"], SOCKETS, "{results:?}");
    during - before
}

pub(crate) fn sockets() {
    let sandbox = Sandbox::create();
    for n in 1..=2 {
        sandbox.backend(&format!("b{n}"), &[], &[&format!("{}:5353", backend_ip(n))]);
    }
    let _agent = sandbox.start_agent(None);
    let runtime = runtime();
    let mut client = agent_client(&sandbox.api_addr(), Options::default());
    runtime
        .block_on(client.sync(Table::new(vec![dns(1)]).unwrap()))
        .expect("sync");

    // Rounds of both, so one disturbed reading does not make the figure.
    let mut rounds: Vec<(i64, i64)> = (0..MEMORY_ROUNDS)
        .map(|_| {
            let direct = held_sockets_bytes(&sandbox, &format!("{}:5353", backend_ip(1)));
            let translated = held_sockets_bytes(&sandbox, "10.96.0.10:53");
            (translated, direct)
        })
        .collect();
    rounds.sort_by_key(|(translated, direct)| translated - direct);
    let (translated, direct) = rounds[rounds.len() / 2];
    let per_socket = (translated - direct) as f64 / SOCKETS as f64;

    // The baseline: Upserts that remove a backend no socket is connected
    // to, while SOCKETS sockets connected elsewhere (to b3 directly) are
    // listed and passed over: the same namespace walk and dumps as a
    // closing pass, without the closing.
    let idle = hold_sockets(&sandbox, &format!("{}:5353", backend_ip(3)));
    let mut upsert_ms = |backend: u8| {
        let started = Instant::now();
        runtime
            .block_on(client.upsert(vec![dns(backend)]))
            .expect("upsert");
        started.elapsed().as_secs_f64() * 1e3
    };
    let baseline: Vec<f64> = (0..BASELINE_UPSERTS)
        .map(|i| upsert_ms(if i % 2 == 0 { 2 } else { 1 }))
        .collect();
    let (_, baseline_ms, _) = summary(&baseline);
    let idle = idle.finish();
    assert_eq!(
        idle[0]["failed_sends"], 0,
        "idle sockets were closed: {idle:?}"
    );

    // The service is on b1 again; SOCKETS sockets are connected through it
    // and closed by moving it to b2, then it goes back to b1 (untimed, no
    // socket on b2): as many times as the baseline's half, so the first,
    // colder pass is not the figure.
    let closing: Vec<f64> = (0..CLOSING_UPSERTS)
        .map(|_| {
            let holding = hold_sockets(&sandbox, "10.96.0.10:53");
            let closing_ms = upsert_ms(2);
            let results = holding.finish();
            let failed = &results[0]["failed_sends"];
            assert_eq!(*failed, SOCKETS, "sockets not closed: {results:?}");
            upsert_ms(1);
            closing_ms
        })
        .collect();
    let (_, closing_ms, _) = summary(&closing);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Per-socket state ({SOCKETS} connected UDP sockets, connected or closed at once)\n"
    );
    let _ = writeln!(out, "| measure | value |");
    let _ = writeln!(out, "|---|---:|");
    let _ = writeln!(
        out,
        "| accounted kernel memory (kmalloc-cg-*), sockets through the VIP / to the backend directly, median of {MEMORY_ROUNDS} rounds | {:.0} / {:.0} KiB |",
        translated as f64 / 1024.0,
        direct as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "| socket-local storage per translated socket (the difference) | {per_socket:.0} bytes |"
    );
    let _ = writeln!(
        out,
        "| Upsert removing a backend, {SOCKETS} other sockets listed, none to close (median of {BASELINE_UPSERTS}) | {baseline_ms:.2} ms |"
    );
    let _ = writeln!(
        out,
        "| Upsert removing a backend, closing {SOCKETS} sockets (median of {CLOSING_UPSERTS}, fresh sockets each) | {closing_ms:.2} ms |"
    );
    let _ = writeln!(
        out,
        "| closing, per socket (the difference / {SOCKETS}) | {:.1} us |",
        (closing_ms - baseline_ms) * 1e3 / SOCKETS as f64
    );
    let _ = writeln!(
        out,
        "| closing Upsert / baseline Upsert | {:.1}x |",
        closing_ms / baseline_ms
    );
    report::write("sockets", &out);
}
