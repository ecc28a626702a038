//! `kube`: the Kubernetes translation at 10,000 services, and an
//! EndpointSlice change at the API server to the agent's acknowledgement.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use socklb_tests::{
    Sandbox,
    apiserver::{FakeApiServer, Kind},
};

use crate::*;

pub(crate) fn k8s_service(i: u32) -> serde_json::Value {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
    serde_json::json!({"metadata": {"namespace": "bench", "name": format!("svc-{i}")},
        "spec": {"clusterIP": vip.to_string(), "ports": [{"name": "http", "port": 80}]}})
}

/// Service `i`'s slice; `round` shifts its endpoint addresses.
pub(crate) fn k8s_slice(i: u32, round: u32) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = bench_service(i, round)
        .backends
        .iter()
        .map(|b| serde_json::json!({"addresses": [b.ip().to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::json!({
        "metadata": {"namespace": "bench", "name": format!("svc-{i}-abc"),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints,
    })
}

pub(crate) fn kube() {
    use socklb_shim::sources::kubernetes::{Cluster, Policy, Translation};
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let policy = Policy::default();
    let mut cluster = Cluster::default();
    for i in 0..SERVICES {
        cluster.apply_service(serde_json::from_value(k8s_service(i)).unwrap());
        cluster.apply_slice(serde_json::from_value(k8s_slice(i, 0)).unwrap());
    }
    let mut translation = Translation::default();
    let mut full = Vec::new();
    for _ in 0..REPEATS {
        let started = Instant::now();
        let services = translation.full(&cluster, &policy, &log);
        full.push(started.elapsed().as_secs_f64());
        assert_eq!(services.len(), SERVICES as usize);
    }
    // A stream of events, each as the JSON the API server sends, decoded,
    // applied, translated and planned in turn, in this process: a cost per
    // event, not a rate the watch path sustains (that adds the HTTP stream
    // and the batching; the end-to-end row below goes through both).
    let events = 20_000u32;
    let stream: Vec<String> = (0..events)
        .map(|n| k8s_slice((n * 7919) % SERVICES, 1 + n).to_string())
        .collect();
    let started = Instant::now();
    for event in &stream {
        let slice = serde_json::from_str(event).expect("an EndpointSlice");
        let dirty = cluster.apply_slice(slice);
        let plan = translation.plan(&cluster, dirty, &policy, &log);
        assert_eq!(plan.upserts.len(), 1);
        translation.commit(plan);
    }
    let stream_secs = started.elapsed().as_secs_f64();
    let per_event = stream_secs / f64::from(events);
    let (_, full_median, _) = summary(&full);

    // End to end: fake API server -> socklb-shim kube -> agent.
    let sandbox = Sandbox::create();
    let _agent = sandbox.start_agent(None);
    let api = FakeApiServer::start();
    for i in 0..SERVICES {
        api.apply(Kind::Service, k8s_service(i));
        api.apply(Kind::EndpointSlice, k8s_slice(i, 0));
    }
    let kubeconfig = api.kubeconfig(sandbox.workdir.path());
    let batch_ms = "10";
    let mut shim = sandbox
        .shim_kube_command(&kubeconfig, &["--batch-ms", batch_ms])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("socklb-shim kube");
    let (lines, received) = std::sync::mpsc::channel();
    let stderr = shim.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| loop {
        let (at, line) = received
            .recv_timeout(Duration::from_secs(120))
            .expect("shim output");
        if line.contains(what) {
            return at;
        }
    };
    let synced_at = wait_for("table synced");
    let _ = synced_at;
    let mut latencies = Vec::new();
    for n in 0..200u32 {
        let pushed = Instant::now();
        api.apply(Kind::EndpointSlice, k8s_slice((n * 31) % SERVICES, 100 + n));
        let acknowledged = wait_for("batch applied");
        latencies.push((acknowledged - pushed).as_secs_f64() * 1e3);
    }
    let _ = shim.kill();
    let _ = shim.wait();
    let latency = percentiles(&mut latencies);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Kubernetes translation ({SERVICES} services, one 8-endpoint slice each)\n"
    );
    let _ = writeln!(out, "| measure | value |");
    let _ = writeln!(out, "|---|---:|");
    let _ = writeln!(
        out,
        "| full translation of the cluster (baseline), median of {REPEATS} | {:.1} ms |",
        full_median * 1e3
    );
    let _ = writeln!(
        out,
        "| incremental: one EndpointSlice event decoded, translated and planned, mean over a stream of {events} | {:.1} us |",
        per_event * 1e6
    );
    let _ = writeln!(
        out,
        "| EndpointSlice change at the API server to the agent's acknowledgement, p50 / p99 of 200 (batch {batch_ms} ms) | {:.1} / {:.1} ms |",
        latency.0, latency.1
    );
    report::write("kube", &out);
}
