//! The manifests in `deploy/` parse, grant only get/list/watch on
//! Services, EndpointSlices and Nodes, and run the daemon as the README
//! says: NODE_NAME from the downward API, Kata's directories read-only, a
//! liveness probe on the metrics port, resource requests.

use std::{collections::BTreeSet, path::PathBuf};

use serde::Deserialize as _;
use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of every manifest.
fn objects() -> Vec<Value> {
    let mut objects = Vec::new();
    for name in ["rbac.yaml", "daemonset.yaml"] {
        let path = deploy_dir().join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            assert!(
                object["apiVersion"].is_string() && object["kind"].is_string(),
                "{}: a document without apiVersion or kind: {object:?}",
                path.display()
            );
            objects.push(object);
        }
    }
    objects
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("a list expected: {value:?}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

#[test]
fn cluster_role_only_reads_services_endpointslices_and_nodes() {
    let objects = objects();
    let role = one(&objects, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let verbs = strings(&rule["verbs"]);
        assert_eq!(
            verbs,
            strings(&serde_yaml::from_str("[get, list, watch]").unwrap()),
            "verbs of {rule:?}"
        );
        assert!(rule.get("nonResourceURLs").is_none(), "{rule:?}");
        assert!(rule.get("resourceNames").is_none(), "{rule:?}");
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    let expected: BTreeSet<String> = ["/services", "/nodes", "discovery.k8s.io/endpointslices"]
        .map(String::from)
        .into();
    assert_eq!(granted, expected);

    let account = one(&objects, "ServiceAccount");
    let binding = one(&objects, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subjects = binding["subjects"].as_sequence().expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], account["metadata"]["name"]);
    assert_eq!(subjects[0]["namespace"], account["metadata"]["namespace"]);
}

#[test]
fn daemonset_runs_the_node_daemon_as_documented() {
    let objects = objects();
    let daemonset = one(&objects, "DaemonSet");
    let account = one(&objects, "ServiceAccount");
    assert_eq!(
        daemonset["metadata"]["namespace"],
        account["metadata"]["namespace"]
    );
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("a string"))
        .collect();
    assert_eq!(args[0], "node");
    let metrics_port: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .and_then(|addr| addr.rsplit_once(':'))
        .map(|(_, port)| port.parse().expect("a port"))
        .expect("--metrics-addr=HOST:PORT");

    let node_name = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME in env");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );

    let probe = &container["livenessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/healthz");
    assert_eq!(probe["port"].as_u64(), Some(metrics_port));
    for resource in ["cpu", "memory"] {
        assert!(
            container["resources"]["requests"][resource].is_string(),
            "a {resource} request"
        );
    }

    // /run/vc and /run/kata from the host, mounted read-only.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    for host_dir in ["/run/vc", "/run/kata"] {
        let volume = volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == host_dir)
            .unwrap_or_else(|| panic!("a hostPath volume for {host_dir}"));
        let mount = container["volumeMounts"]
            .as_sequence()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("{host_dir} mounted"));
        assert_eq!(mount["mountPath"], host_dir);
        assert_eq!(mount["readOnly"], true, "{host_dir} read-only");
    }
}

#[test]
fn image_build_file_builds_the_shim() {
    let path = deploy_dir().join("Containerfile");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.contains("cargo build --release --locked -p socklb-shim"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/socklb-shim\"]"));
}
