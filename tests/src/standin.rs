//! Stand-ins for what a Kata node holds, so that hundreds of sandboxes fit
//! on this machine without VMs or AF_VSOCK:
//!
//! - [`KataShim`]: Kata's per-sandbox management socket
//!   (`<sandbox dir>/shim-monitor.sock`), HTTP/1.1 on a unix socket whose
//!   `GET /agent-url` answers the agent's URL as plain text, as the Go
//!   shim's `agentURL` handler and runtime-rs do;
//! - [`StandInAgent`]: socklb.v1 (API 1.0: Health, Sync, Upsert, Delete,
//!   List) kept in memory with the real table validation and digest,
//!   behind the hybrid vsock handshake (`CONNECT <port>\n` -> `OK <n>\n`)
//!   on a unix socket, as vhost-device-vsock, Firecracker and Cloud
//!   Hypervisor offer a guest port;
//! - [`SilentAgent`]: a hybrid vsock socket that accepts and never answers;
//! - [`HybridFront`]: hybrid vsock in front of a real agent's unix socket.
//!
//! All run on the caller's tokio runtime.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt as _;
use socklb_protocols::{
    socklb::{self as api, check_response::Status},
    socklb_ttrpc,
};
use socklb_shim::node::http::{Handler, Reply, serve_connection};
use socklb_table::{Service, ServiceKey, Table};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    task::JoinHandle,
};
use ttrpc::{
    Code,
    r#async::{Server, TtrpcContext, transport::Listener},
};

/// Kata's shim management socket for one sandbox.
pub struct KataShim {
    task: JoinHandle<()>,
}

impl KataShim {
    /// Serves `socket`; `GET /agent-url` answers `agent_url`.
    pub fn start(socket: &Path, agent_url: &str) -> KataShim {
        let listener =
            UnixListener::bind(socket).unwrap_or_else(|e| panic!("bind {}: {e}", socket.display()));
        let agent_url = agent_url.to_string();
        let handler: Handler = Arc::new(move |path| match path {
            "/agent-url" => Reply::ok("text/plain; charset=utf-8", agent_url.clone()),
            other => Reply::not_found(other),
        });
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serve_connection(stream, handler.clone());
            }
        });
        KataShim { task }
    }
}

impl Drop for KataShim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The guest port a host's `CONNECT` names is checked against this.
async fn accept_hybrid(stream: &mut UnixStream, port: u32) -> io::Result<()> {
    let mut line = Vec::new();
    while line.last() != Some(&b'\n') {
        line.push(stream.read_u8().await?);
        if line.len() > 64 {
            return Err(io::Error::other("handshake line too long"));
        }
    }
    if line != format!("CONNECT {port}\n").as_bytes() {
        // What vhost-device-vsock does for a port nobody listens on.
        return Err(io::Error::other(format!(
            "no listener for {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    stream.write_all(b"OK 1073741824\n").await
}

/// What a stand-in agent holds.
#[derive(Default)]
struct AgentState {
    services: BTreeMap<ServiceKey, Service>,
    generation: u64,
    syncs: u64,
    upserts: u64,
    /// How long each Upsert takes: a slow sandbox.
    upsert_delay: Duration,
}

#[derive(Clone, Default)]
struct Rpc {
    state: Arc<Mutex<AgentState>>,
}

fn invalid(err: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INVALID_ARGUMENT, err.to_string()))
}

fn written(state: &AgentState, digest: Option<String>) -> api::WriteResponse {
    api::WriteResponse {
        generation: state.generation,
        services: state.services.len() as u32,
        digest: digest.unwrap_or_default(),
        ..Default::default()
    }
}

fn table_of(state: &AgentState) -> Table {
    Table {
        services: state.services.values().cloned().collect(),
    }
}

#[async_trait]
impl socklb_ttrpc::Health for Rpc {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _: api::CheckRequest,
    ) -> ttrpc::Result<api::CheckResponse> {
        Ok(api::CheckResponse {
            status: Status::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _: api::VersionRequest,
    ) -> ttrpc::Result<api::VersionResponse> {
        Ok(api::VersionResponse {
            agent_version: "stand-in".into(),
            api_version: "1.0".into(),
            ..Default::default()
        })
    }
}

#[async_trait]
impl socklb_ttrpc::Services for Rpc {
    async fn sync(
        &self,
        _ctx: &TtrpcContext,
        request: api::SyncRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        let table = Table::from_api(&request.services).map_err(invalid)?;
        let mut state = self.state.lock().unwrap();
        state.services = table.services.into_iter().map(|s| (s.key, s)).collect();
        state.generation = request.generation;
        state.syncs += 1;
        let digest = table_of(&state).digest();
        Ok(written(&state, Some(digest)))
    }

    async fn upsert(
        &self,
        _ctx: &TtrpcContext,
        request: api::UpsertRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        let services = request
            .services
            .iter()
            .enumerate()
            .map(|(index, service)| Service::from_api(index, service))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let delay = self.state.lock().unwrap().upsert_delay;
        tokio::time::sleep(delay).await;
        let mut state = self.state.lock().unwrap();
        for service in services {
            state.services.insert(service.key, service);
        }
        state.generation += 1;
        state.upserts += 1;
        Ok(written(&state, None))
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        request: api::DeleteRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        let keys = request
            .keys
            .iter()
            .enumerate()
            .map(|(index, key)| ServiceKey::from_api(&format!("keys[{index}]"), key))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let mut state = self.state.lock().unwrap();
        for key in keys {
            state.services.remove(&key);
        }
        state.generation += 1;
        Ok(written(&state, None))
    }

    async fn list(
        &self,
        _ctx: &TtrpcContext,
        _: api::ListRequest,
    ) -> ttrpc::Result<api::ListResponse> {
        let state = self.state.lock().unwrap();
        let table = table_of(&state);
        Ok(api::ListResponse {
            generation: state.generation,
            digest: table.digest(),
            services: table.to_api(),
            ..Default::default()
        })
    }
}

/// An in-memory socklb agent behind hybrid vsock on a unix socket.
pub struct StandInAgent {
    uds: PathBuf,
    rpc: Rpc,
    server: Server,
}

impl StandInAgent {
    /// Listens on `uds` for `CONNECT <port>`; starts with an empty table.
    pub async fn start(uds: &Path, port: u32) -> StandInAgent {
        let _ = std::fs::remove_file(uds);
        let listener =
            UnixListener::bind(uds).unwrap_or_else(|e| panic!("bind {}: {e}", uds.display()));
        let accepts = futures::stream::unfold(listener, move |listener| async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let handshake = accept_hybrid(&mut stream, port);
                // A connection that fails the handshake is dropped, as the
                // muxer drops it.
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), handshake).await {
                    return Some((Ok::<_, io::Error>(stream), listener));
                }
            }
        })
        .boxed();
        let rpc = Rpc::default();
        let mut services = socklb_ttrpc::create_health(Arc::new(rpc.clone()));
        services.extend(socklb_ttrpc::create_services(Arc::new(rpc.clone())));
        let mut server = Server::new()
            .add_listener(Listener::new(accepts))
            .register_service(services);
        server.start().await.expect("start the stand-in agent");
        StandInAgent {
            uds: uds.into(),
            rpc,
            server,
        }
    }

    /// The table it holds.
    pub fn table(&self) -> Table {
        table_of(&self.rpc.state.lock().unwrap())
    }

    /// Empties its table behind the host's back, as another writer would.
    pub fn tamper(&self) {
        self.rpc.state.lock().unwrap().services.clear();
    }

    /// Makes every Upsert take `delay` from now on.
    pub fn slow_down(&self, delay: Duration) {
        self.rpc.state.lock().unwrap().upsert_delay = delay;
    }

    /// Upserts it applied.
    pub fn upserts(&self) -> u64 {
        self.rpc.state.lock().unwrap().upserts
    }

    /// Whole-table Syncs it received.
    pub fn syncs(&self) -> u64 {
        self.rpc.state.lock().unwrap().syncs
    }

    /// Stops listening and drops every connection, as a sandbox that dies;
    /// the socket path stays free for a new one.
    pub async fn stop(mut self) {
        let _ = self.server.shutdown().await;
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// A hybrid vsock socket that accepts connections and never answers: a
/// sandbox whose agent hangs.
pub struct SilentAgent {
    task: JoinHandle<()>,
}

impl SilentAgent {
    pub fn start(uds: &Path) -> SilentAgent {
        let listener =
            UnixListener::bind(uds).unwrap_or_else(|e| panic!("bind {}: {e}", uds.display()));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        SilentAgent { task }
    }
}

impl Drop for SilentAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hybrid vsock in front of an agent listening on a unix socket: accepts
/// `CONNECT <port>` on `uds` and joins the connection to `agent`, so a real
/// agent in a test sandbox is reached the way a sandbox VM's is.
pub struct HybridFront {
    task: JoinHandle<()>,
}

impl HybridFront {
    pub fn start(uds: &Path, port: u32, agent: &Path) -> HybridFront {
        let listener =
            UnixListener::bind(uds).unwrap_or_else(|e| panic!("bind {}: {e}", uds.display()));
        let agent = agent.to_path_buf();
        let task = tokio::spawn(async move {
            while let Ok((mut host, _)) = listener.accept().await {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if accept_hybrid(&mut host, port).await.is_err() {
                        return;
                    }
                    if let Ok(mut guest) = UnixStream::connect(&agent).await {
                        let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
                    }
                });
            }
        });
        HybridFront { task }
    }
}

impl Drop for HybridFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
