//! `cargo xtask setup`: installs what is missing, idempotently and quickly
//! when everything is there. Each command asks only for what it uses: the
//! demo on Debian's kernel builds no kernel and no fuzzer.

use std::{
    collections::BTreeSet,
    env,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::process::{cargo, output, run, step, workspace_root};

/// Tools from crates.io, at the versions CI builds with; moving one
/// forward here reinstalls it.
const BPF_LINKER: &str = "0.13.0";
const VHOST_DEVICE_VSOCK: &str = "0.3.0";
const CARGO_FUZZ: &str = "0.13.2";

/// What a command needs installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// The agent's eBPF programs: the pinned nightly with rust-src, and
    /// bpf-linker built against that nightly's LLVM.
    Ebpf,
    /// The guest's initramfs: busybox. (The musl target comes with the
    /// pinned stable toolchain, rust-toolchain.toml.)
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
    /// The real-client benchmark: wrk and nginx, and perf for its profile.
    RealClient,
    /// The guest-datapath benchmark's image: the kube-proxy baselines'
    /// Debian tools, copied into that image only.
    BenchGuest,
}

impl Need {
    /// What `cargo xtask test` needs: all but the real-client benchmark's
    /// client and server (the bench image's tools: a VM test checks its
    /// baselines).
    pub(crate) const TESTS: &[Need] = &[
        Need::Ebpf,
        Need::GuestImage,
        Need::KernelBuild,
        Need::Vm,
        Need::HostTests,
        Need::Fuzz,
        Need::BenchGuest,
    ];

    /// Everything: what the tests need and the real-client benchmark's
    /// client and server.
    pub(crate) fn all() -> Vec<Need> {
        let mut all = Need::TESTS.to_vec();
        all.push(Need::RealClient);
        all
    }

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
            // The benchmark starts its own nginx, with its own configuration,
            // in a network namespace; the package's service is not started
            // (see `ServiceStartsDenied`).
            Need::RealClient => &["wrk", "nginx", "linux-perf"],
            Need::BenchGuest => &["ipvsadm", "iptables", "nftables"],
        }
    }
}

/// Installs what `needs` lists and is missing; each install says how long
/// it took.
pub(crate) fn setup(needs: &[Need]) -> Result<()> {
    // A package two needs share is named once.
    let packages: BTreeSet<&str> = needs
        .iter()
        .flat_map(|n| n.apt_packages())
        .copied()
        .collect();
    apt_packages(&packages)?;
    if needs.contains(&Need::Ebpf) {
        ebpf_toolchain()?;
        bpf_linker()?;
    }
    if needs.contains(&Need::Vm) {
        vhost_device_vsock()?;
    }
    if needs.contains(&Need::Fuzz) {
        cargo_fuzz()?;
    }
    Ok(())
}

/// The vhost-user vsock device of the test VM; the host talks to the guest
/// through its unix socket (hybrid vsock).
fn vhost_device_vsock() -> Result<()> {
    if reports_version(&mut Command::new("vhost-device-vsock"), VHOST_DEVICE_VSOCK) {
        return Ok(());
    }
    step("setup: installing vhost-device-vsock", || {
        run(&mut cargo_install("vhost-device-vsock", VHOST_DEVICE_VSOCK))
    })
}

fn cargo_fuzz() -> Result<()> {
    if reports_version(cargo().arg("fuzz"), CARGO_FUZZ) {
        return Ok(());
    }
    step("setup: installing cargo-fuzz", || {
        run(&mut cargo_install("cargo-fuzz", CARGO_FUZZ))
    })
}

/// Whether `command --version` runs and says `NAME version`.
fn reports_version(command: &mut Command, version: &str) -> bool {
    command.arg("--version").output().is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1) == Some(version)
    })
}

/// `cargo install` of one version, with the dependencies it was released
/// with (its Cargo.lock).
fn cargo_install(name: &str, version: &str) -> Command {
    let mut command = cargo();
    command.args(["install", "--locked", "--force", name, "--version", version]);
    command
}

fn apt_packages(packages: &BTreeSet<&str>) -> Result<()> {
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
        let _no_starts = ServiceStartsDenied::install()?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    })
}

/// Debian's policy-rc.d answering 101 ("action forbidden") while setup
/// installs packages: their services (nginx's on port 80) are not started
/// on this machine, as the tools are only run by the tests and benchmarks
/// themselves. A policy already in place is left as it is.
struct ServiceStartsDenied(Option<&'static Path>);

impl ServiceStartsDenied {
    const POLICY: &'static str = "/usr/sbin/policy-rc.d";

    fn install() -> Result<ServiceStartsDenied> {
        let policy = Path::new(Self::POLICY);
        if policy.exists() {
            return Ok(ServiceStartsDenied(None));
        }
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask setup: no service starts\nexit 101\n",
        )
        .with_context(|| format!("cannot write {}", policy.display()))?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
        Ok(ServiceStartsDenied(Some(policy)))
    }
}

impl Drop for ServiceStartsDenied {
    fn drop(&mut self) {
        if let Some(policy) = self.0 {
            let _ = std::fs::remove_file(policy);
        }
    }
}

/// The eBPF programs' toolchain, the dated nightly that
/// ebpf/programs/rust-toolchain.toml names (guest-agent's build.rs reads
/// the same file).
pub(crate) fn ebpf_toolchain_name() -> Result<String> {
    let file = workspace_root().join("ebpf/programs/rust-toolchain.toml");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"').to_string())
        .with_context(|| format!("{} names no channel", file.display()))
}

/// The pinned nightly with rust-src (the programs build `core` from source)
/// and clippy.
fn ebpf_toolchain() -> Result<()> {
    let toolchain = ebpf_toolchain_name()?;
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        &toolchain,
        "--installed",
    ]))
    .unwrap_or_default();
    let has = |component: &str| installed.lines().any(|l| l.starts_with(component));
    if has("rust-src") && has("clippy") {
        return Ok(());
    }
    step(&format!("setup: installing {toolchain} for eBPF"), || {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy",
        ]))
    })
}

/// bpf-linker must link with the eBPF nightly's own LLVM: build it against
/// the toolchain's libLLVM, through a prefix directory that outlives the
/// build (its path is baked into bpf-linker as rpath). The prefix links to
/// the library by its file name, which carries the LLVM and rustc versions:
/// a toolchain with the same library only moves the links.
fn bpf_linker() -> Result<()> {
    let toolchain = ebpf_toolchain_name()?;
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args([&format!("+{toolchain}"), "--print", "sysroot"]))?
            .trim(),
    );
    let verbose =
        output(Command::new("rustc").args([&format!("+{toolchain}"), "--version", "--verbose"]))?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .with_context(|| format!("rustc +{toolchain} does not report its LLVM version"))?
        .to_string();
    let libllvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}")))
        })
        .with_context(|| format!("no libLLVM.so.{llvm_major}* in {}/lib", sysroot.display()))?;
    let soname = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a file name")
        .to_string();

    let home = env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/share/socklb/bpf-llvm");
    // The build links `-lLLVM`; the binary then loads the library by its
    // soname from the rpath, so the prefix offers both names.
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so", &soname] {
        link(&libllvm, &prefix.join("lib").join(name))?;
    }
    let stamp = prefix.join("built-against");
    if reports_version(&mut Command::new("bpf-linker"), BPF_LINKER)
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s == soname)
    {
        return Ok(());
    }
    step(
        &format!("setup: building bpf-linker against {soname}"),
        || {
            run(cargo_install("bpf-linker", BPF_LINKER)
                .args(["--no-default-features", "--features"])
                .arg(format!("llvm-{llvm_major}"))
                .env("LLVM_PREFIX", &prefix))
        },
    )?;
    std::fs::write(&stamp, soname)?;
    Ok(())
}

/// Points `link` at `target`, unless it already does (a running bpf-linker
/// may be loading the library through it).
fn link(target: &Path, link: &Path) -> Result<()> {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {}", link.display()))
}
