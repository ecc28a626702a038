//! Where the guest's CPU goes, seen from the host: the vCPU's program
//! counter read through QEMU's monitor at an interval, named with the
//! guest's /proc/kallsyms. Needs nothing in the guest (TCG has no PMU for
//! perf). The guest is not stopped to read it: stopping it at that rate
//! stalled its vhost-user vsock device. QEMU 7.2's TCG stores the RIP when
//! the guest leaves a translated block by an indirect branch, a jump to
//! another page or an exit, not on a direct jump within a page, so a
//! sample names about the function running (docs/benchmarks.md).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// HMP's prompt, at the end of every answer.
const PROMPT: &str = "(qemu) ";

/// Program counters sampled until [`PcSampler::finish`] (or the sampler
/// drops).
pub struct PcSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<u64>>>,
}

impl PcSampler {
    /// Starts sampling the guest behind the HMP monitor socket `monitor`
    /// every `interval`.
    pub fn start(monitor: &Path, interval: Duration) -> PcSampler {
        let mut stream = UnixStream::connect(monitor)
            .unwrap_or_else(|e| panic!("QEMU monitor {}: {e}", monitor.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("monitor read timeout");
        read_answer(&mut stream);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut pcs = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                stream
                    .write_all(b"info registers\n")
                    .expect("ask the monitor");
                let answer = read_answer(&mut stream);
                pcs.push(
                    program_counter(&answer)
                        .unwrap_or_else(|| panic!("no RIP in the monitor's answer: {answer:?}")),
                );
                std::thread::sleep(interval);
            }
            pcs
        });
        PcSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the samples in order.
    pub fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("finished once");
        thread.join().expect("the sampler panicked")
    }
}

impl Drop for PcSampler {
    /// A round that fails stops its sampler, which would otherwise ask a
    /// QEMU about to be killed.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads from the monitor up to its next prompt.
fn read_answer(stream: &mut UnixStream) -> String {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !answer.ends_with(PROMPT.as_bytes()) {
        let n = stream
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("QEMU monitor: {e}"));
        assert!(n > 0, "QEMU monitor closed");
        answer.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The `RIP=` of `info registers`.
fn program_counter(answer: &str) -> Option<u64> {
    let hex = answer.split("RIP=").nth(1)?.get(..16)?;
    u64::from_str_radix(hex, 16).ok()
}

/// The guest kernel's code symbols, to name sampled program counters.
pub struct KernelSymbols {
    /// (address, name), sorted.
    functions: Vec<(u64, String)>,
    /// The end of the kernel image's code; JIT-compiled BPF programs and
    /// modules lie outside it.
    text_end: u64,
}

/// What a program counter in user space is counted as.
const USER: &str = "[user space]";
/// What one in kernel code no symbol names is counted as.
const UNNAMED: &str = "[kernel, unnamed: BPF program or module]";

impl KernelSymbols {
    /// From the text of the guest's /proc/kallsyms (read as root, so with
    /// addresses).
    pub fn parse(kallsyms: &str) -> KernelSymbols {
        let mut functions = Vec::new();
        let mut text_end = None;
        for line in kallsyms.lines() {
            let mut fields = line.split_whitespace();
            let (Some(address), Some(kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Ok(address) = u64::from_str_radix(address, 16) else {
                continue;
            };
            if name == "_etext" {
                text_end = Some(address);
                continue;
            }
            // Code: t/T, and w/W weak symbols that name functions.
            if matches!(kind, "t" | "T" | "w" | "W") && address != 0 {
                functions.push((address, name.to_string()));
            }
        }
        functions.sort();
        // Read without CAP_SYSLOG, every address is 0.
        let text_end = text_end
            .filter(|end| *end != 0)
            .expect("no _etext address in /proc/kallsyms: is it read as root?");
        KernelSymbols {
            functions,
            text_end,
        }
    }

    /// The function `pc` is in.
    pub fn function(&self, pc: u64) -> &str {
        // x86_64's canonical split: the kernel holds the upper half.
        if pc < 1 << 63 {
            return USER;
        }
        let below = self
            .functions
            .partition_point(|(address, _)| *address <= pc);
        match below.checked_sub(1).map(|i| &self.functions[i]) {
            // Past the image's code, the nearest symbol below can be far
            // away: only names a program or module symbol reports itself.
            Some((address, name)) if pc < self.text_end || pc - address < 1 << 16 => name,
            _ => UNNAMED,
        }
    }

    /// Samples per function.
    pub fn count(&self, pcs: &[u64]) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for &pc in pcs {
            *counts.entry(self.function(pc).to_string()).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 T slob_alloc
ffffffff81001200 t slob_page_alloc
ffffffff81400000 T _etext
ffffffffa0000000 t bpf_prog_6deef7357e7b4530_connect4\t[bpf]
";

    #[test]
    fn names_kernel_functions_programs_and_user_space() {
        let symbols = KernelSymbols::parse(KALLSYMS);
        assert_eq!(symbols.function(0xffffffff81001010), "slob_alloc");
        assert_eq!(symbols.function(0xffffffff81001200), "slob_page_alloc");
        assert_eq!(symbols.function(0xffffffff813fffff), "slob_page_alloc");
        assert_eq!(
            symbols.function(0xffffffffa0000040),
            "bpf_prog_6deef7357e7b4530_connect4"
        );
        assert_eq!(symbols.function(0xffffffffa8000000), UNNAMED);
        assert_eq!(symbols.function(0xffffffff81400010), UNNAMED);
        assert_eq!(symbols.function(0xffffffff80000000), UNNAMED);
        assert_eq!(symbols.function(0x7f00_0000_1000), USER);
        let counts = symbols.count(&[0xffffffff81001010, 0xffffffff81001010, 0x1000]);
        assert_eq!(counts["slob_alloc"], 2);
        assert_eq!(counts[USER], 1);
    }

    #[test]
    #[should_panic(expected = "is it read as root?")]
    fn refuses_kallsyms_without_addresses() {
        KernelSymbols::parse("0000000000000000 T _stext\n0000000000000000 T _etext\n");
    }

    #[test]
    fn reads_the_program_counter_of_info_registers() {
        let answer = "info registers\r\nRAX=0000000000000000 RBX=ffff888003c1e000\r\n\
                      RIP=ffffffff8130b9c3 RFL=00000246 [---Z-P-] CPL=0 II=0\r\n(qemu) ";
        assert_eq!(program_counter(answer), Some(0xffffffff8130b9c3));
        assert_eq!(program_counter("(qemu) "), None);
    }
}
