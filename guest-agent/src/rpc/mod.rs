//! The ttrpc services (`socklb.v1.Health`, `socklb.v1.Services`). Handlers
//! are thin: they convert messages, run the table operation on a blocking
//! thread (map updates are syscalls) and map errors to ttrpc codes. A Sync
//! in parts is staged here until its commit; a List larger than one message
//! is served in pages from a snapshot taken at its first page.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use async_trait::async_trait;
use slog::{Logger, info, warn};
use socklb_protocols::{
    API_VERSION,
    socklb::{self as api, check_response::Status},
    socklb_ttrpc,
};
use socklb_table::{Service, TableError};
use ttrpc::{Code, r#async::TtrpcContext};

use crate::{
    datapath,
    opt_out::OptOutError,
    service_table::{ServiceTable, StagedSync, StagingError, WriteError, Written},
};

mod report;
mod services_api;
mod trace;

pub use report::prometheus_text;
use report::{map_usage, stats};

/// Listings whose later pages may still be asked for; the oldest is dropped
/// beyond this (its reader gets Aborted and lists again).
const LISTINGS_HELD: usize = 4;

pub struct Rpc {
    table: Arc<Mutex<ServiceTable>>,
    run_time_stats: bool,
    /// Optional kernel features present or missing (kernel::Features).
    kernel_features: Vec<&'static str>,
    /// The one Sync in parts being received, if any.
    staged: Mutex<Option<StagedSync>>,
    /// Sync and listing ids, never reused while the agent runs.
    next_id: AtomicU64,
    listings: Mutex<VecDeque<Listing>>,
    /// The datapath's decisions for `Trace`; none for a table in memory.
    tracer: Option<Arc<datapath::Tracer>>,
    log: Logger,
}

/// A snapshot of the table served page by page.
struct Listing {
    id: u64,
    generation: u64,
    digest: String,
    services: Vec<Service>,
}

impl Rpc {
    pub fn new(table: Arc<Mutex<ServiceTable>>, run_time_stats: bool, log: &Logger) -> Rpc {
        Rpc {
            table,
            run_time_stats,
            kernel_features: Vec::new(),
            staged: Mutex::new(None),
            next_id: AtomicU64::new(1),
            listings: Mutex::new(VecDeque::new()),
            tracer: None,
            log: log.new(slog::o!("component" => "rpc")),
        }
    }

    /// Lists `names` (what the kernel offers or lacks) in Version's features.
    pub fn with_kernel_features(mut self, names: Vec<&'static str>) -> Rpc {
        self.kernel_features = names;
        self
    }

    /// Serves `Trace` from `tracer`.
    pub fn with_tracer(mut self, tracer: Arc<datapath::Tracer>) -> Rpc {
        self.tracer = Some(tracer);
        self
    }

    /// The ttrpc service map for `ttrpc::r#async::Server::register_service`.
    pub fn services(self: Arc<Self>) -> std::collections::HashMap<String, ttrpc::r#async::Service> {
        let mut services = socklb_ttrpc::create_health(self.clone());
        services.extend(socklb_ttrpc::create_services(self));
        services
    }

    /// Runs `op`, which only reads, on the table on a blocking thread: a
    /// failure is the kernel's (Internal).
    async fn with_table<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut ServiceTable) -> anyhow::Result<T> + Send + 'static,
    ) -> ttrpc::Result<T> {
        self.write_table(move |t| Ok(op(t)?)).await
    }

    /// Runs the write `op` on the table on a blocking thread; a refusal or
    /// failure is answered with its code (`code_of`).
    async fn write_table<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut ServiceTable) -> Result<T, WriteError> + Send + 'static,
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

    /// The table's generation and its stats. The `AFFINITY` LRU map is
    /// walked after the table lock is released: a walk is one syscall per
    /// entry.
    async fn collect_stats(&self) -> ttrpc::Result<(u64, api::StatsResponse)> {
        let run_time_stats = self.run_time_stats;
        let (generation, mut stats, pin_dir) = self
            .with_table(move |t| {
                let pin_dir = t.datapath().map(|d| d.pin_dir().to_path_buf());
                Ok((t.generation(), stats(t, run_time_stats)?, pin_dir))
            })
            .await?;
        if let Some(pin_dir) = pin_dir {
            let lru = tokio::task::spawn_blocking(move || datapath::lru_usage(&pin_dir))
                .await
                .map_err(|err| status(Code::INTERNAL, err))?
                .map_err(|err| status(Code::INTERNAL, format!("{err:#}")))?;
            stats.maps.extend(lru.into_iter().map(map_usage));
        }
        Ok((generation, stats))
    }

    /// Logs a write: `sent` is how many services (or keys) the request
    /// carried, `services` how many the table holds after it.
    fn written(&self, request: &str, sent: usize, written: Written) -> api::WriteResponse {
        info!(self.log, "table written"; "request" => request, "sent" => sent,
              "generation" => written.generation, "services" => written.services);
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

/// The ttrpc code of each way a write ends short. InvalidArgument names the
/// service and field, ResourceExhausted the limit; Internal is the kernel's.
fn code_of(err: &WriteError) -> Code {
    match err {
        WriteError::Table(TableError::Capacity { .. }) => Code::RESOURCE_EXHAUSTED,
        WriteError::Table(TableError::UnknownService { .. }) => Code::NOT_FOUND,
        WriteError::Table(_) => Code::INVALID_ARGUMENT,
        WriteError::StaleGeneration { .. } => Code::FAILED_PRECONDITION,
        WriteError::OptOut(OptOutError::TooMany { .. }) => Code::RESOURCE_EXHAUSTED,
        WriteError::OptOut(OptOutError::NotAttached) => Code::FAILED_PRECONDITION,
        WriteError::OptOut(_) => Code::INVALID_ARGUMENT,
        WriteError::Failed(_) => Code::INTERNAL,
    }
}

/// A request refused before the table was touched.
fn invalid(err: TableError) -> ttrpc::Error {
    let err = WriteError::from(err);
    status(code_of(&err), err)
}

/// A refused part of a Sync in parts: Aborted when the sync is gone (the
/// host starts again), else as for a whole table.
fn staging_refused(err: StagingError) -> ttrpc::Error {
    match err {
        StagingError::Table(err) => invalid(err),
        StagingError::NotInProgress { .. } => status(Code::ABORTED, err),
        _ => status(Code::INVALID_ARGUMENT, err),
    }
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
            .with_table(|t| Ok(t.datapath().map(|d| d.attached_hooks()).unwrap_or_default()))
            .await?;
        let mut features = vec![
            "client-ip-affinity".to_string(),
            "udp-socket-stickiness".to_string(),
            "opt-out-cgroups".to_string(),
        ];
        if self.run_time_stats {
            features.push("bpf-run-time-stats".into());
        }
        features.extend(self.kernel_features.iter().map(|f| f.to_string()));
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
