//! `cargo xtask test`: formatting, clippy (host and BPF), unit and
//! integration tests, the VM tests on the three guest kernels, a short fuzz
//! run; and the removal of what an interrupted earlier run left.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{
    binaries, guest,
    process::{cargo, is_root, output, run, target_dir, workspace_root},
    setup,
};

pub(crate) fn test() -> Result<()> {
    if !is_root() {
        bail!("the integration tests create cgroups, namespaces and bpffs mounts: run as root");
    }
    // First what fails in seconds: a later failure waits for the kernels.
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The VM tests boot all three guest kernels, and the bench kernel for
    // the check that the guest benchmark's baselines translate: those
    // built from source take minutes, so they build from here on, beside
    // the cargo builds.
    let kernels = guest::KernelBuilds::start(&[
        guest::Kernel::Own,
        guest::Kernel::Debian,
        guest::Kernel::Kata,
        guest::Kernel::Bench,
    ]);
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
    let nightly = setup::ebpf_toolchain_name()?;
    run(Command::new("rustup").current_dir(workspace_root()).args([
        "run",
        &nightly,
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
    binaries::build()?;
    remove_leftovers()?;
    let binaries = guest::static_binaries()?;
    let test = || {
        let mut test = cargo();
        test.args(["test", "--workspace", "--exclude", "socklb-ebpf"]);
        test
    };
    // Unit and host integration tests need no kernel: they run while the
    // kernels may still build (their make is niced, the tests are not).
    run(&mut test())?;
    // The VM tests are the ignored tests, all in test targets.
    let mut vm_tests = test();
    vm_tests.args(["--tests", "--", "--ignored"]);
    kernels.finish(&mut vm_tests, &binaries)?;
    run(&mut vm_tests)?;
    // A short run of the API decode + validation fuzzer, starting from the
    // minimised corpus kept in the repository, so it re-checks what earlier
    // runs covered before it looks further. New inputs go to a scratch
    // corpus (libFuzzer writes only to the first directory): the kept one
    // changes only when someone minimises into it.
    let scratch = target_dir().join("socklb/fuzz-corpus/decode_validate");
    std::fs::create_dir_all(&scratch)?;
    let kept = workspace_root().join("protocols/fuzz/corpus/decode_validate");
    run(Command::new("rustup")
        .current_dir(workspace_root().join("protocols/fuzz"))
        .args(["run", &nightly, "cargo", "fuzz", "run", "decode_validate"])
        .arg(&scratch)
        .arg(&kept)
        .args(["--", "-max_total_time=15"]))
}

/// Removes what an interrupted earlier test run left: the harness names
/// everything `socklb-t<pid>-<n>` and that process is gone.
pub(crate) fn remove_leftovers() -> Result<()> {
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
