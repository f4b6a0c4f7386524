//! A real TCP upstream for tests: echoes by default, and on demand goes
//! silent, delays replies, closes or resets its connections, writes bytes
//! nobody asked for, or stops listening and comes back on the same port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the upstream answers what it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Write back what was read.
    Echo,
    /// Read and never answer.
    Silent,
    /// Echo after a pause.
    Delay(Duration),
    /// On the first read, write this many bytes back (as fast as the peer
    /// takes them).
    Blast(usize),
    /// Never read: the peer's writes back up into its socket buffers.
    Deaf,
}

#[derive(Debug)]
enum Cmd {
    Close,
    Reset,
    Inject(Vec<u8>),
}

#[derive(Default)]
struct Shared {
    conns: Mutex<Vec<mpsc::UnboundedSender<Cmd>>>,
    accepted: AtomicUsize,
    open: AtomicUsize,
    /// Bytes written to peers in Blast mode.
    blasted: AtomicUsize,
}

/// The upstream server. Stops everything when dropped.
pub struct TestUpstream {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    /// Cancels the accept loop only (stop/start).
    listening: Mutex<CancellationToken>,
    /// Cancels every task (drop).
    all: CancellationToken,
}

impl TestUpstream {
    /// An echo server on a free loopback port.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    /// An echo server on `addr` (e.g. `127.0.0.2:PORT`: the loopback network
    /// is a /8, so several endpoints can share a port).
    pub async fn start_on(addr: &str) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let all = CancellationToken::new();
        let up = Self {
            addr,
            mode: watch::Sender::new(Mode::Echo),
            shared: Arc::default(),
            tracker: TaskTracker::new(),
            listening: Mutex::new(all.child_token()),
            all,
        };
        up.serve(listener);
        up
    }

    /// `host:port` for configs.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Bytes written so far in `Mode::Blast`.
    pub fn blasted(&self) -> usize {
        self.shared.blasted.load(Ordering::SeqCst)
    }

    /// Changes how every connection answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes (FIN) every open connection; keeps listening.
    pub fn close_all(&self) {
        self.broadcast(|| Cmd::Close);
    }

    /// Resets (RST) every open connection; keeps listening.
    pub fn reset_all(&self) {
        self.broadcast(|| Cmd::Reset);
    }

    /// Writes `bytes` on every open connection, unasked.
    pub fn inject(&self, bytes: &[u8]) {
        self.broadcast(|| Cmd::Inject(bytes.to_vec()));
    }

    /// Stops listening (dials are refused) and closes every connection.
    pub fn stop(&self) {
        self.listening.lock().unwrap().cancel();
        self.close_all();
    }

    /// Listens again on the same port.
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind upstream");
        *self.listening.lock().unwrap() = self.all.child_token();
        self.serve(listener);
    }

    fn broadcast(&self, cmd: impl Fn() -> Cmd) {
        let mut conns = self.shared.conns.lock().unwrap();
        conns.retain(|tx| tx.send(cmd()).is_ok());
    }

    fn serve(&self, listener: TcpListener) {
        let stop = self.listening.lock().unwrap().clone();
        let shared = self.shared.clone();
        let mode = self.mode.subscribe();
        let tracker = self.tracker.clone();
        let all = self.all.clone();
        self.tracker.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let (tx, rx) = mpsc::unbounded_channel();
                shared.conns.lock().unwrap().push(tx);
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                shared.open.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                let mode = mode.clone();
                let all = all.clone();
                tracker.spawn(async move {
                    tokio::select! {
                            _ = all.cancelled() => {}
                        _ = connection(stream, rx, mode, &shared) => {}
                    }
                    shared.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.all.cancel();
    }
}

async fn connection(
    mut stream: TcpStream,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    mut mode: watch::Receiver<Mode>,
    shared: &Shared,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let deaf = *mode.borrow() == Mode::Deaf;
        tokio::select! {
            Ok(()) = mode.changed() => continue,
            cmd = cmds.recv() => match cmd {
                None | Some(Cmd::Close) => return,
                Some(Cmd::Reset) => {
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    return;
                }
                Some(Cmd::Inject(bytes)) => {
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            },
            read = stream.read(&mut buf), if !deaf => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let current = *mode.borrow();
                match current {
                    Mode::Echo | Mode::Deaf => {}
                    Mode::Silent => continue,
                    Mode::Delay(d) => tokio::time::sleep(d).await,
                    Mode::Blast(total) => {
                        let block = vec![b'b'; 16 * 1024];
                        let mut left = total;
                        while left > 0 {
                            let n = left.min(block.len());
                            if stream.write_all(&block[..n]).await.is_err() {
                                return;
                            }
                            shared.blasted.fetch_add(n, Ordering::SeqCst);
                            left -= n;
                        }
                        continue;
                    }
                }
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
