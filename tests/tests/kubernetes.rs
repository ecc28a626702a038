//! socklb-shim following a Kubernetes API server: the API stand-in
//! (`socklb_tests::apiserver`) serves the fixtures below as kube-apiserver
//! would (lists in pages, watches from a resourceVersion, bookmarks, 410
//! Gone also mid-stream, 429/5xx/403 on demand, defaulted fields), the real
//! kube-rs client in the real `socklb-shim kube` drives a real agent, and
//! pods connect through the VIPs it programs. Needs root.

use std::{
    collections::BTreeSet,
    process::{Child, Stdio},
    time::Duration,
};

use nix::{errno::Errno, sys::signal::Signal};
use serde_json::{Value, json};
use socklb_shim::Options;
use socklb_tests::{
    Sandbox, agent_client,
    apiserver::{FakeApiServer, Kind},
    backend_ip, runtime,
    vm::eventually,
    workload::errno,
};

fn service(name: &str, spec: Value) -> Value {
    json!({"metadata": {"namespace": "default", "name": name}, "spec": spec})
}

fn slice(name: &str, service: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "metadata": {"namespace": "default", "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    })
}

fn endpoint(ip: &str, ready: bool, terminating: bool, node: &str) -> Value {
    json!({"addresses": [ip], "nodeName": node,
           "conditions": {"ready": ready, "serving": true, "terminating": terminating}})
}

/// The agent's table as "vip:port/proto -> [backends]" lines.
fn agent_lines(sandbox: &Sandbox) -> BTreeSet<String> {
    let runtime = runtime();
    let mut client = agent_client(&sandbox.api_addr(), Options::default());
    let (_, table, _) = runtime.block_on(client.list()).expect("list");
    table.services.iter().map(ToString::to_string).collect()
}

fn expect(sandbox: &Sandbox, what: &str, lines: &[&str]) {
    let expected: BTreeSet<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut seen = BTreeSet::new();
    let converged = eventually(Duration::from_secs(20), || {
        seen = agent_lines(sandbox);
        seen == expected
    });
    assert!(
        converged,
        "{what}: the agent holds\n{seen:#?}\nexpected\n{expected:#?}"
    );
}

struct Shim(Child);

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn follows_services_and_endpointslices_like_kube_proxy() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    for i in 1..=3 {
        sandbox.backend(
            &format!("b{i}"),
            &[&format!("{}:8080", backend_ip(i))],
            &[&format!("{}:5353", backend_ip(i))],
        );
    }
    let _agent = sandbox.start_agent(None);
    let api = FakeApiServer::start();
    let kubeconfig = api.kubeconfig(sandbox.workdir.path());

    // Objects in any order: slices before their services.
    let web_ports = json!([{"name": "http", "port": 8080}]);
    api.apply(
        Kind::EndpointSlice,
        slice(
            "web-a",
            "web",
            web_ports.clone(),
            json!([endpoint(&backend_ip(1), true, false, "node-a")]),
        ),
    );
    api.apply(
        Kind::EndpointSlice,
        slice(
            "web-b",
            "web",
            web_ports.clone(),
            json!([endpoint(&backend_ip(2), true, false, "node-b")]),
        ),
    );
    api.apply(Kind::Service, service("web", json!({
        "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
        "ports": [{"name": "http", "port": 80, "targetPort": "http"}, {"name": "sctp", "port": 9, "protocol": "SCTP"}],
        "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}
    })));
    api.apply(Kind::Service, service("dns", json!({
        "clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}],
        "internalTrafficPolicy": "Local"
    })));
    api.apply(
        Kind::EndpointSlice,
        slice(
            "dns-1",
            "dns",
            json!([{"name": "dns", "port": 5353, "protocol": "UDP"}]),
            json!([
                endpoint(&backend_ip(1), true, false, "node-a"),
                endpoint(&backend_ip(3), true, false, "node-b")
            ]),
        ),
    );
    api.apply(
        Kind::Service,
        service(
            "headless",
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
        ),
    );
    api.apply(
        Kind::Service,
        service(
            "ext",
            json!({"type": "ExternalName", "externalName": "example.org"}),
        ),
    );

    let _shim = Shim(
        sandbox
            .shim_kube_command(
                &kubeconfig,
                &["--node", "node-b", "--external-vips", "--batch-ms", "50"],
            )
            .stderr(Stdio::null())
            .spawn()
            .expect("socklb-shim kube"),
    );
    let web = format!(
        "10.96.0.20:80/TCP -> [{}:8080 {}:8080] affinity 60",
        backend_ip(1),
        backend_ip(2)
    );
    let dns = format!("10.96.0.10:53/UDP -> [{}:5353]", backend_ip(3));
    expect(&sandbox, "initial sync", &[&web, &dns]);
    let reached = sandbox.client(&["tcp", "10.96.0.20:80"]);
    assert!(
        reached[0]["backend"].as_str().unwrap().starts_with('b'),
        "{reached:?}"
    );
    let resolved = sandbox.client(&["udp", "10.96.0.10:53"]);
    assert_eq!(
        resolved[0]["backend"], "b3",
        "internalTrafficPolicy Local: the node-b endpoint"
    );

    // An endpoint starts terminating: ready ones only; once none is ready,
    // the serving terminating ones.
    api.apply(
        Kind::EndpointSlice,
        slice(
            "web-a",
            "web",
            web_ports.clone(),
            json!([endpoint(&backend_ip(1), false, true, "node-a")]),
        ),
    );
    let web_b_only = format!("10.96.0.20:80/TCP -> [{}:8080] affinity 60", backend_ip(2));
    expect(
        &sandbox,
        "terminating endpoint left out",
        &[&web_b_only, &dns],
    );
    api.delete(Kind::EndpointSlice, "default", "web-b");
    let web_terminating = format!("10.96.0.20:80/TCP -> [{}:8080] affinity 60", backend_ip(1));
    expect(
        &sandbox,
        "no ready endpoint: serving terminating ones",
        &[&web_terminating, &dns],
    );

    // Bookmarks change nothing but the version a watch resumes from: with
    // one, a watch dropped after the history before it was compacted
    // resumes without a relist. The shim's watches must ask for them.
    let kinds = [Kind::Service, Kind::EndpointSlice, Kind::Node];
    let lists = kinds.map(|kind| api.lists(kind));
    let bookmarks = kinds.map(|kind| api.bookmarks_sent(kind));
    api.bookmark();
    assert!(
        eventually(Duration::from_secs(10), || {
            kinds
                .iter()
                .zip(bookmarks)
                .all(|(kind, before)| api.bookmarks_sent(*kind) > before)
        }),
        "no bookmark reached the Service, EndpointSlice and Node watches: do they ask for them?"
    );
    let (watches, expired) = (kinds.map(|kind| api.watches(kind)), api.expired());
    api.compact();
    api.drop_watches();
    api.apply(
        Kind::EndpointSlice,
        slice(
            "web-b",
            "web",
            web_ports.clone(),
            json!([endpoint(&backend_ip(2), true, false, "node-b")]),
        ),
    );
    expect(
        &sandbox,
        "change while the watch was dropped",
        &[&web_b_only, &dns],
    );
    // Both watches opened again, each from its bookmark: no 410, no list.
    assert!(
        eventually(Duration::from_secs(10), || {
            kinds
                .iter()
                .zip(watches)
                .all(|(kind, before)| api.watches(*kind) > before)
        }),
        "the dropped watches were not opened again"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        api.expired(),
        expired,
        "a watch resumed from before its bookmark"
    );
    assert_eq!(
        kinds.map(|kind| api.lists(kind)),
        lists,
        "a dropped watch must not relist"
    );

    // The watch lags while the cluster changes and that history is then
    // compacted: an ERROR 410 mid-stream, a relist, and the table converges
    // without lost or duplicated entries.
    let (expired, slice_lists) = (api.expired(), api.lists(Kind::EndpointSlice));
    api.pause_watches();
    api.delete(Kind::Service, "default", "dns");
    api.apply(
        Kind::Service,
        service(
            "lb",
            json!({
                "type": "LoadBalancer", "clusterIP": "10.96.0.30", "externalIPs": ["10.96.1.30"],
                "ports": [{"name": "http", "port": 80}]
            }),
        ),
    );
    api.apply(
        Kind::EndpointSlice,
        slice(
            "lb-1",
            "lb",
            web_ports.clone(),
            json!([endpoint(&backend_ip(3), true, false, "node-a")]),
        ),
    );
    api.compact();
    api.resume_watches();
    let lb = |vip: &str| format!("{vip}:80/TCP -> [{}:8080]", backend_ip(3));
    expect(
        &sandbox,
        "after 410 and relist",
        &[
            &web_b_only,
            &lb("10.96.0.30"),
            &format!("{} external", lb("10.96.1.30")),
        ],
    );
    assert!(api.expired() > expired, "no 410 was sent");
    assert!(
        api.lists(Kind::EndpointSlice) > slice_lists,
        "410 Gone must relist"
    );
    assert_eq!(
        sandbox.client(&["tcp", "10.96.1.30:80"])[0]["backend"],
        "b3",
        "an externalIP is a VIP"
    );
    // Another port: a clusterIP's is refused, an externalIP's passes
    // untouched (the client namespace has no route there).
    for (target, expected) in [
        ("10.96.0.30:81", Errno::ECONNREFUSED),
        ("10.96.1.30:81", Errno::ENETUNREACH),
    ] {
        let r = &sandbox.client(&["tcp", target])[0];
        assert_eq!(errno(r), expected as i64, "{target}: {r}");
    }
}

#[test]
fn resyncs_a_restarted_agent() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    sandbox.backend("b1", &[&format!("{}:8080", backend_ip(1))], &[]);
    let mut agent = sandbox.start_agent(None);
    let api = FakeApiServer::start();
    let kubeconfig = api.kubeconfig(sandbox.workdir.path());
    api.apply(
        Kind::Service,
        service(
            "web",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
        ),
    );
    api.apply(
        Kind::EndpointSlice,
        slice(
            "web-a",
            "web",
            json!([{"port": 8080}]),
            json!([endpoint(&backend_ip(1), true, false, "n")]),
        ),
    );
    let _shim = Shim(
        sandbox
            .shim_kube_command(&kubeconfig, &["--batch-ms", "50"])
            .stderr(Stdio::null())
            .spawn()
            .expect("socklb-shim kube"),
    );
    let web = format!("10.96.0.20:80/TCP -> [{}:8080]", backend_ip(1));
    expect(&sandbox, "initial sync", &[&web]);

    // The agent restarts with an empty datapath; the next change makes the
    // shim reconnect, and it syncs the whole table first.
    agent.signal(Signal::SIGKILL);
    assert!(sandbox.agent_once(&["--detach"]).status.success());
    let _agent = sandbox.start_agent(None);
    api.apply(
        Kind::Service,
        service(
            "api",
            json!({"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}),
        ),
    );
    expect(
        &sandbox,
        "after the agent restarted",
        &[&web, "10.96.0.21:80/TCP -> []"],
    );
}

#[test]
fn a_wiped_agent_in_a_quiet_cluster_is_resynced() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    sandbox.backend("b1", &[&format!("{}:8080", backend_ip(1))], &[]);
    let mut agent = sandbox.start_agent(None);
    let api = FakeApiServer::start();
    let kubeconfig = api.kubeconfig(sandbox.workdir.path());
    api.apply(
        Kind::Service,
        service(
            "web",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
        ),
    );
    api.apply(
        Kind::EndpointSlice,
        slice(
            "web-a",
            "web",
            json!([{"port": 8080}]),
            json!([endpoint(&backend_ip(1), true, false, "n")]),
        ),
    );
    let _shim = Shim(
        sandbox
            .shim_kube_command(&kubeconfig, &["--batch-ms", "50"])
            .stderr(Stdio::null())
            .spawn()
            .expect("socklb-shim kube"),
    );
    let web = format!("10.96.0.20:80/TCP -> [{}:8080]", backend_ip(1));
    expect(&sandbox, "initial sync", &[&web]);

    // The sandbox's agent comes back empty and nothing changes in the
    // cluster: only the shim's own check of the agent can notice.
    agent.signal(Signal::SIGKILL);
    assert!(sandbox.agent_once(&["--detach"]).status.success());
    let _agent = sandbox.start_agent(None);
    expect(&sandbox, "the wiped agent, the cluster unchanged", &[&web]);
}

#[test]
fn a_relist_sends_the_agent_only_what_changed() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    let agent = sandbox.start_agent(None);
    let api = FakeApiServer::start();
    let kubeconfig = api.kubeconfig(sandbox.workdir.path());
    let line = |i: u8, backend: u8| {
        format!(
            "10.96.0.{}:80/TCP -> [{}:8080]",
            100 + i,
            backend_ip(backend)
        )
    };
    let web_slice = |i: u8, backend: u8| {
        slice(
            &format!("web{i}-a"),
            &format!("web{i}"),
            json!([{"port": 8080}]),
            json!([endpoint(&backend_ip(backend), true, false, "n")]),
        )
    };
    for i in 0..20 {
        let vip = format!("10.96.0.{}", 100 + i);
        api.apply(
            Kind::Service,
            service(
                &format!("web{i}"),
                json!({"clusterIP": vip, "ports": [{"port": 80}]}),
            ),
        );
        api.apply(Kind::EndpointSlice, web_slice(i, 1));
    }
    let _shim = Shim(
        sandbox
            .shim_kube_command(&kubeconfig, &["--batch-ms", "50"])
            .stderr(Stdio::null())
            .spawn()
            .expect("socklb-shim kube"),
    );
    let all: Vec<String> = (0..20).map(|i| line(i, 1)).collect();
    expect(
        &sandbox,
        "initial sync",
        &all.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let first = agent.wait_for("table written");
    assert_eq!(
        (first["request"].as_str(), first["sent"].as_u64()),
        (Some("sync"), Some(20)),
        "{first}"
    );

    // While the watches lag, one endpoint moves and one service goes; that
    // history is compacted, so both watches get 410 and list again.
    let (lists, expired) = (api.lists(Kind::Service), api.expired());
    api.pause_watches();
    api.apply(Kind::EndpointSlice, web_slice(3, 2));
    api.delete(Kind::Service, "default", "web7");
    api.compact();
    api.resume_watches();
    let mut now: Vec<String> = (0..20).filter(|i| *i != 7).map(|i| line(i, 1)).collect();
    now[3] = line(3, 2);
    expect(
        &sandbox,
        "after the relist",
        &now.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(api.expired() > expired && api.lists(Kind::Service) > lists);
    // What the agent was sent: one Upsert and one Delete of one each.
    let writes: BTreeSet<(String, u64)> = (0..2)
        .map(|_| {
            let write = agent.wait_for("table written");
            (
                write["request"].as_str().unwrap().to_string(),
                write["sent"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, u64)> =
        [("upsert".to_string(), 1), ("delete".to_string(), 1)].into();
    assert_eq!(writes, expected, "a relist must send only what changed");
    // And nothing more: the relists of both kinds are done by now, so any
    // further write would repeat what the agent already holds.
    let more = agent.next_record("table written", Duration::from_secs(2));
    assert_eq!(more, None, "a write after the relist's two");
}

#[test]
fn lists_in_pages_and_rides_out_throttling_server_errors_and_forbidden() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    let _agent = sandbox.start_agent(None);
    let api = FakeApiServer::start();
    let kubeconfig = api.kubeconfig(sandbox.workdir.path());
    // More than two pages of 500 (what kube-rs asks for) of each kind.
    const SERVICES: u32 = 1200;
    let vip = |i: u32| format!("10.96.{}.{}", 10 + i / 250, i % 250 + 1);
    let line = |i: u32, backend: u8| format!("{}:80/TCP -> [{}:8080]", vip(i), backend_ip(backend));
    let web_slice = |i: u32, backend: u8| {
        slice(
            &format!("web{i}-a"),
            &format!("web{i}"),
            json!([{"port": 8080}]),
            json!([endpoint(&backend_ip(backend), true, false, "n")]),
        )
    };
    for i in 0..SERVICES {
        api.apply(
            Kind::Service,
            service(
                &format!("web{i}"),
                json!({"clusterIP": vip(i), "ports": [{"port": 80}]}),
            ),
        );
        api.apply(Kind::EndpointSlice, web_slice(i, 1));
    }
    let mut lines: Vec<String> = (0..SERVICES).map(|i| line(i, 1)).collect();
    let expect_lines = |what: &str, lines: &[String]| {
        expect(
            &sandbox,
            what,
            &lines.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };

    // Throttled at the start: the first requests get 429 Too Many Requests;
    // then a list's second page is refused 410 (its revision compacted
    // away between pages), and that list starts over.
    api.fail_requests(429, 3);
    api.expire_next_continue();
    let _shim = Shim(
        sandbox
            .shim_kube_command(&kubeconfig, &["--batch-ms", "50"])
            .stderr(Stdio::null())
            .spawn()
            .expect("socklb-shim kube"),
    );
    expect_lines("listed in pages after 429s and a stale continue", &lines);
    assert_eq!(api.failures_served(), 3);
    let kinds = [Kind::Service, Kind::EndpointSlice];
    assert_eq!(
        kinds
            .map(|kind| api.lists_cut_short(kind))
            .iter()
            .sum::<usize>(),
        1,
        "no list was asked for a second page"
    );
    for kind in kinds {
        // Every whole list took 3 pages, one cut short its first only; the
        // list cut short started over.
        let (lists, cut_short) = (api.lists(kind), api.lists_cut_short(kind));
        assert!(
            api.list_pages(kind) >= 3 * (lists - cut_short) + cut_short && lists > cut_short,
            "{kind:?}: {} pages for {lists} lists, {cut_short} cut short",
            api.list_pages(kind),
        );
    }

    // The watches break and their restarts meet server errors, then a
    // Forbidden (RBAC not yet in place); changes made meanwhile arrive.
    for (code, backend, changed) in [(503, 2, 7), (403, 3, 1100)] {
        let failures = api.failures_served();
        api.fail_requests(code, 2);
        api.drop_watches();
        api.apply(Kind::EndpointSlice, web_slice(changed, backend));
        lines[changed as usize] = line(changed, backend);
        expect_lines(&format!("after {code}s"), &lines);
        assert_eq!(api.failures_served(), failures + 2, "{code} served");
    }
}

/// This node's Node in the fake API server, in `zone` (none: unlabelled).
fn this_node(zone: Option<&str>) -> Value {
    let labels = zone.map_or_else(|| json!({}), |z| json!({"topology.kubernetes.io/zone": z}));
    json!({"metadata": {"name": "node-a", "labels": labels}})
}

#[test]
fn topology_hints_follow_the_zone_of_this_node_and_other_proxies_services_are_skipped() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    let _agent = sandbox.start_agent(None);
    let api = FakeApiServer::start();
    let kubeconfig = api.kubeconfig(sandbox.workdir.path());
    api.apply(Kind::Node, this_node(Some("zone-a")));
    // Another node, after this one: only a watch of this node's Node
    // (a field selector on its name) leaves its zone out.
    api.apply(
        Kind::Node,
        json!({"metadata": {"name": "node-b", "labels": {"topology.kubernetes.io/zone": "zone-c"}}}),
    );
    api.apply(
        Kind::Service,
        service(
            "web",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}],
                   "trafficDistribution": "PreferClose"}),
        ),
    );
    // As the EndpointSlice controller hints them for PreferClose.
    let in_zone = |ip: String, zone: &str| {
        json!({"addresses": [ip], "conditions": {"ready": true},
               "hints": {"forZones": [{"name": zone}]}})
    };
    api.apply(
        Kind::EndpointSlice,
        slice(
            "web-1",
            "web",
            json!([{"port": 8080}]),
            json!([
                in_zone(backend_ip(1), "zone-a"),
                in_zone(backend_ip(2), "zone-b")
            ]),
        ),
    );
    let mut other = service(
        "other",
        json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
    );
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "another"});
    api.apply(Kind::Service, other);

    let _shim = Shim(
        sandbox
            .shim_kube_command(&kubeconfig, &["--node", "node-a", "--batch-ms", "50"])
            .stderr(Stdio::null())
            .spawn()
            .expect("socklb-shim kube"),
    );
    let only = |n: u8| format!("10.96.0.20:80/TCP -> [{}:8080]", backend_ip(n));
    expect(&sandbox, "zone-a's endpoint", &[&only(1)]);
    api.apply(Kind::Node, this_node(Some("zone-b")));
    expect(&sandbox, "the node relabelled to zone-b", &[&only(2)]);
    api.apply(Kind::Node, this_node(None));
    let both = format!(
        "10.96.0.20:80/TCP -> [{}:8080 {}:8080]",
        backend_ip(1),
        backend_ip(2)
    );
    expect(&sandbox, "no zone label: hints ignored", &[&both]);
}
