//! Inside the test VM: commands run for the host over vsock, and a probe of
//! the agent's peer rule.

use std::{
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
