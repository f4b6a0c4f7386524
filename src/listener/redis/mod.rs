//! The Redis listener: unmodified clients (`redis-cli`, `redis-benchmark`,
//! every driver) connect to it as to Redis, and lessor pools their commands
//! over the upstream's authenticated, health-checked connections.
//!
//! The commands ready in a client's buffer form a batch, written on one
//! pooled connection that the client holds until every reply of the batch
//! has been relayed; then the connection goes back (restored first, when
//! the batch changed what a restore undoes). A batch of plain commands
//! (ones that change nothing, never block, get one reply) from a client on
//! the upstream's defaults instead joins a lane that pipelines such batches
//! of all clients on one connection. What a client sets for
//! itself (`SELECT`, `CLIENT SETNAME`, `READONLY`) follows it to whichever
//! connection serves its next batch. What binds a client to one connection
//! (MULTI, WATCH, subscriptions, CLIENT TRACKING, CLIENT REPLY, MONITOR)
//! keeps it on that connection until the state ends, as the session
//! tracker counts it; a blocking command simply holds its batch until it
//! is answered. `AUTH`, `HELLO`, `QUIT` and `RESET` are answered by lessor.
//!
//! - `client`: one client's life: batches, holds, pinned sessions;
//! - `local`: the commands lessor answers itself;
//! - `shared`: plain batches of many clients pipelined on one connection.

mod client;
mod local;
mod shared;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use super::{Serve, Shared};
use crate::config::{NativeListen, UpstreamConfig};

/// One upstream's Redis listener, shared by its clients.
pub(crate) struct Listener {
    upstream: String,
    listen: NativeListen,
    /// The upstream's config at start (the pool itself is looked up at
    /// each checkout, so a reload's pool is used).
    config: UpstreamConfig,
    /// The password clients present (`auth: password`).
    password: Option<String>,
    /// `max_clients`: a permit per connected client.
    clients: Arc<Semaphore>,
    next_client: AtomicU64,
    /// The upstream's `redis_version`, for `HELLO`, once learned.
    version: std::sync::OnceLock<String>,
    /// Where plain batches of many clients share one connection.
    lanes: shared::Lanes,
    /// This listener's counts (`/metrics`).
    counts: Arc<super::stats::Counts>,
    shared: Shared,
}

impl Listener {
    /// The listener of `upstream`, before it accepts.
    pub(super) fn new(
        upstream: String,
        listen: NativeListen,
        config: UpstreamConfig,
        password: Option<String>,
        shared: Shared,
    ) -> Arc<Self> {
        let counts = shared.stats.of(&upstream);
        counts.redis.store(true, Ordering::Relaxed);
        let listener = Arc::new(Self {
            upstream,
            clients: Arc::new(Semaphore::new(listen.max_clients as usize)),
            listen,
            config,
            password,
            next_client: AtomicU64::new(1),
            version: std::sync::OnceLock::new(),
            lanes: shared::Lanes::default(),
            counts,
            shared,
        });
        listener.learn_version();
        listener
    }
}

impl Listener {
    /// The upstream's `redis_version` for `HELLO` (`unknown` until
    /// learned): never waited for on a client's path.
    fn version(&self) -> String {
        self.version
            .get()
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned())
    }

    /// Learns the upstream's version with `INFO server` on a pooled
    /// connection, once, in a task of the listener's: tried again every
    /// second while no connection can be had, until the drain.
    fn learn_version(self: &Arc<Self>) {
        let listener = Arc::clone(self);
        self.shared.tracker.spawn(async move {
            let stop = listener.shared.stop_accepting.clone();
            loop {
                if let Some(version) = listener.ask_version().await {
                    let _ = listener.version.set(version);
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        });
    }

    async fn ask_version(&self) -> Option<String> {
        let pool = self.shared.pools.get(&self.upstream)?;
        let mut leased = pool
            .checkout(self.config.pool.checkout_timeout)
            .await
            .ok()?;
        match info_version(&mut leased.conn_mut().stream, self.config.redis.max_frame).await {
            Some(version) => {
                leased.give_back();
                Some(version)
            }
            None => {
                leased.evict(crate::pool::EvictReason::Dirty);
                None
            }
        }
    }
}

/// `INFO server`'s `redis_version` (`unknown` when refused), read whole
/// from a clean connection; `None` when the connection failed.
async fn info_version(
    stream: &mut crate::net::Stream,
    max_frame: bytesize::ByteSize,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
        .await
        .ok()?;
    let mut scanner = crate::protocol::redis::resp::Scanner::new(max_frame.as_u64());
    let mut reply = Vec::new();
    let mut done = None;
    while done.is_none() {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        scanner.feed(&chunk[..n], |f| done = Some(f.kind)).ok()?;
        reply.extend_from_slice(&chunk[..n]);
    }
    if !scanner.at_boundary() {
        return None;
    }
    // A bulk string in RESP2, a verbatim one in RESP3; anything else (an
    // ACL refusal) leaves the version unknown, the connection clean.
    let text = String::from_utf8_lossy(&reply);
    let version = matches!(done, Some(b'$' | b'=')).then(|| {
        text.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().chars().filter(char::is_ascii_graphic).collect())
    });
    Some(version.flatten().unwrap_or_else(|| "unknown".to_owned()))
}

impl Serve for Listener {
    async fn run<S>(self: Arc<Self>, stream: S, peer: String, id: u64)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        client::run(self, stream, peer, id).await;
    }

    fn upstream(&self) -> &str {
        &self.upstream
    }

    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn next_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }
}
