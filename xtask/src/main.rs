//! `cargo xtask`: everything a fresh machine needs, and the project's
//! checks, behind one command each. One module per command.

mod bench;
mod binaries;
mod demo;
mod guest;
mod kata_rootfs;
mod process;
mod setup;
mod test;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "socklb's build, test and demo tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (apt packages, nightly rust-src, the musl
    /// target, bpf-linker, cargo-fuzz, vhost-device-vsock); idempotent
    Setup,
    /// Build the agent (with its eBPF programs), the shim and the test binaries
    Build,
    /// Setup, then formatting, clippy, unit and integration tests, the VM
    /// tests on three guest kernels, a short fuzz run (needs root)
    Test,
    /// Every benchmark; tables and plots in target/socklb/bench and
    /// docs/bench (needs root)
    Bench,
    /// A sandbox VM with a working ClusterIP (needs root)
    Demo {
        #[arg(long, value_enum, default_value_t = guest::Kernel::Own)]
        kernel: guest::Kernel,
    },
    /// Build the guest image only
    Guest {
        #[arg(long, value_enum, default_value_t = guest::Kernel::Own)]
        kernel: guest::Kernel,
    },
    /// Install the static agent into a Kata osbuilder rootfs directory: its
    /// systemd unit wanted by kata-containers.target, or (--initrd, kata-agent
    /// as /sbin/init) socklb's init in front of kata-agent
    KataRootfs {
        /// The rootfs directory Kata's rootfs.sh made
        dir: PathBuf,
        #[arg(long)]
        initrd: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup(),
        Task::Build => setup::setup().and_then(|()| binaries::build()),
        Task::Test => setup::setup().and_then(|()| test::test()),
        Task::Bench => setup::setup().and_then(|()| bench::bench()),
        Task::Demo { kernel } => setup::setup().and_then(|()| demo::demo(kernel)),
        Task::Guest { kernel } => setup::setup().and_then(|()| print_image(kernel)),
        Task::KataRootfs { dir, initrd } => {
            setup::setup().and_then(|()| kata_rootfs::kata_rootfs(&dir, initrd))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_image(kernel: guest::Kernel) -> Result<()> {
    let image = guest::image(kernel)?;
    println!(
        "kernel {}\ninitrd {}",
        image.kernel.display(),
        image.initrd.display()
    );
    Ok(())
}
