//! `node`: 200 sandboxes (199 stand-in agents + 1 real agent, all behind
//! hybrid vsock, see `socklb_tests::standin`) at 10,000 services x 8
//! backends, served by one `socklb-shim node`; the baseline in the same run
//! is one `socklb-shim kube` process per sandbox. Each of those holds the
//! whole cluster (about 50 MiB at this size), so 200 of them do not fit
//! this machine's memory: the baseline runs `BASELINE_PROCESSES` of them
//! for the first `BASELINE_PROCESSES` sandboxes, and its RSS for 200 is
//! that measured total scaled linearly (said so in the output). Both are
//! timed alike, at the `TIMED` stand-ins they both serve, by when those
//! agents applied a write: the first whole table, and an EndpointSlice
//! change at the (fake) API server (p50 / p99). Also measured: the
//! daemon's first fan-out to all 200, watches opened, RSS (the daemon's
//! peak including a verification round of every sandbox), and
//! how soon a new sandbox gets its first table while `WEDGED` sandboxes'
//! agents accept connections and never answer.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use socklb_protocols::DEFAULT_AGENT_PORT;
use socklb_shim::node::{DEFAULT_PARALLEL_SYNCS, http::get_unix, status::Report};
use socklb_tests::{
    Sandbox,
    apiserver::{FakeApiServer, Kind},
    die_with_parent, shim_bin,
    standin::{HybridFront, KataShim, SilentAgent, StandInAgent},
};

use crate::{SERVICES, k8s_service, k8s_slice, percentiles, proc_status_kib};

const SANDBOXES: usize = 200;
/// `socklb-shim kube` processes the baseline runs (see above).
const BASELINE_PROCESSES: usize = 40;
/// The sandboxes both sides are timed at: the stand-ins among the
/// baseline's (sandbox 0, the real agent, writes in another process).
const TIMED: usize = BASELINE_PROCESSES - 1;
const CHANGES: u32 = 100;
const BATCH_MS: &str = "10";
const SETTLE: Duration = Duration::from_secs(600);
/// Sandboxes whose agent accepts and never answers (a paused VM, a guest
/// without socklb), added before one more sandbox: twice the daemon's
/// permits for whole tables, so holding one each would stall it.
const WEDGED: usize = 2 * DEFAULT_PARALLEL_SYNCS;
/// The second daemon's `--verify-secs`: each idle sandbox's digest is
/// checked at its next health tick (every 5 s), so waiting `VERIFY_WAIT`
/// after its fan-out takes its peak RSS over a whole verification round.
/// (The first daemon, whose changes are timed, checks at the default
/// 300 s, as on a node.)
const VERIFY_SECS: &str = "1";
const VERIFY_WAIT: Duration = Duration::from_secs(7);

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the command name: utime and stime are the 12th and 13th.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .expect("a command name")
        .1
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64((fields[11] + fields[12]) as f64 / ticks)
}

/// Kills the children on the way out, whatever happens.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Children {
    fn rss_kib(&self) -> u64 {
        self.0
            .iter()
            .map(|c| proc_status_kib(c.id() as i32, "VmRSS:"))
            .sum()
    }
}

/// Watches opened so far: Services, EndpointSlices and the Node.
fn watches(api: &FakeApiServer) -> usize {
    [Kind::Service, Kind::EndpointSlice, Kind::Node]
        .into_iter()
        .map(|kind| api.watches(kind))
        .sum()
}

fn status(runtime: &tokio::runtime::Runtime, socket: &Path) -> Option<Report> {
    let text = runtime
        .block_on(get_unix(socket, "/status", Duration::from_secs(5)))
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// Waits until every sandbox acknowledged version `at_least` or newer;
/// the newest version then.
fn wait_all_acked(runtime: &tokio::runtime::Runtime, socket: &Path, at_least: u64) -> u64 {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(report) = status(runtime, socket)
            && report.version >= at_least
            && report.sandboxes.len() == SANDBOXES
            && report
                .sandboxes
                .iter()
                .all(|row| row.acked.is_some_and(|acked| acked >= at_least))
        {
            return report.version;
        }
        assert!(
            Instant::now() < deadline,
            "the sandboxes did not all acknowledge version {at_least}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Each agent's writes so far.
fn write_counts(agents: &[StandInAgent]) -> Vec<u64> {
    agents.iter().map(|agent| agent.writes().0).collect()
}

/// Waits until each of `agents` applied a write past its count in
/// `before`; returns when the last of them applied it, as the agents
/// themselves tell (the same clock for the daemon and the baseline).
fn all_wrote(agents: &[StandInAgent], before: &[u64]) -> Instant {
    let deadline = Instant::now() + SETTLE;
    loop {
        let writes: Vec<(u64, Option<Instant>)> = agents.iter().map(StandInAgent::writes).collect();
        if writes
            .iter()
            .zip(before)
            .all(|((count, _), before)| count > before)
        {
            return writes
                .iter()
                .filter_map(|(_, at)| *at)
                .max()
                .expect("a write has a time");
        }
        assert!(
            Instant::now() < deadline,
            "the sandboxes did not all apply the write"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub(crate) fn node() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let _entered = runtime.enter();
    let api = FakeApiServer::start();
    for i in 0..SERVICES {
        api.apply(Kind::Service, k8s_service(i));
        api.apply(Kind::EndpointSlice, k8s_slice(i, 0));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path());
    let roots = dir.path().join("sbs");
    std::fs::create_dir(&roots).unwrap();

    // One real agent in a test sandbox, reached through hybrid vsock.
    let sandbox = Sandbox::create();
    let _agent = sandbox.start_agent(None);
    let agent_socket = sandbox.workdir.path().join("agent.sock");
    let mut agent_urls = Vec::new();
    let mut standins = Vec::new();
    let mut shims = Vec::new();
    let real_uds = dir.path().join("real.vsock");
    let _front = HybridFront::start(&real_uds, DEFAULT_AGENT_PORT, &agent_socket);
    agent_urls.push(format!("hvsock://{}:1024", real_uds.display()));
    for i in 1..SANDBOXES {
        let uds = dir.path().join(format!("sb-{i}.vsock"));
        standins.push(runtime.block_on(StandInAgent::start(&uds, DEFAULT_AGENT_PORT)));
        agent_urls.push(format!("hvsock://{}:1024", uds.display()));
    }
    for (i, url) in agent_urls.iter().enumerate() {
        let sandbox_dir = roots.join(format!("sb-{i}"));
        std::fs::create_dir(&sandbox_dir).unwrap();
        shims.push(KataShim::start(&sandbox_dir.join("shim-monitor.sock"), url));
    }

    // The node daemon.
    let status_socket = dir.path().join("node.sock");
    let daemon_command = |extra: &[&str]| {
        let mut command = Command::new(shim_bin());
        command
            .args(["--timeout", "60", "node", "--node", "node-a"])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--sandbox-root")
            .arg(&roots)
            .arg("--status-socket")
            .arg(&status_socket)
            .args(["--batch-ms", BATCH_MS])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        command
    };
    let timed = &standins[..TIMED];
    let watches_before = watches(&api);
    let started = Instant::now();
    let own_cpu_before = cpu_time(std::process::id());
    let daemon = Children(vec![daemon_command(&[]).spawn().expect("socklb-shim node")]);
    let node_first_timed = all_wrote(timed, &[0; TIMED]) - started;
    let mut version = wait_all_acked(&runtime, &status_socket, 1);
    let node_first = started.elapsed();
    let node_first_cpu = cpu_time(daemon.0[0].id());
    // The stand-ins' share of the 2 CPUs (with the fake API server's).
    let standins_first_cpu = cpu_time(std::process::id()) - own_cpu_before;
    let mut node_latencies = Vec::new();
    for n in 0..CHANGES {
        let before = write_counts(timed);
        let pushed = Instant::now();
        api.apply(
            Kind::EndpointSlice,
            k8s_slice((n * 31) % SERVICES, 1000 + n),
        );
        node_latencies.push((all_wrote(timed, &before) - pushed).as_secs_f64() * 1e3);
        version = wait_all_acked(&runtime, &status_socket, version + 1);
    }
    let node_watches = watches(&api) - watches_before;
    let node_rss = daemon.rss_kib();
    let first_peak = proc_status_kib(daemon.0[0].id() as i32, "VmHWM:");

    // Wedged sandboxes, then a new one: its first whole table (from the
    // daemon above, which checks digests at the default interval).
    let mut wedged = Vec::new();
    for i in 0..WEDGED {
        let uds = dir.path().join(format!("wedged-{i}.vsock"));
        wedged.push(SilentAgent::start(&uds));
        let sandbox_dir = roots.join(format!("wedged-{i}"));
        std::fs::create_dir(&sandbox_dir).unwrap();
        let url = format!("hvsock://{}:1024", uds.display());
        shims.push(KataShim::start(
            &sandbox_dir.join("shim-monitor.sock"),
            &url,
        ));
    }
    // Their calls are under way (the daemon rescans and follows inotify).
    std::thread::sleep(Duration::from_secs(2));
    let uds = dir.path().join("new.vsock");
    let newcomer = runtime.block_on(StandInAgent::start(&uds, DEFAULT_AGENT_PORT));
    let sandbox_dir = roots.join("new");
    std::fs::create_dir(&sandbox_dir).unwrap();
    let appeared = Instant::now();
    let url = format!("hvsock://{}:1024", uds.display());
    shims.push(KataShim::start(
        &sandbox_dir.join("shim-monitor.sock"),
        &url,
    ));
    while newcomer.table().services.len() < SERVICES as usize {
        assert!(appeared.elapsed() < SETTLE, "the new sandbox got no table");
        std::thread::sleep(Duration::from_millis(20));
    }
    let newcomer_first = appeared.elapsed();
    drop(daemon);
    // The second daemon serves the sandboxes the table is about.
    shims.truncate(SANDBOXES);
    drop((wedged, newcomer));
    for id in (0..WEDGED)
        .map(|i| format!("wedged-{i}"))
        .chain(["new".into()])
    {
        std::fs::remove_dir_all(roots.join(id)).expect("remove a sandbox directory");
    }

    // A second daemon over the same sandboxes checks every digest soon
    // after its own fan-out: its peak includes a verification round.
    let daemon = Children(vec![
        daemon_command(&["--verify-secs", VERIFY_SECS])
            .spawn()
            .expect("socklb-shim node"),
    ]);
    wait_all_acked(&runtime, &status_socket, 1);
    std::thread::sleep(VERIFY_WAIT);
    let node_peak = proc_status_kib(daemon.0[0].id() as i32, "VmHWM:").max(first_peak);

    drop(daemon);
    let node_latency = percentiles(&mut node_latencies);
    let mib = |kib: u64| kib as f64 / 1024.0;
    eprintln!(
        "node: first fan-out {:.2} s to {TIMED}, {:.2} s to all ({:.2} s of the daemon's CPU, {:.2} s of the stand-ins'), change to {TIMED} p50/p99 {:.1}/{:.1} ms, RSS {:.1} MiB (peak {:.1}), watches {node_watches}, a new sandbox's first table past {WEDGED} wedged ones {:.2} s",
        node_first_timed.as_secs_f64(),
        node_first.as_secs_f64(),
        node_first_cpu.as_secs_f64(),
        standins_first_cpu.as_secs_f64(),
        node_latency.0,
        node_latency.1,
        mib(node_rss),
        mib(node_peak),
        newcomer_first.as_secs_f64()
    );

    // The baseline: one socklb-shim kube per sandbox, same agents.
    let watches_before = watches(&api);
    let before = write_counts(timed);
    let started = Instant::now();
    let mut shims_kube = Children(Vec::new());
    for url in agent_urls.iter().take(BASELINE_PROCESSES) {
        let agent = url.replace(":1024", &format!(":{DEFAULT_AGENT_PORT}"));
        let mut command = Command::new(shim_bin());
        command
            .args([
                "--timeout",
                "120",
                "--agent",
                &agent,
                "kube",
                "--node",
                "node-a",
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--batch-ms", BATCH_MS])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        shims_kube
            .0
            .push(command.spawn().expect("socklb-shim kube"));
    }
    let kube_first = all_wrote(timed, &before) - started;
    let mut kube_latencies = Vec::new();
    for n in 0..CHANGES {
        let before = write_counts(timed);
        let pushed = Instant::now();
        api.apply(
            Kind::EndpointSlice,
            k8s_slice((n * 31) % SERVICES, 2000 + n),
        );
        kube_latencies.push((all_wrote(timed, &before) - pushed).as_secs_f64() * 1e3);
    }
    let kube_watches = watches(&api) - watches_before;
    let kube_rss = shims_kube.rss_kib();
    drop(shims_kube);

    let kube_latency = percentiles(&mut kube_latencies);
    // The baseline for all 200: what each process held, times 200.
    let kube_rss_200 = kube_rss * SANDBOXES as u64 / BASELINE_PROCESSES as u64;
    let kube_watches_200 = kube_watches * SANDBOXES / BASELINE_PROCESSES;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Node daemon: {SANDBOXES} sandboxes ({} stand-ins + 1 real agent), {SERVICES} services x 8 backends\n",
        SANDBOXES - 1
    );
    let _ = writeln!(
        out,
        "| measure | one `socklb-shim node`, {SANDBOXES} sandboxes | `socklb-shim kube` per sandbox, {BASELINE_PROCESSES} sandboxes (baseline) | node / baseline |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| first whole table applied at the {TIMED} sandboxes both serve | {:.2} s | {:.2} s | {:.2}x |",
        node_first_timed.as_secs_f64(),
        kube_first.as_secs_f64(),
        node_first_timed.as_secs_f64() / kube_first.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| the same at all {SANDBOXES} (the real agent's from the daemon's status) | {:.2} s | | |",
        node_first.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| the daemon's CPU time (user + system) until then | {:.2} s | | |",
        node_first_cpu.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| the {} stand-in agents' CPU time until then (with the fake API server's: the benchmark's process) | {:.2} s | | |",
        SANDBOXES - 1,
        standins_first_cpu.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| EndpointSlice change to applied at those {TIMED}, p50 of {CHANGES} (batch {BATCH_MS} ms) | {:.1} ms | {:.1} ms | {:.2}x |",
        node_latency.0,
        kube_latency.0,
        node_latency.0 / kube_latency.0
    );
    let _ = writeln!(
        out,
        "| the same, p99 | {:.1} ms | {:.1} ms | {:.2}x |",
        node_latency.1,
        kube_latency.1,
        node_latency.1 / kube_latency.1
    );
    let _ = writeln!(
        out,
        "| API watches opened | {node_watches} | {kube_watches} ({kube_watches_200} for {SANDBOXES}) | {:.3}x |",
        node_watches as f64 / kube_watches_200 as f64
    );
    let _ = writeln!(
        out,
        "| RSS after the changes (total) | {:.1} MiB | {:.1} MiB ({:.1} MiB scaled to {SANDBOXES}) | {:.3}x |",
        mib(node_rss),
        mib(kube_rss),
        mib(kube_rss_200),
        node_rss as f64 / kube_rss_200 as f64
    );
    let _ = writeln!(
        out,
        "| peak RSS (VmHWM): the higher of the daemon above (fan-out, {CHANGES} changes) and a second one's fan-out and digest check of every sandbox (`--verify-secs {VERIFY_SECS}`) | {:.1} MiB | | |",
        mib(node_peak)
    );
    let _ = writeln!(
        out,
        "| a new sandbox's first table, {WEDGED} sandboxes wedged (agents accept, never answer) | {:.2} s | | |",
        newcomer_first.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "\n(Both sides are timed the same way, at the same {TIMED} sandboxes (1 to {TIMED}, stand-ins in the benchmark's process): from the daemon's or the processes' start, or from the change at the API server, to the last of those agents applying the write, by the agents' own clock (polled every millisecond); sandbox 0, the real agent, is served by both and not timed. The daemon serves its other {} sandboxes meanwhile; the baseline runs only {BASELINE_PROCESSES} processes. The ratios of watches and RSS are against the baseline scaled to {SANDBOXES} sandboxes. The stand-in agents program every table they get in memory, on the same 2 CPUs as the daemon or the baseline's processes, so wall times include their work: on a node each agent works on its own VM's vCPUs. The daemon's CPU time and the stand-ins' are shown beside the fan-out.)",
        SANDBOXES - BASELINE_PROCESSES
    );
    crate::report::write("node", &out);
}
