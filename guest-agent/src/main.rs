use std::{
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use tokio::signal::unix::{SignalKind, signal};

use anyhow::{Context as _, Result};
use clap::Parser;
use slog::{Logger, error, info};
use socklb_agent::{
    config::{Config, Given},
    datapath::{self, Datapath},
    kernel, logging,
    rpc::Rpc,
    server,
    services::ServiceTable,
};
use socklb_table::Table;

const PRECEDENCE: &str = "\
Configuration precedence, highest first: command-line flags, SOCKLB_* environment \
variables (named beside each flag), socklb.<key>=<value> on the kernel command line \
(keys: cgroup, bpffs, table, log_level, pod_ip, listen, allow_cid, bpf_stats), built-in \
defaults.

Signals: SIGTERM and SIGINT stop the agent and leave the datapath pinned and working; \
SIGHUP re-reads the table file.";

/// socklb's guest agent: Kubernetes Service load balancing at the socket.
#[derive(Parser, Debug)]
#[command(name = "socklb-agent", version, after_help = PRECEDENCE)]
struct Args {
    /// Cgroup (v2) to attach the programs to [default: /sys/fs/cgroup]
    #[arg(long, env = "SOCKLB_CGROUP")]
    cgroup: Option<PathBuf>,
    /// bpffs directory for socklb's pins [default: /sys/fs/bpf/socklb]
    #[arg(long, env = "SOCKLB_BPFFS")]
    bpffs: Option<PathBuf>,
    /// Service table (YAML or JSON) to program at start; without it the
    /// datapath keeps what is already programmed
    #[arg(long, env = "SOCKLB_TABLE")]
    table: Option<PathBuf>,
    /// critical, error, warning, info, debug or trace [default: info]
    #[arg(long, env = "SOCKLB_LOG_LEVEL")]
    log_level: Option<String>,
    /// The guest's own address(es), shown by getsockname instead of a
    /// loopback address that only a loopback backend caused [default: the
    /// first global address of each family]
    #[arg(long = "pod-ip", env = "SOCKLB_POD_IP", value_delimiter = ',')]
    pod_ips: Vec<IpAddr>,
    /// API address: vsock://-1:PORT (a guest) or unix:///path
    /// [default: vsock://-1:1025]
    #[arg(long, env = "SOCKLB_LISTEN")]
    listen: Option<String>,
    /// A vsock peer CID allowed to call the API besides the host (2)
    #[arg(long = "allow-cid", env = "SOCKLB_ALLOW_CID", value_delimiter = ',')]
    allowed_cids: Vec<u32>,
    /// Keep BPF run-time stats on, so Stats reports per-hook time (costs two
    /// clock reads per hook run)
    #[arg(long, env = "SOCKLB_BPF_STATS")]
    bpf_stats: bool,
    /// Validate the table file and exit, without touching the kernel
    #[arg(long, requires = "table", conflicts_with = "detach")]
    check: bool,
    /// Remove everything socklb attached and pinned under --bpffs, and exit
    #[arg(long)]
    detach: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let check = args.check;
    let detach = args.detach;
    let given = Given {
        cgroup: args.cgroup,
        bpffs: args.bpffs,
        table: args.table,
        log_level: args.log_level,
        pod_ips: args.pod_ips,
        listen: args.listen,
        allowed_cids: args.allowed_cids,
        bpf_stats: args.bpf_stats.then_some(true),
    };
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let config = match Config::resolve(given, &cmdline) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("socklb-agent: {err:#}");
            return ExitCode::from(2);
        }
    };
    if check {
        let path = config.table.as_ref().expect("clap requires --table");
        return match Table::from_file(path) {
            Ok(table) => {
                println!(
                    "{}: {} services, valid",
                    path.display(),
                    table.services.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("socklb-agent: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let log = logging::logger(config.log_level);
    let result = if detach {
        datapath::detach(&config.bpffs, &log)
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")
            .and_then(|runtime| runtime.block_on(serve(&config, &log)))
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(log, "{err:#}");
            ExitCode::FAILURE
        }
    };
    // Dropping the last logger flushes the async drain.
    drop(log);
    code
}

async fn serve(config: &Config, log: &Logger) -> Result<()> {
    // Validate the table before touching the kernel.
    let table = config.table.as_deref().map(Table::from_file).transpose()?;
    kernel::prepare(&config.cgroup, &config.bpffs, log)?;
    let mut services = ServiceTable::new(Datapath::load(&config.bpffs, log)?);
    match &table {
        Some(table) => {
            services.sync(table, 0)?;
        }
        None => info!(log, "no table given: keeping the programmed one";
                      "services" => services.datapath().service_count()),
    }
    set_guest_addrs(services.datapath_mut(), config, log)?;
    services.datapath_mut().attach(&config.cgroup)?;
    // Held open for as long as the agent runs.
    let _run_time_stats = config
        .bpf_stats
        .then(datapath::enable_run_time_stats)
        .transpose()?;
    // Handlers first: a SIGHUP right after "ready" must reload, not kill.
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let services = Arc::new(Mutex::new(services));
    let rpc = Arc::new(Rpc::new(services.clone(), config.bpf_stats, log));
    let mut server = server::start(&config.listen, &config.allowed_cids, rpc, log).await?;
    info!(log, "ready"; "cgroup" => config.cgroup.display().to_string(),
          "bpffs" => config.bpffs.display().to_string(), "listen" => config.listen.to_string());

    loop {
        tokio::select! {
            _ = hangup.recv() => reload(config, &services, log),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!(log, "stopping; the datapath stays pinned and working");
    server.shutdown().await.context("stopping the API server")?;
    Ok(())
}

/// SIGHUP: program the table file again; a bad file changes nothing.
fn reload(config: &Config, services: &Mutex<ServiceTable>, log: &Logger) {
    let Some(path) = &config.table else {
        info!(log, "SIGHUP without a table file: nothing to re-read");
        return;
    };
    let mut services = services.lock().expect("table lock");
    let result = Table::from_file(path)
        .map_err(anyhow::Error::from)
        .and_then(|table| {
            let generation = services.generation();
            services.sync(&table, generation)?;
            set_guest_addrs(services.datapath_mut(), config, log)
        });
    if let Err(err) = result {
        error!(log, "table not applied, the datapath is unchanged: {err:#}");
    }
}

/// Configured pod IPs, else the first global address of each family.
fn set_guest_addrs(datapath: &mut Datapath, config: &Config, log: &Logger) -> Result<()> {
    let ips = if config.pod_ips.is_empty() {
        discover_guest_ips()
    } else {
        config.pod_ips.clone()
    };
    let v4 = ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let v6 = ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    info!(log, "guest addresses for getsockname";
          "v4" => v4.map(|ip| ip.to_string()), "v6" => v6.map(|ip| ip.to_string()));
    datapath.set_guest_addrs(v4, v6)
}

fn discover_guest_ips() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .filter_map(|a| {
            let addr = a.address?;
            let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            (!ip.is_loopback() && !link_local).then_some(ip)
        })
        .collect()
}
