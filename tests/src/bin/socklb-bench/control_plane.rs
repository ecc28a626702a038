//! `control-plane`: a full Sync of 10,000 services x 8 backends and
//! one-service Upserts, against a bare Health.Check round trip.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use socklb_shim::Options;
use socklb_table::{Protocol, Service, ServiceKey, Table, VipKind};
use socklb_tests::{Sandbox, agent_client, runtime};

use crate::*;

pub(crate) const SERVICES: u32 = 10_000;

pub(crate) const BACKENDS: u32 = 8;

pub(crate) const UPSERTS: usize = 1_000;

/// Service `i` of the benchmark table: VIP 10.96.x.y:80, backends spread
/// over 10.244/16, shifted by `round` so successive tables differ.
pub(crate) fn bench_service(i: u32, round: u32) -> Service {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
    let backends = (0..BACKENDS)
        .map(|b| {
            let host = (i * BACKENDS + b + round) % 65_000 + 1;
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 244, 0, 0)) + host,
                )),
                8080,
            )
        })
        .collect();
    Service {
        name: Some(format!("bench/svc-{i}")),
        key: ServiceKey {
            vip: IpAddr::V4(vip),
            port: 80,
            protocol: Protocol::Tcp,
        },
        vip_kind: VipKind::Cluster,
        affinity_timeout_secs: None,
        backends,
    }
}

pub(crate) fn control_plane() {
    let sandbox = Sandbox::create();
    let agent = sandbox.start_agent(None);
    let runtime = runtime();
    let options = Options {
        call_timeout: Duration::from_secs(300),
        ..Options::default()
    };
    let mut client = agent_client(&sandbox.api_addr(), options);
    runtime.block_on(client.check()).expect("health check");
    let idle_rss_kib = proc_status_kib(agent.pid().as_raw(), "VmRSS:");

    let mut sync_times = Vec::new();
    for round in 0..REPEATS as u32 {
        runtime
            .block_on(client.sync(Table::default()))
            .expect("empty sync");
        let table = Table {
            services: (0..SERVICES).map(|i| bench_service(i, round)).collect(),
        };
        let started = Instant::now();
        let result = runtime.block_on(client.sync(table)).expect("full sync");
        sync_times.push(started.elapsed().as_secs_f64());
        assert_eq!(result.services, SERVICES);
    }
    let pid = agent.pid().as_raw();
    let rss_kib = proc_status_kib(pid, "VmRSS:");
    let map_kib = map_memlock_kib(pid);

    let mut checks = Vec::new();
    let mut upserts = Vec::new();
    for n in 0..UPSERTS {
        let started = Instant::now();
        runtime.block_on(client.check()).expect("health check");
        checks.push(started.elapsed().as_secs_f64() * 1e3);
        let service = bench_service((n as u32 * 7919) % SERVICES, 1_000 + n as u32);
        let started = Instant::now();
        runtime
            .block_on(client.upsert(vec![service]))
            .expect("upsert");
        upserts.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let (sync_min, sync_median, sync_max) = summary(&sync_times);
    let check = percentiles(&mut checks);
    let upsert = percentiles(&mut upserts);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Control plane ({SERVICES} services x {BACKENDS} backends, unix socket)\n"
    );
    let agent = socklb_tests::binaries::agent_bin();
    let build = if agent.to_string_lossy().contains("-musl/") {
        "static musl build, as the guest image ships it"
    } else {
        "host build, glibc"
    };
    // Relative to the target directory: the table goes into the README.
    let shown: std::path::PathBuf = agent
        .iter()
        .skip_while(|c| *c != "target")
        .skip(1)
        .collect();
    let _ = writeln!(out, "Agent: `{}` ({build}).\n", shown.display());
    let _ = writeln!(out, "| measure | value |");
    let _ = writeln!(out, "|---|---:|");
    let _ = writeln!(
        out,
        "| full Sync to acknowledgement, min / median / max of {REPEATS} | {sync_min:.2} / {sync_median:.2} / {sync_max:.2} s |"
    );
    let _ = writeln!(
        out,
        "| agent RSS before any service / after the Syncs | {:.1} / {:.1} MiB |",
        idle_rss_kib as f64 / 1024.0,
        rss_kib as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "| eBPF map memory (memlock, all maps) | {:.1} MiB |",
        map_kib as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "| Upsert of one service, p50 / p99 of {UPSERTS} | {:.3} / {:.3} ms |",
        upsert.0, upsert.1
    );
    let _ = writeln!(
        out,
        "| Health.Check round trip (baseline), p50 / p99 | {:.3} / {:.3} ms |",
        check.0, check.1
    );
    let _ = writeln!(
        out,
        "| Upsert p50 / Health.Check p50 | {:.1}x |",
        upsert.0 / check.0
    );
    report::write("control-plane", &out);
}

/// Kernel memory charged to the eBPF maps the agent holds open.
pub(crate) fn map_memlock_kib(pid: i32) -> u64 {
    let mut bytes = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .flatten()
    {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if info.contains("map_type:") {
            bytes += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    bytes / 1024
}
