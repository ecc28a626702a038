//! The guest image: static musl binaries, a kernel (the project's own,
//! built from kernel-config/, or Debian's linux-image-cloud-amd64), and the
//! initramfs rootfs/ builds from them.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, anyhow};

use crate::process::{cargo, output, run, step, target_dir};

pub(crate) const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
const BUSYBOX: &str = "/bin/busybox";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kernel {
    /// tinyconfig + kernel-config/fragments, everything built in.
    Own,
    /// The own kernel and kernel-config/bench's fragment (IPVS, netfilter
    /// NAT, network namespaces), for the guest-datapath benchmark only.
    Bench,
    /// Debian's linux-image-cloud-amd64: vsock and virtio as modules.
    Debian,
    /// Kata's default guest kernel options (no BTF, JIT or modules); the
    /// image boots the way Kata's initrd does: socklb's init wrapper starts
    /// the agent, then execs (a stand-in for) kata-agent.
    Kata,
}

impl Kernel {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Own => "own",
            Kernel::Bench => "bench",
            Kernel::Debian => "debian",
            Kernel::Kata => "kata",
        }
    }
}

pub(crate) struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The static agent inside the initramfs.
    pub agent: PathBuf,
}

/// `$XDG_CACHE_HOME/socklb`, `~/.cache/socklb` without it (XDG's rule: a
/// relative XDG_CACHE_HOME is ignored): the guest kernels, each by the
/// hash of its inputs.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    let dir = base.join("socklb");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn progress(line: &str) {
    eprintln!("==> {line}");
}

/// The guest's programs besides the agent, each its package's name;
/// socklb-shim reaches the agent over the guest's loopback vsock, the
/// AF_VSOCK client path no test may open on the machine running it.
const GUEST_TOOLS: &[&str] = &["socklb-shim", "socklb-testkit"];

/// What the demo runs on the host, (package, binary): built with the
/// guest's binaries, as static musl binaries run on the host too.
const HOST_BINARIES: &[(&str, &str)] = &[
    ("socklb-shim", "socklb-shim"),
    ("socklb-tests", "socklb-demo"),
];

/// The static (musl) binaries of the guest and of the demo's host side,
/// release build, from one cargo run (one build of every dependency, for
/// every command that asks); the directory they are in.
pub(crate) fn static_binaries() -> Result<PathBuf> {
    step(
        "static binaries (musl, release): agent, shim, test tools, demo",
        || {
            let mut build = cargo();
            // Without socklb-shim's Kubernetes sources: neither the guest
            // nor the demo uses them, and kube-rs was a third of this build.
            build.args(["build", "--release", "--target", MUSL_TARGET]);
            build.arg("--no-default-features");
            build.args(["-p", "socklb-agent", "--bin", "socklb-agent"]);
            for name in GUEST_TOOLS {
                build.args(["-p", name, "--bin", name]);
            }
            for (package, name) in HOST_BINARIES {
                build.args(["-p", package, "--bin", name]);
            }
            run(&mut build)?;
            Ok(target_dir().join(MUSL_TARGET).join("release"))
        },
    )
}

/// A guest kernel and the modules its initramfs loads.
struct KernelImage {
    image: PathBuf,
    modules: Vec<PathBuf>,
}

/// Builds `kernel` or finds it in the cache.
fn kernel_image(kernel: Kernel) -> Result<KernelImage> {
    step(&format!("guest kernel ({})", kernel.name()), || {
        let flavour = match kernel {
            Kernel::Own => socklb_kernel::Flavour::Own,
            Kernel::Bench => socklb_kernel::Flavour::Bench,
            Kernel::Kata => socklb_kernel::Flavour::Kata,
            Kernel::Debian => return debian_kernel(),
        };
        let image = socklb_kernel::build(flavour, &cache_dir()?, 2, &mut |line| progress(line))?;
        Ok(KernelImage {
            image,
            modules: Vec::new(),
        })
    })
}

/// Builds what is missing of the guest image for `kernel`, with the
/// static binaries in `binaries`.
pub(crate) fn image(kernel: Kernel, binaries: &Path) -> Result<Guest> {
    initramfs(kernel, kernel_image(kernel)?, binaries)
}

/// The initramfs of `kernel` (built as `image`) with the static binaries
/// in `binaries`.
fn initramfs(kernel: Kernel, image: KernelImage, binaries: &Path) -> Result<Guest> {
    let agent = binaries.join("socklb-agent");
    let out = target_dir().join("socklb");
    std::fs::create_dir_all(&out)?;
    let initrd = out.join(format!("initramfs-{}.cpio.gz", kernel.name()));
    let spec = socklb_rootfs::Spec {
        boot: match kernel {
            Kernel::Own | Kernel::Bench | Kernel::Debian => socklb_rootfs::Boot::Test,
            Kernel::Kata => socklb_rootfs::Boot::KataInitrd,
        },
        agent: agent.clone(),
        binaries: GUEST_TOOLS.iter().map(|name| binaries.join(name)).collect(),
        busybox: BUSYBOX.into(),
        modules: image.modules,
        host_files: match kernel {
            Kernel::Bench => bench_tools()?,
            Kernel::Own | Kernel::Debian | Kernel::Kata => Vec::new(),
        },
    };
    step("guest initramfs", || {
        let size = socklb_rootfs::build(&spec, &initrd)?;
        progress(&format!(
            "initramfs {} ({:.1} MiB; agent {:.1} MiB)",
            initrd.display(),
            size as f64 / 1048576.0,
            std::fs::metadata(&agent)?.len() as f64 / 1048576.0
        ));
        Ok(())
    })?;
    Ok(Guest {
        kernel: image.image,
        initrd,
        agent,
    })
}

/// The bench image's kube-proxy baselines, Debian's tools (setup installs
/// them): ipvsadm, nft, and iptables (as `xtables-legacy-multi
/// iptables-restore`: iptables-nft's restore took more than 20 minutes for
/// 10,000 services in the emulated guest on its earlier SLOB kernel) with
/// the extensions it loads;
/// and iproute2's ip, for veth pairs with named peers and for `-batch`,
/// which puts 10,000 ClusterIPs on kube-ipvs0 in one process (busybox's ip
/// takes one address a process).
fn bench_tools() -> Result<Vec<PathBuf>> {
    const XTABLES: &str = "/usr/lib/x86_64-linux-gnu/xtables";
    let mut tools: Vec<PathBuf> = [
        "/usr/sbin/ip",
        "/usr/sbin/ipvsadm",
        "/usr/sbin/nft",
        "/usr/sbin/xtables-legacy-multi",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();
    for extension in std::fs::read_dir(XTABLES).with_context(|| format!("cannot list {XTABLES}"))? {
        tools.push(extension?.path());
    }
    Ok(tools)
}

/// Debian's cloud kernel, downloaded and unpacked into the cache (never
/// installed on this machine): the vmlinuz and the vsock modules.
fn debian_kernel() -> Result<KernelImage> {
    let depends = || output(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
    // A machine that never ran apt-get update knows no packages yet.
    let depends = match depends() {
        Ok(depends) => depends,
        Err(_) => {
            run(Command::new("apt-get").args(["update", "-q"]))?;
            depends()?
        }
    };
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .context("linux-image-cloud-amd64 names no kernel package")?
        .to_string();
    let dir = cache_dir()?.join("debian").join(&package);
    let root = dir.join("root");
    if !root.join("boot").exists() {
        progress(&format!("downloading {package}"));
        std::fs::create_dir_all(&dir)?;
        run(Command::new("apt-get")
            .current_dir(&dir)
            .args(["download", &package]))?;
        let deb = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        let unpacking = dir.join("unpacking");
        let _ = std::fs::remove_dir_all(&unpacking);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacking))?;
        std::fs::rename(&unpacking, &root)?;
        std::fs::remove_file(&deb)?;
    }
    let vmlinuz = only_entry(&root.join("boot"), "vmlinuz-")?;
    let release = vmlinuz
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix("vmlinuz-"))
        .context("vmlinuz name")?
        .to_string();
    let modules = socklb_rootfs::find_modules(
        &root.join("lib/modules").join(release),
        &socklb_rootfs::VSOCK_MODULES,
    )?;
    Ok(KernelImage {
        image: vmlinuz,
        modules,
    })
}

fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

/// Builds the guest images of `kernels` and tells `command` where they are
/// (SOCKLB_GUEST_<KERNEL>_KERNEL and _INITRD, read by tests::vm).
pub(crate) fn with_images(command: &mut Command, kernels: &[Kernel]) -> Result<()> {
    let builds = KernelBuilds::start(kernels);
    let binaries = static_binaries()?;
    builds.finish(command, &binaries)
}

/// Guest kernels building on a thread of their own, one after the other
/// (they share the unpacked source), beside the cargo builds of the same
/// command: a cargo build leaves a core idle in its serial crates and
/// links, and a kernel build (`make` runs nice'd) takes it.
pub(crate) struct KernelBuilds {
    kernels: Vec<Kernel>,
    thread: Option<JoinHandle<Result<Vec<KernelImage>>>>,
}

impl KernelBuilds {
    pub(crate) fn start(kernels: &[Kernel]) -> KernelBuilds {
        let kernels = kernels.to_vec();
        let building = kernels.clone();
        KernelBuilds {
            kernels,
            thread: Some(std::thread::spawn(move || {
                building.into_iter().map(kernel_image).collect()
            })),
        }
    }

    /// Waits for the kernels, builds each one's initramfs with the static
    /// binaries in `binaries`, and tells `command` where they are, as
    /// `with_images`.
    pub(crate) fn finish(mut self, command: &mut Command, binaries: &Path) -> Result<()> {
        let images = self.wait()?;
        for (kernel, image) in self.kernels.iter().zip(images) {
            let guest = initramfs(*kernel, image, binaries)?;
            let prefix = format!("SOCKLB_GUEST_{}", kernel.name().to_uppercase());
            command.env(format!("{prefix}_KERNEL"), guest.kernel);
            command.env(format!("{prefix}_INITRD"), guest.initrd);
        }
        Ok(())
    }

    fn wait(&mut self) -> Result<Vec<KernelImage>> {
        let thread = self
            .thread
            .take()
            .context("the kernel builds were waited for")?;
        thread
            .join()
            .map_err(|_| anyhow!("the guest kernel builds' thread panicked"))?
    }
}

/// A command that fails before it needs the kernels still lets their
/// builds finish (and be cached for the next run) rather than leave `make`
/// running after it exits; Ctrl-C stops both.
impl Drop for KernelBuilds {
    fn drop(&mut self) {
        if self.thread.is_some() {
            progress("waiting for the guest kernel builds to finish (they stay cached)");
            if let Err(err) = self.wait() {
                progress(&format!("guest kernel build: {err:#}"));
            }
        }
    }
}
