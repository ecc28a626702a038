//! Servers and clients for socklb's tests. The harness runs them inside test
//! network namespaces (clients also inside the test cgroup); every client
//! prints one JSON object per exchange on stdout.
//!
//! Backends answer each TCP connection and each UDP datagram with their id,
//! so a client sees which backend served it.

mod clients;
mod guest;
mod servers;

use std::{
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use clients::{churn, load, resolve, stream, tcp, tcp_loop, udp, udp_hold, udp_multi};
use guest::{drop_net_bind_service, guest_exec, vsock_listen, vsock_probe};
use servers::{dns, serve};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        usage();
    };
    match command.as_str() {
        "serve" => serve(rest),
        "dns" => dns(rest),
        "tcp" => tcp(rest),
        "tcp-loop" => tcp_loop(rest),
        "udp" => udp(rest),
        "udp-multi" => udp_multi(rest),
        "resolve" => resolve(rest),
        "load" => load(rest),
        "stream" => stream(rest),
        "churn" => churn(rest),
        "udp-hold" => udp_hold(rest),
        "guest-exec" => guest_exec(rest),
        "vsock-listen" => vsock_listen(rest),
        "vsock-probe" => vsock_probe(rest),
        "drop-net-bind-service" => drop_net_bind_service(rest),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: socklb-testkit serve --id ID [--tcp ADDR]... [--udp ADDR]... [--bulk ADDR]...
       socklb-testkit dns --udp ADDR --name NAME --a IPV4
       socklb-testkit tcp ADDR [--count N]
       socklb-testkit tcp-loop ADDR --ms DURATION
       socklb-testkit udp ADDR [--count N] [--interval-ms MS] [--connected [--reconnect]]
       socklb-testkit udp-multi ADDR...
       socklb-testkit resolve NAME
       socklb-testkit load ADDR[,ADDR...] [--threads N] [--ms DURATION]
       socklb-testkit stream ADDR [--ms DURATION]
       socklb-testkit churn --tcp ADDR --udp ADDR --affinity ADDR... [--affinity-churn ADDR]...
                            [--tcp-connections N] [--udp-sockets N] [--check-ms MS]
       socklb-testkit udp-hold ADDR [--sockets N] [--ms DURATION]
       socklb-testkit guest-exec --port VSOCK_PORT   (inside a test VM only)
       socklb-testkit vsock-listen --port VSOCK_PORT (inside a test VM only)
       socklb-testkit vsock-probe CID PORT           (inside a test VM only)
       socklb-testkit drop-net-bind-service PROG [ARG]...   (root: PROG without the capability)"
    );
    std::process::exit(2)
}

/// Values of every `--name VALUE` in `args`.
fn values<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == name)
        .map(|w| w[1].as_str())
        .collect()
}

fn value<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    values(args, name)
        .first()
        .map(|v| v.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(default)
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap_or_else(|_| usage())
}

fn emit(value: Value) {
    println!("{value}");
}

fn error_json(err: &std::io::Error, started: Instant) -> Value {
    json!({
        "error": format!("{:?}", err.kind()),
        "errno": err.raw_os_error(),
        "elapsed_ms": started.elapsed().as_millis() as u64,
    })
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}
