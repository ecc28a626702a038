use std::{fmt::Write as _, io::IsTerminal as _, path::PathBuf, process::ExitCode, time::Duration};
#[cfg(feature = "kubernetes")]
use std::{net::SocketAddr, path::Path};

use anyhow::{Context as _, Result, bail};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use serde_json::json;
use slog::Logger;
use socklb_protocols::socklb as api;
#[cfg(feature = "kubernetes")]
use socklb_protocols::{DEFAULT_AGENT_PORT, kata_service_on};
use socklb_shim::{
    AgentAddr, AgentClient, Options,
    output::{Column, Output, table},
    sources::file::watch_file,
    trace,
};
#[cfg(feature = "kubernetes")]
use socklb_shim::{
    node::{
        self, NodeConfig, discovery,
        status::{self, PodOrSandbox},
    },
    sources::kubernetes::{Policy, kube_watch},
};
use socklb_table::{ServiceKey, Table};

/// socklb-shim: push Kubernetes service tables into a socklb sandbox.
#[derive(Parser, Debug)]
#[command(name = "socklb-shim", version)]
struct Args {
    /// The agent: vsock://CID[:PORT], hvsock:///path/to/uds[:PORT] or
    /// unix:///path (PORT defaults to the agent's, 1100)
    /// (every command but `node`, which finds the node's agents itself)
    #[arg(long, global = true, env = "SOCKLB_AGENT")]
    agent: Option<AgentAddr>,
    /// Instead of --agent, for list, stats, health, metrics and trace: the agent
    /// of this pod's Kata sandbox on this node, as the node daemon found it
    /// (and with `node status`, that sandbox's row)
    #[cfg(feature = "kubernetes")]
    #[arg(long, global = true, value_name = "NAMESPACE/NAME", conflicts_with_all = ["agent", "sandbox"])]
    pod: Option<String>,
    /// As --pod, by the sandbox's id (`node status` lists them)
    #[cfg(feature = "kubernetes")]
    #[arg(long, global = true, value_name = "ID", conflicts_with = "agent")]
    sandbox: Option<String>,
    /// The node daemon's status socket: where `node` serves it, and what
    /// `node status`, --pod and --sandbox ask
    #[cfg(feature = "kubernetes")]
    #[arg(long, global = true, default_value = DEFAULT_STATUS_SOCKET)]
    status_socket: PathBuf,
    /// critical, error, warning, info, debug or trace
    #[arg(long, env = "SOCKLB_LOG_LEVEL", default_value = "info", value_parser = socklb_logging::parse_level)]
    log_level: slog::Level,
    /// auto: lines for a person when a one-shot command's stderr is a
    /// terminal, else JSON lines (the daemons, `watch`, `kube` and `node`,
    /// always); human or json: that, whatever stderr is
    #[arg(long, env = "SOCKLB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    /// Seconds to wait for one call (and to keep trying to connect; `node`
    /// tries once per attempt and retries with its own backoff)
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make the agent hold exactly the table in FILE (YAML or JSON)
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// The table as read back from the agent's maps
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Per-service, per-hook and per-map statistics
    Stats {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The agent's health and version
    Health {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Statistics in the Prometheus text format
    Metrics,
    /// The datapath's decisions as it makes them, one line each, until
    /// stopped: which backend a connect to a VIP went to, or why it was
    /// refused or left alone (API 1.5)
    Trace {
        /// Only this service (repeatable)
        #[arg(long = "service", value_name = "VIP:PORT[/TCP|UDP]", value_parser = trace::parse_service_key)]
        services: Vec<ServiceKey>,
        /// Only this verdict (repeatable)
        #[arg(long = "verdict", value_enum)]
        verdicts: Vec<trace::Verdict>,
        /// Only callers in this cgroup, by id (the CGROUP-ID column)
        /// (repeatable)
        #[arg(long = "cgroup-id", value_name = "ID")]
        cgroup_ids: Vec<u64>,
        /// Destinations that are no VIP too: every connect of the guest
        #[arg(long)]
        passes: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = trace::Format::Text)]
        output: trace::Format,
    },
    /// Print SHELL's completion script for socklb-shim, e.g.
    /// `source <(socklb-shim completions bash)`
    Completions { shell: clap_complete::Shell },
    /// Print the manual page of socklb-shim, or of one of its commands
    /// (`man node status`), as roff: `socklb-shim man | man -l -`
    Man { command: Vec<String> },
    /// Keep the agent's table equal to what kube-proxy would program for the
    /// cluster's Services and EndpointSlices, until stopped
    #[cfg(feature = "kubernetes")]
    Kube {
        /// kubeconfig to use [default: in-cluster, then ~/.kube/config]
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name, for internalTrafficPolicy Local and topology
        /// hints; its Node's zone label is watched too [default: the host
        /// name, lowercased, as kube-proxy assumes]
        #[arg(long, env = "NODE_NAME")]
        node: Option<String>,
        /// Also serve externalIPs and LoadBalancer ingress IPs as VIPs
        #[arg(long)]
        external_vips: bool,
        /// Milliseconds between batches of changes sent to the agent
        #[arg(long, default_value_t = 100)]
        batch_ms: u64,
    },
    /// The node daemon: find every Kata sandbox on this node and keep its
    /// agent's table equal to what kube-proxy would program, from one watch
    /// of the API; `node status` shows how each sandbox is doing
    #[cfg(feature = "kubernetes")]
    Node(NodeArgs),
    /// Apply FILE on every change until stopped; re-apply after an agent restart
    Watch {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Milliseconds between checks of the file and the agent
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
}

impl Command {
    /// A command that answers once and exits, rather than a daemon: it
    /// gives up at once where waiting for the agent cannot help.
    fn is_one_shot(&self) -> bool {
        match self {
            Command::Apply { .. }
            | Command::List { .. }
            | Command::Stats { .. }
            | Command::Health { .. }
            | Command::Metrics
            | Command::Trace { .. }
            | Command::Completions { .. }
            | Command::Man { .. } => true,
            #[cfg(feature = "kubernetes")]
            Command::Kube { .. } | Command::Node(_) => false,
            Command::Watch { .. } => false,
        }
    }
}

#[cfg(feature = "kubernetes")]
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct NodeArgs {
    #[command(subcommand)]
    command: Option<NodeCommand>,
    /// This node's name (required: topology and internalTrafficPolicy Local)
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// kubeconfig to use [default: in-cluster, then ~/.kube/config]
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A directory of Kata sandbox directories (<id>/shim-monitor.sock);
    /// repeatable; replaces the defaults /run/vc/sbs and /run/kata
    #[arg(long = "sandbox-root")]
    sandbox_roots: Vec<PathBuf>,
    /// A directory of the sandboxes' OCI bundles (<id>/config.json, or
    /// CRI-O's <id>/userdata/config.json), read for the pod's namespace and
    /// name; repeatable; replaces the defaults: containerd's
    /// /run/containerd/io.containerd.runtime.v2.task/k8s.io, k3s's and
    /// RKE2's /run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io,
    /// CRI-O's /run/containers/storage/overlay-containers
    #[arg(long = "bundle-root")]
    bundle_roots: Vec<PathBuf>,
    /// socklb-agent's guest vsock port (Kata's own are 1024-1027)
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    agent_port: u32,
    /// Serve Prometheus /metrics and /healthz over HTTP here (e.g. 0.0.0.0:9470)
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Also serve externalIPs and LoadBalancer ingress IPs as VIPs
    #[arg(long)]
    external_vips: bool,
    /// Milliseconds between batches of changes sent to the agents
    #[arg(long, default_value_t = 100)]
    batch_ms: u64,
    /// Milliseconds between rescans of the sandbox roots (inotify wakes one
    /// at once besides)
    #[arg(long, default_value_t = 5000)]
    rescan_ms: u64,
    /// Whole tables sent to agents at once, at most
    #[arg(long, default_value_t = node::DEFAULT_PARALLEL_SYNCS)]
    parallel_syncs: usize,
    /// Seconds between reading back each idle agent's table to compare its
    /// digest with the node's (a mismatch is followed by a whole Sync);
    /// 0: never
    #[arg(long, default_value_t = 300)]
    verify_secs: u64,
    /// Seconds between reading each idle agent's decision counts for the
    /// per-sandbox metrics (API 1.5 agents; checked at the 5 s health
    /// tick, so 5 at least); 0: never
    #[arg(long, default_value_t = 30)]
    decisions_secs: u64,
    /// Seconds the Kubernetes watch may keep failing before /healthz
    /// answers 503 (it does too until the first table)
    #[arg(long, default_value_t = 60)]
    watch_stale_secs: u64,
}

#[cfg(feature = "kubernetes")]
#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// One row per sandbox (or only the one of --pod or --sandbox): id,
    /// pod, agent (at -o wide), state, acknowledged version, lag, last error
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[cfg(feature = "kubernetes")]
const DEFAULT_STATUS_SOCKET: &str = "/run/socklb/node.sock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Auto,
    Human,
    Json,
}

impl Args {
    fn log_format(&self) -> socklb_logging::Format {
        use socklb_logging::Format;
        match self.log_format {
            LogFormat::Auto if self.command.is_one_shot() && std::io::stderr().is_terminal() => {
                Format::Human
            }
            LogFormat::Auto | LogFormat::Json => Format::Json,
            LogFormat::Human => Format::Human,
        }
    }

    /// The sandbox --pod or --sandbox names, if either is given.
    #[cfg(feature = "kubernetes")]
    fn chosen_sandbox(&self) -> Result<Option<PodOrSandbox>> {
        Ok(match (&self.pod, &self.sandbox) {
            (Some(pod), _) => Some(PodOrSandbox::pod(pod).map_err(anyhow::Error::msg)?),
            (None, Some(id)) => Some(PodOrSandbox::Sandbox(id.clone())),
            (None, None) => None,
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("socklb-shim: cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Held to the end of main: dropping it flushes the last lines.
    let (log, _flush) = socklb_logging::logger("socklb-shim", args.log_level, args.log_format());
    match runtime.block_on(run(args, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("socklb-shim: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, log: Logger) -> Result<()> {
    let options = Options {
        call_timeout: Duration::from_secs(args.timeout),
        connect_timeout: Duration::from_secs(args.timeout),
        fail_fast: args.command.is_one_shot(),
        ..Options::default()
    };
    #[cfg(feature = "kubernetes")]
    let chosen = args.chosen_sandbox()?;
    let command = match args.command {
        #[cfg(feature = "kubernetes")]
        Command::Node(node) => {
            return run_node(node, chosen, args.status_socket, args.timeout, &log).await;
        }
        Command::Completions { shell } => {
            print!("{}", completions(shell)?);
            return Ok(());
        }
        Command::Man { command } => return print_man(&command),
        command => command,
    };
    #[cfg(feature = "kubernetes")]
    let agent = match chosen {
        Some(chosen) => Some(agent_of(&chosen, &command, &args.status_socket, args.timeout).await?),
        None => args.agent,
    };
    #[cfg(not(feature = "kubernetes"))]
    let agent = args.agent;
    let Some(agent) = agent else {
        bail!("--agent (or SOCKLB_AGENT) is required for this command");
    };
    let mut client = AgentClient::new(agent, options, &log);
    match command {
        Command::Apply { file } => {
            let table = Table::from_file(&file)?;
            let result = client.sync(table).await?;
            println!(
                "applied {}: {} services, generation {}, digest {}",
                file.display(),
                result.services,
                result.generation,
                result.digest.unwrap_or_default()
            );
        }
        Command::List { output } => {
            let (generation, services, digest) = client.list().await?;
            let mut data = serde_json::to_value(services.to_file())?;
            data["generation"] = json!(generation);
            data["digest"] = json!(digest);
            print!(
                "{}",
                output.render(&data, |wide| services_table(&services, wide))?
            );
        }
        Command::Trace {
            services,
            verdicts,
            cgroup_ids,
            passes,
            output,
        } => {
            let request = trace::request(&services, &verdicts, &cgroup_ids, passes);
            trace::follow(&mut client, &request, output).await?;
        }
        Command::Stats { output } => {
            let stats = client.stats().await?;
            let data: serde_json::Value =
                serde_json::from_str(&protobuf_json_mapping::print_to_string(&stats)?)?;
            print!(
                "{}",
                output.render(&data, |wide| stats_tables(&stats, wide))?
            );
        }
        Command::Health { output } => {
            let status = format!("{:?}", client.check().await?);
            let version = client.version().await?;
            let data = json!({
                "status": status,
                "agent_version": version.agent_version,
                "api_version": version.api_version,
                "kernel_release": version.kernel_release,
                "hooks_attached": version.hooks_attached,
                "features": version.features,
            });
            let text = |_wide| {
                format!(
                    "status          {status}\n\
                     agent version   {}\n\
                     API version     {}\n\
                     guest kernel    {}\n\
                     hooks attached  {} ({})\n\
                     features        {}\n",
                    version.agent_version,
                    version.api_version,
                    version.kernel_release,
                    version.hooks_attached.len(),
                    version.hooks_attached.join(" "),
                    version.features.join(" ")
                )
            };
            print!("{}", output.render(&data, text)?);
        }
        Command::Metrics => print!("{}", client.metrics().await?),
        #[cfg(feature = "kubernetes")]
        Command::Kube {
            kubeconfig,
            node,
            external_vips,
            batch_ms,
        } => {
            let kube = kube_client(kubeconfig).await?;
            let node = match node {
                Some(node) => node,
                None => host_node_name()?,
            };
            let policy = Policy {
                node: Some(node),
                external_vips,
                zone: None,
            };
            tokio::select! {
                () = kube_watch::run(kube, &mut client, policy, Duration::from_millis(batch_ms), &log) => {}
                signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C")?,
            }
        }
        #[cfg(feature = "kubernetes")]
        Command::Node(_) => unreachable!("handled above"),
        Command::Completions { .. } | Command::Man { .. } => unreachable!("handled above"),
        Command::Watch { file, interval_ms } => {
            tokio::select! {
                () = watch_file(&mut client, &file, Duration::from_millis(interval_ms), &log) => {}
                signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C")?,
            }
        }
    }
    Ok(())
}

#[cfg(feature = "kubernetes")]
async fn kube_client(kubeconfig: Option<PathBuf>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

#[cfg(feature = "kubernetes")]
async fn run_node(
    args: NodeArgs,
    chosen: Option<PodOrSandbox>,
    status_socket: PathBuf,
    timeout_secs: u64,
    log: &Logger,
) -> Result<()> {
    if let Some(NodeCommand::Status { output }) = args.command {
        let mut report =
            status::Report::fetch(&status_socket, Duration::from_secs(timeout_secs)).await?;
        let text = match chosen {
            None => output.render(&report, |wide| status::render(&report, wide))?,
            Some(chosen) => {
                report.sandboxes = chosen
                    .rows(&report)
                    .map_err(anyhow::Error::msg)?
                    .into_iter()
                    .cloned()
                    .collect();
                output.render(&report, |wide| {
                    status::sandbox_table(&report.sandboxes, wide)
                })?
            }
        };
        print!("{text}");
        return Ok(());
    }
    if chosen.is_some() {
        bail!(
            "--pod and --sandbox choose a sandbox to read (list, stats, health, metrics, node \
             status); the node daemon serves every sandbox of the node"
        );
    }
    let Some(node_name) = args.node.filter(|n| !n.is_empty()) else {
        bail!(
            "the node's name is required: --node NAME or NODE_NAME (topology and internalTrafficPolicy Local need it)"
        );
    };
    if let Some(service) = kata_service_on(args.agent_port) {
        bail!(
            "--agent-port {} is taken by Kata: {service}",
            args.agent_port
        );
    }
    let config = NodeConfig {
        node: node_name,
        sandbox_roots: discovery::roots_or_default(
            args.sandbox_roots,
            &discovery::DEFAULT_SANDBOX_ROOTS,
        ),
        bundle_roots: discovery::roots_or_default(
            args.bundle_roots,
            &discovery::DEFAULT_BUNDLE_ROOTS,
        ),
        agent_port: args.agent_port,
        status_socket,
        metrics_addr: args.metrics_addr,
        batch: Duration::from_millis(args.batch_ms),
        rescan: Duration::from_millis(args.rescan_ms),
        external_vips: args.external_vips,
        call_timeout: Duration::from_secs(timeout_secs),
        parallel_syncs: args.parallel_syncs,
        verify_every: (args.verify_secs > 0).then(|| Duration::from_secs(args.verify_secs)),
        decisions_every: (args.decisions_secs > 0)
            .then(|| Duration::from_secs(args.decisions_secs)),
        watch_stale: Duration::from_secs(args.watch_stale_secs),
    };
    let kube = kube_client(args.kubeconfig).await?;
    tokio::select! {
        result = node::run(config, kube, log) => result,
        signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C"),
    }
}

/// The agent of the sandbox `chosen` names, from the node daemon's status
/// report.
#[cfg(feature = "kubernetes")]
async fn agent_of(
    chosen: &PodOrSandbox,
    command: &Command,
    status_socket: &Path,
    timeout_secs: u64,
) -> Result<AgentAddr> {
    if !matches!(
        command,
        Command::List { .. }
            | Command::Stats { .. }
            | Command::Health { .. }
            | Command::Metrics
            | Command::Trace { .. }
    ) {
        bail!(
            "--pod and --sandbox read one sandbox's agent (list, stats, health, metrics, trace); \
             the node daemon writes its table"
        );
    }
    let report = status::Report::fetch(status_socket, Duration::from_secs(timeout_secs)).await?;
    let agent = chosen.agent(&report).map_err(anyhow::Error::msg)?;
    agent
        .parse()
        .with_context(|| format!("the agent address {agent:?} from the node daemon"))
}

/// The node name kube-proxy assumes without --hostname-override.
#[cfg(feature = "kubernetes")]
fn host_node_name() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name for the node name (or pass --node)")?;
    Ok(name.trim().to_lowercase())
}

/// Backends a service's row shows unless wide, as `kubectl get endpoints`.
const BACKENDS_SHOWN: usize = 3;

fn services_table(services: &Table, wide: bool) -> String {
    let rows: Vec<[String; 4]> = services
        .services
        .iter()
        .map(|s| {
            let shown = if wide {
                s.backends.len()
            } else {
                BACKENDS_SHOWN
            };
            let mut backends = s
                .backends
                .iter()
                .take(shown)
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            if s.backends.is_empty() {
                backends = "(none: refused)".into();
            } else if s.backends.len() > shown {
                let _ = write!(backends, " + {} more", s.backends.len() - shown);
            }
            [
                s.name.clone().unwrap_or_else(|| "-".into()),
                s.key.to_string(),
                s.affinity_timeout_secs
                    .map_or("-".into(), |t| format!("ClientIP {t}s")),
                backends,
            ]
        })
        .collect();
    let header = ["NAME", "SERVICE", "AFFINITY", "BACKENDS"].map(Column::new);
    table(header, &rows, wide)
}

fn stats_tables(stats: &api::StatsResponse, wide: bool) -> String {
    let rows: Vec<[String; 4]> = stats
        .services
        .iter()
        .map(|s| {
            let key = socklb_table::ServiceKey::from_api("stats", &s.key)
                .map_or_else(|_| s.key.vip.clone(), |k| k.to_string());
            [
                key,
                s.translations.to_string(),
                s.rejects.to_string(),
                s.insert_failures.to_string(),
            ]
        })
        .collect();
    let header = [
        Column::new("SERVICE"),
        Column::new("TRANSLATIONS"),
        Column::new("REJECTS"),
        Column::wide("INSERT FAILURES"),
    ];
    let mut out = table(header, &rows, wide);
    out.push('\n');
    let rows: Vec<[String; 3]> = stats
        .hooks
        .iter()
        .map(|h| {
            let average = if h.run_count == 0 {
                "-".to_string()
            } else {
                format!("{:.0}", h.run_time_ns as f64 / h.run_count as f64)
            };
            [h.hook.clone(), h.run_count.to_string(), average]
        })
        .collect();
    out += &table(["HOOK", "RUNS", "NS/RUN"].map(Column::new), &rows, wide);
    if !stats.run_time_stats_enabled {
        out += "(hook runs are counted only while the agent runs with --bpf-stats)\n";
    }
    out.push('\n');
    let rows: Vec<[String; 3]> = stats
        .maps
        .iter()
        .map(|m| [m.map.clone(), m.entries.to_string(), m.capacity.to_string()])
        .collect();
    out += &table(["MAP", "ENTRIES", "CAPACITY"].map(Column::new), &rows, wide);
    out
}

/// `shell`'s completion script for socklb-shim.
fn completions(shell: clap_complete::Shell) -> Result<String> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Args::command(), "socklb-shim", &mut script);
    let script = String::from_utf8(script).context("the completion script")?;
    Ok(match shell {
        // clap_complete's bash script (4.6.12) spells the state of a
        // hyphenated program's subcommands one way in its dispatch loop and
        // another in its case arms, so no command's options ever complete
        // (clap-rs/clap#6421): spell the arms as the loop does.
        clap_complete::Shell::Bash => script.replace("socklb__subcmd__shim__", "socklb__shim__"),
        _ => script,
    })
}

/// Prints the manual page of socklb-shim, or of its command `path` (e.g.
/// `["node", "status"]`).
fn print_man(path: &[String]) -> Result<()> {
    // As clap_mangen's own generate_to: `help` is no command to document.
    let mut command = Args::command().disable_help_subcommand(true);
    command.build();
    let mut page = &command;
    for name in path {
        page = page.find_subcommand(name).with_context(|| {
            let commands: Vec<&str> = page.get_subcommands().map(|c| c.get_name()).collect();
            format!(
                "{} has no command {name:?} (its commands: {})",
                page.get_display_name().unwrap_or(page.get_name()),
                commands.join(", ")
            )
        })?;
    }
    clap_mangen::Man::new(page.clone())
        .render(&mut std::io::stdout())
        .context("writing the manual page")
}
