//! The configuration fragments: the own kernel's (one per concern), what
//! the agent requires of any kernel, what it recommends on top of Kata's,
//! and Kata's own option list; each option with its reason.

use crate::check::Requirement;

/// A configuration fragment.
pub struct Fragment {
    pub name: &'static str,
    pub text: &'static str,
}

pub const FRAGMENTS: [Fragment; 6] = [
    Fragment {
        name: "base",
        text: include_str!("../fragments/base.config"),
    },
    Fragment {
        name: "virtio",
        text: include_str!("../fragments/virtio.config"),
    },
    Fragment {
        name: "vsock",
        text: include_str!("../fragments/vsock.config"),
    },
    Fragment {
        name: "net",
        text: include_str!("../fragments/net.config"),
    },
    Fragment {
        name: "cgroup",
        text: include_str!("../fragments/cgroup.config"),
    },
    Fragment {
        name: "bpf",
        text: include_str!("../fragments/bpf.config"),
    },
];

/// Bench-only, on top of the own kernel's fragments: what the
/// guest-datapath benchmark's kube-proxy baselines (IPVS, iptables,
/// nftables) need in the guest. Neither the agent nor Kata's image needs it.
pub const BENCH_DATAPATH: Fragment = Fragment {
    name: "bench-datapath",
    text: include_str!("../bench/datapath-baselines.config"),
};

/// What the agent cannot run without, on any kernel.
pub const AGENT_REQUIRED: Fragment = Fragment {
    name: "agent-required",
    text: include_str!("../agent-required.config"),
};

/// What socklb recommends on top of Kata's guest kernel, in Kata's fragment
/// format.
pub const KATA_RECOMMENDED: Fragment = Fragment {
    name: "kata/socklb.conf",
    text: include_str!("../kata/socklb.conf"),
};

/// Kata's default x86_64 guest kernel options.
pub const KATA_GUEST_CONFIG: &str = include_str!("../kata/guest-kernel-x86_64.config");

/// Every option `fragment` sets to `y`, each with the comment block above
/// it as the reason.
pub fn options_of(fragment: &Fragment) -> Vec<Requirement> {
    let mut requirements = Vec::new();
    let mut reason = String::new();
    let mut in_comment = false;
    for line in fragment.text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            // A comment block after options or a blank line starts a new reason.
            if !in_comment {
                reason.clear();
            }
            if !reason.is_empty() {
                reason.push(' ');
            }
            reason.push_str(comment);
            in_comment = true;
        } else if let Some(option) = line.strip_suffix("=y") {
            requirements.push(Requirement {
                option: option.to_string(),
                fragment: fragment.name,
                reason: reason.clone(),
            });
            in_comment = false;
        } else {
            in_comment = false;
        }
    }
    requirements
}

/// Every option the own kernel's fragments set to `y`.
pub fn requirements() -> Vec<Requirement> {
    FRAGMENTS.iter().flat_map(options_of).collect()
}
