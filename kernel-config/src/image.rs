//! The cached bzImage builds from Debian's `linux-source-6.1`: the own
//! kernel (tinyconfig + fragments) and Kata's (allnoconfig + Kata's list).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::{
    check::{check, judge, missing},
    fragments::{BENCH_DATAPATH, FRAGMENTS, KATA_GUEST_CONFIG, options_of},
};

/// Which guest kernel to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// tinyconfig + the project's fragments.
    Own,
    /// The own kernel and the bench-only fragment (IPVS, netfilter NAT,
    /// network namespaces): the guest-datapath benchmark's.
    Bench,
    /// allnoconfig + Kata's default option list, as Kata merges it.
    Kata,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Own => "own",
            Flavour::Bench => "bench",
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
            Flavour::Bench => (
                "tinyconfig",
                FRAGMENTS
                    .iter()
                    .chain([&BENCH_DATAPATH])
                    .map(|f| (f.name, f.text))
                    .collect(),
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
    // ARCH=x86_64: allnoconfig would otherwise pick a 32-bit kernel. Nice'd:
    // `cargo xtask test` builds the kernels beside its cargo builds, which
    // go first; alone, a build takes the idle cores all the same. Without
    // Kbuild's check-local-export, an `nm | awk` after every object's
    // compile (5-9% of the CPU time of compiling fs/xfs and net/ipv4 of
    // Kata's config): a check on the kernel's own sources, a Debian
    // release here, that changes nothing it builds.
    let make = |args: &[&str]| {
        let mut command = Command::new("nice");
        command
            .args(["-n", "10", "make"])
            .arg("-C")
            .arg(&source)
            .arg(format!("O={}", build_dir.display()))
            .arg("ARCH=x86_64")
            .arg("cmd_check_local_export=")
            .args(args);
        command
    };
    progress(&format!("{what}: {base} + fragments"));
    match flavour {
        Flavour::Own | Flavour::Bench => {
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
        Flavour::Bench => {
            let mut own = check(&config, false);
            own.extend(missing(&config, options_of(&BENCH_DATAPATH), false));
            own
        }
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
