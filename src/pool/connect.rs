//! Dialing upstream connections: resolution, connect timeout, socket options,
//! and a backoff gate so a dead upstream cannot cause a dial storm.
//!
//! Invariant: while the gate is closed (after a failed dial, for a backoff that
//! doubles from 25ms to 1s) no dial reaches the network; callers get
//! [`DialError::Backoff`] at once. One dial passes when the gate reopens; its
//! success resets the backoff. Every failure bumps a `watch` generation so
//! checkouts waiting on an engine that hides dial errors (bb8) can fail fast.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::conn::Conn;
use super::stats::Counters;

const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_CAP: Duration = Duration::from_secs(1);

/// Why a dial produced no connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// The host name did not resolve.
    #[error("cannot resolve {address}: {reason}")]
    Resolve {
        /// The configured `host:port`.
        address: String,
        /// What the resolver said.
        reason: String,
    },
    /// Every resolved address refused or failed.
    #[error("connect to {addr} failed: {reason}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// What the OS said.
        reason: String,
    },
    /// No address answered within `connect_timeout`.
    #[error("connect to {address} timed out after {after:?}")]
    Timeout {
        /// The configured `host:port`.
        address: String,
        /// The configured `connect_timeout`.
        after: Duration,
    },
    /// Recent dials failed and the backoff gate is closed; nothing was sent.
    #[error("upstream unreachable, not redialing for {retry_in:?} (last dial: {last})")]
    Backoff {
        /// Time until the gate reopens.
        retry_in: Duration,
        /// The failure that closed the gate.
        last: String,
    },
}

/// Gate state; guarded by a mutex held only for arithmetic, never across I/O.
#[derive(Debug, Default)]
struct Gate {
    failures: u32,
    not_before: Option<Instant>,
    last_error: Option<String>,
    /// Outcome of the most recent dial that reached the network.
    last_ok: Option<bool>,
}

/// Dials one upstream. Shared by the engine adapters and the maintenance loop.
#[derive(Debug)]
pub struct Dialer {
    address: String,
    connect_timeout: Duration,
    max_lifetime: Duration,
    next_id: Arc<AtomicU64>,
    counters: Arc<Counters>,
    gate: Mutex<Gate>,
    /// Bumped on every failed dial; checkouts subscribe to fail fast.
    failures: watch::Sender<u64>,
    /// Dials on the network now. Engines do not count a connection until its
    /// dial ends, so the `min_idle` refill needs this not to overshoot.
    in_flight: AtomicU32,
}

impl Dialer {
    /// `next_id` is shared by every pool of the process, so connection ids are
    /// unique across upstreams.
    pub fn new(
        address: String,
        connect_timeout: Duration,
        max_lifetime: Duration,
        next_id: Arc<AtomicU64>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            address,
            connect_timeout,
            max_lifetime,
            next_id,
            counters,
            gate: Mutex::new(Gate::default()),
            failures: watch::Sender::new(0),
            in_flight: AtomicU32::new(0),
        }
    }

    /// A receiver whose `changed()` fires on the next failed dial.
    pub fn subscribe_failures(&self) -> watch::Receiver<u64> {
        self.failures.subscribe()
    }

    /// The most recent failure, for error details.
    pub fn last_error(&self) -> Option<String> {
        self.gate().last_error.clone()
    }

    /// `Some(true)` when the last dial that reached the network succeeded.
    pub fn last_dial_ok(&self) -> Option<bool> {
        self.gate().last_ok
    }

    /// Dials under way right now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// When the backoff gate reopens, if it is closed.
    pub fn gate_closed_until(&self) -> Option<Instant> {
        self.gate().not_before.filter(|t| *t > Instant::now())
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        // A poisoned gate only means a panic elsewhere mid-arithmetic; the
        // numbers are still usable.
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Dials once, through the backoff gate.
    pub async fn dial(&self) -> Result<Conn, DialError> {
        {
            let mut gate = self.gate();
            let now = Instant::now();
            if let Some(until) = gate.not_before.filter(|t| *t > now) {
                let err = DialError::Backoff {
                    retry_in: until - now,
                    last: gate.last_error.clone().unwrap_or_default(),
                };
                drop(gate);
                self.failures.send_modify(|g| *g += 1);
                return Err(err);
            }
            if gate.failures > 0 {
                // Half-open: this dial is the one probe; others wait it out.
                gate.not_before = Some(now + backoff(gate.failures));
            }
        }
        let dialed = {
            // A guard, not a pair of calls: deadpool cancels dials mid-way
            // when a checkout's deadline passes.
            let _dialing = InFlight::enter(&self.in_flight);
            self.connect().await
        };
        match dialed {
            Ok(conn) => {
                let mut gate = self.gate();
                *gate = Gate {
                    last_ok: Some(true),
                    ..Gate::default()
                };
                drop(gate);
                self.counters
                    .connections_created
                    .fetch_add(1, Ordering::Relaxed);
                Ok(conn)
            }
            Err(err) => {
                let mut gate = self.gate();
                gate.failures = gate.failures.saturating_add(1);
                gate.not_before = Some(Instant::now() + backoff(gate.failures));
                gate.last_error = Some(err.to_string());
                gate.last_ok = Some(false);
                drop(gate);
                self.counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                self.failures.send_modify(|g| *g += 1);
                tracing::debug!(address = %self.address, error = %err, "dial failed");
                Err(err)
            }
        }
    }

    async fn connect(&self) -> Result<Conn, DialError> {
        let address = self.address.clone();
        let attempt = async {
            let addrs =
                tokio::net::lookup_host(&address)
                    .await
                    .map_err(|e| DialError::Resolve {
                        address: address.clone(),
                        reason: e.to_string(),
                    })?;
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok((stream, addr)),
                    Err(e) => last = Some((addr, e)),
                }
            }
            Err(match last {
                Some((addr, e)) => DialError::Connect {
                    addr,
                    reason: e.to_string(),
                },
                None => DialError::Resolve {
                    address: address.clone(),
                    reason: "no addresses".to_owned(),
                },
            })
        };
        let (stream, addr) = tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| DialError::Timeout {
                address: self.address.clone(),
                after: self.connect_timeout,
            })??;
        tune(&stream).map_err(|e| DialError::Connect {
            addr,
            reason: format!("setting socket options: {e}"),
        })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Conn::new(stream, id, addr, self.max_lifetime))
    }
}

/// Counts one dial for as long as it exists.
struct InFlight<'a>(&'a AtomicU32);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// TCP_NODELAY (leases carry small request/response messages) and keepalive
/// (a silently vanished upstream is noticed even on an idle socket).
fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_millis(25));
        assert_eq!(backoff(2), Duration::from_millis(50));
        assert_eq!(backoff(3), Duration::from_millis(100));
        assert_eq!(backoff(7), Duration::from_secs(1));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(1));
    }
}
