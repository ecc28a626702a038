//! A stand-in Kubernetes API server for Services, EndpointSlices and Nodes
//! that behaves like kube-apiserver where socklb-shim depends on it:
//!
//! - lists are paged: `limit` items per page (kube-rs and client-go ask for
//!   500) with a `continue` token; every page of one list is served from the
//!   snapshot the first page took, and a token older than the compaction
//!   point gets 410 Expired, as etcd's are;
//! - watches stream chunked JSON events after a resourceVersion; a watch
//!   from a version older than the compaction point gets 410 Expired, and an
//!   open watch that lagged behind a compaction gets an ERROR event with
//!   status 410 mid-stream (the client then lists again); a watch without a
//!   resourceVersion, or from "0", first gets a synthetic ADDED event for
//!   every object there is, as kube-apiserver sends the state it starts
//!   from;
//! - watches that ask for bookmarks get one every [`BOOKMARK_INTERVAL`],
//!   and only they get one;
//! - field selectors on `metadata.name` and `metadata.namespace` (`=`,
//!   `==`, `!=`, joined by commas) filter lists and watches; another field
//!   is refused with 400, as kube-apiserver refuses a field it does not
//!   index, and so is any label selector, which this stand-in does not
//!   evaluate (a client relying on one fails here instead of being sent
//!   everything);
//! - 429 (with Retry-After), 5xx and 403 answers on demand;
//! - objects come back as the API server stores them: Services with their
//!   defaulted fields (`type`, `clusterIPs`, `ipFamilies`, `ipFamilyPolicy`,
//!   `sessionAffinity`, `internalTrafficPolicy`, port protocols and target
//!   ports, node ports), metadata with uid, creationTimestamp and
//!   managedFields;
//! - only TLS, with a server certificate for IP 127.0.0.1 signed by a CA
//!   made at each start (no key material is kept anywhere), and every
//!   request authenticated as a service account's is: without
//!   `Authorization: Bearer` and this server's token it is answered 401
//!   with the Status kube-apiserver sends, whatever it asked, and counted
//!   ([`FakeApiServer::unauthorized`]). [`FakeApiServer::kubeconfig`]
//!   names the CA and the token; a test of the in-cluster path puts
//!   [`FakeApiServer::ca_pem`] and [`FakeApiServer::token`] where a pod
//!   has them.
//!
//! Tests change objects, send bookmarks, drop every open watch, make watches
//! lag, compact history, and expire a list's continue token.

use std::{
    collections::BTreeMap,
    hash::{BuildHasher as _, RandomState},
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;
use rustls::{
    ServerConfig, ServerConnection, StreamOwned,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
};
use serde_json::{Value, json};

/// How often an open watch that asked for bookmarks gets one (a real API
/// server sends them about once a minute; tests want to see several).
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    /// Cluster-scoped: give it no namespace.
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

/// The rest of a paged list, kept for its `continue` token.
struct Snapshot {
    resource_version: u64,
    items: Vec<Value>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// (resourceVersion, kind, event type, object)
    events: Vec<(u64, Kind, &'static str, Value)>,
    /// History before this resourceVersion is forgotten: a watch or a
    /// continue token from an older one gets 410 Expired.
    compacted_below: u64,
    /// Bumped to end every open watch.
    watch_epoch: u64,
    /// While set, open watches send nothing (a lagging watch cache).
    watches_paused: bool,
    /// Answers (status code, how many more) for the next requests.
    failing: Option<(u16, usize)>,
    /// The next continue token is answered 410, as one whose list was
    /// compacted away meanwhile.
    expire_next_continue: bool,
    failures_served: usize,
    snapshots: BTreeMap<u64, Snapshot>,
    next_snapshot: u64,
    next_uid: u64,
    lists: BTreeMap<Kind, usize>,
    list_pages: BTreeMap<Kind, usize>,
    /// Lists whose continue token got 410 Expired.
    lists_cut_short: BTreeMap<Kind, usize>,
    watches: BTreeMap<Kind, usize>,
    bookmarks_sent: BTreeMap<Kind, usize>,
    expired: usize,
    /// Requests answered 401: no token, or another one.
    unauthorized: usize,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    /// The PEM of the CA that signed the server's certificate.
    ca_pem: String,
    token: String,
}

/// A client's connection: TLS over the accepted socket.
type Stream = StreamOwned<ServerConnection, TcpStream>;

impl FakeApiServer {
    /// Listens on a loopback port of this machine (the client is the host
    /// shim; nothing leaves the machine).
    pub fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake API server");
        let addr = listener.local_addr().expect("address");
        let (ca_pem, tls) = certificates();
        // 128 random bits, as a service account's token is unguessable.
        let random = RandomState::new();
        let token = format!("{:016x}{:016x}", random.hash_one(1), random.hash_one(2));
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let shared = state.clone();
        let expected = token.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (state, tls, token) = (shared.clone(), tls.clone(), expected.clone());
                std::thread::spawn(move || serve_tls(stream, tls, &token, &state));
            }
        });
        FakeApiServer {
            addr,
            state,
            ca_pem,
            token,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA a client verifies this server's certificate against (PEM), as
    /// a pod's `ca.crt`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The bearer token this server accepts, as a pod's service account
    /// token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Writes a kubeconfig for this server into `dir`: its https address,
    /// its CA and its token.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: 'https://{}', certificate-authority-data: '{ca}'}}}}]
users: [{{name: fake, user: {{token: '{}'}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]
current-context: fake
",
            self.addr, self.token
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces an object (its metadata has namespace and name),
    /// with the fields the API server defaults filled in.
    pub fn apply(&self, kind: Kind, mut object: Value) {
        self.change(|state| {
            state.resource_version += 1;
            let rv = state.resource_version;
            object["kind"] = json!(kind.name());
            object["apiVersion"] = json!(kind.api_version());
            let key = (kind, meta(&object, "namespace"), meta(&object, "name"));
            let previous = state.objects.get(&key);
            let uid = match previous {
                Some(previous) => previous["metadata"]["uid"].clone(),
                None => {
                    state.next_uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012}", state.next_uid))
                }
            };
            let event = if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            default_metadata(&mut object, uid, rv);
            if kind == Kind::Service {
                default_service(&mut object, state.next_uid);
            }
            if kind == Kind::EndpointSlice {
                default_slice(&mut object);
            }
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

    /// A bookmark on every open watch that asked for bookmarks, now: the
    /// current resourceVersion, no change.
    pub fn bookmark(&self) {
        self.change(|state| {
            let rv = state.resource_version;
            for kind in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
                state
                    .events
                    .push((rv, kind, "BOOKMARK", bookmark(kind, rv)));
            }
        });
    }

    /// Ends every open watch; clients watch again from where they were.
    pub fn drop_watches(&self) {
        self.change(|state| state.watch_epoch += 1);
    }

    /// Open watches send nothing until [`FakeApiServer::resume_watches`], as
    /// when the API server's watch cache lags: changes made meanwhile and
    /// then compacted reach the client as a 410 mid-stream.
    pub fn pause_watches(&self) {
        self.change(|state| state.watches_paused = true);
    }

    pub fn resume_watches(&self) {
        self.change(|state| state.watches_paused = false);
    }

    /// Forgets history before the current resourceVersion: a watch from an
    /// older version, an open watch still behind it, and a continue token
    /// of an older list get 410 Expired. A watch from the current version
    /// goes on.
    pub fn compact(&self) {
        self.change(|state| {
            state.compacted_below = state.resource_version;
            let compacted_below = state.compacted_below;
            state
                .snapshots
                .retain(|_, snapshot| snapshot.resource_version >= compacted_below);
        });
    }

    /// The next page asked for with a continue token gets 410 Expired, as
    /// when etcd compacts away the list's revision between two pages.
    pub fn expire_next_continue(&self) {
        self.change(|state| state.expire_next_continue = true);
    }

    /// The next `count` requests (lists and watches, any kind) are answered
    /// with `code` (429 with Retry-After: 1, 5xx, 403 ...).
    pub fn fail_requests(&self, code: u16, count: usize) {
        self.change(|state| state.failing = Some((code, count)));
    }

    /// How many requests were answered with an error on demand.
    pub fn failures_served(&self) -> usize {
        self.state.0.lock().unwrap().failures_served
    }

    /// How many lists of `kind` were started (first pages served).
    pub fn lists(&self, kind: Kind) -> usize {
        count(&self.state.0.lock().unwrap().lists, kind)
    }

    /// How many pages of lists of `kind` were served.
    pub fn list_pages(&self, kind: Kind) -> usize {
        count(&self.state.0.lock().unwrap().list_pages, kind)
    }

    /// How many lists of `kind` had a continue token refused 410 Expired.
    pub fn lists_cut_short(&self, kind: Kind) -> usize {
        count(&self.state.0.lock().unwrap().lists_cut_short, kind)
    }

    /// How many watches of `kind` were opened.
    pub fn watches(&self, kind: Kind) -> usize {
        count(&self.state.0.lock().unwrap().watches, kind)
    }

    /// How many bookmarks watches of `kind` were sent.
    pub fn bookmarks_sent(&self, kind: Kind) -> usize {
        count(&self.state.0.lock().unwrap().bookmarks_sent, kind)
    }

    /// How many 410 Expired answers were sent (watch starts, mid-stream
    /// errors and continue tokens).
    pub fn expired(&self) -> usize {
        self.state.0.lock().unwrap().expired
    }

    /// How many requests were answered 401 Unauthorized: without a bearer
    /// token, or with another than [`FakeApiServer::token`].
    pub fn unauthorized(&self) -> usize {
        self.state.0.lock().unwrap().unauthorized
    }

    fn change(&self, change: impl FnOnce(&mut State)) {
        let (lock, wake) = &*self.state;
        change(&mut lock.lock().unwrap());
        wake.notify_all();
    }
}

/// A test CA, made now, and the server's TLS configuration: a certificate
/// for IP 127.0.0.1 that CA signed. Returns the CA's PEM.
fn certificates() -> (String, Arc<ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().expect("a CA key");
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "socklb test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).expect("the CA certificate").pem();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);

    let server_key = rcgen::KeyPair::generate().expect("a server key");
    let mut server =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("an IP SAN");
    server
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    server.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let certificate = server
        .signed_by(&server_key, &issuer)
        .expect("the server certificate");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![certificate.der().clone()], key)
        .expect("the server's TLS configuration");
    (ca_pem, Arc::new(config))
}

fn count(counts: &BTreeMap<Kind, usize>, kind: Kind) -> usize {
    counts.get(&kind).copied().unwrap_or(0)
}

fn meta(object: &Value, field: &str) -> String {
    object["metadata"][field]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn bookmark(kind: Kind, rv: u64) -> Value {
    json!({"kind": kind.name(), "apiVersion": kind.api_version(),
           "metadata": {"resourceVersion": rv.to_string()}})
}

/// What the API server adds to every object's metadata.
fn default_metadata(object: &mut Value, uid: Value, rv: u64) {
    let metadata = &mut object["metadata"];
    metadata["uid"] = uid;
    metadata["resourceVersion"] = json!(rv.to_string());
    metadata["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    if metadata.get("generation").is_none() {
        metadata["generation"] = json!(1);
    }
    metadata["managedFields"] = json!([{
        "manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
        "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {}}
    }]);
}

/// The Service defaulting of kube-apiserver (pkg/apis/core/v1/defaults.go
/// and the ClusterIP/NodePort allocators): `seq` picks the addresses and
/// node ports it would allocate.
fn default_service(service: &mut Value, seq: u64) {
    let spec = &mut service["spec"];
    let kind = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    spec["type"] = json!(kind);
    if spec.get("sessionAffinity").is_none() {
        spec["sessionAffinity"] = json!("None");
    }
    if spec["sessionAffinity"] == "ClientIP" && spec.get("sessionAffinityConfig").is_none() {
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 10800}});
    }
    if let Some(ports) = spec["ports"].as_array_mut() {
        for (i, port) in ports.iter_mut().enumerate() {
            if port.get("protocol").is_none() {
                port["protocol"] = json!("TCP");
            }
            if port.get("targetPort").is_none() {
                port["targetPort"] = port["port"].clone();
            }
            if matches!(kind.as_str(), "NodePort" | "LoadBalancer")
                && port.get("nodePort").is_none()
            {
                port["nodePort"] = json!(30000 + (seq * 8 + i as u64) % 2768);
            }
        }
    }
    if kind == "ExternalName" {
        return;
    }
    if spec.get("clusterIP").is_none() {
        match spec["clusterIPs"].get(0) {
            Some(first) => spec["clusterIP"] = first.clone(),
            None => {
                spec["clusterIP"] =
                    json!(format!("10.96.{}.{}", 128 + seq / 250 % 128, seq % 250 + 1))
            }
        }
    }
    if spec.get("clusterIPs").is_none() {
        spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
    }
    let families: Vec<&str> = spec["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(
            |ip| match ip.as_str().and_then(|ip| ip.parse::<IpAddr>().ok()) {
                Some(IpAddr::V6(_)) => "IPv6",
                // Headless ("None") gets the cluster's primary family.
                _ => "IPv4",
            },
        )
        .collect();
    if spec.get("ipFamilies").is_none() {
        spec["ipFamilies"] = json!(families);
    }
    if spec.get("ipFamilyPolicy").is_none() {
        spec["ipFamilyPolicy"] = json!(if families.len() > 1 {
            "PreferDualStack"
        } else {
            "SingleStack"
        });
    }
    if spec.get("internalTrafficPolicy").is_none() {
        spec["internalTrafficPolicy"] = json!("Cluster");
    }
    if matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
        if spec.get("externalTrafficPolicy").is_none() {
            spec["externalTrafficPolicy"] = json!("Cluster");
        }
        if kind == "LoadBalancer" && spec.get("allocateLoadBalancerNodePorts").is_none() {
            spec["allocateLoadBalancerNodePorts"] = json!(true);
        }
    }
    if service.get("status").is_none() {
        service["status"] = json!({"loadBalancer": {}});
    }
}

fn default_slice(slice: &mut Value) {
    if let Some(ports) = slice["ports"].as_array_mut() {
        for port in ports {
            if port.get("protocol").is_none() {
                port["protocol"] = json!("TCP");
            }
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn reason_of(code: u16) -> &'static str {
    match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn respond(stream: &mut Stream, code: u16, extra_headers: &str, body: &str) -> bool {
    let head = format!(
        "HTTP/1.1 {code} {}\r\ncontent-type: application/json\r\n{extra_headers}content-length: {}\r\n\r\n",
        reason_of(code),
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .is_ok()
}

/// Serves one client over TLS (the handshake happens on the first read),
/// and closes as a TLS server does, with close_notify.
fn serve_tls(
    socket: TcpStream,
    tls: Arc<ServerConfig>,
    token: &str,
    state: &(Mutex<State>, Condvar),
) {
    let Ok(connection) = ServerConnection::new(tls) else {
        return;
    };
    let mut reader = BufReader::new(StreamOwned::new(connection, socket));
    serve_connection(&mut reader, token, state);
    let stream = reader.get_mut();
    stream.conn.send_close_notify();
    let _ = stream.flush();
}

fn serve_connection(reader: &mut BufReader<Stream>, token: &str, state: &(Mutex<State>, Condvar)) {
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Of the headers, the fake reads only the credentials.
        let mut authorized = false;
        loop {
            let mut header = String::new();
            // A request cut off in its head is no request: nothing to count.
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("authorization")
            {
                authorized = value.trim().strip_prefix("Bearer ") == Some(token);
            }
        }
        // Reads are done with: the rest of this request only writes.
        let stream = reader.get_mut();
        // As kube-apiserver, authentication first, whatever the path.
        if !authorized {
            state.0.lock().unwrap().unauthorized += 1;
            let body = status(401, "Unauthorized", "Unauthorized").to_string();
            if !respond(stream, 401, "", &body) {
                return;
            }
            continue;
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
        let selector = match FieldSelector::of(&params) {
            Ok(selector) => selector,
            Err(message) => {
                let body = status(400, "BadRequest", &message).to_string();
                if !respond(stream, 400, "", &body) {
                    return;
                }
                continue;
            }
        };
        if let Some(code) = take_failure(state) {
            let retry_after = if code == 429 {
                "retry-after: 1\r\n"
            } else {
                ""
            };
            let body = status(code, reason_of(code), "failing on demand").to_string();
            if !respond(stream, code, retry_after, &body) {
                return;
            }
            continue;
        }
        if matches!(params.get("watch"), Some(&"true" | &"1")) {
            let from: Option<u64> = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .filter(|rv| *rv != 0);
            let timeout = params
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290);
            let bookmarks = matches!(params.get("allowWatchBookmarks"), Some(&"true" | &"1"));
            *state.0.lock().unwrap().watches.entry(kind).or_default() += 1;
            let watch = Watch {
                kind,
                from,
                timeout: Duration::from_secs(timeout),
                bookmarks,
                selector,
            };
            serve_watch(stream, state, &watch);
            return;
        }
        let limit: usize = params
            .get("limit")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (code, body) = list_page(
            state,
            kind,
            &selector,
            params.get("continue").copied(),
            limit,
        );
        if !respond(stream, code, "", &body.to_string()) {
            return;
        }
    }
}

fn take_failure(state: &(Mutex<State>, Condvar)) -> Option<u16> {
    let mut guard = state.0.lock().unwrap();
    let (code, left) = guard.failing.as_mut()?;
    let code = *code;
    *left -= 1;
    if *left == 0 {
        guard.failing = None;
    }
    guard.failures_served += 1;
    Some(code)
}

/// One page of a list: the first from the current objects, the rest from
/// that first page's snapshot.
fn list_page(
    state: &(Mutex<State>, Condvar),
    kind: Kind,
    selector: &FieldSelector,
    continue_token: Option<&str>,
    limit: usize,
) -> (u16, Value) {
    let mut guard = state.0.lock().unwrap();
    let (resource_version, mut items) = match continue_token {
        None => {
            *guard.lists.entry(kind).or_default() += 1;
            let items: Vec<Value> = guard
                .objects
                .iter()
                .filter(|((k, _, _), o)| *k == kind && selector.matches(o))
                .map(|(_, o)| o.clone())
                .collect();
            (guard.resource_version, items)
        }
        Some(token) => {
            let expire = std::mem::take(&mut guard.expire_next_continue);
            let snapshot = token
                .parse()
                .ok()
                .and_then(|id: u64| guard.snapshots.remove(&id))
                .filter(|_| !expire);
            match snapshot {
                Some(snapshot) => (snapshot.resource_version, snapshot.items),
                None => {
                    guard.expired += 1;
                    *guard.lists_cut_short.entry(kind).or_default() += 1;
                    let message = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.";
                    return (410, status(410, "Expired", message));
                }
            }
        }
    };
    *guard.list_pages.entry(kind).or_default() += 1;
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if limit > 0 && items.len() > limit {
        let rest = items.split_off(limit);
        guard.next_snapshot += 1;
        let id = guard.next_snapshot;
        metadata["continue"] = json!(id.to_string());
        metadata["remainingItemCount"] = json!(rest.len());
        guard.snapshots.insert(
            id,
            Snapshot {
                resource_version,
                items: rest,
            },
        );
    }
    let list = json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    });
    (200, list)
}

struct Watch {
    kind: Kind,
    /// Events after this resourceVersion; `None` (none given, or "0"):
    /// every object as ADDED, then events from now.
    from: Option<u64>,
    timeout: Duration,
    bookmarks: bool,
    selector: FieldSelector,
}

/// A `fieldSelector` on the fields every kind indexes: (field, equal,
/// value) terms, all of which must hold.
#[derive(Default)]
struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// A request's field selector; a label selector is refused.
    fn of(params: &BTreeMap<&str, &str>) -> Result<FieldSelector, String> {
        if let Some(labels) = params.get("labelSelector").filter(|l| !l.is_empty()) {
            return Err(format!(
                "label selector {:?}: this stand-in does not evaluate label selectors",
                percent_decoded(labels)
            ));
        }
        let Some(text) = params
            .get("fieldSelector")
            .map(|text| percent_decoded(text))
            .filter(|text| !text.is_empty())
        else {
            return Ok(FieldSelector::default());
        };
        let terms = text.split(',').map(|term| {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!(
                    "field selector term {term:?}: expected FIELD=VALUE"
                ));
            };
            match field {
                "metadata.name" | "metadata.namespace" => {
                    Ok((field.to_string(), equal, value.to_string()))
                }
                _ => Err(format!(
                    "field label not supported: {field} (field selector {text:?})"
                )),
            }
        });
        terms.collect::<Result<_, _>>().map(FieldSelector)
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let field = field.strip_prefix("metadata.").unwrap_or(field);
            (meta(object, field) == *value) == *equal
        })
    }
}

/// A query parameter's value with its %XX escapes decoded.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_watch(stream: &mut Stream, state: &(Mutex<State>, Condvar), watch: &Watch) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = |stream: &mut Stream, event: Value| {
        let line = format!("{event}\n");
        stream.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
    };
    let gone = |stream: &mut Stream, rv: u64| {
        let message = format!("too old resource version: {rv}");
        let error = json!({"type": "ERROR", "object": status(410, "Expired", &message)});
        let _ = chunk(stream, error).and_then(|()| stream.write_all(b"0\r\n\r\n"));
    };
    let (lock, wake) = state;
    let mut guard = lock.lock().unwrap();
    let (from, initial) = match watch.from {
        Some(from) => (from, vec![]),
        None => {
            let objects = guard
                .objects
                .iter()
                .filter(|((kind, ..), object)| {
                    *kind == watch.kind && watch.selector.matches(object)
                })
                .map(|(_, object)| json!({"type": "ADDED", "object": object}))
                .collect();
            (guard.resource_version, objects)
        }
    };
    if from < guard.compacted_below {
        guard.expired += 1;
        drop(guard);
        gone(stream, from);
        return;
    }
    let epoch = guard.watch_epoch;
    let deadline = Instant::now() + watch.timeout;
    // Events are appended in resourceVersion order: `sent` indexes the first
    // not yet considered, `position` is the version this watch is at.
    let mut sent = guard.events.partition_point(|(rv, ..)| *rv <= from);
    let mut position = from;
    let mut last_bookmark = Instant::now();
    if !initial.is_empty() {
        drop(guard);
        for event in initial {
            if chunk(stream, event).is_err() {
                return;
            }
        }
        guard = lock.lock().unwrap();
    }
    loop {
        // A dropped watch sends nothing more, not even what is pending.
        if guard.watch_epoch != epoch {
            drop(guard);
            let _ = stream.write_all(b"0\r\n\r\n");
            return;
        }
        if !guard.watches_paused {
            if position < guard.compacted_below {
                guard.expired += 1;
                drop(guard);
                gone(stream, position);
                return;
            }
            let mut pending: Vec<Value> = guard.events[sent..]
                .iter()
                .filter(|(_, k, event, object)| {
                    *k == watch.kind
                        && if *event == "BOOKMARK" {
                            watch.bookmarks
                        } else {
                            watch.selector.matches(object)
                        }
                })
                .map(|(_, _, kind, object)| json!({"type": kind, "object": object}))
                .collect();
            sent = guard.events.len();
            position = guard.resource_version;
            if watch.bookmarks && pending.is_empty() && last_bookmark.elapsed() >= BOOKMARK_INTERVAL
            {
                last_bookmark = Instant::now();
                pending.push(json!({"type": "BOOKMARK", "object": bookmark(watch.kind, position)}));
            }
            if !pending.is_empty() {
                let bookmarks = pending.iter().filter(|e| e["type"] == "BOOKMARK").count();
                *guard.bookmarks_sent.entry(watch.kind).or_default() += bookmarks;
                drop(guard);
                for event in pending {
                    if chunk(stream, event).is_err() {
                        return;
                    }
                }
                guard = lock.lock().unwrap();
                continue;
            }
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

#[cfg(test)]
mod tests {
    use rustls::{
        ClientConfig, ClientConnection, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    };

    use super::*;

    /// The events of a Node watch with `query`, as they come, read as a
    /// client that trusts this server's CA and sends its token.
    fn node_watch(server: &FakeApiServer, query: &str) -> impl Iterator<Item = String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(server.ca_pem().as_bytes()).unwrap())
            .unwrap();
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let tcp = TcpStream::connect(server.addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut stream =
            StreamOwned::new(ClientConnection::new(Arc::new(config), name).unwrap(), tcp);
        write!(
            stream,
            "GET {}?watch=true{query} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {}\r\n\r\n",
            Kind::Node.path(),
            server.token()
        )
        .unwrap();
        let mut lines = BufReader::new(stream).lines().map(|line| line.unwrap());
        // The head, then one event per chunk: its size, the event, its end.
        assert!(lines.next().unwrap().contains(" 200 "));
        lines
            .by_ref()
            .take_while(|line| !line.is_empty())
            .for_each(drop);
        std::iter::from_fn(move || {
            let _size = lines.next()?;
            let event: Value = serde_json::from_str(&lines.next()?).unwrap();
            let _end = lines.next()?;
            Some(format!(
                "{} {}",
                event["type"], event["object"]["metadata"]["name"]
            ))
        })
    }

    #[test]
    fn a_watch_from_no_version_or_0_starts_with_every_object_added() {
        let added = |name: &str| format!(r#""ADDED" "{name}""#);
        for query in ["", "&resourceVersion=0", "&resourceVersion=2"] {
            let server = FakeApiServer::start();
            for name in ["node-a", "node-b"] {
                server.apply(Kind::Node, json!({"metadata": {"name": name}}));
            }
            let mut events = node_watch(&server, query);
            // The state the watch starts from, read before anything changes.
            let initial: Vec<String> = match query {
                "&resourceVersion=2" => vec![],
                _ => events.by_ref().take(2).collect(),
            };
            server.apply(Kind::Node, json!({"metadata": {"name": "node-c"}}));
            let initial_expected = match query {
                "&resourceVersion=2" => vec![],
                _ => vec![added("node-a"), added("node-b")],
            };
            assert_eq!(initial, initial_expected, "a watch with {query:?}");
            assert_eq!(
                events.next(),
                Some(added("node-c")),
                "a watch with {query:?}, after it began"
            );
        }
    }
}
