//! Tests that need root (cgroups, network namespaces, bpffs mounts, QEMU
//! with vhost-user devices) skip with a line saying so when another user
//! runs them, instead of failing half way through building a sandbox.
//! `cargo xtask test` runs as root and refuses to start otherwise, so CI
//! never skips.

/// Whether a test that needs root can run; if not, says it is skipped.
pub fn root_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    // The test harness names each test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    eprintln!(
        "skipped {test}: it needs root (cgroups, network namespaces, bpffs mounts); \
         run the tests as root, as cargo xtask test does"
    );
    false
}

/// The first line of a test that needs root: returns from it, saying so,
/// when the user is not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::root::root_or_skip() {
            return;
        }
    };
}
