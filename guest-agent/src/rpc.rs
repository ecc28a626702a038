//! The ttrpc services (`socklb.v1.Health`, `socklb.v1.Services`). Handlers
//! are thin: they convert messages, run the table operation on a blocking
//! thread (map updates are syscalls) and map errors to ttrpc codes. A Sync
//! in parts is staged here until its commit; a List larger than one message
//! is served in pages from a snapshot taken at its first page.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use protobuf::Message as _;
use slog::{Logger, info, warn};
use socklb_protocols::{
    API_VERSION, PART_BYTES,
    socklb::{self as api, check_response::Status},
    socklb_ttrpc,
};
use socklb_table::{Service, ServiceKey, Table, TableError};
use ttrpc::{Code, r#async::TtrpcContext};

use crate::datapath;
use crate::opt_out::{self, OptOutError};
use crate::services::{ServiceTable, StagedSync, StagingError, StaleGeneration, Written};

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
            log: log.new(slog::o!("component" => "rpc")),
        }
    }

    /// Lists `names` (what the kernel offers or lacks) in Version's features.
    pub fn with_kernel_features(mut self, names: Vec<&'static str>) -> Rpc {
        self.kernel_features = names;
        self
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

    /// Logs a write: `sent` is how many services (or keys) the request
    /// carried, `services` how many the table holds after it.
    /// The table's generation and its stats. The LRU maps are walked after
    /// the table lock is released: a walk is one syscall per entry.
    async fn collect_stats(&self) -> ttrpc::Result<(u64, api::StatsResponse)> {
        let run_time_stats = self.run_time_stats;
        let (generation, mut stats, pin_dir) = self
            .with_table(move |t| {
                let pin_dir = t.datapath().pin_dir().to_path_buf();
                Ok((t.generation(), stats(t, run_time_stats)?, pin_dir))
            })
            .await?;
        let lru = tokio::task::spawn_blocking(move || datapath::lru_usage(&pin_dir))
            .await
            .map_err(|err| status(Code::INTERNAL, err))?
            .map_err(|err| status(Code::INTERNAL, format!("{err:#}")))?;
        stats.maps.extend(lru.into_iter().map(map_usage));
        Ok((generation, stats))
    }

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

/// InvalidArgument names the service and field, ResourceExhausted the limit.
fn code_of(err: &anyhow::Error) -> Code {
    if err.downcast_ref::<StaleGeneration>().is_some() {
        return Code::FAILED_PRECONDITION;
    }
    if let Some(err) = err.downcast_ref::<OptOutError>() {
        return match err {
            OptOutError::TooMany { .. } => Code::RESOURCE_EXHAUSTED,
            OptOutError::NotAttached => Code::FAILED_PRECONDITION,
            _ => Code::INVALID_ARGUMENT,
        };
    }
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

/// A refused part of a Sync in parts: Aborted when the sync is gone (the
/// host starts again), else as for a whole table.
fn staging_refused(err: StagingError) -> ttrpc::Error {
    match err {
        StagingError::Table(err) => invalid(err),
        StagingError::NotInProgress { .. } => status(Code::ABORTED, err),
        _ => status(Code::INVALID_ARGUMENT, err),
    }
}

/// The services of `listing` from `offset` that fit one page, and the
/// offset after them. At least one service goes in every page (one service
/// of the largest size allowed is far below the message limit).
fn page(listing: &Listing, offset: usize) -> (Vec<api::Service>, usize) {
    let mut services = Vec::new();
    let mut bytes = 0;
    for service in &listing.services[offset..] {
        let service = service.to_api();
        // The field's tag and length prefix: at most 6 bytes.
        let size = service.compute_size() as usize + 6;
        if !services.is_empty() && bytes + size > PART_BYTES {
            break;
        }
        bytes += size;
        services.push(service);
    }
    let end = offset + services.len();
    (services, end)
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

#[async_trait]
impl socklb_ttrpc::Services for Rpc {
    async fn sync(
        &self,
        _ctx: &TtrpcContext,
        request: api::SyncRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        let table = Table::from_api(&request.services).map_err(invalid)?;
        let generation = request.generation;
        let sent = table.services.len();
        let written = self.with_table(move |t| t.sync(&table, generation)).await?;
        Ok(self.written("sync", sent, written))
    }

    async fn sync_begin(
        &self,
        _ctx: &TtrpcContext,
        request: api::SyncBeginRequest,
    ) -> ttrpc::Result<api::SyncBeginResponse> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut staged = self.staged.lock().expect("staged lock");
        if let Some(dropped) = staged.take() {
            warn!(self.log, "a new sync replaces one still staged"; "dropped" => dropped.id, "sync" => id);
        }
        let backends = usize::try_from(request.backends).unwrap_or(usize::MAX);
        *staged = Some(
            StagedSync::begin(id, request.generation, request.services as usize, backends)
                .map_err(staging_refused)?,
        );
        Ok(api::SyncBeginResponse {
            sync_id: id,
            ..Default::default()
        })
    }

    async fn sync_part(
        &self,
        _ctx: &TtrpcContext,
        request: api::SyncPartRequest,
    ) -> ttrpc::Result<api::SyncPartResponse> {
        let mut staged = self.staged.lock().expect("staged lock");
        let Some(sync) = staged.as_mut().filter(|s| s.id == request.sync_id) else {
            return Err(staging_refused(StagingError::NotInProgress {
                id: request.sync_id,
            }));
        };
        match sync.add_part(request.index, &request.services) {
            Ok(count) => Ok(api::SyncPartResponse {
                staged: count as u32,
                ..Default::default()
            }),
            Err(err) => {
                // A refused part ends the sync: nothing of it is applied.
                *staged = None;
                Err(staging_refused(err))
            }
        }
    }

    async fn sync_commit(
        &self,
        _ctx: &TtrpcContext,
        request: api::SyncCommitRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        let sync = {
            let mut staged = self.staged.lock().expect("staged lock");
            match staged.take() {
                Some(sync) if sync.id == request.sync_id => sync,
                other => {
                    *staged = other;
                    return Err(staging_refused(StagingError::NotInProgress {
                        id: request.sync_id,
                    }));
                }
            }
        };
        let generation = sync.generation;
        let digest = request.digest;
        let table = tokio::task::spawn_blocking(move || sync.finish(&digest))
            .await
            .map_err(|err| status(Code::INTERNAL, err))?
            .map_err(staging_refused)?;
        let sent = table.services.len();
        let written = self.with_table(move |t| t.sync(&table, generation)).await?;
        Ok(self.written("sync in parts", sent, written))
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
        let sent = services.len();
        let expected = request.expected_generation;
        let written = self
            .with_table(move |t| {
                t.check_generation(expected)?;
                t.upsert(&services)
            })
            .await?;
        Ok(self.written("upsert", sent, written))
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
        let sent = keys.len();
        let expected = request.expected_generation;
        let written = self
            .with_table(move |t| {
                t.check_generation(expected)?;
                t.delete(&keys)
            })
            .await?;
        Ok(self.written("delete", sent, written))
    }

    async fn list(
        &self,
        _ctx: &TtrpcContext,
        request: api::ListRequest,
    ) -> ttrpc::Result<api::ListResponse> {
        let (listing, offset) = if request.page_token.is_empty() {
            let (generation, mut table) = self.with_table(|t| t.list()).await?;
            table.services.sort_by_key(|s| s.key);
            let listing = Listing {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                generation,
                digest: table.digest(),
                services: table.services,
            };
            (listing, 0)
        } else {
            let bad_token = || {
                status(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "page_token {:?} is no token this agent gave",
                        request.page_token
                    ),
                )
            };
            let (id, offset) = request
                .page_token
                .split_once(':')
                .and_then(|(id, offset)| Some((id.parse::<u64>().ok()?, offset.parse().ok()?)))
                .ok_or_else(bad_token)?;
            let mut listings = self.listings.lock().expect("listings lock");
            let position = listings.iter().position(|l| l.id == id).ok_or_else(|| {
                status(
                    Code::ABORTED,
                    format!(
                        "listing {id} is no longer held (newer listings replaced it): list again"
                    ),
                )
            })?;
            let listing = listings.remove(position).expect("a listing at position");
            if offset >= listing.services.len() {
                return Err(bad_token());
            }
            (listing, offset)
        };
        let (services, end) = page(&listing, offset);
        let mut response = api::ListResponse {
            generation: listing.generation,
            digest: listing.digest.clone(),
            total_services: listing.services.len() as u32,
            services,
            ..Default::default()
        };
        if end < listing.services.len() {
            response.next_page_token = format!("{}:{end}", listing.id);
            let mut listings = self.listings.lock().expect("listings lock");
            listings.push_back(listing);
            if listings.len() > LISTINGS_HELD {
                listings.pop_front();
            }
        }
        Ok(response)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        Ok(self.collect_stats().await?.1)
    }

    async fn metrics(
        &self,
        _ctx: &TtrpcContext,
        _: api::MetricsRequest,
    ) -> ttrpc::Result<api::MetricsResponse> {
        let (generation, stats) = self.collect_stats().await?;
        Ok(api::MetricsResponse {
            text: prometheus_text(generation, &stats),
            ..Default::default()
        })
    }

    async fn set_opt_out_cgroups(
        &self,
        _ctx: &TtrpcContext,
        request: api::SetOptOutCgroupsRequest,
    ) -> ttrpc::Result<api::OptOutCgroupsResponse> {
        let cgroups = self
            .with_table(move |t| {
                let attached = t
                    .datapath()
                    .attached_cgroup()
                    .ok_or(OptOutError::NotAttached)?;
                let wanted = opt_out::resolve(attached, &request.cgroups)?;
                t.datapath_mut()
                    .set_opt_out_cgroups(&wanted.keys().copied().collect())?;
                Ok(wanted)
            })
            .await?;
        info!(self.log, "opt-out cgroups set"; "cgroups" => format!("{:?}", cgroups.values().collect::<Vec<_>>()));
        Ok(opt_out_response(cgroups.into_iter()))
    }

    async fn list_opt_out_cgroups(
        &self,
        _ctx: &TtrpcContext,
        _: api::ListOptOutCgroupsRequest,
    ) -> ttrpc::Result<api::OptOutCgroupsResponse> {
        let (ids, attached) = self
            .with_table(|t| {
                let datapath = t.datapath();
                Ok((
                    datapath.opt_out_cgroups()?,
                    datapath.attached_cgroup().map(std::path::Path::to_path_buf),
                ))
            })
            .await?;
        // Walked without the table lock: a big cgroup tree holds up no write.
        let paths = attached.map_or_else(Default::default, |attached| {
            opt_out::paths_of(&attached, &ids)
        });
        Ok(opt_out_response(ids.into_iter().map(|id| {
            (id, paths.get(&id).cloned().unwrap_or_default())
        })))
    }
}

fn opt_out_response(cgroups: impl Iterator<Item = (u64, String)>) -> api::OptOutCgroupsResponse {
    api::OptOutCgroupsResponse {
        cgroups: cgroups
            .map(|(id, path)| api::OptOutCgroup {
                id,
                path,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
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
                insert_failures: counters.insert_failures,
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
        maps: datapath.map_usage().into_iter().map(map_usage).collect(),
        run_time_stats_enabled: run_time_stats,
        ..Default::default()
    })
}

fn map_usage(usage: datapath::MapUsage) -> api::MapUsage {
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
        "Translations whose reverse or sticky entry could not be stored.",
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
