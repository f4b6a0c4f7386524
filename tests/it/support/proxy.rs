//! A fault-injecting TCP proxy for tests: put it between lessor and an
//! upstream (or a client and lessor) and make the path slow, narrow, silent,
//! one-way or short-lived, or reset it, while both ends stay real.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the proxy does to the bytes it carries, from the moment it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Hold every chunk this long before forwarding it.
    Latency(Duration),
    /// Forward at most this many bytes per second each way.
    Bandwidth(usize),
    /// Accept, read and drop everything, answer nothing, close nothing: a
    /// peer that vanished without a word.
    Blackhole,
    /// Forward toward the target only; what it sends back is dropped.
    HalfOpen,
    /// Close both sides (FIN) once this many bytes went through in all.
    CloseAfter(usize),
}

/// Forwards every connection it accepts to `target`. Stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    /// Resets every connection made so far.
    cut: CancellationToken,
    stop: CancellationToken,
    tracker: TaskTracker,
    /// Bytes forwarded, both ways, every connection.
    forwarded: Arc<AtomicUsize>,
}

/// The name the client-side tests use: their fault is the cut.
pub type CutProxy = FaultProxy;

impl FaultProxy {
    /// Listens on a loopback port of its own and forwards to `target`.
    pub async fn start(target: &str) -> Self {
        let listener = super::ports::bind("127.0.0.1").await;
        let addr = listener.local_addr().unwrap();
        let target: SocketAddr = target.parse().expect("a socket address");
        let proxy = Self {
            addr,
            fault: watch::Sender::new(Fault::Pass),
            cut: CancellationToken::new(),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            forwarded: Arc::default(),
        };
        let (fault, cut, stop, forwarded) = (
            proxy.fault.clone(),
            proxy.cut.clone(),
            proxy.stop.clone(),
            proxy.forwarded.clone(),
        );
        let conns = proxy.tracker.clone();
        proxy.tracker.spawn(async move {
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
                let link = Link {
                    fault: fault.subscribe(),
                    forwarded: forwarded.clone(),
                };
                conns.spawn(link.run(client, server, cut.clone(), stop.clone()));
            }
        });
        proxy
    }

    /// `127.0.0.1:port` to connect to instead of the target.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Changes what happens to bytes on every connection, now and new.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Resets (RST) every connection made so far, on both sides.
    pub fn cut(&self) {
        self.cut.cancel();
    }

    /// Bytes forwarded so far, both ways.
    pub fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.tracker.close();
    }
}

/// One proxied connection's shared state.
struct Link {
    fault: watch::Receiver<Fault>,
    forwarded: Arc<AtomicUsize>,
}

impl Link {
    async fn run(
        self,
        client: TcpStream,
        server: TcpStream,
        cut: CancellationToken,
        stop: CancellationToken,
    ) {
        let sockets = [
            socket2::SockRef::from(&client).try_clone().ok(),
            socket2::SockRef::from(&server).try_clone().ok(),
        ];
        let (client_rd, client_wr) = client.into_split();
        let (server_rd, server_wr) = server.into_split();
        let closed = CancellationToken::new();
        let up = self.pump(client_rd, server_wr, true, closed.clone());
        let down = self.pump(server_rd, client_wr, false, closed.clone());
        tokio::select! {
            _ = async { tokio::join!(up, down) } => {}
            _ = stop.cancelled() => {}
            _ = cut.cancelled() => {
                // Linger 0: the close sends RST instead of FIN.
                for s in sockets.iter().flatten() {
                    let _ = s.set_linger(Some(Duration::ZERO));
                }
            }
        }
    }

    /// Forwards one direction (`toward_target`: client to target) until
    /// either side closes, applying the current fault to every chunk.
    async fn pump(
        &self,
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        toward_target: bool,
        closed: CancellationToken,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::select! {
                _ = closed.cancelled() => return,
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => {
                        let _ = to.shutdown().await;
                        return;
                    }
                    Ok(n) => n,
                },
            };
            let fault = *self.fault.borrow();
            match fault {
                Fault::Pass => {}
                Fault::Latency(d) => tokio::time::sleep(d).await,
                Fault::Bandwidth(per_second) => {
                    let secs = n as f64 / per_second.max(1) as f64;
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                }
                Fault::Blackhole => continue,
                Fault::HalfOpen if !toward_target => continue,
                Fault::HalfOpen => {}
                Fault::CloseAfter(limit) => {
                    let before = self.forwarded.load(Ordering::SeqCst);
                    if before + n > limit {
                        let room = limit.saturating_sub(before);
                        let _ = to.write_all(&buf[..room]).await;
                        self.forwarded.fetch_add(room, Ordering::SeqCst);
                        closed.cancel();
                        return;
                    }
                }
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
            self.forwarded.fetch_add(n, Ordering::SeqCst);
        }
    }
}
