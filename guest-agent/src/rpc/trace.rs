//! `Services.Trace`: the datapath's decisions, filtered here in the guest
//! and streamed to the caller until it hangs up.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    time::Duration,
};

use nix::time::{ClockId, clock_gettime};
use protobuf::{Enum as _, EnumOrUnknown};
use socklb_protocols::socklb::{self as api, TraceVerdict};
use socklb_table::{Protocol, ServiceKey, TableError};
use tokio::time::Instant;
use ttrpc::{Code, r#async::ServerStreamSender};

use super::{Rpc, invalid, status};
use crate::{datapath::Decision, opt_out};

/// With nothing sent for this long a stream carries a keep-alive (verdict
/// unspecified, with the dropped count): a send is the only way to notice
/// a caller that hung up, and so to detach its tracer.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A send that waits longer (the caller stopped reading) ends the stream.
const SEND_TIMEOUT: Duration = Duration::from_secs(4);
/// Cgroup paths remembered per stream before the cache starts afresh.
const CGROUPS_CACHED: usize = 1_024;

/// What a tracer asked to see.
struct Filter {
    services: BTreeSet<ServiceKey>,
    verdicts: BTreeSet<u8>,
    cgroup_ids: BTreeSet<u64>,
    /// Destinations that are no VIP: asked, or named among the verdicts.
    passes: bool,
}

impl Filter {
    fn from_api(request: &api::TraceRequest) -> Result<Filter, TableError> {
        let services = request
            .services
            .iter()
            .enumerate()
            .map(|(i, key)| ServiceKey::from_api(&format!("services[{i}]"), key))
            .collect::<Result<_, _>>()?;
        let verdicts = request
            .verdicts
            .iter()
            .enumerate()
            .map(|(i, verdict)| match verdict.enum_value() {
                // The wire numbers are the datapath's `TRACE_*` codes.
                Ok(verdict) if verdict != TraceVerdict::TRACE_VERDICT_UNSPECIFIED => {
                    Ok(verdict.value() as u8)
                }
                _ => Err(TableError::Field {
                    service: "trace request".into(),
                    field: format!("verdicts[{i}]"),
                    message: format!("{} is no verdict", verdict.value()),
                }),
            })
            .collect::<Result<BTreeSet<u8>, _>>()?;
        Ok(Filter {
            services,
            passes: request.passes || verdicts.contains(&socklb_common::TRACE_PASSED_NOT_A_VIP),
            verdicts,
            cgroup_ids: request.cgroup_ids.iter().copied().collect(),
        })
    }

    fn admits(&self, decision: &Decision) -> bool {
        (self.services.is_empty() || self.services.contains(&decision.key()))
            && (self.verdicts.is_empty() || self.verdicts.contains(&decision.verdict))
            && (self.cgroup_ids.is_empty() || self.cgroup_ids.contains(&decision.cgroup_id))
    }
}

impl Rpc {
    pub(super) async fn stream_trace(
        &self,
        request: api::TraceRequest,
        sink: ServerStreamSender<api::TraceEvent>,
    ) -> ttrpc::Result<()> {
        let Some(tracer) = &self.tracer else {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "this agent keeps its table in memory: no datapath to trace",
            ));
        };
        let filter = Filter::from_api(&request).map_err(invalid)?;
        let attach_cgroup: Option<PathBuf> = self
            .with_table(|t| {
                Ok(t.datapath()
                    .and_then(|d| d.attached_cgroup())
                    .map(|c| c.to_path_buf()))
            })
            .await?;
        let to_unix_ns = unix_minus_monotonic_ns()?;
        let mut attached = tracer
            .attach(filter.passes)
            .map_err(|err| status(Code::INTERNAL, format!("{err:#}")))?;
        let mut cgroups: HashMap<u64, String> = HashMap::new();
        let mut lost = 0;
        let mut keep_alive_at = Instant::now() + KEEP_ALIVE;
        loop {
            let event = match tokio::time::timeout_at(keep_alive_at, attached.next()).await {
                // The agent is stopping.
                Ok(None) => return Ok(()),
                Err(_) => api::TraceEvent {
                    dropped: tracer.dropped().unwrap_or(0) + lost,
                    ..Default::default()
                },
                Ok(Some((decision, lost_now))) => {
                    lost += lost_now;
                    if !filter.admits(&decision) {
                        continue;
                    }
                    let cgroup = match (&attach_cgroup, cgroups.get(&decision.cgroup_id)) {
                        (_, Some(path)) => path.clone(),
                        (None, None) => String::new(),
                        (Some(attach), None) => {
                            let path = cgroup_path(attach.clone(), decision.cgroup_id).await;
                            if cgroups.len() >= CGROUPS_CACHED {
                                cgroups.clear();
                            }
                            cgroups.insert(decision.cgroup_id, path.clone());
                            path
                        }
                    };
                    let dropped = tracer.dropped().unwrap_or(0) + lost;
                    api_event(&decision, to_unix_ns, cgroup, dropped)
                }
            };
            let sent = tokio::select! {
                sent = sink.send(&event) => sent.is_ok(),
                // A caller that stopped reading (its connection's queue
                // full) holds no tracer attached.
                _ = tokio::time::sleep(SEND_TIMEOUT) => false,
                _ = attached.stopped() => false,
            };
            if !sent {
                // Dropping `attached` detaches it.
                return Ok(());
            }
            keep_alive_at = Instant::now() + KEEP_ALIVE;
        }
    }
}

fn api_event(
    decision: &Decision,
    to_unix_ns: i128,
    cgroup: String,
    dropped: u64,
) -> api::TraceEvent {
    let service = match decision.verdict {
        socklb_common::TRACE_TRANSLATED | socklb_common::TRACE_REFUSED_NO_ENDPOINTS => {
            decision.key().to_string()
        }
        _ => String::new(),
    };
    api::TraceEvent {
        time_unix_nanos: u64::try_from(i128::from(decision.monotonic_ns) + to_unix_ns).unwrap_or(0),
        hook: decision.hook.into(),
        protocol: EnumOrUnknown::new(match decision.protocol {
            Protocol::Tcp => api::Protocol::TCP,
            Protocol::Udp => api::Protocol::UDP,
        }),
        address: decision.dst.to_string(),
        verdict: EnumOrUnknown::from_i32(i32::from(decision.verdict)),
        backend: decision
            .backend
            .map(|backend| backend.to_string())
            .unwrap_or_default(),
        service,
        cgroup_id: decision.cgroup_id,
        cgroup,
        dropped,
        ..Default::default()
    }
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC (what the hooks read), in ns.
fn unix_minus_monotonic_ns() -> ttrpc::Result<i128> {
    let ns = |clock| {
        clock_gettime(clock)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
            .map_err(|err| status(Code::INTERNAL, format!("clock_gettime: {err}")))
    };
    Ok(ns(ClockId::CLOCK_REALTIME)? - ns(ClockId::CLOCK_MONOTONIC)?)
}

/// The cgroup's path below `attach` ("/" for that cgroup, "/app" below
/// it), or "" when it is gone or elsewhere: a walk of the tree, off the
/// runtime's threads.
async fn cgroup_path(attach: PathBuf, id: u64) -> String {
    tokio::task::spawn_blocking(move || {
        opt_out::paths_of(&attach, &BTreeSet::from([id]))
            .remove(&id)
            .map(|relative| format!("/{relative}"))
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_verdicts_are_the_datapaths_codes() {
        for (wire, code) in [
            (TraceVerdict::TRANSLATED, socklb_common::TRACE_TRANSLATED),
            (
                TraceVerdict::REFUSED_NO_ENDPOINTS,
                socklb_common::TRACE_REFUSED_NO_ENDPOINTS,
            ),
            (
                TraceVerdict::REFUSED_UNKNOWN_PORT,
                socklb_common::TRACE_REFUSED_UNKNOWN_PORT,
            ),
            (
                TraceVerdict::PASSED_OPTED_OUT,
                socklb_common::TRACE_PASSED_OPTED_OUT,
            ),
            (
                TraceVerdict::PASSED_EXTERNAL_PORT,
                socklb_common::TRACE_PASSED_EXTERNAL_PORT,
            ),
            (
                TraceVerdict::PASSED_NOT_A_VIP,
                socklb_common::TRACE_PASSED_NOT_A_VIP,
            ),
        ] {
            assert_eq!(wire.value(), i32::from(code), "{wire:?}");
        }
    }

    #[test]
    fn asking_for_no_vip_destinations_by_verdict_asks_for_them() {
        let request = api::TraceRequest {
            verdicts: vec![EnumOrUnknown::new(TraceVerdict::PASSED_NOT_A_VIP)],
            ..Default::default()
        };
        assert!(Filter::from_api(&request).unwrap().passes);
        assert!(
            !Filter::from_api(&api::TraceRequest::default())
                .unwrap()
                .passes
        );
    }

    #[test]
    fn an_unspecified_verdict_in_a_filter_is_refused_by_name() {
        let request = api::TraceRequest {
            verdicts: vec![EnumOrUnknown::new(TraceVerdict::TRACE_VERDICT_UNSPECIFIED)],
            ..Default::default()
        };
        let err = Filter::from_api(&request).err().unwrap();
        assert!(err.to_string().contains("verdicts[0]"), "{err}");
    }
}
