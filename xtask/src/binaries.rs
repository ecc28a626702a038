//! `cargo xtask build`: the host binaries the tests, the bench and the demo
//! run.

use anyhow::Result;

use crate::process::{cargo, run};

/// The agent, the shim and the test programs (servers, clients, bench, demo).
pub(crate) fn build_binaries(release: bool) -> Result<()> {
    let mut command = cargo();
    command.arg("build");
    if release {
        command.arg("--release");
    }
    run(command.args([
        "-p",
        "socklb-agent",
        "-p",
        "socklb-shim",
        "-p",
        "socklb-testkit",
        "-p",
        "socklb-tests",
        "--bins",
    ]))
}

pub(crate) fn build() -> Result<()> {
    build_binaries(false)
}
