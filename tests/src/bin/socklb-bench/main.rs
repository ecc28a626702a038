//! socklb benchmarks, run by `cargo xtask bench` (as root).
//!
//! `hooks`: the cost of each eBPF hook from the kernel's BPF run-time stats,
//! for traffic to a service VIP and, as the baseline measured in the same
//! run, to a destination that is not a service.
//!
//! `hooks-against <agent binary> <what it is>`: each hook's cost in this
//! agent's programs against another build's, alternated in one run (see
//! `hooks`).
//!
//! `control-plane`: a full Sync of 10,000 services x 8 backends (time to
//! acknowledgement, agent RSS and map memory after it) and one-service
//! Upserts, against a bare Health.Check round trip as the baseline.
//!
//! `datapath`: socklb against direct pod IPs, kube-proxy-style iptables
//! and nftables at 1, 1,000 and 10,000 services (see `modes`); writes
//! target/socklb/bench/datapath.md and datapath.svg.
//!
//! `guest-hooks`: per-hook cost inside the test VM (QEMU TCG), JIT against
//! the interpreter: the project's kernel with its JIT on, the same kernel
//! and boot with `net.core.bpf_jit_enable=0` (programs reloaded), and
//! Kata's default kernel options (no JIT at all). Needs the guest images
//! (`cargo xtask bench` builds them).
//!
//! `guest-datapath`: socklb against kube-proxy's IPVS, iptables and
//! nftables and direct, inside the test VM on the bench kernel (see
//! `guest_datapath`). Needs the bench guest image (`cargo xtask bench`
//! builds it).
//!
//! `kube`: the Kubernetes translation at 10,000 services (events per second
//! of incremental translation, against a full recompute), and the time from
//! an EndpointSlice change at a (fake) API server to the agent's
//! acknowledgement through `socklb-shim kube`.
//!
//! `node`: one `socklb-shim node` serving 200 sandboxes against one
//! `socklb-shim kube` process per sandbox (see `node`).
//!
//! `sockets`: kernel memory per translated socket and the cost of closing
//! the sockets of a removed backend (see `sockets`).
//!
//! `real-client`: wrk against nginx (Debian's), direct against through a
//! VIP, beside the project's own client (see `real_client`).

mod control_plane;
mod guest_datapath;
mod guest_hooks;
mod hooks;
mod kube;
mod modes;
mod node;
mod real_client;
mod report;
mod sockets;

use control_plane::{SERVICES, bench_service, control_plane};
use guest_hooks::guest_hooks;
use hooks::hooks;
use kube::{k8s_service, k8s_slice, kube};

const CALLS: &str = "2000";
const REPEATS: usize = 3;

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("hooks") => hooks(),
        Some("hooks-against") => hooks::hooks_against(),
        Some("control-plane") => control_plane(),
        Some("kube") => kube(),
        Some("datapath") => datapath(),
        Some("guest-hooks") => guest_hooks(),
        Some("guest-datapath") => guest_datapath::guest_datapath(),
        Some("node") => node::node(),
        Some("sockets") => sockets::sockets(),
        Some("real-client") => real_client::real_client(),
        _ => {
            eprintln!(
                "usage: socklb-bench hooks|hooks-against|control-plane|kube|datapath|guest-hooks|guest-datapath|node|sockets|real-client"
            );
            std::process::exit(2);
        }
    }
}

fn summary(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
    )
}

/// p50 and p99.
fn percentiles(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("field in /proc status")
}

fn datapath() {
    let results = modes::run();
    let report = format!(
        "## Datapath: socklb vs direct, iptables, nftables\n\nClient with 4 threads, 8 backends, \
         all in network namespaces on this machine.\n\n{}",
        results.markdown()
    );
    report::write("datapath", &report);
    results
        .plot(&report::output_dir().join("datapath.svg"))
        .expect("plot");
    report::publish("datapath.svg");
}
