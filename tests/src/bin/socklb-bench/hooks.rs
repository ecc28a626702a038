//! `hooks`: each eBPF hook's cost from BPF run-time stats, to a service
//! VIP against a destination that is not one (the same-run baseline).

use std::{collections::BTreeMap, fmt::Write as _};

use socklb_agent::datapath::{HookStats, enable_run_time_stats, hook_stats};
use socklb_tests::{Sandbox, backend_ip};

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
