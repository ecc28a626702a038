//! What Stats and Metrics report: per-service counters, per-hook run time,
//! map use, in the API form and as Prometheus text.

use std::fmt::Write as _;

use socklb_protocols::socklb::{self as api};

use crate::datapath;
use crate::service_table::ServiceTable;

pub(super) fn stats(
    table: &mut ServiceTable,
    run_time_stats: bool,
) -> anyhow::Result<api::StatsResponse> {
    let programmed = table.programmed();
    let hooks = match table.datapath() {
        Some(datapath) => datapath.hook_stats()?,
        None => Vec::new(),
    };
    Ok(api::StatsResponse {
        services: programmed
            .service_stats()?
            .into_iter()
            .map(|(key, counters)| api::ServiceStats {
                key: protobuf::MessageField::some(key.to_api()),
                translations: counters.translations,
                rejects: counters.rejects,
                insert_failures: counters.insert_failures,
                ..Default::default()
            })
            .collect(),
        hooks: hooks
            .into_iter()
            .map(|hook| api::HookStats {
                hook: hook.hook.into(),
                run_count: hook.run_count,
                run_time_ns: hook.run_time.as_nanos() as u64,
                ..Default::default()
            })
            .collect(),
        maps: programmed.map_usage().into_iter().map(map_usage).collect(),
        run_time_stats_enabled: run_time_stats,
        ..Default::default()
    })
}

pub(super) fn map_usage(usage: datapath::MapUsage) -> api::MapUsage {
    api::MapUsage {
        map: usage.map.into(),
        entries: usage.entries as u64,
        capacity: usage.capacity as u64,
        ..Default::default()
    }
}

/// Stats in the Prometheus text exposition format.
pub fn prometheus_text(generation: u64, stats: &api::StatsResponse) -> String {
    let mut text = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(text, "{name}{labels} {value}");
        }
    };
    let service_labels = |s: &api::ServiceStats| {
        let protocol = if s.key.protocol.value() == api::Protocol::UDP as i32 {
            "UDP"
        } else {
            "TCP"
        };
        format!(
            r#"{{vip="{}",port="{}",protocol="{protocol}"}}"#,
            s.key.vip, s.key.port
        )
    };
    family(
        "socklb_service_translations_total",
        "counter",
        "Connects and datagrams sent to a backend of the service.",
        stats
            .services
            .iter()
            .map(|s| (service_labels(s), s.translations.to_string()))
            .collect(),
    );
    family(
        "socklb_service_rejects_total",
        "counter",
        "Connects and datagrams refused because the service had no backend.",
        stats
            .services
            .iter()
            .map(|s| (service_labels(s), s.rejects.to_string()))
            .collect(),
    );
    family(
        "socklb_service_insert_failures_total",
        "counter",
        "Translations whose per-socket storage or affinity entry could not be stored.",
        stats
            .services
            .iter()
            .map(|s| (service_labels(s), s.insert_failures.to_string()))
            .collect(),
    );
    family(
        "socklb_hook_runs_total",
        "counter",
        "Runs of each hook's program (counted while BPF run-time stats are on).",
        stats
            .hooks
            .iter()
            .map(|h| (format!(r#"{{hook="{}"}}"#, h.hook), h.run_count.to_string()))
            .collect(),
    );
    family(
        "socklb_hook_run_seconds_total",
        "counter",
        "Time spent in each hook's program (counted while BPF run-time stats are on).",
        stats
            .hooks
            .iter()
            .map(|h| {
                (
                    format!(r#"{{hook="{}"}}"#, h.hook),
                    format!("{:.9}", h.run_time_ns as f64 / 1e9),
                )
            })
            .collect(),
    );
    family(
        "socklb_map_entries",
        "gauge",
        "Entries in use per map.",
        stats
            .maps
            .iter()
            .map(|m| (format!(r#"{{map="{}"}}"#, m.map), m.entries.to_string()))
            .collect(),
    );
    family(
        "socklb_map_capacity",
        "gauge",
        "Capacity per map.",
        stats
            .maps
            .iter()
            .map(|m| (format!(r#"{{map="{}"}}"#, m.map), m.capacity.to_string()))
            .collect(),
    );
    family(
        "socklb_table_generation",
        "gauge",
        "Generation of the table the host last synced.",
        vec![(String::new(), generation.to_string())],
    );
    text
}
