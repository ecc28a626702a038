//! Builds the eBPF programs (ebpf/programs, nightly, bpfel-unknown-none) into
//! OUT_DIR so the agent binary embeds them.
fn main() -> aya_build::Result<()> {
    let manifest_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let programs = manifest_dir.join("../ebpf/programs");
    let common = manifest_dir.join("../ebpf/common");
    println!("cargo:rerun-if-changed={}", common.display());
    // The programs' dated nightly, named once in their rust-toolchain.toml
    // (`cargo xtask setup` installs it; aya-build reruns this script when
    // anything under the programs' directory changes).
    let toolchain_file = programs.join("rust-toolchain.toml");
    let toolchain = std::fs::read_to_string(&toolchain_file)?;
    let toolchain = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"'))
        .ok_or_else(|| {
            std::io::Error::other(format!("{} names no channel", toolchain_file.display()))
        })?;
    // aya-build passes every line the nested cargo writes to stderr on as a
    // `cargo:warning`: its progress lines ("Compiling ...") would read as
    // warnings. Quiet, it writes only diagnostics and errors.
    // SAFETY: a build script is single-threaded here; nothing else reads
    // the environment concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "socklb-ebpf",
            root_dir: programs.to_str().expect("UTF-8 path"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain),
    )
}
