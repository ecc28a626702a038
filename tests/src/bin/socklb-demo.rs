//! `cargo xtask demo`: a sandbox VM with a working ClusterIP. Boots the
//! guest image (QEMU TCG, no NIC), waits for the agent's Health over hybrid
//! vsock, applies the example table with socklb-shim, and shows a workload
//! inside the guest reaching a ClusterIP over TCP and resolving a name
//! through the cluster DNS VIP over UDP; then shuts everything down.
//!
//! Reads SOCKLB_GUEST_KERNEL, SOCKLB_GUEST_INITRD and SOCKLB_GUEST_AGENT
//! (the static agent binary, for its size), set by `cargo xtask demo`. It
//! is a static binary of the same build as the guest's, and runs the
//! socklb-shim beside it.

use std::{
    path::PathBuf,
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use socklb_tests::{
    shim_bin,
    vm::{GuestImage, Vm, eventually},
};

const TABLE: &str = include_str!("../../../rootfs/demo-table.yaml");

/// Says what the demo does next, and how long it has run.
fn step(text: &str) {
    static STARTED: OnceLock<Instant> = OnceLock::new();
    let started = STARTED.get_or_init(Instant::now);
    println!("\n==> [{:4.1} s] {text}", started.elapsed().as_secs_f64());
}

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .unwrap_or_else(|| panic!("{name} is not set: run this through cargo xtask demo"))
        .into()
}

fn shim(vm: &Vm, args: &[&str]) -> String {
    let output = Command::new(shim_bin())
        .args(["--agent", &vm.agent_addr()])
        .args(args)
        .output()
        .expect("run socklb-shim");
    assert!(
        output.status.success(),
        "socklb-shim {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn mib(path: &PathBuf) -> f64 {
    std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / 1_048_576.0)
}

fn main() {
    let image = GuestImage {
        kernel: env_path("SOCKLB_GUEST_KERNEL"),
        initrd: env_path("SOCKLB_GUEST_INITRD"),
    };
    let agent_binary = env_path("SOCKLB_GUEST_AGENT");

    step(&format!(
        "booting the sandbox VM: QEMU TCG, no NIC, vhost-user-vsock\n    kernel {}\n    initrd {}",
        image.kernel.display(),
        image.initrd.display()
    ));
    let started = Instant::now();
    let vm = Vm::boot(&image, "");
    println!(
        "    guest init up after {:.2} s",
        vm.booted_in.as_secs_f64()
    );

    step(&format!(
        "waiting for the agent's Health over hybrid vsock ({})",
        vm.agent_addr()
    ));
    let ready = eventually(Duration::from_secs(60), || {
        Command::new(shim_bin())
            .args(["--agent", &vm.agent_addr(), "--timeout", "2", "health"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(ready, "the agent did not answer Health within 60 s");
    let agent_ready = started.elapsed();
    print!("{}", shim(&vm, &["health"]));
    println!(
        "    agent ready {:.2} s after QEMU started",
        agent_ready.as_secs_f64()
    );

    let table = std::env::temp_dir().join(format!("socklb-demo-{}.yaml", std::process::id()));
    std::fs::write(&table, TABLE).expect("write the example table");
    step(&format!("socklb-shim apply -f {}", table.display()));
    let applying = Instant::now();
    print!("{}", shim(&vm, &["apply", "-f", table.to_str().unwrap()]));
    let _ = std::fs::remove_file(&table);
    let first_connect = loop {
        let result = vm.testkit(&["tcp", "10.96.0.20:80"]).remove(0);
        if result.get("backend").is_some() {
            break applying.elapsed();
        }
        assert!(
            applying.elapsed() < Duration::from_secs(30),
            "no translated connect: {result}"
        );
    };
    print!("{}", shim(&vm, &["list"]));

    step("inside the guest: 6 TCP connects to the ClusterIP 10.96.0.20:80");
    for result in vm.testkit(&["tcp", "10.96.0.20:80", "--count", "6"]) {
        println!(
            "    backend {} answered; getpeername {} getsockname {}",
            result["backend"], result["peer"], result["local"]
        );
    }

    step(
        "inside the guest: resolving web.default.svc.cluster.local (musl, nameserver 10.96.0.10 = kube-dns ClusterIP, UDP)",
    );
    let resolved = vm
        .testkit(&["resolve", "web.default.svc.cluster.local"])
        .remove(0);
    println!("    {resolved}");
    let address = resolved["addrs"][0]
        .as_str()
        .expect("an address")
        .to_string();
    let result = vm.testkit(&["tcp", &format!("{address}:80")]).remove(0);
    println!(
        "    then TCP to {address}:80: backend {}",
        result["backend"]
    );

    step("figures");
    println!(
        "    boot to agent ready (QEMU start to Health)  {:.2} s",
        agent_ready.as_secs_f64()
    );
    println!(
        "    shim apply to first translated connect      {:.0} ms (includes one guest-exec round trip)",
        first_connect.as_secs_f64() * 1e3
    );
    println!(
        "    initramfs                                   {:.1} MiB",
        mib(&image.initrd)
    );
    println!(
        "    agent binary (static, musl)                 {:.1} MiB",
        mib(&agent_binary)
    );
    println!(
        "    agent RSS in the guest                      {} KiB",
        vm.rss_kib("socklb-agent")
    );

    step("shutting down");
    drop(vm);
    println!("    done");
}
