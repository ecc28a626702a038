//! A test VM: QEMU (TCG, no NIC) with a vhost-user-vsock device served by
//! vhost-device-vsock, so the host reaches the guest only through a unix
//! socket speaking hybrid vsock. Both processes are ended by PID when the
//! VM drops.

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

mod profile;
pub use profile::{KernelSymbols, PcSampler};

/// The guest's vsock CID; the host is CID 2.
pub const GUEST_CID: u32 = 4;
pub const AGENT_PORT: u32 = socklb_protocols::DEFAULT_AGENT_PORT;
/// socklb-testkit guest-exec in the test image.
pub const EXEC_PORT: u32 = 1026;
/// Guest memory, MiB, unless a caller needs more.
const MEMORY_MIB: u32 = 512;

/// A guest kernel and the initramfs to boot it with.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The image `cargo xtask` built for `kernel` ("OWN", "DEBIAN" or
    /// "KATA"), from
    /// SOCKLB_GUEST_<kernel>_KERNEL and SOCKLB_GUEST_<kernel>_INITRD.
    pub fn from_env(kernel: &str) -> GuestImage {
        let var = |what: &str| -> PathBuf {
            let name = format!("SOCKLB_GUEST_{kernel}_{what}");
            std::env::var_os(&name)
                .unwrap_or_else(|| {
                    panic!(
                        "{name} is not set: cargo xtask test builds the guest images and sets it"
                    )
                })
                .into()
        };
        GuestImage {
            kernel: var("KERNEL"),
            initrd: var("INITRD"),
        }
    }
}

pub struct Vm {
    vhost: Child,
    qemu: Child,
    /// The hybrid vsock socket (vhost-device-vsock's uds-path).
    pub uds: PathBuf,
    /// QEMU's human monitor (HMP), for [`Vm::sample_pc`].
    monitor: PathBuf,
    pub console: PathBuf,
    _dir: tempfile::TempDir,
    pub booted_in: Duration,
}

impl Vm {
    /// Boots `image` and waits until the guest's init is up (its console
    /// says so) or fails after 60 s, showing the console.
    pub fn boot(image: &GuestImage, extra_cmdline: &str) -> Vm {
        Vm::boot_with_memory(image, extra_cmdline, MEMORY_MIB)
    }

    /// [`Vm::boot`] with `memory_mib` MiB of guest memory.
    pub fn boot_with_memory(image: &GuestImage, extra_cmdline: &str, memory_mib: u32) -> Vm {
        let memory = format!("{memory_mib}M");
        let dir = tempfile::Builder::new()
            .prefix("socklb-vm-")
            .tempdir()
            .expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let backend = dir.path().join("vhost-user.sock");
        let monitor = dir.path().join("monitor.sock");
        let console = dir.path().join("console.log");
        let started = Instant::now();
        let mut vhost = crate::die_with_parent(&mut Command::new("vhost-device-vsock"))
            .arg("--vm")
            .arg(format!(
                "guest-cid={GUEST_CID},uds-path={},socket={}",
                uds.display(),
                backend.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vhost-device-vsock (cargo xtask setup installs it)");
        while !backend.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "vhost-device-vsock did not create its socket"
            );
            if let Ok(Some(status)) = vhost.try_wait() {
                panic!("vhost-device-vsock exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let qemu = crate::die_with_parent(&mut Command::new("qemu-system-x86_64"))
            .args(["-accel", "tcg", "-cpu", "max", "-m", &memory, "-smp", "1"])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            // Hybrid vsock: vhost-device-vsock picks the source port the
            // guest sees, so the agent cannot insist on a privileged one.
            // tsc=reliable: under a busy emulator the clocksource watchdog
            // finds TCG's TSC (which follows the host's clock) skewed
            // against late timer ticks, marks it unstable and falls back to
            // refined-jiffies, so every clock in the guest moves in 4 ms
            // steps from then on (seen 5 minutes into a benchmark run).
            // tsc_early_khz: see `host_tsc_khz`.
            .arg(format!(
                "console=ttyS0 panic=-1 quiet tsc=reliable tsc_early_khz={} \
                 socklb.allow_unprivileged_port=1 {extra_cmdline}",
                host_tsc_khz()
            ))
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem0,size={memory},share=on"),
            ])
            .args(["-machine", "q35,memory-backend=mem0"])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", backend.display()))
            .args(["-device", "vhost-user-vsock-pci,chardev=c0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (cargo xtask setup installs it)");
        let mut vm = Vm {
            vhost,
            qemu,
            uds,
            monitor,
            console,
            _dir: dir,
            booted_in: Duration::ZERO,
        };
        vm.wait_console("socklb-init: up", Duration::from_secs(60));
        vm.booted_in = started.elapsed();
        vm.wait_for_tsc_clock();
        vm
    }

    /// Waits until the guest's clocksource is the TSC: every time a test or
    /// benchmark reads in the guest depends on it. The guest starts on
    /// tsc-early and moves to tsc a second or more into its boot; any
    /// other clocksource (jiffies) fails at once.
    fn wait_for_tsc_clock(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = self.exec(&[
                "cat",
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            ]);
            let clocksource = answer["stdout"].as_str().unwrap_or_default().trim();
            if clocksource == "tsc" {
                return;
            }
            assert!(
                clocksource == "tsc-early" && Instant::now() < deadline,
                "the guest's clocksource is not the TSC: {answer}\n{}",
                self.console_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's address for socklb-shim.
    pub fn agent_addr(&self) -> String {
        format!("hvsock://{}:{AGENT_PORT}", self.uds.display())
    }

    pub fn console_text(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console shows `text`.
    pub fn wait_console(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.console_text().contains(text) {
            if let Ok(Some(status)) = self.qemu.try_wait() {
                panic!(
                    "QEMU exited ({status}) before {text:?}; console:\n{}",
                    self.console_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {timeout:?}; console:\n{}",
                self.console_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a command in the guest (through socklb-testkit guest-exec) and
    /// returns {status, stdout, stderr}; it may take 30 s.
    pub fn exec(&self, argv: &[&str]) -> Value {
        self.exec_within(argv, Duration::from_secs(30))
    }

    /// [`Vm::exec`] for a command that may take up to `limit`.
    pub fn exec_within(&self, argv: &[&str], limit: Duration) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stream = loop {
            match self.connect(EXEC_PORT) {
                Ok(stream) => break stream,
                Err(err) if Instant::now() < deadline => {
                    let _ = err;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(err) => panic!("guest-exec unreachable: {err}"),
            }
        };
        stream
            .set_read_timeout(Some(limit))
            .expect("set the answer's timeout");
        let request = serde_json::to_string(argv).expect("json");
        stream
            .write_all(format!("{request}\n").as_bytes())
            .expect("send command");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .unwrap_or_else(|err| panic!("no answer to {argv:?} within {limit:?}: {err}"));
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
    }

    /// Runs a socklb-testkit client in the guest and parses its JSON lines.
    pub fn testkit(&self, args: &[&str]) -> Vec<Value> {
        let mut argv = vec!["socklb-testkit"];
        argv.extend_from_slice(args);
        let answer = self.exec(&argv);
        assert_eq!(answer["status"], 0, "{argv:?} in the guest: {answer}");
        answer["stdout"]
            .as_str()
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
            .collect()
    }

    /// A hybrid vsock connection to a guest port.
    pub fn connect(&self, port: u32) -> std::io::Result<UnixStream> {
        let mut stream = UnixStream::connect(&self.uds)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        if line.starts_with(b"OK ") {
            Ok(stream)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("guest port {port}: {:?}", String::from_utf8_lossy(&line)),
            ))
        }
    }

    /// Samples the guest's program counter every `interval` until the
    /// sampler is finished (see [`PcSampler`]).
    pub fn sample_pc(&self, interval: Duration) -> PcSampler {
        PcSampler::start(&self.monitor, interval)
    }

    /// The guest kernel's code symbols, from its /proc/kallsyms.
    pub fn kernel_symbols(&self) -> KernelSymbols {
        let answer = self.exec(&["cat", "/proc/kallsyms"]);
        assert_eq!(answer["status"], 0, "/proc/kallsyms: {answer}");
        KernelSymbols::parse(answer["stdout"].as_str().unwrap_or_default())
    }

    /// Resident memory of a guest process, in KiB (busybox pidof + /proc).
    pub fn rss_kib(&self, process: &str) -> u64 {
        let pid = self.exec(&["pidof", process]);
        let pid = pid["stdout"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let status = self.exec(&["cat", &format!("/proc/{pid}/status")]);
        status["stdout"]
            .as_str()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS for {process} (pid {pid:?})"))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- guest console ---\n{}\n--- end of guest console ---",
                self.console_text()
            );
        }
        for child in [&mut self.qemu, &mut self.vhost] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The host's TSC frequency, kHz, measured once. Under TCG the guest's TSC
/// is the host's counter, and the guest has no HPET or ACPI PM timer to
/// calibrate it against: its calibration against the emulated PIT fails
/// now and then ("tsc: Unable to calibrate against PIT"), and the guest
/// then marks the TSC unstable and runs on refined-jiffies, every clock in
/// 4 ms steps (seen at the boot of a benchmark run). Given the frequency,
/// the guest skips its calibration.
fn host_tsc_khz() -> u64 {
    static KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let (started, start) = tsc_at_instant();
        std::thread::sleep(Duration::from_millis(100));
        let (ended, end) = tsc_at_instant();
        (end - start) * 1_000_000 / (ended - started).as_nanos() as u64
    })
}

/// The TSC and the instant it was read at: of a few reads, the one the
/// closest pair of clock reads brackets, so a preemption on a busy host
/// does not skew the frequency.
fn tsc_at_instant() -> (Instant, u64) {
    (0..5)
        .map(|_| {
            let before = Instant::now();
            // SAFETY: RDTSC only reads the time-stamp counter.
            let tsc = unsafe { std::arch::x86_64::_rdtsc() };
            let after = Instant::now();
            (after - before, before + (after - before) / 2, tsc)
        })
        .min_by_key(|(bracket, _, _)| *bracket)
        .map(|(_, at, tsc)| (at, tsc))
        .expect("five reads")
}

/// Waits until `check` passes or `timeout` ends; returns whether it passed.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
