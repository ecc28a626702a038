use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use slog::{Logger, error, info};
use socklb_agent::{
    config::{Config, Given},
    datapath::{self, Datapath},
    kernel, logging,
    table::Table,
};

const PRECEDENCE: &str = "\
Configuration precedence, highest first: command-line flags, SOCKLB_* environment \
variables (named beside each flag), socklb.<key>=<value> on the kernel command line \
(keys: cgroup, bpffs, table, log_level, pod_ip), built-in defaults.

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
    // Block the signals we wait for before any thread (the log drain) starts,
    // so every thread inherits the mask and `sigwait` receives them.
    let signals = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP]);
    if let Err(err) = signals.thread_block() {
        eprintln!("socklb-agent: cannot block signals: {err}");
        return ExitCode::FAILURE;
    }
    let log = logging::logger(config.log_level);
    let result = if detach {
        datapath::detach(&config.bpffs, &log)
    } else {
        serve(&config, signals, &log)
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

fn serve(config: &Config, signals: SigSet, log: &Logger) -> Result<()> {
    // Validate the table before touching the kernel.
    let table = config.table.as_deref().map(Table::from_file).transpose()?;
    kernel::prepare(&config.cgroup, &config.bpffs, log)?;
    let mut datapath = Datapath::load(&config.bpffs, log)?;
    datapath.sweep_orphans()?;
    match &table {
        Some(table) => {
            datapath.apply(table)?;
        }
        None => info!(log, "no table given: keeping the programmed one";
                      "services" => datapath.read_table()?.services.len()),
    }
    set_guest_addrs(&mut datapath, config, log)?;
    datapath.attach(&config.cgroup)?;
    info!(log, "ready"; "cgroup" => config.cgroup.display().to_string(),
          "bpffs" => config.bpffs.display().to_string());
    loop {
        match signals.wait().context("waiting for signals")? {
            Signal::SIGHUP => match &config.table {
                Some(path) => match Table::from_file(path) {
                    Ok(table) => {
                        datapath.apply(&table)?;
                        set_guest_addrs(&mut datapath, config, log)?;
                    }
                    Err(err) => error!(log, "table not applied, the datapath is unchanged: {err}"),
                },
                None => info!(log, "SIGHUP without a table file: nothing to re-read"),
            },
            signal => {
                info!(log, "stopping; the datapath stays pinned and working"; "signal" => signal.as_str());
                return Ok(());
            }
        }
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
