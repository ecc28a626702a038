//! `socklb.v1.Services`: writes (whole, in parts, by key), reads (paged
//! List, Stats, Metrics) and the opt-out list.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use protobuf::Message as _;
use slog::{info, warn};
use socklb_protocols::{
    PART_BYTES,
    socklb::{self as api},
    socklb_ttrpc,
};
use socklb_table::{Service, ServiceKey, Table, release_freed_memory};
use ttrpc::{Code, r#async::TtrpcContext};

use crate::opt_out::{self, OptOutError};
use crate::service_table::{StagedSync, StagingError};

use super::*;

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
        let written = self
            .write_table(move |t| t.sync(&table, generation))
            .await?;
        trim_heap().await;
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
        let written = self
            .write_table(move |t| t.sync(&table, generation))
            .await?;
        trim_heap().await;
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
            .write_table(move |t| {
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
            .write_table(move |t| {
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

    async fn digest(
        &self,
        _ctx: &TtrpcContext,
        _: api::DigestRequest,
    ) -> ttrpc::Result<api::DigestResponse> {
        let (generation, table) = self.with_table(|t| t.list()).await?;
        Ok(api::DigestResponse {
            generation,
            digest: table.digest(),
            services: table.services.len() as u32,
            ..Default::default()
        })
    }

    async fn trace(
        &self,
        _ctx: &TtrpcContext,
        request: api::TraceRequest,
        sink: ttrpc::r#async::ServerStreamSender<api::TraceEvent>,
    ) -> ttrpc::Result<()> {
        self.stream_trace(request, sink).await
    }

    async fn decisions(
        &self,
        _ctx: &TtrpcContext,
        _: api::DecisionsRequest,
    ) -> ttrpc::Result<api::DecisionsResponse> {
        let Some(tracer) = &self.tracer else {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "this agent keeps its table in memory: no datapath decides",
            ));
        };
        let services = self.with_table(|t| t.programmed().counted()).await?;
        let counts = tracer
            .counts(&services)
            .map_err(|err| status(Code::INTERNAL, format!("{err:#}")))?;
        Ok(api::DecisionsResponse {
            translated: counts.translated,
            refused_no_endpoints: counts.refused_no_endpoints,
            refused_unknown_port: counts.refused_unknown_port,
            passed_opted_out: counts.passed_opted_out,
            passed_external_port: counts.passed_external_port,
            trace_dropped: counts.trace_dropped,
            ..Default::default()
        })
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
            .write_table(move |t| {
                let datapath = t
                    .datapath_mut()
                    .filter(|d| d.attached_cgroup().is_some())
                    .ok_or(OptOutError::NotAttached)?;
                let attached = datapath.attached_cgroup().expect("checked above");
                let wanted = opt_out::resolve(attached, &request.cgroups)?;
                datapath.set_opt_out_cgroups(&wanted.keys().copied().collect())?;
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
                let Some(datapath) = t.datapath() else {
                    return Ok(Default::default());
                };
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

/// Hands back what a whole table freed, on a blocking thread: trimming
/// walks the heap, which is no work for an async one.
async fn trim_heap() {
    let _ = tokio::task::spawn_blocking(release_freed_memory).await;
}

/// The services of `listing` from `offset` that fit one page, and the
/// offset after them. At least one service goes in every page (one service
/// of the largest size allowed is far below the message limit).
pub(super) fn page(listing: &Listing, offset: usize) -> (Vec<api::Service>, usize) {
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

pub(super) fn opt_out_response(
    cgroups: impl Iterator<Item = (u64, String)>,
) -> api::OptOutCgroupsResponse {
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
