//! Installs socklb-agent into a Kata guest rootfs directory (the output of
//! Kata's osbuilder `rootfs.sh`), before Kata's `image_builder.sh` or
//! `initrd_builder.sh` turns it into an image.
//!
//! - systemd image: the agent, its unit, and the unit wanted by
//!   `kata-containers.target` (the target the guest boots into).
//! - initrd (`AGENT_INIT=yes`): kata-agent is `/sbin/init` there and starts
//!   nothing else, so it moves to `/usr/bin/kata-agent` and socklb's init
//!   takes its place, starts the agent and execs kata-agent.

use std::{
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// socklb's `/sbin/init` for the initrd flavour.
pub const INIT: &str = include_str!("../kata/init");
/// The systemd unit.
pub const UNIT: &str = include_str!("../kata/socklb-agent.service");

pub const AGENT_PATH: &str = "usr/bin/socklb-agent";
pub const UNIT_PATH: &str = "usr/lib/systemd/system/socklb-agent.service";
pub const WANTS_PATH: &str = "etc/systemd/system/kata-containers.target.wants/socklb-agent.service";
pub const INIT_PATH: &str = "sbin/init";
pub const KATA_AGENT_PATH: &str = "usr/bin/kata-agent";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Systemd,
    Initrd,
}

/// Installs `agent` (the static socklb-agent) into `rootfs` for `flavour`;
/// returns the paths written, relative to `rootfs`. Running it again
/// leaves the same result.
pub fn install(rootfs: &Path, agent: &Path, flavour: Flavour) -> Result<Vec<PathBuf>> {
    if !rootfs.is_dir() {
        bail!(
            "{} is not a directory (a Kata rootfs from rootfs.sh)",
            rootfs.display()
        );
    }
    let mut written = Vec::new();
    let mut put = |relative: &str, data: &[u8], mode: u32| -> Result<()> {
        let path = rootfs.join(relative);
        fs::create_dir_all(path.parent().expect("a relative path with a parent"))?;
        fs::write(&path, data).with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        written.push(PathBuf::from(relative));
        Ok(())
    };
    let agent_binary =
        fs::read(agent).with_context(|| format!("cannot read {}", agent.display()))?;
    match flavour {
        Flavour::Systemd => {
            put(AGENT_PATH, &agent_binary, 0o755)?;
            put(UNIT_PATH, UNIT.as_bytes(), 0o644)?;
            let wants = rootfs.join(WANTS_PATH);
            fs::create_dir_all(wants.parent().expect("a parent"))?;
            let _ = fs::remove_file(&wants);
            symlink(format!("/{UNIT_PATH}"), &wants)
                .with_context(|| format!("cannot link {}", wants.display()))?;
            written.push(PathBuf::from(WANTS_PATH));
        }
        Flavour::Initrd => {
            let init = rootfs.join(INIT_PATH);
            let kata_agent = rootfs.join(KATA_AGENT_PATH);
            let ours = fs::read(&init).is_ok_and(|data| data == INIT.as_bytes());
            if !ours {
                if fs::symlink_metadata(&init).is_err() {
                    bail!(
                        "{} does not exist: an initrd rootfs (AGENT_INIT=yes) has kata-agent there",
                        init.display()
                    );
                }
                if kata_agent.exists() {
                    bail!(
                        "both {} and {} exist: which one is kata-agent? (expected kata-agent as \
                         /sbin/init only, as rootfs.sh installs it with AGENT_INIT=yes)",
                        init.display(),
                        kata_agent.display()
                    );
                }
                fs::create_dir_all(kata_agent.parent().expect("a parent"))?;
                fs::rename(&init, &kata_agent).with_context(|| {
                    format!("cannot move {} to {}", init.display(), kata_agent.display())
                })?;
            }
            put(AGENT_PATH, &agent_binary, 0o755)?;
            put(INIT_PATH, INIT.as_bytes(), 0o755)?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_under(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).unwrap().flatten() {
                let path = entry.path();
                if entry.file_type().unwrap().is_dir() {
                    stack.push(path);
                } else {
                    out.push(path.strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn systemd_flavour_lays_out_agent_unit_and_wants_link() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent-binary");
        fs::write(&agent, b"agent").unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir(&rootfs).unwrap();
        for _ in 0..2 {
            install(&rootfs, &agent, Flavour::Systemd).unwrap();
        }
        assert_eq!(files_under(&rootfs), [WANTS_PATH, AGENT_PATH, UNIT_PATH]);
        assert_eq!(
            fs::read_link(rootfs.join(WANTS_PATH)).unwrap(),
            Path::new("/usr/lib/systemd/system/socklb-agent.service")
        );
        let mode = fs::metadata(rootfs.join(AGENT_PATH))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    /// Kata's runtime gives up on a sandbox whose kata-agent has not
    /// answered within its dial timeout (45 s in Kata's QEMU
    /// configuration); kata-agent starts after this unit.
    #[test]
    fn the_unit_gives_up_well_before_katas_dial_timeout() {
        const KATA_DIAL_TIMEOUT_SECS: u64 = 45;
        let timeout = UNIT
            .lines()
            .find_map(|line| line.strip_prefix("TimeoutStartSec="))
            .expect("the unit sets TimeoutStartSec (systemd's default is 90 s)");
        let secs: u64 = timeout
            .strip_suffix('s')
            .and_then(|secs| secs.parse().ok())
            .unwrap_or_else(|| panic!("TimeoutStartSec={timeout}: write it as N s"));
        assert!(
            secs * 2 <= KATA_DIAL_TIMEOUT_SECS,
            "TimeoutStartSec={timeout} leaves kata-agent too little of Kata's \
             {KATA_DIAL_TIMEOUT_SECS} s"
        );
    }

    #[test]
    fn systemd_accepts_the_unit_as_installed() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent-binary");
        fs::write(&agent, b"#!/bin/sh\n").unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir(&rootfs).unwrap();
        install(&rootfs, &agent, Flavour::Systemd).unwrap();
        let output = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", rootfs.display()))
            .arg("socklb-agent.service")
            .output()
            .expect("systemd-analyze (cargo xtask setup installs systemd)");
        // Problems it only warns about (an unknown Type=, say) go to stderr.
        let complaints = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && complaints.is_empty(),
            "{complaints}"
        );
    }

    #[test]
    fn initrd_flavour_puts_kata_agent_behind_socklbs_init() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent-binary");
        fs::write(&agent, b"agent").unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("sbin")).unwrap();
        fs::write(rootfs.join(INIT_PATH), b"kata-agent binary").unwrap();
        for _ in 0..2 {
            install(&rootfs, &agent, Flavour::Initrd).unwrap();
        }
        assert_eq!(
            files_under(&rootfs),
            [INIT_PATH, KATA_AGENT_PATH, AGENT_PATH]
        );
        assert_eq!(
            fs::read(rootfs.join(KATA_AGENT_PATH)).unwrap(),
            b"kata-agent binary"
        );
        assert!(INIT.contains("exec \"$KATA_AGENT\""));
        assert!(INIT.contains(&format!("KATA_AGENT=/{KATA_AGENT_PATH}")));
        assert!(INIT.contains(&format!("SOCKLB_AGENT=/{AGENT_PATH}")));
    }

    #[test]
    fn deploying_on_kata_names_exactly_the_installed_files() {
        let doc = include_str!("../../docs/deploying-on-kata.md");
        let section = doc
            .split("## Add socklb to a Kata guest image")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/deploying-on-kata.md has the section");
        let named: std::collections::BTreeSet<&str> = section
            .lines()
            .filter(|l| l.starts_with("| systemd |") || l.starts_with("| initrd |"))
            .flat_map(|l| l.split('`').skip(1).step_by(2))
            .filter(|word| !word.contains(' ') && word.contains('/'))
            .filter(|word| !word.starts_with("rootfs/"))
            .collect();
        let installed = std::collections::BTreeSet::from([
            AGENT_PATH,
            UNIT_PATH,
            WANTS_PATH,
            INIT_PATH,
            KATA_AGENT_PATH,
        ]);
        assert_eq!(named, installed);
    }

    #[test]
    fn initrd_flavour_needs_kata_agent_as_init() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent-binary");
        fs::write(&agent, b"agent").unwrap();
        let err = install(dir.path(), &agent, Flavour::Initrd).unwrap_err();
        assert!(
            err.to_string().contains("sbin/init does not exist"),
            "{err}"
        );
        assert!(files_under(dir.path()) == ["agent-binary"]);
    }
}
