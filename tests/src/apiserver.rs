//! A fake Kubernetes API server for Services, EndpointSlices and Nodes that speaks
//! the list + watch protocol kube-rs uses: lists carry a resourceVersion,
//! watches stream chunked JSON events after a given resourceVersion,
//! bookmarks, and a watch from a compacted resourceVersion gets a 410
//! "Expired" error (the client then lists again). Tests change objects,
//! send bookmarks, drop every open watch, and compact history.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    /// Cluster-scoped: give it no namespace. Field selectors are ignored
    /// (every Node is listed).
    Node,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Node => "v1",
        }
    }
}

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// (resourceVersion, kind, event type, object)
    events: Vec<(u64, Kind, &'static str, Value)>,
    /// A watch from below this resourceVersion gets 410 Expired.
    compacted_below: u64,
    /// Bumped to end every open watch.
    watch_epoch: u64,
    lists: BTreeMap<Kind, usize>,
    watches: BTreeMap<Kind, usize>,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl FakeApiServer {
    /// Listens on a loopback port of this machine (the client is the host
    /// shim; nothing leaves the machine).
    pub fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake API server");
        let addr = listener.local_addr().expect("address");
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve_connection(stream, &state));
            }
        });
        FakeApiServer { addr, state }
    }

    /// Writes a kubeconfig for this server into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: 'http://{}'}}}}]
users: [{{name: fake, user: {{}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]
current-context: fake
",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces an object (its metadata has namespace and name).
    pub fn apply(&self, kind: Kind, mut object: Value) {
        self.change(|state| {
            state.resource_version += 1;
            let rv = state.resource_version;
            object["kind"] = json!(kind.name());
            object["apiVersion"] = json!(kind.api_version());
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let key = (kind, meta(&object, "namespace"), meta(&object, "name"));
            let event = if state.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            state.objects.insert(key, object.clone());
            state.events.push((rv, kind, event, object));
        });
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        self.change(|state| {
            let key = (kind, namespace.to_string(), name.to_string());
            let Some(mut object) = state.objects.remove(&key) else {
                return;
            };
            state.resource_version += 1;
            let rv = state.resource_version;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            state.events.push((rv, kind, "DELETED", object));
        });
    }

    /// A bookmark on every open watch: the current resourceVersion, no change.
    pub fn bookmark(&self) {
        self.change(|state| {
            let rv = state.resource_version;
            for kind in [Kind::Service, Kind::EndpointSlice] {
                let object = json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                                    "metadata": {"resourceVersion": rv.to_string()}});
                state.events.push((rv, kind, "BOOKMARK", object));
            }
        });
    }

    /// Ends every open watch; clients watch again from where they were.
    pub fn drop_watches(&self) {
        self.change(|state| state.watch_epoch += 1);
    }

    /// Forgets history: a watch from an older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        self.change(|state| state.compacted_below = state.resource_version + 1);
    }

    /// How many lists of `kind` were served.
    pub fn lists(&self, kind: Kind) -> usize {
        self.state
            .0
            .lock()
            .unwrap()
            .lists
            .get(&kind)
            .copied()
            .unwrap_or(0)
    }

    /// How many watches of `kind` were opened.
    pub fn watches(&self, kind: Kind) -> usize {
        self.state
            .0
            .lock()
            .unwrap()
            .watches
            .get(&kind)
            .copied()
            .unwrap_or(0)
    }

    fn change(&self, change: impl FnOnce(&mut State)) {
        let (lock, wake) = &*self.state;
        change(&mut lock.lock().unwrap());
        wake.notify_all();
    }
}

fn meta(object: &Value, field: &str) -> String {
    object["metadata"][field]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn serve_connection(stream: TcpStream, state: &(Mutex<State>, Condvar)) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Headers (the fake needs none of them).
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<&str, &str> =
            query.split('&').filter_map(|p| p.split_once('=')).collect();
        let Some(kind) = [Kind::Service, Kind::EndpointSlice, Kind::Node]
            .into_iter()
            .find(|k| k.path() == path)
        else {
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
            continue;
        };
        if matches!(params.get("watch"), Some(&"true" | &"1")) {
            let from: u64 = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = params
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290);
            *state.0.lock().unwrap().watches.entry(kind).or_default() += 1;
            serve_watch(&mut stream, state, kind, from, Duration::from_secs(timeout));
            return;
        }
        let body = {
            let mut guard = state.0.lock().unwrap();
            *guard.lists.entry(kind).or_default() += 1;
            let items: Vec<&Value> = guard
                .objects
                .iter()
                .filter(|((k, _, _), _)| *k == kind)
                .map(|(_, o)| o)
                .collect();
            json!({
                "kind": format!("{}List", kind.name()),
                "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": guard.resource_version.to_string()},
                "items": items,
            })
            .to_string()
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes()))
            .is_err()
        {
            return;
        }
    }
}

fn serve_watch(
    stream: &mut TcpStream,
    state: &(Mutex<State>, Condvar),
    kind: Kind,
    from: u64,
    timeout: Duration,
) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = |stream: &mut TcpStream, event: Value| {
        let line = format!("{event}\n");
        stream.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
    };
    let (lock, wake) = state;
    let mut guard = lock.lock().unwrap();
    if from < guard.compacted_below {
        drop(guard);
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("too old resource version: {from}"),
            "reason": "Expired", "code": 410}});
        let _ = chunk(stream, gone).and_then(|()| stream.write_all(b"0\r\n\r\n"));
        return;
    }
    let epoch = guard.watch_epoch;
    let deadline = Instant::now() + timeout;
    let mut sent = guard
        .events
        .iter()
        .take_while(|(rv, ..)| *rv <= from)
        .count();
    loop {
        // A dropped watch sends nothing more, not even what is pending.
        if guard.watch_epoch != epoch {
            drop(guard);
            let _ = stream.write_all(b"0\r\n\r\n");
            return;
        }
        let pending: Vec<Value> = guard.events[sent..]
            .iter()
            .filter(|(_, k, ..)| *k == kind)
            .map(|(_, _, kind, object)| json!({"type": kind, "object": object}))
            .collect();
        sent = guard.events.len();
        if !pending.is_empty() {
            drop(guard);
            for event in pending {
                if chunk(stream, event).is_err() {
                    return;
                }
            }
            guard = lock.lock().unwrap();
            continue;
        }
        if Instant::now() >= deadline {
            drop(guard);
            let _ = stream.write_all(b"0\r\n\r\n");
            return;
        }
        guard = wake
            .wait_timeout(guard, Duration::from_millis(200))
            .unwrap()
            .0;
    }
}
