//! socklb against what users would otherwise run, in one run on one
//! machine: direct to the backend IPs (the physical limit), socklb,
//! kube-proxy-style iptables (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* with
//! statistic random) and kube-proxy-style nftables (a verdict map of
//! services, numgen over endpoint chains). Each mode gets fresh namespaces
//! (no conntrack shared between modes); the client always runs in the test
//! cgroup and client namespace, the 8 backends in the backends namespace.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use socklb_shim::Options;
use socklb_table::{Protocol, Service, ServiceKey, Table, VipKind};
use socklb_tests::{Sandbox, agent_client, backend_ip, runtime};

pub(crate) const SCALES: [u32; 3] = [1, 1_000, 10_000];
pub(crate) const MODES: [Mode; 4] = [Mode::Direct, Mode::Socklb, Mode::Iptables, Mode::Nftables];
const BACKENDS: u8 = 8;
const REPEATS: usize = 3;
const UPDATES: usize = 10;
const LOAD_MS: &str = "3000";
const STREAM_MS: &str = "2000";
const THREADS: &str = "4";
const BACKEND_PORT: u16 = 8080;
const BULK_PORT: u16 = 9000;
/// The bulk (long-lived connection) service: one backend, b1's bulk port.
const BULK_VIP: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Mode {
    Direct,
    Socklb,
    Iptables,
    Nftables,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Socklb => "socklb",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub gbit: f64,
}

#[derive(Default)]
pub(crate) struct Results {
    pub samples: BTreeMap<(u32, Mode), Vec<Sample>>,
    /// Time to program the whole table.
    pub programming: BTreeMap<(u32, Mode), Duration>,
    /// One-service update latencies, ms.
    pub updates: BTreeMap<(u32, Mode), Vec<f64>>,
    /// iptables and nft updates run as a new process in the client
    /// namespace: the cost of that alone (`ip netns exec NS true`), ms,
    /// measured beside each update.
    pub spawns: BTreeMap<(u32, Mode), Vec<f64>>,
}

/// Service `i`'s VIP: 10.96.0.1 onwards.
pub(crate) fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i)
}

fn backends() -> Vec<String> {
    (1..=BACKENDS)
        .map(|n| format!("{}:{BACKEND_PORT}", backend_ip(n)))
        .collect()
}

/// The backends in `rotation`'s order: updates rotate them so each update
/// changes the service.
fn rotated(rotation: usize) -> Vec<String> {
    let mut list = backends();
    let len = list.len();
    list.rotate_left(rotation % len);
    list
}

pub(crate) fn run() -> Results {
    let mut results = Results::default();
    for scale in SCALES {
        for mode in MODES {
            eprintln!("==> {} with {scale} services", mode.name());
            measure(mode, scale, &mut results);
        }
    }
    results
}

fn measure(mode: Mode, scale: u32, results: &mut Results) {
    let sandbox = Sandbox::with_backend_hosts(BACKENDS);
    for n in 1..=BACKENDS {
        let tcp = format!("{}:{BACKEND_PORT}", backend_ip(n));
        let bulk = format!("{}:{BULK_PORT}", backend_ip(n));
        sandbox.backend(&format!("b{n}"), &[&tcp], &[]);
        if n == 1 {
            sandbox.backend_bulk(&bulk);
        }
    }
    // The VIP ranges are on-link in every mode, as a pod's default route
    // makes them: iptables and nftables NAT after the route lookup, which
    // must succeed. (Untranslated packets would reach the backends
    // namespace, which drops them.)
    for range in ["10.96.0.0/12", "10.95.0.0/16"] {
        in_client_ns(&sandbox, &["ip", "route", "add", range, "dev", "eth0"]);
    }
    // The service under test sits in the middle: iptables matches
    // KUBE-SERVICES rules in order, so it pays for half of them.
    let tested = scale / 2;
    let mut _agent = None;
    let (target, bulk_target) = match mode {
        Mode::Direct => (
            backends().join(","),
            format!("{}:{BULK_PORT}", backend_ip(1)),
        ),
        _ => (format!("{}:80", vip(tested)), format!("{BULK_VIP}:80")),
    };
    let runtime = runtime();
    let mut client = None;
    let started = Instant::now();
    match mode {
        Mode::Direct => {}
        Mode::Socklb => {
            _agent = Some(sandbox.start_agent(None));
            let options = Options {
                call_timeout: Duration::from_secs(300),
                ..Options::default()
            };
            let mut c = agent_client(&sandbox.api_addr(), options);
            let started = Instant::now();
            runtime
                .block_on(c.sync(socklb_table(scale)))
                .expect("socklb sync");
            results.programming.insert((scale, mode), started.elapsed());
            client = Some(c);
        }
        Mode::Iptables => {
            let file = sandbox.table("rules.iptables", &iptables_rules(scale));
            let started = Instant::now();
            in_client_ns(&sandbox, &["iptables-restore", file.to_str().unwrap()]);
            results.programming.insert((scale, mode), started.elapsed());
        }
        Mode::Nftables => {
            let file = sandbox.table("rules.nft", &nft_rules(scale));
            let started = Instant::now();
            in_client_ns(&sandbox, &["nft", "-f", file.to_str().unwrap()]);
            results.programming.insert((scale, mode), started.elapsed());
        }
    }
    let _ = started;

    // One-service updates (each rotates the tested service's backends).
    for update in 1..=UPDATES {
        let backends = rotated(update);
        let elapsed = match mode {
            Mode::Direct => break,
            Mode::Socklb => {
                let service = socklb_service(tested, &backends);
                let started = Instant::now();
                runtime
                    .block_on(client.as_mut().expect("client").upsert(vec![service]))
                    .expect("upsert");
                started.elapsed()
            }
            Mode::Iptables => {
                let mut rules = String::from("*nat\n");
                let _ = writeln!(rules, ":{} - [0:0]", svc_chain(tested));
                rules.push_str(&svc_rules(tested, &backends));
                rules.push_str("COMMIT\n");
                let file = sandbox.table("update.iptables", &rules);
                let started = Instant::now();
                in_client_ns(
                    &sandbox,
                    &["iptables-restore", "--noflush", file.to_str().unwrap()],
                );
                started.elapsed()
            }
            Mode::Nftables => {
                let rules = format!(
                    "flush chain ip kube-proxy {chain}\nadd rule ip kube-proxy {chain} {rule}\n",
                    chain = nft_service_chain(tested),
                    rule = nft_service_rule(tested, &backends)
                );
                let file = sandbox.table("update.nft", &rules);
                let started = Instant::now();
                in_client_ns(&sandbox, &["nft", "-f", file.to_str().unwrap()]);
                started.elapsed()
            }
        };
        results
            .updates
            .entry((scale, mode))
            .or_default()
            .push(elapsed.as_secs_f64() * 1e3);
        if matches!(mode, Mode::Iptables | Mode::Nftables) {
            let started = Instant::now();
            in_client_ns(&sandbox, &["true"]);
            results
                .spawns
                .entry((scale, mode))
                .or_default()
                .push(started.elapsed().as_secs_f64() * 1e3);
        }
    }

    // Warm up, then the measured repeats.
    sandbox.client(&["load", &target, "--threads", THREADS, "--ms", "500"]);
    for _ in 0..REPEATS {
        let load = sandbox
            .client(&["load", &target, "--threads", THREADS, "--ms", LOAD_MS])
            .remove(0);
        assert_eq!(
            load["errors"],
            0,
            "{} with {scale} services: {load}",
            mode.name()
        );
        let stream = sandbox
            .client(&["stream", &bulk_target, "--ms", STREAM_MS])
            .remove(0);
        assert!(stream.get("error").is_none(), "{stream}");
        results
            .samples
            .entry((scale, mode))
            .or_default()
            .push(Sample {
                per_sec: load["per_sec"].as_f64().unwrap(),
                p50_us: load["p50_us"].as_f64().unwrap(),
                p99_us: load["p99_us"].as_f64().unwrap(),
                gbit: stream["gbit_per_sec"].as_f64().unwrap(),
            });
    }
}

fn in_client_ns(sandbox: &Sandbox, command: &[&str]) {
    let output = Command::new("ip")
        .args(["netns", "exec", &sandbox.client_ns])
        .args(command)
        .output()
        .expect("ip netns exec");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub(crate) fn socklb_service(i: u32, backends: &[String]) -> Service {
    Service {
        name: Some(format!("bench/svc-{i}")),
        key: ServiceKey {
            vip: vip(i).into(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        vip_kind: VipKind::Cluster,
        affinity_timeout_secs: None,
        backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
    }
}

fn socklb_table(scale: u32) -> Table {
    let mut services: Vec<Service> = (0..scale).map(|i| socklb_service(i, &backends())).collect();
    services.push(Service {
        name: Some("bench/bulk".into()),
        key: ServiceKey {
            vip: BULK_VIP.into(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        vip_kind: VipKind::Cluster,
        affinity_timeout_secs: None,
        backends: vec![format!("{}:{BULK_PORT}", backend_ip(1)).parse().unwrap()],
    });
    Table { services }
}

fn svc_chain(i: u32) -> String {
    format!("KUBE-SVC-{i:016X}")
}

fn sep_chain(i: u32, j: usize) -> String {
    format!("KUBE-SEP-{i:08X}{j:08X}")
}

/// A KUBE-SVC chain: statistic random over the endpoint chains, 1/(n-j).
fn svc_rules(i: u32, backends: &[String]) -> String {
    let mut rules = String::new();
    let n = backends.len();
    for (j, backend) in backends.iter().enumerate() {
        let sep = sep_chain(i, endpoint_index_or(backend, j));
        let comment = format!("-m comment --comment \"bench/svc-{i}:http -> {backend}\"");
        if j + 1 < n {
            let probability = 1.0 / (n - j) as f64;
            let _ = writeln!(
                rules,
                "-A {} {comment} -m statistic --mode random --probability {probability:.11} -j {sep}",
                svc_chain(i)
            );
        } else {
            let _ = writeln!(rules, "-A {} {comment} -j {sep}", svc_chain(i));
        }
    }
    rules
}

/// A service of a kube-proxy rule layout: its number (which names its
/// chains), VIP (port 80, TCP) and backends.
pub(crate) struct KubeService {
    pub number: u32,
    pub vip: Ipv4Addr,
    pub backends: Vec<String>,
}

/// `scale` services x 8 endpoints, plus the bulk service.
fn host_services(scale: u32) -> Vec<KubeService> {
    let mut services: Vec<KubeService> = (0..scale)
        .map(|i| KubeService {
            number: i,
            vip: vip(i),
            backends: backends(),
        })
        .collect();
    services.push(KubeService {
        number: scale,
        vip: BULK_VIP,
        backends: vec![format!("{}:{BULK_PORT}", backend_ip(1))],
    });
    services
}

fn iptables_rules(scale: u32) -> String {
    iptables_layout(&host_services(scale))
}

fn nft_rules(scale: u32) -> String {
    nft_layout(&host_services(scale))
}

/// The kube-proxy iptables layout of `services`, an iptables-restore input.
pub(crate) fn iptables_layout(services: &[KubeService]) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    let mut service = |i: u32, vip: Ipv4Addr, backends: &[String]| {
        let _ = writeln!(chains, ":{} - [0:0]", svc_chain(i));
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j {}",
            svc_chain(i)
        );
        rules.push_str(&svc_rules(i, backends));
        for (j, backend) in backends.iter().enumerate() {
            let _ = writeln!(chains, ":{} - [0:0]", sep_chain(i, j));
            let _ = writeln!(
                rules,
                "-A {} -p tcp -m comment --comment \"bench/svc-{i}:http\" -m tcp -j DNAT --to-destination {backend}",
                sep_chain(i, j)
            );
        }
    };
    for service_spec in services {
        service(
            service_spec.number,
            service_spec.vip,
            &service_spec.backends,
        );
    }
    format!("{chains}{rules}COMMIT\n")
}

fn nft_service_chain(i: u32) -> String {
    format!("service-{i:08X}")
}

fn nft_service_rule(i: u32, backends: &[String]) -> String {
    let arms: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(k, backend)| {
            format!(
                "{k} : goto endpoint-{i:08X}-{}",
                endpoint_index_or(backend, k)
            )
        })
        .collect();
    format!(
        "numgen random mod {} vmap {{ {} }}",
        backends.len(),
        arms.join(", ")
    )
}

/// Which of the 8 backends `backend` is (its endpoint chain's index);
/// `fallback` for the bulk service's single backend.
fn endpoint_index_or(backend: &str, fallback: usize) -> usize {
    backends()
        .iter()
        .position(|b| b == backend)
        .unwrap_or(fallback)
}

/// The kube-proxy nftables layout of `services`: a verdict map from (VIP,
/// protocol, port) to a service chain, numgen random over endpoint chains
/// that DNAT; an `nft -f` input.
pub(crate) fn nft_layout(services: &[KubeService]) -> String {
    format!("{NFT_TABLE}{}", nft_services(services))
}

/// The table of the nftables layout: the output hook's chain, and the
/// services chain looking the verdict map up.
pub(crate) const NFT_TABLE: &str = "add table ip kube-proxy\n\
     add chain ip kube-proxy nat-output { type nat hook output priority -100 ; policy accept ; }\n\
     add chain ip kube-proxy services\n\
     add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
     add rule ip kube-proxy nat-output jump services\n\
     add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n";

/// `services` in the nftables layout, for a table [`NFT_TABLE`] made:
/// their chains and verdict map elements.
pub(crate) fn nft_services(services: &[KubeService]) -> String {
    let mut out = String::new();
    let mut service = |i: u32, vip: Ipv4Addr, backends: &[String]| {
        for (k, backend) in backends.iter().enumerate() {
            let chain = format!("endpoint-{i:08X}-{k}");
            let _ = writeln!(out, "add chain ip kube-proxy {chain}");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {chain} meta l4proto tcp dnat to {backend}"
            );
        }
        let chain = nft_service_chain(i);
        let _ = writeln!(out, "add chain ip kube-proxy {chain}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} {}",
            nft_service_rule(i, backends)
        );
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {vip} . tcp . 80 : goto {chain} }}"
        );
    };
    for service_spec in services {
        service(
            service_spec.number,
            service_spec.vip,
            &service_spec.backends,
        );
    }
    out
}

/// Reads one figure of a sample.
type Metric = fn(&Sample) -> f64;

fn stats(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut sorted: Vec<f64> = values.collect();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
    )
}

impl Results {
    fn median(&self, scale: u32, mode: Mode, metric: Metric) -> f64 {
        stats(self.samples[&(scale, mode)].iter().map(metric)).1
    }

    /// The Markdown report.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let metrics: [(&str, Metric, &str); 4] = [
            (
                "short connections per second",
                |s| s.per_sec,
                "higher is better",
            ),
            (
                "connection latency p50 (us)",
                |s| s.p50_us,
                "lower is better",
            ),
            (
                "connection latency p99 (us)",
                |s| s.p99_us,
                "lower is better",
            ),
            (
                "long-lived connection throughput (Gbit/s)",
                |s| s.gbit,
                "higher is better",
            ),
        ];
        for (title, metric, better) in metrics {
            let _ = writeln!(
                out,
                "### {title} ({better}; median and min-max of {REPEATS} runs)\n"
            );
            let _ = writeln!(
                out,
                "| services | mode | median | min - max | vs direct | vs iptables |"
            );
            let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|");
            for scale in SCALES {
                for mode in MODES {
                    let (min, median, max) = stats(self.samples[&(scale, mode)].iter().map(metric));
                    let direct = self.median(scale, Mode::Direct, metric);
                    let iptables = self.median(scale, Mode::Iptables, metric);
                    let _ = writeln!(
                        out,
                        "| {scale} | {} | {median:.1} | {min:.1} - {max:.1} | {:.2}x | {:.2}x |",
                        mode.name(),
                        median / direct,
                        median / iptables
                    );
                }
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "### Control plane: programming {BACKENDS} backends per service\n"
        );
        let _ = writeln!(
            out,
            "Each one-service update is timed as it is made in use: socklb's as the node \
             daemon sends it, an Upsert over its open connection to the agent; iptables' and \
             nftables' as kube-proxy applies it, a new `iptables-restore --noflush` or `nft -f` \
             process (in the pod's namespace here), whose start alone the next column times.\n"
        );
        let _ = writeln!(
            out,
            "| services | mode | whole table | one-service update, median (min - max of {UPDATES}) | starting the process (`ip netns exec NS true`), median | update less that start, median |"
        );
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|");
        for scale in SCALES {
            for mode in [Mode::Socklb, Mode::Iptables, Mode::Nftables] {
                let (min, median, max) = stats(self.updates[&(scale, mode)].iter().copied());
                // socklb's Upsert goes over a connected client: nothing to subtract.
                let (spawn, net) = match self.spawns.get(&(scale, mode)) {
                    Some(spawns) => {
                        let spawn = stats(spawns.iter().copied()).1;
                        (format!("{spawn:.1} ms"), median - spawn)
                    }
                    None => ("-".to_string(), median),
                };
                let _ = writeln!(
                    out,
                    "| {scale} | {} | {:.0} ms | {median:.1} ms ({min:.1} - {max:.1}) | {spawn} | {net:.1} ms |",
                    mode.name(),
                    self.programming[&(scale, mode)].as_secs_f64() * 1e3
                );
            }
        }
        out
    }

    /// Short connections per second relative to direct, grouped by scale.
    pub(crate) fn plot(&self, path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
        use plotters::prelude::*;
        let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Short connections per second, relative to direct pod IP (median)",
                ("sans-serif", 20),
            )
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..(SCALES.len() as f64), 0f64..1.2f64)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            // Labels every half unit; the odd ones are the group centres.
            .x_labels(SCALES.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let half_units = (x * 2.0).round() as usize;
                match SCALES.get(half_units / 2) {
                    Some(scale) if half_units % 2 == 1 => format!("{scale} services"),
                    _ => String::new(),
                }
            })
            .y_desc("x direct")
            .draw()?;
        let colors = [
            RGBColor(120, 120, 120),
            RGBColor(31, 119, 180),
            RGBColor(214, 39, 40),
            RGBColor(255, 127, 14),
        ];
        let width = 0.8 / MODES.len() as f64;
        for (m, mode) in MODES.iter().enumerate() {
            let color = colors[m];
            let bars = SCALES.iter().enumerate().map(|(g, scale)| {
                let ratio = self.median(*scale, *mode, |s| s.per_sec)
                    / self.median(*scale, Mode::Direct, |s| s.per_sec);
                let left = g as f64 + 0.1 + m as f64 * width;
                Rectangle::new([(left, 0.0), (left + width * 0.9, ratio)], color.filled())
            });
            chart
                .draw_series(bars)?
                .label(mode.name())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
