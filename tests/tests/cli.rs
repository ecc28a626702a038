//! socklb-shim's one-shot commands run as a person runs them: a mistyped
//! or dead agent address fails at once in one line, and only an agent that
//! may be starting is waited for (saying so once). Needs no root: the
//! agents here are unix sockets the tests make.

use std::{
    os::unix::net::UnixListener,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use socklb_tests::shim_bin;

/// Runs `socklb-shim --agent AGENT ARGS`, and how long it took.
fn shim(agent: &str, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new(shim_bin())
        .env_remove("SOCKLB_AGENT")
        .args(["--agent", agent])
        .args(args)
        .output()
        .expect("run socklb-shim");
    (output, started.elapsed())
}

fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Fails within 2 s, non-zero, with one stderr line holding `needle`.
fn assert_fails_at_once_in_one_line(agent: &str, command: &str, needle: &str) {
    let (output, took) = shim(agent, &[command]);
    let lines = stderr_lines(&output);
    assert!(!output.status.success(), "{command} succeeded: {lines:?}");
    assert!(
        took < Duration::from_secs(2),
        "{command} took {took:?}: {lines:?}"
    );
    assert_eq!(lines.len(), 1, "{command}: {lines:?}");
    assert!(lines[0].contains(needle), "{command}: {lines:?}");
}

#[test]
fn a_missing_socket_fails_at_once_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nonexistent.sock");
    let agent = format!("unix://{}", path.display());
    for command in ["list", "stats", "health", "metrics"] {
        assert_fails_at_once_in_one_line(&agent, command, &path.display().to_string());
    }
}

#[test]
fn a_refused_unix_socket_fails_at_once_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    // The agent gone, its socket file left behind.
    drop(UnixListener::bind(&path).unwrap());
    let agent = format!("unix://{}", path.display());
    assert_fails_at_once_in_one_line(&agent, "health", "nothing listens on");
}

#[test]
fn an_address_that_cannot_parse_fails_at_once() {
    let (output, took) = shim("unix://relative.sock", &["list"]);
    let lines = stderr_lines(&output);
    assert!(!output.status.success(), "{lines:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        lines[0].contains("unix://relative.sock") && lines[0].contains("must be absolute"),
        "{lines:?}"
    );
}

/// A hybrid vsock muxer that takes connections and hangs up before `OK`,
/// as one does while its guest boots, until `for_how_long` has passed.
fn unanswering_muxer(path: &Path, for_how_long: Duration) -> std::thread::JoinHandle<u32> {
    let listener = UnixListener::bind(path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut accepted = 0;
        while started.elapsed() < for_how_long {
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted += 1;
                    drop(stream);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        accepted
    })
}

#[test]
fn an_unanswered_handshake_is_waited_for_and_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.sock");
    let muxer = unanswering_muxer(&path, Duration::from_secs(3));
    let agent = format!("hvsock://{}:1100", path.display());
    let (output, took) = shim(&agent, &["--timeout", "2", "health"]);
    let lines = stderr_lines(&output);
    assert!(!output.status.success(), "{lines:?}");
    assert!(
        took >= Duration::from_millis(1500),
        "gave up after {took:?}: {lines:?}"
    );
    assert_eq!(lines.len(), 2, "one line waiting, one giving up: {lines:?}");
    assert!(lines[0].contains("not answering yet"), "{lines:?}");
    assert!(lines[1].contains("hybrid vsock"), "{lines:?}");
    assert!(muxer.join().unwrap() > 2, "retried too little");
}
