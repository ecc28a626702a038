//! `guest-datapath`: the seed's shape inside the test VM (the bench kernel:
//! the own kernel with IPVS and netfilter NAT). One client process with
//! many concurrent short connections to one ClusterIP of 12 backends, the
//! backends in a network namespace of their own behind a veth pair; modes:
//! direct to the backends, socklb, and kube-proxy's IPVS, iptables and
//! nftables, written with Debian's own tools in the guest. Every round
//! runs every mode, in an order rotated each round, in one boot.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde_json::Value;
use socklb_shim::{AgentClient, Options};
use socklb_table::Table;
use socklb_tests::{
    agent_client, runtime,
    vm::{GuestImage, Vm},
};

use crate::{
    modes::{KubeService, iptables_layout, nft_layout, socklb_service, vip},
    report, summary,
};

const BACKENDS: u8 = 12;
const BACKEND_PORT: u16 = 8080;
/// Services in the tables; the one under test is the middle one
/// (iptables walks KUBE-SERVICES in order).
const SCALES: [u32; 2] = [1, 1_000];
const ROUNDS: usize = 5;
const LOAD_MS: &str = "3000";
/// Concurrent connections of the one client process.
const THREADS: &str = "16";
/// The guest's side of the veth pair, and the backends namespace's.
const NODE_ADDR: &str = "10.245.0.1";
const BACKENDS_NS_ADDR: &str = "10.245.0.2";

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
    let answer = vm.exec(&["sh", "-ec", script]);
    assert_eq!(answer["status"], 0, "in the guest: {script}\n{answer}");
    answer
}

/// The backends' namespace (a process holds it), a veth pair to it, the
/// 12 backends, the service range routed there as a pod's default route
/// would, and room for the conntrack entries of every round.
fn start_backends(vm: &Vm) {
    let mut serve = String::new();
    for n in 1..=BACKENDS {
        let _ = write!(
            serve,
            "ip addr add 10.245.1.{n}/32 dev lo; \
             setsid socklb-testkit serve --id b{n} --tcp {} </dev/null >/dev/null 2>&1 & ",
            backend(n)
        );
    }
    guest_sh(
        vm,
        &format!(
            "setsid unshare -n sleep 2147483647 </dev/null >/dev/null 2>&1 &
             holder=$!
             while [ \"$(readlink /proc/$holder/ns/net)\" = \"$(readlink /proc/self/ns/net)\" ]; do
               sleep 0.1
             done
             # busybox's ip names the peer veth0.
             ip link add vb0 type veth
             ip link set veth0 netns $holder
             ip addr add {NODE_ADDR}/24 dev vb0
             ip link set vb0 up
             nsenter -t $holder -n sh -ec 'ip link set lo up; ip link set veth0 up; \
               ip addr add {BACKENDS_NS_ADDR}/24 dev veth0; \
               ip route add default via {NODE_ADDR}; {serve}'
             ip route add 10.245.1.0/24 via {BACKENDS_NS_ADDR}
             ip route add 10.96.0.0/12 via {BACKENDS_NS_ADDR}
             echo 262144 > /proc/sys/net/netfilter/nf_conntrack_max"
        ),
    );
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

/// kube-proxy's IPVS shapes for `services`: the ClusterIPs (one a line,
/// for the kube-ipvs0 dummy interface) and the `ipvsadm -R` input, a
/// virtual server per ClusterIP:80 (round robin) with each backend a real
/// server in masquerade mode.
fn ipvs_rules(services: &[KubeService]) -> (String, String) {
    let mut addresses = String::new();
    let mut restore = String::new();
    for service in services {
        let _ = writeln!(addresses, "{}", service.vip);
        let _ = writeln!(restore, "-A -t {}:80 -s rr", service.vip);
        for backend in &service.backends {
            let _ = writeln!(restore, "-a -t {}:80 -r {backend} -m -w 1", service.vip);
        }
    }
    (addresses, restore)
}

/// Writes every baseline's rules for `services` to guest files, for
/// `apply_rules` to load in each round.
fn write_rules(vm: &Vm, services: &[KubeService]) {
    let (addresses, ipvs) = ipvs_rules(services);
    write_guest_file(vm, "/tmp/ipvs-addresses", &addresses);
    write_guest_file(vm, "/tmp/rules.ipvs", &ipvs);
    write_guest_file(vm, "/tmp/rules.iptables", &iptables_layout(services));
    write_guest_file(vm, "/tmp/rules.nft", &nft_layout(services));
}

/// Loads `mode`'s rules for `services` in the guest (`write_rules` wrote
/// them) or, socklb, syncs its table; `clear_rules` undoes it.
fn apply_rules(vm: &Vm, agent: &mut AgentClient, mode: Mode, services: &[KubeService]) {
    match mode {
        Mode::Direct => {}
        Mode::Socklb => {
            let table = Table {
                services: services
                    .iter()
                    .map(|s| socklb_service(s.number, &s.backends))
                    .collect(),
            };
            runtime().block_on(agent.sync(table)).expect("sync");
        }
        // The ClusterIPs on the dummy interface, conntrack on, as
        // kube-proxy's IPVS mode sets them.
        Mode::Ipvs => {
            guest_sh(
                vm,
                "ip link add kube-ipvs0 type dummy
                 while read -r vip; do ip addr add $vip/32 dev kube-ipvs0; done < /tmp/ipvs-addresses
                 echo 1 > /proc/sys/net/ipv4/vs/conntrack
                 /usr/sbin/ipvsadm -R < /tmp/rules.ipvs",
            );
        }
        Mode::Iptables => {
            guest_sh(
                vm,
                "/usr/sbin/xtables-nft-multi iptables-restore /tmp/rules.iptables",
            );
        }
        Mode::Nftables => {
            guest_sh(vm, "/usr/sbin/nft -f /tmp/rules.nft");
        }
    }
}

/// Undoes `apply_rules`: no mode's rules are left for the next round.
/// (iptables-nft's tables are nftables tables: one flush clears both.)
fn clear_rules(vm: &Vm, agent: &mut AgentClient, mode: Mode) {
    match mode {
        Mode::Direct => {}
        Mode::Socklb => {
            runtime()
                .block_on(agent.sync(Table { services: vec![] }))
                .expect("sync");
        }
        Mode::Ipvs => {
            guest_sh(vm, "/usr/sbin/ipvsadm -C; ip link del kube-ipvs0");
        }
        Mode::Iptables | Mode::Nftables => {
            guest_sh(vm, "/usr/sbin/nft flush ruleset");
        }
    }
}

/// The booted bench guest and an agent client with an empty table.
fn boot() -> (Vm, AgentClient) {
    let vm = Vm::boot(&GuestImage::from_env("BENCH"), "socklb.bpf_stats=1");
    let options = Options {
        connect_timeout: Duration::from_secs(60),
        ..Options::default()
    };
    let mut agent = agent_client(&vm.agent_addr(), options);
    runtime()
        .block_on(agent.sync(Table { services: vec![] }))
        .expect("sync");
    start_backends(&vm);
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

/// Connections per second and latencies, (services, mode) -> one sample
/// per round, with the CPU it took; socklb's hooks: (services, hook) ->
/// (ns per call, calls per connection), one per round.
#[derive(Default)]
struct Results {
    samples: BTreeMap<(u32, Mode), Vec<Sample>>,
    cpu: BTreeMap<(u32, Mode), Vec<CpuPerConnection>>,
    hooks: BTreeMap<(u32, String), Vec<(f64, f64)>>,
}

pub(crate) fn guest_datapath() {
    let (vm, mut agent) = boot();
    let mut results = Results::default();
    for scale in SCALES {
        measure(&vm, &mut agent, scale, &mut results);
    }
    report::write("guest-datapath", &results.markdown());
}

fn measure(vm: &Vm, agent: &mut AgentClient, scale: u32, results: &mut Results) {
    let services = services(scale);
    write_rules(vm, &services);
    for round in 0..=ROUNDS {
        // Each round starts one mode later, so no mode always runs right
        // after the same other one.
        for &mode in MODES.iter().cycle().skip(round).take(MODES.len()) {
            apply_rules(vm, agent, mode, &services);
            let target = match mode {
                Mode::Direct => backends().join(","),
                _ => cluster_ip(scale),
            };
            let before = runtime().block_on(agent.stats()).expect("stats").hooks;
            let answer = guest_sh(
                vm,
                &format!(
                    "head -n1 /proc/stat >&2
                     socklb-testkit load {target} --threads {THREADS} --ms {}
                     head -n1 /proc/stat >&2",
                    // Round 0 warms every mode up and is not counted.
                    if round == 0 { "500" } else { LOAD_MS }
                ),
            );
            let after = runtime().block_on(agent.stats()).expect("stats").hooks;
            clear_rules(vm, agent, mode);
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
                "==> {scale} services, round {round}, {}: {load}",
                mode.name()
            );
            results
                .samples
                .entry((scale, mode))
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
                .entry((scale, mode))
                .or_default()
                .push(CpuPerConnection::between(stat[0], stat[1], connections));
            if mode == Mode::Socklb {
                for (b, a) in before.iter().zip(&after) {
                    let calls = (a.run_count - b.run_count) as f64;
                    if calls > 0.0 {
                        let ns = (a.run_time_ns - b.run_time_ns) as f64;
                        results
                            .hooks
                            .entry((scale, a.hook.clone()))
                            .or_default()
                            .push((ns / calls, calls / connections));
                    }
                }
            }
        }
    }
}

impl Results {
    fn median(&self, scale: u32, mode: Mode, metric: Metric) -> f64 {
        let values: Vec<f64> = self.samples[&(scale, mode)].iter().map(metric).collect();
        summary(&values).1
    }

    fn markdown(&self) -> String {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mut out = format!(
            "## Datapath inside the guest: socklb vs IPVS, iptables, nftables\n\n\
             The seed's shape in the test VM (QEMU TCG: 1 emulated vCPU, 512 MiB, on a \
             {cpus}-CPU host; the bench kernel, 6.1 with IPVS and netfilter NAT): one client \
             process (`socklb-testkit load`, {THREADS} concurrent short connections: connect, \
             read the backend's reply, close) to one ClusterIP of {BACKENDS} backends, the \
             backends in a network namespace of their own behind a veth pair; the service \
             under test is the middle one of the table. IPVS: a virtual server per \
             ClusterIP:80 (rr), real servers in masquerade mode, the ClusterIPs on the \
             kube-ipvs0 dummy interface; iptables (Debian's iptables-nft) and nftables: the \
             host datapath benchmark's kube-proxy layouts; all loaded with Debian's \
             `ipvsadm -R`, `iptables-restore` and `nft -f` in the guest. The agent stays \
             attached in every mode; its table holds the services in socklb's rounds only. \
             {ROUNDS} rounds of {LOAD_MS} ms, all modes in each, each round starting \
             with the next mode, after a warm-up round. Emulated: absolute figures are \
             slow, the ratios are the result.\n\n\
             | services | mode | conn/s median | min - max | vs IPVS | vs direct | \
             p50 µs median | min - max | vs IPVS | p99 µs median | vs IPVS |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        );
        let per_sec: Metric = |s| s.per_sec;
        let p50: Metric = |s| s.p50_us;
        let p99: Metric = |s| s.p99_us;
        for (&(scale, mode), values) in &self.samples {
            let range = |metric: Metric| {
                let v: Vec<f64> = values.iter().map(metric).collect();
                let (min, _, max) = summary(&v);
                format!("{min:.0} - {max:.0}")
            };
            let ratio = |metric: Metric, base: Mode| {
                format!(
                    "{:.2}x",
                    self.median(scale, mode, metric) / self.median(scale, base, metric)
                )
            };
            let _ = writeln!(
                out,
                "| {scale} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {:.0} | {} |",
                mode.name(),
                self.median(scale, mode, per_sec),
                range(per_sec),
                ratio(per_sec, Mode::Ipvs),
                ratio(per_sec, Mode::Direct),
                self.median(scale, mode, p50),
                range(p50),
                ratio(p50, Mode::Ipvs),
                self.median(scale, mode, p99),
                ratio(p99, Mode::Ipvs),
            );
        }
        out.push_str(
            "\n### Where a connection's time goes\n\nThe guest's CPU time per connection \
             (`/proc/stat` around each round; the one vCPU is saturated, so this is the \
             connection's cost), µs, medians over the rounds, each column and the total \
             its own (so the columns need not add up); system includes hard interrupts. \
             Sampled at the guest's 250 Hz tick: one round's figure is good to about \
             ±15 µs. The difference from direct is what each mode adds.\n\n\
             | services | mode | user | system | softirq | total | vs direct |\n\
             |---:|---|---:|---:|---:|---:|---:|\n",
        );
        for (&(scale, mode), values) in &self.cpu {
            let median = |figure: fn(&CpuPerConnection) -> f64| {
                summary(&values.iter().map(figure).collect::<Vec<_>>()).1
            };
            let direct: Vec<f64> = self.cpu[&(scale, Mode::Direct)]
                .iter()
                .map(CpuPerConnection::total_us)
                .collect();
            let total = median(CpuPerConnection::total_us);
            let _ = writeln!(
                out,
                "| {scale} | {} | {:.0} | {:.0} | {:.0} | {total:.0} | {:+.0} |",
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
             | services | hook | ns per call | calls per connection |\n|---:|---|---:|---:|\n",
        );
        for ((scale, hook), values) in &self.hooks {
            let ns: Vec<f64> = values.iter().map(|v| v.0).collect();
            let calls: Vec<f64> = values.iter().map(|v| v.1).collect();
            let _ = writeln!(
                out,
                "| {scale} | {hook} | {:.0} | {:.2} |",
                summary(&ns).1,
                summary(&calls).1
            );
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
        let (vm, mut agent) = boot();
        let services = services(1);
        write_rules(&vm, &services);
        for mode in [Mode::Ipvs, Mode::Iptables, Mode::Nftables] {
            apply_rules(&vm, &mut agent, mode, &services);
            let results = vm.testkit(&["tcp", &cluster_ip(1), "--count", "8"]);
            clear_rules(&vm, &mut agent, mode);
            let reached: BTreeSet<&str> = results
                .iter()
                .map(|r| {
                    assert!(r.get("error").is_none(), "{}: {r}", mode.name());
                    r["backend"].as_str().unwrap()
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
