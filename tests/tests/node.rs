//! `socklb-shim node`, the real binary, on a node made of stand-ins (see
//! `socklb_tests::standin`): sandbox directories in a temporary directory
//! (never /run/vc or /run/kata), Kata's management socket in each, an
//! in-memory socklb agent behind hybrid vsock for each, and the fake API
//! server. No VM, no AF_VSOCK, and no root but for the in-cluster test (a
//! mount namespace).

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use socklb_protocols::DEFAULT_AGENT_PORT;
use socklb_shim::node::DEFAULT_PARALLEL_SYNCS;
use socklb_tests::{
    Sandbox,
    apiserver::{FakeApiServer, Kind},
    die_with_parent, shim_bin,
    standin::{HybridFront, KataShim, SilentAgent, StandInAgent},
    vm::{AGENT_PORT, GuestImage, Vm, eventually},
    workload::{errno, one, start_backends},
};

const ECONNREFUSED: i64 = 111;

fn service(name: &str, vip: &str) -> Value {
    json!({"metadata": {"namespace": "default", "name": name,
                        "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
           "spec": {"clusterIP": vip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

fn slice(service: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": "node-a", "conditions": {"ready": true}}))
        .collect();
    json!({
        "metadata": {"namespace": "default", "name": format!("{service}-1"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints,
    })
}

fn lines(agent: &StandInAgent) -> BTreeSet<String> {
    agent
        .table()
        .services
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn set(lines: &[&str]) -> BTreeSet<String> {
    lines.iter().map(|l| l.to_string()).collect()
}

/// A node: sandbox roots of both Kata runtimes' layouts, bundles, and
/// the daemon's sockets, all in one temporary directory.
struct Node {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    metrics: SocketAddr,
    /// `--verify-secs`: 1 unless a test says otherwise.
    verify_secs: u64,
    /// More arguments for `socklb-shim node`.
    args: Vec<String>,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["vc-sbs", "kata", "bundles", "vsock"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let metrics = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        Node {
            dir,
            daemon: None,
            metrics,
            verify_secs: 1,
            args: Vec::new(),
        }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// A sandbox directory under `root` ("vc-sbs" or "kata") with Kata's
    /// management socket answering `agent_url`.
    fn sandbox(&self, root: &str, id: &str, agent_url: &str) -> KataShim {
        let dir = self.path(root).join(id);
        std::fs::create_dir(&dir).unwrap();
        KataShim::start(&dir.join("shim-monitor.sock"), agent_url)
    }

    /// Sandbox `id`'s OCI bundle as containerd writes it, naming its pod.
    fn pod_bundle(&self, id: &str, namespace: &str, name: &str) {
        let dir = self.path(&format!("bundles/{id}"));
        std::fs::create_dir(&dir).unwrap();
        let annotations = serde_json::json!({"annotations": {
            "io.kubernetes.cri.sandbox-namespace": namespace,
            "io.kubernetes.cri.sandbox-name": name,
        }});
        std::fs::write(dir.join("config.json"), annotations.to_string()).unwrap();
    }

    /// Sandbox `id` under `root` with a stand-in agent behind its hybrid
    /// vsock socket. Called inside `runtime`.
    fn stand_in_sandbox(
        &self,
        runtime: &tokio::runtime::Runtime,
        root: &str,
        id: &str,
    ) -> (StandInAgent, KataShim) {
        let (uds, url) = self.vsock(id);
        let agent = runtime.block_on(StandInAgent::start(&uds, DEFAULT_AGENT_PORT));
        (agent, self.sandbox(root, id, &url))
    }

    /// The hybrid vsock socket of sandbox `id` and the URL Kata gives it.
    fn vsock(&self, id: &str) -> (PathBuf, String) {
        let uds = self.path("vsock").join(format!("{id}.sock"));
        let url = format!("hvsock://{}:1024", uds.display());
        (uds, url)
    }

    fn start(&mut self, api: &FakeApiServer, timeout_secs: u64) {
        let kubeconfig = api.kubeconfig(self.dir.path());
        self.start_with(&kubeconfig, timeout_secs);
    }

    fn start_with(&mut self, kubeconfig: &Path, timeout_secs: u64) {
        let mut command = Command::new(shim_bin());
        self.daemon_args(&mut command, timeout_secs)
            .arg("--kubeconfig")
            .arg(kubeconfig);
        self.spawn(command);
    }

    /// Starts the daemon as a DaemonSet's pod runs it: no kubeconfig (none
    /// in $HOME either), the API server at `KUBERNETES_SERVICE_HOST` and
    /// `_PORT`, and the service account's `token` (this one), `ca.crt`
    /// (`api`'s CA) and `namespace` where kube-rs reads them in a pod,
    /// /var/run/secrets/kubernetes.io/serviceaccount. They are there only
    /// in a mount namespace of the daemon's own, on a tmpfs over
    /// /var/run/secrets, or over /var/run where this machine has no
    /// /var/run/secrets (the daemon reads nothing there: its sockets and
    /// sandbox roots are in this node's directory); all of it goes with the
    /// daemon.
    fn start_in_cluster(&mut self, api: &FakeApiServer, token: &str, timeout_secs: u64) {
        let account = self.path("serviceaccount");
        let home = self.path("home");
        for dir in [&account, &home] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(account.join("token"), token).unwrap();
        std::fs::write(account.join("ca.crt"), api.ca_pem()).unwrap();
        std::fs::write(account.join("namespace"), "kube-system").unwrap();
        const IN_A_POD: &str = r#"set -e
account=$1
shift
secrets=/var/run/secrets
if [ -d $secrets ]; then top=$secrets; else top=/var/run; fi
mount -t tmpfs -o size=1m,mode=0755 socklb-test "$top"
mkdir -p $secrets/kubernetes.io/serviceaccount
cp "$account/token" "$account/ca.crt" "$account/namespace" $secrets/kubernetes.io/serviceaccount/
exec "$@""#;
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-c", IN_A_POD])
            .arg("sh")
            .arg(&account)
            .arg(shim_bin());
        self.daemon_args(&mut command, timeout_secs)
            .env_remove("KUBECONFIG")
            .env("HOME", &home)
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", api.addr().port().to_string());
        self.spawn(command);
    }

    /// Adds the daemon's command line but for its kubeconfig.
    fn daemon_args<'a>(&self, command: &'a mut Command, timeout_secs: u64) -> &'a mut Command {
        command
            .args([
                "--timeout",
                &timeout_secs.to_string(),
                "node",
                "--node",
                "node-a",
            ])
            .args(["--agent-port", &AGENT_PORT.to_string()])
            .arg("--sandbox-root")
            .arg(self.path("vc-sbs"))
            .arg("--sandbox-root")
            .arg(self.path("kata"))
            .arg("--bundle-root")
            .arg(self.path("bundles"))
            .arg("--status-socket")
            .arg(self.path("node.sock"))
            .args(["--metrics-addr", &self.metrics.to_string()])
            .args(["--batch-ms", "10", "--rescan-ms", "500"])
            .args(["--verify-secs", &self.verify_secs.to_string()])
            .args(&self.args)
    }

    fn spawn(&mut self, mut command: Command) {
        let log = std::fs::File::create(self.path("daemon.log")).unwrap();
        command.stdout(Stdio::null()).stderr(log);
        die_with_parent(&mut command);
        self.daemon = Some(command.spawn().expect("start socklb-shim node"));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// `socklb-shim node status -o json`.
    fn status(&self) -> Value {
        let output = Command::new(shim_bin())
            .args(["node", "status", "-o", "json", "--status-socket"])
            .arg(self.path("node.sock"))
            .output()
            .expect("run socklb-shim node status");
        assert!(
            output.status.success(),
            "node status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }

    fn row(&self, id: &str) -> Option<Value> {
        self.status()["sandboxes"]
            .as_array()?
            .iter()
            .find(|row| row["id"] == id)
            .cloned()
    }

    fn metrics(&self) -> String {
        self.http("/metrics")
    }

    /// The whole answer (status line, headers, body) to `GET path` on the
    /// metrics address, or why there is none.
    fn http(&self, path: &str) -> String {
        let mut stream = match TcpStream::connect(self.metrics) {
            Ok(stream) => stream,
            Err(err) => return format!("connecting to {}: {err}", self.metrics),
        };
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

fn converge(node: &Node, what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    assert!(
        eventually(timeout, done),
        "{what} within {timeout:?}; daemon log:\n{}",
        node.log()
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

const SANDBOXES: usize = 100;

#[test]
fn one_watch_reaches_every_sandbox_and_a_hung_agent_delays_none() {
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let mut node = Node::new();
    let (agents, mut shims): (Vec<_>, Vec<_>) = (0..SANDBOXES)
        .map(|i| {
            let root = if i % 2 == 0 { "vc-sbs" } else { "kata" };
            node.stand_in_sandbox(&runtime, root, &format!("sb-{i:03}"))
        })
        .unzip();
    let (hung_uds, hung_url) = node.vsock("hung");
    let _hung = SilentAgent::start(&hung_uds);
    shims.push(node.sandbox("kata", "hung", &hung_url));
    // Every call to the hung agent waits out this timeout.
    node.start(&api, 10);

    let first = set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]);
    let started = Instant::now();
    converge(&node, "every agent synced", Duration::from_secs(30), || {
        agents.iter().all(|a| lines(a) == first)
    });
    let first_fan_out = started.elapsed();

    // A change reaches every sandbox while the hung one still times out.
    api.apply(
        Kind::EndpointSlice,
        slice("web", &["10.244.1.1", "10.244.1.2"]),
    );
    let second = set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080]"]);
    let changed = Instant::now();
    converge(&node, "every agent updated", Duration::from_secs(5), || {
        agents.iter().all(|a| lines(a) == second)
    });
    let change_to_all = changed.elapsed();
    println!(
        "{SANDBOXES} sandboxes: first fan-out {first_fan_out:?}, one change to all {change_to_all:?}"
    );
    assert!(
        change_to_all < Duration::from_secs(3),
        "the change took {change_to_all:?}: the hung agent (10 s per call) held the others up"
    );
    // Incremental: only the first table went whole.
    assert!(agents.iter().all(|a| a.syncs() == 1));
    // One list and one watch of each kind for the node, none per sandbox.
    for kind in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
        let asked = (api.lists(kind), api.watches(kind));
        assert_eq!(asked, (1, 1), "{kind:?} (lists, watches)");
    }

    let status = node.status();
    let rows = status["sandboxes"].as_array().expect("rows");
    assert_eq!(rows.len(), SANDBOXES + 1, "{status:#}");
    let version = status["version"].as_u64().unwrap();
    for row in rows.iter().filter(|row| row["id"] != "hung") {
        assert_eq!(row["state"], "in_sync", "{row}");
        assert_eq!(row["acked"], json!(version), "{row}");
        assert_eq!(row["lag"], 0, "{row}");
    }
    let hung = rows.iter().find(|row| row["id"] == "hung").unwrap();
    assert_ne!(hung["state"], "in_sync", "{hung}");
    assert_eq!(hung["acked"], Value::Null, "{hung}");

    let metrics = node.metrics();
    assert!(
        metrics.contains(&format!(
            "socklb_node_sandboxes{{state=\"in_sync\"}} {SANDBOXES}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "socklb_node_upserts_total{{result=\"ok\"}} {SANDBOXES}"
        )),
        "{metrics}"
    );
}

/// Sandboxes whose agent accepts and never answers (a paused VM, a guest
/// without socklb), twice as many as the daemon's permits for whole
/// tables, hold up no other: a sandbox found later gets its first table
/// at once, not after the wedged ones' calls time out (30 s each here).
#[test]
fn wedged_sandboxes_do_not_delay_a_new_ones_first_table() {
    const WEDGED: usize = 2 * DEFAULT_PARALLEL_SYNCS;
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let mut node = Node::new();
    let mut wedged = Vec::new();
    let mut shims = Vec::new();
    for i in 0..WEDGED {
        let id = format!("wedged-{i}");
        let (uds, url) = node.vsock(&id);
        wedged.push(SilentAgent::start(&uds));
        shims.push(node.sandbox("kata", &id, &url));
    }
    // The default call timeout (and the default 4 permits).
    node.start(&api, 30);
    converge(
        &node,
        "the daemon has a table and tries every wedged sandbox",
        Duration::from_secs(20),
        || {
            let log = node.log();
            log.contains("\"msg\":\"node table replaced\"")
                && log.matches("\"msg\":\"agent address\"").count() == WEDGED
        },
    );
    // Their calls are under way.
    std::thread::sleep(Duration::from_secs(1));

    let (uds, url) = node.vsock("new");
    let agent = runtime.block_on(StandInAgent::start(&uds, DEFAULT_AGENT_PORT));
    let found = Instant::now();
    shims.push(node.sandbox("kata", "new", &url));
    let expected = set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]);
    converge(
        &node,
        "the new sandbox's first table, past the wedged ones",
        Duration::from_secs(10),
        || lines(&agent) == expected,
    );
    println!(
        "{WEDGED} wedged sandboxes: the new sandbox's first table {:?} after it appeared",
        found.elapsed()
    );
}

/// An agent that answers Health and then hangs in its Sync (a guest whose
/// map writes stall) holds the daemon's one permit for `--timeout` at
/// most: a sandbox found meanwhile gets its first table after that bound,
/// not after the hung Sync's calls time out on each of its tries.
#[test]
fn an_agent_hanging_in_its_sync_holds_the_permit_for_the_timeout_at_most() {
    const TIMEOUT: Duration = Duration::from_secs(4);
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let mut node = Node::new();
    node.args = vec!["--parallel-syncs".into(), "1".into()];
    let (hung, _hung_shim) = node.stand_in_sandbox(&runtime, "kata", "hung");
    // web's four map writes take 12 s: three timeouts.
    hung.slow_down(Duration::from_secs(3));
    node.start(&api, TIMEOUT.as_secs());
    converge(
        &node,
        "the hung sandbox holds the permit",
        Duration::from_secs(20),
        || hung.calls("SyncCommit") + hung.calls("Sync") > 0,
    );

    let (agent, _shim) = node.stand_in_sandbox(&runtime, "kata", "new");
    let found = Instant::now();
    converge(
        &node,
        "the new sandbox's first table, one timeout after the hung one took the permit",
        TIMEOUT + Duration::from_secs(2),
        || lines(&agent) == set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]),
    );
    println!(
        "an agent hung in its Sync: the new sandbox's first table {:?} after it appeared",
        found.elapsed()
    );
    // Its remaining writes finish at once, so the runtime can end.
    hung.slow_down(Duration::ZERO);
}

/// A sandbox whose agent moved (its VM started again under another CID
/// or socket, the sandbox id and directory the same) is found again: an
/// agent that keeps failing has its address asked from Kata's shim anew.
#[test]
fn an_agent_that_moved_is_found_at_its_new_address() {
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let mut node = Node::new();
    // Nothing listens at the first address.
    let (_, gone_url) = node.vsock("gone");
    let _old_shim = node.sandbox("kata", "moving", &gone_url);
    node.start(&api, 3);
    converge(
        &node,
        "the old address failed",
        Duration::from_secs(20),
        || node.log().contains("agent write failed"),
    );

    // Kata's shim now names another socket; its own socket file is
    // replaced in one rename, so the sandbox never disappears.
    let (uds, url) = node.vsock("moved");
    let agent = runtime.block_on(StandInAgent::start(&uds, DEFAULT_AGENT_PORT));
    let staged = node.path("kata/moving/new-monitor.sock");
    let _new_shim = KataShim::start(&staged, &url);
    std::fs::rename(&staged, node.path("kata/moving/shim-monitor.sock")).unwrap();
    let expected = set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]);
    converge(
        &node,
        "the agent at its new address synced",
        Duration::from_secs(10),
        || lines(&agent) == expected,
    );
    let row = node.row("moving").expect("row moving");
    assert_eq!(
        row["agent"],
        format!("hvsock://{}:{DEFAULT_AGENT_PORT}", uds.display()),
        "{row}"
    );
    assert_eq!(row["state"], "in_sync", "{row}");
}

/// A write the daemon resends after a timeout, while the agent still
/// works on the original, expects the generation the original found: the
/// agent refuses the resend (FailedPrecondition) instead of applying it a
/// second time, and the daemon syncs the whole table.
#[test]
fn a_resent_write_is_refused_by_generation() {
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let mut node = Node::new();
    let (agent, _shim) = node.stand_in_sandbox(&runtime, "kata", "late");
    // Each call times out after 2 s.
    node.start(&api, 2);
    converge(&node, "the first table", Duration::from_secs(20), || {
        agent.syncs() == 1
    });

    // The Upsert's first map write takes 3 s: the daemon gives up on it
    // after 2 s and resends it on a new connection, which the agent
    // answers once the original is written. The resend expects the
    // generation the original found.
    agent.slow_down(Duration::from_secs(3));
    api.apply(
        Kind::EndpointSlice,
        slice("web", &["10.244.1.1", "10.244.1.2"]),
    );
    std::thread::sleep(Duration::from_secs(1));
    agent.slow_down(Duration::ZERO);
    let expected = set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080]"]);
    converge(
        &node,
        "the resend refused and the whole table synced",
        Duration::from_secs(20),
        || agent.syncs() == 2 && lines(&agent) == expected,
    );
    let log = node.log();
    let refused = log.lines().any(|line| {
        line.contains("agent write failed")
            && line.contains("FAILED_PRECONDITION")
            && line.contains("the write expects the table at generation")
    });
    assert!(refused, "the resend was not refused by generation:\n{log}");
}

/// A verification round asks each agent (API 1.3 and later) for the
/// digest of its table only: never the table itself (List), and no whole
/// Sync while nothing changed. Sandboxes found together start their checks
/// at random points of the interval, not at one moment. An idle agent is
/// looked at on its 5 s health tick and its digest asked on the first tick
/// past the interval, so an interval of three ticks shows the spread (one
/// of 1 s would ask on every tick, every sandbox's on the same one).
#[test]
fn a_verification_round_asks_only_digests_spread_over_its_interval() {
    const CHECKED: usize = 12;
    const EVERY: Duration = Duration::from_secs(15);
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let mut node = Node::new();
    let (agents, _shims): (Vec<_>, Vec<_>) = (0..CHECKED)
        .map(|i| node.stand_in_sandbox(&runtime, "kata", &format!("sb-{i:02}")))
        .unzip();
    node.verify_secs = EVERY.as_secs();
    let started = Instant::now();
    node.start(&api, 10);
    converge(&node, "every agent synced", Duration::from_secs(20), || {
        agents.iter().all(|a| a.syncs() == 1)
    });
    converge(
        &node,
        "every agent's table verified",
        EVERY + Duration::from_secs(10),
        || {
            agents
                .iter()
                .all(|a| a.calls("Digest") + a.calls("List") > 0)
        },
    );
    for (i, agent) in agents.iter().enumerate() {
        let whole = agent.calls("Sync") + agent.calls("SyncBegin");
        let changes = agent.calls("Upsert") + agent.calls("Delete");
        assert_eq!(
            (agent.calls("List"), whole, changes),
            (0, 1, 0),
            "sandbox sb-{i:02}: (Lists, whole Syncs, Upserts and Deletes) besides its digests"
        );
    }
    let firsts: Vec<Instant> = agents
        .iter()
        .map(|a| a.first_call("Digest").expect("a digest asked"))
        .collect();
    let spread = *firsts.iter().max().unwrap() - *firsts.iter().min().unwrap();
    let after: Vec<String> = firsts
        .iter()
        .map(|first| format!("{:.1?}", *first - started))
        .collect();
    assert!(
        spread >= Duration::from_secs(4),
        "the first digests were asked {after:?} after the daemon started: \
         at one moment, not spread over {EVERY:?}"
    );
}

/// A Service named `name` on `vip` with ports 1..=`ports` (TCP) and no
/// endpoints.
fn service_with_ports(name: &str, vip: &str, ports: u16) -> Value {
    let ports: Vec<Value> = (1..=ports)
        .map(|port| json!({"name": format!("p{port}"), "port": port, "targetPort": port}))
        .collect();
    json!({"metadata": {"namespace": "default", "name": name},
           "spec": {"clusterIP": vip, "ports": ports}})
}

/// `socklb_node_services_left_out` on the daemon's `/metrics`.
fn left_out_metric(node: &Node) -> u64 {
    let metrics = node.metrics();
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("socklb_node_services_left_out ")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no socklb_node_services_left_out in\n{metrics}"))
}

/// The datapath holds 65,536 services (VIP, port, protocol): the size of
/// the agent's maps, a constant, so this cluster is that big. Web
/// (10.96.0.20:80) and 256 Services of 256 ports each on 10.97.N.1, after
/// it in key order, pass it by one. Past it the node programs what fits, in
/// key order, and says what does not (log, `node status`, metric); a change
/// that takes the cluster past it re-fits the table, so the sandbox keeps
/// what fits and gets each later change of it: never stale backends.
#[test]
fn past_capacity_what_fits_is_programmed_and_the_rest_is_said() {
    const FILL: u16 = 256;
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    for n in 0..FILL {
        let fill = service_with_ports(&format!("fill-{n}"), &format!("10.97.{n}.1"), 256);
        api.apply(Kind::Service, fill);
    }
    let last_port_of = |n: u16| format!("10.97.{n}.1:256/TCP");
    let mut node = Node::new();
    let (agent, _shim) = node.stand_in_sandbox(&runtime, "kata", "cap");
    // A whole table at capacity in a debug build: generous.
    node.start(&api, 60);
    // The status once a table newer than `after` is the sandbox's.
    let caught_up = |what: &str, after: u64, timeout: Duration| {
        let mut status = Value::Null;
        converge(&node, what, timeout, || {
            status = node.status();
            let row = status["sandboxes"]
                .as_array()
                .and_then(|rows| rows.iter().find(|row| row["id"] == "cap"))
                .cloned()
                .unwrap_or_default();
            status["version"].as_u64().unwrap_or(0) > after
                && row["state"] == "in_sync"
                && row["lag"] == 0
        });
        status
    };

    // Over capacity from the start: all but the last in key order.
    converge(&node, "the first table", Duration::from_secs(120), || {
        agent.syncs() == 1
    });
    let status = caught_up("the first table acknowledged", 0, Duration::from_secs(10));
    assert_eq!(
        (&status["services"], &status["services_left_out"]),
        (&json!(65_536), &json!([last_port_of(255)])),
        "(services, left out)"
    );
    let held = lines(&agent);
    assert_eq!(held.len(), 65_536);
    assert!(held.contains("10.96.0.20:80/TCP -> [10.244.1.1:8080]"));
    assert!(!held.contains(&format!("{} -> []", last_port_of(255))));
    assert_eq!(left_out_metric(&node), 1);
    let text = succeeds(
        Command::new(shim_bin())
            .args(["node", "status", "--status-socket"])
            .arg(node.path("node.sock"))
            .output()
            .expect("run socklb-shim node status"),
    );
    let said = format!(
        "1 services do not fit the datapath and are not programmed (first: {})",
        last_port_of(255)
    );
    assert!(text.contains(&said), "{text}");
    converge(
        &node,
        "the log says what does not fit",
        Duration::from_secs(10),
        || {
            node.log()
                .contains("the cluster's services do not fit the datapath: programming what fits")
        },
    );

    // Back within it: nothing is left out.
    let version = status["version"].as_u64().unwrap();
    api.delete(Kind::Service, "default", "fill-255");
    let status = caught_up("fill-255 gone", version, Duration::from_secs(30));
    assert_eq!(status["services_left_out"], json!([]));
    assert_eq!(lines(&agent).len(), 65_536 - 255);
    assert_eq!(left_out_metric(&node), 0);

    // A change past it: big comes before the fill in key order, so the
    // re-fit programs all of big and leaves fill-254's last port out. At
    // capacity that swap goes out as its differences too: the Delete
    // makes the room the Upsert needs.
    let version = status["version"].as_u64().unwrap();
    let syncs = agent.syncs();
    api.apply(Kind::Service, service_with_ports("big", "10.96.0.30", 256));
    let status = caught_up(
        "big past capacity, the table re-fitted",
        version,
        Duration::from_secs(30),
    );
    assert_eq!(status["services_left_out"], json!([last_port_of(254)]));
    let held = lines(&agent);
    assert_eq!(held.len(), 65_536);
    assert!((1..=256).all(|port| held.contains(&format!("10.96.0.30:{port}/TCP -> []"))));
    assert!(!held.contains(&format!("{} -> []", last_port_of(254))));
    assert_eq!(left_out_metric(&node), 1);
    assert_eq!(
        agent.syncs(),
        syncs,
        "a swap at capacity went out as the whole table"
    );

    // Still past it, web's endpoints change: the sandbox gets the new one.
    let version = status["version"].as_u64().unwrap();
    let syncs = agent.syncs();
    api.apply(Kind::EndpointSlice, slice("web", &["10.244.1.2"]));
    let status = caught_up("web's new endpoint", version, Duration::from_secs(30));
    assert_eq!(status["services_left_out"], json!([last_port_of(254)]));
    let held = lines(&agent);
    assert_eq!(held.len(), 65_536);
    assert!(held.contains("10.96.0.20:80/TCP -> [10.244.1.2:8080]"));
    assert!(
        !held.iter().any(|line| line.contains("10.244.1.1:")),
        "a stale backend"
    );
    assert_eq!(
        agent.syncs(),
        syncs,
        "a change of what fits went out as the whole table"
    );
}

/// A sandbox's datapath decisions reach the node's /metrics under its pod
/// name, read from its agent (the real one, on a test cgroup behind
/// hybrid vsock) every --decisions-secs.
#[test]
fn a_sandboxs_decisions_are_counted_on_the_nodes_metrics() {
    socklb_tests::require_root!();
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let _agent = sandbox.start_agent(None);
    let mut node = Node::new();
    node.args = vec!["--decisions-secs".into(), "1".into()];
    let (uds, url) = node.vsock("real");
    let _front = HybridFront::start(
        &uds,
        DEFAULT_AGENT_PORT,
        &sandbox.workdir.path().join("agent.sock"),
    );
    node.pod_bundle("real", "default", "client");
    let _shim = node.sandbox("kata", "real", &url);
    node.start(&api, 30);
    converge(
        &node,
        "the real agent synced",
        Duration::from_secs(30),
        || node.log().contains("\"msg\":\"table synced\""),
    );

    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"],
        "b1"
    );
    assert_eq!(
        errno(&sandbox.client(&["tcp", "10.96.0.20:81"])[0]),
        ECONNREFUSED
    );
    let series = |verdict: &str, n: u64| {
        format!(
            "socklb_node_sandbox_decisions_total{{sandbox=\"real\",pod=\"default/client\",verdict=\"{verdict}\"}} {n}"
        )
    };
    converge(
        &node,
        "the decisions on /metrics",
        Duration::from_secs(15),
        || {
            let metrics = node.metrics();
            [series("translated", 1), series("refused-unknown-port", 1)]
                .iter()
                .all(|line| metrics.lines().any(|l| l == line))
        },
    );
}

/// An API server holding Service web (10.96.0.20:80) on one endpoint,
/// 10.244.1.1: what most of these tests start from.
fn web_api() -> FakeApiServer {
    let api = FakeApiServer::start();
    api.apply(Kind::Service, service("web", "10.96.0.20"));
    api.apply(Kind::EndpointSlice, slice("web", &["10.244.1.1"]));
    api
}

/// Service web on one endpoint, and the stand-in agents of two sandboxes,
/// "fast" and "slow", that both got the whole table: where a test of a
/// lagging sandbox starts. Called inside `runtime`.
fn fast_and_slow(
    runtime: &tokio::runtime::Runtime,
) -> (FakeApiServer, Node, Vec<StandInAgent>, Vec<KataShim>) {
    let api = web_api();
    let mut node = Node::new();
    let (agents, shims): (Vec<_>, Vec<_>) = ["fast", "slow"]
        .iter()
        .map(|id| node.stand_in_sandbox(runtime, "kata", id))
        .unzip();
    node.start(&api, 10);
    converge(&node, "both synced", Duration::from_secs(20), || {
        agents.iter().all(|a| a.syncs() == 1)
    });
    (api, node, agents, shims)
}

#[test]
fn a_slow_sandbox_gets_the_newest_state_not_every_batch() {
    let runtime = runtime();
    let _entered = runtime.enter();
    let (api, node, agents, _shims) = fast_and_slow(&runtime);
    let (fast, slow) = (&agents[0], &agents[1]);
    slow.slow_down(Duration::from_millis(500));

    // Ten changes, each its own batch, while the slow one is busy.
    const CHANGES: u8 = 10;
    for n in 1..=CHANGES {
        api.apply(
            Kind::EndpointSlice,
            slice("web", &[&format!("10.244.1.{n}")]),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = set(&[&format!("10.96.0.20:80/TCP -> [10.244.1.{CHANGES}:8080]")]);
    converge(
        &node,
        "the fast one has the newest state",
        Duration::from_secs(2),
        || lines(fast) == last,
    );
    converge(
        &node,
        "the slow one has the newest state",
        Duration::from_secs(10),
        || lines(slow) == last,
    );
    assert!(
        fast.upserts() >= u64::from(CHANGES) / 2,
        "the fast one got most batches one by one: {}",
        fast.upserts()
    );
    assert!(
        slow.upserts() <= 4,
        "the slow one got the changes merged, not one by one: {} upserts for {CHANGES} changes",
        slow.upserts()
    );
    assert_eq!(slow.syncs(), 1, "merged changes, not the whole table");
}

/// Well within the 2 s the slow sandbox below is busy.
const SOON: Duration = Duration::from_millis(1500);

/// A Service created and deleted while a sandbox is busy with an earlier
/// write is never in what that sandbox is sent: no Delete of a key its
/// agent never had (the agent refuses it, NotFound, and the sandbox would
/// fall back to the whole table).
#[test]
fn a_service_come_and_gone_within_a_lag_is_not_deleted_from_the_laggard() {
    let runtime = runtime();
    let _entered = runtime.enter();
    let (api, node, agents, _shims) = fast_and_slow(&runtime);
    let (fast, slow) = (&agents[0], &agents[1]);

    // The slow one is busy with this change for 2 s and more ...
    slow.slow_down(Duration::from_secs(2));
    api.apply(
        Kind::EndpointSlice,
        slice("web", &["10.244.1.1", "10.244.1.2"]),
    );
    let last = set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080]"]);
    let fast_has = |expected: &BTreeSet<String>| lines(fast) == *expected;
    converge(&node, "the fast one has the change", SOON, || {
        fast_has(&last)
    });
    // ... while tmp comes and goes (the fast one sees both).
    api.apply(Kind::Service, service("tmp", "10.96.0.30"));
    let with_tmp = set(&[
        "10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080]",
        "10.96.0.30:80/TCP -> []",
    ]);
    converge(&node, "the fast one has tmp", SOON, || fast_has(&with_tmp));
    api.delete(Kind::Service, "default", "tmp");
    converge(&node, "the fast one lost tmp", SOON, || fast_has(&last));
    slow.slow_down(Duration::ZERO);
    converge(
        &node,
        "the slow one has the newest state",
        Duration::from_secs(10),
        || lines(slow) == last,
    );
    // Settled: no write is under way.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(slow.syncs(), 1, "the slow one fell back to the whole table");
    let metrics = node.metrics();
    let deletes = |result: &str| {
        let name = format!("socklb_node_deletes_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&name)?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    assert_eq!(
        (deletes("ok"), deletes("error")),
        (1, 0),
        "one Delete (of tmp, to the fast one) expected"
    );
}

/// `socklb-shim ARGS` with `node`'s status socket, where --pod and
/// --sandbox ask the daemon.
fn through_daemon(node: &Node, args: &[&str]) -> std::process::Output {
    Command::new(shim_bin())
        .env_remove("SOCKLB_AGENT")
        .args(["--timeout", "5", "--status-socket"])
        .arg(node.path("node.sock"))
        .args(args)
        .output()
        .expect("run socklb-shim")
}

/// Fails with one line on stderr holding `needle`.
fn fails_in_one_line(output: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

/// Its standard output, having succeeded.
fn succeeds(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

#[test]
fn a_pod_or_sandbox_id_reaches_its_agent_and_its_row_through_the_daemon() {
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    // More backends than a row shows unless wide.
    api.apply(Kind::Service, service("big", "10.96.0.30"));
    let big = [
        "10.244.2.1",
        "10.244.2.2",
        "10.244.2.3",
        "10.244.2.4",
        "10.244.2.5",
    ];
    api.apply(Kind::EndpointSlice, slice("big", &big));
    let mut node = Node::new();
    let (uds, url) = node.vsock("a");
    let agent = runtime.block_on(StandInAgent::start(&uds, DEFAULT_AGENT_PORT));
    let _shim = node.sandbox("vc-sbs", "a", &url);
    node.pod_bundle("a", "shop", "web-0");
    let _remote = node.sandbox("kata", "remote", "remote://10.0.0.9:15150");

    // No daemon yet: its socket is missing.
    fails_in_one_line(
        &through_daemon(&node, &["--pod", "shop/web-0", "list"]),
        "is `socklb-shim node` running?",
    );

    node.start(&api, 3);
    converge(&node, "sandbox a synced", Duration::from_secs(20), || {
        lines(&agent).len() == 2
    });
    let listed = succeeds(through_daemon(
        &node,
        &["--pod", "shop/web-0", "list", "-o", "json"],
    ));
    let listed: Value = serde_json::from_str(&listed).expect("list JSON");
    assert!(listed.to_string().contains("10.96.0.20"), "{listed}");
    // --sandbox beside --pod, after the command as before it.
    let listed = succeeds(through_daemon(
        &node,
        &["list", "--sandbox", "a", "-o", "yaml"],
    ));
    // Block YAML, not JSON (which YAML would read too).
    assert!(listed.contains("\nservices:\n"), "{listed}");
    let listed: serde_yaml::Value = serde_yaml::from_str(&listed).expect("list YAML");
    assert_eq!(listed["services"][0]["vip"], "10.96.0.20", "{listed:?}");
    succeeds(through_daemon(&node, &["health", "--pod", "shop/web-0"]));

    // A row shows three backends and how many more; -o wide all of them.
    let narrow = succeeds(through_daemon(&node, &["--sandbox", "a", "list"]));
    assert!(
        narrow.contains("10.244.2.3:8080 + 2 more") && !narrow.contains("10.244.2.5"),
        "{narrow}"
    );
    let wide = succeeds(through_daemon(
        &node,
        &["--sandbox", "a", "list", "-o", "wide"],
    ));
    assert!(
        big.iter().all(|ip| wide.contains(ip)) && !wide.contains("more"),
        "{wide}"
    );
    let stats = succeeds(through_daemon(
        &node,
        &["--sandbox", "a", "stats", "-o", "wide"],
    ));
    assert!(stats.contains("INSERT FAILURES"), "{stats}");

    fails_in_one_line(
        &through_daemon(&node, &["--pod", "shop/web-9", "stats"]),
        "pod shop/web-9 is not a Kata sandbox on node node-a",
    );
    fails_in_one_line(
        &through_daemon(&node, &["--sandbox", "b", "metrics"]),
        "node node-a has no Kata sandbox b",
    );
    fails_in_one_line(
        &through_daemon(&node, &["--sandbox", "remote", "health"]),
        "sandbox remote is a remote sandbox, not served from node node-a",
    );

    // node status --pod: its header and its one row; the agent at -o wide.
    let status = succeeds(through_daemon(
        &node,
        &["node", "status", "--pod", "shop/web-0"],
    ));
    let rows: Vec<&str> = status.lines().collect();
    assert_eq!(rows.len(), 2, "{status}");
    assert!(
        rows[0].starts_with("SANDBOX") && !rows[0].contains("AGENT"),
        "{status}"
    );
    assert!(
        rows[1].starts_with("a ") && rows[1].contains("shop/web-0"),
        "{status}"
    );
    let status = succeeds(through_daemon(
        &node,
        &["node", "status", "--sandbox", "a", "-o", "wide"],
    ));
    assert!(
        status.contains("AGENT") && status.contains(&uds.display().to_string()),
        "{status}"
    );
    let status = succeeds(through_daemon(
        &node,
        &["--pod", "shop/web-0", "node", "status", "-o", "yaml"],
    ));
    let status: serde_yaml::Value = serde_yaml::from_str(&status).expect("status YAML");
    let ids: Vec<&serde_yaml::Value> = status["sandboxes"]
        .as_sequence()
        .expect("sandboxes")
        .iter()
        .map(|row| &row["id"])
        .collect();
    assert_eq!(ids, ["a"], "{status:?}");
}

#[test]
fn discovery_follows_sandboxes_as_kata_names_them() {
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let mut node = Node::new();
    let expected = set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]);

    // A sandbox of each runtime's layout, one with its pod in the bundle.
    let (uds_a, url_a) = node.vsock("a");
    let agent_a = runtime.block_on(StandInAgent::start(&uds_a, DEFAULT_AGENT_PORT));
    let _shim_a = node.sandbox("vc-sbs", "a", &url_a);
    node.pod_bundle("a", "shop", "web-0");
    // Peer pods, and a shim that answers garbage.
    let _remote = node.sandbox("kata", "remote", "remote://10.0.0.9:15150");
    let _garbage = node.sandbox("kata", "garbage", "<html>oops</html>");
    node.start(&api, 3);
    converge(&node, "sandbox a synced", Duration::from_secs(20), || {
        lines(&agent_a) == expected
    });
    let a = node.row("a").expect("row a");
    assert_eq!(a["pod"], "shop/web-0", "{a}");
    assert_eq!(
        a["agent"],
        format!("hvsock://{}:{DEFAULT_AGENT_PORT}", uds_a.display())
    );
    let remote = node.row("remote").expect("row remote");
    assert_eq!(remote["state"], "skipped", "{remote}");
    let garbage = node.row("garbage").expect("row garbage");
    assert_eq!(garbage["state"], "resolving", "{garbage}");
    assert!(
        garbage["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("<html>oops</html>"),
        "{garbage}"
    );

    // A sandbox that appears later, its socket after its directory.
    let (uds_b, url_b) = node.vsock("b");
    let agent_b = runtime.block_on(StandInAgent::start(&uds_b, DEFAULT_AGENT_PORT));
    std::fs::create_dir(node.path("kata/b")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let shim_b = KataShim::start(&node.path("kata/b/shim-monitor.sock"), &url_b);
    converge(
        &node,
        "new sandbox b synced",
        Duration::from_secs(10),
        || lines(&agent_b) == expected,
    );

    // Sandbox a dies and comes back under the same id with an empty
    // table: it is resynced by itself, without any change to the cluster.
    runtime.block_on(agent_a.stop());
    let agent_a = runtime.block_on(StandInAgent::start(&uds_a, DEFAULT_AGENT_PORT));
    converge(
        &node,
        "restarted sandbox a resynced",
        Duration::from_secs(20),
        || lines(&agent_a) == expected,
    );

    // An agent whose table someone else changed gets the node's back.
    agent_b.tamper();
    converge(
        &node,
        "tampered sandbox b resynced",
        Duration::from_secs(20),
        || lines(&agent_b) == expected,
    );
    assert!(
        node.log()
            .contains("the agent holds another table than it acknowledged"),
        "{}",
        node.log()
    );
    // One rewritten with the same table (its generation moved, not its
    // digest) gets a whole Sync too: the node's next write would expect the
    // generation it acknowledged, and a late write looks the same.
    let syncs = agent_b.syncs();
    agent_b.rewrite();
    converge(
        &node,
        "rewritten sandbox b resynced",
        Duration::from_secs(20),
        || agent_b.syncs() > syncs,
    );

    // A sandbox directory removed is forgotten.
    drop(shim_b);
    std::fs::remove_dir_all(node.path("kata/b")).unwrap();
    converge(&node, "sandbox b forgotten", Duration::from_secs(5), || {
        node.row("b").is_none()
    });
    assert!(node.row("a").is_some());
}

/// A TCP forwarder to the API server that can be cut: every connection is
/// closed and new ones are refused, as when the API server is unreachable.
struct ApiLink {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl ApiLink {
    fn start(upstream: SocketAddr) -> ApiLink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the API link");
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (is_cut, streams) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if is_cut.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let mut streams = streams.lock().unwrap();
                streams.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        ApiLink { addr, cut, open }
    }

    /// A link to `api` and a kubeconfig in `node`'s directory that uses it.
    fn to(api: &FakeApiServer, node: &Node) -> (ApiLink, PathBuf) {
        let original = api.kubeconfig(node.dir.path());
        let link = ApiLink::start(api.addr());
        let kubeconfig = link.kubeconfig(&original, api.addr());
        (link, kubeconfig)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// New connections get through again.
    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// A kubeconfig like `original`'s, through this link.
    fn kubeconfig(&self, original: &Path, upstream: SocketAddr) -> PathBuf {
        let text = std::fs::read_to_string(original).unwrap();
        let path = original.with_file_name("kubeconfig-via-link");
        std::fs::write(
            &path,
            text.replace(&upstream.to_string(), &self.addr.to_string()),
        )
        .unwrap();
        path
    }
}

#[test]
fn without_the_api_server_agents_keep_and_new_sandboxes_get_the_last_table() {
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let mut node = Node::new();
    let expected = set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]);
    let (link, kubeconfig) = ApiLink::to(&api, &node);

    let (uds_a, url_a) = node.vsock("a");
    let agent_a = runtime.block_on(StandInAgent::start(&uds_a, DEFAULT_AGENT_PORT));
    let _shim_a = node.sandbox("vc-sbs", "a", &url_a);
    node.start_with(&kubeconfig, 3);
    converge(&node, "sandbox a synced", Duration::from_secs(20), || {
        lines(&agent_a) == expected
    });

    link.cut();
    // A change the daemon cannot see while the link is cut.
    api.apply(Kind::EndpointSlice, slice("web", &["10.244.1.9"]));
    converge(
        &node,
        "the watch noticed the API server is gone",
        Duration::from_secs(10),
        || node.log().contains("\"msg\":\"watching EndpointSlices\""),
    );
    let (uds_b, url_b) = node.vsock("b");
    let agent_b = runtime.block_on(StandInAgent::start(&uds_b, DEFAULT_AGENT_PORT));
    let _shim_b = node.sandbox("kata", "b", &url_b);
    converge(
        &node,
        "new sandbox b got the last table",
        Duration::from_secs(10),
        || lines(&agent_b) == expected,
    );
    assert_eq!(lines(&agent_a), expected, "sandbox a kept its table");
    // Still so after the watch kept failing through several retries and
    // digest checks (every 1 s here).
    std::thread::sleep(Duration::from_secs(3));
    for (id, agent) in [("a", &agent_a), ("b", &agent_b)] {
        assert_eq!(
            lines(agent),
            expected,
            "sandbox {id} after 3 s without the API server"
        );
    }

    // Back: the change made meanwhile reaches both.
    link.restore();
    let changed = set(&["10.96.0.20:80/TCP -> [10.244.1.9:8080]"]);
    converge(
        &node,
        "both got the change",
        Duration::from_secs(30),
        || lines(&agent_a) == changed && lines(&agent_b) == changed,
    );
}

/// `/healthz` answers 503 until the daemon has a table, and again once
/// its watch has kept failing past `--watch-stale-secs`; `/livez` stays ok.
#[test]
fn healthz_fails_without_a_table_and_while_the_watch_stays_broken() {
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = web_api();
    let mut node = Node::new();
    let (link, kubeconfig) = ApiLink::to(&api, &node);
    link.cut();
    node.args = ["--watch-stale-secs", "2"].map(String::from).to_vec();
    node.start_with(&kubeconfig, 3);
    let healthz = |status: &str, words: &str| {
        let answer = node.http("/healthz");
        answer.starts_with(&format!("HTTP/1.1 {status}")) && answer.contains(words)
    };
    let live = || node.http("/livez").starts_with("HTTP/1.1 200");
    converge(
        &node,
        "unhealthy without a table",
        Duration::from_secs(10),
        || healthz("503", "no table yet"),
    );
    assert!(live(), "{}", node.http("/livez"));

    link.restore();
    converge(
        &node,
        "healthy with a table",
        Duration::from_secs(30),
        || healthz("200", "ok"),
    );

    link.cut();
    converge(
        &node,
        "unhealthy with the watch broken for 2 s",
        Duration::from_secs(20),
        || healthz("503", "the Kubernetes watch has been failing for"),
    );
    assert!(live(), "{}", node.http("/livez"));
}

/// The daemon as a DaemonSet runs it (see `Node::start_in_cluster`):
/// kube-rs's in-cluster configuration, TLS verified against the service
/// account's CA, its token on every request. With another token the API
/// server answers 401 and the sandbox gets no table; with the service
/// account's, the sandbox gets it and nothing is refused.
#[test]
fn in_cluster_the_service_accounts_ca_and_token_reach_the_api_server() {
    socklb_tests::require_root!();
    let runtime = runtime();
    let _entered = runtime.enter();
    let secrets = Path::new("/var/run/secrets/kubernetes.io");
    let there_before = secrets.exists();
    {
        let api = web_api();
        let mut node = Node::new();
        let (agent, _shim) = node.stand_in_sandbox(&runtime, "kata", "a");
        node.start_in_cluster(&api, "not-the-service-accounts-token", 3);
        // The daemon's retries are refused as well, and no table comes.
        converge(
            &node,
            "another token refused 401, and refused again",
            Duration::from_secs(20),
            || api.unauthorized() >= 2,
        );
        assert_eq!(
            (agent.syncs(), lines(&agent)),
            (0, BTreeSet::new()),
            "a table without the token; daemon log:\n{}",
            node.log()
        );
    }
    // Another server: nothing the stopped daemon sent is counted here.
    let api = web_api();
    let mut node = Node::new();
    let (agent, _shim) = node.stand_in_sandbox(&runtime, "kata", "a");
    node.start_in_cluster(&api, api.token(), 3);
    let expected = set(&["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]);
    converge(
        &node,
        "the table through the in-cluster configuration",
        Duration::from_secs(20),
        || lines(&agent) == expected,
    );
    assert_eq!(
        api.unauthorized(),
        0,
        "requests refused with the service account's token"
    );
    assert_eq!(
        secrets.exists(),
        there_before,
        "the service account's files left the daemon's mount namespace"
    );
}

/// Where a sandbox's hybrid vsock socket is for Kata: a link to the socket
/// of the VM that runs the sandbox now, so a VM booted again under the same
/// sandbox id is found at the same path, as with Kata.
fn link_vsock(link: &Path, vm: &Vm) {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&vm.uds, link).expect("link the VM's vsock socket");
}

/// Whether a workload in `vm` reaches `vip` through socklb: backends of
/// the Service answer.
fn reaches(vm: &Vm, vip: &str) -> bool {
    let results = vm.testkit(&["tcp", vip, "--count", "4"]);
    // The guest's backends on 10.244.1.1 and .2 answer with their ids.
    !results.is_empty()
        && results.iter().all(|r| {
            r.get("error").is_none()
                && ["b1", "b2"].contains(&r["backend"].as_str().unwrap_or_default())
        })
}

#[test]
#[ignore = "boots two VMs: needs the guest image (cargo xtask test builds it and runs this)"]
fn two_sandbox_vms_found_served_resynced_and_forgotten() {
    socklb_tests::require_root!();
    let image = GuestImage::from_env("OWN");
    let runtime = runtime();
    let _entered = runtime.enter();
    let api = FakeApiServer::start();
    // Not in the guest image's own table: only the daemon can program it.
    let vip = "10.96.0.30:80";
    api.apply(Kind::Service, service("web", "10.96.0.30"));
    api.apply(
        Kind::EndpointSlice,
        slice("web", &["10.244.1.1", "10.244.1.2"]),
    );
    let mut node = Node::new();
    let mut vms = Vec::new();
    let mut shims = Vec::new();
    for id in ["vm-a", "vm-b"] {
        let vm = Vm::boot(&image, "");
        let (link, url) = node.vsock(id);
        link_vsock(&link, &vm);
        shims.push(node.sandbox("kata", id, &url));
        vms.push(vm);
    }
    node.start(&api, 30);
    for (vm, id) in vms.iter().zip(["vm-a", "vm-b"]) {
        converge(
            &node,
            &format!("a workload in {id} reaches the Service"),
            Duration::from_secs(60),
            || reaches(vm, vip),
        );
    }

    // vm-a dies and boots again under the same sandbox id: the daemon
    // resyncs it by itself.
    drop(vms.remove(0));
    let vm_a = Vm::boot(&image, "");
    link_vsock(&node.vsock("vm-a").0, &vm_a);
    converge(
        &node,
        "the rebooted vm-a reaches the Service",
        Duration::from_secs(60),
        || reaches(&vm_a, vip),
    );

    // vm-b's sandbox directory goes: it is forgotten.
    std::fs::remove_dir_all(node.path("kata/vm-b")).unwrap();
    converge(&node, "vm-b forgotten", Duration::from_secs(10), || {
        node.row("vm-b").is_none()
    });
    assert_eq!(node.row("vm-a").expect("vm-a")["state"], "in_sync");
}
