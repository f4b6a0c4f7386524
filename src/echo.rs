//! A small TCP echo upstream, for `lessor demo` and `lessor-bench`: the
//! upstream they need when no real one is around. Each read is written back;
//! a read starting with `SLOW` is answered after a pause, so a client that
//! releases at once leaves a reply in flight.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running echo server; stops (and closes its connections) when `stop`
/// fires. Its tasks live on the tracker given to [`EchoServer::start`].
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl EchoServer {
    /// Binds `127.0.0.1:0` and serves on `tracker` until `stop`.
    pub async fn start(
        slow_reply: Duration,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tracker.spawn(accept_loop(listener, slow_reply, tracker.clone(), stop));
        Ok(Self { addr })
    }
}

async fn accept_loop(
    listener: TcpListener,
    slow: Duration,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let stop = stop.clone();
        tracker.spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = tokio::select! {
                    _ = stop.cancelled() => return,
                    read = stream.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    },
                };
                if buf[..n].starts_with(b"SLOW") {
                    tokio::time::sleep(slow).await;
                }
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}
