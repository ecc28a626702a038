//! Updates are atomic per service, seen from a client that connects all the
//! while: a backend set replaced whole, grown and shrunk, by Upserts and by
//! Syncs through the shim's client library. No connect may fail; every
//! connect lands in the old set or the new one while an update runs, and in
//! the new one once the RPC that made it has returned. A long-lived UDP
//! socket's remembered backend is dropped with the backend. Needs root.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    thread::sleep,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use socklb_shim::Options;
use socklb_table::{Protocol, Service, ServiceKey, Table, VipKind};
use socklb_tests::{Sandbox, agent_client, backend_ip, runtime};

/// Backends b1..=b6, each on its own address.
const BACKENDS: u8 = 6;
/// Updates per test, alternating between the two sets.
const ROUNDS: usize = 12;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// 10.96.0.20:80/TCP on the backends numbered in `set`.
fn web(set: &[u8]) -> Service {
    Service {
        name: Some("default/web".into()),
        key: ServiceKey {
            vip: "10.96.0.20".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        vip_kind: VipKind::Cluster,
        affinity_timeout_secs: None,
        backends: set
            .iter()
            .map(|n| SocketAddr::new(backend_ip(*n).parse().unwrap(), 8080))
            .collect(),
    }
}

/// 10.96.0.10:53/UDP on the backends numbered in `set`, port 5353.
fn dns(set: &[u8]) -> Service {
    Service {
        name: Some("kube-system/dns".into()),
        key: ServiceKey {
            vip: "10.96.0.10".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        },
        vip_kind: VipKind::Cluster,
        affinity_timeout_secs: None,
        backends: set
            .iter()
            .map(|n| SocketAddr::new(backend_ip(*n).parse().unwrap(), 5353))
            .collect(),
    }
}

fn names(set: &[u8]) -> BTreeSet<String> {
    set.iter().map(|n| format!("b{n}")).collect()
}

/// One update: the set it installed and when its RPC began and returned.
struct Update {
    set: &'static [u8],
    begun_us: u64,
    acknowledged_us: u64,
}

/// Switches the service between `old` and `new` [`ROUNDS`] times (Upserts
/// and Syncs in turn) while a pod connects to it again and again, then
/// checks every connection against the updates around it.
fn switch_under_a_connecting_client(old: &'static [u8], new: &'static [u8]) {
    let sandbox = Sandbox::with_backend_hosts(BACKENDS);
    for n in 1..=BACKENDS {
        sandbox.backend(&format!("b{n}"), &[&format!("{}:8080", backend_ip(n))], &[]);
    }
    let _agent = sandbox.start_agent(None);
    let runtime = runtime();
    let mut client = agent_client(&sandbox.api_addr(), Options::default());
    runtime
        .block_on(client.sync(Table::new(vec![web(old)]).unwrap()))
        .expect("first sync");

    let connecting = sandbox.spawn_client(&["tcp-loop", "10.96.0.20:80", "--ms", "4000"]);
    sleep(Duration::from_millis(300));
    let mut updates = Vec::new();
    for round in 0..ROUNDS {
        let set = if round % 2 == 0 { new } else { old };
        let begun_us = now_us();
        if round % 4 < 2 {
            runtime
                .block_on(client.upsert(vec![web(set)]))
                .expect("upsert");
        } else {
            runtime
                .block_on(client.sync(Table::new(vec![web(set)]).unwrap()))
                .expect("sync");
        }
        updates.push(Update {
            set,
            begun_us,
            acknowledged_us: now_us(),
        });
        sleep(Duration::from_millis(250));
    }
    let results = connecting.finish();

    let failed: Vec<&Value> = results
        .iter()
        .filter(|r| r.get("error").is_some())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} connects failed, first {}",
        failed.len(),
        results.len(),
        failed[0]
    );
    let either: BTreeSet<String> = names(old).union(&names(new)).cloned().collect();
    let mut checked_after_ack = 0;
    for result in &results {
        let backend = result["backend"].as_str().unwrap();
        assert!(
            either.contains(backend),
            "a connect landed on {backend}, in neither {old:?} nor {new:?}"
        );
        let (start, end) = (
            result["start_us"].as_u64().unwrap(),
            result["end_us"].as_u64().unwrap(),
        );
        // The last update acknowledged before this connection started, if
        // the next one had not begun before it ended.
        let Some(index) = updates.iter().rposition(|u| u.acknowledged_us <= start) else {
            continue;
        };
        if updates
            .get(index + 1)
            .is_some_and(|next| next.begun_us < end)
        {
            continue;
        }
        let update = &updates[index];
        assert!(
            names(update.set).contains(backend),
            "a connect {}us after update {index} to {:?} was acknowledged landed on {backend}",
            start - update.acknowledged_us,
            update.set
        );
        checked_after_ack += 1;
    }
    // Not vacuous: many connects fell between updates, and both sets served.
    assert!(
        checked_after_ack > 10 * ROUNDS,
        "only {checked_after_ack} of {} connects fell between updates",
        results.len()
    );
    let served: BTreeSet<String> = results
        .iter()
        .map(|r| r["backend"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(served, either, "every backend of both sets served");
}

#[test]
fn a_backend_set_replaced_whole_under_a_connecting_client() {
    socklb_tests::require_root!();
    switch_under_a_connecting_client(&[1, 2, 3], &[4, 5, 6]);
}

#[test]
fn a_backend_set_grown_and_shrunk_under_a_connecting_client() {
    socklb_tests::require_root!();
    switch_under_a_connecting_client(&[1], &[1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_long_lived_udp_socket_moves_off_a_removed_backend() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    for n in 1..=3 {
        sandbox.backend(&format!("b{n}"), &[], &[&format!("{}:5353", backend_ip(n))]);
    }
    let _agent = sandbox.start_agent(None);
    let runtime = runtime();
    let mut client = agent_client(&sandbox.api_addr(), Options::default());
    runtime
        .block_on(client.sync(Table::new(vec![dns(&[1, 2])]).unwrap()))
        .expect("first sync");

    // One unconnected socket, a datagram every 50 ms for about 3 s.
    let sending = sandbox.spawn_client(&[
        "udp",
        "10.96.0.10:53",
        "--count",
        "60",
        "--interval-ms",
        "50",
    ]);
    sleep(Duration::from_millis(1000));
    let begun_us = now_us();
    runtime
        .block_on(client.upsert(vec![dns(&[3])]))
        .expect("upsert");
    let acknowledged_us = now_us();
    let results = sending.finish();

    let backend = |r: &Value| {
        assert!(r.get("error").is_none(), "a datagram failed: {r}");
        r["backend"].as_str().unwrap().to_string()
    };
    let before: BTreeSet<String> = results
        .iter()
        .filter(|r| r["end_us"].as_u64().unwrap() <= begun_us)
        .map(backend)
        .collect();
    let after: Vec<String> = results
        .iter()
        .filter(|r| r["start_us"].as_u64().unwrap() >= acknowledged_us)
        .map(backend)
        .collect();
    assert_eq!(before.len(), 1, "one socket, one backend: {before:?}");
    assert!(
        before.is_subset(&names(&[1, 2])),
        "before the update: {before:?}"
    );
    assert!(
        after.len() > 10,
        "only {} datagrams after the update",
        after.len()
    );
    assert!(
        after.iter().all(|b| b == "b3"),
        "after its backend was removed the socket still reached {after:?}"
    );
}
