//! The manifests in `deploy/` parse, grant only get/list/watch on
//! Services, EndpointSlices and Nodes, and run the daemon as the README
//! says: NODE_NAME from the downward API, the directories it reads by
//! default (Kata's sandboxes, the runtimes' bundles) read-only, a
//! liveness probe on the metrics port, resource requests; with
//! CAP_NET_BIND_SERVICE as its only capability and a seccomp profile that
//! is RuntimeDefault plus socket(AF_VSOCK), what a vhost-vsock node needs.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use serde::Deserialize as _;
use serde_yaml::Value;
use socklb_shim::node::discovery::{DEFAULT_BUNDLE_ROOTS, DEFAULT_SANDBOX_ROOTS};

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

    // Liveness never fails on a stale watch (a restart loses the table);
    // readiness does.
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/healthz")] {
        let probe = &container[probe]["httpGet"];
        assert_eq!(probe["path"], path);
        assert_eq!(probe["port"].as_u64(), Some(metrics_port));
    }
    for resource in ["cpu", "memory"] {
        assert!(
            container["resources"]["requests"][resource].is_string(),
            "a {resource} request"
        );
    }

    // Every directory the daemon reads by default (sandbox roots, bundle
    // roots) from the host, mounted read-only at the same path.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let read = DEFAULT_SANDBOX_ROOTS.iter().chain(&DEFAULT_BUNDLE_ROOTS);
    for read in read {
        let host_dir = volumes
            .iter()
            .filter_map(|v| v["hostPath"]["path"].as_str())
            .filter(|dir| Path::new(read).starts_with(dir))
            .max_by_key(|dir| dir.len())
            .unwrap_or_else(|| panic!("no hostPath volume holds {read}"));
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

/// The node daemon's one container.
fn daemon_container(daemonset: &Value) -> &Value {
    &daemonset["spec"]["template"]["spec"]["containers"][0]
}

#[test]
fn daemon_holds_cap_net_bind_service_and_no_other_capability() {
    let objects = objects();
    let daemonset = one(&objects, "DaemonSet");
    // In the initial user namespace, where af_vsock.c looks for it.
    assert_eq!(daemonset["spec"]["template"]["spec"]["hostUsers"], true);
    let context = &daemon_container(daemonset)["securityContext"];
    let capabilities = &context["capabilities"];
    assert_eq!(
        strings(&capabilities["drop"]),
        BTreeSet::from(["ALL".to_string()])
    );
    assert_eq!(
        strings(&capabilities["add"]),
        BTreeSet::from(["NET_BIND_SERVICE".to_string()]),
        "a vsock bind below 1024 needs it, nothing needs more"
    );
    // Root: the runtime makes added capabilities effective for root only.
    assert_eq!(context["runAsUser"].as_u64(), Some(0));
    assert_eq!(context["allowPrivilegeEscalation"], false);
    assert_eq!(context["readOnlyRootFilesystem"], true);
    assert!(
        context.get("privileged").is_none_or(|p| *p == false),
        "{context:?}"
    );
}

/// AF_VSOCK, and AF_ALG, which RuntimeDefault refuses as well.
const AF_VSOCK: u64 = 40;
const AF_ALG: u64 = 38;

/// Whether a seccomp profile (the OCI runtime spec's form, as kubelet's
/// Localhost profiles are) lets `syscall` through with `args`: some ALLOW
/// rule matches and no other rule does, else the default action.
fn seccomp_allows(profile: &Value, syscall: &str, args: &[u64]) -> bool {
    let matches = |rule: &Value| {
        strings(&rule["names"]).contains(syscall)
            && rule["args"].as_sequence().is_none_or(|conditions| {
                conditions.iter().all(|condition| {
                    let index = condition["index"].as_u64().expect("index") as usize;
                    let arg = args.get(index).copied().unwrap_or_default();
                    let value = condition["value"].as_u64().expect("value");
                    match condition["op"].as_str().expect("op") {
                        "SCMP_CMP_EQ" => arg == value,
                        "SCMP_CMP_LT" => arg < value,
                        "SCMP_CMP_GT" => arg > value,
                        "SCMP_CMP_MASKED_EQ" => {
                            arg & value == condition["valueTwo"].as_u64().unwrap_or_default()
                        }
                        op => panic!("{op}: not an operator this test knows"),
                    }
                })
            })
    };
    let actions: BTreeSet<&str> = profile["syscalls"]
        .as_sequence()
        .expect("syscalls")
        .iter()
        .filter(|rule| matches(rule))
        .map(|rule| rule["action"].as_str().expect("action"))
        .collect();
    if actions.is_empty() {
        profile["defaultAction"] == "SCMP_ACT_ALLOW"
    } else {
        actions == BTreeSet::from(["SCMP_ACT_ALLOW"])
    }
}

#[test]
fn daemon_seccomp_profile_is_runtime_default_plus_af_vsock() {
    let objects = objects();
    let seccomp =
        &daemon_container(one(&objects, "DaemonSet"))["securityContext"]["seccompProfile"];
    assert_eq!(
        seccomp["type"], "Localhost",
        "RuntimeDefault refuses AF_VSOCK"
    );
    let name = seccomp["localhostProfile"]
        .as_str()
        .expect("localhostProfile");
    let path = deploy_dir().join("seccomp").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: the profile deploy/ ships: {e}", path.display()));
    let profile: Value = serde_yaml::from_str(&text).expect("JSON");

    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    for family in [
        libc::AF_UNIX as u64,
        libc::AF_INET as u64,
        libc::AF_INET6 as u64,
        AF_VSOCK,
    ] {
        assert!(
            seccomp_allows(&profile, "socket", &[family]),
            "socket({family}) refused"
        );
    }
    assert!(
        !seccomp_allows(&profile, "socket", &[AF_ALG]),
        "AF_ALG allowed"
    );
    // What the daemon does besides: files, threads, inotify, epoll, timers.
    for syscall in [
        "bind",
        "connect",
        "accept4",
        "openat",
        "inotify_init1",
        "epoll_wait",
        "futex",
        "mmap",
        "clock_nanosleep",
    ] {
        assert!(seccomp_allows(&profile, syscall, &[]), "{syscall} refused");
    }
    // A thread's clone passes; one that makes namespaces does not.
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
    assert!(seccomp_allows(&profile, "clone", &[thread]));
    assert!(!seccomp_allows(
        &profile,
        "clone",
        &[thread | libc::CLONE_NEWUSER as u64]
    ));
    // What RuntimeDefault keeps from a container without CAP_SYS_ADMIN and
    // the like stays refused.
    for syscall in [
        "mount",
        "umount2",
        "unshare",
        "setns",
        "bpf",
        "init_module",
        "finit_module",
        "kexec_load",
        "open_by_handle_at",
        "perf_event_open",
        "keyctl",
        "reboot",
        "clone3",
    ] {
        assert!(!seccomp_allows(&profile, syscall, &[]), "{syscall} allowed");
    }
}

#[test]
fn image_build_file_builds_the_shim() {
    let path = deploy_dir().join("Containerfile");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.contains("cargo build --release --locked -p socklb-shim"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/socklb-shim\"]"));
}
