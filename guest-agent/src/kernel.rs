//! What the agent needs from the kernel, checked before anything is loaded,
//! and the filesystems it mounts when they are missing (initramfs as PID 1).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, FsType, statfs},
    unistd::geteuid,
};
use slog::{Logger, info, warn};

/// Where the agent mounts cgroup2 when the guest has none it can reach:
/// a directory of its own, never /sys/fs/cgroup, which belongs to the
/// guest's init (kata-agent mounts cgroup v1 there, a tmpfs and a hierarchy
/// per controller, which a cgroup2 mount over it would hide).
pub const DEFAULT_CGROUP: &str = "/run/socklb/cgroup";
/// Where the agent mounts bpffs when nothing is there yet.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf";
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Present only in a kernel built with CONFIG_BPF_JIT.
const BPF_JIT_ENABLE: &str = "/proc/sys/net/core/bpf_jit_enable";

/// Optional kernel features: the agent runs without them, but reports them
/// (log, Health.Version) since their absence costs something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Kernel BTF. Nothing socklb does needs it: the programs use no CO-RE
    /// relocations and no kernel types, and their maps carry their own BTF.
    pub btf: bool,
    pub jit: Jit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jit {
    On,
    /// The kernel has a JIT but `net.core.bpf_jit_enable` is 0.
    Disabled,
    /// No CONFIG_BPF_JIT (Kata's default guest kernel): the interpreter runs
    /// every hook.
    Absent,
}

impl Features {
    pub fn detect() -> Features {
        let jit = match std::fs::read_to_string(BPF_JIT_ENABLE) {
            Ok(value) if value.trim() == "0" => Jit::Disabled,
            Ok(_) => Jit::On,
            Err(_) => Jit::Absent,
        };
        Features {
            btf: Path::new(VMLINUX_BTF).exists(),
            jit,
        }
    }

    /// The names Health.Version lists.
    pub fn names(&self) -> Vec<&'static str> {
        vec![
            if self.btf {
                "kernel-btf"
            } else {
                "no-kernel-btf"
            },
            match self.jit {
                Jit::On => "bpf-jit",
                Jit::Disabled | Jit::Absent => "bpf-interpreter",
            },
        ]
    }

    /// Logs what the kernel lacks and what that costs.
    pub fn report(&self, log: &Logger) {
        match self.jit {
            Jit::On => {}
            Jit::Disabled => warn!(
                log,
                "the BPF JIT is off (net.core.bpf_jit_enable=0): \
                the hooks run interpreted, 1.6 to 3.0 times the JIT's time per hook as measured (README: Kata's guest kernel); \
                sysctl net.core.bpf_jit_enable=1 turns it on"
            ),
            Jit::Absent => warn!(
                log,
                "the kernel has no BPF JIT (CONFIG_BPF_JIT): \
                the hooks run interpreted, 2.0 to 3.4 times the JIT's time per hook as measured on Kata's kernel (README: Kata's guest kernel); \
                kernel-config/kata/socklb.conf adds it"
            ),
        }
        if !self.btf {
            info!(
                log,
                "the kernel has no BTF ({VMLINUX_BTF}); nothing socklb does needs it"
            );
        }
    }
}

/// Checks root, the cgroup and the bpffs directory, mounting cgroup2 and
/// bpffs where they are missing (initramfs as PID 1, Kata's initrd). With
/// no cgroup configured, the root of the first cgroup2 mount is used (a
/// systemd guest in hybrid mode has it at /sys/fs/cgroup/unified), else
/// cgroup2 is mounted at [`DEFAULT_CGROUP`]. Every missing piece is
/// reported, not only the first. Returns the cgroup to attach to.
pub fn prepare(cgroup: Option<&Path>, bpffs_dir: &Path, log: &Logger) -> Result<PathBuf> {
    let mut missing = Vec::new();
    if !geteuid().is_root() {
        missing.push(
            "socklb-agent must run as root (it loads and attaches eBPF programs)".to_string(),
        );
    }
    let cgroup = match cgroup {
        Some(path) => path.to_path_buf(),
        None => cgroup2_mount().unwrap_or_else(|| DEFAULT_CGROUP.into()),
    };
    if let Err(err) = ensure_fs(&cgroup, CGROUP2_SUPER_MAGIC, "cgroup2", DEFAULT_CGROUP, log) {
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
    Ok(cgroup)
}

/// The mount point of the first cgroup2 mount in /proc/self/mounts that is
/// still reachable by its path (not hidden under a later mount).
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    first_cgroup2(&mounts)
        .into_iter()
        .find(|dir| is_fs(dir, CGROUP2_SUPER_MAGIC))
}

fn first_cgroup2(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_source, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .collect()
}

/// /proc/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mounts_are_found_in_order_and_unescaped() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
            tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
            cgroup2 /run/my\\040cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            first_cgroup2(mounts),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/run/my cgroup")
            ]
        );
        assert!(first_cgroup2("proc /proc proc rw 0 0\n").is_empty());
    }

    #[test]
    fn features_name_what_is_missing() {
        let kata = Features {
            btf: false,
            jit: Jit::Absent,
        };
        assert_eq!(kata.names(), ["no-kernel-btf", "bpf-interpreter"]);
        let full = Features {
            btf: true,
            jit: Jit::On,
        };
        assert_eq!(full.names(), ["kernel-btf", "bpf-jit"]);
    }
}
