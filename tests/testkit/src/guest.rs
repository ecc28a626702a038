//! Inside the test VM: commands run for the host over vsock, a probe of
//! the agent's peer rule, and a root process without CAP_NET_BIND_SERVICE.

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use serde_json::json;

use crate::*;

/// Inside a test VM: runs the commands the host sends over vsock, one per
/// connection: a JSON array (program and arguments) on one line; the answer
/// is a JSON object with status, stdout and stderr.
pub(crate) fn guest_exec(args: &[String]) {
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

/// Listens on vsock port `--port` and holds every connection open until
/// its peer closes it, as a ttrpc server waiting for requests does (the
/// Kata stand-in's kata-agent port).
pub(crate) fn vsock_listen(args: &[String]) {
    let port: u32 = value(args, "--port", 1024);
    let listener =
        vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port).expect("bind vsock");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream = stream;
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
        });
    }
}

/// Connects to a vsock port and tells whether the listener closed the
/// connection at once (a refused peer) or kept it open (a ttrpc server
/// waiting for a request).
pub(crate) fn vsock_probe(args: &[String]) {
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

/// linux/capability.h: CAP_NET_BIND_SERVICE, and the capget/capset ABI.
const CAP_NET_BIND_SERVICE: u32 = 10;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Execs a program as this (root) process, but without CAP_NET_BIND_SERVICE,
/// as a container runtime starts a root container that does not hold it:
/// out of the bounding set (so exec cannot give it back to root), and out
/// of the effective, permitted and inheritable sets.
pub(crate) fn drop_net_bind_service(args: &[String]) {
    if args.is_empty() {
        usage();
    }
    let fail = |what: &str| -> ! {
        eprintln!(
            "drop-net-bind-service: {what}: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1)
    };
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAPBSET_DROP,
            CAP_NET_BIND_SERVICE as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        fail("PR_CAPBSET_DROP");
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // Version 3 takes two words: capabilities 0-31, then 32-63.
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills two CapData, the size version 3 asks for.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        fail("capget");
    }
    let without = !(1u32 << CAP_NET_BIND_SERVICE);
    data[0].effective &= without;
    data[0].permitted &= without;
    data[0].inheritable &= without;
    // SAFETY: as for capget; capset only reads `data`.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        fail("capset");
    }
    let argv: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_str()).unwrap_or_else(|_| usage()))
        .collect();
    let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: a null-terminated array of C strings that outlive the call.
    unsafe { libc::execvp(pointers[0], pointers.as_ptr()) };
    fail(&format!("exec {}", args[0]))
}
