//! `socklb-shim trace`: an agent's decisions (`Services.Trace`, API 1.5),
//! one line each as they come, like `hubble observe`, or JSON lines.

use std::{io::Write as _, net::SocketAddr};

use anyhow::{Context as _, Result};
use chrono::{DateTime, SecondsFormat};
use protobuf::EnumOrUnknown;
use socklb_protocols::socklb::{self as api, TraceVerdict};
use socklb_table::{Protocol, ServiceKey};

use crate::AgentClient;

/// A verdict to filter on, as `--verdict` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Verdict {
    Translated,
    RefusedNoEndpoints,
    RefusedUnknownPort,
    PassedOptedOut,
    PassedExternalPort,
    PassedNotAVip,
}

impl Verdict {
    fn to_api(self) -> TraceVerdict {
        match self {
            Verdict::Translated => TraceVerdict::TRANSLATED,
            Verdict::RefusedNoEndpoints => TraceVerdict::REFUSED_NO_ENDPOINTS,
            Verdict::RefusedUnknownPort => TraceVerdict::REFUSED_UNKNOWN_PORT,
            Verdict::PassedOptedOut => TraceVerdict::PASSED_OPTED_OUT,
            Verdict::PassedExternalPort => TraceVerdict::PASSED_EXTERNAL_PORT,
            Verdict::PassedNotAVip => TraceVerdict::PASSED_NOT_A_VIP,
        }
    }
}

/// How events are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line per event for people
    #[default]
    Text,
    /// One JSON object per line (the API's TraceEvent)
    Json,
}

/// The request for these filters (the agent takes `verdicts` naming
/// PassedNotAVip as asking for `passes`).
pub fn request(
    services: &[ServiceKey],
    verdicts: &[Verdict],
    cgroup_ids: &[u64],
    passes: bool,
) -> api::TraceRequest {
    api::TraceRequest {
        services: services.iter().map(ServiceKey::to_api).collect(),
        verdicts: verdicts
            .iter()
            .map(|verdict| EnumOrUnknown::new(verdict.to_api()))
            .collect(),
        cgroup_ids: cgroup_ids.to_vec(),
        passes,
        ..Default::default()
    }
}

/// `VIP:PORT[/TCP|UDP]` (`[v6]:PORT` for IPv6; TCP when not said), as
/// the trace prints a service.
pub fn parse_service_key(text: &str) -> Result<ServiceKey, String> {
    let (addr, protocol) = match text.rsplit_once('/') {
        Some((addr, "TCP" | "tcp")) => (addr, Protocol::Tcp),
        Some((addr, "UDP" | "udp")) => (addr, Protocol::Udp),
        Some((_, other)) => return Err(format!("{other:?} is no protocol (TCP or UDP)")),
        None => (text, Protocol::Tcp),
    };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not VIP:PORT ([VIP]:PORT for IPv6)"))?;
    Ok(ServiceKey {
        vip: addr.ip(),
        port: addr.port(),
        protocol,
    })
}

/// Prints the agent's events until it hangs up or stdout closes. A rise
/// in the agent's dropped count is said on stderr.
pub async fn follow(
    client: &mut AgentClient,
    request: &api::TraceRequest,
    format: Format,
) -> Result<()> {
    let mut events = client.trace(request).await?;
    let mut dropped = 0;
    let mut out = std::io::stdout().lock();
    loop {
        let event = match events.recv().await {
            Ok(Some(event)) => event,
            Ok(None) | Err(ttrpc::Error::Eof) => return Ok(()),
            Err(err) => return Err(err).context("the agent's trace stream"),
        };
        if event.dropped > dropped {
            eprintln!(
                "{} decisions not traced since the agent started (past its --trace-rate, \
                 the ring full, or this stream behind)",
                event.dropped
            );
            dropped = event.dropped;
        }
        // A keep-alive: nothing was decided.
        if event.verdict.enum_value_or_default() == TraceVerdict::TRACE_VERDICT_UNSPECIFIED {
            continue;
        }
        let line = match format {
            Format::Text => text_line(&event),
            Format::Json => protobuf_json_mapping::print_to_string(&event)?,
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // stdout closed (`| head`): done.
            return Ok(());
        }
    }
}

/// `TIME HOOK PROTO ADDRESS -> BACKEND VERDICT service S cgroup C (ID)`.
pub fn text_line(event: &api::TraceEvent) -> String {
    let time = i64::try_from(event.time_unix_nanos)
        .map(DateTime::from_timestamp_nanos)
        .map(|time| time.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_default();
    let verdict = match event.verdict.enum_value() {
        Ok(verdict) => format!("{verdict:?}"),
        Err(unknown) => format!("verdict {unknown}"),
    };
    let protocol = match event.protocol.enum_value() {
        Ok(api::Protocol::UDP) => "UDP",
        _ => "TCP",
    };
    let mut line = format!("{time} {} {protocol} {}", event.hook, event.address);
    if !event.backend.is_empty() {
        line += &format!(" -> {}", event.backend);
    }
    line += &format!(" {verdict}");
    if !event.service.is_empty() {
        line += &format!(" service {}", event.service);
    }
    let cgroup = if event.cgroup.is_empty() {
        "?"
    } else {
        &event.cgroup
    };
    line += &format!(" cgroup {cgroup} ({})", event.cgroup_id);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_translated_connect_reads_as_one_line() {
        let event = api::TraceEvent {
            time_unix_nanos: 1_764_921_600_000_000_000,
            hook: "connect4".into(),
            address: "10.96.0.20:80".into(),
            verdict: EnumOrUnknown::new(TraceVerdict::TRANSLATED),
            backend: "10.244.1.1:8080".into(),
            service: "10.96.0.20:80/TCP".into(),
            cgroup_id: 4242,
            cgroup: "/kubepods/pod1/ctr1".into(),
            ..Default::default()
        };
        assert_eq!(
            text_line(&event),
            "2025-12-05T08:00:00.000000Z connect4 TCP 10.96.0.20:80 -> 10.244.1.1:8080 \
             TRANSLATED service 10.96.0.20:80/TCP cgroup /kubepods/pod1/ctr1 (4242)"
        );
    }

    #[test]
    fn services_are_named_as_the_trace_prints_them() {
        assert_eq!(
            parse_service_key("10.96.0.20:53/UDP").unwrap().to_string(),
            "10.96.0.20:53/UDP"
        );
        assert_eq!(
            parse_service_key("[fd00::20]:80").unwrap().to_string(),
            "[fd00::20]:80/TCP"
        );
        assert!(
            parse_service_key("10.96.0.20:80/SCTP")
                .unwrap_err()
                .contains("SCTP")
        );
        assert!(
            parse_service_key("10.96.0.20")
                .unwrap_err()
                .contains("VIP:PORT")
        );
    }
}
