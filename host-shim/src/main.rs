use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use slog::{Drain as _, Logger, o};
use socklb_protocols::socklb as api;
use socklb_shim::{
    AgentAddr, AgentClient, Options,
    sources::{file::watch_file, kube_watch, kubernetes::Policy},
};
use socklb_table::Table;

/// socklb-shim: push Kubernetes service tables into a socklb sandbox.
#[derive(Parser, Debug)]
#[command(name = "socklb-shim", version)]
struct Args {
    /// The agent: vsock://CID:PORT, hvsock:///path/to/uds:PORT or unix:///path
    #[arg(long, env = "SOCKLB_AGENT")]
    agent: AgentAddr,
    /// Seconds to wait for one call (and to keep trying to connect)
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
    /// Keep the agent's table equal to what kube-proxy would program for the
    /// cluster's Services and EndpointSlices, until stopped
    Kube {
        /// kubeconfig to use [default: in-cluster, then ~/.kube/config]
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name, for internalTrafficPolicy Local
        #[arg(long)]
        node: Option<String>,
        /// Also serve externalIPs and LoadBalancer ingress IPs as VIPs
        #[arg(long)]
        external_vips: bool,
        /// Milliseconds between batches of changes sent to the agent
        #[arg(long, default_value_t = 100)]
        batch_ms: u64,
    },
    /// Apply FILE on every change until stopped; re-apply after an agent restart
    Watch {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Milliseconds between checks of the file and the agent
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
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
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("socklb-shim: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn logger() -> Logger {
    let json = slog_json::Json::new(std::io::stderr())
        .add_default_keys()
        .build()
        .fuse();
    let drain = slog_async::Async::new(json).build().fuse();
    Logger::root(drain, o!("name" => "socklb-shim"))
}

async fn run(args: Args) -> Result<()> {
    let log = logger();
    let options = Options {
        call_timeout: Duration::from_secs(args.timeout),
        connect_timeout: Duration::from_secs(args.timeout),
        ..Options::default()
    };
    let mut client = AgentClient::new(args.agent, options, &log);
    match args.command {
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
            let (generation, table, digest) = client.list().await?;
            match output {
                Output::Json => {
                    let mut value = serde_json::to_value(table.to_file())?;
                    value["generation"] = json!(generation);
                    value["digest"] = json!(digest);
                    println!("{}", serde_json::to_string_pretty(&value)?);
                }
                Output::Table => print_services(&table),
            }
        }
        Command::Stats { output } => {
            let stats = client.stats().await?;
            match output {
                Output::Json => println!("{}", protobuf_json_mapping::print_to_string(&stats)?),
                Output::Table => print_stats(&stats),
            }
        }
        Command::Health { output } => {
            let status = client.check().await?;
            let version = client.version().await?;
            match output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "status": format!("{status:?}"),
                        "agent_version": version.agent_version,
                        "api_version": version.api_version,
                        "kernel_release": version.kernel_release,
                        "hooks_attached": version.hooks_attached,
                        "features": version.features,
                    })
                ),
                Output::Table => {
                    println!("status          {status:?}");
                    println!("agent version   {}", version.agent_version);
                    println!("API version     {}", version.api_version);
                    println!("guest kernel    {}", version.kernel_release);
                    println!(
                        "hooks attached  {} ({})",
                        version.hooks_attached.len(),
                        version.hooks_attached.join(" ")
                    );
                    println!("features        {}", version.features.join(" "));
                }
            }
        }
        Command::Metrics => print!("{}", client.metrics().await?),
        Command::Kube {
            kubeconfig,
            node,
            external_vips,
            batch_ms,
        } => {
            let config = match kubeconfig {
                Some(path) => {
                    let kubeconfig = kube::config::Kubeconfig::read_from(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
                }
                None => kube::Config::infer().await?,
            };
            let kube = kube::Client::try_from(config).context("building the Kubernetes client")?;
            let policy = Policy {
                node,
                external_vips,
            };
            tokio::select! {
                () = kube_watch::run(kube, &mut client, policy, Duration::from_millis(batch_ms), &log) => {}
                signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C")?,
            }
        }
        Command::Watch { file, interval_ms } => {
            tokio::select! {
                () = watch_file(&mut client, &file, Duration::from_millis(interval_ms), &log) => {}
                signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C")?,
            }
        }
    }
    Ok(())
}

fn print_services(table: &Table) {
    let rows: Vec<[String; 4]> = table
        .services
        .iter()
        .map(|s| {
            [
                s.name.clone().unwrap_or_else(|| "-".into()),
                s.key.to_string(),
                s.affinity_timeout_secs
                    .map_or("-".into(), |t| format!("ClientIP {t}s")),
                if s.backends.is_empty() {
                    "(none: refused)".into()
                } else {
                    s.backends
                        .iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ]
        })
        .collect();
    print_rows(["NAME", "SERVICE", "AFFINITY", "BACKENDS"], &rows);
}

fn print_stats(stats: &api::StatsResponse) {
    let rows: Vec<[String; 3]> = stats
        .services
        .iter()
        .map(|s| {
            let key = socklb_table::ServiceKey::from_api("stats", &s.key)
                .map_or_else(|_| s.key.vip.clone(), |k| k.to_string());
            [key, s.translations.to_string(), s.rejects.to_string()]
        })
        .collect();
    print_rows(["SERVICE", "TRANSLATIONS", "REJECTS"], &rows);
    println!();
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
    print_rows(["HOOK", "RUNS", "NS/RUN"], &rows);
    if !stats.run_time_stats_enabled {
        println!("(hook runs are counted only while the agent runs with --bpf-stats)");
    }
    println!();
    let rows: Vec<[String; 3]> = stats
        .maps
        .iter()
        .map(|m| [m.map.clone(), m.entries.to_string(), m.capacity.to_string()])
        .collect();
    print_rows(["MAP", "ENTRIES", "CAPACITY"], &rows);
}

fn print_rows<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
