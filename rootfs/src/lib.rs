//! Builds socklb's guest initramfs: a gzip-compressed newc cpio archive
//! holding busybox, an init, the static agent, the test tools, and the
//! kernel modules a modular kernel needs for vsock. [`kata`] installs the
//! agent into a Kata guest rootfs instead.

pub mod kata;

use std::{
    fs,
    io::{Cursor, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use cpio::{NewcBuilder, write_cpio};

const INIT: &str = include_str!("../init");
const START_AGENT: &str = include_str!("../start-agent");
const TEST_SERVICES: &str = include_str!("../test-services");
const KATA_AGENT_STANDIN: &str = include_str!("../kata-agent-standin");

/// The image's directories.
const DIRS: [&str; 13] = [
    "bin",
    "dev",
    "etc",
    "etc/socklb",
    "lib",
    "lib/modules",
    "proc",
    "sys",
    "tmp",
    "run",
    "sbin",
    "usr",
    "usr/bin",
];

/// The guest's resolver: the cluster DNS VIP.
const RESOLV_CONF: &str = "nameserver 10.96.0.10\noptions timeout:2 attempts:2\n";

/// How the guest starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// `rootfs/init` mounts, loads modules, starts the agent with the pod
    /// address given, then runs the test services.
    Test,
    /// As Kata's initrd boots: socklb's Kata init (`rootfs/kata/init`) as
    /// /sbin/init starts the agent and execs /usr/bin/kata-agent, here a
    /// stand-in (`rootfs/kata-agent-standin`: kata-agent's mounts and port,
    /// then the test services); the pod address comes later.
    KataInitrd,
}

/// What goes into the image.
pub struct Spec {
    pub boot: Boot,
    /// The static socklb-agent.
    pub agent: PathBuf,
    /// More statically linked binaries for /bin (socklb-testkit).
    pub binaries: Vec<PathBuf>,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// Kernel modules to load at boot, in order (empty for a kernel with
    /// everything built in).
    pub modules: Vec<PathBuf>,
    /// Dynamically linked programs and plugins of this machine (absolute
    /// paths), each copied to its own path with the shared libraries and
    /// loader `ldd` names for it: the benchmark image's Debian tools.
    pub host_files: Vec<PathBuf>,
}

/// Kernel modules a Debian kernel needs for virtio-pci and vsock, in load
/// order (vsock_loopback lets tests connect from inside the guest).
pub const VSOCK_MODULES: [&str; 9] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "vsock_loopback",
];

/// Finds `names` under a kernel's module directory (`lib/modules/<release>`).
pub fn find_modules(modules_dir: &Path, names: &[&str]) -> Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    collect_files(modules_dir, &mut all)?;
    names
        .iter()
        .map(|name| {
            all.iter()
                .find(|path| {
                    path.file_name().and_then(|f| f.to_str()) == Some(&format!("{name}.ko"))
                })
                .cloned()
                .with_context(|| {
                    format!("module {name}.ko not found under {}", modules_dir.display())
                })
        })
        .collect()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Writes the image to `output`; returns its size in bytes.
pub fn build(spec: &Spec, output: &Path) -> Result<u64> {
    let mut entries: Vec<(NewcBuilder, Cursor<Vec<u8>>)> = Vec::new();
    let dir = |name: &str| {
        (
            NewcBuilder::new(name).mode(0o040_755),
            Cursor::new(Vec::new()),
        )
    };
    let file = |name: &str, mode: u32, data: Vec<u8>| {
        (
            NewcBuilder::new(name).mode(0o100_000 | mode),
            Cursor::new(data),
        )
    };
    let symlink = |name: &str, target: &str| {
        (
            NewcBuilder::new(name).mode(0o120_777),
            Cursor::new(target.as_bytes().to_vec()),
        )
    };
    for name in DIRS {
        entries.push(dir(name));
    }
    let agent = read(&spec.agent)?;
    match spec.boot {
        Boot::Test => {
            entries.push(file("init", 0o755, INIT.as_bytes().to_vec()));
            entries.push(file(
                "bin/start-agent",
                0o755,
                START_AGENT.as_bytes().to_vec(),
            ));
            entries.push(file("bin/socklb-agent", 0o755, agent));
            entries.push(file(
                "bin/test-services",
                0o755,
                TEST_SERVICES.as_bytes().to_vec(),
            ));
        }
        Boot::KataInitrd => {
            // Where Kata's rootfs.sh and initrd_builder.sh put them, and
            // where `kata::install` puts socklb's.
            entries.push(file("sbin/init", 0o755, kata::INIT.as_bytes().to_vec()));
            entries.push(symlink("init", "/sbin/init"));
            entries.push(file("usr/bin/socklb-agent", 0o755, agent));
            entries.push(file(
                "usr/bin/kata-agent",
                0o755,
                KATA_AGENT_STANDIN.as_bytes().to_vec(),
            ));
            entries.push(file(
                "bin/test-services",
                0o755,
                TEST_SERVICES.as_bytes().to_vec(),
            ));
        }
    }
    entries.push(file(
        "etc/resolv.conf",
        0o644,
        RESOLV_CONF.as_bytes().to_vec(),
    ));
    entries.push(file("bin/busybox", 0o755, read(&spec.busybox)?));
    // Every applet (sh, mount, ip, ...) exists before the first script runs.
    for applet in busybox_applets(&spec.busybox)? {
        entries.push(symlink(&format!("bin/{applet}"), "busybox"));
    }
    for binary in &spec.binaries {
        entries.push(file(
            &format!("bin/{}", file_name(binary)?),
            0o755,
            read(binary)?,
        ));
    }
    // Directories before the files in them, as the kernel unpacks in order.
    let host_files = host_files_with_libraries(&spec.host_files)?;
    let mut host_dirs = std::collections::BTreeSet::new();
    for path in &host_files {
        let name = path
            .strip_prefix("/")
            .with_context(|| format!("{} is not an absolute path", path.display()))?;
        host_dirs.extend(name.ancestors().skip(1).map(Path::to_path_buf));
    }
    for dir_name in host_dirs {
        let dir_name = dir_name.to_string_lossy();
        if !dir_name.is_empty() && !DIRS.contains(&dir_name.as_ref()) {
            entries.push(dir(&dir_name));
        }
    }
    for path in &host_files {
        let name = path.strip_prefix("/")?.to_string_lossy();
        entries.push(file(&name, 0o755, read(path)?));
    }
    let mut load_order = String::new();
    for module in &spec.modules {
        let name = file_name(module)?;
        let Some(stem) = name.strip_suffix(".ko") else {
            bail!(
                "{} is not an uncompressed kernel module (.ko)",
                module.display()
            );
        };
        load_order.push_str(stem);
        load_order.push('\n');
        entries.push(file(&format!("lib/modules/{name}"), 0o644, read(module)?));
    }
    if !load_order.is_empty() {
        entries.push(file("etc/socklb/modules", 0o644, load_order.into_bytes()));
    }

    let out =
        fs::File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
    let gzip = flate2::write::GzEncoder::new(out, flate2::Compression::best());
    let mut gzip = write_cpio(entries.into_iter(), gzip).context("writing the cpio archive")?;
    gzip.flush()?;
    gzip.finish()?;
    Ok(fs::metadata(output)?.len())
}

/// `files` and every shared library (and the loader) `ldd` names for them,
/// each once.
fn host_files_with_libraries(files: &[PathBuf]) -> Result<std::collections::BTreeSet<PathBuf>> {
    let mut all = std::collections::BTreeSet::new();
    for path in files {
        let output = std::process::Command::new("ldd")
            .arg(path)
            .output()
            .with_context(|| format!("cannot run ldd {}", path.display()))?;
        if !output.status.success() {
            bail!(
                "ldd {}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let target = line.split_once("=>").map_or(line, |(_, t)| t);
            if let Some(library) = target
                .split_whitespace()
                .next()
                .filter(|t| t.starts_with('/'))
            {
                all.insert(PathBuf::from(library));
            }
        }
        all.insert(path.clone());
    }
    Ok(all)
}

/// The applets `busybox` offers (`busybox --list`); busybox itself is
/// not one.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let output = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("cannot run {} --list", busybox.display()))?;
    if !output.status.success() {
        bail!("{} --list failed: {}", busybox.display(), output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|applet| !applet.is_empty() && *applet != "busybox" && !applet.contains('/'))
        .map(String::from)
        .collect())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn file_name(path: &Path) -> Result<&str> {
    path.file_name()
        .and_then(|f| f.to_str())
        .with_context(|| format!("{} has no file name", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_holds_init_binaries_and_module_order() {
        let dir = std::env::temp_dir().join(format!("socklb-rootfs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, data: &[u8]| {
            let path = dir.join(name);
            fs::write(&path, data).unwrap();
            path
        };
        // A stand-in busybox that lists two applets.
        let busybox = write("busybox", b"#!/bin/sh\nprintf 'sh\\nip\\nbusybox\\n'\n");
        fs::set_permissions(
            &busybox,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let spec = Spec {
            boot: Boot::Test,
            agent: write("socklb-agent", b"agent"),
            binaries: vec![write("socklb-testkit", b"testkit")],
            busybox,
            modules: vec![write("virtio.ko", b"m1"), write("vsock.ko", b"m2")],
            host_files: vec!["/usr/bin/env".into()],
        };
        let image = dir.join("initramfs.cpio.gz");
        assert!(build(&spec, &image).unwrap() > 0);

        let mut archive = flate2::read::GzDecoder::new(fs::File::open(&image).unwrap());
        let mut files = std::collections::BTreeMap::new();
        loop {
            let mut reader = cpio::NewcReader::new(archive).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let name = reader.entry().name().to_string();
            let mode = reader.entry().mode();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
            files.insert(name, (mode, data));
            archive = reader.finish().unwrap();
        }
        assert_eq!(files["init"].0, 0o100_755);
        assert!(String::from_utf8_lossy(&files["init"].1).contains("start-agent"));
        assert_eq!(files["bin/socklb-agent"].1, b"agent");
        assert_eq!(files["bin/socklb-testkit"].1, b"testkit");
        assert_eq!(files["bin/ip"], (0o120_777, b"busybox".to_vec()));
        assert!(!files.contains_key("bin/busybox/busybox"));
        assert_eq!(files["etc/socklb/modules"].1, b"virtio\nvsock\n");
        assert_eq!(files["lib/modules/vsock.ko"].1, b"m2");
        assert_eq!(files["proc"].0, 0o040_755);
        assert_eq!(files["bin/sh"], (0o120_777, b"busybox".to_vec()));
        // A host program comes with its libraries, at their own paths.
        assert_eq!(files["usr/bin/env"].1, fs::read("/usr/bin/env").unwrap());
        assert!(
            files.keys().any(|f| f.contains("libc.so")),
            "{:?}",
            files.keys()
        );
        assert!(files.contains_key("lib64"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
