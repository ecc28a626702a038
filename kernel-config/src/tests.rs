//! The fragments, the checker and the cache key.

use super::*;

#[test]
fn every_option_has_a_reason() {
    let requirements = requirements();
    assert!(requirements.len() > 30);
    for r in &requirements {
        assert!(r.option.starts_with("CONFIG_"), "{r:?}");
        assert!(!r.reason.is_empty(), "{} has no reason", r.option);
    }
    for fragment in &FRAGMENTS {
        for line in fragment.text.lines() {
            assert!(
                line.starts_with("# ") || line.ends_with("=y"),
                "{}: unexpected line {line:?}",
                fragment.name
            );
        }
    }
}

#[test]
fn check_names_what_is_missing() {
    let full: String = requirements()
        .iter()
        .map(|r| format!("{}=y\n", r.option))
        .collect();
    assert!(check(&full, false).is_empty());
    let modular = full.replace("CONFIG_VIRTIO_VSOCKETS=y", "CONFIG_VIRTIO_VSOCKETS=m");
    assert!(check(&modular, true).is_empty());
    let missing = check(
        &modular.replace("CONFIG_CGROUP_BPF=y\n", "# CONFIG_CGROUP_BPF is not set\n"),
        false,
    );
    let text: Vec<String> = missing.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(
        text[0].starts_with("CONFIG_VIRTIO_VSOCKETS=m (vsock:"),
        "{text:?}"
    );
    assert!(
        text[1].starts_with("CONFIG_CGROUP_BPF is not set (cgroup: BPF programs attached"),
        "{text:?}"
    );
}

#[test]
fn hash_follows_fragments_and_source() {
    let own = |version| fragments_hash(Flavour::Own, version);
    assert_eq!(own("6.1.1"), own("6.1.1"));
    assert_ne!(own("6.1.1"), own("6.1.2"));
    assert_ne!(own("6.1.1"), fragments_hash(Flavour::Kata, "6.1.1"));
}

#[test]
fn kata_fragment_adds_only_what_kata_lacks() {
    let recommended = options_of(&KATA_RECOMMENDED);
    assert!(!recommended.is_empty());
    for option in &recommended {
        assert!(!option.reason.is_empty(), "{} has no reason", option.option);
        assert!(
            !KATA_GUEST_CONFIG
                .lines()
                .any(|l| l.split_once('=').is_some_and(|(o, _)| o == option.option)),
            "{} is already in Kata's set",
            option.option
        );
    }
}

#[test]
fn kata_kernel_runs_the_agent_and_lacks_what_is_recommended() {
    let verdict = judge(KATA_GUEST_CONFIG, false);
    assert!(verdict.required.is_empty(), "{:?}", verdict.required);
    let lacking: Vec<&str> = verdict
        .recommended
        .iter()
        .map(|m| m.requirement.option.as_str())
        .collect();
    assert_eq!(
        lacking,
        [
            "CONFIG_BPF_JIT",
            "CONFIG_INET_DIAG",
            "CONFIG_INET_UDP_DIAG",
            "CONFIG_INET_DIAG_DESTROY"
        ]
    );
    // With socklb's fragment merged, nothing is left to recommend.
    let merged = format!("{KATA_GUEST_CONFIG}{}", KATA_RECOMMENDED.text);
    assert!(judge(&merged, false).recommended.is_empty());
}

#[test]
fn the_own_kernel_has_what_the_agent_requires() {
    let own: String = requirements()
        .iter()
        .map(|r| format!("{}=y\n", r.option))
        .collect();
    assert_eq!(judge(&own, false).required, Vec::new());
}
