//! `socklb-shim node`: one daemon per Kubernetes node (as kube-proxy is)
//! serving every Kata sandbox on it. It finds sandboxes ([`discovery`]),
//! watches the API once and keeps one table ([`fanout::Hub`], fed by
//! [`crate::sources::kubernetes::kube_watch`]), keeps each sandbox's agent
//! at that table in a task of its own ([`fanout::serve_sandbox`]), and
//! tells people how each sandbox is doing ([`status`] on a unix socket,
//! [`metrics`] over HTTP).

pub mod discovery;
pub mod fanout;
pub mod health;
pub mod http;
pub mod metrics;
pub mod status;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use slog::{Logger, info, warn};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::{Semaphore, watch},
    task::JoinHandle,
};

use crate::{
    backoff::Backoff,
    client::{AgentAddr, AgentClient, Options},
    node::{
        discovery::{AgentUrl, Found},
        fanout::{Hub, HubSink, Shared},
        health::WatchHealth,
        http::{Handler, Limits, Reply},
        metrics::{Metrics, Snapshot},
        status::{Registry, State},
    },
    sources::kubernetes::{Policy, kube_watch},
};

/// How long Kata's shim gets to answer `/agent-url`.
const AGENT_URL_TIMEOUT: Duration = Duration::from_secs(5);
const RESOLVE_RETRY_INITIAL: Duration = Duration::from_millis(200);
const RESOLVE_RETRY_MAX: Duration = Duration::from_secs(10);

pub struct NodeConfig {
    /// This node's name (topology, internalTrafficPolicy Local).
    pub node: String,
    pub sandbox_roots: Vec<PathBuf>,
    /// Where the sandboxes' OCI bundles are (pod namespace and name).
    pub bundle_roots: Vec<PathBuf>,
    /// socklb-agent's guest vsock port.
    pub agent_port: u32,
    pub status_socket: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    pub batch: Duration,
    pub rescan: Duration,
    pub external_vips: bool,
    /// Per agent call, and for one whole table under a permit. A connect
    /// is tried once per attempt: the fan-out retries with its backoff.
    pub call_timeout: Duration,
    /// Whole tables being sent at once, at most.
    pub parallel_syncs: usize,
    /// How often each idle agent's table digest is checked against the
    /// node's (None: never).
    pub verify_every: Option<Duration>,
    /// How often each idle agent's decision counts are read for the
    /// per-sandbox metrics (None: never).
    pub decisions_every: Option<Duration>,
    /// How long the Kubernetes watch may keep failing before `/healthz`
    /// answers 503.
    pub watch_stale: Duration,
}

/// Whole tables sent at once by default. Each costs the daemon about
/// 0.4 MiB while it is sent (the encoded table is shared), and an agent
/// on kernel maps about 0.5 s at 10,000 x 8 on its own vCPUs: at 24, a
/// daemon starting over 200 empty sandboxes needs about 200 / 24 x 0.51 s
/// = 4.3 s, at a peak RSS of 63 MiB in `socklb-bench node`.
pub const DEFAULT_PARALLEL_SYNCS: usize = 24;

/// Runs the daemon until the watch ends (it does not, short of the
/// process ending).
pub async fn run(config: NodeConfig, kube: kube::Client, log: &Logger) -> Result<()> {
    let shared = Shared {
        hub: Hub::new(),
        registry: Arc::new(Registry::default()),
        metrics: Arc::new(Metrics::default()),
        whole_syncs: Arc::new(Semaphore::new(config.parallel_syncs.max(1))),
        permit_hold: config.call_timeout,
        verify_every: config.verify_every,
        decisions_every: config.decisions_every,
    };
    let watch = Arc::new(WatchHealth::default());
    serve_status(&config, &shared, log)?;
    if let Some(addr) = config.metrics_addr {
        serve_metrics(addr, &shared, &watch, config.watch_stale, log).await?;
    }
    let (found_tx, found) = watch::channel(BTreeMap::new());
    tokio::spawn(discovery::follow(
        config.sandbox_roots.clone(),
        config.rescan,
        found_tx,
        log.new(slog::o!("part" => "discovery")),
    ));
    tokio::spawn(follow_sandboxes(
        found,
        SandboxSettings {
            bundle_roots: config.bundle_roots.clone(),
            agent_port: config.agent_port,
            options: Options {
                call_timeout: config.call_timeout,
                connect_timeout: Duration::ZERO,
                ..Options::default()
            },
        },
        shared.clone(),
        log.clone(),
    ));
    info!(log, "node daemon started"; "node" => &config.node,
          "sandbox_roots" => format!("{:?}", config.sandbox_roots),
          "status_socket" => config.status_socket.display().to_string());
    let policy = Policy {
        node: Some(config.node),
        external_vips: config.external_vips,
        // The watch reads it from the Node.
        zone: None,
    };
    let mut sink = HubSink {
        hub: shared.hub.clone(),
        metrics: shared.metrics.clone(),
        watch,
    };
    kube_watch::run(kube, &mut sink, policy, config.batch, log).await;
    Ok(())
}

/// What every sandbox task needs to reach its agent.
struct SandboxSettings {
    bundle_roots: Vec<PathBuf>,
    agent_port: u32,
    options: Options,
}

/// Starts a task for each sandbox that appears; ends the task of each one
/// that goes.
async fn follow_sandboxes(
    mut found: watch::Receiver<BTreeMap<String, Found>>,
    settings: SandboxSettings,
    shared: Shared,
    log: Logger,
) {
    let settings = Arc::new(settings);
    let mut tasks: BTreeMap<String, (Found, AbortOnDrop)> = BTreeMap::new();
    loop {
        let now = found.borrow_and_update().clone();
        tasks.retain(|id, (known, _)| {
            let keep = now.get(id) == Some(known);
            if !keep {
                info!(log, "sandbox gone"; "sandbox" => id);
                shared.registry.remove(id);
            }
            keep
        });
        for (id, sandbox) in now {
            if tasks.contains_key(&id) {
                continue;
            }
            let pod = discovery::pod_of(&id, &settings.bundle_roots);
            info!(log, "sandbox found"; "sandbox" => &id, "pod" => pod.as_deref().unwrap_or("unknown"),
                  "socket" => sandbox.socket.display().to_string());
            shared.registry.add(&id, pod);
            let task = tokio::spawn(follow_sandbox(
                sandbox.clone(),
                settings.clone(),
                shared.clone(),
                log.new(slog::o!("sandbox" => id.clone())),
            ));
            tasks.insert(id, (sandbox, AbortOnDrop(task)));
        }
        if found.changed().await.is_err() {
            return;
        }
    }
}

/// Ends a sandbox's task when its entry goes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks Kata's shim where the agent is, then keeps the agent at the
/// node's table; asks again whenever the agent keeps failing, since a
/// sandbox's VM started again may have another CID or socket.
async fn follow_sandbox(
    sandbox: Found,
    settings: Arc<SandboxSettings>,
    shared: Shared,
    log: Logger,
) {
    // Kept across the questions to Kata's shim: an agent that keeps
    // failing at the same address stays parked.
    let mut retry = Backoff::new(fanout::RETRY_INITIAL, fanout::RETRY_MAX);
    let mut agent: Option<AgentClient> = None;
    loop {
        let Some(addr) = resolve(&sandbox, &settings, &shared, &log).await else {
            return;
        };
        if agent.as_ref().is_none_or(|known| *known.addr() != addr) {
            info!(log, "agent address"; "agent" => addr.to_string());
            shared.registry.set_agent(&sandbox.id, addr.to_string());
            retry.reset();
            agent = Some(AgentClient::new(addr, settings.options.clone(), &log));
        }
        let client = agent.as_mut().expect("an agent client");
        fanout::serve_sandbox(&sandbox.id, client, &mut retry, &shared, &log).await;
    }
}

/// The agent's address from Kata's shim (retrying a shim that does not
/// answer yet, logging each new problem once); None for a sandbox whose
/// agent is not on this node.
async fn resolve(
    sandbox: &Found,
    settings: &SandboxSettings,
    shared: &Shared,
    log: &Logger,
) -> Option<AgentAddr> {
    let mut retry = Backoff::new(RESOLVE_RETRY_INITIAL, RESOLVE_RETRY_MAX);
    let mut last_problem = String::new();
    loop {
        let problem = match http::get_unix(&sandbox.socket, "/agent-url", AGENT_URL_TIMEOUT).await {
            Ok(answer) => match discovery::agent_url(&answer, settings.agent_port) {
                Ok(AgentUrl::Local(addr)) => return Some(addr),
                Ok(AgentUrl::Remote(url)) => {
                    info!(log, "remote (peer-pods) sandbox: its agent is not on this node; skipped";
                              "agent_url" => &url);
                    shared.registry.note(
                        &sandbox.id,
                        State::Skipped,
                        &format!("remote agent {url}"),
                    );
                    return None;
                }
                Err(err) => err.to_string(),
            },
            Err(err) => format!("{err:#}"),
        };
        if problem != last_problem {
            warn!(log, "cannot learn the agent's address from Kata's shim; retrying"; "error" => &problem);
            shared
                .registry
                .note(&sandbox.id, State::Resolving, &problem);
            last_problem = problem;
        }
        tokio::time::sleep(retry.failed()).await;
    }
}

/// `GET /status` on the status socket: the report as JSON.
fn serve_status(config: &NodeConfig, shared: &Shared, log: &Logger) -> Result<()> {
    let path = &config.status_socket;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    remove_stale_socket(path)?;
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    let node = config.node.clone();
    let state = shared.clone();
    let handler: Handler = Arc::new(move |path| match path {
        "/status" => {
            let mut report =
                state
                    .registry
                    .report(&node, state.hub.version(), state.hub.service_count());
            report.services_left_out = state
                .metrics
                .left_out()
                .iter()
                .map(ToString::to_string)
                .collect();
            Reply::ok(
                "application/json",
                serde_json::to_string(&report).expect("a report serializes"),
            )
        }
        other => Reply::not_found(other),
    });
    let log = log.new(slog::o!("server" => "status"));
    tokio::spawn(http::serve(listener, handler, Limits::SERVER, log));
    Ok(())
}

/// A socket file left by an earlier daemon would make bind fail; anything
/// else at that path is not ours to remove.
fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing the old socket {}", path.display())),
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}

/// `/metrics` (Prometheus), `/healthz` (503 with the reason while the
/// daemon has no table or its watch has failed for longer than
/// `watch_stale`: a readiness probe) and `/livez` (ok while the daemon
/// serves: a liveness probe; agents keep their tables through an API
/// server outage, and a restarted daemon would have none to give a new
/// sandbox) over HTTP.
async fn serve_metrics(
    addr: SocketAddr,
    shared: &Shared,
    watch: &Arc<WatchHealth>,
    watch_stale: Duration,
    log: &Logger,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for metrics"))?;
    info!(log, "serving metrics"; "addr" => listener.local_addr()?.to_string());
    let state = shared.clone();
    let watch = watch.clone();
    let handler: Handler = Arc::new(move |path| match path {
        "/metrics" => {
            let sandboxes = state.registry.counts();
            let decisions = state.registry.decisions();
            let text = state.metrics.render(&Snapshot {
                sandboxes: &sandboxes,
                version: state.hub.version(),
                services: state.hub.service_count(),
                decisions: &decisions,
            });
            Reply::ok("text/plain; version=0.0.4", text)
        }
        "/healthz" => {
            let failing = watch.failing_for(std::time::Instant::now());
            match health::problem(state.hub.version(), failing, watch_stale) {
                None => Reply::ok("text/plain", "ok\n".into()),
                Some(problem) => Reply::unavailable(format!("{problem}\n")),
            }
        }
        "/livez" => Reply::ok("text/plain", "ok\n".into()),
        other => Reply::not_found(other),
    });
    let log = log.new(slog::o!("server" => "metrics"));
    tokio::spawn(http::serve(listener, handler, Limits::SERVER, log));
    Ok(())
}
