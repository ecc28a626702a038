//! The control plane end to end: the real agent serving ttrpc on a unix
//! socket in a test sandbox, driven by the socklb-shim CLI and library, with
//! real connects through the VIPs it programs. Needs root.

use std::{
    process::{Command, Output},
    thread::sleep,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use socklb_protocols::{protobuf, socklb as api, socklb_ttrpc::ServicesClient};
use socklb_shim::{AgentAddr, AgentClient, ClientError, Options};
use socklb_table::{Service, ServiceKey, Table, VipKind};
use socklb_tests::{Sandbox, agent_client, backend_ip, backend_ip6, runtime, shim_bin};
use ttrpc::Code;

const ENETUNREACH: i64 = 101;

fn shim(sandbox: &Sandbox, args: &[&str]) -> Output {
    Command::new(shim_bin())
        .args(["--agent", &sandbox.api_addr(), "--timeout", "10"])
        .args(args)
        .output()
        .expect("run socklb-shim")
}

fn shim_ok(sandbox: &Sandbox, args: &[&str]) -> String {
    let output = shim(sandbox, args);
    assert!(
        output.status.success(),
        "socklb-shim {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn start_backends(sandbox: &Sandbox, n: u8) {
    for i in 1..=n {
        let tcp4 = format!("{}:8080", backend_ip(i));
        let tcp6 = format!("[{}]:8080", backend_ip6(i));
        let udp4 = format!("{}:5353", backend_ip(i));
        sandbox.backend(&format!("b{i}"), &[&tcp4, &tcp6], &[&udp4]);
    }
}

/// The backend a TCP connect through `vip` reached, or its errno.
fn reach(sandbox: &Sandbox, vip: &str) -> Result<String, i64> {
    let result = sandbox.client(&["tcp", vip]).remove(0);
    match result.get("backend") {
        Some(backend) => Ok(backend.as_str().unwrap().to_string()),
        None => Err(result["errno"].as_i64().unwrap()),
    }
}

fn table_text() -> String {
    format!(
        "services:
  - name: default/web
    vip: 10.96.0.20
    port: 80
    affinity: {{clientIP: {{timeoutSeconds: 60}}}}
    backends: [{{ip: {b1}, port: 8080}}, {{ip: {b2}, port: 8080}}]
  - name: kube-system/kube-dns
    vip: 10.96.0.10
    port: 53
    protocol: UDP
    backends: [{{ip: {b1}, port: 5353}}]
  - name: default/web-v6
    vip: 'fd00:96::20'
    port: 80
    backends: [{{ip: '{b1v6}', port: 8080}}]
  - name: default/empty
    vip: 10.96.0.30
    port: 80
",
        b1 = backend_ip(1),
        b2 = backend_ip(2),
        b1v6 = backend_ip6(1)
    )
}

/// Services sorted by key, names included, for comparing tables.
fn sorted(mut table: Table) -> Vec<Service> {
    table.services.sort_by_key(|s| s.key);
    table.services
}

fn client(sandbox: &Sandbox) -> AgentClient {
    let options = Options {
        connect_timeout: Duration::from_secs(10),
        ..Options::default()
    };
    agent_client(&sandbox.api_addr(), options)
}

#[test]
fn apply_then_list_equals_the_file() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 2);
    let _agent = sandbox.start_agent(None);
    let file = sandbox.table("t.yaml", &table_text());
    let applied = shim_ok(&sandbox, &["apply", "-f", file.to_str().unwrap()]);
    let expected = Table::from_file(&file).unwrap();
    assert!(applied.contains(&expected.digest()), "{applied}");

    let listed: Value = serde_json::from_str(&shim_ok(&sandbox, &["list", "-o", "json"])).unwrap();
    assert_eq!(listed["digest"], expected.digest());
    assert_eq!(listed["generation"], 1);
    let services = serde_json::json!({ "services": listed["services"] });
    let listed_table = Table::parse(&services.to_string()).unwrap();
    assert_eq!(sorted(listed_table), sorted(expected));

    let human = shim_ok(&sandbox, &["list"]);
    assert!(
        human.contains("default/web") && human.contains("10.96.0.20:80/TCP"),
        "{human}"
    );
    assert!(reach(&sandbox, "10.96.0.20:80").unwrap().starts_with('b'));
    assert_eq!(reach(&sandbox, "[fd00:96::20]:80").unwrap(), "b1");
}

#[test]
fn incremental_updates() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 3);
    let _agent = sandbox.start_agent(None);
    let runtime = runtime();
    let mut client = client(&sandbox);
    let table = Table::parse(&table_text()).unwrap();
    runtime.block_on(client.sync(table.clone())).unwrap();

    let key = |text: &str| -> ServiceKey {
        let (addr, protocol) = text.split_once('/').unwrap();
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        ServiceKey {
            vip: addr.ip(),
            port: addr.port(),
            protocol: if protocol == "UDP" {
                socklb_table::Protocol::Udp
            } else {
                socklb_table::Protocol::Tcp
            },
        }
    };
    let new_service = Service {
        name: Some("default/new".into()),
        key: key("10.96.0.40:8000/TCP"),
        vip_kind: VipKind::Cluster,
        affinity_timeout_secs: None,
        backends: vec![format!("{}:8080", backend_ip(3)).parse().unwrap()],
    };
    let changed_web = Service {
        backends: vec![format!("{}:8080", backend_ip(3)).parse().unwrap()],
        ..table.services[0].clone()
    };
    let written = runtime
        .block_on(client.upsert(vec![new_service.clone(), changed_web.clone()]))
        .unwrap();
    assert_eq!(written.generation, 2);
    assert_eq!(reach(&sandbox, "10.96.0.40:8000").unwrap(), "b3");
    for _ in 0..5 {
        assert_eq!(reach(&sandbox, "10.96.0.20:80").unwrap(), "b3");
    }

    let written = runtime
        .block_on(client.delete(vec![key("10.96.0.30:80/TCP"), key("[fd00:96::20]:80/TCP")]))
        .unwrap();
    assert_eq!(written.generation, 3);
    assert_eq!(written.services, 3);
    assert_eq!(reach(&sandbox, "10.96.0.30:80"), Err(ENETUNREACH));

    let (generation, listed, digest) = runtime.block_on(client.list()).unwrap();
    let expected = Table {
        services: vec![changed_web, table.services[1].clone(), new_service],
    };
    assert_eq!(generation, 3);
    assert_eq!(digest, expected.digest());
    assert_eq!(sorted(listed), sorted(expected));
}

#[test]
fn refused_writes_leave_the_table_unchanged() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 2);
    let _agent = sandbox.start_agent(None);
    let runtime = runtime();
    let mut client = client(&sandbox);
    runtime
        .block_on(client.sync(Table::parse(&table_text()).unwrap()))
        .unwrap();
    let (_, _, digest_before) = runtime.block_on(client.list()).unwrap();

    // Requests a validated `Table` cannot express go through a raw client.
    let AgentAddr::Unix(path) = sandbox.api_addr().parse().unwrap() else {
        unreachable!()
    };
    let raw = runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(path).await.unwrap();
        ServicesClient::new(ttrpc::r#async::Client::new(
            ttrpc::r#async::transport::Socket::new(stream),
        ))
    });
    let service =
        |name: &str, vip: &str, port: u32, protocol: i32, backends: &[(&str, u32)]| api::Service {
            name: name.into(),
            key: protobuf::MessageField::some(api::ServiceKey {
                vip: vip.into(),
                port,
                protocol: protobuf::EnumOrUnknown::from_i32(protocol),
                ..Default::default()
            }),
            backends: backends
                .iter()
                .map(|(ip, port)| api::Backend {
                    ip: (*ip).into(),
                    port: *port,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
    let refused = |result: ttrpc::Result<api::WriteResponse>| match result {
        Err(ttrpc::Error::RpcStatus(status)) => (status.code(), status.message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let context = || ttrpc::context::with_duration(Duration::from_secs(10));
    let good_backend = [(backend_ip(1), 8080)];
    let good_backend: Vec<(&str, u32)> = good_backend
        .iter()
        .map(|(ip, p)| (ip.as_str(), *p))
        .collect();

    let cases: Vec<(&str, ttrpc::Result<api::WriteResponse>, Code, &str)> = vec![
        (
            "upsert: a good service beside one with protocol 9",
            runtime.block_on(raw.upsert(
                context(),
                &api::UpsertRequest {
                    services: vec![
                        service("ok", "10.96.0.50", 80, 0, &good_backend),
                        service("bad", "10.96.0.51", 80, 9, &good_backend),
                    ],
                    ..Default::default()
                },
            )),
            Code::INVALID_ARGUMENT,
            r#"service "bad" (services[1]): protocol: "protocol number 9""#,
        ),
        (
            "sync: duplicate key",
            runtime.block_on(raw.sync(
                context(),
                &api::SyncRequest {
                    generation: 7,
                    services: vec![
                        service("a", "10.96.0.60", 80, 0, &good_backend),
                        service("b", "10.96.0.60", 80, 0, &good_backend),
                    ],
                    ..Default::default()
                },
            )),
            Code::INVALID_ARGUMENT,
            r#"service "b" (10.96.0.60:80/TCP): vip/port/protocol"#,
        ),
        (
            "upsert: backend port 0 and a v6 backend of a v4 VIP",
            runtime.block_on(raw.upsert(
                context(),
                &api::UpsertRequest {
                    services: vec![service("c", "10.96.0.20", 80, 0, &[(&backend_ip(1), 0)])],
                    ..Default::default()
                },
            )),
            Code::INVALID_ARGUMENT,
            "backends[0].port: 0 is not a port",
        ),
        (
            "sync: more services than the maps hold",
            runtime.block_on(
                raw.sync(
                    context(),
                    &api::SyncRequest {
                        services: (0..=65_536u32)
                            .map(|i| {
                                service(
                                    "",
                                    &format!(
                                        "10.{}.{}.{}",
                                        96 + (i >> 16),
                                        (i >> 8) & 255,
                                        i & 255
                                    ),
                                    80,
                                    0,
                                    &[],
                                )
                            })
                            .collect(),
                        ..Default::default()
                    },
                ),
            ),
            Code::RESOURCE_EXHAUSTED,
            "65537 services; the datapath holds at most 65536",
        ),
        (
            "delete: one known and one unknown key",
            runtime.block_on(raw.delete(
                context(),
                &api::DeleteRequest {
                    keys: vec![
                        service("", "10.96.0.20", 80, 0, &[]).key.unwrap(),
                        service("", "10.96.0.99", 80, 0, &[]).key.unwrap(),
                    ],
                    ..Default::default()
                },
            )),
            Code::NOT_FOUND,
            "service 10.96.0.99:80/TCP is not programmed",
        ),
    ];
    for (what, result, code, message) in cases {
        let (got_code, got_message) = refused(result);
        assert_eq!(got_code, code, "{what}: {got_message}");
        assert!(
            got_message.contains(message),
            "{what}: {got_message:?} lacks {message:?}"
        );
        let (generation, _, digest) = runtime.block_on(client.list()).unwrap();
        assert_eq!(digest, digest_before, "{what} changed the table");
        assert_eq!(generation, 1, "{what} changed the generation");
    }
    assert!(reach(&sandbox, "10.96.0.20:80").is_ok());
    assert_eq!(
        reach(&sandbox, "10.96.0.50:80"),
        Err(ENETUNREACH),
        "half of a refused upsert applied"
    );

    // The library refuses the same way and keeps its table to resync.
    let bad = Table::parse("services: [{vip: 10.96.0.70, port: 80}]").unwrap();
    let mut services = bad.services.clone();
    services.push(bad.services[0].clone());
    let err = runtime.block_on(client.upsert(services)).unwrap_err();
    assert_eq!(err.code(), Some(Code::INVALID_ARGUMENT), "{err}");
    assert!(matches!(err, ClientError::Refused { .. }));
}

#[test]
fn shim_resyncs_a_restarted_agent_by_itself() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 2);
    let mut agent = sandbox.start_agent(None);
    let file = sandbox.table("t.yaml", &table_text());
    let mut watch = Command::new(shim_bin())
        .args([
            "--agent",
            &sandbox.api_addr(),
            "watch",
            "-f",
            file.to_str().unwrap(),
            "--interval-ms",
            "200",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("socklb-shim watch");
    let wait_until_reachable = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while reach(&sandbox, "10.96.0.20:80").is_err() {
            assert!(
                Instant::now() < deadline,
                "{what}: the VIP never became reachable"
            );
            sleep(Duration::from_millis(100));
        }
    };
    wait_until_reachable("first apply");

    // The agent dies and its datapath is removed: only a resync brings the
    // service back.
    agent.signal(Signal::SIGKILL);
    let detach = sandbox.agent_once(&["--detach"]);
    assert!(detach.status.success());
    assert_eq!(reach(&sandbox, "10.96.0.20:80"), Err(ENETUNREACH));
    let _agent = sandbox.start_agent(None);
    wait_until_reachable("after the agent restarted");

    // A change of the file is applied too.
    sandbox.table("t.yaml", &table_text().replace("10.96.0.20", "10.96.0.21"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while reach(&sandbox, "10.96.0.21:80").is_err() {
        assert!(Instant::now() < deadline, "the file change was not applied");
        sleep(Duration::from_millis(100));
    }
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn health_stats_and_metrics() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 2);
    let file = sandbox.table("t.yaml", &table_text());
    let _agent = sandbox.start_agent_with(Some(&file), &["--bpf-stats"]);
    for _ in 0..3 {
        assert!(reach(&sandbox, "10.96.0.20:80").is_ok());
    }
    assert_eq!(sandbox.client(&["tcp", "10.96.0.30:80"])[0]["errno"], 111);

    let health: Value =
        serde_json::from_str(&shim_ok(&sandbox, &["health", "-o", "json"])).unwrap();
    assert_eq!(health["status"], "SERVING");
    assert_eq!(health["api_version"], socklb_protocols::API_VERSION);
    assert_eq!(health["hooks_attached"].as_array().unwrap().len(), 10);

    let stats: Value = serde_json::from_str(&shim_ok(&sandbox, &["stats", "-o", "json"])).unwrap();
    let service = |vip: &str| {
        stats["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["key"]["vip"] == vip)
            .cloned()
            .unwrap()
    };
    assert_eq!(service("10.96.0.20")["translations"], "3", "{stats}");
    assert_eq!(service("10.96.0.30")["rejects"], "1", "{stats}");
    let connect4 = stats["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hook"] == "connect4")
        .unwrap();
    assert!(
        connect4["runCount"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 4,
        "{connect4}"
    );

    let metrics = shim_ok(&sandbox, &["metrics"]);
    assert!(
        metrics.contains(
            r#"socklb_service_translations_total{vip="10.96.0.20",port="80",protocol="TCP"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "socklb_map_entries{{map=\"{}\"}} 4",
            socklb_common::map_names::SERVICES
        )),
        "{metrics}"
    );
    // Every translation stored its reverse entry.
    assert!(
        metrics.contains(
            r#"socklb_service_insert_failures_total{vip="10.96.0.20",port="80",protocol="TCP"} 0"#
        ),
        "{metrics}"
    );
    let human = shim_ok(&sandbox, &["stats"]);
    assert!(
        human.contains("10.96.0.20:80/TCP") && human.contains("connect4"),
        "{human}"
    );
}

/// A table at the datapath's capacity: 65,536 services of 4 backends each
/// (262,144 backends), all served by the sandbox's four backend hosts.
fn table_at_capacity() -> Table {
    let backends: Vec<std::net::SocketAddr> = (1..=4)
        .map(|n| format!("{}:8080", backend_ip(n)).parse().unwrap())
        .collect();
    let services = (0..65_536u32)
        .map(|i| Service {
            name: Some(format!("load/svc-{i}")),
            key: ServiceKey {
                vip: std::net::Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8).into(),
                port: 80,
                protocol: socklb_table::Protocol::Tcp,
            },
            vip_kind: VipKind::Cluster,
            affinity_timeout_secs: None,
            backends: backends.clone(),
        })
        .collect();
    Table::new(services).unwrap()
}

fn raw_services_client(sandbox: &Sandbox, runtime: &tokio::runtime::Runtime) -> ServicesClient {
    let AgentAddr::Unix(path) = sandbox.api_addr().parse().unwrap() else {
        unreachable!()
    };
    runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(path).await.unwrap();
        ServicesClient::new(ttrpc::r#async::Client::new(
            ttrpc::r#async::transport::Socket::new(stream),
        ))
    })
}

#[test]
fn a_table_at_capacity_syncs_in_parts_and_lists_in_pages() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    start_backends(&sandbox, 4);
    let _agent = sandbox.start_agent(None);
    let runtime = runtime();
    let mut client = agent_client(
        &sandbox.api_addr(),
        Options {
            connect_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(120),
            ..Options::default()
        },
    );
    let table = table_at_capacity();
    let request_bytes = protobuf::Message::compute_size(&api::SyncRequest {
        services: table.to_api(),
        ..Default::default()
    });
    assert!(
        request_bytes as usize > socklb_protocols::TTRPC_MESSAGE_LIMIT,
        "the table must not fit one message: {request_bytes} bytes"
    );

    let started = Instant::now();
    let written = runtime.block_on(client.sync(table.clone())).unwrap();
    let sync_time = started.elapsed();
    assert_eq!(written.services, 65_536);
    assert_eq!(written.digest, Some(table.digest()));
    let started = Instant::now();
    let (generation, listed, digest) = runtime.block_on(client.list()).unwrap();
    let list_time = started.elapsed();
    assert_eq!(generation, written.generation);
    assert_eq!(digest, table.digest());
    assert_eq!(sorted(listed), sorted(table.clone()));
    eprintln!(
        "sync of 65536 services x 4 backends ({request_bytes} bytes): {sync_time:?}; list: {list_time:?}"
    );
    assert!(
        reach(&sandbox, "10.96.255.255:80")
            .unwrap()
            .starts_with('b')
    );

    // A huge Sync whose last service is invalid is refused at that part and
    // changes nothing; its commit finds no sync.
    let raw = raw_services_client(&sandbox, &runtime);
    let context = || ttrpc::context::with_duration(Duration::from_secs(60));
    let mut services: Vec<api::Service> = table.to_api();
    for service in &mut services {
        service.backends.truncate(1);
    }
    services.last_mut().unwrap().backends[0].port = 0;
    let sync_id = runtime
        .block_on(raw.sync_begin(
            context(),
            &api::SyncBeginRequest {
                generation: 99,
                services: services.len() as u32,
                backends: services.len() as u64,
                ..Default::default()
            },
        ))
        .unwrap()
        .sync_id;
    let (first, second) = services.split_at(services.len() / 2);
    for (index, part) in [first, second].into_iter().enumerate() {
        let outcome = runtime.block_on(raw.sync_part(
            context(),
            &api::SyncPartRequest {
                sync_id,
                index: index as u32,
                services: part.to_vec(),
                ..Default::default()
            },
        ));
        match (index, outcome) {
            (0, Ok(staged)) => assert_eq!(staged.staged, 32_768),
            (1, Err(ttrpc::Error::RpcStatus(status))) => {
                assert_eq!(status.code(), Code::INVALID_ARGUMENT);
                assert!(
                    status.message.contains("services[65535]")
                        && status.message.contains("backends[0].port"),
                    "{}",
                    status.message
                );
            }
            (index, outcome) => panic!("part {index}: {outcome:?}"),
        }
    }
    let commit = runtime.block_on(raw.sync_commit(
        context(),
        &api::SyncCommitRequest {
            sync_id,
            digest: table.digest(),
            ..Default::default()
        },
    ));
    assert!(
        matches!(&commit, Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::ABORTED),
        "{commit:?}"
    );
    // A sync abandoned half way (begun, one part, no commit) changes nothing
    // either, and one beyond capacity is refused at its beginning.
    let sync_id = runtime
        .block_on(raw.sync_begin(
            context(),
            &api::SyncBeginRequest {
                generation: 100,
                services: 1,
                backends: 0,
                ..Default::default()
            },
        ))
        .unwrap()
        .sync_id;
    runtime
        .block_on(raw.sync_part(
            context(),
            &api::SyncPartRequest {
                sync_id,
                services: vec![Service {
                    name: None,
                    key: table.services[0].key,
                    vip_kind: VipKind::Cluster,
                    affinity_timeout_secs: None,
                    backends: Vec::new(),
                }
                .to_api()],
                ..Default::default()
            },
        ))
        .unwrap();
    let over = runtime.block_on(raw.sync_begin(
        context(),
        &api::SyncBeginRequest {
            services: 65_537,
            ..Default::default()
        },
    ));
    assert!(
        matches!(&over, Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::RESOURCE_EXHAUSTED
            && s.message.contains("65537 services")),
        "{over:?}"
    );
    let (generation, listed, digest) = runtime.block_on(client.list()).unwrap();
    assert_eq!(generation, written.generation);
    assert_eq!(digest, table.digest());
    assert_eq!(listed.services.len(), 65_536);
    assert!(reach(&sandbox, "10.96.0.0:80").unwrap().starts_with('b'));
}

#[test]
fn a_request_over_the_message_limit_is_no_unreachable_agent() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    let _agent = sandbox.start_agent(None);
    let runtime = runtime();
    let mut client = client(&sandbox);
    let services = table_at_capacity().services;
    let err = runtime.block_on(client.upsert(services)).unwrap_err();
    assert!(
        matches!(err, ClientError::TooLarge { .. }),
        "expected TooLarge, got {err}"
    );
    assert!(
        err.to_string().contains("an Upsert of 65536 services"),
        "{err}"
    );
    // The connection is still good.
    assert!(runtime.block_on(client.list()).is_ok());
}

#[test]
fn a_write_expecting_another_generation_is_refused() {
    socklb_tests::require_root!();
    let sandbox = Sandbox::create();
    let file = sandbox.table("t.yaml", &table_text());
    let _agent = sandbox.start_agent(Some(&file));
    let runtime = runtime();
    let mut client = client(&sandbox);
    let table = Table::from_file(&file).unwrap();
    let synced = runtime.block_on(client.sync(table.clone())).unwrap();
    // The client's own writes carry the generation it knows and land.
    let mut late = table.services[0].clone();
    late.backends.truncate(1);
    let written = runtime
        .block_on(client.upsert(vec![table.services[0].clone()]))
        .unwrap();
    assert_eq!(written.generation, synced.generation + 1);

    // A write sent before that one and run after it (a delayed RPC)
    // expects a generation the table has left: refused, nothing changes.
    let raw = raw_services_client(&sandbox, &runtime);
    let context = || ttrpc::context::with_duration(Duration::from_secs(10));
    let upsert = |expected| api::UpsertRequest {
        services: vec![late.to_api()],
        expected_generation: expected,
        ..Default::default()
    };
    let refused = runtime
        .block_on(raw.upsert(context(), &upsert(synced.generation)))
        .unwrap_err();
    assert!(
        matches!(&refused, ttrpc::Error::RpcStatus(s) if s.code() == Code::FAILED_PRECONDITION
            && s.message.contains(&format!("at {}", written.generation))),
        "{refused:?}"
    );
    let delete = api::DeleteRequest {
        keys: vec![late.key.to_api()],
        expected_generation: synced.generation,
        ..Default::default()
    };
    assert!(runtime.block_on(raw.delete(context(), &delete)).is_err());
    let (generation, listed, _) = runtime.block_on(client.list()).unwrap();
    assert_eq!(generation, written.generation);
    assert_eq!(sorted(listed), sorted(table));
    // The same write expecting the current generation lands.
    let behind_the_client = runtime
        .block_on(raw.upsert(context(), &upsert(written.generation)))
        .unwrap();

    // That write moved the table past the generation the client knows, so
    // the client's next writes are refused: they expect what it knows.
    let refused = runtime
        .block_on(client.upsert(vec![late.clone()]))
        .unwrap_err();
    let at_the_others = format!("at {}", behind_the_client.generation);
    assert!(
        matches!(&refused, ClientError::Refused { code: Code::FAILED_PRECONDITION, message }
            if message.contains(&at_the_others)),
        "{refused}"
    );
    let refused = runtime.block_on(client.delete(vec![late.key])).unwrap_err();
    assert_eq!(refused.code(), Some(Code::FAILED_PRECONDITION), "{refused}");
    let (generation, _, _) = runtime.block_on(client.list()).unwrap();
    assert_eq!(generation, behind_the_client.generation);
}
