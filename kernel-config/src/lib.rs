//! socklb's guest kernels and what socklb needs of a kernel.
//!
//! - The project's own kernel: fragments (one per concern, a reason beside
//!   each option) on tinyconfig.
//! - Kata's default guest kernel: Kata's option list on allnoconfig, as
//!   Kata's own build merges it (no BTF, no JIT, no modules).
//! - What the agent requires of any kernel (`agent-required.config`) and
//!   what it recommends on top of Kata's (`kata/socklb.conf`, a fragment
//!   in Kata's format), judged by `socklb-kernel-check`.
//!
//! Both kernels are built from Debian's `linux-source-6.1` and cached by
//! the hash of their inputs.

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

/// What the agent cannot run without, on any kernel.
pub const AGENT_REQUIRED: Fragment = Fragment {
    name: "agent-required",
    text: include_str!("../agent-required.config"),
};

/// What socklb recommends on top of Kata's guest kernel, in Kata's fragment
/// format.
pub const KATA_RECOMMENDED: Fragment = Fragment {
    name: "kata/socklb.conf",
    text: include_str!("../kata/socklb.conf"),
};

/// Kata's default x86_64 guest kernel options.
pub const KATA_GUEST_CONFIG: &str = include_str!("../kata/guest-kernel-x86_64.config");

/// Every option `fragment` sets to `y`, each with the comment block above
/// it as the reason.
pub fn options_of(fragment: &Fragment) -> Vec<Requirement> {
    let mut requirements = Vec::new();
    let mut reason = String::new();
    let mut in_comment = false;
    for line in fragment.text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            // A comment block after options or a blank line starts a new reason.
            if !in_comment {
                reason.clear();
            }
            if !reason.is_empty() {
                reason.push(' ');
            }
            reason.push_str(comment);
            in_comment = true;
        } else if let Some(option) = line.strip_suffix("=y") {
            requirements.push(Requirement {
                option: option.to_string(),
                fragment: fragment.name,
                reason: reason.clone(),
            });
            in_comment = false;
        } else {
            in_comment = false;
        }
    }
    requirements
}

/// Every option the own kernel's fragments set to `y`.
pub fn requirements() -> Vec<Requirement> {
    FRAGMENTS.iter().flat_map(options_of).collect()
}

/// A kernel configuration judged for socklb.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Options the agent cannot run without.
    pub required: Vec<Missing>,
    /// Options that cost speed or features when absent.
    pub recommended: Vec<Missing>,
}

/// Judges `config` (a kernel .config) against what the agent requires and
/// recommends; modules count as present when `modules_allowed`.
pub fn judge(config: &str, modules_allowed: bool) -> Verdict {
    Verdict {
        required: missing(config, options_of(&AGENT_REQUIRED), modules_allowed),
        recommended: missing(config, options_of(&KATA_RECOMMENDED), modules_allowed),
    }
}

/// The options of `config` (a kernel .config) that fail the own kernel's
/// fragments. A module (`=m`) passes when `modules_allowed`: a kernel like
/// Debian's loads virtio and vsock as modules.
pub fn check(config: &str, modules_allowed: bool) -> Vec<Missing> {
    missing(config, requirements(), modules_allowed)
}

fn missing(config: &str, wanted: Vec<Requirement>, modules_allowed: bool) -> Vec<Missing> {
    let values: std::collections::HashMap<&str, &str> = config
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    wanted
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

/// Which guest kernel to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// tinyconfig + the project's fragments.
    Own,
    /// allnoconfig + Kata's default option list, as Kata merges it.
    Kata,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Own => "own",
            Flavour::Kata => "kata",
        }
    }

    /// The make target the fragments are merged onto, and the fragments.
    fn recipe(self) -> (&'static str, Vec<(&'static str, &'static str)>) {
        match self {
            Flavour::Own => (
                "tinyconfig",
                FRAGMENTS.iter().map(|f| (f.name, f.text)).collect(),
            ),
            Flavour::Kata => ("allnoconfig", vec![("kata", KATA_GUEST_CONFIG)]),
        }
    }
}

/// Hash of a flavour's inputs and the kernel source version: the cache key.
pub fn fragments_hash(flavour: Flavour, source_version: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(source_version.as_bytes());
    let (base, fragments) = flavour.recipe();
    hasher.update(base.as_bytes());
    for (name, text) in fragments {
        hasher.update(name.as_bytes());
        hasher.update(text.as_bytes());
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

/// Builds (or finds in `cache`) a bzImage of Debian's kernel source for
/// `flavour`. Fails when the final configuration lacks an option the own
/// fragments set, or (Kata) one the agent requires: options 6.1 does not
/// know drop out of Kata's list, and the check says whether that matters.
/// `progress` receives a line per step.
pub fn build(
    flavour: Flavour,
    cache: &Path,
    jobs: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let source_version = debian_package_version("linux-source-6.1")?;
    let prefix = format!("kernel-{}-", flavour.name());
    let out = cache.join(format!(
        "{prefix}{}",
        fragments_hash(flavour, &source_version)
    ));
    let image = out.join("bzImage");
    let what = format!("guest kernel ({})", flavour.name());
    if image.exists() {
        progress(&format!("{what}: cached {}", image.display()));
        return Ok(image);
    }
    let source = cache.join(format!("linux-source-{source_version}"));
    if !source.join("Makefile").exists() {
        progress(&format!("{what}: unpacking {SOURCE_TARBALL}"));
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
    let (base, fragments) = flavour.recipe();
    let fragment_paths: Vec<PathBuf> = fragments
        .iter()
        .map(|(name, text)| {
            let path = out.join(format!("{name}.config"));
            std::fs::write(&path, text).map(|()| path)
        })
        .collect::<Result<_, _>>()?;
    // ARCH=x86_64: allnoconfig would otherwise pick a 32-bit kernel.
    let make = |args: &[&str]| {
        let mut command = Command::new("make");
        command
            .arg("-C")
            .arg(&source)
            .arg(format!("O={}", build_dir.display()))
            .arg("ARCH=x86_64")
            .args(args);
        command
    };
    progress(&format!("{what}: {base} + fragments"));
    match flavour {
        Flavour::Own => {
            run(&mut make(&[base]))?;
            run(Command::new(source.join("scripts/kconfig/merge_config.sh"))
                .current_dir(&build_dir)
                .env("ARCH", "x86_64")
                .args(["-m", "-O"])
                .arg(&build_dir)
                .arg(build_dir.join(".config"))
                .args(&fragment_paths))?;
            run(&mut make(&["olddefconfig"]))?;
        }
        // As Kata's build-kernel.sh does: the list as KCONFIG_ALLCONFIG of
        // allnoconfig, so whatever it leaves out stays off.
        Flavour::Kata => run(Command::new(source.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&source)
            .env("ARCH", "x86_64")
            .args(["-n", "-O"])
            .arg(&build_dir)
            .args(&fragment_paths))?,
    }
    let config = std::fs::read_to_string(build_dir.join(".config"))?;
    let missing = match flavour {
        Flavour::Own => check(&config, false),
        Flavour::Kata => judge(&config, false).required,
    };
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
        bail!(
            "the merged {} kernel configuration lacks options socklb needs:\n  {}",
            flavour.name(),
            list.join("\n  ")
        );
    }
    progress(&format!("{what}: make -j{jobs} bzImage (a few minutes)"));
    let started = std::time::Instant::now();
    run(&mut make(&[&format!("-j{jobs}"), "bzImage"]))?;
    std::fs::copy(build_dir.join("arch/x86/boot/bzImage"), &image)?;
    std::fs::copy(build_dir.join(".config"), out.join("config"))?;
    std::fs::write(
        out.join("build-seconds"),
        format!("{:.0}\n", started.elapsed().as_secs_f64()),
    )?;
    // The object tree is large and not needed once the image is cached;
    // images of older inputs of this flavour are stale.
    std::fs::remove_dir_all(&build_dir)?;
    for entry in std::fs::read_dir(cache)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && entry.path() != out {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    progress(&format!(
        "{what}: built {} in {:.0} s",
        image.display(),
        started.elapsed().as_secs_f64()
    ));
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
        let own = |version| fragments_hash(Flavour::Own, version);
        assert_eq!(own("6.1.1"), own("6.1.1"));
        assert_ne!(own("6.1.1"), own("6.1.2"));
        assert_ne!(own("6.1.1"), fragments_hash(Flavour::Kata, "6.1.1"));
    }

    #[test]
    fn kata_fragment_adds_only_what_kata_lacks() {
        let recommended = options_of(&KATA_RECOMMENDED);
        assert!(!recommended.is_empty());
        for option in &recommended {
            assert!(!option.reason.is_empty(), "{} has no reason", option.option);
            assert!(
                !KATA_GUEST_CONFIG
                    .lines()
                    .any(|l| l.split_once('=').is_some_and(|(o, _)| o == option.option)),
                "{} is already in Kata's set",
                option.option
            );
        }
    }

    #[test]
    fn kata_kernel_runs_the_agent_and_lacks_what_is_recommended() {
        let verdict = judge(KATA_GUEST_CONFIG, false);
        assert!(verdict.required.is_empty(), "{:?}", verdict.required);
        let lacking: Vec<&str> = verdict
            .recommended
            .iter()
            .map(|m| m.requirement.option.as_str())
            .collect();
        assert_eq!(
            lacking,
            [
                "CONFIG_BPF_JIT",
                "CONFIG_INET_DIAG",
                "CONFIG_INET_UDP_DIAG",
                "CONFIG_INET_DIAG_DESTROY"
            ]
        );
        // With socklb's fragment merged, nothing is left to recommend.
        let merged = format!("{KATA_GUEST_CONFIG}{}", KATA_RECOMMENDED.text);
        assert!(judge(&merged, false).recommended.is_empty());
    }

    #[test]
    fn the_own_kernel_has_what_the_agent_requires() {
        let own: String = requirements()
            .iter()
            .map(|r| format!("{}=y\n", r.option))
            .collect();
        assert_eq!(judge(&own, false).required, Vec::new());
    }
}
