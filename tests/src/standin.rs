//! Stand-ins for what a Kata node holds, so that hundreds of sandboxes fit
//! on this machine without VMs or AF_VSOCK:
//!
//! - [`KataShim`]: Kata's per-sandbox management socket
//!   (`<sandbox dir>/shim-monitor.sock`), HTTP/1.1 on a unix socket whose
//!   `GET /agent-url` answers the agent's URL as plain text, as the Go
//!   shim's `agentURL` handler and runtime-rs do;
//! - [`StandInAgent`]: the agent's own API and table code over maps kept
//!   in memory (the only layer faked, as aya fakes only its syscalls),
//!   behind the hybrid vsock handshake (`CONNECT <port>\n` -> `OK <n>\n`)
//!   on a unix socket, as vhost-device-vsock, Firecracker and Cloud
//!   Hypervisor offer a guest port; it counts the requests of each method
//!   as its ttrpc server hands them to the agent's handlers;
//! - [`SilentAgent`]: a hybrid vsock socket that accepts and never answers;
//! - [`HybridFront`]: hybrid vsock in front of a real agent's unix socket.
//!
//! All run on the caller's tokio runtime.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt as _, stream::BoxStream};
use slog::{Drain, KV as _, Key, Logger, OwnedKVList, Record, Serializer};
use socklb_agent::{
    datapath::{ProgrammedTable, TableMaps, WriteFaults},
    rpc::Rpc,
    service_table::ServiceTable,
};
use socklb_shim::node::http::{self, Handler, Limits, Reply};
use socklb_table::Table;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    task::JoinHandle,
};
use ttrpc::r#async::{MethodHandler, Server, Service, TtrpcContext, transport::Listener};

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
        let log = Logger::root(slog::Discard, slog::o!());
        let task = tokio::spawn(http::serve(listener, handler, Limits::SERVER, log));
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

/// The guest's end of hybrid vsock on `listener`: each connection that asks
/// for `port` and is answered `OK`, as a muxer hands it to the guest port.
/// A connection that fails the handshake, or takes over 2 s, is dropped,
/// as the muxer drops it.
fn hybrid_accepts(listener: UnixListener, port: u32) -> BoxStream<'static, UnixStream> {
    futures::stream::unfold(listener, move |listener| async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let handshake = accept_hybrid(&mut stream, port);
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), handshake).await {
                return Some((stream, listener));
            }
        }
    })
    .boxed()
}

/// Counts the agent's "table written" log records by request kind: how
/// many Syncs and Upserts a sandbox received, as its log tells an operator;
/// and when the last one was written.
#[derive(Clone, Default)]
struct WritesLogged(Arc<Mutex<Writes>>);

#[derive(Default)]
struct Writes {
    counts: BTreeMap<String, u64>,
    last: Option<Instant>,
}

impl WritesLogged {
    fn count(&self, requests: &[&str]) -> u64 {
        let writes = self.0.lock().unwrap();
        requests.iter().filter_map(|r| writes.counts.get(*r)).sum()
    }
}

impl Drain for WritesLogged {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, _: &OwnedKVList) -> Result<(), slog::Never> {
        if record.msg().as_str() == Some("table written") {
            let mut request = RequestKey(None);
            let _ = record.kv().serialize(record, &mut request);
            if let Some(request) = request.0 {
                let mut writes = self.0.lock().unwrap();
                *writes.counts.entry(request).or_default() += 1;
                writes.last = Some(Instant::now());
            }
        }
        Ok(())
    }
}

/// Picks the `request` value out of a log record.
struct RequestKey(Option<String>);

impl Serializer for RequestKey {
    fn emit_arguments(&mut self, key: Key, value: &std::fmt::Arguments) -> slog::Result {
        if key == "request" {
            self.0 = Some(value.to_string());
        }
        Ok(())
    }
}

/// The requests of each method (`Digest`, `List`, `Sync`, ...) a server
/// was handed, and when the first one came.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<BTreeMap<String, (u64, Instant)>>>);

impl Calls {
    /// `services` with each method's handler behind one that counts its
    /// requests: what the agent answers is its own handlers' answer.
    fn count(&self, services: HashMap<String, Service>) -> HashMap<String, Service> {
        services
            .into_iter()
            .map(|(name, service)| {
                let methods = service
                    .methods
                    .into_iter()
                    .map(|(method, handler)| {
                        let counted = Counted {
                            method: method.clone(),
                            calls: self.clone(),
                            inner: handler,
                        };
                        let counted: Box<dyn MethodHandler + Send + Sync> = Box::new(counted);
                        (method, counted)
                    })
                    .collect();
                let streams = service.streams;
                (name, Service { methods, streams })
            })
            .collect()
    }

    fn called(&self, method: &str) {
        let mut calls = self.0.lock().unwrap();
        calls
            .entry(method.to_string())
            .or_insert_with(|| (0, Instant::now()))
            .0 += 1;
    }
}

/// One method's handler, counted.
struct Counted {
    method: String,
    calls: Calls,
    inner: Box<dyn MethodHandler + Send + Sync>,
}

#[async_trait::async_trait]
impl MethodHandler for Counted {
    async fn handler(
        &self,
        ctx: TtrpcContext,
        request: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        self.calls.called(&self.method);
        self.inner.handler(ctx, request).await
    }
}

/// The real agent API (`socklb_agent::rpc::Rpc` over its `ServiceTable`)
/// with the table kept in memory instead of eBPF maps, behind hybrid vsock
/// on a unix socket.
pub struct StandInAgent {
    uds: PathBuf,
    table: Arc<Mutex<ServiceTable>>,
    write_faults: WriteFaults,
    writes: WritesLogged,
    calls: Calls,
    server: Server,
}

impl StandInAgent {
    /// Listens on `uds` for `CONNECT <port>`; starts with an empty table.
    pub async fn start(uds: &Path, port: u32) -> StandInAgent {
        let _ = std::fs::remove_file(uds);
        let listener =
            UnixListener::bind(uds).unwrap_or_else(|e| panic!("bind {}: {e}", uds.display()));
        let accepts = hybrid_accepts(listener, port).map(Ok::<_, io::Error>);
        let writes = WritesLogged::default();
        let log = Logger::root(writes.clone().fuse(), slog::o!());
        let write_faults = WriteFaults::default();
        let programmed = ProgrammedTable::adopt(TableMaps::in_memory(write_faults.clone()), &log)
            .expect("empty maps in memory");
        let table = Arc::new(Mutex::new(ServiceTable::new(programmed)));
        let rpc = Arc::new(Rpc::new(table.clone(), false, &log));
        let calls = Calls::default();
        let mut server = Server::new()
            .add_listener(Listener::new(accepts))
            .register_service(calls.count(rpc.services()));
        server.start().await.expect("start the stand-in agent");
        StandInAgent {
            uds: uds.into(),
            table,
            write_faults,
            writes,
            calls,
            server,
        }
    }

    /// The table it holds.
    pub fn table(&self) -> Table {
        self.table.lock().unwrap().list().expect("list in memory").1
    }

    /// Empties its table behind the host's back, as another writer would.
    pub fn tamper(&self) {
        let mut table = self.table.lock().unwrap();
        let generation = table.generation();
        table
            .sync(&Table::default(), generation)
            .expect("empty the table in memory");
    }

    /// Writes its own table again behind the host's back: the same table
    /// at a new generation, as a foreign or late write leaves it.
    pub fn rewrite(&self) {
        let mut table = self.table.lock().unwrap();
        let (generation, same) = (table.generation(), table.list().expect("list in memory").1);
        table
            .sync(&same, generation + 1)
            .expect("write the same table in memory");
    }

    /// Makes each map write (a service's entry, slot or member) take
    /// `delay` from now on: a slow sandbox.
    pub fn slow_down(&self, delay: Duration) {
        self.write_faults.slow_down(delay);
    }

    /// Upserts it applied.
    pub fn upserts(&self) -> u64 {
        self.writes.count(&["upsert"])
    }

    /// Whole-table Syncs it applied (in one message or in parts).
    pub fn syncs(&self) -> u64 {
        self.writes.count(&["sync", "sync in parts"])
    }

    /// Whole-table Syncs it applied that arrived in parts.
    pub fn syncs_in_parts(&self) -> u64 {
        self.writes.count(&["sync in parts"])
    }

    /// Requests for `method` (as the API names it: `Digest`, `List`,
    /// `Sync`, `SyncBegin`, `Upsert`, `Check`, ...) it was handed, answered
    /// or refused.
    pub fn calls(&self, method: &str) -> u64 {
        self.calls.0.lock().unwrap().get(method).map_or(0, |c| c.0)
    }

    /// When it was handed its first request for `method`.
    pub fn first_call(&self, method: &str) -> Option<Instant> {
        self.calls.0.lock().unwrap().get(method).map(|c| c.1)
    }

    /// Writes of any kind it applied, and when it applied the last one.
    pub fn writes(&self) -> (u64, Option<Instant>) {
        let writes = self.writes.0.lock().unwrap();
        (writes.counts.values().sum(), writes.last)
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
            let mut hosts = hybrid_accepts(listener, port);
            while let Some(mut host) = hosts.next().await {
                let agent = agent.clone();
                tokio::spawn(async move {
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
