//! ClientIP affinity as kube-proxy users know it: the timeout restarts on
//! each use (the `recent` match), and the choice belongs to the client's
//! network namespace (a pod, one IP), not to a socket or to the node.
//! Needs root.

use std::{collections::BTreeSet, process::Command, thread::sleep, time::Duration};

use serde_json::Value;
use socklb_tests::{Sandbox, backend_ip};

/// 10.96.0.20:80 on b1..=b4 with ClientIP affinity of `timeout` seconds.
fn sticky_table(sandbox: &Sandbox, timeout: u32) -> std::path::PathBuf {
    let backends: Vec<String> = (1..=4)
        .map(|n| format!("{{ip: {}, port: 8080}}", backend_ip(n)))
        .collect();
    sandbox.table(
        "t.yaml",
        &format!(
            "services: [{{vip: 10.96.0.20, port: 80, affinity: {{clientIP: {{timeoutSeconds: {timeout}}}}}, backends: [{}]}}]",
            backends.join(", ")
        ),
    )
}

fn start_backends(sandbox: &Sandbox) {
    for n in 1..=4 {
        sandbox.backend(&format!("b{n}"), &[&format!("{}:8080", backend_ip(n))], &[]);
    }
}

fn backend_of(results: &[Value]) -> BTreeSet<String> {
    results
        .iter()
        .map(|r| {
            assert!(r.get("error").is_none(), "exchange failed: {r}");
            r["backend"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn affinity_is_refreshed_by_each_use() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox);
    let _agent = sandbox.start_agent(Some(&sticky_table(&sandbox, 2)));
    // 25 uses 0.4 s apart span five timeouts: without the refresh the
    // choice would expire and be drawn again (all on one backend by chance:
    // (1/4)^4 at least).
    let mut seen = BTreeSet::new();
    for _ in 0..25 {
        seen.extend(backend_of(&sandbox.client(&["tcp", "10.96.0.20:80"])));
        sleep(Duration::from_millis(400));
    }
    assert_eq!(seen.len(), 1, "the choice expired while in use: {seen:?}");
}

/// A further client namespace (another pod) joined to the backends
/// namespace by its own veth; removed on drop.
struct OtherPod {
    netns: String,
}

impl OtherPod {
    fn create(sandbox: &Sandbox, index: u8) -> OtherPod {
        let netns = format!("{}-p{index}", sandbox.id);
        run(&["netns", "add", &netns]);
        let pod = OtherPod { netns };
        let (ns, backends) = (pod.netns.as_str(), sandbox.backend_ns.as_str());
        let veth = format!("pod{index}");
        run(&[
            "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &veth, "netns",
            backends,
        ]);
        run(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.245.0.{index}/24"),
            "dev",
            "eth0",
        ]);
        run(&["-n", ns, "link", "set", "lo", "up"]);
        run(&["-n", ns, "link", "set", "eth0", "up"]);
        run(&["-n", backends, "link", "set", &veth, "up"]);
        run(&[
            "-n",
            backends,
            "route",
            "add",
            &format!("10.245.0.{index}/32"),
            "dev",
            &veth,
        ]);
        run(&["-n", ns, "route", "add", "10.244.0.0/16", "dev", "eth0"]);
        pod
    }

    /// `socklb-testkit ARGS` in this pod: the sandbox's cgroup (where the
    /// agent's programs are attached), this namespace.
    fn client(&self, sandbox: &Sandbox, args: &[&str]) -> Vec<Value> {
        sandbox.client_in_netns(&self.netns, args)
    }
}

impl Drop for OtherPod {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn run(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {args:?}");
}

#[test]
fn affinity_is_kept_per_client_network_namespace() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox);
    let _agent = sandbox.start_agent(Some(&sticky_table(&sandbox, 600)));
    let pods: Vec<OtherPod> = (1..=6).map(|i| OtherPod::create(&sandbox, i)).collect();

    // Each pod keeps one backend over several processes and sockets...
    let mut choices = vec![backend_of(&sandbox.client(&[
        "tcp",
        "10.96.0.20:80",
        "--count",
        "5",
    ]))];
    for pod in &pods {
        let mut chosen =
            backend_of(&pod.client(&sandbox, &["tcp", "10.96.0.20:80", "--count", "3"]));
        chosen.extend(backend_of(
            &pod.client(&sandbox, &["tcp", "10.96.0.20:80", "--count", "3"]),
        ));
        choices.push(chosen);
    }
    for (pod, chosen) in choices.iter().enumerate() {
        assert_eq!(
            chosen.len(),
            1,
            "pod {pod} did not keep one backend: {chosen:?}"
        );
    }
    // ...and the seven pods chose on their own: all on one backend by
    // chance (1/4)^6.
    let distinct: BTreeSet<&String> = choices.iter().flatten().collect();
    assert!(
        distinct.len() > 1,
        "seven pods share one affinity entry: {choices:?}"
    );
}
