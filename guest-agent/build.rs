//! Builds the eBPF programs (ebpf/programs, nightly, bpfel-unknown-none) into
//! OUT_DIR so the agent binary embeds them.
fn main() -> aya_build::Result<()> {
    let manifest_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let programs = manifest_dir.join("../ebpf/programs");
    let common = manifest_dir.join("../ebpf/common");
    println!("cargo:rerun-if-changed={}", common.display());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "socklb-ebpf",
            root_dir: programs.to_str().expect("UTF-8 path"),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
