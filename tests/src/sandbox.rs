//! The sandbox: a fresh cgroup, a private bpffs mount and two network
//! namespaces (a client "pod" and a backends host joined by veth), with the
//! real agent and real sockets. Everything it creates is removed when it
//! drops, also when a test fails.
//!
//! Safety: clients that reach a VIP or a backend run only inside the client
//! namespace; the agent attaches only to the sandbox's cgroup.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns},
};
use serde_json::Value;

use crate::{
    agent::Agent,
    binaries::{agent_bin, shim_bin, testkit_bin},
    process::die_with_parent,
};

/// The client namespace's addresses: the pod.
pub const CLIENT_IP: &str = "10.244.0.1";
pub const CLIENT_IP6: &str = "fd00:244::1";
/// Backend addresses live in the backends namespace, 10.244.1.N and
/// fd00:244::1:N for N in 1..=BACKEND_HOSTS (by default).
pub const BACKEND_HOSTS: u8 = 4;

pub fn backend_ip(n: u8) -> String {
    format!("10.244.1.{n}")
}

pub fn backend_ip6(n: u8) -> String {
    format!("fd00:244::1:{n}")
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// The cgroup2 mount, from /proc/mounts.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("cgroup2 is not mounted")
}

/// Adds an address to a device of a namespace (IPv6 without duplicate
/// address detection, so it is usable at once).
fn add_address(ns: &str, cidr: &str, device: &str) {
    let mut args = vec!["-n", ns, "addr", "add", cidr, "dev", device];
    if cidr.contains(':') {
        args.push("nodad");
    }
    run("ip", &args);
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What a sandbox has created, undone in reverse order on drop.
enum Created {
    Cgroup(PathBuf),
    Mount(PathBuf),
    Netns(String),
    EtcNetns(PathBuf),
}

pub struct Sandbox {
    pub id: String,
    pub cgroup: PathBuf,
    pub client_ns: String,
    pub backend_ns: String,
    pub workdir: tempfile::TempDir,
    /// The agent's --bpffs directory, inside the sandbox's own bpffs mount.
    pub bpffs: PathBuf,
    /// The agent binary its agents run: [`crate::agent_bin`] unless a
    /// benchmark compares another build.
    pub agent_bin: PathBuf,
    created: Vec<Created>,
    processes: Mutex<Vec<Child>>,
}

impl Sandbox {
    pub fn create() -> Sandbox {
        Sandbox::with_backend_hosts(BACKEND_HOSTS)
    }

    /// A sandbox whose backends namespace has `hosts` addresses per family.
    pub fn with_backend_hosts(hosts: u8) -> Sandbox {
        let id = format!(
            "socklb-t{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let workdir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .expect("tempdir");
        let mut sandbox = Sandbox {
            cgroup: cgroup2_mount().join(&id),
            client_ns: format!("{id}-c"),
            backend_ns: format!("{id}-b"),
            bpffs: workdir.path().join("bpffs").join("socklb"),
            agent_bin: agent_bin(),
            id,
            workdir,
            created: Vec::new(),
            processes: Mutex::new(Vec::new()),
        };
        sandbox.build(hosts);
        sandbox
    }

    fn build(&mut self, hosts: u8) {
        fs::create_dir(&self.cgroup).expect("create test cgroup");
        self.created.push(Created::Cgroup(self.cgroup.clone()));

        let bpffs_mount = self.bpffs.parent().expect("parent").to_path_buf();
        fs::create_dir(&bpffs_mount).expect("bpffs mount point");
        mount(
            Some("bpf"),
            &bpffs_mount,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a private bpffs");
        self.created.push(Created::Mount(bpffs_mount));

        for ns in [self.client_ns.clone(), self.backend_ns.clone()] {
            run("ip", &["netns", "add", &ns]);
            self.created.push(Created::Netns(ns.clone()));
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        let (c, b) = (self.client_ns.as_str(), self.backend_ns.as_str());
        // Both ends are born inside their namespaces: no name in the host's.
        run(
            "ip",
            &[
                "link", "add", "eth0", "netns", c, "type", "veth", "peer", "name", "eth0", "netns",
                b,
            ],
        );
        add_address(c, &format!("{CLIENT_IP}/16"), "eth0");
        add_address(c, &format!("{CLIENT_IP6}/64"), "eth0");
        for n in 1..=hosts {
            add_address(b, &format!("{}/16", backend_ip(n)), "eth0");
            add_address(b, &format!("{}/64", backend_ip6(n)), "eth0");
        }
        run("ip", &["-n", c, "link", "set", "eth0", "up"]);
        run("ip", &["-n", b, "link", "set", "eth0", "up"]);
    }

    /// Writes a table file into the sandbox's directory.
    pub fn table(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.workdir.path().join(name);
        fs::write(&path, yaml).expect("write table");
        path
    }

    /// The agent's API address: a unix socket in the sandbox (never vsock:
    /// this machine's vsock belongs to its infrastructure).
    pub fn api_addr(&self) -> String {
        format!(
            "unix://{}",
            self.workdir.path().join("agent.sock").display()
        )
    }

    /// socklb-agent on this sandbox's cgroup, bpffs and API socket.
    pub fn agent_command(&self) -> Command {
        self.agent_command_via(&[])
    }

    /// [`Sandbox::agent_command`] started by `launcher` (a program and its
    /// arguments, e.g. setpriv with a unit's limits; the agent comes last).
    pub fn agent_command_via(&self, launcher: &[String]) -> Command {
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&self.agent_bin);
                command
            }
            None => Command::new(&self.agent_bin),
        };
        command
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .env("SOCKLB_LISTEN", self.api_addr());
        die_with_parent(&mut command);
        command
    }

    /// `socklb-shim kube` against this sandbox's agent and the API server of
    /// `kubeconfig`, with `extra` flags; it dies with the caller.
    pub fn shim_kube_command(&self, kubeconfig: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(shim_bin());
        command
            .args(["--agent", &self.api_addr(), "kube", "--kubeconfig"])
            .arg(kubeconfig)
            .args(extra);
        die_with_parent(&mut command);
        command
    }

    /// Starts the agent and waits until it is ready.
    pub fn start_agent(&self, table: Option<&Path>) -> Agent {
        self.start_agent_with(table, &[])
    }

    pub fn start_agent_with(&self, table: Option<&Path>, extra: &[&str]) -> Agent {
        self.start_agent_via(&[], table, extra)
    }

    /// [`Sandbox::start_agent_with`] started by `launcher` (see
    /// [`Sandbox::agent_command_via`]).
    pub fn start_agent_via(
        &self,
        launcher: &[String],
        table: Option<&Path>,
        extra: &[&str],
    ) -> Agent {
        self.start(self.agent_command_via(launcher), table, extra)
    }

    /// A second agent on this sandbox's cgroup and pins, serving `listen`
    /// (`unix://PATH`): what an in-place upgrade starts beside the running
    /// one.
    pub fn start_next_agent(&self, listen: &str, table: Option<&Path>) -> Agent {
        let mut command = self.agent_command();
        command.env("SOCKLB_LISTEN", listen);
        self.start(command, table, &[])
    }

    fn start(&self, mut command: Command, table: Option<&Path>, extra: &[&str]) -> Agent {
        command
            .args([
                "--pod-ip",
                &format!("{CLIENT_IP},{CLIENT_IP6}"),
                "--log-level",
                "debug",
            ])
            .args(extra);
        if let Some(table) = table {
            command.arg("--table").arg(table);
        }
        let agent = Agent::spawn(command);
        agent.wait_for("ready");
        agent
    }

    /// Runs the agent once with extra arguments (e.g. `--detach`) to its end.
    pub fn agent_once(&self, args: &[&str]) -> std::process::Output {
        self.agent_command()
            .args(args)
            .output()
            .expect("run socklb-agent")
    }

    /// Starts a backend server (`socklb-testkit serve`) in the backends
    /// namespace and waits until it listens.
    pub fn backend(&self, id: &str, tcp: &[&str], udp: &[&str]) {
        let mut args = vec!["serve", "--id", id];
        for a in tcp {
            args.extend(["--tcp", a]);
        }
        for a in udp {
            args.extend(["--udp", a]);
        }
        self.spawn_ready(self.in_netns(&self.backend_ns, &testkit_bin(), &args));
    }

    /// Starts a bulk server (writes until the client closes) in the backends
    /// namespace.
    pub fn backend_bulk(&self, bulk: &str) {
        let args = ["serve", "--id", "bulk", "--bulk", bulk];
        self.spawn_ready(self.in_netns(&self.backend_ns, &testkit_bin(), &args));
    }

    /// Starts a server that is not the test kit's (e.g. nginx) in the
    /// backends namespace; it is killed when the sandbox drops. The caller
    /// waits for it to listen. Returns its pid.
    pub fn spawn_backend_program(&self, program: &Path, args: &[&str]) -> u32 {
        let child = self
            .in_netns(&self.backend_ns, program, args)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let pid = child.id();
        self.processes.lock().unwrap().push(child);
        pid
    }

    /// Runs a client program that is not the test kit's (e.g. wrk) to its
    /// end in the pod: client namespace and test cgroup.
    pub fn pod_program(&self, program: &Path, args: &[&str]) -> std::process::Output {
        self.pod_command(program, args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
    }

    /// [`Sandbox::pod_program`] in the client namespace but outside the
    /// cgroup, where no socklb program runs.
    pub fn pod_program_outside_cgroup(
        &self,
        program: &Path,
        args: &[&str],
    ) -> std::process::Output {
        self.in_netns(&self.client_ns, program, args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
    }

    /// Adds an address to the client namespace's loopback device.
    pub fn add_client_address(&self, cidr: &str) {
        run(
            "ip",
            &["-n", &self.client_ns, "addr", "add", cidr, "dev", "lo"],
        );
    }

    /// Starts a server in the client namespace (a backend local to the pod).
    pub fn local_server(&self, id: &str, tcp: &str) {
        let command = self.in_netns(
            &self.client_ns,
            &testkit_bin(),
            &["serve", "--id", id, "--tcp", tcp],
        );
        self.spawn_ready(command);
    }

    /// Starts the test DNS server in the backends namespace.
    pub fn dns_server(&self, udp: &str, name: &str, a: &str) {
        let command = self.in_netns(
            &self.backend_ns,
            &testkit_bin(),
            &["dns", "--udp", udp, "--name", name, "--a", a],
        );
        self.spawn_ready(command);
    }

    fn spawn_ready(&self, mut command: Command) {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read server");
        assert_eq!(line.trim(), "ready", "server did not start");
        self.processes.lock().unwrap().push(child);
    }

    /// A testkit client inside the pod: client namespace and test cgroup.
    pub fn client(&self, args: &[&str]) -> Vec<Value> {
        collect(self.pod_command(&testkit_bin(), args))
    }

    /// Creates the cgroup `name` below the test cgroup (removed before it).
    pub fn child_cgroup(&mut self, name: &str) -> PathBuf {
        let child = self.cgroup.join(name);
        fs::create_dir(&child).expect("create child cgroup");
        self.created.push(Created::Cgroup(child.clone()));
        child
    }

    /// A testkit client in the client namespace and the cgroup `cgroup`
    /// (one of `child_cgroup`).
    pub fn client_in_cgroup(&self, cgroup: &Path, args: &[&str]) -> Vec<Value> {
        collect(self.command_in(cgroup, &self.client_ns, &testkit_bin(), args))
    }

    /// A testkit client in the test cgroup and the network namespace
    /// `netns` (another pod the test made).
    pub fn client_in_netns(&self, netns: &str, args: &[&str]) -> Vec<Value> {
        collect(self.command_in(&self.cgroup, netns, &testkit_bin(), args))
    }

    /// A testkit client in the client namespace but outside the cgroup.
    pub fn client_outside_cgroup(&self, args: &[&str]) -> Vec<Value> {
        collect(self.in_netns(&self.client_ns, &testkit_bin(), args))
    }

    /// Starts a testkit client in the pod; its output is read as it comes,
    /// so a chatty client never blocks on a full pipe.
    pub fn spawn_client(&self, args: &[&str]) -> RunningClient {
        RunningClient::spawn(self.pod_command(&testkit_bin(), args))
    }

    /// [`Sandbox::spawn_client`] in the cgroup `cgroup` (one of
    /// `child_cgroup`).
    pub fn spawn_client_in_cgroup(&self, cgroup: &Path, args: &[&str]) -> RunningClient {
        RunningClient::spawn(self.command_in(cgroup, &self.client_ns, &testkit_bin(), args))
    }

    /// [`Sandbox::spawn_client`] in the client namespace but outside the
    /// cgroup.
    pub fn spawn_client_outside_cgroup(&self, args: &[&str]) -> RunningClient {
        RunningClient::spawn(self.in_netns(&self.client_ns, &testkit_bin(), args))
    }

    /// Runs a program in the pod through `ip netns exec`, which also gives it
    /// the namespace's /etc/netns/<ns>/resolv.conf (see `resolv_conf`).
    pub fn pod_exec(&self, program: &str, args: &[&str]) -> std::process::Output {
        let mut full = vec!["netns", "exec", self.client_ns.as_str(), program];
        full.extend_from_slice(args);
        let mut command = Command::new("ip");
        command.args(&full);
        let procs = self.cgroup_procs();
        // SAFETY: only a write(2) between fork and exec.
        unsafe {
            command.pre_exec(move || (&procs).write_all(b"0"));
        }
        command.output().expect("ip netns exec")
    }

    /// Gives the client namespace its own resolv.conf.
    pub fn resolv_conf(&mut self, content: &str) {
        let dir = PathBuf::from("/etc/netns").join(&self.client_ns);
        fs::create_dir_all(&dir).expect("/etc/netns/<ns>");
        self.created.push(Created::EtcNetns(dir.clone()));
        fs::write(dir.join("resolv.conf"), content).expect("resolv.conf");
    }

    fn cgroup_procs(&self) -> File {
        OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .expect("open cgroup.procs")
    }

    fn in_netns(&self, ns: &str, program: &Path, args: &[&str]) -> Command {
        let netns = File::open(Path::new("/run/netns").join(ns)).expect("open netns");
        let mut command = Command::new(program);
        command.args(args);
        die_with_parent(&mut command);
        // SAFETY: only setns(2) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        command
    }

    fn pod_command(&self, program: &Path, args: &[&str]) -> Command {
        self.command_in(&self.cgroup, &self.client_ns, program, args)
    }

    fn command_in(&self, cgroup: &Path, netns: &str, program: &Path, args: &[&str]) -> Command {
        let procs = OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let netns = File::open(Path::new("/run/netns").join(netns)).expect("open netns");
        let mut command = Command::new(program);
        command.args(args);
        die_with_parent(&mut command);
        // SAFETY: only write(2) and setns(2) between fork and exec. Joining
        // the cgroup first: membership survives the namespace switch.
        unsafe {
            command.pre_exec(move || {
                (&procs).write_all(b"0")?;
                setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        command
    }
}

/// A client started by `Sandbox::spawn_client`.
pub struct RunningClient {
    child: Child,
    reader: std::thread::JoinHandle<Vec<u8>>,
}

impl RunningClient {
    fn spawn(mut command: Command) -> RunningClient {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn client");
        let mut stdout = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut output = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stdout, &mut output);
            output
        });
        RunningClient { child, reader }
    }

    /// Waits for the client and parses its JSON lines.
    pub fn finish(mut self) -> Vec<Value> {
        self.child.wait().expect("wait for client");
        parse_lines(&self.reader.join().expect("client reader"))
    }
}

fn collect(mut command: Command) -> Vec<Value> {
    let output = command.output().expect("run client");
    assert!(
        output.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_lines(&output.stdout)
}

fn parse_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for mut child in self.processes.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for created in self.created.drain(..).rev() {
            match created {
                Created::EtcNetns(dir) => {
                    let _ = fs::remove_dir_all(dir);
                }
                Created::Netns(ns) => {
                    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
                }
                // Unmounting drops every pin, which detaches the links.
                Created::Mount(dir) => {
                    let _ = umount2(&dir, MntFlags::MNT_DETACH);
                }
                Created::Cgroup(dir) => {
                    // Exiting processes may linger a moment in the cgroup.
                    for _ in 0..50 {
                        if fs::remove_dir(&dir).is_ok() || !dir.exists() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }
}
