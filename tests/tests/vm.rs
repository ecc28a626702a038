//! The sandbox for real: the guest image booted in QEMU (TCG, no NIC), the
//! agent inside it reached from the host only over hybrid vsock, the
//! workload inside the guest. Needs the guest images `cargo xtask test`
//! builds (it runs these with --include-ignored).

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;
use socklb_protocols::socklb::check_response::Status;
use socklb_shim::Options;
use socklb_table::Table;
use socklb_tests::{
    agent_client, runtime,
    vm::{GuestImage, Vm, eventually},
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

fn e2e(kernel: &str) {
    let image = GuestImage::from_env(kernel);
    let vm = Vm::boot(&image, "");
    let runtime = runtime();
    let options = Options {
        connect_timeout: Duration::from_secs(60),
        ..Options::default()
    };
    let mut client = agent_client(&vm.agent_addr(), options);

    // Health over hybrid vsock: the agent accepted the host (CID 2).
    assert_eq!(runtime.block_on(client.check()).unwrap(), Status::SERVING);
    let version = runtime.block_on(client.version()).unwrap();
    assert_eq!(version.hooks_attached.len(), 10, "{version:?}");
    assert!(version.kernel_release.starts_with("6.1"), "{version:?}");

    // The peer-CID rule: a connection from inside the guest (loopback
    // vsock, CID 1) is refused and logged; the host's (CID 2) was served.
    let probe = vm.testkit(&["vsock-probe", "1", "1025"]);
    assert_eq!(probe[0]["closed_by_peer"], true, "{probe:?}");
    assert!(
        eventually(Duration::from_secs(10), || vm.console_text().lines().any(
            |l| l.contains("refused an API connection") && l.contains(r#""peer_cid":1"#)
        )),
        "no refusal logged:\n{}",
        vm.console_text()
    );

    let table = Table::parse(TABLE).unwrap();
    runtime.block_on(client.sync(table.clone())).unwrap();

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
        let restart = vm.exec(&["sh", "-c", "kill -9 $(pidof socklb-agent) && start-agent"]);
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
    let wipe = vm.exec(&[
        "sh",
        "-c",
        "kill -9 $(pidof socklb-agent); socklb-agent --detach; start-agent",
    ]);
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
        "{kernel}: booted to init in {:.1} s; agent RSS {} KiB",
        vm.booted_in.as_secs_f64(),
        vm.rss_kib("socklb-agent")
    );
}

#[test]
#[ignore = "needs the guest images: cargo xtask test builds them and runs this"]
fn sandbox_vm_with_the_projects_kernel() {
    e2e("OWN");
}

#[test]
#[ignore = "needs the guest images: cargo xtask test builds them and runs this"]
fn sandbox_vm_with_debians_cloud_kernel() {
    e2e("DEBIAN");
}
