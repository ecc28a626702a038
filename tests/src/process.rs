//! Child processes of tests that cannot outlive them.

use std::{os::unix::process::CommandExt as _, process::Command};

use nix::sys::signal::Signal;

/// Makes the kernel kill the child when the process that started it dies,
/// so a test or benchmark killed outright leaves no servers, agents or VMs
/// behind.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    // SAFETY: only prctl(2) between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        })
    }
}
