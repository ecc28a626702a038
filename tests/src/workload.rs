//! The standard workload of the datapath tests: backends b1..=bN (TCP
//! :8080, UDP :5353, v4 and v6), the one-service table in front of them,
//! and reading what the test clients report.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::{Sandbox, backend_ip, backend_ip6};

pub fn tcp_backends(n: u8) -> String {
    (1..=n)
        .map(|i| format!("{{ip: {}, port: 8080}}", backend_ip(i)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A table file with one service, 10.96.0.20:80/TCP, on b1..=bN:8080.
pub fn web_table(sandbox: &Sandbox, n: u8) -> std::path::PathBuf {
    sandbox.table(
        "t.yaml",
        &format!(
            "services: [{{vip: 10.96.0.20, port: 80, backends: [{}]}}]",
            tcp_backends(n)
        ),
    )
}

/// Starts backends b1..=bN serving TCP :8080 and UDP :5353, v4 and v6.
pub fn start_backends(sandbox: &Sandbox, n: u8) {
    for i in 1..=n {
        let tcp4 = format!("{}:8080", backend_ip(i));
        let tcp6 = format!("[{}]:8080", backend_ip6(i));
        let udp4 = format!("{}:5353", backend_ip(i));
        let udp6 = format!("[{}]:5353", backend_ip6(i));
        sandbox.backend(&format!("b{i}"), &[&tcp4, &tcp6], &[&udp4, &udp6]);
    }
}

pub fn ok(results: &[Value]) -> &[Value] {
    for r in results {
        assert!(r.get("error").is_none(), "exchange failed: {r}");
    }
    results
}

/// The one successful exchange of a client run.
pub fn one(results: Vec<Value>) -> Value {
    assert_eq!(ok(&results).len(), 1, "{results:?}");
    results.into_iter().next().unwrap()
}

pub fn backend_counts(results: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in ok(results) {
        *counts
            .entry(r["backend"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

pub fn errno(result: &Value) -> i64 {
    result["errno"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error, got {result}"))
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}
