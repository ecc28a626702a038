//! `cargo xtask bench`: every benchmark of socklb-bench, each writing its
//! tables to target/socklb/bench.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    binaries, guest,
    process::{is_root, run, target_dir, workspace_root},
    test,
};

pub(crate) fn bench() -> Result<()> {
    if !is_root() {
        bail!("the benchmarks create cgroups, namespaces and bpffs mounts: run as root");
    }
    binaries::build_binaries(true)?;
    test::remove_leftovers()?;
    // The agent as a Kata guest runs it: its memory depends on the C
    // library's allocator (glibc keeps far more of a Sync's peak).
    let guest_agent = guest::static_agent()?;
    let bench = target_dir().join("release/socklb-bench");
    let socklb_bench = |name: &str| {
        let mut command = Command::new(&bench);
        command.arg(name).env("SOCKLB_AGENT_BIN", &guest_agent);
        command
    };
    for name in [
        "hooks",
        "control-plane",
        "sockets",
        "kube",
        "node",
        "datapath",
    ] {
        run(&mut socklb_bench(name))?;
    }
    let mut guest_hooks = Command::new(&bench);
    guest_hooks.arg("guest-hooks");
    guest::with_images(&mut guest_hooks, &[guest::Kernel::Own, guest::Kernel::Kata])?;
    run(&mut guest_hooks)?;
    readme_tables()
}

/// The README's benchmark tables: each block between `<!-- bench NAME.md -->`
/// and `<!-- end bench -->` holds docs/bench/NAME.md as the last run wrote
/// it (headings two levels down, under the README's own), so no figure in
/// the README is copied by hand.
pub(crate) fn readme_tables() -> Result<()> {
    let root = workspace_root();
    let path = root.join("README.md");
    let readme = std::fs::read_to_string(&path)?;
    let filled = fill_bench_blocks(&readme, &root.join("docs/bench"))?;
    if filled != readme {
        std::fs::write(&path, filled)?;
        eprintln!("bench: README tables updated from docs/bench");
    }
    Ok(())
}

const BLOCK_START: &str = "<!-- bench ";
const BLOCK_END: &str = "<!-- end bench -->";

fn fill_bench_blocks(readme: &str, docs: &std::path::Path) -> Result<String> {
    let mut out = String::new();
    let mut rest = readme;
    while let Some(start) = rest.find(BLOCK_START) {
        let after_start = start + BLOCK_START.len();
        let Some(name_end) = rest[after_start..].find(" -->") else {
            bail!("README: an unterminated `{BLOCK_START}` marker");
        };
        let name = &rest[after_start..after_start + name_end];
        let body_start = after_start + name_end + " -->".len();
        let Some(end) = rest[body_start..].find(BLOCK_END) else {
            bail!("README: the block of {name} has no `{BLOCK_END}`");
        };
        let table = std::fs::read_to_string(docs.join(name))
            .map_err(|err| anyhow::anyhow!("README block {name}: docs/bench/{name}: {err}"))?;
        out.push_str(&rest[..body_start]);
        out.push('\n');
        for line in table.trim_end().lines() {
            if line.starts_with('#') {
                out.push_str("##");
            }
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(BLOCK_END);
        rest = &rest[body_start + end + BLOCK_END.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_tables_are_the_last_runs_own() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        assert!(
            readme.contains(BLOCK_START),
            "the README has no bench blocks"
        );
        let filled = fill_bench_blocks(&readme, &root.join("docs/bench")).unwrap();
        assert!(
            filled == readme,
            "README tables differ from docs/bench: run `cargo xtask bench-tables`"
        );
    }

    #[test]
    fn a_block_is_replaced_with_its_file_headings_down_two_levels() {
        let docs = std::env::temp_dir().join(format!("socklb-xtask-{}", std::process::id()));
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(
            docs.join("x.md"),
            "## X\n\n| a |\n|---|\n| 1 |\nRun: now.\n",
        )
        .unwrap();
        let readme = "intro\n<!-- bench x.md -->\nold\n<!-- end bench -->\noutro\n";
        let filled = fill_bench_blocks(readme, &docs).unwrap();
        std::fs::remove_dir_all(&docs).unwrap();
        assert_eq!(
            filled,
            "intro\n<!-- bench x.md -->\n#### X\n\n| a |\n|---|\n| 1 |\nRun: now.\n<!-- end bench -->\noutro\n"
        );
    }
}
