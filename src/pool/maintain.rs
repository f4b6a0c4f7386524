//! The per-upstream background loop: keeps `min_idle` warm, and every
//! `health.interval` re-reads the TLS files and sweeps the idle connections
//! (lifetime, idle timeout, liveness peek, probe).
//!
//! Neither engine can be trusted with this (bb8's reaper also closes
//! `min_idle` connections and cannot reach idle ones otherwise; deadpool has
//! no `min_idle`), so the sweep takes every idle connection out at once,
//! decides, and puts the survivors back in their original order. Holding them
//! all is what makes a LIFO idle list walkable; peeks are one syscall each and
//! probes run concurrently, so the list is empty for microseconds.
//!
//! With `min_idle: 0` the pool holds nothing once `idle_timeout` passes: the
//! loop dials one connection only while the upstream has not been reached
//! (at startup, or after the last dial failed), so readiness means "reached"
//! and comes back by itself; those re-checks run at most once per
//! `health.interval`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::future::join_all;
use tokio_util::sync::CancellationToken;

use super::{EvictReason, Pool, PoolConn, VetFor, Vetted, health};

/// How often endpoints' roles are asked while an upstream that wants a role
/// has no usable connection.
const OUTAGE_ROLE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// The least time between two role checks that hints asked for.
const HINT_GAP: std::time::Duration = std::time::Duration::from_millis(100);
use crate::net::Refreshed;

impl Pool {
    /// Runs until `cancel` fires. Owned by the server's task tracker.
    pub(crate) async fn maintain(self: Arc<Self>, cancel: CancellationToken) {
        let interval = self.config.health.interval;
        let mut next_sweep = tokio::time::Instant::now() + interval;
        let endpoints = self.dialer.endpoints().clone();
        let wants_role = endpoints.wanted() != crate::config::Role::Any;
        // A deadline of its own (not a sleep restarted by every wake-up):
        // in the past while all is well, so an outage is checked at once.
        let mut outage_check = tokio::time::Instant::now();
        let mut last_hint_check = tokio::time::Instant::now() - HINT_GAP;
        let mut fleet = self.fleet_cap().map(|f| f.subscribe());
        loop {
            let retry = tokio::select! {
                _ = cancel.cancelled() => return,
                retry = self.refill() => retry.map(tokio::time::Instant::from_std),
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.refill_wanted.notified() => {}
                // Discovery changed the endpoints: retired ones lose their
                // idle connections now, not at the next sweep.
                _ = endpoints.changed() => {
                    self.purge_retired();
                    self.ready_signal.send_replace(());
                }
                // A lease saw a hint that a server's role changed. Hints
                // come from clients' traffic: at most one pass per
                // HINT_GAP, however many arrive.
                _ = endpoints.recheck_requested() => {
                    tokio::time::sleep_until(last_hint_check + HINT_GAP).await;
                    self.check_roles().await;
                    self.purge_retired();
                    last_hint_check = tokio::time::Instant::now();
                }
                // No usable connection on an upstream that wants a role (a
                // primary died): the replicas are asked often, so a
                // promotion is seen within this, not a whole interval.
                _ = tokio::time::sleep_until(outage_check), if wants_role && !self.ready() => {
                    self.check_roles().await;
                    self.purge_retired();
                    outage_check = tokio::time::Instant::now() + OUTAGE_ROLE_CHECK.min(interval);
                }
                // The fleet cap dropped (idle ones above it close now) or
                // rose (min_idle may refill).
                () = self.fleet_cap_changed(&mut fleet) => self.trim_to_fleet_cap(),
                _ = tokio::time::sleep_until(retry.unwrap_or(next_sweep)), if retry.is_some() => {}
                _ = tokio::time::sleep_until(next_sweep) => {
                    self.refresh_tls().await;
                    self.sweep().await;
                    self.check_roles().await;
                    self.purge_retired();
                    next_sweep = tokio::time::Instant::now() + interval;
                }
            }
        }
    }

    /// Re-reads the TLS files (a rotated Secret): new dials use what
    /// changed; pooled connections keep their session until they expire.
    async fn refresh_tls(&self) {
        let Some(tls) = self.dialer.tls() else {
            return;
        };
        match tls.refresh().await {
            Refreshed::Unchanged => {}
            Refreshed::Reloaded => {
                tracing::info!(upstream = %self.name(), "TLS files changed; new connections use them");
            }
            Refreshed::Failed(error) => {
                tracing::warn!(upstream = %self.name(), %error, "TLS files changed but cannot be used; keeping the previous ones");
            }
        }
    }

    /// Closes the idle connections of retired endpoints (gone, not ready,
    /// terminating).
    fn purge_retired(&self) {
        let mut keep = Vec::new();
        while let Some(conn) = self.engine.try_get_idle(&self.counters) {
            if let Some(reason) = conn.retirement() {
                self.evict(conn, reason);
            } else {
                keep.push(conn);
            }
            if keep.len() >= self.config.pool.max_size as usize {
                break;
            }
        }
        put_back_in_order(keep);
    }

    /// Idle connections to add now: up to `min_idle`, and one when the pool
    /// has none and the upstream is not known to be reachable (never dialed,
    /// or the last dial failed); never past `max_size`.
    fn wanted(&self) -> u32 {
        if self.closed.load(Ordering::Acquire) {
            return 0;
        }
        // Dials under way (a checkout's, or bb8's own) will add connections.
        let dialing = self.dialer.in_flight();
        let size = self.engine.size() + dialing;
        let floor = u32::from(size == 0 && self.dialer.last_dial_ok() != Some(true));
        // Checkouts waiting dial for themselves; a refill dial racing them
        // finds the pool full and is wasted.
        if self.counters.waiting.load(Ordering::Relaxed) > 0 {
            return floor;
        }
        let want = self
            .config
            .pool
            .min_idle()
            .saturating_sub(self.idle() + dialing)
            .max(floor);
        // The fleet cap wins over min_idle.
        want.min(self.config.pool.max_size.saturating_sub(size))
            .min(self.fleet_room())
    }

    /// Dials what [`Pool::wanted`] asks for, concurrently. When dials fail,
    /// returns when to try again (the endpoints' backoff).
    async fn refill(&self) -> Option<std::time::Instant> {
        loop {
            let want = self.wanted();
            if want == 0 {
                return None;
            }
            let dials = join_all((0..want).map(|_| self.dialer.dial())).await;
            let mut failed = false;
            for dialed in dials {
                match dialed {
                    // A full pool (checkouts dialed meanwhile) closes the
                    // extra, counted: every close has a reason.
                    Ok(conn) => {
                        if let Some(extra) = self.engine.add(conn) {
                            drop(extra);
                            self.counters.evicted(EvictReason::Surplus);
                        }
                    }
                    // At the fleet cap: nothing failed, the cap decides.
                    Err(super::connect::DialError::FleetCap) => {}
                    Err(_) => failed = true,
                }
            }
            if failed {
                let now = std::time::Instant::now();
                // Without min_idle, dials here only re-check reachability
                // for readiness: once per interval is enough.
                let soon = if self.config.pool.min_idle() == 0 {
                    now + self.config.health.interval
                } else {
                    now + std::time::Duration::from_millis(25)
                };
                return Some(
                    self.dialer
                        .endpoints()
                        .next_reopen()
                        .unwrap_or(soon)
                        .max(soon),
                );
            }
        }
    }

    /// One pass over the idle connections.
    pub(super) async fn sweep(&self) {
        let now = Instant::now();
        let cfg = &self.config;
        let mut held = Vec::new();
        while held.len() < cfg.pool.max_size as usize {
            match self.engine.try_get_idle(&self.counters) {
                Some(conn) => held.push(conn),
                None => break,
            }
        }
        // Most recently used first (LIFO): the oldest idle ones are the ones
        // beyond min_idle that the idle timeout closes.
        let floor = cfg.pool.min_idle();
        let mut kept = 0;
        let mut keep = Vec::new();
        let mut to_probe = Vec::new();
        for conn in held {
            let at = VetFor::Sweep {
                idle_limit: (kept >= floor).then_some(cfg.pool.idle_timeout),
            };
            match self.vet(conn, now, at) {
                Vetted::Ready(conn) => {
                    kept += 1;
                    keep.push(conn);
                }
                Vetted::NeedsProbe(conn) => {
                    kept += 1;
                    to_probe.push(conn);
                }
                Vetted::Evicted => {}
            }
        }
        put_back_in_order(keep);
        if to_probe.is_empty() {
            return;
        }
        let probe = cfg.health.probe.as_ref();
        let probed = join_all(to_probe.into_iter().map(|mut conn| async move {
            let result = health::check(&mut conn, probe).await;
            (conn, result)
        }))
        .await;
        let mut keep = Vec::new();
        for (conn, result) in probed {
            self.counters.health_checks.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(()) => {
                    if conn.role_hint() {
                        // The probe read a report of a role change.
                        self.dialer.endpoints().request_recheck();
                    }
                    keep.push(conn);
                }
                Err(e) => self.failed_check(conn, &e),
            }
        }
        put_back_in_order(keep);
    }
}

/// `conns` is most recently used first; the engines' LIFO lists get the last
/// one put back on top, so put back oldest first.
fn put_back_in_order(conns: Vec<PoolConn>) {
    for conn in conns.into_iter().rev() {
        conn.put_back();
    }
}
