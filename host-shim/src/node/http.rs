//! The node daemon's HTTP, with hyper: GET over a unix socket (Kata's shim
//! management socket, the daemon's own status socket) and a small server
//! for the status socket and the metrics port, with a bound on the
//! connections it serves at once and on how long each may take.

use std::{io, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use slog::{Logger, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

/// The largest answer read: an agent URL or a status report.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// `GET path` on the HTTP server behind the unix socket `socket`, with
/// `Host: shim` as Kata's own client sends; the body of a 200 answer.
pub async fn get_unix(socket: &Path, path: &str, timeout: Duration) -> Result<String> {
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, "shim")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|err| anyhow::anyhow!("reading the answer: {err}"))?
            .to_bytes();
        let body = String::from_utf8(body.to_vec()).context("the answer is not UTF-8")?;
        if status != StatusCode::OK {
            bail!("GET {path}: HTTP {status}: {}", body.trim());
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| {
            format!(
                "GET {path} on {}: no answer within {timeout:?}",
                socket.display()
            )
        })?
}

/// An answer of [`Handler`].
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: String) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type,
            body,
        }
    }

    /// 503 with the reason.
    pub fn unavailable(reason: String) -> Reply {
        Reply {
            status: StatusCode::SERVICE_UNAVAILABLE,
            content_type: "text/plain",
            body: reason,
        }
    }

    pub fn not_found(path: &str) -> Reply {
        Reply {
            status: StatusCode::NOT_FOUND,
            content_type: "text/plain",
            body: format!("no {path} here\n"),
        }
    }
}

/// Answers a GET of a path.
pub type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// What a server allows each of its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's backlog
    /// until one ends.
    pub connections: usize,
    /// For a request's head to arrive.
    pub header: Duration,
    /// For one connection in all, keep-alive included.
    pub lifetime: Duration,
}

impl Limits {
    /// The daemon's servers: probes, scrapes and people's queries, each
    /// a request or a few.
    pub const SERVER: Limits = Limits {
        connections: 64,
        header: Duration::from_secs(5),
        lifetime: Duration::from_secs(60),
    };
}

/// Where a server accepts its connections.
pub trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> io::Result<TcpStream> {
        Ok(self.accept().await?.0)
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> io::Result<UnixStream> {
        Ok(self.accept().await?.0)
    }
}

/// Serves every connection `listener` accepts, within `limits`, until the
/// task is dropped. A failed accept (out of file descriptors) is logged
/// and tried again a moment later.
pub async fn serve(listener: impl Accept, handler: Handler, limits: Limits, log: Logger) {
    let permits = Arc::new(Semaphore::new(limits.connections));
    loop {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the permits are never closed");
        match listener.accept_one().await {
            Ok(stream) => spawn_connection(stream, handler.clone(), limits, permit),
            Err(err) => {
                warn!(log, "accepting a connection failed"; "error" => err.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves HTTP/1.1 on one connection until the peer closes it or
/// `limits`' times run out; `permit` goes when the connection ends.
fn spawn_connection<S>(stream: S, handler: Handler, limits: Limits, permit: OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let service = service_fn(move |request: Request<Incoming>| {
            let reply = if request.method() == hyper::Method::GET {
                handler(request.uri().path())
            } else {
                Reply {
                    status: StatusCode::METHOD_NOT_ALLOWED,
                    content_type: "text/plain",
                    body: "GET only\n".into(),
                }
            };
            let response = Response::builder()
                .status(reply.status)
                .header(header::CONTENT_TYPE, reply.content_type)
                .body(Full::new(Bytes::from(reply.body)));
            std::future::ready(response)
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header)
            .serve_connection(TokioIo::new(stream), service);
        // A peer that goes away mid-request, or outstays its time, is its
        // own problem.
        let _ = tokio::time::timeout(limits.lifetime, connection).await;
    });
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::UnixListener,
    };

    use super::*;

    const AGENT_URL: &str = "vsock://3:1024";

    /// Kata's shim's `/agent-url` on `socket`, within `limits`.
    fn serve_agent_url(socket: &Path, limits: Limits) {
        let handler: Handler = Arc::new(|path| match path {
            "/agent-url" => Reply::ok("text/plain", AGENT_URL.into()),
            other => Reply::not_found(other),
        });
        let listener = UnixListener::bind(socket).unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        tokio::spawn(serve(listener, handler, limits, log));
    }

    #[tokio::test]
    async fn gets_bodies_and_names_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shim-monitor.sock");
        serve_agent_url(&socket, Limits::SERVER);
        let timeout = Duration::from_secs(5);
        assert_eq!(
            get_unix(&socket, "/agent-url", timeout).await.unwrap(),
            AGENT_URL
        );
        let err = get_unix(&socket, "/nope", timeout).await.unwrap_err();
        assert!(format!("{err:#}").contains("HTTP 404"), "{err:#}");
        let missing = dir.path().join("missing.sock");
        let err = get_unix(&missing, "/agent-url", timeout).await.unwrap_err();
        assert!(format!("{err:#}").contains("missing.sock"), "{err:#}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let held = tokio::spawn(async move { listener.accept().await });
        let err = get_unix(&socket, "/agent-url", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("no answer within"), "{err:#}");
        held.abort();
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("status.sock");
        let limits = Limits {
            connections: 4,
            header: Duration::from_millis(200),
            lifetime: Duration::from_secs(30),
        };
        serve_agent_url(&socket, limits);
        let mut idle = UnixStream::connect(&socket).await.unwrap();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "still open after 5 s");
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_for_one_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("status.sock");
        let limits = Limits {
            connections: 2,
            header: Duration::from_secs(30),
            lifetime: Duration::from_secs(30),
        };
        serve_agent_url(&socket, limits);
        let first = UnixStream::connect(&socket).await.unwrap();
        let _second = UnixStream::connect(&socket).await.unwrap();
        let third = {
            let socket = socket.clone();
            tokio::spawn(
                async move { get_unix(&socket, "/agent-url", Duration::from_secs(10)).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!third.is_finished(), "a third connection was served");
        drop(first);
        assert_eq!(third.await.unwrap().unwrap(), AGENT_URL);
    }

    #[tokio::test]
    async fn a_connection_is_served_no_longer_than_its_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("status.sock");
        let limits = Limits {
            connections: 4,
            header: Duration::from_secs(30),
            lifetime: Duration::from_millis(500),
        };
        serve_agent_url(&socket, limits);
        // A client that keeps its connection busy, a request every 100 ms.
        let mut busy = UnixStream::connect(&socket).await.unwrap();
        let keep_asking = async {
            let mut answers = 0;
            loop {
                let request = b"GET /agent-url HTTP/1.1\r\nHost: shim\r\n\r\n";
                if busy.write_all(request).await.is_err() {
                    return answers;
                }
                let mut answer = Vec::new();
                while !answer.ends_with(AGENT_URL.as_bytes()) {
                    let mut chunk = [0u8; 512];
                    match busy.read(&mut chunk).await {
                        Ok(0) | Err(_) => return answers,
                        Ok(n) => answer.extend_from_slice(&chunk[..n]),
                    }
                }
                answers += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let answers = tokio::time::timeout(Duration::from_secs(5), keep_asking).await;
        assert!(answers.is_ok(), "still served after 5 s");
        assert!(answers.unwrap() >= 1, "never answered");
    }
}
