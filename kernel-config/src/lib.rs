//! socklb's guest kernel: the configuration fragments (one per concern,
//! a reason beside each option), a check of a kernel configuration against
//! them, and the build of a bzImage from Debian's `linux-source-6.1`
//! (tinyconfig + fragments), cached by the fragments' hash.

use std::{
    fmt,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

/// A configuration fragment.
pub struct Fragment {
    pub name: &'static str,
    pub text: &'static str,
}

pub const FRAGMENTS: [Fragment; 6] = [
    Fragment {
        name: "base",
        text: include_str!("../fragments/base.config"),
    },
    Fragment {
        name: "virtio",
        text: include_str!("../fragments/virtio.config"),
    },
    Fragment {
        name: "vsock",
        text: include_str!("../fragments/vsock.config"),
    },
    Fragment {
        name: "net",
        text: include_str!("../fragments/net.config"),
    },
    Fragment {
        name: "cgroup",
        text: include_str!("../fragments/cgroup.config"),
    },
    Fragment {
        name: "bpf",
        text: include_str!("../fragments/bpf.config"),
    },
];

/// One option a fragment requires, with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub option: String,
    pub fragment: &'static str,
    pub reason: String,
}

/// What a configuration lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub requirement: Requirement,
    /// The value found (`None`: not set at all).
    pub found: Option<String>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.requirement;
        match &self.found {
            Some(value) => write!(f, "{}={value} ({}: {})", r.option, r.fragment, r.reason),
            None => write!(f, "{} is not set ({}: {})", r.option, r.fragment, r.reason),
        }
    }
}

/// Every option the fragments set to `y`, each with the comment above it.
pub fn requirements() -> Vec<Requirement> {
    let mut requirements = Vec::new();
    for fragment in &FRAGMENTS {
        let mut reason = String::new();
        for line in fragment.text.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                reason = comment.to_string();
            } else if let Some(option) = line.strip_suffix("=y") {
                requirements.push(Requirement {
                    option: option.to_string(),
                    fragment: fragment.name,
                    reason: reason.clone(),
                });
            }
        }
    }
    requirements
}

/// The options of `config` (a kernel .config) that fail the fragments. A
/// module (`=m`) passes when `modules_allowed`: a kernel like Debian's
/// loads virtio and vsock as modules.
pub fn check(config: &str, modules_allowed: bool) -> Vec<Missing> {
    let values: std::collections::HashMap<&str, &str> = config
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    requirements()
        .into_iter()
        .filter_map(|requirement| {
            let found = values.get(requirement.option.as_str()).copied();
            match found {
                Some("y") => None,
                Some("m") if modules_allowed => None,
                _ => Some(Missing {
                    requirement,
                    found: found.map(String::from),
                }),
            }
        })
        .collect()
}

/// The running kernel's configuration: /proc/config.gz, else
/// /boot/config-<release>.
pub fn running_config() -> Result<(String, String)> {
    if let Ok(file) = std::fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)?;
        return Ok(("/proc/config.gz".into(), text));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let path = format!("/boot/config-{}", release.trim());
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("neither /proc/config.gz nor {path} is readable"))?;
    Ok((path, text))
}

/// Hash of the fragments and the kernel source version: the cache key.
pub fn fragments_hash(source_version: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(source_version.as_bytes());
    for fragment in &FRAGMENTS {
        hasher.update(fragment.name.as_bytes());
        hasher.update(fragment.text.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where Debian's linux-source-6.1 puts its tarball.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Builds (or finds in `cache`) a bzImage of Debian's kernel source with
/// tinyconfig + the fragments. Fails when the final configuration lacks an
/// option a fragment sets. `progress` receives a line per step.
pub fn build(cache: &Path, jobs: usize, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let source_version = debian_package_version("linux-source-6.1")?;
    let out = cache.join(format!("kernel-{}", fragments_hash(&source_version)));
    let image = out.join("bzImage");
    if image.exists() {
        progress(&format!("guest kernel: cached {}", image.display()));
        return Ok(image);
    }
    let source = cache.join(format!("linux-source-{source_version}"));
    if !source.join("Makefile").exists() {
        progress(&format!("guest kernel: unpacking {SOURCE_TARBALL}"));
        let unpacking = cache.join("linux-source-unpacking");
        let _ = std::fs::remove_dir_all(&unpacking);
        std::fs::create_dir_all(&unpacking)?;
        run(Command::new("tar")
            .args(["-xJf", SOURCE_TARBALL, "--strip-components=1", "-C"])
            .arg(&unpacking))?;
        std::fs::rename(&unpacking, &source)?;
    }
    let build_dir = out.join("build");
    std::fs::create_dir_all(&build_dir)?;
    let fragment_paths: Vec<PathBuf> = FRAGMENTS
        .iter()
        .map(|fragment| {
            let path = out.join(format!("{}.config", fragment.name));
            std::fs::write(&path, fragment.text).map(|()| path)
        })
        .collect::<Result<_, _>>()?;
    let make = |args: &[&str]| {
        let mut command = Command::new("make");
        command
            .arg("-C")
            .arg(&source)
            .arg(format!("O={}", build_dir.display()))
            .args(args);
        command
    };
    progress("guest kernel: tinyconfig + fragments");
    run(&mut make(&["tinyconfig"]))?;
    run(Command::new(source.join("scripts/kconfig/merge_config.sh"))
        .current_dir(&build_dir)
        .args(["-m", "-O"])
        .arg(&build_dir)
        .arg(build_dir.join(".config"))
        .args(&fragment_paths))?;
    run(&mut make(&["olddefconfig"]))?;
    let config = std::fs::read_to_string(build_dir.join(".config"))?;
    let missing = check(&config, false);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
        bail!(
            "the merged kernel configuration lacks fragment options:\n  {}",
            list.join("\n  ")
        );
    }
    progress(&format!(
        "guest kernel: make -j{jobs} bzImage (a few minutes)"
    ));
    run(&mut make(&[&format!("-j{jobs}"), "bzImage"]))?;
    std::fs::copy(build_dir.join("arch/x86/boot/bzImage"), &image)?;
    std::fs::copy(build_dir.join(".config"), out.join("config"))?;
    // The object tree is large and not needed once the image is cached;
    // images of other fragment versions are stale.
    std::fs::remove_dir_all(&build_dir)?;
    for entry in std::fs::read_dir(cache)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("kernel-") && entry.path() != out {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    progress(&format!("guest kernel: built {}", image.display()));
    Ok(image)
}

fn debian_package_version(package: &str) -> Result<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .context("dpkg-query")?;
    if !output.status.success() || output.stdout.is_empty() {
        bail!("{package} is not installed (cargo xtask setup installs it)");
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        bail!(
            "{command:?} failed ({}):\n{}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_has_a_reason() {
        let requirements = requirements();
        assert!(requirements.len() > 30);
        for r in &requirements {
            assert!(r.option.starts_with("CONFIG_"), "{r:?}");
            assert!(!r.reason.is_empty(), "{} has no reason", r.option);
        }
        for fragment in &FRAGMENTS {
            for line in fragment.text.lines() {
                assert!(
                    line.starts_with("# ") || line.ends_with("=y"),
                    "{}: unexpected line {line:?}",
                    fragment.name
                );
            }
        }
    }

    #[test]
    fn check_names_what_is_missing() {
        let full: String = requirements()
            .iter()
            .map(|r| format!("{}=y\n", r.option))
            .collect();
        assert!(check(&full, false).is_empty());
        let modular = full.replace("CONFIG_VIRTIO_VSOCKETS=y", "CONFIG_VIRTIO_VSOCKETS=m");
        assert!(check(&modular, true).is_empty());
        let missing = check(
            &modular.replace("CONFIG_CGROUP_BPF=y\n", "# CONFIG_CGROUP_BPF is not set\n"),
            false,
        );
        let text: Vec<String> = missing.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].starts_with("CONFIG_VIRTIO_VSOCKETS=m (vsock:"),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("CONFIG_CGROUP_BPF is not set (cgroup: BPF programs attached"),
            "{text:?}"
        );
    }

    #[test]
    fn hash_follows_fragments_and_source() {
        assert_eq!(fragments_hash("6.1.1"), fragments_hash("6.1.1"));
        assert_ne!(fragments_hash("6.1.1"), fragments_hash("6.1.2"));
    }
}
