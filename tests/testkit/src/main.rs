//! Servers and clients for socklb's tests. The harness runs them inside test
//! network namespaces (clients also inside the test cgroup); every client
//! prints one JSON object per exchange on stdout.
//!
//! Backends answer each TCP connection and each UDP datagram with their id,
//! so a client sees which backend served it.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

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
        "guest-exec" => guest_exec(rest),
        "vsock-probe" => vsock_probe(rest),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: socklb-testkit serve --id ID [--tcp ADDR]... [--udp ADDR]... [--bulk ADDR]...
       socklb-testkit dns --udp ADDR --name NAME --a IPV4
       socklb-testkit tcp ADDR [--count N]
       socklb-testkit tcp-loop ADDR --ms DURATION
       socklb-testkit udp ADDR [--count N] [--interval-ms MS] [--connected]
       socklb-testkit udp-multi ADDR...
       socklb-testkit resolve NAME
       socklb-testkit load ADDR[,ADDR...] [--threads N] [--ms DURATION]
       socklb-testkit stream ADDR [--ms DURATION]
       socklb-testkit guest-exec --port VSOCK_PORT   (inside a test VM only)
       socklb-testkit vsock-probe CID PORT           (inside a test VM only)"
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

fn serve(args: &[String]) {
    let id = values(args, "--id")
        .first()
        .copied()
        .unwrap_or_else(|| usage())
        .to_string();
    let mut threads = Vec::new();
    for a in values(args, "--tcp") {
        let listener = TcpListener::bind(addr(a)).expect("bind tcp");
        let id = id.clone();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let _ = stream.write_all(format!("{id}\n").as_bytes());
            }
        }));
    }
    for a in values(args, "--bulk") {
        let listener = TcpListener::bind(addr(a)).expect("bind bulk");
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let block = [0u8; 65536];
                    while stream.write_all(&block).is_ok() {}
                });
            }
        }));
    }
    for a in values(args, "--udp") {
        let socket = UdpSocket::bind(addr(a)).expect("bind udp");
        let id = id.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(id.as_bytes(), from);
            }
        }));
    }
    println!("ready");
    for thread in threads {
        let _ = thread.join();
    }
}

/// A DNS server that knows one name: an A record for it, an empty answer
/// for any other type, NXDOMAIN for other names.
fn dns(args: &[String]) {
    let socket = UdpSocket::bind(addr(values(args, "--udp")[0])).expect("bind dns");
    let name = values(args, "--name")[0]
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let a: std::net::Ipv4Addr = values(args, "--a")[0].parse().unwrap_or_else(|_| usage());
    println!("ready");
    let mut buf = [0u8; 512];
    while let Ok((len, from)) = socket.recv_from(&mut buf) {
        if let Some(reply) = dns_reply(&buf[..len], &name, a) {
            let _ = socket.send_to(&reply, from);
        }
    }
}

fn dns_reply(query: &[u8], name: &str, a: std::net::Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let known = labels.join(".") == name;
    let answer = known && qtype == 1;
    let mut reply = query.get(..question_end)?.to_vec();
    // QR, opcode 0, AA, RD copied; RA; RCODE NXDOMAIN (3) for unknown names.
    reply[2] = 0x84 | (query[2] & 0x01);
    reply[3] = 0x80 | if known { 0 } else { 3 };
    reply[6..8].copy_from_slice(&u16::from(answer).to_be_bytes());
    reply[8..12].fill(0);
    if answer {
        // Name pointer to the question, type A, class IN, TTL 30, 4 bytes.
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        reply.extend_from_slice(&a.octets());
    }
    Some(reply)
}

fn tcp_exchange(target: SocketAddr) -> Value {
    let started = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&target, TIMEOUT) {
        Ok(stream) => stream,
        Err(err) => return error_json(&err, started),
    };
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let mut reply = String::new();
    if let Err(err) = stream.read_to_string(&mut reply) {
        return error_json(&err, started);
    }
    json!({
        "backend": reply.trim(),
        "peer": stream.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
        "local": stream.local_addr().map(|a| a.to_string()).unwrap_or_default(),
    })
}

fn tcp(args: &[String]) {
    let target = addr(&args[0]);
    for _ in 0..value(args, "--count", 1u32) {
        emit(tcp_exchange(target));
    }
}

/// Connects again and again for `--ms`, one JSON line per connection with
/// the times it started and ended (its connect happened in between).
fn tcp_loop(args: &[String]) {
    let target = addr(&args[0]);
    let until = Instant::now() + Duration::from_millis(value(args, "--ms", 1000u64));
    while Instant::now() < until {
        let start_us = now_us();
        let mut result = tcp_exchange(target);
        result["start_us"] = json!(start_us);
        result["end_us"] = json!(now_us());
        emit(result);
    }
}

fn udp_socket_for(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(match target {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    })?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    Ok(socket)
}

fn udp(args: &[String]) {
    let target = addr(&args[0]);
    let connected = args.iter().any(|a| a == "--connected");
    let started = Instant::now();
    let socket = match udp_socket_for(target) {
        Ok(socket) => socket,
        Err(err) => return emit(error_json(&err, started)),
    };
    if connected && let Err(err) = socket.connect(target) {
        return emit(error_json(&err, started));
    }
    let mut buf = [0u8; 1500];
    let interval = Duration::from_millis(value(args, "--interval-ms", 0u64));
    for n in 0..value(args, "--count", 1u32) {
        if n > 0 {
            std::thread::sleep(interval);
        }
        let started = Instant::now();
        let start_us = now_us();
        let sent = if connected {
            socket.send(b"ping")
        } else {
            socket.send_to(b"ping", target)
        };
        if let Err(err) = sent {
            emit(error_json(&err, started));
            continue;
        }
        match socket.recv_from(&mut buf) {
            Ok((len, source)) => emit(json!({
                "backend": String::from_utf8_lossy(&buf[..len]),
                "source": source.to_string(),
                "peer": socket.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
                "start_us": start_us,
                "end_us": now_us(),
            })),
            Err(err) => emit(error_json(&err, started)),
        }
    }
}

/// One unconnected socket talking to several VIPs in turn.
fn udp_multi(args: &[String]) {
    let targets: Vec<SocketAddr> = args.iter().map(|a| addr(a)).collect();
    let socket = udp_socket_for(targets[0]).expect("udp socket");
    let mut buf = [0u8; 1500];
    for round in 0..3 {
        for target in &targets {
            let started = Instant::now();
            if let Err(err) = socket.send_to(b"ping", target) {
                emit(error_json(&err, started));
                continue;
            }
            match socket.recv_from(&mut buf) {
                Ok((len, source)) => emit(json!({
                    "round": round,
                    "to": target.to_string(),
                    "backend": String::from_utf8_lossy(&buf[..len]),
                    "source": source.to_string(),
                })),
                Err(err) => emit(error_json(&err, started)),
            }
        }
    }
}

/// Resolves NAME:80 with the C library's resolver (musl in the guest image:
/// unconnected UDP to the nameserver, replies checked against its address).
fn resolve(args: &[String]) {
    use std::net::ToSocketAddrs as _;
    let started = Instant::now();
    let name = args.first().unwrap_or_else(|| usage());
    match (name.as_str(), 80).to_socket_addrs() {
        Ok(addrs) => emit(json!({
            "name": name,
            "addrs": addrs.map(|a| a.ip().to_string()).collect::<Vec<_>>(),
            "elapsed_ms": started.elapsed().as_millis() as u64,
        })),
        Err(err) => emit(error_json(&err, started)),
    }
}

/// Inside a test VM: runs the commands the host sends over vsock, one per
/// connection: a JSON array (program and arguments) on one line; the answer
/// is a JSON object with status, stdout and stderr.
fn guest_exec(args: &[String]) {
    let port: u32 = value(args, "--port", 1026);
    let listener =
        vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port).expect("bind vsock");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream = stream;
            let mut line = String::new();
            let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
            if std::io::BufRead::read_line(&mut reader, &mut line).is_err() {
                return;
            }
            let answer = match serde_json::from_str::<Vec<String>>(&line) {
                Ok(argv) if !argv.is_empty() => {
                    match std::process::Command::new(&argv[0])
                        .args(&argv[1..])
                        .output()
                    {
                        Ok(output) => json!({
                            "status": output.status.code(),
                            "stdout": String::from_utf8_lossy(&output.stdout),
                            "stderr": String::from_utf8_lossy(&output.stderr),
                        }),
                        Err(err) => {
                            json!({ "status": null, "stdout": "", "stderr": err.to_string() })
                        }
                    }
                }
                _ => {
                    json!({ "status": null, "stdout": "", "stderr": "expected a JSON array of strings" })
                }
            };
            let _ = stream.write_all(answer.to_string().as_bytes());
        });
    }
}

/// Short connections from `--threads` threads for `--ms`: connect, read the
/// backend's reply to its end, close; each to a random one of the targets.
/// Prints connections per second and the latency percentiles.
fn load(args: &[String]) {
    let targets: Vec<SocketAddr> = args[0].split(',').map(addr).collect();
    let threads = value(args, "--threads", 4u32);
    let duration = Duration::from_millis(value(args, "--ms", 3000u64));
    let until = Instant::now() + duration;
    let workers: Vec<_> = (0..threads)
        .map(|n| {
            let targets = targets.clone();
            std::thread::spawn(move || {
                let mut seed = now_us() ^ (u64::from(n) << 32) | 1;
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                let mut buf = Vec::with_capacity(64);
                while Instant::now() < until {
                    // xorshift: cheap and good enough to spread over backends.
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let target = targets[(seed % targets.len() as u64) as usize];
                    let started = Instant::now();
                    let done = TcpStream::connect(target).and_then(|mut stream| {
                        buf.clear();
                        stream.read_to_end(&mut buf)
                    });
                    match done {
                        Ok(_) => latencies.push(started.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (l, e) = worker.join().expect("load thread");
        latencies.extend(l);
        errors += e;
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    emit(json!({
        "connections": latencies.len(),
        "errors": errors,
        "per_sec": latencies.len() as f64 / duration.as_secs_f64(),
        "p50_us": at(0.50),
        "p99_us": at(0.99),
    }));
}

/// One long-lived connection reading a bulk backend for `--ms`.
fn stream(args: &[String]) {
    let target = addr(&args[0]);
    let duration = Duration::from_millis(value(args, "--ms", 2000u64));
    let started = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&target, TIMEOUT) {
        Ok(stream) => stream,
        Err(err) => return emit(error_json(&err, started)),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes += n as u64,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    emit(json!({"bytes": bytes, "gbit_per_sec": bytes as f64 * 8.0 / seconds / 1e9}));
}

/// Connects to a vsock port and tells whether the listener closed the
/// connection at once (a refused peer) or kept it open (a ttrpc server
/// waiting for a request).
fn vsock_probe(args: &[String]) {
    let (Some(cid), Some(port)) = (
        args.first().and_then(|a| a.parse().ok()),
        args.get(1).and_then(|a| a.parse().ok()),
    ) else {
        usage();
    };
    let started = Instant::now();
    let mut stream = match vsock::VsockStream::connect_with_cid_port(cid, port) {
        Ok(stream) => stream,
        Err(err) => return emit(error_json(&err, started)),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut byte = [0u8; 1];
    let closed = matches!(stream.read(&mut byte), Ok(0));
    emit(json!({"connected": true, "closed_by_peer": closed}));
}
