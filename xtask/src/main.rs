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
use setup::{Need, setup};

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
    /// Install what any command needs and is missing (apt packages, the
    /// pinned eBPF nightly, bpf-linker, vhost-device-vsock, cargo-fuzz);
    /// idempotent. Every command installs what it needs itself
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
        /// Debian's prebuilt kernel boots at once; own and kata are built
        /// from source the first time (minutes)
        #[arg(long, value_enum, default_value_t = guest::Kernel::Debian)]
        kernel: guest::Kernel,
    },
    /// Build the guest image only
    Guest {
        #[arg(long, value_enum, default_value_t = guest::Kernel::Debian)]
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
    process::start_clock();
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(&Need::all()),
        Task::Build => setup(&[Need::Ebpf]).and_then(|()| binaries::build()),
        Task::Test => setup(Need::TESTS).and_then(|()| test::test()),
        Task::Bench => setup(&[
            Need::Ebpf,
            Need::GuestImage,
            Need::KernelBuild,
            Need::Vm,
            Need::HostTests,
            Need::RealClient,
            Need::BenchGuest,
        ])
        .and_then(|()| bench::bench()),
        Task::Demo { kernel } => {
            setup(&guest_needs(kernel, &[Need::Vm])).and_then(|()| demo::demo(kernel))
        }
        Task::Guest { kernel } => {
            setup(&guest_needs(kernel, &[])).and_then(|()| print_image(kernel))
        }
        Task::KataRootfs { dir, initrd } => {
            setup(&[Need::Ebpf]).and_then(|()| kata_rootfs::kata_rootfs(&dir, initrd))
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

/// What building the guest image for `kernel` needs, and `more`.
fn guest_needs(kernel: guest::Kernel, more: &[Need]) -> Vec<Need> {
    let mut needs = vec![Need::Ebpf, Need::GuestImage];
    if kernel != guest::Kernel::Debian {
        needs.push(Need::KernelBuild);
    }
    if kernel == guest::Kernel::Bench {
        needs.push(Need::BenchGuest);
    }
    needs.extend_from_slice(more);
    needs
}

fn print_image(kernel: guest::Kernel) -> Result<()> {
    let image = guest::image(kernel, &guest::static_binaries()?)?;
    println!(
        "kernel {}\ninitrd {}",
        image.kernel.display(),
        image.initrd.display()
    );
    Ok(())
}
