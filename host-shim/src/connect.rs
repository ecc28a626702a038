//! Opening a byte stream to the agent.

use std::io;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};
use ttrpc::r#async::transport::Socket;

use crate::addr::AgentAddr;

/// The longest reply line the hybrid vsock handshake is allowed.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Connects to `addr` and returns a socket ready for ttrpc.
pub async fn connect(addr: &AgentAddr) -> io::Result<Socket> {
    match addr {
        AgentAddr::Unix(path) => Ok(Socket::new(UnixStream::connect(path).await?)),
        AgentAddr::Vsock { cid, port } => {
            let stream =
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?;
            Ok(Socket::new(stream))
        }
        AgentAddr::HybridVsock { uds, port } => {
            let mut stream = UnixStream::connect(uds).await?;
            hybrid_handshake(&mut stream, *port).await?;
            Ok(Socket::new(stream))
        }
    }
}

/// Hybrid vsock: send `CONNECT <port>\n` and read the reply a byte at a time
/// up to its newline, so no byte of the agent's stream is consumed here.
/// The reply is `OK <host port>\n`; anything else means the guest port is
/// not listening (yet).
pub async fn hybrid_handshake<S>(stream: &mut S, port: u32) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await.map_err(|err| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("hybrid vsock: connection closed before OK (guest port {port} not listening?): {err}"),
            )
        })?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hybrid vsock: reply line too long",
            ));
        }
    }
    let line = String::from_utf8_lossy(&line);
    if line.starts_with("OK ") {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock: expected \"OK <port>\", got {line:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_consumes_only_the_reply_line() {
        let (mut host, mut muxer) = tokio::io::duplex(256);
        let muxer_side = tokio::spawn(async move {
            let mut request = [0u8; 13];
            muxer.read_exact(&mut request).await.unwrap();
            assert_eq!(&request, b"CONNECT 1025\n");
            // The reply and the agent's first bytes arrive together.
            muxer.write_all(b"OK 1073741824\nAGENT").await.unwrap();
            muxer
        });
        hybrid_handshake(&mut host, 1025).await.unwrap();
        let mut rest = [0u8; 5];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"AGENT");
        drop(muxer_side.await.unwrap());
    }

    #[tokio::test]
    async fn refused_and_closed_handshakes_fail() {
        let (mut host, mut muxer) = tokio::io::duplex(256);
        tokio::spawn(async move {
            let mut request = [0u8; 13];
            muxer.read_exact(&mut request).await.unwrap();
            muxer.write_all(b"ERR no listener\n").await.unwrap();
        });
        let err = hybrid_handshake(&mut host, 1025).await.unwrap_err();
        assert!(err.to_string().contains("ERR no listener"), "{err}");

        let (mut host, muxer) = tokio::io::duplex(256);
        drop(muxer);
        assert!(hybrid_handshake(&mut host, 1025).await.is_err());
    }
}
