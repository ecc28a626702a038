//! `cargo xtask setup|build|test`: everything a fresh machine needs, and the
//! project's checks, behind one command each.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};

mod guest;

const USAGE: &str = "usage: cargo xtask <command>
  setup   install what is missing (apt packages, nightly rust-src, bpf-linker); idempotent
  build   build the agent (with its eBPF programs) and the test binaries
  test    setup, then formatting, clippy, unit and integration tests, a short fuzz run (needs root)
  demo    a sandbox VM with a working ClusterIP (--kernel own|debian, default own)
  guest   build the guest image (--kernel own|debian|kata, default own)
  kata-rootfs DIR [--initrd]
          install the static agent into a Kata osbuilder rootfs directory: its systemd
          unit wanted by kata-containers.target, or (--initrd, kata-agent as /sbin/init)
          socklb's init in front of kata-agent
  bench   per-hook cost, control plane, Kubernetes translation, the node daemon at 200
          sandboxes against one shim per sandbox, and the datapath against
          direct, iptables and nftables; tables and a plot in target/socklb/bench (needs root)";

/// Debian packages the build and the tests use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",         // ip netns / veth for the test sandboxes
    "libc-bin",         // getent: a real glibc resolver in the DNS test
    "qemu-system-x86",  // the test VM (TCG)
    "busybox-static",   // the guest's init and tools
    "linux-source-6.1", // the project's own guest kernel ...
    "bc",               // ... and what building it takes
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "dwarves", // pahole: kernel BTF
    "xz-utils",
    "systemd", // systemd-analyze verify: the Kata image's unit
];

fn main() -> ExitCode {
    let command = env::args().nth(1).unwrap_or_default();
    let result = match command.as_str() {
        "setup" => setup(),
        "build" => setup().and_then(|()| build()),
        "test" => setup().and_then(|()| test()),
        "bench" => setup().and_then(|()| bench()),
        "demo" => setup().and_then(|()| demo()),
        "kata-rootfs" => kata_rootfs(),
        "guest" => setup().and_then(|()| {
            let kernel = guest::Kernel::parse(&kernel_arg().unwrap_or_else(|| "own".into()))?;
            let image = guest::image(kernel)?;
            println!(
                "kernel {}\ninitrd {}",
                image.kernel.display(),
                image.initrd.display()
            );
            Ok(())
        }),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask {command}: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The value of `--kernel own|debian`, if given.
fn kernel_arg() -> Option<String> {
    let args: Vec<String> = env::args().collect();
    args.windows(2)
        .find(|w| w[0] == "--kernel")
        .map(|w| w[1].clone())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn run(command: &mut Command) -> Result<()> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn setup() -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    musl_target()?;
    bpf_linker()?;
    cargo_fuzz()?;
    vhost_device_vsock()?;
    Ok(())
}

/// The guest's agent is a static musl binary.
fn musl_target() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l == guest::MUSL_TARGET) {
        return Ok(());
    }
    eprintln!("setup: adding the {} target", guest::MUSL_TARGET);
    run(Command::new("rustup").args(["target", "add", guest::MUSL_TARGET]))
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
    eprintln!("setup: installing vhost-device-vsock (about a minute)");
    run(cargo().args(["install", "vhost-device-vsock"]))
}

fn cargo_fuzz() -> Result<()> {
    let installed = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz (about a minute)");
    run(cargo().args(["install", "cargo-fuzz"]))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
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
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
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
    eprintln!("setup: adding rust-src to the nightly toolchain (eBPF builds core from source)");
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
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
    eprintln!("setup: building bpf-linker against {wanted} (about a minute)");
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
    )?;
    std::fs::write(&stamp, wanted)?;
    Ok(())
}

/// The agent, the shim and the test programs (servers, clients, bench, demo).
fn build_binaries(release: bool) -> Result<()> {
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

fn build() -> Result<()> {
    build_binaries(false)
}

fn test() -> Result<()> {
    if !is_root() {
        bail!("the integration tests create cgroups, namespaces and bpffs mounts: run as root");
    }
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "socklb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The programs build only for the BPF target, with nightly's build-std.
    run(Command::new("rustup").current_dir(workspace_root()).args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        "socklb-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    build()?;
    remove_leftovers()?;
    // The VM tests boot both guest kernels; they are the ignored tests.
    let mut test = cargo();
    test.args([
        "test",
        "--workspace",
        "--exclude",
        "socklb-ebpf",
        "--",
        "--include-ignored",
    ]);
    with_guest_images(
        &mut test,
        &[
            guest::Kernel::Own,
            guest::Kernel::Debian,
            guest::Kernel::Kata,
        ],
    )?;
    run(&mut test)?;
    // A short run of the API decode + validation fuzzer: long enough to
    // catch a regression in what it has covered before.
    run(Command::new("rustup")
        .current_dir(workspace_root().join("protocols/fuzz"))
        .args([
            "run",
            "nightly",
            "cargo",
            "fuzz",
            "run",
            "decode_validate",
            "--",
            "-max_total_time=15",
        ]))
}

fn bench() -> Result<()> {
    if !is_root() {
        bail!("the benchmarks create cgroups, namespaces and bpffs mounts: run as root");
    }
    build_binaries(true)?;
    remove_leftovers()?;
    let bench = workspace_root().join("target/release/socklb-bench");
    run(Command::new(&bench).arg("hooks"))?;
    run(Command::new(&bench).arg("control-plane"))?;
    run(Command::new(&bench).arg("kube"))?;
    run(Command::new(&bench).arg("node"))?;
    run(Command::new(&bench).arg("datapath"))?;
    let mut guest_hooks = Command::new(&bench);
    guest_hooks.arg("guest-hooks");
    with_guest_images(&mut guest_hooks, &[guest::Kernel::Own, guest::Kernel::Kata])?;
    run(&mut guest_hooks)
}

/// Builds the guest images of `kernels` and tells `command` where they are
/// (SOCKLB_GUEST_<KERNEL>_KERNEL and _INITRD, read by tests::vm).
fn with_guest_images(command: &mut Command, kernels: &[guest::Kernel]) -> Result<()> {
    for kernel in kernels {
        let image = guest::image(*kernel)?;
        let prefix = format!("SOCKLB_GUEST_{}", kernel.name().to_uppercase());
        command.env(format!("{prefix}_KERNEL"), image.kernel);
        command.env(format!("{prefix}_INITRD"), image.initrd);
    }
    Ok(())
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!("the demo runs QEMU with vhost-user devices: run as root");
    }
    let kernel = guest::Kernel::parse(&kernel_arg().unwrap_or_else(|| "own".into()))?;
    let image = guest::image(kernel)?;
    build()?;
    run(
        Command::new(workspace_root().join("target/debug/socklb-demo"))
            .env("SOCKLB_GUEST_KERNEL", &image.kernel)
            .env("SOCKLB_GUEST_INITRD", &image.initrd)
            .env("SOCKLB_GUEST_AGENT", &image.agent),
    )
}

/// `cargo xtask kata-rootfs DIR [--initrd]`.
fn kata_rootfs() -> Result<()> {
    let args: Vec<String> = env::args().skip(2).collect();
    let mut flavour = socklb_rootfs::kata::Flavour::Systemd;
    let mut dir = None;
    for arg in &args {
        match arg.as_str() {
            "--initrd" => flavour = socklb_rootfs::kata::Flavour::Initrd,
            other if other.starts_with('-') => bail!("kata-rootfs: unknown option {other:?}"),
            other if dir.is_none() => dir = Some(PathBuf::from(other)),
            other => bail!("kata-rootfs: one directory only ({other:?} is a second)"),
        }
    }
    let dir = dir.context("kata-rootfs DIR [--initrd]: DIR is the rootfs rootfs.sh made")?;
    musl_target()?;
    let agent = guest::static_agent()?;
    let written = socklb_rootfs::kata::install(&dir, &agent, flavour)?;
    for path in written {
        println!("{}", dir.join(path).display());
    }
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// Removes what an interrupted earlier test run left: the harness names
/// everything `socklb-t<pid>-<n>` and that process is gone.
fn remove_leftovers() -> Result<()> {
    let alive = |name: &str| {
        name.strip_prefix("socklb-t")
            .and_then(|rest| rest.split('-').next())
            .is_some_and(|pid| Path::new("/proc").join(pid).exists())
    };
    for line in output(Command::new("ip").args(["netns", "list"]))?.lines() {
        let ns = line.split_whitespace().next().unwrap_or_default();
        if ns.starts_with("socklb-t") && !alive(ns) {
            run(Command::new("ip").args(["netns", "del", ns]))?;
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(dir), Some(fstype)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        let owner = Path::new(dir).components().find_map(|c| {
            let c = c.as_os_str().to_str()?;
            c.starts_with("socklb-t").then_some(c)
        });
        match (*fstype, owner) {
            ("bpf", Some(owner)) if !alive(owner) => run(Command::new("umount").args(["-l", dir]))?,
            ("cgroup2", _) => {
                for entry in std::fs::read_dir(dir)?.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with("socklb-t") && !alive(&name) {
                        std::fs::remove_dir(entry.path()).with_context(|| {
                            format!("cannot remove cgroup {}", entry.path().display())
                        })?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}
