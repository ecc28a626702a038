use std::{
    process::ExitCode,
    sync::{Arc, Mutex},
};

use tokio::signal::unix::{SignalKind, signal};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use slog::{Logger, error, info, warn};
use socklb_agent::{
    addresses::{self, GuestAddrs},
    config::{self, Config, Settings},
    datapath::{self, Datapath, Tracer},
    kernel,
    peers::PeerRule,
    rpc::Rpc,
    server,
    service_table::{ServiceTable, refuse_loopback_backends},
    sockets::SocketCloser,
};
use socklb_table::{Table, TableError};

/// The help text's epilogue.
fn after_help() -> String {
    format!(
        "{}\n\n\
         Signals: SIGTERM and SIGINT stop the agent and leave the datapath pinned and working; \
         SIGHUP re-reads the table file.",
        config::precedence()
    )
}

/// socklb's guest agent: Kubernetes Service load balancing at the socket.
#[derive(Parser, Debug)]
#[command(name = "socklb-agent", version, args_override_self = true)]
struct Args {
    #[command(flatten)]
    settings: Settings,
    /// Validate the table file and exit, without touching the kernel
    #[arg(long, requires = "table", conflicts_with = "detach")]
    check: bool,
    /// Remove everything socklb attached and pinned under --bpffs, and exit
    #[arg(long)]
    detach: bool,
}

fn main() -> ExitCode {
    let args = Args::command().after_help(after_help()).get_matches();
    let Args {
        settings: given,
        check,
        detach,
    } = Args::from_arg_matches(&args).unwrap_or_else(|err| err.exit());
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let config = match Config::resolve(given, &cmdline, server::local_vsock_cid) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("socklb-agent: {err:#}");
            return ExitCode::from(2);
        }
    };
    if check {
        let path = config.table.as_ref().expect("clap requires --table");
        return match table_file(&config, path) {
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
    for ignored in &config.ignored {
        warn!(log, "{ignored}");
    }
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

/// The table file, valid and within this agent's backend policy (see
/// `refuse_loopback_backends`): what --check, the start and SIGHUP take.
fn table_file(config: &Config, path: &std::path::Path) -> Result<Table, TableError> {
    let table = Table::from_file(path)?;
    if !config.allow_loopback_backends {
        refuse_loopback_backends(&table.services)?;
    }
    Ok(table)
}

async fn serve(config: &Config, log: &Logger) -> Result<()> {
    // Validate the table before touching the kernel.
    let table = config
        .table
        .as_deref()
        .map(|path| table_file(config, path))
        .transpose()?;
    let cgroup = kernel::prepare(config.cgroup.as_deref(), &config.bpffs, log)?;
    let features = kernel::Features::detect();
    features.report(log);
    let (mut datapath, programmed) = Datapath::load(&config.bpffs, log)?;
    let tracer = Tracer::start(datapath.take_trace_maps()?, config.trace_rate, log)?;
    let connected_vip = datapath.connected_vip_map()?;
    let mut service_table = ServiceTable::new(programmed)
        .with_datapath(datapath)
        .allowing_loopback_backends(config.allow_loopback_backends);
    match &table {
        Some(table) => {
            service_table.sync(table, 0)?;
        }
        None => info!(log, "no table given: keeping the programmed one";
                      "services" => service_table.programmed().service_count()),
    }
    // Subscribed before the first read, so no address change is missed.
    let address_changes = config
        .pod_ips
        .is_empty()
        .then(addresses::subscribe)
        .transpose()?;
    addresses::program(
        &mut service_table,
        GuestAddrs::current(&config.pod_ips),
        log,
    )?;
    service_table.attach(&cgroup)?;
    service_table.set_socket_closer(Arc::new(SocketCloser::new(
        cgroup.clone(),
        config.close_tcp_of_removed_backends,
        connected_vip,
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
    let service_table = Arc::new(Mutex::new(service_table));
    if let Some(socket) = address_changes {
        tokio::spawn(addresses::follow(
            socket,
            service_table.clone(),
            log.new(slog::o!("component" => "addresses")),
        ));
    }
    let rpc = Arc::new(
        Rpc::new(service_table.clone(), config.bpf_stats, log)
            .with_kernel_features(features.names())
            .with_tracer(tracer.clone()),
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
            _ = hangup.recv() => reload(config, &service_table, log),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!(log, "stopping; the datapath stays pinned and working");
    // The server waits for every call to end, a trace stream's too.
    tracer.stop();
    server.shutdown().await.context("stopping the API server")?;
    Ok(())
}

/// SIGHUP: program the table file again; a bad file changes nothing.
fn reload(config: &Config, service_table: &Mutex<ServiceTable>, log: &Logger) {
    let Some(path) = &config.table else {
        info!(log, "SIGHUP without a table file: nothing to re-read");
        return;
    };
    let mut service_table = service_table.lock().expect("table lock");
    let result = table_file(config, path)
        .map_err(anyhow::Error::from)
        .and_then(|table| {
            // A new table under a new generation, so a host comparing
            // generations sees that the table changed under it.
            let generation = service_table.generation() + 1;
            service_table.sync(&table, generation)?;
            addresses::program(
                &mut service_table,
                GuestAddrs::current(&config.pod_ips),
                log,
            )
        });
    if let Err(err) = result {
        error!(log, "table not applied, the datapath is unchanged: {err:#}");
    }
}
