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
    /// On the first read, write this many bytes back (as fast as the peer
    /// takes them).
    Blast(usize),
    /// Never read: the peer's writes back up into its socket buffers.
    Deaf,
    /// Echo, but only once [`TestUpstream::open_gate`] is called: a reply
    /// that is late for as long as a test needs, without a timer.
    Gated,
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
    /// Bytes read from peers.
    received: AtomicUsize,
}

/// The upstream server. Stops everything when dropped.
pub struct TestUpstream {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Holds `Mode::Gated` replies while false.
    gate: watch::Sender<bool>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    /// Cancels the accept loop only (stop/start).
    listening: Mutex<CancellationToken>,
    /// True while a listening socket is open.
    listening_now: watch::Sender<bool>,
    /// Cancels every task (drop).
    all: CancellationToken,
}

impl TestUpstream {
    /// An echo server on a loopback port of its own (one `restart` can
    /// bind again: see `ports`).
    pub async fn start() -> Self {
        Self::serving(super::ports::bind("127.0.0.1").await)
    }

    /// An echo server on `addr` (e.g. `127.0.0.2:PORT`: the loopback network
    /// is a /8, so several endpoints can share a port).
    pub async fn start_on(addr: &str) -> Self {
        Self::serving(TcpListener::bind(addr).await.expect("bind upstream"))
    }

    fn serving(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let all = CancellationToken::new();
        let up = Self {
            addr,
            mode: watch::Sender::new(Mode::Echo),
            gate: watch::Sender::new(false),
            shared: Arc::default(),
            tracker: TaskTracker::new(),
            listening: Mutex::new(all.child_token()),
            listening_now: watch::Sender::new(false),
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

    /// Bytes read from every connection so far.
    pub fn received(&self) -> usize {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// Lets `Mode::Gated` replies go.
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
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
    pub async fn stop(&self) {
        self.stop_listening().await;
        self.close_all();
    }

    /// Stops listening (dials are refused from the moment this returns);
    /// open connections keep working.
    pub async fn stop_listening(&self) {
        self.listening.lock().unwrap().cancel();
        // The kernel keeps completing handshakes until the socket is closed:
        // wait for the accept loop to drop it.
        let mut listening = self.listening_now.subscribe();
        let _ = listening.wait_for(|on| !*on).await;
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
        self.listening_now.send_replace(true);
        let listening_now = self.listening_now.clone();
        let shared = self.shared.clone();
        let mode = self.mode.subscribe();
        let gate = self.gate.subscribe();
        let tracker = self.tracker.clone();
        let all = self.all.clone();
        self.tracker.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => {
                        drop(listener);
                        listening_now.send_replace(false);
                        return;
                    }
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
                let gate = gate.clone();
                let all = all.clone();
                tracker.spawn(async move {
                    tokio::select! {
                        _ = all.cancelled() => {}
                        _ = connection(stream, rx, mode, gate, &shared) => {}
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
    mut gate: watch::Receiver<bool>,
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
                shared.received.fetch_add(n, Ordering::SeqCst);
                let current = *mode.borrow();
                match current {
                    Mode::Echo | Mode::Deaf => {}
                    Mode::Gated => {
                        if gate.wait_for(|open| *open).await.is_err() {
                            return;
                        }
                    }
                    Mode::Silent => continue,
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
