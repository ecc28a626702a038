//! The servers: backends answering with their id, a cluster DNS server.

use std::{
    io::Write as _,
    net::{TcpListener, UdpSocket},
};

use crate::*;

pub(crate) fn serve(args: &[String]) {
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
pub(crate) fn dns(args: &[String]) {
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

pub(crate) fn dns_reply(query: &[u8], name: &str, a: std::net::Ipv4Addr) -> Option<Vec<u8>> {
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
