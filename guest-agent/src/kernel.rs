//! What the agent needs from the kernel, checked before anything is loaded,
//! and the filesystems it mounts when they are missing (initramfs as PID 1).

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, FsType, statfs},
    unistd::geteuid,
};
use slog::{Logger, info};

/// Where the guest mounts cgroup2 and bpffs when nothing is there yet.
pub const DEFAULT_CGROUP: &str = "/sys/fs/cgroup";
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf";
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Checks root, BTF, the cgroup and the bpffs directory; mounts cgroup2 at
/// `/sys/fs/cgroup` and bpffs at `/sys/fs/bpf` when the configured paths
/// are those defaults and nothing is mounted there. Every missing piece is
/// reported, not only the first.
pub fn prepare(cgroup: &Path, bpffs_dir: &Path, log: &Logger) -> Result<()> {
    let mut missing = Vec::new();
    if !geteuid().is_root() {
        missing.push(
            "socklb-agent must run as root (it loads and attaches eBPF programs)".to_string(),
        );
    }
    if !Path::new(VMLINUX_BTF).exists() {
        missing.push(format!(
            "the kernel has no BTF ({VMLINUX_BTF} is missing; build it with CONFIG_DEBUG_INFO_BTF=y)"
        ));
    }
    if let Err(err) = ensure_fs(cgroup, CGROUP2_SUPER_MAGIC, "cgroup2", DEFAULT_CGROUP, log) {
        missing.push(format!("cgroup {}: {err:#}", cgroup.display()));
    }
    let bpffs_parent = bpffs_dir.parent().unwrap_or(Path::new("/"));
    if let Err(err) = ensure_fs(bpffs_parent, BPF_FS_MAGIC, "bpf", DEFAULT_BPFFS_ROOT, log) {
        missing.push(format!("bpffs directory {}: {err:#}", bpffs_dir.display()));
    }
    if !missing.is_empty() {
        bail!(
            "the kernel or system lacks what socklb needs:\n  - {}",
            missing.join("\n  - ")
        );
    }
    Ok(())
}

fn ensure_fs(path: &Path, magic: FsType, fstype: &str, default: &str, log: &Logger) -> Result<()> {
    if is_fs(path, magic) {
        return Ok(());
    }
    if path != Path::new(default) {
        if !path.exists() {
            bail!("does not exist");
        }
        bail!("is not on a {fstype} filesystem (mount -t {fstype} {fstype} DIR)");
    }
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    mount(
        Some(fstype),
        path,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "{fstype} is not mounted at {default} and mounting it failed (is it in the kernel?)"
        )
    })?;
    info!(log, "mounted"; "fstype" => fstype, "path" => default);
    Ok(())
}

fn is_fs(path: &Path, magic: FsType) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == magic)
}
