//! `cargo xtask setup`: installs what is missing, idempotently and quickly
//! when everything is there. Each command asks only for what it uses: the
//! demo on Debian's kernel builds no kernel and no fuzzer.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{
    guest,
    process::{cargo, output, run, step},
};

/// What a command needs installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// The agent's eBPF programs: nightly with rust-src, and bpf-linker
    /// built against nightly's LLVM.
    Ebpf,
    /// The guest's static binaries and initramfs: the musl target, busybox.
    GuestImage,
    /// A guest kernel built from source: linux-source-6.1 and what building
    /// it takes.
    KernelBuild,
    /// Booting the guest: QEMU, and vhost-device-vsock for its vsock.
    Vm,
    /// The tests and benchmarks on the host: network namespaces, the
    /// kube-proxy baselines, a glibc resolver, systemd-analyze.
    HostTests,
    /// The fuzz run: cargo-fuzz.
    Fuzz,
}

impl Need {
    pub(crate) const ALL: &[Need] = &[
        Need::Ebpf,
        Need::GuestImage,
        Need::KernelBuild,
        Need::Vm,
        Need::HostTests,
        Need::Fuzz,
    ];

    /// The Debian packages this need installs.
    fn apt_packages(self) -> &'static [&'static str] {
        match self {
            Need::Ebpf | Need::Fuzz => &[],
            Need::GuestImage => &[
                "busybox-static", // the guest's init and tools
            ],
            Need::KernelBuild => &[
                "linux-source-6.1",
                "bc",
                "bison",
                "flex",
                "libelf-dev",
                "libssl-dev",
                "dwarves", // pahole: kernel BTF
                "xz-utils",
            ],
            Need::Vm => &["qemu-system-x86"], // TCG
            Need::HostTests => &[
                "iproute2", // ip netns / veth for the test sandboxes
                "iptables", // kube-proxy's iptables mode, the datapath bench's baseline
                "nftables", // and its nftables mode
                "libc-bin", // getent: a real glibc resolver in the DNS test
                "systemd",  // systemd-analyze verify: the Kata image's unit
            ],
        }
    }
}

/// Installs what `needs` lists and is missing; each install says how long
/// it took.
pub(crate) fn setup(needs: &[Need]) -> Result<()> {
    let packages: Vec<&str> = needs
        .iter()
        .flat_map(|n| n.apt_packages())
        .copied()
        .collect();
    apt_packages(&packages)?;
    if needs.contains(&Need::Ebpf) {
        nightly_rust_src()?;
        bpf_linker()?;
    }
    if needs.contains(&Need::GuestImage) {
        musl_target()?;
    }
    if needs.contains(&Need::Vm) {
        vhost_device_vsock()?;
    }
    if needs.contains(&Need::Fuzz) {
        cargo_fuzz()?;
    }
    Ok(())
}

/// The guest's binaries are static musl binaries.
fn musl_target() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l == guest::MUSL_TARGET) {
        return Ok(());
    }
    step(
        &format!("setup: adding the {} target", guest::MUSL_TARGET),
        || run(Command::new("rustup").args(["target", "add", guest::MUSL_TARGET])),
    )
}

/// The vhost-user vsock device of the test VM; the host talks to the guest
/// through its unix socket (hybrid vsock).
fn vhost_device_vsock() -> Result<()> {
    if Command::new("vhost-device-vsock")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    step("setup: installing vhost-device-vsock", || {
        run(cargo().args(["install", "vhost-device-vsock"]))
    })
}

fn cargo_fuzz() -> Result<()> {
    let installed = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    step("setup: installing cargo-fuzz", || {
        run(cargo().args(["install", "cargo-fuzz"]))
    })
}

fn apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("setup: installing {}", missing.join(" ")), || {
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    })
}

fn nightly_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    step("setup: adding rust-src to the nightly toolchain", || {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
    })
}

/// bpf-linker must link with the nightly rustc's own LLVM: build it against
/// the toolchain's libLLVM, through a prefix directory that outlives the
/// build (its path is baked into bpf-linker as rpath).
fn bpf_linker() -> Result<()> {
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let verbose = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly does not report its LLVM version")?
        .to_string();
    let libllvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}")))
        })
        .with_context(|| format!("no libLLVM.so.{llvm_major}* in {}/lib", sysroot.display()))?;

    let home = env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/share/socklb/bpf-llvm");
    let stamp = prefix.join("built-against");
    let wanted = libllvm.display().to_string();
    let linker_works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if linker_works && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    step(
        &format!("setup: building bpf-linker against {wanted}"),
        || {
            std::fs::create_dir_all(prefix.join("lib"))?;
            // The build links `-lLLVM`; the binary then loads the library by its
            // soname from the rpath, so the prefix offers both names.
            let soname = libllvm.file_name().expect("a file");
            for name in [std::ffi::OsStr::new("libLLVM.so"), soname] {
                let link = prefix.join("lib").join(name);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&libllvm, &link)?;
            }
            run(
                Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .args([
                        "install",
                        "--force",
                        "bpf-linker",
                        "--no-default-features",
                        "--features",
                    ])
                    .arg(format!("llvm-{llvm_major}"))
                    .env("LLVM_PREFIX", &prefix),
            )
        },
    )?;
    std::fs::write(&stamp, wanted)?;
    Ok(())
}
