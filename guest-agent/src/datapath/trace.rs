//! The datapath's decisions for tracers: while a tracer is attached, the
//! forward hooks run their traced twins (see `twins`), which write one
//! `TraceEvent` per decision to the `TRACE_EVENTS` ring buffer as
//! `TRACE_CONFIG` says; one task reads the ring and hands each event to
//! every attached tracer. A tracer that falls behind loses events (its
//! channel's oldest), never the hooks' time: they only ever skip a write.
//! The hooks also count the decisions on VIPs no service counter counts
//! (`DECISIONS`).

use std::{
    mem::size_of,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use slog::{Logger, info, warn};
use socklb_common::{
    PROTO_UDP, ServiceCounters, TRACE_HOOK_CONNECT4, TRACE_HOOK_CONNECT6, TRACE_HOOK_SENDMSG4,
    TraceBudget, TraceConfig, TraceEvent,
};
use socklb_table::{Protocol, ServiceKey};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{broadcast, watch},
};

use super::{convert::socket_addr, twins::TracedTwins};

/// Events a tracer may be behind the ring's reader before it loses the
/// oldest: a second of one CPU's default rate.
const TRACER_BACKLOG: usize = 1_024;

/// The maps the hooks trace through and the traced twins, taken from the
/// loaded programs.
pub struct TraceMaps {
    pub(super) events: RingBuf<MapData>,
    pub(super) config: Array<MapData, TraceConfig>,
    pub(super) budget: PerCpuArray<MapData, TraceBudget>,
    pub(super) decisions: PerCpuArray<MapData, u64>,
    pub(super) twins: TracedTwins,
}

/// Decisions on VIP destinations since the agent started, by verdict, and
/// the trace records the hooks skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionCounts {
    pub translated: u64,
    pub refused_no_endpoints: u64,
    pub refused_unknown_port: u64,
    pub passed_opted_out: u64,
    pub passed_external_port: u64,
    pub trace_dropped: u64,
}

/// One decision as a tracer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// CLOCK_MONOTONIC, as the hook read it.
    pub monotonic_ns: u64,
    pub hook: &'static str,
    pub protocol: Protocol,
    pub dst: SocketAddr,
    /// `socklb_common::TRACE_*`.
    pub verdict: u8,
    pub backend: Option<SocketAddr>,
    pub cgroup_id: u64,
}

impl Decision {
    fn of(event: &TraceEvent) -> Decision {
        let hook = match event.hook {
            TRACE_HOOK_CONNECT4 => "connect4",
            TRACE_HOOK_CONNECT6 => "connect6",
            TRACE_HOOK_SENDMSG4 => "sendmsg4",
            _ => "sendmsg6",
        };
        Decision {
            monotonic_ns: event.time_ns,
            hook,
            protocol: match event.proto {
                PROTO_UDP => Protocol::Udp,
                _ => Protocol::Tcp,
            },
            dst: socket_addr(&event.dst),
            verdict: event.verdict,
            backend: (event.verdict == socklb_common::TRACE_TRANSLATED)
                .then(|| socket_addr(&event.backend)),
            cgroup_id: event.cgroup_id,
        }
    }

    /// The service key the destination asked for (a service's, or the
    /// unknown port's).
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: self.dst.ip(),
            port: self.dst.port(),
            protocol: self.protocol,
        }
    }
}

/// Attached tracers, and what the hooks are told about them.
struct Attachments {
    config: Array<MapData, TraceConfig>,
    twins: TracedTwins,
    tracers: usize,
    /// Tracers that asked for destinations that are no VIP.
    wanting_passes: usize,
}

pub struct Tracer {
    attachments: Mutex<Attachments>,
    budget: PerCpuArray<MapData, TraceBudget>,
    decisions: PerCpuArray<MapData, u64>,
    fan_out: broadcast::Sender<Decision>,
    /// True once the agent stops: every tracer's stream ends.
    stopping: watch::Sender<bool>,
    per_cpu_per_second: u32,
    log: Logger,
}

impl Tracer {
    /// Starts reading `maps`' ring on the current tokio runtime; the hooks
    /// run their plain programs until a tracer attaches.
    pub fn start(maps: TraceMaps, per_cpu_per_second: u32, log: &Logger) -> Result<Arc<Tracer>> {
        let TraceMaps {
            events,
            config,
            budget,
            decisions: counted,
            twins,
        } = maps;
        // SAFETY: the ring owns its map's descriptor, open until the ring
        // is dropped with the AsyncFd, and answers the same one each time.
        let ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|err| anyhow::Error::from(err.into_parts().1))
            .context("watching TRACE_EVENTS")?;
        let (fan_out, _) = broadcast::channel(TRACER_BACKLOG);
        let log = log.new(slog::o!("component" => "trace"));
        tokio::spawn(read_ring(ring, fan_out.clone(), log.clone()));
        Ok(Arc::new(Tracer {
            attachments: Mutex::new(Attachments {
                config,
                twins,
                tracers: 0,
                wanting_passes: 0,
            }),
            budget,
            decisions: counted,
            fan_out,
            stopping: watch::Sender::new(false),
            per_cpu_per_second,
            log,
        }))
    }

    /// Ends every tracer's stream: the agent is stopping, and its server
    /// waits for its calls to end.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Attaches a tracer (`passes`: destinations that are no VIP too); the
    /// hooks write while any is attached.
    pub fn attach(self: &Arc<Self>, passes: bool) -> Result<Attached> {
        let decisions = self.fan_out.subscribe();
        self.change(1, i8::from(passes))?;
        Ok(Attached {
            tracer: self.clone(),
            passes,
            decisions,
            stopping: self.stopping.subscribe(),
        })
    }

    /// Events the hooks did not write (past the rate, or the ring full),
    /// summed over the CPUs.
    pub fn dropped(&self) -> Result<u64> {
        let per_cpu = self.budget.get(&0, 0).context("reading TRACE_BUDGET")?;
        Ok(per_cpu.iter().map(|budget| budget.dropped).sum())
    }

    /// The hooks' decisions on VIPs by verdict, and the trace records they
    /// skipped, summed over the CPUs; translations and refusals for no
    /// endpoints are the services' own counters (`services`, see
    /// `ProgrammedTable::counted`).
    pub fn counts(&self, services: &ServiceCounters) -> Result<DecisionCounts> {
        let count = |verdict: u8| -> Result<u64> {
            let per_cpu = self
                .decisions
                .get(&u32::from(verdict), 0)
                .context("reading DECISIONS")?;
            Ok(per_cpu.iter().sum())
        };
        Ok(DecisionCounts {
            translated: services.translations,
            refused_no_endpoints: services.rejects,
            refused_unknown_port: count(socklb_common::TRACE_REFUSED_UNKNOWN_PORT)?,
            passed_opted_out: count(socklb_common::TRACE_PASSED_OPTED_OUT)?,
            passed_external_port: count(socklb_common::TRACE_PASSED_EXTERNAL_PORT)?,
            trace_dropped: self.dropped()?,
        })
    }

    /// Counts one tracer more (`by` 1) or less (-1), `passes` of them
    /// wanting destinations that are no VIP, and tells the hooks: the
    /// traced twins run while any is attached. A tracer counts once the
    /// hooks are told; one leaving stops counting at once, so a later
    /// change tells them again if this one could not.
    fn change(&self, by: i8, passes: i8) -> Result<()> {
        let mut attachments = self.attachments.lock().expect("trace attachments lock");
        let tracers = attachments.tracers.saturating_add_signed(by.into());
        let wanting_passes = attachments
            .wanting_passes
            .saturating_add_signed(passes.into());
        if by < 0 {
            (attachments.tracers, attachments.wanting_passes) = (tracers, wanting_passes);
        }
        let config = TraceConfig {
            passes: u32::from(wanting_passes > 0),
            per_cpu_per_second: self.per_cpu_per_second,
        };
        attachments
            .config
            .set(0, config, 0)
            .context("writing TRACE_CONFIG")?;
        attachments.twins.run_traced(tracers > 0)?;
        (attachments.tracers, attachments.wanting_passes) = (tracers, wanting_passes);
        if by > 0 {
            info!(self.log, "tracer attached"; "tracers" => tracers, "wanting_passes" => wanting_passes);
        } else {
            info!(self.log, "tracer detached"; "tracers" => tracers, "wanting_passes" => wanting_passes);
        }
        Ok(())
    }
}

/// One attached tracer; dropping it detaches it.
pub struct Attached {
    tracer: Arc<Tracer>,
    passes: bool,
    decisions: broadcast::Receiver<Decision>,
    stopping: watch::Receiver<bool>,
}

impl Attached {
    /// The next decision, and how many this tracer lost before it because
    /// it fell behind; None once the agent is stopping.
    pub async fn next(&mut self) -> Option<(Decision, u64)> {
        let mut lost = 0;
        loop {
            let received = tokio::select! {
                received = self.decisions.recv() => received,
                _ = self.stopping.wait_for(|stopping| *stopping) => return None,
            };
            match received {
                Ok(decision) => return Some((decision, lost)),
                Err(broadcast::error::RecvError::Lagged(n)) => lost += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Attached {
    /// Returns once the agent is stopping.
    pub async fn stopped(&mut self) {
        // Err: the tracer is gone, which is stopping too.
        let _ = self.stopping.wait_for(|stopping| *stopping).await;
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Err(err) = self.tracer.change(-1, -i8::from(self.passes)) {
            warn!(self.tracer.log, "cannot tell the hooks a tracer left"; "error" => format!("{err:#}"));
        }
    }
}

async fn read_ring(
    mut ring: AsyncFd<RingBuf<MapData>>,
    decisions: broadcast::Sender<Decision>,
    log: Logger,
) {
    loop {
        let mut ready = match ring.readable_mut().await {
            Ok(ready) => ready,
            Err(err) => {
                warn!(log, "cannot wait on TRACE_EVENTS; tracing stops"; "error" => err.to_string());
                return;
            }
        };
        while let Some(item) = ready.get_inner_mut().next() {
            if let Some(event) = event_of(&item) {
                // No tracer attached: the event is not wanted.
                let _ = decisions.send(Decision::of(&event));
            }
        }
        ready.clear_ready();
    }
}

fn event_of(bytes: &[u8]) -> Option<TraceEvent> {
    if bytes.len() != size_of::<TraceEvent>() {
        return None;
    }
    // SAFETY: the length is checked, `read_unaligned` needs no alignment,
    // and `TraceEvent` is `#[repr(C)]` integers without padding, so every
    // bit pattern is a valid value.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TraceEvent>()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use socklb_common::{Endpoint, PROTO_TCP, TRACE_REFUSED_UNKNOWN_PORT, TRACE_TRANSLATED};

    fn bytes_of(event: &TraceEvent) -> Vec<u8> {
        // SAFETY: a `#[repr(C)]` value without padding, read as its bytes.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const TraceEvent).cast::<u8>(),
                size_of::<TraceEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn ring_records_become_decisions() {
        let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let backend: SocketAddr = "10.244.1.1:8080".parse().unwrap();
        let translated = TraceEvent {
            time_ns: 7,
            cgroup_id: 42,
            dst: super::super::convert::endpoint(&vip),
            backend: super::super::convert::endpoint(&backend),
            hook: TRACE_HOOK_CONNECT4,
            proto: PROTO_TCP,
            verdict: TRACE_TRANSLATED,
            _pad: [0; 5],
        };
        let decision = Decision::of(&event_of(&bytes_of(&translated)).unwrap());
        assert_eq!(
            (
                decision.hook,
                decision.dst,
                decision.backend,
                decision.cgroup_id
            ),
            ("connect4", vip, Some(backend), 42)
        );
        assert_eq!(decision.key().to_string(), "10.96.0.20:80/TCP");

        let refused = TraceEvent {
            backend: Endpoint::default(),
            verdict: TRACE_REFUSED_UNKNOWN_PORT,
            proto: PROTO_UDP,
            hook: TRACE_HOOK_SENDMSG4,
            ..translated
        };
        let decision = Decision::of(&event_of(&bytes_of(&refused)).unwrap());
        assert_eq!((decision.hook, decision.backend), ("sendmsg4", None));
        assert_eq!(decision.key().to_string(), "10.96.0.20:80/UDP");
        assert_eq!(event_of(&[0; 63]), None, "a record of another size");
    }
}
