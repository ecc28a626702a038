//! socklb's guest kernels and what socklb needs of a kernel.
//!
//! - The project's own kernel: fragments (one per concern, a reason beside
//!   each option) on tinyconfig.
//! - The bench kernel: the own kernel and `bench/`'s fragment, what the
//!   guest-datapath benchmark's kube-proxy baselines need.
//! - Kata's default guest kernel: Kata's option list on allnoconfig, as
//!   Kata's own build merges it (no BTF, no JIT, no modules).
//! - What the agent requires of any kernel (`agent-required.config`) and
//!   what it recommends on top of Kata's (`kata/socklb.conf`, a fragment
//!   in Kata's format), judged by `socklb-kernel-check`.
//!
//! Both kernels are built from Debian's `linux-source-6.1` and cached by
//! the hash of their inputs.

mod check;
mod fragments;
mod image;

pub use check::{Missing, Requirement, Verdict, check, judge, running_config};
pub use fragments::{
    AGENT_REQUIRED, BENCH_DATAPATH, FRAGMENTS, Fragment, KATA_GUEST_CONFIG, KATA_RECOMMENDED,
    options_of, requirements,
};
pub use image::{Flavour, SOURCE_TARBALL, build, fragments_hash};

#[cfg(test)]
mod tests;
