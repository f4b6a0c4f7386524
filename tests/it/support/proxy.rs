//! A TCP proxy whose connections a test can cut: both sides reset at once,
//! with no HTTP/2 goodbye (no RST_STREAM, no GOAWAY), as when a client pod
//! dies or a network path fails.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Forwards every connection it accepts to `target`. Stops when dropped.
pub struct CutProxy {
    addr: SocketAddr,
    cut: CancellationToken,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl CutProxy {
    /// Listens on a loopback port of its own and forwards to `target`.
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", super::ports::reserve()))
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let target: SocketAddr = target.parse().expect("a socket address");
        let (cut, stop, tracker) = (
            CancellationToken::new(),
            CancellationToken::new(),
            TaskTracker::new(),
        );
        let proxy = Self {
            addr,
            cut: cut.clone(),
            stop: stop.clone(),
            tracker: tracker.clone(),
        };
        let conns = tracker.clone();
        tracker.spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                };
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                conns.spawn(forward(client, server, cut.clone(), stop.clone()));
            }
        });
        proxy
    }

    /// `127.0.0.1:port` to connect to instead of the target.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Resets every connection made so far, on both sides.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.tracker.close();
    }
}

async fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    cut: CancellationToken,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = stop.cancelled() => {}
        _ = cut.cancelled() => {
            // Linger 0: close sends RST instead of FIN.
            for s in [&client, &server] {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
        }
    }
}
