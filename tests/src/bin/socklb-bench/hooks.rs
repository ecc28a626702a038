//! `hooks`: each eBPF hook's cost from BPF run-time stats, to a service
//! VIP against a destination that is not one (the same-run baseline); and
//! what a tracer attached and reading costs a connect to the VIP, against
//! none, alternated in the same run.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use socklb_agent::datapath::{HookStats, enable_run_time_stats, hook_stats};
use socklb_protocols::socklb as api;
use socklb_tests::{Agent, Sandbox, backend_ip};

use crate::*;

/// ns per call of each hook, per workload, over `REPEATS` runs.
pub(crate) type Samples = BTreeMap<(&'static str, &'static str), Vec<f64>>;

pub(crate) fn hooks() {
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
    let agent = sandbox.start_agent(Some(&table));
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
    let mut out = hooks_table(&samples);
    out += &tracer_costs(&sandbox, &agent);
    report::write("hooks", &out);
}

/// A tracer attached to the sandbox's agent, reading every event on a
/// thread of its own until dropped.
struct Tracer {
    events: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl Tracer {
    fn attach(sandbox: &Sandbox) -> Tracer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (events, dropped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut client = socklb_tests::agent_client(&sandbox.api_addr(), Default::default());
        let mut stream = runtime
            .block_on(client.trace(&api::TraceRequest::default()))
            .expect("attach a tracer");
        let (counted, counted_dropped) = (events.clone(), dropped.clone());
        runtime.spawn(async move {
            let _client = client;
            while let Ok(Some(event)) = stream.recv().await {
                counted.fetch_add(1, Ordering::Relaxed);
                counted_dropped.store(event.dropped, Ordering::Relaxed);
            }
        });
        // The agent attaches once it has the request.
        std::thread::sleep(Duration::from_millis(200));
        Tracer {
            events,
            dropped,
            _runtime: runtime,
        }
    }
}

/// connect4's run time to the VIP and connections per second through it,
/// without a tracer and with one attached and reading, alternated
/// (ABBA) over `REPEATS` rounds.
fn tracer_costs(sandbox: &Sandbox, agent: &Agent) -> String {
    const LOAD_MS: &str = "2000";
    let load = || {
        let before = hook_stats(&sandbox.bpffs).expect("hook stats");
        let result = sandbox
            .client(&["load", "10.96.0.20:80", "--threads", "4", "--ms", LOAD_MS])
            .remove(0);
        assert_eq!(result["errors"], 0, "{result}");
        let after = hook_stats(&sandbox.bpffs).expect("hook stats");
        let connect4 = before
            .iter()
            .zip(&after)
            .find(|(_, a)| a.hook == "connect4")
            .and_then(|(b, a)| ns_per_call(b, a))
            .expect("connect4 ran");
        (result["per_sec"].as_f64().expect("per_sec"), connect4)
    };
    let mut untraced = (Vec::new(), Vec::new());
    let mut traced = (Vec::new(), Vec::new());
    let (mut events, mut dropped) = (0, 0);
    load();
    for round in 0..REPEATS {
        for with_tracer in [round % 2 == 1, round % 2 == 0] {
            let tracer = with_tracer.then(|| Tracer::attach(sandbox));
            let (per_sec, ns) = load();
            let into = if with_tracer {
                &mut traced
            } else {
                &mut untraced
            };
            into.0.push(per_sec);
            into.1.push(ns);
            if let Some(tracer) = tracer {
                events += tracer.events.load(Ordering::Relaxed);
                dropped = dropped.max(tracer.dropped.load(Ordering::Relaxed));
                drop(tracer);
                // Detached at the stream's next send, a keep-alive at the
                // latest: the next untraced round must not trace.
                agent
                    .next_record("tracer detached", Duration::from_secs(10))
                    .expect("the tracer detached");
            }
        }
    }
    let median = |values: &[f64]| summary(values).1;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## A tracer attached (`socklb-shim trace`), {REPEATS} rounds alternated\n"
    );
    let _ = writeln!(
        out,
        "| measure (median) | no tracer | tracer attached and reading | with / without |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (what, without, with) in [
        (
            format!("connections/s through the VIP (4 threads, {LOAD_MS} ms)"),
            median(&untraced.0),
            median(&traced.0),
        ),
        (
            "connect4 to the VIP, ns/call".to_string(),
            median(&untraced.1),
            median(&traced.1),
        ),
    ] {
        let _ = writeln!(
            out,
            "| {what} | {without:.0} | {with:.0} | {:.3}x |",
            with / without
        );
    }
    let _ = writeln!(
        out,
        "\nThe tracer read {events} events in all; the hooks skipped {dropped} past the \
         agent's default rate (1,000 per CPU and second, `--trace-rate`)."
    );
    out
}

pub(crate) fn ns_per_call(before: &HookStats, after: &HookStats) -> Option<f64> {
    let calls = after.run_count - before.run_count;
    (calls > 0).then(|| (after.run_time - before.run_time).as_nanos() as f64 / calls as f64)
}

pub(crate) fn hooks_table(samples: &Samples) -> String {
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

pub(crate) fn baseline_name(proto: &str) -> &'static str {
    if proto == "TCP" {
        "TCP to non-VIP"
    } else {
        "UDP to non-VIP"
    }
}
