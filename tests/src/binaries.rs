//! Where the binaries under test are: an override variable, else beside the
//! running test in the target directory.

use std::path::{Path, PathBuf};

/// The socklb-agent binary: $SOCKLB_AGENT_BIN, else from the target
/// directory the tests run from (`cargo xtask test` builds it first).
pub fn agent_bin() -> PathBuf {
    built_binary("socklb-agent", "SOCKLB_AGENT_BIN")
}

/// The socklb-shim CLI: $SOCKLB_SHIM_BIN, else from the target directory.
pub fn shim_bin() -> PathBuf {
    built_binary("socklb-shim", "SOCKLB_SHIM_BIN")
}

/// The test servers and clients; cargo builds them for integration tests.
pub(crate) fn testkit_bin() -> PathBuf {
    built_binary("socklb-testkit", "SOCKLB_TESTKIT_BIN")
}

fn built_binary(name: &str, override_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_var) {
        return path.into();
    }
    // Test binaries run from target/<profile>/deps, programs from
    // target/<profile>: look beside the running binary and one level up.
    let exe = std::env::current_exe().expect("current exe");
    let beside = exe.parent().expect("a directory").join(name);
    let above = exe
        .parent()
        .and_then(Path::parent)
        .expect("a directory")
        .join(name);
    let binary = if beside.exists() { beside } else { above };
    assert!(
        binary.exists(),
        "{} is missing: build it first (cargo xtask build) or set {override_var}",
        binary.display()
    );
    binary
}
