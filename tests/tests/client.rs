//! The shim's agent client against agents that misbehave: one that lies
//! about what it holds (a wrong digest) and a real one stopped with SIGSTOP
//! (calls time out, the client reconnects with backoff) and then restarted
//! empty (the reconnect gives it the whole table back). Needs root for the
//! real agent.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use socklb_protocols::{
    DEFAULT_AGENT_PORT, PART_BYTES, TTRPC_MESSAGE_LIMIT, protobuf, socklb as api, socklb_ttrpc,
};
use socklb_shim::{AgentClient, ClientError, Options};
use socklb_table::{Protocol, Service, ServiceKey, Table, VipKind};
use socklb_tests::{Sandbox, agent_client, backend_ip, runtime, standin::StandInAgent};
use ttrpc::r#async::{Server, TtrpcContext};

fn web(backend: u8) -> Table {
    Table::new(vec![Service {
        name: None,
        key: ServiceKey {
            vip: "10.96.0.20".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        vip_kind: VipKind::Cluster,
        affinity_timeout_secs: None,
        backends: vec![format!("{}:8080", backend_ip(backend)).parse().unwrap()],
    }])
    .unwrap()
}

/// [`web`] and a service `api` the test never changes.
fn web_and_api(backend: u8) -> Table {
    let mut api = web(1).services.remove(0);
    api.key.vip = "10.96.0.21".parse().unwrap();
    let mut services = web(backend).services;
    services.push(api);
    Table::new(services).unwrap()
}

/// A table's services as text, in key order.
fn lines(table: &Table) -> BTreeSet<String> {
    table.services.iter().map(ToString::to_string).collect()
}

/// An agent that takes every write and reports a digest of nothing, and
/// lists a table whose digest does not match its services.
#[derive(Clone, Default)]
struct LyingAgent {
    writes: Arc<AtomicU64>,
}

const WRONG_DIGEST: &str = "0000000000000000";

#[async_trait]
impl socklb_ttrpc::Health for LyingAgent {
    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _: api::VersionRequest,
    ) -> ttrpc::Result<api::VersionResponse> {
        Ok(api::VersionResponse {
            agent_version: "liar".into(),
            api_version: "1.1".into(),
            ..Default::default()
        })
    }
}

#[async_trait]
impl socklb_ttrpc::Services for LyingAgent {
    async fn sync(
        &self,
        _ctx: &TtrpcContext,
        request: api::SyncRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(api::WriteResponse {
            generation: request.generation,
            services: request.services.len() as u32,
            digest: WRONG_DIGEST.into(),
            ..Default::default()
        })
    }

    async fn list(
        &self,
        _ctx: &TtrpcContext,
        _: api::ListRequest,
    ) -> ttrpc::Result<api::ListResponse> {
        Ok(api::ListResponse {
            generation: 1,
            services: web(1).to_api(),
            digest: WRONG_DIGEST.into(),
            ..Default::default()
        })
    }
}

/// A server for `agent`'s Health and Services on the unix socket `socket`.
fn serve_agent<A>(socket: &Path, agent: &A) -> Server
where
    A: socklb_ttrpc::Health + socklb_ttrpc::Services + Clone + Send + Sync + 'static,
{
    let mut services = socklb_ttrpc::create_health(Arc::new(agent.clone()));
    services.extend(socklb_ttrpc::create_services(Arc::new(agent.clone())));
    Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .expect("bind the agent")
        .register_service(services)
}

#[test]
fn a_lying_agent_is_caught_by_the_digest_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("liar.sock");
    let runtime = runtime();
    let agent = LyingAgent::default();
    let _in_runtime = runtime.enter();
    let mut server = serve_agent(&socket, &agent);
    runtime
        .block_on(server.start())
        .expect("start the lying agent");
    let mut client = agent_client(&format!("unix://{}", socket.display()), Options::default());

    let synced = runtime.block_on(client.sync(web(1)));
    assert!(
        matches!(synced, Err(ClientError::DigestMismatch { ref got, .. }) if got == WRONG_DIGEST),
        "a Sync acknowledged with a wrong digest must fail: {synced:?}"
    );
    assert_eq!(agent.writes.load(Ordering::Relaxed), 1, "the Sync was sent");
    let listed = runtime.block_on(client.list());
    assert!(
        matches!(listed, Err(ClientError::DigestMismatch { .. })),
        "a listing that does not add up to its digest must fail: {listed:?}"
    );
    runtime
        .block_on(server.shutdown())
        .expect("stop the lying agent");
}

#[test]
fn a_stopped_agent_times_out_and_gets_the_table_back_once_it_runs() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    let mut agent = sandbox.start_agent(None);
    let runtime = runtime();
    let options = Options {
        call_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_secs(1),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        fail_fast: false,
    };
    let mut client = agent_client(&sandbox.api_addr(), options);
    runtime
        .block_on(client.sync(web_and_api(1)))
        .expect("first sync");

    // A stopped agent still accepts connections (the kernel queues them)
    // but answers nothing: every call must end in Unreachable, not hang.
    // The outer bound only turns a hang into a failure.
    kill(agent.pid(), Signal::SIGSTOP).expect("SIGSTOP");
    let bounded = Duration::from_secs(60);
    let checked = runtime.block_on(async { tokio::time::timeout(bounded, client.check()).await });
    kill(agent.pid(), Signal::SIGCONT).expect("SIGCONT");
    assert!(
        matches!(checked, Ok(Err(ClientError::Unreachable { .. }))),
        "a call to a stopped agent: {checked:?}"
    );

    // Running again: the next call reconnects.
    let opened = client.connections_opened();
    runtime
        .block_on(client.upsert(web(2).services))
        .expect("upsert after SIGCONT");
    assert!(client.connections_opened() > opened, "no reconnect");

    // Restarted with an empty datapath: the reconnect syncs the whole table
    // the client holds before its next write, so the agent holds `api` too,
    // which that write does not carry.
    agent.signal(Signal::SIGKILL);
    assert!(sandbox.agent_once(&["--detach"]).status.success());
    let _restarted = sandbox.start_agent(None);
    runtime
        .block_on(client.upsert(web(3).services))
        .expect("upsert after the restart");
    let (_, table, _) = runtime.block_on(client.list()).expect("list");
    assert_eq!(lines(&table), lines(&web_and_api(3)));
}

/// An agent of a given API version that counts how its table was read
/// and the writes it took (each as it was sent), and the services on an
/// external VIP among them.
#[derive(Clone)]
struct CountingAgent {
    api_version: &'static str,
    lists: Arc<AtomicU64>,
    digests: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    external_services: Arc<AtomicU64>,
}

impl CountingAgent {
    /// An agent of `api_version` serving on a socket in `dir`, and a
    /// client of it.
    fn start(
        api_version: &'static str,
        dir: &tempfile::TempDir,
        runtime: &tokio::runtime::Runtime,
    ) -> (CountingAgent, Server, AgentClient) {
        let agent = CountingAgent {
            api_version,
            lists: Arc::default(),
            digests: Arc::default(),
            writes: Arc::default(),
            external_services: Arc::default(),
        };
        let socket = dir.path().join(format!("agent-{api_version}.sock"));
        let mut server = serve_agent(&socket, &agent);
        runtime.block_on(server.start()).expect("start the agent");
        let client = agent_client(&format!("unix://{}", socket.display()), Options::default());
        (agent, server, client)
    }
}

#[async_trait]
impl socklb_ttrpc::Health for CountingAgent {
    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _: api::VersionRequest,
    ) -> ttrpc::Result<api::VersionResponse> {
        Ok(api::VersionResponse {
            api_version: self.api_version.into(),
            ..Default::default()
        })
    }
}

#[async_trait]
impl socklb_ttrpc::Services for CountingAgent {
    async fn list(
        &self,
        _ctx: &TtrpcContext,
        _: api::ListRequest,
    ) -> ttrpc::Result<api::ListResponse> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        Ok(api::ListResponse {
            generation: 7,
            services: web(1).to_api(),
            digest: web(1).digest(),
            ..Default::default()
        })
    }

    async fn digest(
        &self,
        _ctx: &TtrpcContext,
        _: api::DigestRequest,
    ) -> ttrpc::Result<api::DigestResponse> {
        self.digests.fetch_add(1, Ordering::Relaxed);
        Ok(api::DigestResponse {
            generation: 7,
            digest: web(1).digest(),
            services: 1,
            ..Default::default()
        })
    }

    async fn sync(
        &self,
        _ctx: &TtrpcContext,
        request: api::SyncRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        self.took(&request.services);
        Ok(api::WriteResponse {
            generation: request.generation,
            digest: self.holds(&request.services).digest(),
            ..Default::default()
        })
    }

    async fn upsert(
        &self,
        _ctx: &TtrpcContext,
        request: api::UpsertRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        self.took(&request.services);
        Ok(api::WriteResponse::new())
    }
}

impl CountingAgent {
    fn took(&self, services: &[api::Service]) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let external = services
            .iter()
            .filter(|s| s.vip_kind.enum_value() == Ok(api::VipKind::EXTERNAL))
            .count();
        self.external_services
            .fetch_add(external as u64, Ordering::Relaxed);
    }

    /// The table an agent of this version holds of `services`: one before
    /// API 1.4 ignores `vip_kind`, reading every VIP as a cluster VIP.
    fn holds(&self, services: &[api::Service]) -> Table {
        let mut table = Table::from_api(services).unwrap();
        if self.api_version < "1.4" {
            for service in &mut table.services {
                service.vip_kind = VipKind::Cluster;
            }
        }
        table
    }
}

#[test]
fn the_digest_is_asked_alone_where_the_agent_can_answer_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = runtime();
    let _in_runtime = runtime.enter();
    // API 1.3 answers Digest; 1.2 has none, so the client lists the table.
    for (api_version, lists, digests) in [("1.3", 0, 1), ("1.2", 1, 0)] {
        let (agent, mut server, mut client) = CountingAgent::start(api_version, &dir, &runtime);

        let digest = runtime.block_on(client.digest()).expect("digest");
        assert_eq!(digest, (7, web(1).digest()), "API {api_version}");
        assert_eq!(
            (
                agent.lists.load(Ordering::Relaxed),
                agent.digests.load(Ordering::Relaxed)
            ),
            (lists, digests),
            "API {api_version}: (Lists, Digests) asked"
        );
        runtime.block_on(server.shutdown()).expect("stop the agent");
    }
}

/// During a rolling upgrade each agent gets what it can hold: one before
/// API 1.4 gets external VIPs as the cluster VIPs it takes them for, and
/// its digest of that table is the one expected; one of 1.4 gets them as
/// they are.
#[test]
fn an_agent_before_external_vips_gets_them_as_cluster_vips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = runtime();
    let _in_runtime = runtime.enter();
    let mut node_address = web(1).services.remove(0);
    node_address.name = Some("default/ssh-beside".into());
    node_address.key.vip = "192.0.2.10".parse().unwrap();
    node_address.vip_kind = VipKind::External;
    let with_external = Table::new(vec![web(1).services.remove(0), node_address.clone()]).unwrap();
    for (api_version, external_sent) in [("1.3", 0), ("1.4", 2)] {
        let (agent, mut server, mut client) = CountingAgent::start(api_version, &dir, &runtime);

        let synced = runtime.block_on(client.sync(with_external.clone()));
        synced.unwrap_or_else(|err| panic!("API {api_version}: {err}"));
        runtime
            .block_on(client.upsert(vec![node_address.clone()]))
            .unwrap_or_else(|err| panic!("API {api_version}: {err}"));
        assert_eq!(agent.writes.load(Ordering::Relaxed), 2, "API {api_version}");
        assert_eq!(
            agent.external_services.load(Ordering::Relaxed),
            external_sent,
            "API {api_version}: external services sent"
        );
        runtime.block_on(server.shutdown()).expect("stop the agent");
    }
}

/// A table beyond one part goes in parts although it would fit one ttrpc
/// message: the part size, not the table's, bounds what a sender (the node
/// daemon, for each sandbox it syncs) holds in flight.
#[test]
fn a_table_beyond_one_part_is_synced_in_parts() {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("agent.vsock");
    let agent = runtime.block_on(StandInAgent::start(&uds, DEFAULT_AGENT_PORT));
    let services = (0..2_000u32)
        .map(|i| Service {
            name: Some(format!("bench/svc-{i}")),
            key: ServiceKey {
                vip: std::net::Ipv4Addr::from(0x0a60_0000 + i).into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            vip_kind: VipKind::Cluster,
            affinity_timeout_secs: None,
            backends: (0..8u32)
                .map(|b| {
                    std::net::SocketAddr::from((
                        std::net::Ipv4Addr::from(0x0af4_0000 + i * 8 + b),
                        8080,
                    ))
                })
                .collect(),
        })
        .collect();
    let table = Table::new(services).unwrap();
    let bytes = protobuf::Message::compute_size(&api::SyncRequest {
        services: table.to_api(),
        ..Default::default()
    }) as usize;
    assert!(
        (PART_BYTES..TTRPC_MESSAGE_LIMIT).contains(&bytes),
        "the table is beyond one part and within one message: {bytes} bytes"
    );
    let mut client = agent_client(
        &format!("hvsock://{}:{DEFAULT_AGENT_PORT}", uds.display()),
        Options::default(),
    );
    let written = runtime.block_on(client.sync(table.clone())).unwrap();
    assert_eq!(written.digest, Some(table.digest()));
    assert_eq!(agent.syncs_in_parts(), 1, "one Sync, in parts");
    assert_eq!(agent.table().digest(), table.digest());
}
