//! The client against agents that misbehave on purpose.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use socklb_protocols::socklb_ttrpc;
use ttrpc::r#async::{Server, TtrpcContext};

use super::*;

/// Answers Health with another API major, counting Version calls.
struct NewerAgent {
    versions_asked: Arc<AtomicU32>,
}

#[async_trait::async_trait]
impl socklb_ttrpc::Health for NewerAgent {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _: api::CheckRequest,
    ) -> ttrpc::Result<api::CheckResponse> {
        Ok(api::CheckResponse::new())
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _: api::VersionRequest,
    ) -> ttrpc::Result<api::VersionResponse> {
        self.versions_asked.fetch_add(1, Ordering::SeqCst);
        Ok(api::VersionResponse {
            api_version: "2.0".into(),
            ..Default::default()
        })
    }
}

/// An API 1.2 agent whose second Sync fails (as a kernel error half way
/// would), counting Syncs.
struct SecondSyncFails {
    syncs: Arc<AtomicU32>,
}

#[async_trait::async_trait]
impl socklb_ttrpc::Health for SecondSyncFails {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _: api::CheckRequest,
    ) -> ttrpc::Result<api::CheckResponse> {
        Ok(api::CheckResponse {
            status: Status::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _: api::VersionRequest,
    ) -> ttrpc::Result<api::VersionResponse> {
        Ok(api::VersionResponse {
            api_version: API_VERSION.into(),
            ..Default::default()
        })
    }
}

#[async_trait::async_trait]
impl socklb_ttrpc::Services for SecondSyncFails {
    async fn sync(
        &self,
        _ctx: &TtrpcContext,
        request: api::SyncRequest,
    ) -> ttrpc::Result<api::WriteResponse> {
        if self.syncs.fetch_add(1, Ordering::SeqCst) == 1 {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::INTERNAL,
                "writing the table failed half way",
            )));
        }
        Ok(api::WriteResponse {
            generation: request.generation,
            digest: Table::from_api(&request.services).unwrap().digest(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        Ok(api::StatsResponse::new())
    }
}

fn serve(socket: &std::path::Path, agent: Arc<SecondSyncFails>) -> Server {
    let _ = std::fs::remove_file(socket);
    let mut services = socklb_ttrpc::create_health(agent.clone());
    services.extend(socklb_ttrpc::create_services(agent));
    Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .unwrap()
        .register_service(services)
}

#[tokio::test]
async fn a_failed_resync_is_tried_again_on_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let syncs = Arc::new(AtomicU32::new(0));
    let agent = Arc::new(SecondSyncFails {
        syncs: syncs.clone(),
    });
    let mut server = serve(&socket, agent.clone());
    server.start().await.unwrap();
    let addr = format!("unix://{}", socket.display()).parse().unwrap();
    let log = Logger::root(slog::Discard, slog::o!());
    let options = Options {
        connect_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    let mut client = AgentClient::new(addr, options, &log);
    client.sync(Table::default()).await.unwrap();

    // The agent restarts: the client reconnects and its resync fails.
    server.shutdown().await.unwrap();
    let mut server = serve(&socket, agent);
    server.start().await.unwrap();
    let err = client.stats().await.unwrap_err();
    assert!(matches!(err, ClientError::Refused { .. }), "{err}");
    assert_eq!(syncs.load(Ordering::SeqCst), 2);
    // The next call syncs again before it goes on.
    client.stats().await.unwrap();
    assert_eq!(
        syncs.load(Ordering::SeqCst),
        3,
        "the failed resync was not retried"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_incompatible_agent_is_an_error_at_once_not_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let versions_asked = Arc::new(AtomicU32::new(0));
    let health = socklb_ttrpc::create_health(Arc::new(NewerAgent {
        versions_asked: versions_asked.clone(),
    }));
    let mut server = Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .unwrap()
        .register_service(health);
    server.start().await.unwrap();

    let addr = format!("unix://{}", socket.display()).parse().unwrap();
    let log = Logger::root(slog::Discard, slog::o!());
    let mut client = AgentClient::new(addr, Options::default(), &log);
    let err = client.check().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Incompatible { got } if got == "2.0"),
        "{err}"
    );
    assert_eq!(versions_asked.load(Ordering::SeqCst), 1, "retried: {err}");
    server.shutdown().await.unwrap();
}

/// The `in_ms` of every "retrying" record: the waits the client chose
/// between attempts, as it logged them.
#[derive(Clone, Default)]
struct RetryWaits(Arc<std::sync::Mutex<Vec<u64>>>);

impl slog::Drain for RetryWaits {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        struct InMs(Option<u64>);
        impl slog::Serializer for InMs {
            fn emit_arguments(
                &mut self,
                key: slog::Key,
                value: &std::fmt::Arguments,
            ) -> slog::Result {
                if key == "in_ms" {
                    self.0 = value.to_string().parse().ok();
                }
                Ok(())
            }
        }
        if record.msg().to_string().contains("retrying") {
            let mut in_ms = InMs(None);
            let _ = slog::KV::serialize(&record.kv(), record, &mut in_ms);
            self.0.lock().unwrap().extend(in_ms.0);
        }
        Ok(())
    }
}

/// The reconnect backoff doubles up to its cap: an endpoint that accepts
/// and hangs up at once (never a working agent) sees the client wait 50,
/// 100, 200 ms, then 400 ms between attempts until the connect timeout.
/// The waits are read from the client's own records, so a busy machine's
/// delays cannot hide a wrong cap; the attempts' times only show that each
/// wait was kept.
#[tokio::test]
async fn reconnects_back_off_doubling_up_to_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let attempts = std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let mut at = Vec::new();
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(4) {
            match listener.accept() {
                Ok((stream, _)) => {
                    at.push(std::time::Instant::now());
                    drop(stream);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        at
    });

    let addr = format!("unix://{}", socket.display()).parse().unwrap();
    let waits = RetryWaits::default();
    let log = Logger::root(waits.clone(), slog::o!());
    let options = Options {
        call_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(3),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        fail_fast: false,
    };
    let mut client = AgentClient::new(addr, options, &log);
    let err = client.check().await.unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");

    let at = attempts.join().unwrap();
    let gaps_ms: Vec<u128> = at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    let waits_ms = waits.0.lock().unwrap().clone();
    // 0.05 + 0.1 + 0.2 + 0.4 s in, the waits are at the cap; one more
    // at least fits in 3 s however slow the machine.
    let doubling_to_the_cap = [50, 100, 200, 400, 400, 400, 400, 400, 400];
    assert!(
        waits_ms.len() >= 5 && doubling_to_the_cap.starts_with(&waits_ms),
        "waits {waits_ms:?} ms, expected {doubling_to_the_cap:?} ms"
    );
    assert_eq!(
        at.len(),
        waits_ms.len() + 1,
        "attempts {gaps_ms:?} ms apart, waits {waits_ms:?}"
    );
    // Each gap is at least its wait (less the accept loop's 1 ms polling).
    for (gap, wait) in gaps_ms.iter().zip(&waits_ms) {
        assert!(
            *gap + 2 >= u128::from(*wait),
            "attempts {gaps_ms:?} ms apart, waits {waits_ms:?} ms"
        );
    }
}

/// An agent whose first Stats runs out of the call's deadline in its
/// ttrpc server, counting Stats calls.
struct FirstStatsTimesOut {
    stats: Arc<AtomicU32>,
}

#[async_trait::async_trait]
impl socklb_ttrpc::Health for FirstStatsTimesOut {
    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _: api::VersionRequest,
    ) -> ttrpc::Result<api::VersionResponse> {
        Ok(api::VersionResponse {
            api_version: API_VERSION.into(),
            ..Default::default()
        })
    }
}

#[async_trait::async_trait]
impl socklb_ttrpc::Services for FirstStatsTimesOut {
    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        if self.stats.fetch_add(1, Ordering::SeqCst) == 0 {
            // What ttrpc's server answers when a handler outlives the
            // request's timeout.
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::DEADLINE_EXCEEDED,
                "timeout",
            )));
        }
        Ok(api::StatsResponse::new())
    }
}

/// The agent's server running out of a call's deadline is the client's own
/// timeout (which of the two ends first is a race): the call is tried
/// again on a new connection, not taken for a refusal.
#[tokio::test]
async fn a_deadline_the_agent_ran_out_of_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let stats = Arc::new(AtomicU32::new(0));
    let agent = Arc::new(FirstStatsTimesOut {
        stats: stats.clone(),
    });
    let mut services = socklb_ttrpc::create_health(agent.clone());
    services.extend(socklb_ttrpc::create_services(agent));
    let mut server = Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .unwrap()
        .register_service(services);
    server.start().await.unwrap();
    let addr = format!("unix://{}", socket.display()).parse().unwrap();
    let log = Logger::root(slog::Discard, slog::o!());
    let mut client = AgentClient::new(addr, Options::default(), &log);
    client.stats().await.unwrap();
    assert_eq!(stats.load(Ordering::SeqCst), 2);
    assert_eq!(client.connections_opened(), 2, "not a new connection");
    server.shutdown().await.unwrap();
}

/// A missing socket is final for a one-shot caller (`fail_fast`), while a
/// daemon's client keeps trying for its whole connect timeout, since the
/// socket may yet appear.
#[tokio::test]
async fn a_missing_socket_ends_a_fail_fast_call_at_once_and_a_daemon_waits() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let log = Logger::root(slog::Discard, slog::o!());
    let client = |fail_fast| {
        let addr = format!("unix://{}", socket.display()).parse().unwrap();
        let options = Options {
            connect_timeout: Duration::from_millis(600),
            fail_fast,
            ..Options::default()
        };
        AgentClient::new(addr, options, &log)
    };

    let started = std::time::Instant::now();
    let err = client(true).check().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "took {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("no socket at {}", socket.display())),
        "{text}"
    );

    // Retries 50, 100 and 200 ms apart fit in 600 ms; the next, 400 ms
    // on, would not.
    let started = std::time::Instant::now();
    let err = client(false).check().await.unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "gave up after {:?}: {err}",
        started.elapsed()
    );
}
