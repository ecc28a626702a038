//! `cargo xtask bench`: every benchmark of socklb-bench, each writing its
//! tables to target/socklb/bench.

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
    let bench = target_dir().join("release/socklb-bench");
    run(Command::new(&bench).arg("hooks"))?;
    run(Command::new(&bench).arg("control-plane"))?;
    run(Command::new(&bench).arg("kube"))?;
    run(Command::new(&bench).arg("node"))?;
    run(Command::new(&bench).arg("datapath"))?;
    let mut guest_hooks = Command::new(&bench);
    guest_hooks.arg("guest-hooks");
    guest::with_images(&mut guest_hooks, &[guest::Kernel::Own, guest::Kernel::Kata])?;
    run(&mut guest_hooks)
}
