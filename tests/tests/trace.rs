//! The datapath's decisions as a tracer sees them (`Services.Trace`): the
//! real agent and programs on a test cgroup, clients in the client
//! namespace. Needs root (CI runs as root); `cargo xtask test` runs these.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use socklb_protocols::socklb::{self as api, TraceVerdict};
use socklb_tests::{
    Sandbox, backend_ip,
    workload::{errno, one, start_backends, tcp_backends},
};

const ENETUNREACH: i64 = 101;
const ECONNREFUSED: i64 = 111;

/// Events of one attached tracer, read on the runtime as they come.
struct Tracing {
    events: Arc<Mutex<Vec<api::TraceEvent>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Tracing {
    /// Attaches a tracer to the sandbox's agent and waits until its first
    /// event (a refused connect to 10.96.0.20:9, made until one is seen)
    /// shows the hooks write; that event is not kept.
    fn attach(sandbox: &Sandbox, request: api::TraceRequest) -> Tracing {
        Tracing::attach_probing(sandbox, request, "10.96.0.20:9")
    }

    /// [`Tracing::attach`] probing with connects to `probe`.
    fn attach_probing(sandbox: &Sandbox, request: api::TraceRequest, probe: &str) -> Tracing {
        // Its own thread reads the stream while the test runs clients.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let mut client = socklb_tests::agent_client(&sandbox.api_addr(), Default::default());
        let mut stream = runtime
            .block_on(client.trace(&request))
            .expect("attach a tracer");
        runtime.spawn(async move {
            let _client = client;
            while let Ok(Some(event)) = stream.recv().await {
                seen.lock().unwrap().push(event);
            }
        });
        let tracing = Tracing {
            events,
            _runtime: runtime,
        };
        let attached = Instant::now();
        while tracing.take().iter().all(|e| e.address != probe) {
            assert!(
                attached.elapsed() < Duration::from_secs(10),
                "no event of the tracer's probe within 10 s"
            );
            sandbox.client(&["tcp", probe]);
        }
        std::thread::sleep(Duration::from_millis(100));
        tracing.take();
        tracing
    }

    /// The events so far (keep-alives left out), taken.
    fn take(&self) -> Vec<api::TraceEvent> {
        std::mem::take(&mut *self.events.lock().unwrap())
            .into_iter()
            .filter(|e| {
                e.verdict.enum_value_or_default() != TraceVerdict::TRACE_VERDICT_UNSPECIFIED
            })
            .collect()
    }

    /// The events once `count` have come (10 s at most).
    fn wait_for(&self, count: usize) -> Vec<api::TraceEvent> {
        let started = Instant::now();
        let mut events = Vec::new();
        while events.len() < count && started.elapsed() < Duration::from_secs(10) {
            events.extend(self.take());
            std::thread::sleep(Duration::from_millis(20));
        }
        events
    }
}

/// 10.96.0.20:80 on b1 (started by the caller), 10.96.0.30:80 on none.
fn web_and_empty_table(sandbox: &Sandbox) -> std::path::PathBuf {
    sandbox.table(
        "t.yaml",
        &format!(
            "services:
  - {{vip: 10.96.0.20, port: 80, backends: [{}]}}
  - {{vip: 10.96.0.30, port: 80, backends: []}}",
            tcp_backends(1)
        ),
    )
}

/// The table file t.yaml: one service, `vip`:80 on b1 (started by the
/// caller).
fn web_on(sandbox: &Sandbox, vip: &str) -> std::path::PathBuf {
    sandbox.table(
        "t.yaml",
        &format!(
            "services: [{{vip: {vip}, port: 80, backends: [{}]}}]",
            tcp_backends(1)
        ),
    )
}

/// What a test checks of an event.
fn summary(event: &api::TraceEvent) -> (String, String, TraceVerdict, String, String, String) {
    (
        event.hook.clone(),
        event.address.clone(),
        event.verdict.enum_value_or_default(),
        event.backend.clone(),
        event.service.clone(),
        event.cgroup.clone(),
    )
}

/// The name of the program the sandbox's connect4 link runs.
fn connect4_program(sandbox: &Sandbox) -> String {
    connect4_program_of(sandbox).1
}

/// The id and name of the program the sandbox's connect4 link runs.
fn connect4_program_of(sandbox: &Sandbox) -> (u32, String) {
    let hooks = socklb_agent::datapath::hook_stats(&sandbox.bpffs).expect("hook stats");
    let id = hooks
        .iter()
        .find(|hook| hook.hook == "connect4")
        .expect("a connect4 link")
        .program_id;
    let name = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|program| program.id() == id)
        .and_then(|program| program.name_as_str().map(str::to_string))
        .expect("the link's program is loaded");
    (id, name)
}

/// A TCP connect from `cgroup`: its one result, an error or not.
fn connect_in(sandbox: &Sandbox, cgroup: &Path, target: &str) -> serde_json::Value {
    sandbox.client_in_cgroup(cgroup, &["tcp", target]).remove(0)
}

/// A translated connect, one refused for a service without endpoints, one
/// refused for a port no service has, and one from an opted-out cgroup:
/// each is one event with its verdict, address, backend, service and the
/// caller's cgroup below the attach cgroup.
#[test]
fn each_decision_is_one_event_with_its_verdict_and_address() {
    socklb_tests::require_root!();
    let mut sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let _agent = sandbox.start_agent(Some(&web_and_empty_table(&sandbox)));
    let app = sandbox.child_cgroup("app");
    let meshed = sandbox.child_cgroup("meshed");
    let runtime = socklb_tests::runtime();
    let mut client = socklb_tests::agent_client(&sandbox.api_addr(), Default::default());
    runtime
        .block_on(client.set_opt_out_cgroups(&["meshed".into()]))
        .expect("set opt-out cgroups");
    let tracing = Tracing::attach(&sandbox, api::TraceRequest::default());

    let backend = format!("{}:8080", backend_ip(1));
    assert_eq!(
        one(vec![connect_in(&sandbox, &app, "10.96.0.20:80")])["backend"],
        "b1"
    );
    assert_eq!(
        errno(&connect_in(&sandbox, &app, "10.96.0.30:80")),
        ECONNREFUSED
    );
    assert_eq!(
        errno(&connect_in(&sandbox, &app, "10.96.0.20:81")),
        ECONNREFUSED
    );
    // Passed untranslated: the pod has no route to the VIP itself.
    assert_eq!(
        errno(&connect_in(&sandbox, &meshed, "10.96.0.20:80")),
        ENETUNREACH
    );
    let events = tracing.wait_for(4);
    for event in &events {
        println!("{}", socklb_shim::trace::text_line(event));
    }
    let summaries: Vec<_> = events.iter().map(summary).collect();
    let expected = |address: &str, verdict, backend: &str, service: &str, cgroup: &str| {
        (
            "connect4".to_string(),
            address.to_string(),
            verdict,
            backend.to_string(),
            service.to_string(),
            cgroup.to_string(),
        )
    };
    assert_eq!(
        summaries,
        vec![
            expected(
                "10.96.0.20:80",
                TraceVerdict::TRANSLATED,
                &backend,
                "10.96.0.20:80/TCP",
                "/app"
            ),
            expected(
                "10.96.0.30:80",
                TraceVerdict::REFUSED_NO_ENDPOINTS,
                "",
                "10.96.0.30:80/TCP",
                "/app"
            ),
            expected(
                "10.96.0.20:81",
                TraceVerdict::REFUSED_UNKNOWN_PORT,
                "",
                "",
                "/app"
            ),
            expected(
                "10.96.0.20:80",
                TraceVerdict::PASSED_OPTED_OUT,
                "",
                "",
                "/meshed"
            ),
        ]
    );
    let app_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&app).unwrap());
    assert_eq!(events[0].cgroup_id, app_id);
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(
        events
            .iter()
            .all(|e| e.time_unix_nanos <= now_ns && now_ns - e.time_unix_nanos < 60_000_000_000),
        "event times are the wall clock's: {events:?}"
    );
    assert!(events.iter().all(|e| e.dropped == 0), "{events:?}");
}

/// A tracer sees only what it asked for, filtered in the guest, and
/// destinations that are no VIP only when it asks for them.
#[test]
fn a_tracer_sees_only_its_services_and_verdicts() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let _agent = sandbox.start_agent(Some(&web_and_empty_table(&sandbox)));
    // The probe (refused, 10.96.0.20:9) must pass the filter to be seen.
    let request = api::TraceRequest {
        verdicts: vec![socklb_protocols::protobuf::EnumOrUnknown::new(
            TraceVerdict::REFUSED_UNKNOWN_PORT,
        )],
        ..Default::default()
    };
    let tracing = Tracing::attach(&sandbox, request);
    sandbox.client(&["tcp", "10.96.0.20:80"]);
    sandbox.client(&["tcp", "10.96.0.30:80"]);
    sandbox.client(&["tcp", "10.96.0.20:82"]);
    let events = tracing.wait_for(1);
    std::thread::sleep(Duration::from_millis(200));
    let events: Vec<_> = events.into_iter().chain(tracing.take()).collect();
    assert_eq!(
        events
            .iter()
            .map(|e| e.address.as_str())
            .collect::<Vec<_>>(),
        ["10.96.0.20:82"],
        "{events:?}"
    );
    drop(tracing);

    // Destinations that are no VIP only for a tracer that asks.
    let backend = format!("{}:8080", backend_ip(1));
    let request = api::TraceRequest {
        passes: true,
        ..Default::default()
    };
    let tracing = Tracing::attach_probing(&sandbox, request, &backend);
    assert_eq!(one(sandbox.client(&["tcp", &backend]))["backend"], "b1");
    let events = tracing.wait_for(1);
    assert_eq!(
        events.iter().map(summary).collect::<Vec<_>>(),
        [(
            "connect4".to_string(),
            backend,
            TraceVerdict::PASSED_NOT_A_VIP,
            String::new(),
            String::new(),
            // The pod's client runs in the attach cgroup itself.
            "/".to_string()
        )]
    );
}

/// A tracer whose caller went away is detached though decisions it does
/// not want keep coming (the keep-alive is timed from what was sent), and
/// an agent stopping ends the streams of tracers still attached at once;
/// the traced twins run only while a tracer is attached.
#[test]
fn a_tracer_gone_is_detached_and_a_stopping_agent_ends_the_streams() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    let table = sandbox.table(
        "t.yaml",
        "services: [{vip: 10.96.0.20, port: 80, backends: []}]",
    );
    let mut agent = sandbox.start_agent(Some(&table));
    assert_eq!(connect4_program(&sandbox), "lb_connect4");
    let request = api::TraceRequest {
        verdicts: vec![socklb_protocols::protobuf::EnumOrUnknown::new(
            TraceVerdict::REFUSED_UNKNOWN_PORT,
        )],
        ..Default::default()
    };
    let tracing = Tracing::attach(&sandbox, request.clone());
    agent.wait_for("tracer attached");
    assert_eq!(connect4_program(&sandbox), "traced_connect4");
    drop(tracing);
    // Decisions the gone tracer's filter rejects keep coming, every 100
    // ms or so, while its detaching is waited for: past two keep-alive
    // intervals would be too late.
    let dropped_at = Instant::now();
    let detached = loop {
        assert_eq!(
            errno(&sandbox.client(&["tcp", "10.96.0.20:80"])[0]),
            ECONNREFUSED
        );
        if let Some(record) = agent.next_record("tracer detached", Duration::from_millis(100)) {
            break record;
        }
        assert!(
            dropped_at.elapsed() < Duration::from_secs(4),
            "the gone tracer is still attached after {:?}",
            dropped_at.elapsed()
        );
    };
    assert_eq!(detached["tracers"], 0, "{detached}");
    assert_eq!(
        connect4_program(&sandbox),
        "lb_connect4",
        "no tracing code runs without a tracer"
    );

    let _tracing = Tracing::attach(&sandbox, request);
    let stopping = Instant::now();
    assert!(agent.signal(nix::sys::signal::Signal::SIGTERM).success());
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "the agent took {:?} to stop with a tracer attached",
        stopping.elapsed()
    );
    // The links outlive the agent: they run the plain programs again.
    assert_eq!(connect4_program(&sandbox), "lb_connect4");
}

/// Past the agent's --trace-rate (here 5 a second per CPU) the hooks skip
/// the write and count it: every connect is still refused, fewer events
/// come than connects, and the rest is the dropped count.
#[test]
fn a_flood_past_the_rate_is_counted_as_dropped() {
    socklb_tests::require_root!();
    const CONNECTS: usize = 200;
    let sandbox = Sandbox::create();
    let table = sandbox.table(
        "t.yaml",
        "services: [{vip: 10.96.0.20, port: 80, backends: []}]",
    );
    let _agent = sandbox.start_agent_with(Some(&table), &["--trace-rate", "5"]);
    let tracing = Tracing::attach(&sandbox, api::TraceRequest::default());
    let results = sandbox.client(&["tcp", "10.96.0.20:80", "--count", &CONNECTS.to_string()]);
    assert_eq!(results.len(), CONNECTS);
    assert!(results.iter().all(|r| errno(r) == ECONNREFUSED));
    // A keep-alive (2 s without events) carries the count too.
    std::thread::sleep(Duration::from_millis(2_500));
    let all = std::mem::take(&mut *tracing.events.lock().unwrap());
    let traced = all
        .iter()
        .filter(|e| e.verdict.enum_value_or_default() == TraceVerdict::REFUSED_NO_ENDPOINTS)
        .count();
    let dropped = all.iter().map(|e| e.dropped).max().unwrap_or(0);
    assert!(traced < CONNECTS, "{traced} of {CONNECTS} traced");
    assert!(dropped > 0, "nothing counted as dropped");
    assert!(
        traced as u64 + dropped >= CONNECTS as u64,
        "{traced} traced + {dropped} dropped < {CONNECTS} connects"
    );
}

/// The counts a node daemon polls (`Services.Decisions`) keep what a
/// removed service translated (the services' counters, reset when a
/// removed service's id is reused, are added up at removal), and start
/// again with each agent though the services' counters are pinned.
#[test]
fn decisions_keep_what_a_removed_service_counted() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = web_on(&sandbox, "10.96.0.20");
    let mut agent = sandbox.start_agent(Some(&table));
    for _ in 0..2 {
        assert_eq!(
            one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"],
            "b1"
        );
    }
    assert_eq!(
        errno(&sandbox.client(&["tcp", "10.96.0.20:81"])[0]),
        ECONNREFUSED
    );
    // The service goes; another comes.
    web_on(&sandbox, "10.96.0.40");
    agent.reload();
    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.40:80"]))["backend"],
        "b1"
    );
    let runtime = socklb_tests::runtime();
    let decisions = || {
        let mut client = socklb_tests::agent_client(&sandbox.api_addr(), Default::default());
        let decisions = runtime
            .block_on(client.decisions())
            .expect("Services.Decisions");
        (decisions.translated, decisions.refused_unknown_port)
    };
    assert_eq!(decisions(), (3, 1));

    assert!(agent.signal(nix::sys::signal::Signal::SIGTERM).success());
    let _restarted = sandbox.start_agent(Some(&table));
    assert_eq!(decisions(), (0, 0), "a restarted agent's counts");
    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.40:80"]))["backend"],
        "b1"
    );
    assert_eq!(decisions(), (1, 0));
}

/// After an in-place upgrade took the hooks' links over, the old agent's
/// tracer leaving does not swap the new agent's programs, and the old
/// agent says so; a tracer asking it afterwards is refused.
#[test]
fn a_tracer_leaving_an_upgraded_agent_leaves_the_new_programs() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 1);
    let table = web_on(&sandbox, "10.96.0.20");
    let old = sandbox.start_agent(Some(&table));
    let tracing = Tracing::attach(&sandbox, api::TraceRequest::default());
    assert_eq!(connect4_program(&sandbox), "traced_connect4");
    let listen = format!(
        "unix://{}",
        sandbox.workdir.path().join("next.sock").display()
    );
    let _next = sandbox.start_next_agent(&listen, Some(&table));
    let upgraded = connect4_program_of(&sandbox);
    assert_eq!(upgraded.1, "lb_connect4");

    drop(tracing);
    let refused = old.wait_for("cannot tell the hooks a tracer left");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("connect4") && error.contains("neither of this agent's"),
        "{refused}"
    );
    assert_eq!(connect4_program_of(&sandbox), upgraded);

    // A tracer asking the old agent now is refused, not left blind.
    let runtime = socklb_tests::runtime();
    let mut client = socklb_tests::agent_client(&sandbox.api_addr(), Default::default());
    let refused = runtime.block_on(async {
        match client.trace(&api::TraceRequest::default()).await {
            Err(err) => err.to_string(),
            Ok(mut stream) => match stream.recv().await {
                Err(err) => err.to_string(),
                Ok(event) => panic!("a tracer attached to the old agent: {event:?}"),
            },
        }
    });
    assert!(refused.contains("neither of this agent's"), "{refused}");
    assert_eq!(connect4_program_of(&sandbox), upgraded);
    assert_eq!(
        one(sandbox.client(&["tcp", "10.96.0.20:80"]))["backend"],
        "b1"
    );
}
