//! CancelRequest: asks the server to stop what a session is running, on a
//! connection of its own. Used by the `Cancel` RPC and when a connection
//! is closed with a query still running (closing the socket alone leaves
//! the backend running it until it next writes). Over TLS when the
//! upstream uses TLS, as libpq does: a server with `hostssl`-only rules
//! refuses a plain one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::{Stream, Tls};

/// Sends the CancelRequest for the session `pid`/`secret` at `endpoint`
/// (through `tls` when the upstream has it), and waits (within `timeout`)
/// for the server to close the connection, which it does once the request
/// is handled.
pub(crate) async fn send(
    endpoint: SocketAddr,
    pid: i32,
    secret: i32,
    timeout: Duration,
    tls: Option<Arc<Tls>>,
) -> std::io::Result<()> {
    let send = async {
        let mut tcp = tokio::net::TcpStream::connect(endpoint).await?;
        tcp.set_nodelay(true)?;
        let mut stream = match &tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let name = tls.server_name(&endpoint.to_string(), endpoint.ip());
                if !super::handshake::request_tls(&mut tcp).await? {
                    return Err(std::io::Error::other(tls.refused(&name)));
                }
                tls.handshake(tcp, &name)
                    .await
                    .map_err(std::io::Error::other)?
                    .0
            }
        };
        let mut message = bytes::BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(pid, secret, &mut message);
        stream.write_all(&message).await?;
        stream.flush().await?;
        let mut sink = [0u8; 64];
        loop {
            match stream.read(&mut sink).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // The server closes without TLS's close_notify: that close
                // is the answer all the same.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout(timeout, send)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ))
        })
}
