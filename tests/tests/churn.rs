//! Per-socket state under socket churn: a busy pod opens and closes far more
//! sockets than any map could hold, through plain and ClientIP services,
//! and neither its long-lived sockets nor its ClientIP affinity may lose
//! what socklb remembers for them. Needs root.

use serde_json::Value;
use socklb_tests::{Sandbox, backend_ip, workload::start_backends};

#[test]
fn long_lived_sockets_and_affinity_survive_socket_churn() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 4);
    let backends = |port: u16| {
        (1..=4)
            .map(|n| format!("{{ip: {}, port: {port}}}", backend_ip(n)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let affinity = |vip: &str| {
        format!(
            "{{vip: {vip}, port: 80, affinity: {{clientIP: {{timeoutSeconds: 600}}}}, backends: [{}]}}",
            backends(8080)
        )
    };
    // ClientIP services only the churn uses: it makes choices of its own
    // in AFFINITY beside the checked ones.
    let churn_only: Vec<String> = (0..AFFINITY_CHURN_SERVICES)
        .map(|n| format!("10.96.1.{n}:80"))
        .collect();
    let table = sandbox.table(
        "t.yaml",
        &format!(
            "services: [
              {{vip: 10.96.0.10, port: 80, backends: [{tcp}]}},
              {{vip: 10.96.0.11, port: 53, protocol: UDP, backends: [{udp}]}},
              {checked},
              {churn_only}]",
            tcp = backends(8080),
            udp = backends(5353),
            checked = ["10.96.0.20", "10.96.0.21", "10.96.0.22"]
                .map(affinity)
                .join(", "),
            churn_only = churn_only
                .iter()
                .map(|target| affinity(target.trim_end_matches(":80")))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    );
    let _agent = sandbox.start_agent(Some(&table));

    // 300,000 sockets: more than twice what the LRU maps that held
    // per-socket state before could (131,072 translations; 65,536 choices
    // shared by affinity and UDP sockets). Checks 3 s apart leave the
    // long-lived sockets idle as a real one would be: with those maps, both
    // getpeername and the affinity were seen to fail here; asked every
    // 0.5 s, an LRU kept the getpeername entry warm.
    let mut args = vec![
        "churn",
        "--tcp",
        "10.96.0.10:80",
        "--udp",
        "10.96.0.11:53",
        // Three affinity services: a design that loses the choices keeps
        // all three by chance once in 64 runs, not once in 4.
        "--affinity",
        "10.96.0.20:80",
        "--affinity",
        "10.96.0.21:80",
        "--affinity",
        "10.96.0.22:80",
        "--tcp-connections",
        "100000",
        "--udp-sockets",
        "200000",
        "--check-ms",
        "3000",
    ];
    for target in &churn_only {
        args.extend(["--affinity-churn", target]);
    }
    let results = sandbox.client(&args);
    let summary = &results[0];
    eprintln!("churn: {summary}");
    assert_eq!(
        summary["failed"], 0,
        "churn connects or sends failed: {summary}"
    );
    assert_eq!(summary["first_udp_source"], "10.96.0.11:53", "{summary}");
    for checks in ["tcp_checks", "udp_checks"] {
        assert!(summary[checks].as_u64().unwrap() >= 2, "{summary}");
    }
    assert_eq!(
        summary["wrong"].as_array().unwrap().len(),
        0,
        "a long-lived socket lost its VIP: {summary}"
    );
    let before = summary["affinity_before"].as_array().unwrap();
    assert!(
        before.len() == 3 && before.iter().all(Value::is_string),
        "{summary}"
    );
    assert_eq!(
        summary["affinity_before"], summary["affinity_after"],
        "ClientIP affinity lost in the churn: {summary}"
    );
    assert_eq!(
        summary["affinity_moved"], 0,
        "churn connections through a checked ClientIP service reached another backend: {summary}"
    );
}

/// ClientIP services the churn alone connects to.
const AFFINITY_CHURN_SERVICES: u8 = 64;
