//! The node daemon's HTTP, with hyper: GET over a unix socket (Kata's shim
//! management socket, the daemon's own status socket) and a small server
//! for the status socket and the metrics port.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::UnixStream,
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

/// Serves HTTP/1.1 on one accepted connection until the peer closes it.
pub fn serve_connection<S>(stream: S, handler: Handler)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
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
        // A peer that goes away mid-request is its own problem.
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixListener;

    use super::*;

    fn serve(listener: UnixListener) {
        let handler: Handler = Arc::new(|path| match path {
            "/agent-url" => Reply::ok("text/plain", "vsock://3:1024".into()),
            other => Reply::not_found(other),
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serve_connection(stream, handler.clone());
            }
        });
    }

    #[tokio::test]
    async fn gets_bodies_and_names_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shim-monitor.sock");
        serve(UnixListener::bind(&socket).unwrap());
        let timeout = Duration::from_secs(5);
        assert_eq!(
            get_unix(&socket, "/agent-url", timeout).await.unwrap(),
            "vsock://3:1024"
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
}
