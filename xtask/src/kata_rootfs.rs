//! `cargo xtask kata-rootfs DIR [--initrd]`: socklb into a Kata guest
//! rootfs directory (the output of Kata's osbuilder `rootfs.sh`).

use std::path::Path;

use anyhow::Result;
use socklb_rootfs::kata::{self, Flavour};

use crate::guest;

pub(crate) fn kata_rootfs(dir: &Path, initrd: bool) -> Result<()> {
    let agent = guest::static_binaries()?.join("socklb-agent");
    let flavour = if initrd {
        Flavour::Initrd
    } else {
        Flavour::Systemd
    };
    for path in kata::install(dir, &agent, flavour)? {
        println!("{}", dir.join(path).display());
    }
    Ok(())
}
