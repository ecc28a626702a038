//! Builds the eBPF programs (ebpf/programs, nightly, bpfel-unknown-none) into
//! OUT_DIR so the agent binary embeds them.
fn main() -> aya_build::Result<()> {
    let manifest_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let programs = manifest_dir.join("../ebpf/programs");
    let common = manifest_dir.join("../ebpf/common");
    println!("cargo:rerun-if-changed={}", common.display());
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
        aya_build::Toolchain::default(),
    )
}
