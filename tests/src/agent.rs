//! A running socklb-agent, its JSON log followed line by line.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

/// A running socklb-agent and its log.
pub struct Agent {
    child: Option<Child>,
    log: mpsc::Receiver<Value>,
}

impl Agent {
    pub(crate) fn spawn(mut command: Command) -> Agent {
        let mut child = command
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn socklb-agent");
        let stderr = child.stderr.take().expect("stderr");
        let (send, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "msg": line }));
                if send.send(value).is_err() {
                    break;
                }
            }
        });
        Agent {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// Waits for the next log record whose message starts with `msg`; fails
    /// on an error record or after 30 s.
    pub fn wait_for(&self, msg: &str) -> Value {
        self.next_record(msg, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("agent did not log {msg:?} within 30 s"))
    }

    /// The next log record whose message starts with `msg`, or `None`
    /// within `timeout`; fails on an error record.
    pub fn next_record(&self, msg: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let record = self.log.recv_timeout(left).ok()?;
            let text = record["msg"].as_str().unwrap_or_default();
            assert_ne!(
                record["level"], "ERRO",
                "agent error while waiting for {msg:?}: {text}"
            );
            if text.starts_with(msg) {
                return Some(record);
            }
        }
    }

    /// Next error record, or `None` within `timeout`.
    pub fn next_error(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Ok(record) = self
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if record["level"] == "ERRO" {
                return Some(record["msg"].as_str().unwrap_or_default().to_string());
            }
        }
        None
    }

    /// Sends SIGHUP (re-read the table) and waits for the result.
    pub fn reload(&self) -> Value {
        kill(self.pid(), Signal::SIGHUP).expect("SIGHUP");
        self.wait_for("table applied")
    }

    pub fn signal(&mut self, signal: Signal) -> std::process::ExitStatus {
        kill(self.pid(), signal).expect("signal agent");
        self.child
            .take()
            .expect("running")
            .wait()
            .expect("wait agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
