//! Generates the protobuf messages and the async ttrpc client/server code
//! from protos/socklb.proto (ttrpc-codegen's pure-Rust parser: no protoc).
use std::{env, fs, path::PathBuf};

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=protos");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set for build scripts"));
    ttrpc_codegen::Codegen::new()
        .out_dir(&out_dir)
        .inputs(["protos/socklb.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()?;
    // The generated files start with inner attributes, so they must be
    // modules of their own (not `include!`d): declare them by absolute path.
    let modules: String = ["socklb", "socklb_ttrpc"]
        .iter()
        .map(|name| {
            let path = out_dir.join(format!("{name}.rs"));
            format!(
                "#[path = {:?}]\npub mod {name};\n",
                path.display().to_string()
            )
        })
        .collect();
    fs::write(out_dir.join("modules.rs"), modules)
}
