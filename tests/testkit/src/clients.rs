//! The clients: each exchange through a VIP or to a backend, one JSON
//! object per exchange on stdout.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::*;

pub(crate) fn tcp_exchange(target: SocketAddr) -> Value {
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

pub(crate) fn tcp(args: &[String]) {
    let target = addr(&args[0]);
    for _ in 0..value(args, "--count", 1u32) {
        emit(tcp_exchange(target));
    }
}

/// Connects again and again for `--ms`, one JSON line per connection with
/// the times it started and ended (its connect happened in between).
pub(crate) fn tcp_loop(args: &[String]) {
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

pub(crate) fn udp_socket_for(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(match target {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    })?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    Ok(socket)
}

pub(crate) fn udp(args: &[String]) {
    let target = addr(&args[0]);
    let connected = args.iter().any(|a| a == "--connected");
    // A connected socket that fails connects again, as an application
    // whose socket was closed under it does.
    let reconnect = args.iter().any(|a| a == "--reconnect");
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
        let received = sent.and_then(|_| socket.recv_from(&mut buf));
        match received {
            Ok((len, source)) => emit(json!({
                "backend": String::from_utf8_lossy(&buf[..len]),
                "source": source.to_string(),
                "peer": socket.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
                "start_us": start_us,
                "end_us": now_us(),
            })),
            Err(err) => {
                let mut failed = error_json(&err, started);
                failed["start_us"] = json!(start_us);
                emit(failed);
                if connected && reconnect {
                    let _ = socket.connect(target);
                }
            }
        }
    }
}

/// One unconnected socket talking to several VIPs in turn.
pub(crate) fn udp_multi(args: &[String]) {
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
pub(crate) fn resolve(args: &[String]) {
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

/// Short connections from `--threads` threads for `--ms`: connect, read the
/// backend's reply to its end, close; each to a random one of the targets.
/// Prints connections per second and the latency percentiles.
pub(crate) fn load(args: &[String]) {
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
pub(crate) fn stream(args: &[String]) {
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
    let mut end = "time".to_string();
    while started.elapsed() < duration {
        match stream.read(&mut buf) {
            Ok(0) => {
                end = "eof".into();
                break;
            }
            Err(err) => {
                end = format!("error: {err}");
                break;
            }
            Ok(n) => bytes += n as u64,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    emit(json!({
        "bytes": bytes,
        "gbit_per_sec": bytes as f64 * 8.0 / seconds / 1e9,
        "end": end,
    }));
}

/// Socket churn through VIPs while long-lived sockets keep asking what they
/// are connected to: `--tcp-connections` short TCP connections, in turn to
/// `--tcp`, to each `--affinity` (ClientIP services, whose choices are
/// checked) and to each `--affinity-churn` (ClientIP services the churn
/// alone uses, so it makes choices of its own), and `--udp-sockets`
/// short-lived UDP sockets (one datagram each) to `--udp`, from two threads
/// each. Meanwhile, every `--check-ms`, a TCP socket connected before the
/// churn checks its getpeername, and an unconnected UDP socket reads one of
/// the replies it was sent before the churn (their source comes from the
/// translation made then). Before and after, a connect to each
/// `--affinity` tells its backend; each churn connection to one must reach
/// the same. Prints one summary.
pub(crate) fn churn(args: &[String]) {
    let tcp_target = addr(values(args, "--tcp")[0]);
    let udp_target = addr(values(args, "--udp")[0]);
    let affinity_targets: Vec<SocketAddr> =
        values(args, "--affinity").into_iter().map(addr).collect();
    let affinity_backends = || -> Vec<Value> {
        affinity_targets
            .iter()
            .map(|target| tcp_exchange(*target)["backend"].clone())
            .collect()
    };
    let tcp_connections: u32 = value(args, "--tcp-connections", 100_000);
    let udp_sockets: u32 = value(args, "--udp-sockets", 200_000);
    let check_every = Duration::from_millis(value(args, "--check-ms", 500u64));

    let affinity_before = affinity_backends();
    // Where the churn connects in turn, with the backend each must reach.
    let rotation: Vec<(SocketAddr, Option<Value>)> = std::iter::once((tcp_target, None))
        .chain(
            affinity_targets
                .iter()
                .zip(&affinity_before)
                .map(|(target, backend)| (*target, Some(backend.clone()))),
        )
        .chain(
            values(args, "--affinity-churn")
                .into_iter()
                .map(|target| (addr(target), None)),
        )
        .collect();
    // The backend closes its end at once; the socket stays connected
    // (CLOSE_WAIT) for as long as it is open.
    let long_tcp = TcpStream::connect_timeout(&tcp_target, TIMEOUT).expect("long-lived TCP");
    let long_udp = udp_socket_for(udp_target).expect("long-lived UDP");
    let mut buf = [0u8; 64];
    let sent = long_udp.send_to(b"ping", udp_target);
    let first_udp_source = match sent.and_then(|_| long_udp.recv_from(&mut buf)) {
        Ok((_, source)) => source.to_string(),
        Err(err) => format!("error: {err}"),
    };
    // Replies queued for the checks: a send before each read would make
    // the translation afresh and hide one the churn lost.
    let mut udp_replies_left = UDP_REPLIES_QUEUED;
    for _ in 0..UDP_REPLIES_QUEUED {
        long_udp
            .send_to(b"ping", udp_target)
            .expect("queue a UDP reply");
    }

    let started = Instant::now();
    let churners: Vec<std::thread::JoinHandle<(u32, Vec<String>)>> = (0..2)
        .map(|thread| {
            let rotation = rotation.clone();
            std::thread::spawn(move || {
                let (mut failed, mut moved) = (0, Vec::new());
                for n in 0..tcp_connections / 2 {
                    // The backend closes first and so holds the TIME_WAIT:
                    // the client's ports are not used up.
                    let (target, chosen) = &rotation[(n as usize * 2 + thread) % rotation.len()];
                    let exchange = tcp_exchange(*target);
                    failed += u32::from(exchange.get("error").is_some());
                    if let Some(chosen) = chosen
                        && exchange["backend"] != *chosen
                        && exchange.get("error").is_none()
                    {
                        moved.push(format!("{target}: {}", exchange["backend"]));
                    }
                }
                (failed, moved)
            })
        })
        .chain((0..2).map(|_| {
            std::thread::spawn(move || {
                let mut failed = 0;
                for _ in 0..udp_sockets / 2 {
                    let sent = udp_socket_for(udp_target)
                        .and_then(|socket| socket.send_to(b"churn", udp_target));
                    failed += u32::from(sent.is_err());
                }
                (failed, Vec::new())
            })
        }))
        .collect();
    let (mut tcp_checks, mut udp_checks) = (0, 0);
    let mut wrong = Vec::new();
    let mut check = || {
        tcp_checks += 1;
        let peer = long_tcp.peer_addr().map(|a| a.to_string());
        if peer.as_ref().ok() != Some(&tcp_target.to_string()) {
            wrong.push(format!("getpeername: {peer:?}"));
        }
        if udp_replies_left > 0 {
            udp_replies_left -= 1;
            udp_checks += 1;
            let source = match long_udp.recv_from(&mut buf) {
                Ok((_, source)) => source.to_string(),
                Err(err) => format!("error: {err}"),
            };
            if source != udp_target.to_string() {
                wrong.push(format!("recvfrom: {source}"));
            }
        }
    };
    while !churners.iter().all(std::thread::JoinHandle::is_finished) {
        std::thread::sleep(check_every);
        check();
    }
    let (mut failed, mut affinity_moved) = (0, Vec::new());
    for churner in churners {
        let (f, moved) = churner.join().unwrap();
        failed += f;
        affinity_moved.extend(moved);
    }
    let churn_ms = started.elapsed().as_millis() as u64;
    check();
    emit(json!({
        "churn_ms": churn_ms,
        "failed": failed,
        "tcp_checks": tcp_checks,
        "udp_checks": udp_checks,
        "first_udp_source": first_udp_source,
        "wrong": wrong,
        "affinity_before": affinity_before,
        "affinity_after": affinity_backends(),
        "affinity_moved": affinity_moved.len(),
        "affinity_moved_first": affinity_moved.into_iter().take(5).collect::<Vec<_>>(),
    }));
}

/// How many replies the churn's long-lived UDP socket has queued for its
/// checks: more than a churn checked every few seconds needs, far fewer
/// than its receive buffer holds.
const UDP_REPLIES_QUEUED: u32 = 64;

/// `--sockets` UDP sockets connected to ADDR (each connect translated once),
/// held for `--ms`; then one datagram on each. Prints how many were opened
/// and how many of those sends failed (a socket closed meanwhile fails).
pub(crate) fn udp_hold(args: &[String]) {
    let target = addr(&args[0]);
    let count: usize = value(args, "--sockets", 10_000);
    let hold = Duration::from_millis(value(args, "--ms", 3000u64));
    raise_open_files_limit();
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = match udp_socket_for(target).and_then(|s| s.connect(target).map(|()| s)) {
            Ok(socket) => socket,
            Err(err) => return emit(error_json(&err, started)),
        };
        sockets.push(socket);
    }
    std::thread::sleep(hold.saturating_sub(started.elapsed()));
    let failed = sockets.iter().filter(|s| s.send(b"ping").is_err()).count();
    emit(json!({"sockets": sockets.len(), "failed_sends": failed}));
}

/// Many sockets need more than the usual soft limit of 1,024 descriptors.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
