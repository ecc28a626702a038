//! Finding the node's Kata sandboxes the way Kata's own tools do: every
//! `<root>/<sandbox id>/shim-monitor.sock` under the sandbox roots (the Go
//! runtime's `/run/vc/sbs`, runtime-rs's `/run/kata`), followed with
//! inotify plus a periodic rescan; `GET /agent-url` on that socket names
//! the sandbox's vsock (`vsock://CID:1024`) or hybrid vsock
//! (`hvsock:///path:1024`), and socklb's agent port replaces Kata's.
//! Also where the pod's namespace and name come from: the annotations in
//! the sandbox's OCI bundle (`config.json`), when the bundle is found.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt as _;
use inotify::{Inotify, WatchMask};
use slog::{Logger, warn};
use socklb_protocols::address::{Address, AddressError, Fault};
use tokio::sync::watch;

use crate::client::AgentAddr;

/// The Go runtime's and runtime-rs's sandbox directories.
pub const DEFAULT_SANDBOX_ROOTS: [&str; 2] = ["/run/vc/sbs", "/run/kata"];
/// Where container runtimes keep the bundles of Kubernetes sandboxes, by
/// sandbox id: containerd's, k3s's and RKE2's containerd (`<id>/`), and
/// CRI-O's run root (`<id>/userdata/`).
pub const DEFAULT_BUNDLE_ROOTS: [&str; 3] = [
    "/run/containerd/io.containerd.runtime.v2.task/k8s.io",
    "/run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io",
    "/run/containers/storage/overlay-containers",
];
/// Where a sandbox's `config.json` sits below `<bundle root>/<id>`:
/// containerd's bundle directory itself, CRI-O's `userdata`.
const BUNDLE_SUBDIRS: [&str; 2] = ["", "userdata"];
/// The management socket Kata's shim serves in each sandbox directory.
pub const MONITOR_SOCKET: &str = "shim-monitor.sock";

/// A sandbox directory with its management socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub id: String,
    pub socket: PathBuf,
}

/// Every sandbox under `roots`, by id; an id under two roots counts once
/// (the first root's).
pub fn scan(roots: &[PathBuf]) -> BTreeMap<String, Found> {
    let mut found = BTreeMap::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let socket = entry.path().join(MONITOR_SOCKET);
            let Ok(id) = entry.file_name().into_string() else {
                continue;
            };
            if socket.exists() && !found.contains_key(&id) {
                found.insert(id.clone(), Found { id, socket });
            }
        }
    }
    found
}

/// Publishes the sandboxes under `roots` on `found` whenever they change,
/// until the receivers are gone. inotify on the roots and on each sandbox
/// directory (its socket appears after the directory) wakes a rescan at
/// once; the periodic rescan catches what inotify cannot (a root created
/// later, a full event queue).
pub async fn follow(
    roots: Vec<PathBuf>,
    rescan: Duration,
    found: watch::Sender<BTreeMap<String, Found>>,
    log: Logger,
) {
    let mut events = match Inotify::init().and_then(|i| i.into_event_stream(vec![0u8; 4096])) {
        Ok(events) => Some(events),
        Err(err) => {
            warn!(log, "inotify unavailable; only rescanning periodically"; "error" => err.to_string());
            None
        }
    };
    let mut tick = tokio::time::interval(rescan);
    loop {
        let now = scan(&roots);
        if let Some(events) = &events {
            let mask = WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM
                | WatchMask::MOVED_TO
                | WatchMask::ONLYDIR;
            let mut watches = events.watches();
            // Adding a watch again is harmless; a missing root just fails.
            let sandbox_dirs = now.values().filter_map(|f| f.socket.parent());
            for dir in roots.iter().map(PathBuf::as_path).chain(sandbox_dirs) {
                let _ = watches.add(dir, mask);
            }
        }
        found.send_if_modified(|known| {
            let changed = *known != now;
            *known = now;
            changed
        });
        if found.is_closed() {
            return;
        }
        match &mut events {
            Some(stream) => tokio::select! {
                event = stream.next() => {
                    if event.is_none() {
                        events = None;
                    }
                }
                _ = tick.tick() => {}
            },
            None => {
                tick.tick().await;
            }
        }
    }
}

/// Where a sandbox's agent is, from Kata's `/agent-url` answer.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentUrl {
    /// The agent on socklb's port, same CID or hybrid vsock socket.
    Local(AgentAddr),
    /// A peer-pods sandbox on another machine: not reachable from here.
    Remote(String),
}

#[derive(Debug, thiserror::Error)]
#[error("agent URL {0} (Kata answers vsock://CID:PORT, hvsock:///path:PORT or remote://...)")]
pub struct AgentUrlError(#[from] AddressError);

/// Reads Kata's answer (`vsock://CID:PORT`, `hvsock://PATH:PORT` or
/// `remote://...`) and puts socklb's `agent_port` in place of Kata's.
pub fn agent_url(answer: &str, agent_port: u32) -> Result<AgentUrl, AgentUrlError> {
    let answer = answer.trim();
    if answer.starts_with("remote://") {
        return Ok(AgentUrl::Remote(answer.into()));
    }
    let error = |fault| AddressError::new(answer, fault);
    // Kata always names kata-agent's port: an answer without one is not
    // Kata's.
    let addr = match answer.parse()? {
        Address::Vsock { port: None, .. } | Address::HybridVsock { port: None, .. } => {
            Err(error(Fault::NoPort))?
        }
        Address::Vsock { cid: None, .. } => Err(error(Fault::AnyCid))?,
        Address::Vsock { cid: Some(cid), .. } => AgentAddr::Vsock {
            cid,
            port: agent_port,
        },
        Address::HybridVsock { uds, .. } => AgentAddr::HybridVsock {
            uds,
            port: agent_port,
        },
        Address::Unix(_) => Err(error(Fault::SchemeNotTaken))?,
    };
    Ok(AgentUrl::Local(addr))
}

/// Annotations containerd's CRI and CRI-O put on a sandbox: (namespace,
/// name). CRI-O's are the ones Kata itself reads on CRI-O.
const POD_ANNOTATIONS: [(&str, &str); 3] = [
    (
        "io.kubernetes.cri.sandbox-namespace",
        "io.kubernetes.cri.sandbox-name",
    ),
    (
        "io.kubernetes.cri-o.Namespace",
        "io.kubernetes.cri-o.KubeName",
    ),
    ("io.kubernetes.pod.namespace", "io.kubernetes.pod.name"),
];

/// `namespace/name` of the pod of sandbox `id`, from the annotations of its
/// OCI bundle (`<bundle root>/<id>/config.json`, or CRI-O's
/// `<bundle root>/<id>/userdata/config.json`); None when no bundle says.
pub fn pod_of(id: &str, bundle_roots: &[PathBuf]) -> Option<String> {
    bundle_roots.iter().find_map(|root| {
        BUNDLE_SUBDIRS
            .iter()
            .find_map(|sub| pod_in_bundle(&root.join(id).join(sub).join("config.json")))
    })
}

fn pod_in_bundle(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let annotations = config.get("annotations")?;
    POD_ANNOTATIONS.iter().find_map(|(namespace, name)| {
        Some(format!(
            "{}/{}",
            annotations.get(namespace)?.as_str()?,
            annotations.get(name)?.as_str()?
        ))
    })
}

/// Sandbox roots from the command line, or the defaults.
pub fn roots_or_default(given: Vec<PathBuf>, defaults: &[&str]) -> Vec<PathBuf> {
    if given.is_empty() {
        defaults.iter().map(PathBuf::from).collect()
    } else {
        given
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_as_kata_answers_them() {
        assert_eq!(
            agent_url("vsock://3:1024", 1100).unwrap(),
            AgentUrl::Local(AgentAddr::Vsock { cid: 3, port: 1100 })
        );
        assert_eq!(
            agent_url(
                "hvsock:///run/vc/firecracker/abc/root/kata.hvsock:1024\n",
                1100
            )
            .unwrap(),
            AgentUrl::Local(AgentAddr::HybridVsock {
                uds: "/run/vc/firecracker/abc/root/kata.hvsock".into(),
                port: 1100
            })
        );
        assert!(matches!(
            agent_url("remote://peer-pod", 1100).unwrap(),
            AgentUrl::Remote(_)
        ));
        for garbage in [
            "",
            "<html>",
            "vsock://x:1024",
            "vsock://3",
            "hvsock://rel.sock:1024",
            "hvsock:///a.sock",
            "tcp://1.2.3.4:1024",
        ] {
            let err = agent_url(garbage, 1100).unwrap_err().to_string();
            assert!(err.contains(garbage.trim()), "{err}");
        }
    }

    #[test]
    fn what_kata_never_answers_is_refused_by_name() {
        for (answer, fault) in [
            ("vsock://3", Fault::NoPort),
            ("hvsock:///run/vm.sock", Fault::NoPort),
            ("vsock://-1:1024", Fault::AnyCid),
            ("unix:///run/agent.sock", Fault::SchemeNotTaken),
        ] {
            let AgentUrlError(err) = agent_url(answer, 1100).unwrap_err();
            assert_eq!(err.fault, fault, "{answer}");
        }
    }

    #[test]
    fn scan_finds_sandboxes_with_a_socket_first_root_first() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        for (root, id) in [(&first, "a"), (&second, "a"), (&second, "b")] {
            let dir = root.path().join(id);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join(MONITOR_SOCKET), "").unwrap();
        }
        // A directory whose shim has not made its socket yet.
        std::fs::create_dir(second.path().join("c")).unwrap();
        let roots = vec![
            first.path().into(),
            second.path().into(),
            "/nonexistent".into(),
        ];
        let found = scan(&roots);
        assert_eq!(found.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(found["a"].socket.starts_with(first.path()));
    }

    #[test]
    fn pod_from_cri_annotations() {
        let bundles = tempfile::tempdir().unwrap();
        let dir = bundles.path().join("sb1");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"annotations": {"io.kubernetes.cri.sandbox-namespace": "shop",
                                "io.kubernetes.cri.sandbox-name": "web-0"}}"#,
        )
        .unwrap();
        let roots = vec![bundles.path().to_path_buf()];
        assert_eq!(pod_of("sb1", &roots).as_deref(), Some("shop/web-0"));
        assert_eq!(pod_of("sb2", &roots), None);
    }

    #[test]
    fn pod_from_a_cri_o_bundle() {
        let run_root = tempfile::tempdir().unwrap();
        let userdata = run_root.path().join("sb1/userdata");
        std::fs::create_dir_all(&userdata).unwrap();
        std::fs::write(
            userdata.join("config.json"),
            r#"{"annotations": {"io.kubernetes.cri-o.Namespace": "shop",
                                "io.kubernetes.cri-o.KubeName": "web-0",
                                "io.kubernetes.cri-o.ContainerType": "sandbox"}}"#,
        )
        .unwrap();
        // Another runtime's bundle root first: the search goes on.
        let elsewhere = tempfile::tempdir().unwrap();
        let roots = vec![
            elsewhere.path().to_path_buf(),
            run_root.path().to_path_buf(),
        ];
        assert_eq!(pod_of("sb1", &roots).as_deref(), Some("shop/web-0"));
    }
}
