//! `real-client`: short HTTP connections from a real client to a real
//! server, Debian's wrk (1 thread, 16 connections, `Connection: close`)
//! against nginx (one process), direct against through a socklb VIP; beside
//! them, the project's own load client against its own server in the same
//! run, so the two can be compared.
//!
//! Each comparison runs as ABBA quartets, direct then socklb twice then
//! direct (BAAB on odd rounds), so a slow moment of this shared machine
//! falls on both sides of its ratio; a round's ratio is the quartet's
//! socklb connections over its direct ones, and the table gives the median
//! of the rounds' ratios with their min and max. Direct runs in the client
//! namespace outside the test cgroup, where no socklb program runs; every
//! other mode runs in the cgroup. For wrk the CPU time of wrk and nginx
//! per connection is measured too: other work on the machine slows a run
//! down but hardly changes what a connection costs. Afterwards, rounds
//! with BPF run-time stats on give each hook's calls per connection and
//! time per call under the same load.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use nix::sys::resource::{UsageWho, getrusage};
use socklb_agent::datapath::{enable_run_time_stats, hook_stats};
use socklb_tests::{Sandbox, backend_ip};

use crate::{hooks::ns_per_call, *};

const ROUNDS: usize = 9;
const STATS_ROUNDS: usize = 3;
const RUN_SECS: u64 = 1;
/// Runs of a mode under `perf record`.
const PROFILE_RUNS: usize = 3;
const BACKENDS: u8 = 8;
/// nginx's port on every backend address.
const HTTP_PORT: u16 = 8080;
/// The test kit's server's port on every backend address.
const TESTKIT_PORT: u16 = 9090;

/// Which client, with what, to where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// wrk to b1 from outside the cgroup: no socklb program runs.
    WrkDirect,
    /// wrk to b1 from inside the cgroup: the hooks run and translate nothing.
    WrkNonVip,
    /// wrk to a VIP of one backend (b1), as issue 24 measured.
    WrkVip1,
    /// wrk to a VIP of the 8 backends.
    WrkVip8,
    /// The project's own client as the datapath benchmark runs it (4
    /// threads), to the 8 backends at random, outside the cgroup.
    OwnDirect8,
    /// The same to a VIP of the 8 backends.
    OwnVip8,
    /// The project's own client with 1 thread to b1, outside the cgroup.
    OwnDirect1,
    /// The same to a VIP of b1.
    OwnVip1,
}

/// Each comparison: the direct mode, then the socklb mode against it.
const PAIRS: [(Mode, Mode); 5] = [
    (Mode::WrkDirect, Mode::WrkNonVip),
    (Mode::WrkDirect, Mode::WrkVip1),
    (Mode::WrkDirect, Mode::WrkVip8),
    (Mode::OwnDirect8, Mode::OwnVip8),
    (Mode::OwnDirect1, Mode::OwnVip1),
];

/// The table's rows, in order.
const MODES: [Mode; 8] = [
    Mode::WrkDirect,
    Mode::WrkNonVip,
    Mode::WrkVip1,
    Mode::WrkVip8,
    Mode::OwnDirect8,
    Mode::OwnVip8,
    Mode::OwnDirect1,
    Mode::OwnVip1,
];

const VIP_1: &str = "10.96.0.20";
const VIP_8: &str = "10.96.0.21";
const OWN_VIP_8: &str = "10.96.0.22";
const OWN_VIP_1: &str = "10.96.0.23";

/// One run of a mode.
#[derive(Clone, Copy)]
struct Run {
    per_sec: f64,
    connections: u64,
    /// CPU time of the client and the server (wrk and nginx only).
    cpu: Option<Duration>,
}

impl Run {
    fn cpu_us_per_connection(&self) -> Option<f64> {
        self.cpu
            .map(|cpu| cpu.as_secs_f64() * 1e6 / self.connections as f64)
    }
}

/// The sandbox with nginx, the test kit's servers and the agent.
struct Bench {
    sandbox: Sandbox,
    nginx_pid: u32,
}

impl Mode {
    fn describe(self) -> &'static str {
        match self {
            Mode::WrkDirect => "wrk, direct to the backend",
            Mode::WrkNonVip => "wrk, to the backend from inside the cgroup (not a VIP)",
            Mode::WrkVip1 => "wrk, VIP of 1 backend",
            Mode::WrkVip8 => "wrk, VIP of 8 backends",
            Mode::OwnDirect8 => "own client (4 threads), direct to 8 backends",
            Mode::OwnVip8 => "own client (4 threads), VIP of 8 backends",
            Mode::OwnDirect1 => "own client (1 thread), direct to 1 backend",
            Mode::OwnVip1 => "own client (1 thread), VIP of 1 backend",
        }
    }

    fn in_cgroup(self) -> bool {
        !matches!(self, Mode::WrkDirect | Mode::OwnDirect8 | Mode::OwnDirect1)
    }

    fn run(self, bench: &Bench) -> Run {
        let b1 = backend_ip(1);
        match self {
            Mode::WrkDirect | Mode::WrkNonVip => wrk(bench, self, &format!("{b1}:{HTTP_PORT}")),
            Mode::WrkVip1 => wrk(bench, self, &format!("{VIP_1}:80")),
            Mode::WrkVip8 => wrk(bench, self, &format!("{VIP_8}:80")),
            Mode::OwnDirect8 => {
                let all: Vec<String> = (1..=BACKENDS)
                    .map(|n| format!("{}:{TESTKIT_PORT}", backend_ip(n)))
                    .collect();
                own_client(&bench.sandbox, self, &all.join(","), "4")
            }
            Mode::OwnVip8 => own_client(&bench.sandbox, self, &format!("{OWN_VIP_8}:80"), "4"),
            Mode::OwnDirect1 => {
                own_client(&bench.sandbox, self, &format!("{b1}:{TESTKIT_PORT}"), "1")
            }
            Mode::OwnVip1 => own_client(&bench.sandbox, self, &format!("{OWN_VIP_1}:80"), "1"),
        }
    }
}

/// CPU time of this process's reaped children (wrk, once it has run).
fn children_cpu() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let time =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    time(usage.user_time()) + time(usage.system_time())
}

/// A process's time on a CPU so far, from /proc/PID/schedstat (ns).
fn process_cpu(pid: u32) -> Duration {
    let path = format!("/proc/{pid}/schedstat");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .unwrap_or_else(|| panic!("{path} holds no run time: {text:?}"));
    Duration::from_nanos(ns)
}

/// wrk for a run: one request per connection.
fn wrk(bench: &Bench, mode: Mode, target: &str) -> Run {
    let url = format!("http://{target}/");
    let duration = format!("{RUN_SECS}s");
    let args = [
        "--threads",
        "1",
        "--connections",
        "16",
        "--duration",
        &duration,
        "--header",
        "Connection: close",
        &url,
    ];
    let wrk = Path::new("wrk");
    let cpu_before = children_cpu() + process_cpu(bench.nginx_pid);
    let output = if mode.in_cgroup() {
        bench.sandbox.pod_program(wrk, &args)
    } else {
        bench.sandbox.pod_program_outside_cgroup(wrk, &args)
    };
    let cpu = children_cpu() + process_cpu(bench.nginx_pid) - cpu_before;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !stdout.contains("Socket errors") && !stdout.contains("Non-2xx"),
        "wrk to {url} failed or saw errors: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let per_sec = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output: {stdout}"));
    let connections = stdout
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output: {stdout}"));
    Run {
        per_sec,
        connections,
        cpu: Some(cpu),
    }
}

/// The test kit's load client for a run.
fn own_client(sandbox: &Sandbox, mode: Mode, targets: &str, threads: &str) -> Run {
    let ms = (RUN_SECS * 1000).to_string();
    let args = ["load", targets, "--threads", threads, "--ms", &ms];
    let load = if mode.in_cgroup() {
        sandbox.client(&args)
    } else {
        sandbox.client_outside_cgroup(&args)
    }
    .remove(0);
    assert_eq!(load["errors"], 0, "{}: {load}", mode.describe());
    Run {
        per_sec: load["per_sec"].as_f64().expect("per_sec"),
        connections: load["connections"].as_u64().expect("connections"),
        cpu: None,
    }
}

/// nginx as one process (`master_process off`: the process that accepts
/// is the one worker) on every backend address, its files in the sandbox.
/// Returns its pid.
fn start_nginx(sandbox: &Sandbox) -> u32 {
    let dir = sandbox.workdir.path().join("nginx");
    std::fs::create_dir(&dir).expect("nginx directory");
    let d = dir.display();
    let config = format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {HTTP_PORT} backlog=4096;
        default_type text/plain;
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
"
    );
    let file = sandbox.table("nginx.conf", &config);
    let prefix = format!("{d}/");
    let error_log = format!("{d}/startup.log");
    let pid = sandbox.spawn_backend_program(
        Path::new("nginx"),
        &[
            "-p",
            &prefix,
            "-e",
            &error_log,
            "-c",
            file.to_str().expect("a UTF-8 path"),
        ],
    );
    // nginx says nothing when it listens: ask the namespace.
    let port = format!("sport = :{HTTP_PORT}");
    for _ in 0..100 {
        let listening = std::process::Command::new("ss")
            .args(["-N", &sandbox.backend_ns, "-Hltn", &port])
            .output()
            .expect("ss");
        if !listening.stdout.is_empty() {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "nginx did not listen on :{HTTP_PORT}: {}",
        std::fs::read_to_string(&error_log).unwrap_or_default()
    );
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("/proc/loadavg")
}

/// Kernel functions whose time the profile gives per connection, with
/// what they call: substrings of the symbols in a sample's call chain.
const FUNCTIONS: [(&str, &str); 9] = [
    ("__sys_connect", "connect(2)"),
    (
        "__cgroup_bpf_run_filter_sock_addr",
        "the cgroup's connect programs, run from connect(2)",
    ),
    (
        "lb_connect4",
        "the connect4 program (`bpf_prog_*_lb_connect4`)",
    ),
    ("bpf_sk_storage_get", "its socket storage get, creating"),
    (
        "bpf_local_storage_alloc",
        "the socket's storage, made with its first value",
    ),
    ("bpf_selem_alloc", "the value (`CONNECTED_VIP`)"),
    ("inet_release", "close(2) of the socket"),
    ("__sk_destruct", "freeing the socket"),
    ("bpf_sk_storage_free", "freeing its socket storage"),
];

/// The comparisons profiled, direct first, each with the names of its
/// client's and server's processes (the test kit is both of its own).
const PROFILED: [(Mode, Mode, &[&str]); 2] = [
    (Mode::WrkDirect, Mode::WrkVip1, &["wrk", "nginx"]),
    (Mode::OwnDirect8, Mode::OwnVip8, &["socklb-testkit"]),
];

/// What `perf record -a -g` saw of a mode's client and server over its
/// runs.
#[derive(Default)]
struct Profile {
    connections: u64,
    /// ns of samples of the client and the server.
    total_ns: f64,
    /// ns of those samples with each of `FUNCTIONS` in their chain.
    in_function_ns: BTreeMap<&'static str, f64>,
}

impl Profile {
    /// Profiles `PROFILE_RUNS` runs of `mode`, whose client and server
    /// run as `comms`.
    fn record(bench: &Bench, mode: Mode, comms: &[&str]) -> Profile {
        let data = bench.sandbox.workdir.path().join("perf.data");
        let mut perf = std::process::Command::new("perf");
        perf.args([
            "record",
            "--all-cpus",
            "--call-graph",
            "fp",
            "--freq",
            "4000",
        ])
        .arg("--output")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        socklb_tests::die_with_parent(&mut perf);
        let mut perf = perf.spawn().expect("perf record (linux-perf)");
        std::thread::sleep(Duration::from_millis(500));
        let mut profile = Profile::default();
        for _ in 0..PROFILE_RUNS {
            profile.connections += mode.run(bench).connections;
        }
        let pid = nix::unistd::Pid::from_raw(perf.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("stop perf");
        // perf exits 130 after SIGINT; whether it wrote its data, perf
        // script tells.
        perf.wait().expect("perf record");
        let script = std::process::Command::new("perf")
            .args(["script", "--fields", "comm,period,ip,sym", "--input"])
            .arg(&data)
            .output()
            .expect("perf script");
        assert!(
            script.status.success(),
            "perf script failed: {}",
            String::from_utf8_lossy(&script.stderr)
        );
        profile.add_samples(&String::from_utf8_lossy(&script.stdout), comms);
        assert!(profile.total_ns > 0.0, "perf saw no sample of {comms:?}");
        profile
    }

    /// Adds `perf script` output: per sample a line `COMM PERIOD`, then
    /// one line per frame, `\tADDRESS SYMBOL`, then a blank line.
    fn add_samples(&mut self, script: &str, comms: &[&str]) {
        for sample in script.split("\n\n") {
            let mut lines = sample.lines().filter(|l| !l.is_empty());
            let Some(header) = lines.next() else { continue };
            let Some((comm, period)) = header.trim().rsplit_once(char::is_whitespace) else {
                continue;
            };
            if !comms.contains(&comm.trim()) {
                continue;
            }
            let ns: f64 = period.parse().unwrap_or(0.0);
            self.total_ns += ns;
            let chain: Vec<&str> = lines.collect();
            for (function, _) in FUNCTIONS {
                if chain.iter().any(|frame| frame.contains(function)) {
                    *self.in_function_ns.entry(function).or_default() += ns;
                }
            }
        }
    }

    fn per_connection(&self, function: Option<&str>) -> f64 {
        let ns = function.map_or(self.total_ns, |f| {
            self.in_function_ns.get(f).copied().unwrap_or(0.0)
        });
        ns / self.connections as f64
    }
}

/// What the rounds gave: every run of each mode, and per socklb mode the
/// rounds' ratios to direct (connections per second, CPU per connection).
#[derive(Default)]
struct Results {
    runs: BTreeMap<Mode, Vec<Run>>,
    rate_ratios: BTreeMap<Mode, Vec<f64>>,
    cpu_ratios: BTreeMap<Mode, Vec<f64>>,
    loads: Vec<f64>,
    hooks: BTreeMap<(Mode, &'static str), HookCosts>,
    /// `PROFILED`'s modes under `perf record`: direct, through the VIP.
    profiles: Vec<(Profile, Profile)>,
}

/// A hook's calls per connection and ns per call, one of each per run.
#[derive(Default)]
struct HookCosts {
    calls: Vec<f64>,
    ns: Vec<f64>,
}

impl Results {
    /// One ABBA quartet of `direct` and `socklb` (BAAB on odd rounds).
    fn quartet(&mut self, bench: &Bench, round: usize, direct: Mode, socklb: Mode) {
        let order = if round.is_multiple_of(2) {
            [direct, socklb, socklb, direct]
        } else {
            [socklb, direct, direct, socklb]
        };
        let runs: Vec<(Mode, Run)> = order.into_iter().map(|m| (m, m.run(bench))).collect();
        let sum = |mode: Mode, of: &dyn Fn(&Run) -> f64| -> f64 {
            runs.iter()
                .filter(|(m, _)| *m == mode)
                .map(|(_, r)| of(r))
                .sum()
        };
        let rate = |r: &Run| r.per_sec;
        self.rate_ratios
            .entry(socklb)
            .or_default()
            .push(sum(socklb, &rate) / sum(direct, &rate));
        if runs.iter().all(|(_, r)| r.cpu.is_some()) {
            let cpu = |r: &Run| r.cpu.map_or(0.0, |c| c.as_secs_f64());
            let connections = |r: &Run| r.connections as f64;
            let per_connection = |mode: Mode| sum(mode, &cpu) / sum(mode, &connections);
            self.cpu_ratios
                .entry(socklb)
                .or_default()
                .push(per_connection(socklb) / per_connection(direct));
        }
        for (mode, run) in runs {
            self.runs.entry(mode).or_default().push(run);
        }
    }

    /// Each hook's calls per connection and ns per call in a run of `mode`.
    fn hook_costs(&mut self, bench: &Bench, mode: Mode) {
        let before = hook_stats(&bench.sandbox.bpffs).expect("hook stats");
        let run = mode.run(bench);
        let after = hook_stats(&bench.sandbox.bpffs).expect("hook stats");
        for (b, a) in before.iter().zip(&after) {
            if let Some(ns) = ns_per_call(b, a) {
                let calls = (a.run_count - b.run_count) as f64 / run.connections as f64;
                let costs = self.hooks.entry((mode, a.hook)).or_default();
                costs.calls.push(calls);
                costs.ns.push(ns);
            }
        }
    }

    /// The comparison's table.
    fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## Short connections with a real client: wrk against nginx, direct and through a VIP\n\n\
             wrk: 1 thread, 16 connections, `Connection: close` (one request per connection); \
             nginx: one process. Beside it, the project's own client against its own server. \
             {ROUNDS} rounds; in each, every comparison is an ABBA quartet of {RUN_SECS} s runs \
             (BAAB on odd rounds). The ratios are the median of the rounds' ratios to the same \
             client's direct runs, with min - max. CPU per connection: wrk's and nginx's CPU \
             time over the connections made.\n"
        );
        let _ = writeln!(
            out,
            "| mode | connections/s, median (min - max) | vs direct, median of rounds (min - max) | CPU per connection, wrk + nginx, median | vs direct, median of rounds (min - max) |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        let ratio = |ratios: Option<&Vec<f64>>| match ratios {
            Some(values) => {
                let (min, median, max) = summary(values);
                format!("{median:.3}x ({min:.3} - {max:.3})")
            }
            None => "1".to_string(),
        };
        for mode in MODES {
            let runs = &self.runs[&mode];
            let rates: Vec<f64> = runs.iter().map(|r| r.per_sec).collect();
            let (rate_min, rate, rate_max) = summary(&rates);
            let cpu: Vec<f64> = runs.iter().filter_map(Run::cpu_us_per_connection).collect();
            let (cpu_column, cpu_ratio) = if cpu.is_empty() {
                ("-".to_string(), "-".to_string())
            } else {
                (
                    format!("{:.1} us", summary(&cpu).1),
                    ratio(self.cpu_ratios.get(&mode)),
                )
            };
            let _ = writeln!(
                out,
                "| {} | {rate:.0} ({rate_min:.0} - {rate_max:.0}) | {} | {cpu_column} | {cpu_ratio} |",
                mode.describe(),
                ratio(self.rate_ratios.get(&mode)),
            );
        }
        let (load_min, _, load_max) = summary(&self.loads);
        let _ = writeln!(
            out,
            "\nLoad average (1 min) at the rounds' starts: {load_min:.2} - {load_max:.2}."
        );
        out
    }

    /// Where the time goes: each hook's stats, and the profile.
    fn profile_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## Where a short connection's time goes, direct and through a VIP\n\n\
             The setup of [real-client.md](real-client.md), in the same run.\n"
        );
        let _ = writeln!(
            out,
            "### Each hook (BPF run-time stats, {STATS_ROUNDS} runs per mode)\n"
        );
        let _ = writeln!(
            out,
            "| mode | hook | calls per connection | ns/call median | min - max |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|");
        for ((mode, hook), costs) in &self.hooks {
            let (ns_min, ns_median, ns_max) = summary(&costs.ns);
            let _ = writeln!(
                out,
                "| {} | {hook} | {:.2} | {ns_median:.0} | {ns_min:.0} - {ns_max:.0} |",
                mode.describe(),
                summary(&costs.calls).1
            );
        }
        let _ = writeln!(
            out,
            "\n### Where a connection's time goes (`perf record --all-cpus`, {PROFILE_RUNS} runs per mode)\n\n\
             CPU time of the client and the server per connection (wrk and nginx; the test \
             kit's client and server), in ns, in samples whose call chain holds the function, so \
             with what it calls; the other processes on the machine are left out.\n"
        );
        let mut header = "| kernel function | what it is |".to_string();
        let mut align = "|---|---|".to_string();
        for (direct, vip, _) in PROFILED {
            let _ = write!(
                header,
                " {} | {} | difference |",
                direct.describe(),
                vip.describe()
            );
            align.push_str("---:|---:|---:|");
        }
        let _ = writeln!(out, "{header}\n{align}");
        let rows = FUNCTIONS
            .iter()
            .map(|(function, what)| (format!("`{function}`"), *what, Some(*function)))
            .chain([("all".to_string(), "the client and the server", None)]);
        for (function, what, symbol) in rows {
            let _ = write!(out, "| {function} | {what} |");
            for (direct, vip) in &self.profiles {
                let (a, b) = (direct.per_connection(symbol), vip.per_connection(symbol));
                let _ = write!(out, " {a:.0} | {b:.0} | {:+.0} |", b - a);
            }
            out.push('\n');
        }
        out
    }
}

pub(crate) fn real_client() {
    let sandbox = Sandbox::with_backend_hosts(BACKENDS);
    let nginx_pid = start_nginx(&sandbox);
    for n in 1..=BACKENDS {
        sandbox.backend(
            &format!("b{n}"),
            &[&format!("{}:{TESTKIT_PORT}", backend_ip(n))],
            &[],
        );
    }
    let all_backends = |port: u16| {
        (1..=BACKENDS)
            .map(|n| format!("{{ip: {}, port: {port}}}", backend_ip(n)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let b1 = backend_ip(1);
    let table = sandbox.table(
        "bench.yaml",
        &format!(
            "services:
  - {{vip: {VIP_1}, port: 80, backends: [{{ip: {b1}, port: {HTTP_PORT}}}]}}
  - {{vip: {VIP_8}, port: 80, backends: [{}]}}
  - {{vip: {OWN_VIP_8}, port: 80, backends: [{}]}}
  - {{vip: {OWN_VIP_1}, port: 80, backends: [{{ip: {b1}, port: {TESTKIT_PORT}}}]}}",
            all_backends(HTTP_PORT),
            all_backends(TESTKIT_PORT)
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));
    let bench = Bench { sandbox, nginx_pid };

    // Warm up: every mode once, unmeasured.
    for mode in MODES {
        mode.run(&bench);
    }
    let mut results = Results::default();
    for round in 0..ROUNDS {
        results.loads.push(load_average());
        for (direct, socklb) in PAIRS {
            results.quartet(&bench, round, direct, socklb);
        }
    }
    results.loads.push(load_average());

    results.profiles = PROFILED
        .iter()
        .map(|(direct, vip, comms)| {
            (
                Profile::record(&bench, *direct, comms),
                Profile::record(&bench, *vip, comms),
            )
        })
        .collect();
    let _stats = enable_run_time_stats().expect("BPF run-time stats");
    for _ in 0..STATS_ROUNDS {
        for (_, socklb) in PAIRS {
            results.hook_costs(&bench, socklb);
        }
    }
    report::write("real-client", &results.markdown());
    report::write("real-client-profile", &results.profile_markdown());
}
