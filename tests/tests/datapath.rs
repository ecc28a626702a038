//! The datapath with real sockets: the agent binary on a test cgroup,
//! clients in a client namespace, backends in a backends namespace. The
//! agent's own lifecycle (restarts, reloads, refusals) is in
//! agent_lifecycle.rs.
//! Needs root (CI runs as root); `cargo xtask test` runs these.

use std::{collections::BTreeSet, process::Command, thread::sleep, time::Duration};

use nix::sys::signal::Signal;
use serde_json::Value;
use socklb_tests::{
    Sandbox, backend_ip, backend_ip6,
    workload::{backend_counts, errno, now_us, ok, one, start_backends, tcp_backends, web_table},
};

const ENETUNREACH: i64 = 101;
const ECONNREFUSED: i64 = 111;

#[test]
fn tcp_via_vip_with_port_remap() {
    socklb_tests::require_root!();
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
    socklb_tests::require_root!();
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
    socklb_tests::require_root!();
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

/// One unconnected socket asking 10.96.0.11:53 (on b`first`) and
/// 10.96.0.12:53 (on b`second`) in turn, three rounds: its six replies.
fn two_udp_vips_from_one_socket(first: u8, second: u8) -> Vec<Value> {
    let sandbox = Sandbox::create();
    start_backends(&sandbox, first.max(second));
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services:
  - {{vip: 10.96.0.11, port: 53, protocol: UDP, backends: [{{ip: {}, port: 5353}}]}}
  - {{vip: 10.96.0.12, port: 53, protocol: UDP, backends: [{{ip: {}, port: 5353}}]}}",
            backend_ip(first),
            backend_ip(second)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    let results = sandbox.client(&["udp-multi", "10.96.0.11:53", "10.96.0.12:53"]);
    assert_eq!(ok(&results).len(), 6);
    results
}

#[test]
fn one_socket_talks_to_several_vips() {
    socklb_tests::require_root!();
    for r in &two_udp_vips_from_one_socket(1, 2) {
        assert_eq!(r["source"], r["to"], "each reply maps back to its own VIP");
        let expected = if r["to"] == "10.96.0.11:53" {
            "b1"
        } else {
            "b2"
        };
        assert_eq!(r["backend"], expected);
    }
}

/// Two VIPs with the same backend endpoint, asked in turn from one socket:
/// a reply cannot say which VIP it answers, so it is shown as the VIP of
/// the socket's latest datagram (a resolver asking one server at a time
/// gets every reply from the server it asked).
#[test]
fn two_vips_sharing_a_backend_on_one_socket() {
    socklb_tests::require_root!();
    for r in &two_udp_vips_from_one_socket(1, 1) {
        assert_eq!(r["source"], r["to"], "the reply shows the VIP asked last");
    }
}

#[test]
fn glibc_resolver_through_a_dns_vip() {
    socklb_tests::require_root!();
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
    socklb_tests::require_root!();
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
    socklb_tests::require_root!();
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
    socklb_tests::require_root!();
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
    socklb_tests::require_root!();
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

/// An externalIP that is also a host's own address (a node IP): socklb
/// takes its service's port, and leaves every other port to the host
/// (SSH, kubelet, NodePorts), as kube-proxy does; a cluster VIP's other
/// ports are still refused.
#[test]
fn an_external_vip_leaves_its_other_ports_alone() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let node = backend_ip(2);
    let (node_tcp, node_udp) = (format!("{node}:2222"), format!("{node}:2223"));
    sandbox.backend("node", &[&node_tcp], &[&node_udp]);
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services:
  - {{vip: {node}, port: 80, vipKind: external, backends: [{backends}]}}
  - {{vip: 10.96.0.20, port: 80, backends: [{backends}]}}",
            backends = tcp_backends(1)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    let r = one(sandbox.client(&["tcp", &node_tcp]));
    assert_eq!(
        (&r["backend"], &r["peer"]),
        (&"node".into(), &node_tcp.clone().into()),
        "{r}"
    );
    for connected in [&[][..], &["--connected"]] {
        let args = [&["udp", &node_udp][..], connected].concat();
        let r = one(sandbox.client(&args));
        assert_eq!(
            (&r["backend"], &r["source"]),
            (&"node".into(), &node_udp.clone().into()),
            "{args:?}: {r}"
        );
    }
    let r = one(sandbox.client(&["tcp", &format!("{node}:80")]));
    assert_eq!(
        (&r["backend"], &r["peer"]),
        (&"b1".into(), &format!("{node}:80").into()),
        "translated: {r}"
    );
    let r = &sandbox.client(&["tcp", "10.96.0.20:2222"])[0];
    assert_eq!(errno(r), ECONNREFUSED, "a cluster VIP's other port: {r}");
}

#[test]
fn a_known_vip_on_an_unknown_port_is_refused_at_once() {
    socklb_tests::require_root!();
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
    socklb_tests::require_root!();
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
    socklb_tests::require_root!();
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
fn getsockname_hides_a_backend_local_to_the_pod() {
    socklb_tests::require_root!();
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
    // A node-local proxy's setup: a loopback backend, which the agent
    // takes only when told to.
    let _agent = sandbox.start_agent_with(Some(&table), &["--allow-loopback-backends"]);
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
    socklb_tests::require_root!();
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
