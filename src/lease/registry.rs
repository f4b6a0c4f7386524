//! Every live lease, for the operator and for `Cancel`: who holds it (the
//! client's `Acquire.holder` and the trace it came in with), where, since
//! when, how much it moved, and whether it is waiting on its client. Each
//! entry is registered when the lease is granted and removed by a drop
//! guard when it ends, so no ending path leaves one behind. The pump
//! updates the counters with relaxed atomics; listing reads them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Where a PostgreSQL session's CancelRequest goes, and its key.
#[derive(Debug, Clone)]
pub(crate) struct CancelTarget {
    /// The endpoint the session is connected to.
    pub endpoint: SocketAddr,
    /// BackendKeyData's process id.
    pub pid: i32,
    /// BackendKeyData's secret key.
    pub secret: i32,
    /// The upstream's TLS: the CancelRequest goes the way the session did.
    pub tls: Option<Arc<crate::net::Tls>>,
}

/// Why a `Cancel` did nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CancelError {
    /// No live PostgreSQL lease has that id.
    #[error("no live PostgreSQL lease `{0}`")]
    NotFound(String),
    /// The CancelRequest could not be delivered.
    #[error("cannot reach {endpoint} to cancel: {error}")]
    Unreachable {
        /// The session's endpoint.
        endpoint: SocketAddr,
        /// What failed.
        error: String,
    },
}

/// A parked lease counts as stalled on its client after this long.
const STALLED_AFTER: Duration = Duration::from_secs(1);

/// One live lease.
#[derive(Debug)]
pub(crate) struct LiveLease {
    /// `Granted.lease_id`.
    pub lease_id: String,
    /// The upstream's name.
    pub upstream: String,
    /// The endpoint (`ip:port`).
    pub endpoint: String,
    /// The pooled connection's id.
    pub connection_id: u64,
    /// `Acquire.holder`: what the client says holds it.
    pub holder: String,
    /// The W3C trace id the lease came in with, when one did.
    pub trace_id: String,
    /// For a PostgreSQL session: where its CancelRequest goes.
    pub cancel: Option<CancelTarget>,
    started: Instant,
    /// Milliseconds after `started` of the last byte either way.
    last_activity_ms: AtomicU64,
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
    /// Milliseconds after `started` (+1) when it parked waiting for its
    /// client to read; 0 while not parked.
    parked_at_ms: AtomicU64,
    ending: AtomicBool,
    /// `lease.warn_after` has been logged for it.
    warned: AtomicBool,
}

impl LiveLease {
    /// A lease granted now.
    pub(crate) fn new(
        lease_id: String,
        upstream: String,
        endpoint: String,
        connection_id: u64,
        holder: String,
        trace_id: String,
        cancel: Option<CancelTarget>,
    ) -> Self {
        Self {
            lease_id,
            upstream,
            endpoint,
            connection_id,
            holder,
            trace_id,
            cancel,
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            parked_at_ms: AtomicU64::new(0),
            ending: AtomicBool::new(false),
            warned: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes went one way.
    pub(crate) fn moved(&self, to_upstream: bool, bytes: usize) {
        let counter = if to_upstream {
            &self.bytes_to_upstream
        } else {
            &self.bytes_to_client
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_activity_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// The lease is waiting for its client to read (`true`), or runs again.
    pub(crate) fn parked(&self, parked: bool) {
        let at = if parked { self.now_ms() + 1 } else { 0 };
        self.parked_at_ms.store(at, Ordering::Relaxed);
    }

    /// The lease is ending (draining, restoring, sending Ended).
    pub(crate) fn ending(&self) {
        self.ending.store(true, Ordering::Relaxed);
    }

    /// How long it has lived.
    pub(crate) fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// What a listing shows of it now.
    pub(crate) fn snapshot(&self) -> LeaseSnapshot {
        let now = self.now_ms();
        let parked_at = self.parked_at_ms.load(Ordering::Relaxed);
        let state = if self.ending.load(Ordering::Relaxed) {
            "ending"
        } else if parked_at > 0
            && now.saturating_sub(parked_at - 1) >= STALLED_AFTER.as_millis() as u64
        {
            "stalled"
        } else {
            "active"
        };
        LeaseSnapshot {
            lease_id: self.lease_id.clone(),
            upstream: self.upstream.clone(),
            endpoint: self.endpoint.clone(),
            connection_id: self.connection_id,
            holder: self.holder.clone(),
            trace_id: self.trace_id.clone(),
            age_ms: now,
            idle_ms: now.saturating_sub(self.last_activity_ms.load(Ordering::Relaxed)),
            bytes_to_upstream: self.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
            state,
        }
    }
}

/// One live lease as `/debug/leases` shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LeaseSnapshot {
    pub lease_id: String,
    pub upstream: String,
    pub endpoint: String,
    pub connection_id: u64,
    pub holder: String,
    pub trace_id: String,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    /// `active`, `stalled` (waiting over a second for its client to read),
    /// or `ending`.
    pub state: &'static str,
}

/// The registry, shared by every lease stream, the `Cancel` RPC, the admin
/// server and the age watch.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    live: Mutex<HashMap<String, Arc<LiveLease>>>,
}

impl Leases {
    /// Registers a lease until the returned guard drops.
    pub(crate) fn register(self: &Arc<Self>, lease: LiveLease) -> Registered {
        let lease = Arc::new(lease);
        self.lock().insert(lease.lease_id.clone(), lease.clone());
        Registered {
            leases: Arc::clone(self),
            lease,
        }
    }

    /// Every live lease, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<LeaseSnapshot> {
        let live: Vec<Arc<LiveLease>> = self.lock().values().cloned().collect();
        let mut all: Vec<LeaseSnapshot> = live.iter().map(|l| l.snapshot()).collect();
        all.sort_by_key(|l| std::cmp::Reverse(l.age_ms));
        all
    }

    /// Leases older than their upstream's `warn_after` (given by name) not
    /// yet reported, marked reported.
    pub(crate) fn overdue(
        &self,
        warn_after: impl Fn(&str) -> Option<Duration>,
    ) -> Vec<Arc<LiveLease>> {
        self.lock()
            .values()
            .filter(|l| {
                warn_after(&l.upstream).is_some_and(|after| l.age() >= after)
                    && !l.warned.swap(true, Ordering::Relaxed)
            })
            .cloned()
            .collect()
    }

    /// Sends the CancelRequest for `lease_id` on a new connection, and waits
    /// (within `timeout`) for the server to close it, which it does once the
    /// request is handled.
    pub(crate) async fn cancel(
        &self,
        lease_id: &str,
        timeout: Duration,
    ) -> Result<SocketAddr, CancelError> {
        let target = self
            .lock()
            .get(lease_id)
            .and_then(|l| l.cancel.clone())
            .ok_or_else(|| CancelError::NotFound(crate::pool::printable_name(lease_id)))?;
        crate::protocol::postgres::cancel::send(
            target.endpoint,
            target.pid,
            target.secret,
            timeout,
            target.tls,
        )
        .await
        .map(|()| target.endpoint)
        .map_err(|e| CancelError::Unreachable {
            endpoint: target.endpoint,
            error: e.to_string(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveLease>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps a lease listed while it lives; the pump updates it through here.
#[derive(Debug)]
pub(crate) struct Registered {
    leases: Arc<Leases>,
    lease: Arc<LiveLease>,
}

impl std::ops::Deref for Registered {
    type Target = LiveLease;

    fn deref(&self) -> &LiveLease {
        &self.lease
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.leases.lock().remove(&self.lease.lease_id);
    }
}

/// `Acquire.holder` (or any client-chosen text) as it may be printed in a
/// text log line or a table: control characters and invisible format
/// characters (bidi overrides, zero-width, line separators) escaped the way
/// Rust's `escape_debug` writes them (`\n`, `\u{1b}`), and `\` doubled so
/// an escape cannot be forged. A newline or an ANSI sequence in a holder
/// then cannot start a forged log line or repaint a terminal. JSON output
/// keeps the text itself, JSON-escaped by its serializer.
pub(crate) struct Printable<'a>(pub(crate) &'a str);

impl std::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                c if c.is_control() => write!(f, "{}", c.escape_debug())?,
                '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}' => write!(f, "{}", c.escape_unicode())?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Logs, once per lease, every lease held longer than its upstream's
/// `lease.warn_after`, with its holder and trace id: leak detection that
/// names the leaker. Checks every 250 ms until `stop`; costs nothing while
/// no upstream sets `warn_after`.
pub(crate) async fn warn_overdue(
    leases: Arc<Leases>,
    pools: Arc<crate::pool::PoolSet>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Read outside the registry's lock, once a tick (a reload may
        // change them).
        let limits: HashMap<String, Duration> = pools
            .all()
            .iter()
            .filter_map(|p| Some((p.name().to_owned(), p.config().lease.warn_after?)))
            .collect();
        if limits.is_empty() {
            continue;
        }
        let overdue = leases.overdue(|name| limits.get(name).copied());
        for lease in overdue {
            let s = lease.snapshot();
            tracing::warn!(
                lease_id = %s.lease_id,
                upstream = %s.upstream,
                holder = %Printable(&s.holder),
                trace_id = %s.trace_id,
                connection_id = s.connection_id,
                age = ?Duration::from_millis(s.age_ms),
                state = s.state,
                "lease held longer than lease.warn_after"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Printable;

    #[test]
    fn printable_escapes_what_could_forge_a_line_or_repaint_a_terminal() {
        let p = |s: &str| Printable(s).to_string();
        assert_eq!(p("GET /users/:id"), "GET /users/:id");
        assert_eq!(p("naïve ünïcode ✓"), "naïve ünïcode ✓");
        assert_eq!(p("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(p("\x1b[31mred"), "\\u{1b}[31mred");
        assert_eq!(p("\0\x7f"), "\\0\\u{7f}");
        assert_eq!(p("back\\slash"), "back\\\\slash");
        // Already-escaped text cannot pass for an escape.
        assert_ne!(p("a\\nb"), p("a\nb"));
        assert_eq!(p("\u{202e}evil\u{2028}"), "\\u{202e}evil\\u{2028}");
        assert!(!p("x\u{85}y").contains('\u{85}'));
    }
}
