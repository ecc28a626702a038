//! `cargo xtask demo`: the main job, a sandbox VM with a working ClusterIP.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    guest,
    process::{is_root, run, step},
};

/// Builds what the demo runs, once (the static binaries serve the guest and
/// the host), then runs it.
pub(crate) fn demo(kernel: guest::Kernel) -> Result<()> {
    if !is_root() {
        bail!("the demo runs QEMU with vhost-user devices: run as root");
    }
    let binaries = guest::static_binaries()?;
    let image = guest::image(kernel, &binaries)?;
    step("the demo", || {
        run(Command::new(binaries.join("socklb-demo"))
            .env("SOCKLB_GUEST_KERNEL", &image.kernel)
            .env("SOCKLB_GUEST_INITRD", &image.initrd)
            .env("SOCKLB_GUEST_AGENT", &image.agent))
    })
}
