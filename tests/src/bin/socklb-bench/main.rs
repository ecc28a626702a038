//! socklb benchmarks, run by `cargo xtask bench` (as root).
//!
//! `hooks`: the cost of each eBPF hook from the kernel's BPF run-time stats,
//! for traffic to a service VIP and, as the baseline measured in the same
//! run, to a destination that is not a service.
//!
//! `control-plane`: a full Sync of 10,000 services x 8 backends (time to
//! acknowledgement, agent RSS and map memory after it) and one-service
//! Upserts, against a bare Health.Check round trip as the baseline.
//!
//! `datapath`: socklb against direct pod IPs, kube-proxy-style iptables
//! and nftables at 1, 1,000 and 10,000 services (see `modes`); writes
//! target/socklb/bench/datapath.md and datapath.svg.
//!
//! `guest-hooks`: per-hook cost inside the test VM (QEMU TCG), JIT against
//! the interpreter: the project's kernel with its JIT on, the same kernel
//! and boot with `net.core.bpf_jit_enable=0` (programs reloaded), and
//! Kata's default kernel options (no JIT at all). Needs the guest images
//! (`cargo xtask bench` builds them).
//!
//! `kube`: the Kubernetes translation at 10,000 services (events per second
//! of incremental translation, against a full recompute), and the time from
//! an EndpointSlice change at a (fake) API server to the agent's
//! acknowledgement through `socklb-shim kube`.
//!
//! `node`: one `socklb-shim node` serving 200 sandboxes against one
//! `socklb-shim kube` process per sandbox (see `node`).

mod modes;
mod node;
mod report;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use socklb_agent::datapath::{HookStats, enable_run_time_stats, hook_stats};
use socklb_shim::Options;
use socklb_table::{Protocol, Service, ServiceKey, Table};
use socklb_tests::{
    Sandbox, agent_client,
    apiserver::{FakeApiServer, Kind},
    backend_ip, runtime,
};

const CALLS: &str = "2000";
const REPEATS: usize = 3;

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("hooks") => hooks(),
        Some("control-plane") => control_plane(),
        Some("kube") => kube(),
        Some("datapath") => datapath(),
        Some("guest-hooks") => guest_hooks(),
        Some("node") => node::node(),
        _ => {
            eprintln!("usage: socklb-bench hooks|control-plane|kube|datapath|guest-hooks|node");
            std::process::exit(2);
        }
    }
}

/// ns per call of each hook, per workload, over `REPEATS` runs.
type Samples = BTreeMap<(&'static str, &'static str), Vec<f64>>;

fn hooks() {
    let sandbox = Sandbox::create();
    let backend = backend_ip(1);
    sandbox.backend(
        "b1",
        &[&format!("{backend}:8080")],
        &[&format!("{backend}:5353")],
    );
    let table = sandbox.table(
        "bench.yaml",
        &format!(
            "services:
  - {{vip: 10.96.0.20, port: 80, backends: [{{ip: {backend}, port: 8080}}]}}
  - {{vip: 10.96.0.10, port: 53, protocol: UDP, backends: [{{ip: {backend}, port: 5353}}]}}"
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    let _stats = enable_run_time_stats().expect("BPF run-time stats");

    let tcp_backend = format!("{backend}:8080");
    let udp_backend = format!("{backend}:5353");
    let workloads: [(&str, Vec<&str>); 4] = [
        ("TCP to VIP", vec!["tcp", "10.96.0.20:80", "--count", CALLS]),
        (
            "TCP to non-VIP",
            vec!["tcp", &tcp_backend, "--count", CALLS],
        ),
        ("UDP to VIP", vec!["udp", "10.96.0.10:53", "--count", CALLS]),
        (
            "UDP to non-VIP",
            vec!["udp", &udp_backend, "--count", CALLS],
        ),
    ];
    let mut samples = Samples::new();
    for _ in 0..REPEATS {
        for (workload, args) in &workloads {
            let before = hook_stats(&sandbox.bpffs).expect("hook stats");
            let results = sandbox.client(args);
            assert!(
                results.iter().all(|r| r.get("error").is_none()),
                "{workload} failed"
            );
            let after = hook_stats(&sandbox.bpffs).expect("hook stats");
            for (b, a) in before.iter().zip(&after) {
                if let Some(ns) = ns_per_call(b, a) {
                    samples.entry((workload, a.hook)).or_default().push(ns);
                }
            }
        }
    }
    report::write("hooks", &hooks_table(&samples));
}

/// Guest hook cost per (kernel and JIT mode, workload, hook): ns per call.
fn guest_hooks() {
    use socklb_tests::vm::{GuestImage, Vm};
    const GUEST_CALLS: &str = "500";
    let table = Table::parse(include_str!("../../../../rootfs/demo-table.yaml")).unwrap();
    let workloads: [(&str, [&str; 4]); 3] = [
        (
            "TCP to VIP",
            ["tcp", "10.96.0.20:80", "--count", GUEST_CALLS],
        ),
        (
            "TCP to non-VIP",
            ["tcp", "10.244.1.1:8080", "--count", GUEST_CALLS],
        ),
        (
            "UDP to VIP",
            ["udp", "10.96.0.11:53", "--count", GUEST_CALLS],
        ),
    ];
    let runtime = runtime();
    let options = Options {
        connect_timeout: Duration::from_secs(60),
        ..Options::default()
    };
    // (mode, workload, hook) -> ns per call, one sample per repeat.
    let mut samples: BTreeMap<(&str, &str, String), Vec<f64>> = BTreeMap::new();
    let mut measure = |mode: &'static str, vm: &Vm, client: &mut socklb_shim::AgentClient| {
        for _ in 0..REPEATS {
            for (workload, args) in &workloads {
                let before = runtime.block_on(client.stats()).expect("stats").hooks;
                let results = vm.testkit(args);
                assert!(
                    results.iter().all(|r| r.get("error").is_none()),
                    "{mode}: {workload} failed"
                );
                let after = runtime.block_on(client.stats()).expect("stats").hooks;
                for (b, a) in before.iter().zip(&after) {
                    let calls = a.run_count - b.run_count;
                    if calls >= 100 {
                        let ns = (a.run_time_ns - b.run_time_ns) as f64 / calls as f64;
                        samples
                            .entry((mode, workload, a.hook.clone()))
                            .or_default()
                            .push(ns);
                    }
                }
            }
        }
    };
    for (name, modes) in [
        ("OWN", &["own kernel, JIT", "own kernel, interpreter"][..]),
        ("KATA", &["Kata's kernel (interpreter)"][..]),
    ] {
        let vm = Vm::boot(&GuestImage::from_env(name), "socklb.bpf_stats=1");
        let mut client = agent_client(&vm.agent_addr(), options.clone());
        runtime.block_on(client.sync(table.clone())).expect("sync");
        measure(modes[0], &vm, &mut client);
        if let Some(interpreted) = modes.get(1) {
            // New programs load interpreted; the client resyncs the table.
            let reload = vm.exec(&[
                "sh",
                "-c",
                "echo 0 > /proc/sys/net/core/bpf_jit_enable && kill -9 $(pidof socklb-agent) \
                 && socklb-agent --detach && start-agent",
            ]);
            assert_eq!(reload["status"], 0, "{reload}");
            runtime.block_on(client.sync(table.clone())).expect("sync");
            measure(interpreted, &vm, &mut client);
        }
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut report = format!(
        "## Per-hook cost in the test VM: JIT vs interpreter\n\nQEMU TCG (1 vCPU, software \
         emulation) on a {cpus}-CPU host; guest kernels 6.1; BPF run-time stats, \
         {GUEST_CALLS} calls x {REPEATS} runs.\n\n\
         | kernel, mode | workload | hook | ns/call median | min - max | vs own kernel, JIT |\n\
         |---|---|---|---:|---:|---:|\n"
    );
    for ((mode, workload, hook), values) in &samples {
        let (min, median, max) = summary(values);
        let jit = samples
            .get(&("own kernel, JIT", workload, hook.clone()))
            .map(|b| format!("{:.2}x", median / summary(b).1))
            .unwrap_or_default();
        report.push_str(&format!(
            "| {mode} | {workload} | {hook} | {median:.0} | {min:.0} - {max:.0} | {jit} |\n"
        ));
    }
    report::write("guest-hooks", &report);
}

fn ns_per_call(before: &HookStats, after: &HookStats) -> Option<f64> {
    let calls = after.run_count - before.run_count;
    (calls > 0).then(|| (after.run_time - before.run_time).as_nanos() as f64 / calls as f64)
}

fn hooks_table(samples: &Samples) -> String {
    let mut out = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(
        out,
        "## Per-hook cost (BPF run-time stats, kernel {}, {CALLS} calls x {REPEATS} runs)\n",
        kernel.trim()
    );
    let _ = writeln!(
        out,
        "| workload | hook | ns/call median | min | max | VIP / non-VIP |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
    for ((workload, hook), values) in samples {
        let (min, median, max) = summary(values);
        let baseline = workload
            .strip_suffix(" to VIP")
            .and_then(|proto| samples.get(&(baseline_name(proto), *hook)))
            .map(|b| format!("{:.2}x", median / summary(b).1))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| {workload} | {hook} | {median:.0} | {min:.0} | {max:.0} | {baseline} |"
        );
    }
    out
}

fn baseline_name(proto: &str) -> &'static str {
    if proto == "TCP" {
        "TCP to non-VIP"
    } else {
        "UDP to non-VIP"
    }
}

fn summary(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
    )
}

const SERVICES: u32 = 10_000;
const BACKENDS: u32 = 8;
const UPSERTS: usize = 1_000;

/// Service `i` of the benchmark table: VIP 10.96.x.y:80, backends spread
/// over 10.244/16, shifted by `round` so successive tables differ.
fn bench_service(i: u32, round: u32) -> Service {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
    let backends = (0..BACKENDS)
        .map(|b| {
            let host = (i * BACKENDS + b + round) % 65_000 + 1;
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 244, 0, 0)) + host,
                )),
                8080,
            )
        })
        .collect();
    Service {
        name: Some(format!("bench/svc-{i}")),
        key: ServiceKey {
            vip: IpAddr::V4(vip),
            port: 80,
            protocol: Protocol::Tcp,
        },
        affinity_timeout_secs: None,
        backends,
    }
}

fn control_plane() {
    let sandbox = Sandbox::create();
    let agent = sandbox.start_agent(None);
    let runtime = runtime();
    let options = Options {
        call_timeout: Duration::from_secs(300),
        ..Options::default()
    };
    let mut client = agent_client(&sandbox.api_addr(), options);

    let mut sync_times = Vec::new();
    for round in 0..REPEATS as u32 {
        runtime
            .block_on(client.sync(Table::default()))
            .expect("empty sync");
        let table = Table {
            services: (0..SERVICES).map(|i| bench_service(i, round)).collect(),
        };
        let started = Instant::now();
        let result = runtime.block_on(client.sync(table)).expect("full sync");
        sync_times.push(started.elapsed().as_secs_f64());
        assert_eq!(result.services, SERVICES);
    }
    let pid = agent.pid().as_raw();
    let rss_kib = proc_status_kib(pid, "VmRSS:");
    let map_kib = map_memlock_kib(pid);

    let mut checks = Vec::new();
    let mut upserts = Vec::new();
    for n in 0..UPSERTS {
        let started = Instant::now();
        runtime.block_on(client.check()).expect("health check");
        checks.push(started.elapsed().as_secs_f64() * 1e3);
        let service = bench_service((n as u32 * 7919) % SERVICES, 1_000 + n as u32);
        let started = Instant::now();
        runtime
            .block_on(client.upsert(vec![service]))
            .expect("upsert");
        upserts.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let (sync_min, sync_median, sync_max) = summary(&sync_times);
    let check = percentiles(&mut checks);
    let upsert = percentiles(&mut upserts);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Control plane ({SERVICES} services x {BACKENDS} backends, unix socket)\n"
    );
    let _ = writeln!(out, "| measure | value |");
    let _ = writeln!(out, "|---|---:|");
    let _ = writeln!(
        out,
        "| full Sync to acknowledgement, min / median / max of {REPEATS} | {sync_min:.2} / {sync_median:.2} / {sync_max:.2} s |"
    );
    let _ = writeln!(
        out,
        "| agent RSS after the Syncs | {:.1} MiB |",
        rss_kib as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "| eBPF map memory (memlock, all maps) | {:.1} MiB |",
        map_kib as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "| Upsert of one service, p50 / p99 of {UPSERTS} | {:.3} / {:.3} ms |",
        upsert.0, upsert.1
    );
    let _ = writeln!(
        out,
        "| Health.Check round trip (baseline), p50 / p99 | {:.3} / {:.3} ms |",
        check.0, check.1
    );
    let _ = writeln!(
        out,
        "| Upsert p50 / Health.Check p50 | {:.1}x |",
        upsert.0 / check.0
    );
    report::write("control-plane", &out);
}

/// p50 and p99.
fn percentiles(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("field in /proc status")
}

/// Kernel memory charged to the eBPF maps the agent holds open.
fn map_memlock_kib(pid: i32) -> u64 {
    let mut bytes = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .flatten()
    {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if info.contains("map_type:") {
            bytes += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    bytes / 1024
}

fn k8s_service(i: u32) -> serde_json::Value {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
    serde_json::json!({"metadata": {"namespace": "bench", "name": format!("svc-{i}")},
        "spec": {"clusterIP": vip.to_string(), "ports": [{"name": "http", "port": 80}]}})
}

/// Service `i`'s slice; `round` shifts its endpoint addresses.
fn k8s_slice(i: u32, round: u32) -> serde_json::Value {
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

fn kube() {
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
    // A sustained stream: each event arrives as the JSON the API server
    // sends and is decoded, applied, translated and planned in turn.
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
        "| events per second sustained over that stream ({events} events in {stream_secs:.2} s, decoding included) | {:.0} |",
        f64::from(events) / stream_secs
    );
    let _ = writeln!(
        out,
        "| full translation / one incremental event | {:.0}x |",
        full_median / per_event
    );
    let _ = writeln!(
        out,
        "| EndpointSlice change at the API server to the agent's acknowledgement, p50 / p99 of 200 (batch {batch_ms} ms) | {:.1} / {:.1} ms |",
        latency.0, latency.1
    );
    report::write("kube", &out);
}

fn datapath() {
    let results = modes::run();
    let report = format!(
        "## Datapath: socklb vs direct, iptables, nftables\n\nClient with 4 threads, 8 backends, \
         all in network namespaces on this machine.\n\n{}",
        results.markdown()
    );
    report::write("datapath", &report);
    results
        .plot(&report::output_dir().join("datapath.svg"))
        .expect("plot");
    report::publish("datapath.svg");
}
