//! The sandbox for real: the guest image booted in QEMU (TCG, no NIC), the
//! agent inside it reached from the host only over hybrid vsock, the
//! workload inside the guest. Needs the guest images `cargo xtask test`
//! builds (it runs these with --include-ignored).

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;
use socklb_protocols::{KATA_GUEST_PORTS, socklb::check_response::Status};
use socklb_shim::Options;
use socklb_table::Table;
use socklb_tests::{
    agent_client, runtime,
    vm::{AGENT_PORT, GuestImage, Vm, eventually},
};

/// The guest image's example table (the demo applies it too).
const TABLE: &str = include_str!("../../rootfs/demo-table.yaml");

fn backends(results: &[Value]) -> BTreeSet<String> {
    results
        .iter()
        .map(|r| {
            assert!(
                r.get("error").is_none(),
                "exchange failed in the guest: {r}"
            );
            r["backend"].as_str().unwrap().to_string()
        })
        .collect()
}

/// How a guest kernel and its image differ.
struct Guest {
    /// SOCKLB_GUEST_<name>_{KERNEL,INITRD}.
    name: &'static str,
    /// Kata-style: socklb's Kata init starts the agent under its restart
    /// loop, a stand-in execs as kata-agent (its mounts and port, then a
    /// restart of the agent), and the pod's address arrives on an interface
    /// after the agent is up.
    kata: bool,
    /// Kernel features Health.Version must report.
    features: [&'static str; 2],
}

/// The pod address: given with --pod-ip in the test image, added to an
/// interface after the agent is up in the Kata-style one.
const POD_IP: &str = "10.244.0.1";

fn local_ip(result: &Value) -> String {
    let local = result["local"].as_str().unwrap_or_default();
    local.rsplit_once(':').map_or("", |(ip, _)| ip).to_string()
}

fn e2e(guest: Guest) {
    let image = GuestImage::from_env(guest.name);
    let started = std::time::Instant::now();
    let vm = Vm::boot(&image, "");
    let runtime = runtime();
    let options = Options {
        connect_timeout: Duration::from_secs(60),
        // Retried often, so the first answer times when the agent got ready.
        backoff_max: Duration::from_millis(100),
        ..Options::default()
    };
    let mut client = agent_client(&vm.agent_addr(), options);

    // Health over hybrid vsock: the agent accepted the host (CID 2).
    assert_eq!(runtime.block_on(client.check()).unwrap(), Status::SERVING);
    let agent_ready_in = started.elapsed();
    let version = runtime.block_on(client.version()).unwrap();
    assert_eq!(version.hooks_attached.len(), 10, "{version:?}");
    assert!(version.kernel_release.starts_with("6.1"), "{version:?}");
    for feature in guest.features {
        assert!(version.features.iter().any(|f| f == feature), "{version:?}");
    }

    if guest.kata {
        // The stand-in kata-agent did its mounts (cgroup v1, Kata's default
        // without agent.unified_cgroup_hierarchy), then restarted the agent:
        // the agent started over them mounted nothing over kata-agent's
        // cgroup hierarchies, and kata-agent's port answers beside socklb's.
        assert!(
            vm.console_text()
                .contains("socklb-agent failed; restarting"),
            "the stand-in did not restart the agent:\n{}",
            vm.console_text()
        );
        let cgroups = vm.exec(&[
            "sh",
            "-c",
            "awk '$2 == \"/sys/fs/cgroup\" { type = $3 } END { print type }' /proc/self/mounts; \
             ls /sys/fs/cgroup",
        ]);
        let listed: Vec<&str> = cgroups["stdout"]
            .as_str()
            .unwrap_or_default()
            .lines()
            .collect();
        assert!(
            listed.first() == Some(&"tmpfs") && listed.contains(&"devices"),
            "/sys/fs/cgroup is not kata-agent's cgroup v1 tmpfs: {cgroups}"
        );
        let (kata_agent_port, _) = KATA_GUEST_PORTS[0];
        assert!(vm.connect(kata_agent_port).is_ok(), "kata-agent's port");
        // Kata's own ports are refused, naming the Kata service there.
        let refused = vm.exec(&["socklb-agent", "--listen", "vsock://-1:1025"]);
        assert_eq!(refused["status"], 2, "{refused}");
        assert!(
            refused["stderr"]
                .as_str()
                .unwrap_or_default()
                .contains("kata-agent log forwarding"),
            "{refused}"
        );
    } else {
        // The peer-CID rule: a connection from inside the guest (loopback
        // vsock, CID 1; Kata's kernel has no loopback vsock) is refused and
        // logged; the host's (CID 2) was served.
        let port = AGENT_PORT.to_string();
        let probe = vm.testkit(&["vsock-probe", "1", &port]);
        assert_eq!(probe[0]["closed_by_peer"], true, "{probe:?}");
        assert!(
            eventually(Duration::from_secs(10), || vm.console_text().lines().any(
                |l| l.contains("refused an API connection") && l.contains(r#""peer_cid":1"#)
            )),
            "no refusal logged:\n{}",
            vm.console_text()
        );
    }

    let table = Table::parse(TABLE).unwrap();
    runtime.block_on(client.sync(table.clone())).unwrap();

    if guest.kata {
        // No pod address yet: a VIP served by a local backend shows the
        // backend's own address as the local one.
        let before = vm.testkit(&["tcp", "10.96.0.20:80"]);
        assert_ne!(local_ip(&before[0]), POD_IP, "{before:?}");
        // As kata-agent does after boot: the pod's interface and address.
        let up = vm.exec(&[
            "sh",
            "-c",
            &format!(
                "ip link add name eth0 type veth && ip addr add {POD_IP}/24 dev eth0 && \
                 ip link set eth0 up"
            ),
        ]);
        assert_eq!(up["status"], 0, "{up}");
    }
    // getsockname shows the pod's address for a VIP a local backend serves.
    assert!(
        eventually(Duration::from_secs(10), || {
            let after = vm.testkit(&["tcp", "10.96.0.20:80"]);
            local_ip(&after[0]) == POD_IP
        }),
        "getsockname never showed the pod address {POD_IP}"
    );

    // TCP through a VIP in the guest; getpeername shows the VIP.
    let tcp = vm.testkit(&["tcp", "10.96.0.20:80", "--count", "30"]);
    assert!(backends(&tcp).len() >= 2, "{tcp:?}");
    assert!(tcp.iter().all(|r| r["peer"] == "10.96.0.20:80"), "{tcp:?}");
    // UDP, unconnected and connected: replies come from the VIP.
    for args in [
        &["udp", "10.96.0.11:53", "--count", "3"][..],
        &["udp", "10.96.0.11:53", "--connected"],
    ] {
        for r in vm.testkit(args) {
            assert_eq!(r["backend"], "b2", "{r}");
            assert_eq!(r["source"], "10.96.0.11:53", "{r}");
        }
    }
    // The echo service's backend moves from b2 to b3 under a connected UDP
    // socket. None of these guest kernels can close sockets (no
    // INET_UDP_DIAG or INET_DIAG_DESTROY, as in Kata's default kernel): the
    // agent says so, the socket keeps its removed backend until it connects
    // again, and a new socket reaches b3.
    std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            vm.testkit(&[
                "udp",
                "10.96.0.11:53",
                "--connected",
                "--count",
                "20",
                "--interval-ms",
                "100",
            ])
        });
        std::thread::sleep(Duration::from_millis(700));
        let mut echo = table
            .services
            .iter()
            .find(|s| s.name.as_deref() == Some("default/echo"))
            .unwrap()
            .clone();
        echo.backends = vec!["10.244.1.3:5353".parse().unwrap()];
        runtime.block_on(client.upsert(vec![echo])).unwrap();
        let kept = sending.join().unwrap();
        assert_eq!(backends(&kept), BTreeSet::from(["b2".into()]), "{kept:?}");
    });
    assert_eq!(
        backends(&vm.testkit(&["udp", "10.96.0.11:53", "--connected"])),
        BTreeSet::from(["b3".into()])
    );
    assert!(
        eventually(Duration::from_secs(10), || vm
            .console_text()
            .lines()
            .any(|l| l.contains("the kernel cannot close sockets"))),
        "the agent did not say it cannot close sockets:\n{}",
        vm.console_text()
    );

    // musl's resolver through the cluster DNS VIP (it drops replies whose
    // source is not the nameserver it asked).
    let resolved = vm.testkit(&["resolve", "web.default.svc.cluster.local"]);
    assert_eq!(resolved[0]["addrs"][0], "10.96.0.20", "{resolved:?}");

    // An update pushed from the host while the guest connects.
    std::thread::scope(|scope| {
        let workload = scope.spawn(|| vm.testkit(&["tcp-loop", "10.96.0.20:80", "--ms", "3000"]));
        std::thread::sleep(Duration::from_millis(1000));
        let mut web = table.services[0].clone();
        web.backends.truncate(1);
        web.backends[0] = "10.244.1.3:8080".parse().unwrap();
        runtime.block_on(client.upsert(vec![web])).unwrap();
        let during = workload.join().unwrap();
        assert!(backends(&during).contains("b3"), "{during:?}");
    });
    assert_eq!(
        backends(&vm.testkit(&["tcp", "10.96.0.20:80", "--count", "10"])),
        BTreeSet::from(["b3".into()])
    );

    // The agent restarted inside the guest: the datapath stays.
    std::thread::scope(|scope| {
        let workload = scope.spawn(|| vm.testkit(&["tcp-loop", "10.96.0.20:80", "--ms", "3000"]));
        std::thread::sleep(Duration::from_millis(800));
        // The Kata init's loop restarts the agent by itself.
        let restart = if guest.kata {
            "kill -9 $(pidof socklb-agent)"
        } else {
            "kill -9 $(pidof socklb-agent) && start-agent"
        };
        let restart = vm.exec(&["sh", "-c", restart]);
        assert_eq!(restart["status"], 0, "{restart}");
        let during = workload.join().unwrap();
        assert_eq!(
            backends(&during),
            BTreeSet::from(["b3".into()]),
            "connects failed while the agent restarted"
        );
    });

    // The agent restarted with its datapath removed: the shim's client
    // notices on its next call, reconnects and syncs the table by itself.
    let wipe = if guest.kata {
        "kill -9 $(pidof socklb-agent); socklb-agent --detach"
    } else {
        "kill -9 $(pidof socklb-agent); socklb-agent --detach; start-agent"
    };
    let wipe = vm.exec(&["sh", "-c", wipe]);
    assert_eq!(wipe["status"], 0, "{wipe}");
    let gone = vm.testkit(&["tcp", "10.96.0.20:80"]);
    assert!(
        gone[0].get("error").is_some(),
        "the datapath survived --detach: {gone:?}"
    );
    assert!(
        eventually(Duration::from_secs(60), || runtime
            .block_on(client.check())
            .is_ok()),
        "the client did not reconnect"
    );
    assert_eq!(
        backends(&vm.testkit(&["tcp", "10.96.0.20:80", "--count", "5"])),
        BTreeSet::from(["b3".into()])
    );
    let (_, listed, _) = runtime.block_on(client.list()).unwrap();
    assert_eq!(listed.services.len(), 3);

    eprintln!(
        "{}: booted to init in {:.1} s, agent answering Health {:.2} s after QEMU started; \
         agent RSS {} KiB",
        guest.name,
        vm.booted_in.as_secs_f64(),
        agent_ready_in.as_secs_f64(),
        vm.rss_kib("socklb-agent")
    );
}

#[test]
#[ignore = "needs the guest images: cargo xtask test builds them and runs this"]
fn sandbox_vm_with_the_projects_kernel() {
    socklb_tests::require_root!();
    e2e(Guest {
        name: "OWN",
        kata: false,
        features: ["kernel-btf", "bpf-jit"],
    });
}

#[test]
#[ignore = "needs the guest images: cargo xtask test builds them and runs this"]
fn sandbox_vm_with_debians_cloud_kernel() {
    socklb_tests::require_root!();
    e2e(Guest {
        name: "DEBIAN",
        kata: false,
        features: ["kernel-btf", "bpf-jit"],
    });
}

/// Kata's default guest kernel options (no BTF, no JIT, no modules), booted
/// as Kata's initrd boots.
#[test]
#[ignore = "needs the guest images: cargo xtask test builds them and runs this"]
fn sandbox_vm_with_katas_kernel_booted_like_kata() {
    socklb_tests::require_root!();
    e2e(Guest {
        name: "KATA",
        kata: true,
        features: ["no-kernel-btf", "bpf-interpreter"],
    });
}

/// The vhost-vsock client path for real, inside the guest only (never on
/// the machine that runs the tests): over the guest's loopback vsock, CID
/// 1, the static socklb-shim connects to the agent the way a host process
/// on a QEMU node does, from a source port below 1024. The agent admits
/// CID 1 but keeps the privileged-port rule, so root's shim programs it, a
/// client from a port the kernel picks is refused, and a shim without
/// CAP_NET_BIND_SERVICE fails naming it, without connecting at all.
#[test]
#[ignore = "needs the guest images: cargo xtask test builds them and runs this"]
fn shim_over_loopback_vsock_needs_cap_net_bind_service() {
    socklb_tests::require_root!();
    // Later socklb.* keys win: this undoes the harness's allowance for
    // hybrid vsock, whose VMM picks the source port.
    let vm = Vm::boot(
        &GuestImage::from_env("DEBIAN"),
        "socklb.allow_loopback_callers=1 socklb.allow_unprivileged_port=0",
    );
    let agent = format!("vsock://1:{AGENT_PORT}");
    let shim = |wrapper: &[&str], args: &[&str]| {
        let mut argv = wrapper.to_vec();
        argv.extend(["socklb-shim", "--agent", &agent]);
        argv.extend(args);
        vm.exec(&argv)
    };
    let refusals = |vm: &Vm| {
        vm.console_text()
            .lines()
            .filter(|l| l.contains("refused an API connection"))
            .count()
    };

    // Root holds the capability: it programs the agent.
    assert!(
        eventually(Duration::from_secs(60), || shim(
            &[],
            &["--timeout", "5", "health"]
        )["status"]
            == 0),
        "root's shim never reached the agent: {}",
        shim(&[], &["--timeout", "5", "health"])
    );
    let written = vm.exec(&[
        "sh",
        "-c",
        r#"printf '%s' "$1" > /tmp/table.yaml"#,
        "sh",
        TABLE,
    ]);
    assert_eq!(written["status"], 0, "{written}");
    let applied = shim(&[], &["apply", "-f", "/tmp/table.yaml"]);
    assert_eq!(applied["status"], 0, "{applied}");
    let listed = shim(&[], &["list", "-o", "json"]);
    assert_eq!(listed["status"], 0, "{listed}");
    let listed: Value = serde_json::from_str(listed["stdout"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("list -o json: {e}: {listed}"));
    assert_eq!(
        listed["services"].as_array().map(Vec::len),
        Some(Table::parse(TABLE).unwrap().services.len()),
        "{listed}"
    );

    // The agent still asks for a privileged port: a client bound to one the
    // kernel picks is refused (what the shim without the capability used
    // to fall back to).
    let probe = vm.testkit(&["vsock-probe", "1", &AGENT_PORT.to_string()]);
    assert_eq!(probe[0]["closed_by_peer"], true, "{probe:?}");
    assert!(
        eventually(Duration::from_secs(10), || vm.console_text().lines().any(
            |l| l.contains("refused an API connection") && l.contains("is unprivileged")
        )),
        "no refusal of the unprivileged port logged"
    );

    // Without the capability: root with it dropped (a container that does
    // not hold it), and root of a user namespace (a pod with hostUsers:
    // false), which holds it only there, not in the initial namespace.
    let refused_before = refusals(&vm);
    for wrapper in [
        &["socklb-testkit", "drop-net-bind-service"][..],
        &["unshare", "-U"],
    ] {
        let failed = shim(wrapper, &["--timeout", "2", "list"]);
        assert_ne!(failed["status"], 0, "{wrapper:?}: {failed}");
        let stderr = failed["stderr"].as_str().unwrap_or_default();
        assert!(
            stderr.contains("needs CAP_NET_BIND_SERVICE"),
            "{wrapper:?}: the capability not named: {failed}"
        );
    }
    assert_eq!(
        refusals(&vm),
        refused_before,
        "a shim without the capability connected anyway"
    );
}
