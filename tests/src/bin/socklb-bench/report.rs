//! Where every benchmark's tables go: `target/socklb/bench/<name>.md` and
//! the copy the README quotes, `docs/bench/<name>.md`, each ending with the
//! date and the machine of the run, so no figure is copied by hand.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The run's output directory, target/socklb/bench.
pub(crate) fn output_dir() -> PathBuf {
    let dir = workspace().join("target/socklb/bench");
    std::fs::create_dir_all(&dir).expect("bench output directory");
    dir
}

/// The README's copies, docs/bench.
fn docs_dir() -> PathBuf {
    let dir = workspace().join("docs/bench");
    std::fs::create_dir_all(&dir).expect("docs/bench");
    dir
}

/// "2026-11-25 19:20 UTC, 2 CPUs (model), kernel 6.18.44".
fn run_line() -> String {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{date}, {cpus} CPUs ({model}), kernel {}", kernel.trim())
}

/// Prints `text` and writes it, with the run's date and machine, as
/// `<name>.md` to both directories.
pub(crate) fn write(name: &str, text: &str) {
    // A blank line ends the table: markdown would read the next line as a row.
    let report = format!("{}\n\nRun: {}.\n", text.trim_end(), run_line());
    println!("{report}");
    for dir in [output_dir(), docs_dir()] {
        let path = dir.join(format!("{name}.md"));
        std::fs::write(&path, &report).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        println!("(written to {})", path.display());
    }
}

/// Copies a file the run wrote to target/socklb/bench (a plot) to docs/bench.
pub(crate) fn publish(name: &str) {
    let from = output_dir().join(name);
    let to = docs_dir().join(name);
    std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
}
