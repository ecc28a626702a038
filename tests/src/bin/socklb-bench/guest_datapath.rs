//! `guest-datapath`: the seed's shape inside the test VM (the bench kernel:
//! the own kernel with IPVS and netfilter NAT). One client process with
//! many concurrent short connections to one ClusterIP of 12 backends, the
//! backends in a network namespace of their own; modes: direct to the
//! backends, socklb, and kube-proxy's IPVS, iptables and nftables, written
//! with Debian's own tools in the guest. Each mode's client has a network
//! namespace of its own, with a veth pair to the backends'. One phase a
//! table size and baseline: the baseline's rules loaded in its namespace
//! (10,000 services take minutes to load in the emulated guest), rounds of
//! direct, socklb and that baseline in an order rotated each round, the
//! rules removed; all in one boot.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use serde_json::Value;
use socklb_shim::{AgentClient, Options};
use socklb_table::Table;
use socklb_tests::{
    agent_client, runtime,
    vm::{GuestImage, KernelSymbols, Vm},
};

use crate::{
    modes::{KubeService, NFT_TABLE, iptables_layout, nft_services, socklb_service, vip},
    report, summary,
};

const BACKENDS: u8 = 12;
const BACKEND_PORT: u16 = 8080;
/// Services in the tables; the one under test is the middle one
/// (iptables walks KUBE-SERVICES in order).
const SCALES: [u32; 3] = [1, 1_000, 10_000];
const ROUNDS: usize = 5;
const LOAD_MS: &str = "3000";
/// Concurrent connections of the one client process.
const THREADS: &str = "16";
/// Room for a baseline's 10,000 services and for its rule files (up to
/// 42 MB, in the guest's memory) while they load.
const GUEST_MEMORY_MIB: u32 = 2048;
/// Loading one baseline's 10,000 services takes minutes in the emulated
/// guest; five times the slowest seen, for a slower machine.
const RULES_LIMIT: Duration = Duration::from_secs(900);
/// IPVS and nftables rules load in pieces of this many services (one
/// `ipvsadm -R` or `nft -f` each). nftables: the kernel walks a
/// transaction's whole list for each anonymous verdict map it binds (one a
/// service), so one `nft -f` of 10,000 services took 61 s on this host and
/// pieces of 1,000 took 32 s (of 100, 53 s: each piece re-reads the
/// table). IPVS: one `ipvsadm -R` of 10,000 services did not finish in
/// 13 minutes on the guest's earlier kernel; not tried since.
const RULES_PIECE: usize = 1_000;
/// How often the guest's program counter is sampled during a round.
const PROFILE_INTERVAL: Duration = Duration::from_millis(20);
/// Functions named per mode in the profile's table.
const PROFILE_TOP: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Direct,
    Socklb,
    Ipvs,
    Iptables,
    Nftables,
}

const MODES: [Mode; 5] = [
    Mode::Direct,
    Mode::Socklb,
    Mode::Ipvs,
    Mode::Iptables,
    Mode::Nftables,
];

/// The modes whose rules kube-proxy writes.
const BASELINES: [Mode; 3] = [Mode::Ipvs, Mode::Iptables, Mode::Nftables];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Socklb => "socklb",
            Mode::Ipvs => "IPVS",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }

    /// The guest network namespace its client runs in, and its rules are
    /// loaded in for a phase: its name in lower case.
    fn netns(self) -> String {
        self.name().to_lowercase()
    }

    /// The third octet of the subnet between its namespace and the
    /// backends' (its client is .1, the backends' side .2).
    fn subnet(self) -> u8 {
        10 + self as u8
    }
}

fn backend(n: u8) -> String {
    format!("10.245.1.{n}:{BACKEND_PORT}")
}

fn backends() -> Vec<String> {
    (1..=BACKENDS).map(backend).collect()
}

/// `scale` ClusterIP services of the 12 backends.
fn services(scale: u32) -> Vec<KubeService> {
    (0..scale)
        .map(|i| KubeService {
            number: i,
            vip: vip(i),
            backends: backends(),
        })
        .collect()
}

/// The ClusterIP:port under test in a table of `scale` services.
fn cluster_ip(scale: u32) -> String {
    format!("{}:80", vip(scale / 2))
}

/// Runs `script` with the guest's sh; fails with its output unless it
/// succeeds.
fn guest_sh(vm: &Vm, script: &str) -> Value {
    guest_sh_in(vm, None, script, Duration::from_secs(30))
}

/// Runs `script` with sh in the guest, in the network namespace `netns`
/// (one `wire` made) if given, for up to `limit`; fails with its output
/// unless it succeeds.
fn guest_sh_in(vm: &Vm, netns: Option<&str>, script: &str, limit: Duration) -> Value {
    let answer = match netns {
        None => vm.exec_within(&["sh", "-ec", script], limit),
        Some(netns) => vm.exec_within(
            &[
                "sh",
                "-ec",
                r#"exec nsenter -t "$(cat /tmp/netns-$1)" -n sh -ec "$0""#,
                script,
                netns,
            ],
            limit,
        ),
    };
    assert_eq!(
        answer["status"], 0,
        "in the guest ({netns:?}): {script}\n{answer}"
    );
    answer
}

/// The network namespaces: the backends' (the 12 backends on its lo) and
/// one a mode, with a veth pair to the backends' and the backends and the
/// service range routed through it, as a pod's default route would send
/// them; so every mode's client reaches the backends the same way, and a
/// kube-proxy baseline's rules stay loaded for a whole phase without seeing
/// other modes' packets. A process holds each namespace; its PID is in
/// /tmp/netns-<name>.
fn wire(vm: &Vm) {
    let mut script = String::from(
        r#"hold() {
             setsid unshare -n sleep 2147483647 </dev/null >/dev/null 2>&1 &
             while [ "$(readlink /proc/$!/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do
               sleep 0.1
             done
             echo $! > /tmp/netns-$1
           }
           hold backends
           echo 262144 > /proc/sys/net/netfilter/nf_conntrack_max
        "#,
    );
    let mut serve = String::from("ip link set lo up; ");
    for n in 1..=BACKENDS {
        let _ = write!(
            serve,
            "ip addr add 10.245.1.{n}/32 dev lo; \
             setsid socklb-testkit serve --id b{n} --tcp {} </dev/null >/dev/null 2>&1 & ",
            backend(n)
        );
    }
    let _ = writeln!(
        script,
        "nsenter -t $(cat /tmp/netns-backends) -n sh -ec '{serve}'"
    );
    for mode in MODES {
        let (ns, net) = (mode.netns(), mode.subnet());
        let _ = write!(
            script,
            "hold {ns}
             /usr/sbin/ip link add c-{ns} type veth peer name b-{ns}
             /usr/sbin/ip link set c-{ns} netns $(cat /tmp/netns-{ns})
             /usr/sbin/ip link set b-{ns} netns $(cat /tmp/netns-backends)
             nsenter -t $(cat /tmp/netns-backends) -n sh -ec \
               'ip addr add 10.245.{net}.2/24 dev b-{ns}; ip link set b-{ns} up'
             nsenter -t $(cat /tmp/netns-{ns}) -n sh -ec 'ip link set lo up; \
               ip addr add 10.245.{net}.1/24 dev c-{ns}; ip link set c-{ns} up; \
               ip route add 10.245.1.0/24 via 10.245.{net}.2; \
               ip route add 10.96.0.0/12 via 10.245.{net}.2'
            "
        );
    }
    // A connect to a ClusterIP that IPVS's namespace holds on kube-ipvs0
    // leaves with the ClusterIP as its source (kube-proxy masquerades it
    // with iptables on a node): the backends answer it there.
    let _ = write!(
        script,
        "nsenter -t $(cat /tmp/netns-backends) -n \
           ip route add 10.96.0.0/12 via 10.245.{}.1",
        Mode::Ipvs.subnet()
    );
    guest_sh(vm, &script);
}

/// Writes `text` to `path` in the guest, in pieces of whole lines small
/// enough for one command line each.
fn write_guest_file(vm: &Vm, path: &str, text: &str) {
    guest_sh(vm, &format!(": > {path}"));
    let mut piece = String::new();
    for line in text.lines() {
        piece.push_str(line);
        piece.push('\n');
        if piece.len() > 64 * 1024 {
            guest_sh(vm, &format!("cat >> {path} <<'EOF'\n{piece}EOF\n"));
            piece.clear();
        }
    }
    guest_sh(vm, &format!("cat >> {path} <<'EOF'\n{piece}EOF\n"));
}

/// kube-proxy's IPVS shapes for `services`: the kube-ipvs0 dummy
/// interface holding the ClusterIPs (`ip -batch` input) and the
/// `ipvsadm -R` input, a virtual server per ClusterIP:80 (round robin)
/// with each backend a real server in masquerade mode.
fn ipvs_rules(services: &[KubeService]) -> (String, String) {
    let mut addresses = String::from("link add kube-ipvs0 type dummy\n");
    let mut restore = String::new();
    for service in services {
        let _ = writeln!(addresses, "address add {}/32 dev kube-ipvs0", service.vip);
        let _ = writeln!(restore, "-A -t {}:80 -s rr", service.vip);
        for backend in &service.backends {
            let _ = writeln!(restore, "-a -t {}:80 -r {backend} -m -w 1", service.vip);
        }
    }
    (addresses, restore)
}

/// Writes `mode`'s rules for `services` to guest files and loads them in
/// its namespace, where they stay for every round of a phase; returns
/// how long the loading took (the files written).
fn install(vm: &Vm, mode: Mode, services: &[KubeService]) -> Duration {
    let load = match mode {
        // The ClusterIPs on the dummy interface, conntrack on, as
        // kube-proxy's IPVS mode sets them.
        Mode::Ipvs => {
            let (addresses, _) = ipvs_rules(services);
            write_guest_file(vm, "/tmp/rules.kube-ipvs0", &addresses);
            for (k, piece) in services.chunks(RULES_PIECE).enumerate() {
                write_guest_file(vm, &format!("/tmp/rules.ipvs.{k:03}"), &ipvs_rules(piece).1);
            }
            "/usr/sbin/ip -batch /tmp/rules.kube-ipvs0
             echo 1 > /proc/sys/net/ipv4/vs/conntrack
             for piece in /tmp/rules.ipvs.*; do /usr/sbin/ipvsadm -R < $piece; done"
        }
        Mode::Iptables => {
            write_guest_file(vm, "/tmp/rules.iptables", &iptables_layout(services));
            "/usr/sbin/xtables-legacy-multi iptables-restore /tmp/rules.iptables"
        }
        Mode::Nftables => {
            write_guest_file(vm, "/tmp/rules.nft-table", NFT_TABLE);
            for (k, piece) in services.chunks(RULES_PIECE).enumerate() {
                write_guest_file(vm, &format!("/tmp/rules.nft.{k:03}"), &nft_services(piece));
            }
            "/usr/sbin/nft -f /tmp/rules.nft-table
             for piece in /tmp/rules.nft.*; do /usr/sbin/nft -f $piece; done"
        }
        Mode::Direct | Mode::Socklb => unreachable!("{} has no rules", mode.name()),
    };
    let started = Instant::now();
    guest_sh_in(vm, Some(&mode.netns()), load, RULES_LIMIT);
    let took = started.elapsed();
    guest_sh(vm, "rm /tmp/rules.*");
    took
}

/// Undoes `install`: the next scale starts from empty tables.
fn uninstall(vm: &Vm, mode: Mode) {
    let clear = match mode {
        Mode::Ipvs => "/usr/sbin/ipvsadm -C; /usr/sbin/ip link del kube-ipvs0",
        // A restore without --noflush empties the table.
        Mode::Iptables => {
            "printf '*nat\\nCOMMIT\\n' | /usr/sbin/xtables-legacy-multi iptables-restore"
        }
        Mode::Nftables => "/usr/sbin/nft flush ruleset",
        Mode::Direct | Mode::Socklb => unreachable!("{} has no rules", mode.name()),
    };
    guest_sh_in(vm, Some(&mode.netns()), clear, RULES_LIMIT);
}

/// socklb's table of `services`.
fn socklb_table(services: &[KubeService]) -> Table {
    Table {
        services: services
            .iter()
            .map(|s| socklb_service(s.number, &s.backends))
            .collect(),
    }
}

/// The booted bench guest, its namespaces wired, and an agent client with
/// an empty table.
fn boot() -> (Vm, AgentClient) {
    let vm = Vm::boot_with_memory(
        &GuestImage::from_env("BENCH"),
        "socklb.bpf_stats=1",
        GUEST_MEMORY_MIB,
    );
    // A Sync of 10,000 services takes seconds in the emulated guest.
    let options = Options {
        connect_timeout: Duration::from_secs(60),
        call_timeout: Duration::from_secs(60),
        ..Options::default()
    };
    let mut agent = agent_client(&vm.agent_addr(), options);
    runtime()
        .block_on(agent.sync(Table { services: vec![] }))
        .expect("sync");
    wire(&vm);
    (vm, agent)
}

#[derive(Clone, Copy)]
struct Sample {
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// The guest's CPU time per connection in one round, from /proc/stat:
/// with the one vCPU saturated, this is what a connection costs, by where
/// the kernel accounted it.
#[derive(Clone, Copy)]
struct CpuPerConnection {
    user_us: f64,
    system_us: f64,
    softirq_us: f64,
}

impl CpuPerConnection {
    /// From the `cpu` lines of /proc/stat before and after `connections`.
    fn between(before: &str, after: &str, connections: f64) -> Self {
        let fields = |line: &str| -> Vec<f64> {
            line.split_whitespace()
                .skip(1)
                .map(|f| f.parse().unwrap_or_else(|e| panic!("{line}: {e}")))
                .collect()
        };
        let (b, a) = (fields(before), fields(after));
        // USER_HZ ticks (10 ms) of: user, nice, system, idle, iowait, irq,
        // softirq.
        let us = |i: usize| (a[i] - b[i]) * 10_000.0 / connections;
        CpuPerConnection {
            user_us: us(0) + us(1),
            system_us: us(2) + us(5),
            softirq_us: us(6),
        }
    }

    fn total_us(&self) -> f64 {
        self.user_us + self.system_us + self.softirq_us
    }
}

/// A phase's key: the table size and the kube-proxy baseline whose rules
/// are loaded, measured against direct and socklb.
type Phase = (u32, Mode);

/// Connections per second and latencies, (phase, mode) -> one sample per
/// round, with the CPU it took; socklb's hooks: (phase, hook) -> (ns per
/// call, calls per connection), one per round; how long loading the
/// services took: (services, mode) -> socklb's Sync in each round, a
/// baseline's one load; the guest's sampled program counters, (phase,
/// mode) -> samples per function, all rounds together.
#[derive(Default)]
struct Results {
    samples: BTreeMap<(Phase, Mode), Vec<Sample>>,
    cpu: BTreeMap<(Phase, Mode), Vec<CpuPerConnection>>,
    hooks: BTreeMap<(Phase, String), Vec<(f64, f64)>>,
    loading: BTreeMap<(u32, Mode), Vec<Duration>>,
    profile: BTreeMap<(Phase, Mode), BTreeMap<String, u64>>,
}

pub(crate) fn guest_datapath() {
    let (vm, mut agent) = boot();
    let symbols = vm.kernel_symbols();
    let mut results = Results::default();
    for scale in SCALES {
        let services = services(scale);
        for baseline in BASELINES {
            let phase = (scale, baseline);
            measure(&vm, &symbols, &mut agent, phase, &services, &mut results);
        }
    }
    report::write("guest-datapath", &results.markdown());
}

/// One phase: `baseline`'s rules for `services` loaded in its namespace,
/// then rounds of direct, socklb and the baseline, then the rules removed.
/// One baseline at a time, so direct and socklb are compared with it
/// beside the same rules (on the earlier SLOB kernel other rulesets
/// slowed socklb; on any kernel they cost the guest something, as
/// IPVS's 10,000 addresses do every mode: docs/benchmarks.md).
fn measure(
    vm: &Vm,
    symbols: &KernelSymbols,
    agent: &mut AgentClient,
    phase: Phase,
    services: &[KubeService],
    results: &mut Results,
) {
    let (scale, baseline) = phase;
    let took = install(vm, baseline, services);
    eprintln!(
        "==> {scale} services, {} loaded in {took:?}",
        baseline.name()
    );
    results.loading.insert(phase, vec![took]);
    let table = socklb_table(services);
    let modes = [Mode::Direct, Mode::Socklb, baseline];
    for round in 0..=ROUNDS {
        // Each round starts one mode later, so no mode always runs first.
        for &mode in modes.iter().cycle().skip(round).take(modes.len()) {
            if mode == Mode::Socklb {
                let started = Instant::now();
                runtime().block_on(agent.sync(table.clone())).expect("sync");
                results
                    .loading
                    .entry((scale, mode))
                    .or_default()
                    .push(started.elapsed());
            }
            let target = match mode {
                Mode::Direct => backends().join(","),
                _ => cluster_ip(scale),
            };
            let before = runtime().block_on(agent.stats()).expect("stats").hooks;
            let sampler = vm.sample_pc(PROFILE_INTERVAL);
            let answer = guest_sh_in(
                vm,
                Some(&mode.netns()),
                &format!(
                    "head -n1 /proc/stat >&2
                     socklb-testkit load {target} --threads {THREADS} --ms {}
                     head -n1 /proc/stat >&2",
                    // Round 0 warms every mode up and is not counted.
                    if round == 0 { "500" } else { LOAD_MS }
                ),
                Duration::from_secs(30),
            );
            let pcs = sampler.finish();
            let after = runtime().block_on(agent.stats()).expect("stats").hooks;
            if mode == Mode::Socklb {
                runtime()
                    .block_on(agent.sync(Table { services: vec![] }))
                    .expect("sync");
            }
            let load: Value = serde_json::from_str(answer["stdout"].as_str().unwrap_or_default())
                .unwrap_or_else(|e| panic!("{answer}: {e}"));
            assert_eq!(
                load["errors"],
                0,
                "{scale} services, {}: {load}",
                mode.name()
            );
            if round == 0 {
                continue;
            }
            eprintln!(
                "==> {scale} services, {} phase, round {round}, {}: {load}",
                baseline.name(),
                mode.name()
            );
            results
                .samples
                .entry((phase, mode))
                .or_default()
                .push(Sample {
                    per_sec: load["per_sec"].as_f64().unwrap(),
                    p50_us: load["p50_us"].as_f64().unwrap(),
                    p99_us: load["p99_us"].as_f64().unwrap(),
                });
            let connections = load["connections"].as_f64().unwrap();
            let stat: Vec<&str> = answer["stderr"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .collect();
            assert_eq!(stat.len(), 2, "/proc/stat around the load: {answer}");
            results
                .cpu
                .entry((phase, mode))
                .or_default()
                .push(CpuPerConnection::between(stat[0], stat[1], connections));
            let profile = results.profile.entry((phase, mode)).or_default();
            for (function, count) in symbols.count(&pcs) {
                *profile.entry(function).or_default() += count;
            }
            if mode == Mode::Socklb {
                for (b, a) in before.iter().zip(&after) {
                    let calls = (a.run_count - b.run_count) as f64;
                    if calls > 0.0 {
                        let ns = (a.run_time_ns - b.run_time_ns) as f64;
                        results
                            .hooks
                            .entry((phase, a.hook.clone()))
                            .or_default()
                            .push((ns / calls, calls / connections));
                    }
                }
            }
        }
    }
    uninstall(vm, baseline);
}

impl Results {
    fn median(&self, phase: Phase, mode: Mode, metric: Metric) -> f64 {
        let values: Vec<f64> = self.samples[&(phase, mode)].iter().map(metric).collect();
        summary(&values).1
    }

    fn markdown(&self) -> String {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mut out = format!(
            "## Datapath inside the guest: socklb vs IPVS, iptables, nftables\n\n\
             The seed's shape in the test VM (QEMU TCG: 1 emulated vCPU, {GUEST_MEMORY_MIB} MiB, \
             on a {cpus}-CPU host; the bench kernel, 6.1 with IPVS and netfilter NAT): one \
             client process (`socklb-testkit load`, {THREADS} concurrent short connections: \
             connect, read the backend's reply, close) to one ClusterIP of {BACKENDS} backends, \
             the backends in a network namespace of their own; the service under test is the \
             middle one of the table. Each mode's client runs in a network namespace of its \
             own with a veth pair to the backends'. One phase a table size and baseline: the \
             baseline's rules loaded in its namespace, then {ROUNDS} rounds of {LOAD_MS} ms \
             of direct, socklb and the baseline, each round starting with the next mode, \
             after a warm-up round; then the rules removed. IPVS: a virtual server per \
             ClusterIP:80 (rr), real servers in masquerade mode, the ClusterIPs on the \
             kube-ipvs0 dummy interface; iptables (Debian's iptables-legacy: iptables-nft \
             took more than 20 minutes to load 10,000 services on this guest's earlier \
             SLOB kernel) and nftables: \
             the host datapath benchmark's kube-proxy layouts; loaded with Debian's \
             `ipvsadm -R`, `iptables-restore` and `nft -f` in the guest. The agent stays \
             attached in every mode; its table holds the services in socklb's rounds only. \
             Ratios are within a phase. Emulated: absolute figures are slow, the ratios are \
             the result.\n\n\
             | services | phase | mode | conn/s median | min - max | vs baseline | vs direct | \
             p50 µs median | min - max | vs baseline | p99 µs median | vs baseline |\n\
             |---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        );
        let per_sec: Metric = |s| s.per_sec;
        let p50: Metric = |s| s.p50_us;
        let p99: Metric = |s| s.p99_us;
        for (&(phase, mode), values) in &self.samples {
            let (scale, baseline) = phase;
            let range = |metric: Metric| {
                let v: Vec<f64> = values.iter().map(metric).collect();
                let (min, _, max) = summary(&v);
                format!("{min:.0} - {max:.0}")
            };
            let ratio = |metric: Metric, base: Mode| {
                format!(
                    "{:.2}x",
                    self.median(phase, mode, metric) / self.median(phase, base, metric)
                )
            };
            let _ = writeln!(
                out,
                "| {scale} | {} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {:.0} | {} |",
                baseline.name(),
                mode.name(),
                self.median(phase, mode, per_sec),
                range(per_sec),
                ratio(per_sec, baseline),
                ratio(per_sec, Mode::Direct),
                self.median(phase, mode, p50),
                range(p50),
                ratio(p50, baseline),
                self.median(phase, mode, p99),
                ratio(p99, baseline),
            );
        }
        out.push_str(
            "\n### Where a connection's time goes\n\nThe guest's CPU time per connection \
             (`/proc/stat` around each round; the one vCPU is saturated, so this is the \
             connection's cost), µs, medians over the rounds, each column and the total \
             its own (so the columns need not add up); system includes hard interrupts. \
             Sampled at the guest's 250 Hz tick: one round's figure is good to about \
             ±15 µs. The difference from direct (in the same phase) is what each mode \
             adds.\n\n\
             | services | phase | mode | user | system | softirq | total | vs direct |\n\
             |---:|---|---|---:|---:|---:|---:|---:|\n",
        );
        for (&(phase, mode), values) in &self.cpu {
            let median = |figure: fn(&CpuPerConnection) -> f64| {
                summary(&values.iter().map(figure).collect::<Vec<_>>()).1
            };
            let direct: Vec<f64> = self.cpu[&(phase, Mode::Direct)]
                .iter()
                .map(CpuPerConnection::total_us)
                .collect();
            let total = median(CpuPerConnection::total_us);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {total:.0} | {:+.0} |",
                phase.0,
                phase.1.name(),
                mode.name(),
                median(|c| c.user_us),
                median(|c| c.system_us),
                median(|c| c.softirq_us),
                total - summary(&direct).1,
            );
        }
        out.push_str(
            "\n### socklb's hooks in these rounds\n\nBPF run-time stats (`socklb.bpf_stats=1`, \
             on in every mode), per hook, medians over socklb's rounds.\n\n\
             | services | phase | hook | ns per call | calls per connection |\n\
             |---:|---|---|---:|---:|\n",
        );
        for (((scale, baseline), hook), values) in &self.hooks {
            let ns: Vec<f64> = values.iter().map(|v| v.0).collect();
            let calls: Vec<f64> = values.iter().map(|v| v.1).collect();
            let _ = writeln!(
                out,
                "| {scale} | {} | {hook} | {:.0} | {:.2} |",
                baseline.name(),
                summary(&ns).1,
                summary(&calls).1
            );
        }
        let _ = write!(
            out,
            "\n### Where the guest's CPU went\n\nThe vCPU's program counter, sampled from the \
             host every {} ms through QEMU's monitor during the rounds and named with the \
             guest's /proc/kallsyms (what a sample names: docs/benchmarks.md): the functions \
             most seen, in shares of a mode's samples in a phase, all rounds together. The \
             guest is saturated, so the shares are of its CPU time.\n\n\
             | services | phase | mode | samples | most seen |\n\
             |---:|---|---|---:|---|\n",
            PROFILE_INTERVAL.as_millis()
        );
        for (&((scale, baseline), mode), counts) in &self.profile {
            let total: u64 = counts.values().sum();
            let mut ranked: Vec<(&String, &u64)> = counts.iter().collect();
            ranked.sort_by(|a, b| b.1.cmp(a.1));
            let top: Vec<String> = ranked
                .iter()
                .take(PROFILE_TOP)
                .map(|(function, count)| {
                    format!("{function} {:.0}%", **count as f64 * 100.0 / total as f64)
                })
                .collect();
            let _ = writeln!(
                out,
                "| {scale} | {} | {} | {total} | {} |",
                baseline.name(),
                mode.name(),
                top.join(", ")
            );
        }
        out.push_str(&format!(
            "\n### Loading the services\n\nSeconds from the command's start to its end, seen \
             from the host (the guest-exec round trip, about 0.1 s, included): socklb's Sync \
             of the table (median over all its rounds and warm-ups at the size, min - max), \
             each baseline's one load (IPVS: `ip -batch` of kube-ipvs0's addresses, then \
             `ipvsadm -R` in pieces of {RULES_PIECE} services; iptables: one \
             `iptables-restore`; nftables: `nft -f` in pieces of {RULES_PIECE} services).\n\n\
             | services | socklb Sync | min - max | IPVS | iptables | nftables |\n\
             |---:|---:|---:|---:|---:|---:|\n"
        ));
        for scale in SCALES {
            let Some(syncs) = self.loading.get(&(scale, Mode::Socklb)) else {
                continue;
            };
            let secs: Vec<f64> = syncs.iter().map(Duration::as_secs_f64).collect();
            let (min, median, max) = summary(&secs);
            let _ = write!(out, "| {scale} | {median:.2} | {min:.2} - {max:.2} |");
            for mode in BASELINES {
                let _ = write!(
                    out,
                    " {:.1} |",
                    self.loading[&(scale, mode)][0].as_secs_f64()
                );
            }
            out.push('\n');
        }
        out
    }
}

/// Reads one figure of a sample.
type Metric = fn(&Sample) -> f64;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// No row is measured against a broken baseline: through each
    /// kube-proxy mode's rules, connects to the ClusterIP reach the
    /// backends, and more than one of them.
    #[test]
    #[ignore = "needs the bench guest image: cargo xtask test builds it and runs this"]
    fn each_baseline_translates_the_cluster_ip_to_the_backends() {
        socklb_tests::require_root!();
        let (vm, _agent) = boot();
        let services = services(1);
        for mode in BASELINES {
            install(&vm, mode, &services);
            let answer = guest_sh_in(
                &vm,
                Some(&mode.netns()),
                &format!("socklb-testkit tcp {} --count 8", cluster_ip(1)),
                Duration::from_secs(30),
            );
            uninstall(&vm, mode);
            let reached: BTreeSet<String> = answer["stdout"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .map(|line| {
                    let result: Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("{}: {line:?}: {e}", mode.name()));
                    assert!(result.get("error").is_none(), "{}: {result}", mode.name());
                    result["backend"].as_str().unwrap().to_string()
                })
                .collect();
            let all: Vec<String> = (1..=BACKENDS).map(|n| format!("b{n}")).collect();
            assert!(
                reached.len() > 1 && reached.iter().all(|b| all.iter().any(|a| a == b)),
                "{}: 8 connects reached {reached:?}",
                mode.name()
            );
        }
    }
}
