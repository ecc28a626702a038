//! `guest-hooks`: per-hook cost inside the test VM, the JIT against the
//! interpreter (same kernel with the JIT off, and Kata's kernel).

use std::{collections::BTreeMap, time::Duration};

use socklb_shim::Options;
use socklb_table::Table;
use socklb_tests::{agent_client, runtime};

use crate::*;

/// Guest hook cost per (kernel and JIT mode, workload, hook): ns per call.
pub(crate) fn guest_hooks() {
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
