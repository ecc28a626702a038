use std::{
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use tokio::signal::unix::{SignalKind, signal};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use slog::{Logger, error, info, warn};
use socklb_agent::{
    addresses::{self, GuestAddrs},
    config::{CMDLINE_KEYS, Config, Settings},
    datapath::{self, Datapath},
    kernel,
    peers::PeerRule,
    rpc::Rpc,
    server,
    services::ServiceTable,
    sockets::SocketCloser,
};
use socklb_table::Table;

/// The help text's epilogue; the key list comes from the parser's.
fn after_help() -> String {
    format!(
        "Configuration precedence, highest first: command-line flags, SOCKLB_* environment \
         variables (named beside each flag), socklb.<key>=<value> on the kernel command line \
         (keys: {}), built-in defaults.\n\n\
         Signals: SIGTERM and SIGINT stop the agent and leave the datapath pinned and working; \
         SIGHUP re-reads the table file.",
        CMDLINE_KEYS.join(", ")
    )
}

/// socklb's guest agent: Kubernetes Service load balancing at the socket.
#[derive(Parser, Debug)]
#[command(name = "socklb-agent", version)]
struct Args {
    /// Cgroup (v2) to attach the programs to [default: the first cgroup2
    /// mount, else cgroup2 mounted at /sys/fs/cgroup]
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
    /// first global address of each family on a non-loopback interface,
    /// followed as it changes]
    #[arg(long = "pod-ip", env = "SOCKLB_POD_IP", value_delimiter = ',')]
    pod_ips: Vec<IpAddr>,
    /// API address: vsock://-1:PORT (a guest) or unix:///path
    /// [default: vsock://-1:1100]
    #[arg(long, env = "SOCKLB_LISTEN")]
    listen: Option<String>,
    /// Allow --listen on a vsock port Kata's guest services use (1024-1027):
    /// only for guests that run no kata-agent
    #[arg(long, env = "SOCKLB_ALLOW_KATA_PORT")]
    allow_kata_port: bool,
    /// A vsock peer CID allowed to call the API besides the host (2)
    #[arg(long = "allow-cid", env = "SOCKLB_ALLOW_CID", value_delimiter = ',')]
    allowed_cids: Vec<u32>,
    /// Admit vsock peers from source ports 1024 and above. By default only
    /// a privileged host process (a port below 1024, which only
    /// CAP_NET_BIND_SERVICE may bind on the host) may call over vhost-vsock;
    /// over hybrid vsock (Firecracker, Cloud Hypervisor, vhost-device-vsock)
    /// the VMM picks the port, so such guests need this and rely on the
    /// hybrid vsock socket's file permissions
    #[arg(long, env = "SOCKLB_ALLOW_UNPRIVILEGED_PORT")]
    allow_unprivileged_port: bool,
    /// When an update removes a backend, close TCP connections to it too.
    /// Connected UDP sockets to it are always closed (the application gets
    /// an error and reconnects to a live backend); TCP is left alone by
    /// default, as kube-proxy leaves established connections
    #[arg(long, env = "SOCKLB_CLOSE_TCP_OF_REMOVED_BACKENDS")]
    close_tcp_of_removed_backends: bool,
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
    let args = Args::command().after_help(after_help()).get_matches();
    let args = Args::from_arg_matches(&args).unwrap_or_else(|err| err.exit());
    let check = args.check;
    let detach = args.detach;
    let given = Settings {
        cgroup: args.cgroup,
        bpffs: args.bpffs,
        table: args.table,
        log_level: args.log_level,
        pod_ips: args.pod_ips,
        listen: args.listen,
        allowed_cids: args.allowed_cids,
        bpf_stats: args.bpf_stats.then_some(true),
        allow_kata_port: args.allow_kata_port.then_some(true),
        allow_unprivileged_port: args.allow_unprivileged_port.then_some(true),
        close_tcp_of_removed_backends: args.close_tcp_of_removed_backends.then_some(true),
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
    // Held to the end of main: dropping it flushes the last lines.
    let (log, _flush) = socklb_logging::json("socklb-agent", config.log_level);
    let result = if detach {
        datapath::detach(&config.bpffs, &log)
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")
            .and_then(|runtime| runtime.block_on(serve(&config, &log)))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(log, "{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: &Config, log: &Logger) -> Result<()> {
    // Validate the table before touching the kernel.
    let table = config.table.as_deref().map(Table::from_file).transpose()?;
    let cgroup = kernel::prepare(config.cgroup.as_deref(), &config.bpffs, log)?;
    let features = kernel::Features::detect();
    features.report(log);
    let (datapath, programmed) = Datapath::load(&config.bpffs, log)?;
    let mut services = ServiceTable::new(programmed).with_datapath(datapath);
    match &table {
        Some(table) => {
            services.sync(table, 0)?;
        }
        None => info!(log, "no table given: keeping the programmed one";
                      "services" => services.programmed().service_count()),
    }
    // Subscribed before the first read, so no address change is missed.
    let address_changes = config
        .pod_ips
        .is_empty()
        .then(addresses::subscribe)
        .transpose()?;
    addresses::program(&mut services, GuestAddrs::current(&config.pod_ips), log)?;
    services.attach(&cgroup)?;
    services.set_socket_closer(Arc::new(SocketCloser::new(
        cgroup.clone(),
        config.close_tcp_of_removed_backends,
        log,
    )));
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
    if let Some(socket) = address_changes {
        tokio::spawn(addresses::follow(
            socket,
            services.clone(),
            log.new(slog::o!("component" => "addresses")),
        ));
    }
    let rpc = Arc::new(
        Rpc::new(services.clone(), config.bpf_stats, log).with_kernel_features(features.names()),
    );
    let peer_rule = PeerRule {
        allowed_cids: config.allowed_cids.clone(),
        allow_unprivileged_port: config.allow_unprivileged_port,
    };
    let mut server = server::start(&config.listen, &peer_rule, rpc, log).await?;
    info!(log, "ready"; "cgroup" => cgroup.display().to_string(),
          "bpffs" => config.bpffs.display().to_string(), "listen" => config.listen.to_string(),
          "features" => features.names().join(","));
    // Under systemd (Type=notify), kata-agent starts only once the hooks are
    // attached; elsewhere NOTIFY_SOCKET is unset and this does nothing.
    if let Err(err) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!(log, "cannot tell systemd the agent is ready: {err}");
    }

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
            // A new table under a new generation, so a host comparing
            // generations sees that the table changed under it.
            let generation = services.generation() + 1;
            services.sync(&table, generation)?;
            addresses::program(&mut services, GuestAddrs::current(&config.pod_ips), log)
        });
    if let Err(err) = result {
        error!(log, "table not applied, the datapath is unchanged: {err:#}");
    }
}
