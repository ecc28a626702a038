//! What the node daemon tells people: one row per sandbox (id, pod, agent
//! address, state, acknowledged version, lag behind the newest, last
//! error), kept by the sandbox tasks in the [`Registry`], served as JSON on
//! the daemon's unix socket (`GET /status`) and printed by
//! `socklb-shim node status [-o wide|json|yaml]`; `--pod` and `--sandbox`
//! find a sandbox's agent in it.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, sync::Mutex, time::Duration};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use socklb_protocols::socklb as api;

use crate::output::{Column, table};

/// Where a sandbox is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Asking Kata's shim for the agent's address.
    Resolving,
    /// Not served from this node (a `remote://` peer-pods sandbox).
    Skipped,
    /// The daemon has no complete table yet.
    WaitingForTable,
    /// Sending the whole table.
    Syncing,
    /// Holds the version in `acked`.
    InSync,
    /// The last attempt failed; retrying.
    Failing,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Resolving,
        State::Skipped,
        State::WaitingForTable,
        State::Syncing,
        State::InSync,
        State::Failing,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Resolving => "resolving",
            State::Skipped => "skipped",
            State::WaitingForTable => "waiting_for_table",
            State::Syncing => "syncing",
            State::InSync => "in_sync",
            State::Failing => "failing",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRow {
    pub id: String,
    /// `namespace/name`, when the sandbox's OCI bundle says.
    pub pod: Option<String>,
    pub agent: Option<String>,
    pub state: State,
    /// The table version the agent acknowledged last.
    pub acked: Option<u64>,
    /// Versions behind the newest (None before the first acknowledgement).
    pub lag: Option<u64>,
    pub last_error: Option<String>,
    /// The agent's decisions by verdict, as last read (`--decisions-secs`);
    /// None before, or from an agent before API 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<DecisionCounts>,
}

/// What a sandbox's datapath decided on VIP destinations since its agent
/// started (`Services.Decisions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionCounts {
    pub translated: u64,
    pub refused_no_endpoints: u64,
    pub refused_unknown_port: u64,
    pub passed_opted_out: u64,
    pub passed_external_port: u64,
    pub trace_dropped: u64,
}

impl DecisionCounts {
    pub fn from_api(response: &api::DecisionsResponse) -> DecisionCounts {
        DecisionCounts {
            translated: response.translated,
            refused_no_endpoints: response.refused_no_endpoints,
            refused_unknown_port: response.refused_unknown_port,
            passed_opted_out: response.passed_opted_out,
            passed_external_port: response.passed_external_port,
            trace_dropped: response.trace_dropped,
        }
    }

    /// Each verdict's label value (as `socklb-shim trace --verdict` names
    /// it) and count.
    pub fn by_verdict(&self) -> [(&'static str, u64); 5] {
        [
            ("translated", self.translated),
            ("refused-no-endpoints", self.refused_no_endpoints),
            ("refused-unknown-port", self.refused_unknown_port),
            ("passed-opted-out", self.passed_opted_out),
            ("passed-external-port", self.passed_external_port),
        ]
    }
}

/// The status report `GET /status` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    /// The newest table version (0: no complete table yet).
    pub version: u64,
    pub services: usize,
    /// Services not programmed: past the datapath's capacity.
    #[serde(default)]
    pub services_left_out: Vec<String>,
    pub sandboxes: Vec<SandboxRow>,
}

/// Every known sandbox's row.
#[derive(Default)]
pub struct Registry {
    rows: Mutex<BTreeMap<String, SandboxRow>>,
}

impl Registry {
    pub fn add(&self, id: &str, pod: Option<String>) {
        self.rows.lock().unwrap().insert(
            id.into(),
            SandboxRow {
                id: id.into(),
                pod,
                agent: None,
                state: State::Resolving,
                acked: None,
                lag: None,
                last_error: None,
                decisions: None,
            },
        );
    }

    pub fn remove(&self, id: &str) {
        self.rows.lock().unwrap().remove(id);
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut SandboxRow)) {
        if let Some(row) = self.rows.lock().unwrap().get_mut(id) {
            change(row);
        }
    }

    pub fn set_agent(&self, id: &str, agent: String) {
        self.update(id, |row| row.agent = Some(agent));
    }

    pub fn set_state(&self, id: &str, state: State) {
        self.update(id, |row| row.state = state);
    }

    pub fn failed(&self, id: &str, error: &str) {
        self.update(id, |row| {
            row.state = State::Failing;
            row.last_error = Some(error.into());
        });
    }

    /// A `state` that comes with an error to show (a shim that does not
    /// answer, a peer-pods sandbox).
    pub fn note(&self, id: &str, state: State, error: &str) {
        self.update(id, |row| {
            row.state = state;
            row.last_error = Some(error.into());
        });
    }

    pub fn set_decisions(&self, id: &str, decisions: Option<DecisionCounts>) {
        self.update(id, |row| row.decisions = decisions);
    }

    /// Each sandbox's decisions as last read: (id, pod, counts).
    pub fn decisions(&self) -> Vec<(String, Option<String>, DecisionCounts)> {
        self.rows
            .lock()
            .unwrap()
            .values()
            .filter_map(|row| Some((row.id.clone(), row.pod.clone(), row.decisions?)))
            .collect()
    }

    pub fn acknowledged(&self, id: &str, version: u64) {
        self.update(id, |row| {
            row.state = State::InSync;
            row.acked = Some(version);
        });
    }

    /// How many sandboxes are in each state.
    pub fn counts(&self) -> BTreeMap<State, usize> {
        let mut counts: BTreeMap<State, usize> = State::ALL.iter().map(|s| (*s, 0)).collect();
        for row in self.rows.lock().unwrap().values() {
            *counts.entry(row.state).or_default() += 1;
        }
        counts
    }

    pub fn report(&self, node: &str, version: u64, services: usize) -> Report {
        let sandboxes = self
            .rows
            .lock()
            .unwrap()
            .values()
            .map(|row| SandboxRow {
                lag: row.acked.map(|acked| version.saturating_sub(acked)),
                ..row.clone()
            })
            .collect();
        Report {
            node: node.into(),
            version,
            services,
            services_left_out: Vec::new(),
            sandboxes,
        }
    }
}

/// The report for people: a line about the node, a row per sandbox (the
/// agent's address only when `wide`: it is long, and --pod finds it).
pub fn render(report: &Report, wide: bool) -> String {
    let mut out = format!(
        "node {}: table version {}, {} services, {} sandboxes\n",
        report.node,
        report.version,
        report.services,
        report.sandboxes.len()
    );
    if let Some(first) = report.services_left_out.first() {
        let _ = writeln!(
            out,
            "{} services do not fit the datapath and are not programmed (first: {first})",
            report.services_left_out.len()
        );
    }
    out + &sandbox_table(&report.sandboxes, wide)
}

/// A row per sandbox (the agent's address only when `wide`).
pub fn sandbox_table(sandboxes: &[SandboxRow], wide: bool) -> String {
    let header = [
        Column::new("SANDBOX"),
        Column::new("POD"),
        Column::wide("AGENT"),
        Column::new("STATE"),
        Column::new("ACKED"),
        Column::new("LAG"),
        Column::new("LAST ERROR"),
    ];
    let rows: Vec<[String; 7]> = sandboxes
        .iter()
        .map(|row| {
            let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".into());
            [
                row.id.clone(),
                or_dash(row.pod.clone()),
                or_dash(row.agent.clone()),
                row.state.name().into(),
                or_dash(row.acked.map(|v| v.to_string())),
                or_dash(row.lag.map(|v| v.to_string())),
                or_dash(row.last_error.clone()),
            ]
        })
        .collect();
    table(header, &rows, wide)
}

impl Report {
    /// The report of the node daemon serving `socket`.
    pub async fn fetch(socket: &Path, timeout: Duration) -> anyhow::Result<Report> {
        let text = super::http::get_unix(socket, "/status", timeout)
            .await
            .with_context(|| {
                format!(
                    "asking the node daemon at {} (is `socklb-shim node` running?)",
                    socket.display()
                )
            })?;
        serde_json::from_str(&text).context("reading the node daemon's status report")
    }
}

/// One sandbox of a node, as a person names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodOrSandbox {
    /// `namespace/name`
    Pod(String),
    /// The sandbox's id
    Sandbox(String),
}

impl PodOrSandbox {
    /// `pod` as --pod takes it: NAMESPACE/NAME.
    pub fn pod(pod: &str) -> Result<Self, String> {
        match pod.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(PodOrSandbox::Pod(pod.into()))
            }
            _ => Err(format!("--pod {pod:?}: expected NAMESPACE/NAME")),
        }
    }

    fn names(&self, row: &SandboxRow) -> bool {
        match self {
            PodOrSandbox::Pod(pod) => row.pod.as_ref() == Some(pod),
            PodOrSandbox::Sandbox(id) => row.id == *id,
        }
    }

    /// The rows in `report` this names (a pod may have a second sandbox
    /// while its first is torn down), or why there are none, for a person.
    pub fn rows<'r>(&self, report: &'r Report) -> Result<Vec<&'r SandboxRow>, String> {
        let rows: Vec<&SandboxRow> = report
            .sandboxes
            .iter()
            .filter(|row| self.names(row))
            .collect();
        if !rows.is_empty() {
            return Ok(rows);
        }
        let absent = match self {
            PodOrSandbox::Pod(pod) => {
                format!("pod {pod} is not a Kata sandbox on node {}", report.node)
            }
            PodOrSandbox::Sandbox(id) => {
                format!("node {} has no Kata sandbox {id}", report.node)
            }
        };
        Err(format!(
            "{absent} (the node daemon knows {} sandboxes: `socklb-shim node status` lists them)",
            report.sandboxes.len()
        ))
    }

    /// The agent address of the sandbox this names in `report`, or why
    /// there is none, for a person.
    pub fn agent(&self, report: &Report) -> Result<String, String> {
        let rows = self.rows(report)?;
        if let Some(agent) = rows.iter().find_map(|row| row.agent.clone()) {
            return Ok(agent);
        }
        let row = rows[0];
        let sandbox = match &row.pod {
            Some(pod) => format!("sandbox {} of pod {pod}", row.id),
            None => format!("sandbox {}", row.id),
        };
        Err(match row.state {
            State::Skipped => format!(
                "{sandbox} is a remote sandbox, not served from node {}",
                report.node
            ),
            state => format!(
                "the node daemon has not found the agent of {sandbox} yet ({}{})",
                state.name(),
                row.last_error
                    .as_ref()
                    .map_or(String::new(), |error| format!(": {error}"))
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_or_sandbox_names_its_agent_or_says_why_not() {
        let registry = Registry::default();
        registry.add("sb-a", Some("shop/web-0".into()));
        registry.set_agent("sb-a", "hvsock:///run/a.sock:1100".into());
        registry.add("sb-b", Some("shop/web-1".into()));
        registry.failed("sb-b", "no agent URL");
        registry.add("sb-c", Some("shop/remote".into()));
        registry.set_state("sb-c", State::Skipped);
        let report = registry.report("node-1", 1, 1);
        let pod = |pod: &str| PodOrSandbox::pod(pod).unwrap();
        let sandbox = |id: &str| PodOrSandbox::Sandbox(id.into());

        for which in [pod("shop/web-0"), sandbox("sb-a")] {
            assert_eq!(
                which.agent(&report).as_deref(),
                Ok("hvsock:///run/a.sock:1100")
            );
        }
        let err = pod("shop/absent").agent(&report).unwrap_err();
        assert!(
            err.contains("pod shop/absent is not a Kata sandbox on node node-1"),
            "{err}"
        );
        let err = sandbox("sb-z").agent(&report).unwrap_err();
        assert!(
            err.contains("node node-1 has no Kata sandbox sb-z"),
            "{err}"
        );
        for which in [pod("shop/web-1"), sandbox("sb-b")] {
            let err = which.agent(&report).unwrap_err();
            assert!(
                err.contains("not found the agent of sandbox sb-b of pod shop/web-1 yet")
                    && err.contains("failing: no agent URL"),
                "{err}"
            );
        }
        for which in [pod("shop/remote"), sandbox("sb-c")] {
            let err = which.agent(&report).unwrap_err();
            assert!(
                err.contains("sb-c of pod shop/remote is a remote sandbox"),
                "{err}"
            );
        }
        let rows = sandbox("sb-b").rows(&report).unwrap();
        assert_eq!(rows.iter().map(|row| &row.id).collect::<Vec<_>>(), ["sb-b"]);
    }

    #[test]
    fn a_pod_is_a_namespace_and_a_name() {
        for bad in ["web-0", "shop/", "/web-0", "shop/web/0"] {
            let err = PodOrSandbox::pod(bad).unwrap_err();
            assert!(err.contains("expected NAMESPACE/NAME"), "{bad}: {err}");
        }
    }

    #[test]
    fn rows_show_lag_and_errors() {
        let registry = Registry::default();
        registry.add("sb-a", Some("shop/web-0".into()));
        registry.add("sb-b", None);
        registry.set_agent("sb-a", "hvsock:///run/a.sock:1100".into());
        registry.acknowledged("sb-a", 3);
        registry.failed("sb-b", "agent unreachable");
        let report = registry.report("node-1", 5, 12);
        assert_eq!(report.sandboxes[0].lag, Some(2));
        assert_eq!(report.sandboxes[1].state, State::Failing);
        assert_eq!(registry.counts()[&State::InSync], 1);
        assert_eq!(registry.counts()[&State::Resolving], 0);
        let text = render(&report, false);
        assert!(text.contains("shop/web-0"), "{text}");
        assert!(text.contains("agent unreachable"), "{text}");
        assert!(
            !text.contains("hvsock://"),
            "the agent is for -o wide: {text}"
        );
        let wide = render(&report, true);
        assert!(
            wide.contains("AGENT") && wide.contains("hvsock:///run/a.sock:1100"),
            "{wide}"
        );
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
        registry.remove("sb-b");
        assert_eq!(registry.report("node-1", 5, 12).sandboxes.len(), 1);
    }
}
