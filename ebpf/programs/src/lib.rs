// A library target so that host-side tooling (cargo metadata, clippy on the
// workspace) sees the package; the programs live in the `socklb` binary,
// built for bpfel-unknown-none by guest-agent/build.rs.
#![no_std]
