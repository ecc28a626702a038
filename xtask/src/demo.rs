//! `cargo xtask demo`: the main job, a sandbox VM with a working ClusterIP.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    binaries, guest,
    process::{is_root, run, target_dir},
};

pub(crate) fn demo(kernel: guest::Kernel) -> Result<()> {
    if !is_root() {
        bail!("the demo runs QEMU with vhost-user devices: run as root");
    }
    let image = guest::image(kernel)?;
    binaries::build()?;
    run(Command::new(target_dir().join("debug/socklb-demo"))
        .env("SOCKLB_GUEST_KERNEL", &image.kernel)
        .env("SOCKLB_GUEST_INITRD", &image.initrd)
        .env("SOCKLB_GUEST_AGENT", &image.agent))
}
