//! The ttrpc services (`socklb.v1.Health`, `socklb.v1.Services`). Handlers
//! are thin: they convert messages, run the table operation on a blocking
//! thread (map updates are syscalls) and map errors to ttrpc codes.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use slog::{Logger, info, warn};
use socklb_protocols::{
    API_VERSION,
    socklb::{self as api, check_response::Status},
    socklb_ttrpc,
};
use socklb_table::{Service, ServiceKey, Table, TableError};
use ttrpc::{Code, r#async::TtrpcContext};

use crate::services::{ServiceTable, Written};

pub struct Rpc {
    table: Arc<Mutex<ServiceTable>>,
    run_time_stats: bool,
    log: Logger,
}

impl Rpc {
    pub fn new(table: Arc<Mutex<ServiceTable>>, run_time_stats: bool, log: &Logger) -> Rpc {
        Rpc {
            table,
            run_time_stats,
            log: log.new(slog::o!("component" => "rpc")),
        }
    }

    /// The ttrpc service map for `ttrpc::r#async::Server::register_service`.
    pub fn services(self: Arc<Self>) -> std::collections::HashMap<String, ttrpc::r#async::Service> {
        let mut services = socklb_ttrpc::create_health(self.clone());
        services.extend(socklb_ttrpc::create_services(self));
        services
    }

    /// Runs `op` on the table on a blocking thread.
    async fn with_table<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut ServiceTable) -> anyhow::Result<T> + Send + 'static,
    ) -> ttrpc::Result<T> {
        let table = self.table.clone();
        tokio::task::spawn_blocking(move || op(&mut table.lock().expect("table lock")))
            .await
            .map_err(|err| status(Code::INTERNAL, err))?
            .map_err(|err| {
                let code = code_of(&err);
                if code == Code::INTERNAL {
                    warn!(self.log, "request failed"; "error" => format!("{err:#}"));
                }
                status(code, format!("{err:#}"))
            })
    }

    fn written(&self, request: &str, written: Written) -> api::WriteResponse {
        info!(self.log, "table written"; "request" => request, "generation" => written.generation,
              "services" => written.services);
        api::WriteResponse {
            generation: written.generation,
            digest: written.digest.unwrap_or_default(),
            services: written.services as u32,
            ..Default::default()
        }
    }
}

fn status(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

/// InvalidArgument names the service and field, ResourceExhausted the limit.
fn code_of(err: &anyhow::Error) -> Code {
    match err.downcast_ref::<TableError>() {
        Some(TableError::Capacity { .. }) => Code::RESOURCE_EXHAUSTED,
        Some(TableError::UnknownService { .. }) => Code::NOT_FOUND,
        Some(_) => Code::INVALID_ARGUMENT,
        None => Code::INTERNAL,
    }
}

/// A request refused before the table was touched.
fn invalid(err: TableError) -> ttrpc::Error {
    let err = anyhow::Error::from(err);
    status(code_of(&err), err)
}

#[async_trait]
impl socklb_ttrpc::Health for Rpc {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _: api::CheckRequest,
    ) -> ttrpc::Result<api::CheckResponse> {
        Ok(api::CheckResponse {
            status: Status::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _: api::VersionRequest,
    ) -> ttrpc::Result<api::VersionResponse> {
        let hooks = self
            .with_table(|t| Ok(t.datapath().attached_hooks()))
            .await?;
        let mut features = vec![
            "client-ip-affinity".to_string(),
            "udp-socket-stickiness".to_string(),
        ];
        if self.run_time_stats {
            features.push("bpf-run-time-stats".into());
        }
        Ok(api::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            api_version: API_VERSION.into(),
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            hooks_attached: hooks.into_iter().map(String::from).collect(),
            features,
            ..Default::default()
        })
    }
}

#[async_trait]
impl socklb_ttrpc::Services for Rpc {
    async fn sync(
        &self,
        _ctx: &TtrpcContext,
        request: api::SyncRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        let table = Table::from_api(&request.services).map_err(invalid)?;
        let generation = request.generation;
        let written = self.with_table(move |t| t.sync(&table, generation)).await?;
        Ok(self.written("sync", written))
    }

    async fn upsert(
        &self,
        _ctx: &TtrpcContext,
        request: api::UpsertRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        let services = request
            .services
            .iter()
            .enumerate()
            .map(|(index, service)| Service::from_api(index, service))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let written = self.with_table(move |t| t.upsert(&services)).await?;
        Ok(self.written("upsert", written))
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        request: api::DeleteRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        let keys = request
            .keys
            .iter()
            .enumerate()
            .map(|(index, key)| ServiceKey::from_api(&format!("keys[{index}]"), key))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let written = self.with_table(move |t| t.delete(&keys)).await?;
        Ok(self.written("delete", written))
    }

    async fn list(
        &self,
        _ctx: &TtrpcContext,
        _: api::ListRequest,
    ) -> ttrpc::Result<api::ListResponse> {
        let (generation, table) = self.with_table(|t| t.list()).await?;
        Ok(api::ListResponse {
            generation,
            digest: table.digest(),
            services: table.to_api(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        let run_time_stats = self.run_time_stats;
        self.with_table(move |t| stats(t, run_time_stats)).await
    }

    async fn metrics(
        &self,
        _ctx: &TtrpcContext,
        _: api::MetricsRequest,
    ) -> ttrpc::Result<api::MetricsResponse> {
        let run_time_stats = self.run_time_stats;
        let (generation, stats) = self
            .with_table(move |t| Ok((t.generation(), stats(t, run_time_stats)?)))
            .await?;
        Ok(api::MetricsResponse {
            text: prometheus_text(generation, &stats),
            ..Default::default()
        })
    }
}

fn stats(table: &mut ServiceTable, run_time_stats: bool) -> anyhow::Result<api::StatsResponse> {
    let datapath = table.datapath();
    Ok(api::StatsResponse {
        services: datapath
            .service_stats()?
            .into_iter()
            .map(|(key, counters)| api::ServiceStats {
                key: protobuf::MessageField::some(key.to_api()),
                translations: counters.translations,
                rejects: counters.rejects,
                ..Default::default()
            })
            .collect(),
        hooks: datapath
            .hook_stats()?
            .into_iter()
            .map(|hook| api::HookStats {
                hook: hook.hook.into(),
                run_count: hook.run_count,
                run_time_ns: hook.run_time.as_nanos() as u64,
                ..Default::default()
            })
            .collect(),
        maps: datapath
            .map_usage()
            .into_iter()
            .map(|usage| api::MapUsage {
                map: usage.map.into(),
                entries: usage.entries as u64,
                capacity: usage.capacity as u64,
                ..Default::default()
            })
            .collect(),
        run_time_stats_enabled: run_time_stats,
        ..Default::default()
    })
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
