//! `cargo xtask bench`: every benchmark of socklb-bench, each writing its
//! tables to target/socklb/bench and docs/bench (which the docs link to).

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    binaries, guest,
    process::{is_root, run, target_dir},
    test,
};

pub(crate) fn bench() -> Result<()> {
    if !is_root() {
        bail!("the benchmarks create cgroups, namespaces and bpffs mounts: run as root");
    }
    binaries::build_binaries(true)?;
    test::remove_leftovers()?;
    // The agent as a Kata guest runs it: its memory depends on the C
    // library's allocator (glibc keeps far more of a Sync's peak).
    let guest_agent = guest::static_binaries()?.join("socklb-agent");
    let bench = target_dir().join("release/socklb-bench");
    let socklb_bench = |name: &str| {
        let mut command = Command::new(&bench);
        command.arg(name).env("SOCKLB_AGENT_BIN", &guest_agent);
        command
    };
    for name in [
        "hooks",
        "control-plane",
        "sockets",
        "kube",
        "node",
        "datapath",
        "real-client",
    ] {
        run(&mut socklb_bench(name))?;
    }
    let mut guest_hooks = Command::new(&bench);
    guest_hooks.arg("guest-hooks");
    guest::with_images(&mut guest_hooks, &[guest::Kernel::Own, guest::Kernel::Kata])?;
    run(&mut guest_hooks)?;
    let mut guest_datapath = Command::new(&bench);
    guest_datapath.arg("guest-datapath");
    guest::with_images(&mut guest_datapath, &[guest::Kernel::Bench])?;
    run(&mut guest_datapath)
}
