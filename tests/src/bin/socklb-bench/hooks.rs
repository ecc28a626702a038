//! `hooks`: each eBPF hook's cost from BPF run-time stats, to a service
//! VIP against a destination that is not one (the same-run baseline); and
//! what a tracer attached and reading costs a connect to the VIP, against
//! none, alternated in the same run.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
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
    let agent = start(&sandbox);
    let _stats = enable_run_time_stats().expect("BPF run-time stats");
    let mut samples = Samples::new();
    for _ in 0..REPEATS {
        sample(&sandbox, &mut samples);
    }
    let mut out = hooks_table(&samples);
    out += &tracer_costs(&sandbox, &agent);
    report::write("hooks", &out);
}

/// Rounds of `hooks-against`: enough that a few percent stands out of
/// this machine's run-to-run spread (5-10%), or does not.
const AGAINST_ROUNDS: usize = 30;
/// `hooks-against`'s builds, as indexes of its samples.
const THIS: usize = 0;
const THAT: usize = 1;
const CONTROL: usize = 2;
/// The orders `hooks-against` creates and samples the builds in, one a
/// round: every order as often (`AGAINST_ROUNDS` is a multiple of 6).
const ORDERS: [[usize; 3]; 6] = [
    [THIS, THAT, CONTROL],
    [THIS, CONTROL, THAT],
    [THAT, THIS, CONTROL],
    [THAT, CONTROL, THIS],
    [CONTROL, THIS, THAT],
    [CONTROL, THAT, THIS],
];

/// `hooks-against <agent binary> <what it is>`: each hook's cost in this
/// agent's programs against another build's (an earlier commit's), in
/// sandboxes side by side, so both see the same machine at the same time.
pub(crate) fn hooks_against() {
    let mut args = std::env::args().skip(2);
    let (Some(baseline), Some(label), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: socklb-bench hooks-against <agent binary> <what that build is>");
        std::process::exit(2);
    };
    assert!(
        Path::new(&baseline).is_file(),
        "{baseline}: no such agent binary"
    );
    let baseline = PathBuf::from(baseline);
    let _stats = enable_run_time_stats().expect("BPF run-time stats");
    // This build, that build, and this build again: the last is the
    // control, whose ratio to the first is what the method cannot tell
    // apart from nothing.
    let mut samples: [Samples; 3] = Default::default();
    for round in 0..AGAINST_ROUNDS {
        // New sandboxes each round, created and sampled in each of the six
        // orders in turn: where the kernel put a sandbox's maps shows in
        // its hooks (15% on a no-VIP connect4 between two sandboxes of one
        // build, every round), and so may what ran just before, so no
        // build keeps a place or a neighbour.
        let order = ORDERS[round % ORDERS.len()];
        let mut sandboxes = [Sandbox::create(), Sandbox::create(), Sandbox::create()];
        for (sandbox, build) in sandboxes.iter_mut().zip(order) {
            if build == THAT {
                sandbox.agent_bin = baseline.clone();
            }
        }
        let _agents = sandboxes.each_ref().map(start);
        // Not counted: a sandbox's first sockets pay for allocations
        // later ones reuse.
        for sandbox in &sandboxes {
            sample(sandbox, &mut Samples::new());
        }
        for (sandbox, build) in sandboxes.iter().zip(order) {
            sample(sandbox, &mut samples[build]);
        }
        // The ratios pair the builds' samples by round: a hook sampled in
        // a build is sampled in every round of it (one that never runs in
        // some build is left out of the table).
        for key in samples.iter().flat_map(Samples::keys) {
            for build in &samples {
                let sampled = build.get(key).map_or(0, Vec::len);
                assert!(
                    sampled == 0 || sampled == round + 1,
                    "{key:?} sampled in {sampled} of {} rounds",
                    round + 1
                );
            }
        }
    }
    report::write("hooks-against", &against_table(&samples, &label));
}

/// Each hook of each workload: both builds' medians, the median and range
/// of the per-round ratios (which cancel what a round shares: the
/// machine's load, memory, frequency), and the control's.
fn against_table(samples: &[Samples; 3], label: &str) -> String {
    let (this, that, control) = (&samples[THIS], &samples[THAT], &samples[CONTROL]);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = format!(
        "## Per-hook cost against {label}\n\n\
         BPF run-time stats, kernel {}, {CALLS} calls per workload and round, \
         {AGAINST_ROUNDS} rounds; each round three new sandboxes side by side: this \
         build, that one, and this one again as a control, created and run in each of \
         the six orders in turn. A ratio is the median of the rounds' ratios, with their \
         range; the control's says how far from 1.00x this method reads two runs of \
         the same programs.\n\n\
         | workload | hook | this build, ns/call | that build | this / that | min - max | \
         control: this / this | min - max |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
        kernel.trim()
    );
    let ratios = |a: &[f64], b: &[f64]| {
        let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
        summary(&ratios)
    };
    for (key, ours) in this {
        let (Some(theirs), Some(again)) = (that.get(key), control.get(key)) else {
            continue;
        };
        let (min, median, max) = ratios(ours, theirs);
        let (control_min, control, control_max) = ratios(ours, again);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {median:.3}x | {min:.2}-{max:.2} | {control:.3}x | \
             {control_min:.2}-{control_max:.2} |",
            key.0,
            key.1,
            summary(ours).1,
            summary(theirs).1
        );
    }
    out
}

/// The benchmark's services in `sandbox`: one backend serving TCP and
/// UDP, a VIP for each, programmed by an agent of `sandbox.agent_bin`.
fn start(sandbox: &Sandbox) -> Agent {
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
    sandbox.start_agent(Some(&table))
}

/// One run of each workload (TCP and UDP, to the VIP and to the backend
/// itself) in `sandbox`: each hook's ns per call, added to `samples`.
fn sample(sandbox: &Sandbox, samples: &mut Samples) {
    let backend = backend_ip(1);
    let tcp_backend = format!("{backend}:8080");
    let udp_backend = format!("{backend}:5353");
    let workloads: [(&str, [&str; 4]); 4] = [
        ("TCP to VIP", ["tcp", "10.96.0.20:80", "--count", CALLS]),
        ("TCP to non-VIP", ["tcp", &tcp_backend, "--count", CALLS]),
        ("UDP to VIP", ["udp", "10.96.0.10:53", "--count", CALLS]),
        ("UDP to non-VIP", ["udp", &udp_backend, "--count", CALLS]),
    ];
    for (workload, args) in workloads {
        let before = hook_stats(&sandbox.bpffs).expect("hook stats");
        let results = sandbox.client(&args);
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

/// A tracer attached to the sandbox's agent, reading every event on a
/// thread of its own until dropped.
struct Tracer {
    events: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl Tracer {
    fn attach(sandbox: &Sandbox, agent: &Agent) -> Tracer {
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
        // Attached once the agent has the request and swapped the twins in.
        agent
            .next_record("tracer attached", Duration::from_secs(10))
            .expect("the tracer attached");
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
            .expect("connect4 ran, one program throughout");
        (result["per_sec"].as_f64().expect("per_sec"), connect4)
    };
    let mut untraced = (Vec::new(), Vec::new());
    let mut traced = (Vec::new(), Vec::new());
    let (mut events, mut dropped) = (0, 0);
    load();
    for round in 0..REPEATS {
        for with_tracer in [round % 2 == 1, round % 2 == 0] {
            let tracer = with_tracer.then(|| Tracer::attach(sandbox, agent));
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

/// ns per call between two reads of one hook's stats; none if it ran no
/// call, or another program ran it in between (a tracer's twin swapped).
pub(crate) fn ns_per_call(before: &HookStats, after: &HookStats) -> Option<f64> {
    if before.program_id != after.program_id {
        return None;
    }
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
