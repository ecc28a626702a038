//! The node daemon's Prometheus metrics (text format, served on
//! `--metrics-addr` at `/metrics`): sandboxes by state, Sync / Upsert /
//! Delete counts and errors, the latency from a change being published to
//! an agent acknowledging it, watch events, and the table's version and
//! size.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use socklb_table::ServiceKey;

use crate::node::status::{DecisionCounts, State};

/// Upper bounds of the latency histogram's buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Counter {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Counter {
    fn add(&self, ok: bool) {
        if ok { &self.ok } else { &self.failed }.fetch_add(1, Relaxed);
    }
}

#[derive(Default)]
pub struct Metrics {
    syncs: Counter,
    upserts: Counter,
    deletes: Counter,
    watch_events: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    /// Services the table leaves out: past the datapath's capacity.
    left_out: Mutex<Vec<ServiceKey>>,
    /// Services of the cluster no table may hold (see `set_refused`).
    refused: AtomicU64,
}

/// What the metrics describe that lives elsewhere.
pub struct Snapshot<'a> {
    pub sandboxes: &'a std::collections::BTreeMap<State, usize>,
    pub version: u64,
    pub services: usize,
    /// Each sandbox's decisions as last read: (id, pod, counts).
    pub decisions: &'a [(String, Option<String>, DecisionCounts)],
}

impl Metrics {
    pub fn sync_done(&self, ok: bool) {
        self.syncs.add(ok);
    }

    pub fn upsert_done(&self, ok: bool) {
        self.upserts.add(ok);
    }

    pub fn delete_done(&self, ok: bool) {
        self.deletes.add(ok);
    }

    pub fn set_left_out(&self, keys: &BTreeSet<ServiceKey>) {
        *self.left_out.lock().unwrap() = keys.iter().copied().collect();
    }

    /// How many of the cluster's services (VIP, port, protocol) the
    /// Kubernetes source refuses: a VIP of the guest's own address
    /// classes, a backend that is its own VIP:port.
    pub fn set_refused(&self, services: usize) {
        self.refused.store(services as u64, Relaxed);
    }

    /// Services the table leaves out, in key order.
    pub fn left_out(&self) -> Vec<ServiceKey> {
        self.left_out.lock().unwrap().clone()
    }

    pub fn watch_event(&self) {
        self.watch_events.fetch_add(1, Relaxed);
    }

    /// An agent acknowledged changes published `latency` ago.
    pub fn acknowledged(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add(latency.as_micros() as u64, Relaxed);
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        family(
            "socklb_node_sandboxes",
            "gauge",
            "Sandboxes on this node by state.",
            snapshot
                .sandboxes
                .iter()
                .map(|(state, n)| (format!("{{state=\"{}\"}}", state.name()), n.to_string()))
                .collect(),
        );
        for (name, help, counter) in [
            (
                "socklb_node_syncs_total",
                "Whole-table Syncs sent to agents.",
                &self.syncs,
            ),
            (
                "socklb_node_upserts_total",
                "Upserts sent to agents.",
                &self.upserts,
            ),
            (
                "socklb_node_deletes_total",
                "Deletes sent to agents.",
                &self.deletes,
            ),
        ] {
            family(
                name,
                "counter",
                help,
                vec![
                    (
                        "{result=\"ok\"}".into(),
                        counter.ok.load(Relaxed).to_string(),
                    ),
                    (
                        "{result=\"error\"}".into(),
                        counter.failed.load(Relaxed).to_string(),
                    ),
                ],
            );
        }
        family(
            "socklb_node_watch_events_total",
            "counter",
            "Kubernetes watch events received (Services and EndpointSlices).",
            vec![(String::new(), self.watch_events.load(Relaxed).to_string())],
        );
        let mut latency: Vec<(String, String)> = LATENCY_BUCKETS
            .iter()
            .zip(&self.latency_buckets)
            .map(|(bound, n)| {
                (
                    format!("_bucket{{le=\"{bound}\"}}"),
                    n.load(Relaxed).to_string(),
                )
            })
            .collect();
        let count = self.latency_count.load(Relaxed).to_string();
        latency.push(("_bucket{le=\"+Inf\"}".into(), count.clone()));
        latency.push((
            "_sum".into(),
            format!("{}", self.latency_sum_us.load(Relaxed) as f64 / 1e6),
        ));
        latency.push(("_count".into(), count));
        family(
            "socklb_node_change_to_ack_seconds",
            "histogram",
            "From a batch of changes being published to an agent acknowledging it.",
            latency,
        );
        family(
            "socklb_node_table_version",
            "gauge",
            "The newest table version (0: no complete table yet).",
            vec![(String::new(), snapshot.version.to_string())],
        );
        family(
            "socklb_node_table_services",
            "gauge",
            "Services (VIP, port, protocol) in the node's table.",
            vec![(String::new(), snapshot.services.to_string())],
        );
        family(
            "socklb_node_services_left_out",
            "gauge",
            "Services not programmed because the datapath cannot hold them (see node status).",
            vec![(
                String::new(),
                self.left_out.lock().unwrap().len().to_string(),
            )],
        );
        family(
            "socklb_node_services_refused",
            "gauge",
            "Services of the cluster no table may hold (a VIP of the guest's own address \
             classes, a backend that is its own VIP:port), skipped and logged by name.",
            vec![(String::new(), self.refused.load(Relaxed).to_string())],
        );
        // One series per sandbox and verdict: bounded by the sandboxes a
        // node runs, never per service.
        let sandbox_labels = |id: &str, pod: &Option<String>| {
            format!(
                "sandbox=\"{}\",pod=\"{}\"",
                escape_label(id),
                escape_label(pod.as_deref().unwrap_or(""))
            )
        };
        family(
            "socklb_node_sandbox_decisions_total",
            "counter",
            "Connects and datagrams to VIPs each sandbox's datapath decided since its agent \
             started, by verdict (read every --decisions-secs).",
            snapshot
                .decisions
                .iter()
                .flat_map(|(id, pod, counts)| {
                    counts.by_verdict().map(|(verdict, n)| {
                        (
                            format!("{{{},verdict=\"{verdict}\"}}", sandbox_labels(id, pod)),
                            n.to_string(),
                        )
                    })
                })
                .collect(),
        );
        family(
            "socklb_node_sandbox_trace_dropped_total",
            "counter",
            "Decisions each sandbox's hooks did not write for a tracer (past its rate, or the \
             ring full) since its agent started.",
            snapshot
                .decisions
                .iter()
                .map(|(id, pod, counts)| {
                    (
                        format!("{{{}}}", sandbox_labels(id, pod)),
                        counts.trace_dropped.to_string(),
                    )
                })
                .collect(),
        );
        out
    }
}

/// A label value as the text format needs it: a sandbox directory's name
/// and a bundle's pod annotations may hold any character.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_label("default/client"), "default/client");
    }

    #[test]
    fn renders_counts_states_and_a_cumulative_histogram() {
        let metrics = Metrics::default();
        metrics.sync_done(true);
        metrics.sync_done(false);
        metrics.watch_event();
        metrics.acknowledged(Duration::from_millis(3));
        metrics.acknowledged(Duration::from_millis(30));
        metrics.set_refused(3);
        let sandboxes = BTreeMap::from([(State::InSync, 2), (State::Failing, 1)]);
        let decisions = [(
            "sb1".to_string(),
            Some("default/client".to_string()),
            DecisionCounts {
                translated: 5,
                refused_unknown_port: 2,
                trace_dropped: 9,
                ..Default::default()
            },
        )];
        let text = metrics.render(&Snapshot {
            sandboxes: &sandboxes,
            version: 7,
            services: 40,
            decisions: &decisions,
        });
        for line in [
            "socklb_node_sandboxes{state=\"in_sync\"} 2",
            "socklb_node_sandboxes{state=\"failing\"} 1",
            "socklb_node_syncs_total{result=\"ok\"} 1",
            "socklb_node_syncs_total{result=\"error\"} 1",
            "socklb_node_watch_events_total 1",
            "socklb_node_change_to_ack_seconds_bucket{le=\"0.001\"} 0",
            "socklb_node_change_to_ack_seconds_bucket{le=\"0.005\"} 1",
            "socklb_node_change_to_ack_seconds_bucket{le=\"0.05\"} 2",
            "socklb_node_change_to_ack_seconds_bucket{le=\"+Inf\"} 2",
            "socklb_node_change_to_ack_seconds_count 2",
            "socklb_node_table_version 7",
            "socklb_node_services_refused 3",
            "# TYPE socklb_node_change_to_ack_seconds histogram",
            "socklb_node_sandbox_decisions_total{sandbox=\"sb1\",pod=\"default/client\",verdict=\"translated\"} 5",
            "socklb_node_sandbox_decisions_total{sandbox=\"sb1\",pod=\"default/client\",verdict=\"refused-unknown-port\"} 2",
            "socklb_node_sandbox_decisions_total{sandbox=\"sb1\",pod=\"default/client\",verdict=\"passed-opted-out\"} 0",
            "socklb_node_sandbox_trace_dropped_total{sandbox=\"sb1\",pod=\"default/client\"} 9",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
