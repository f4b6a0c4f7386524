//! CancelRequest: asks the server to stop what a session is running, on a
//! connection of its own. Used by the `Cancel` RPC and when a connection
//! is closed with a query still running (closing the socket alone leaves
//! the backend running it until it next writes).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends the CancelRequest for the session `pid`/`secret` at `endpoint`,
/// and waits (within `timeout`) for the server to close the connection,
/// which it does once the request is handled.
pub(crate) async fn send(
    endpoint: SocketAddr,
    pid: i32,
    secret: i32,
    timeout: Duration,
) -> std::io::Result<()> {
    let send = async {
        let mut stream = tokio::net::TcpStream::connect(endpoint).await?;
        let mut message = bytes::BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(pid, secret, &mut message);
        stream.write_all(&message).await?;
        let mut sink = [0u8; 64];
        while stream.read(&mut sink).await? > 0 {}
        Ok(())
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
