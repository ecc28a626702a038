//! socklb-shim's one-shot commands run as a person runs them: a mistyped
//! or dead agent address fails at once in one line, and only an agent that
//! may be starting is waited for (saying so once); a terminal gets lines for
//! a person, a pipe JSON; shell completions and the manual page come from
//! the same definitions. Needs no root: the agents here are unix sockets
//! the tests make, the terminals pseudo-terminals.

use std::{
    io::Read as _,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::net::UnixListener,
    },
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
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

/// Fails within a second (as issue 26 asks), non-zero, with one stderr
/// line holding `needle`.
fn assert_fails_at_once_in_one_line(agent: &str, command: &str, needle: &str) {
    let (output, took) = shim(agent, &[command]);
    let lines = stderr_lines(&output);
    assert!(!output.status.success(), "{command} succeeded: {lines:?}");
    assert!(
        took < Duration::from_secs(1),
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
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(
        lines[0].contains("unix://relative.sock") && lines[0].contains("must be absolute"),
        "{lines:?}"
    );
}

/// A hybrid vsock muxer that takes connections and hangs up before `OK`,
/// as one does while its guest boots, until the returned flag is set; the
/// thread answers how many connections it took.
fn unanswering_muxer(path: &Path) -> (Arc<AtomicBool>, std::thread::JoinHandle<u32>) {
    let listener = UnixListener::bind(path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let muxer = std::thread::spawn(move || {
        let mut accepted = 0;
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted += 1;
                    drop(stream);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        accepted
    });
    (stop, muxer)
}

#[test]
fn an_unanswered_handshake_is_waited_for_and_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.sock");
    let (stop, muxer) = unanswering_muxer(&path);
    let agent = format!("hvsock://{}:1100", path.display());
    let (output, took) = shim(&agent, &["--timeout", "2", "health"]);
    stop.store(true, Ordering::Relaxed);
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

/// Starts `socklb-shim ARGS` with stderr on a new pseudo-terminal; returns
/// the child and a thread that reads what it writes there, to the end.
fn on_a_terminal(args: &[&str]) -> (Child, std::thread::JoinHandle<String>) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: out-pointers to two ints; no name, termios or window size.
    let result = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(result, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two new descriptors, owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let child = Command::new(shim_bin())
        .env_remove("SOCKLB_AGENT")
        .env_remove("SOCKLB_LOG_FORMAT")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("run socklb-shim");
    // The Command and its copy of the slave are gone: the master reads
    // EIO once the child has exited.
    let reader = std::thread::spawn(move || {
        let mut master = std::fs::File::from(master);
        let mut text = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = master.read(&mut chunk) {
            text.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    (child, reader)
}

/// `text` without the terminal's colour and charset escapes.
fn plain(text: &str) -> String {
    let mut plain = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters up to a final byte (`m` for colour).
                Some('[') => {
                    chars.find(|c| ('@'..='~').contains(c));
                }
                // A charset designation (`ESC ( B`): one byte more.
                Some('(') => {
                    chars.next();
                }
                _ => {}
            },
            c => plain.push(c),
        }
    }
    plain
}

#[test]
fn a_terminal_gets_lines_for_a_person_and_a_pipe_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.sock");
    let (stop, muxer) = unanswering_muxer(&path);
    let agent = format!("hvsock://{}:1100", path.display());
    let args = ["--agent", &agent, "--timeout", "1", "health"];

    let (mut child, reader) = on_a_terminal(&args);
    assert!(!child.wait().unwrap().success());
    let text = plain(&reader.join().unwrap());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("WARN the agent is not answering yet; waiting")
            && !lines[0].contains('{'),
        "not for a person: {text}"
    );
    assert!(
        lines[1].starts_with("socklb-shim: agent hvsock://"),
        "{text}"
    );

    let (mut child, reader) = on_a_terminal(&[&["--log-format", "json"][..], &args].concat());
    assert!(!child.wait().unwrap().success());
    let text = reader.join().unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        line["msg"], "the agent is not answering yet; waiting",
        "{text}"
    );

    let (output, _) = shim(&agent, &["--timeout", "1", "health"]);
    stop.store(true, Ordering::Relaxed);
    let lines = stderr_lines(&output);
    let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        line["msg"], "the agent is not answering yet; waiting",
        "{lines:?}"
    );
    muxer.join().unwrap();
}

/// `watch` is a daemon: JSON lines even at a terminal.
#[test]
fn a_daemon_at_a_terminal_keeps_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let agent = format!("unix://{}", dir.path().join("agent.sock").display());
    let file = dir.path().join("absent.yaml").display().to_string();
    let (mut child, reader) = on_a_terminal(&["--agent", &agent, "watch", "-f", &file]);
    // Its first line (the file cannot be read) comes at once; then stop it.
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    let text = reader.join().unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap_or_default())
        .unwrap_or_else(|err| panic!("{err}: {text}"));
    assert_eq!(line["msg"], "cannot read the table file", "{text}");
}

/// `socklb-shim ARGS`' standard output, having succeeded.
fn printed(args: &[&str]) -> String {
    let output = Command::new(shim_bin())
        .args(args)
        .output()
        .expect("run socklb-shim");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// What bash completes for the words `line` (the last one being typed),
/// with socklb-shim's completion script loaded.
fn bash_completes(script: &Path, line: &[&str]) -> String {
    let words: Vec<String> = line.iter().map(|word| format!("'{word}'")).collect();
    let program = format!(
        "source '{}'\n\
         COMP_WORDS=({})\n\
         COMP_CWORD={}\n\
         _socklb__shim socklb-shim \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
         echo \"${{COMPREPLY[*]}}\"",
        script.display(),
        words.join(" "),
        line.len() - 1
    );
    let output = Command::new("bash")
        .args(["--norc", "-c", &program])
        .output()
        .expect("run bash");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn completions_generate_for_three_shells() {
    for (shell, marker) in [
        ("bash", "complete -F _socklb__shim"),
        ("zsh", "#compdef socklb-shim"),
        ("fish", "complete -c socklb-shim"),
    ] {
        let script = printed(&["completions", shell]);
        assert!(
            script.contains(marker) && script.contains("sandbox") && script.contains("yaml"),
            "{shell}: {script}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("socklb-shim.bash");
    std::fs::write(&bash, printed(&["completions", "bash"])).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(&bash).output().unwrap();
    assert!(syntax.status.success(), "{syntax:?}");
    // A command's own options and values complete too, not only the
    // commands.
    assert_eq!(bash_completes(&bash, &["socklb-shim", "no"]), "node");
    assert_eq!(
        bash_completes(&bash, &["socklb-shim", "list", "-o", ""]),
        "table wide json yaml"
    );
    assert_eq!(
        bash_completes(&bash, &["socklb-shim", "node", "status", "--po"]),
        "--pod"
    );
}

#[test]
fn a_man_page_for_socklb_shim_and_each_command() {
    let page = printed(&["man"]);
    assert!(
        page.contains(".TH socklb-shim 1") && page.contains("\\-\\-sandbox"),
        "{page}"
    );
    let page = printed(&["man", "node", "status"]);
    assert!(
        page.contains(".TH socklb-shim-node-status 1") && page.contains("wide"),
        "{page}"
    );
    let output = Command::new(shim_bin())
        .args(["man", "node", "stat"])
        .output()
        .unwrap();
    let lines = stderr_lines(&output);
    assert!(!output.status.success(), "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("socklb-shim-node has no command \"stat\" (its commands: status)"),
        "{lines:?}"
    );
}
