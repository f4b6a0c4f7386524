//! The leased-connection guard: what a lease holds, and the one place a
//! connection leaves a lease (returned, evicted, or dropped and evicted).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Conn, EvictReason, Pool, PoolConn};

/// A connection checked out for a lease. Counts as `leased` until finished;
/// dropping it unfinished evicts it as `client_abort`.
pub(crate) struct Leased {
    conn: Option<PoolConn>,
    pool: Arc<Pool>,
    /// Whether the connection served an earlier lease.
    pub reused: bool,
    /// Time spent in the checkout.
    pub waited: Duration,
}

impl Leased {
    /// Counts the connection as `leased` until [`Leased::take_conn`].
    pub(super) fn new(conn: PoolConn, pool: Arc<Pool>, reused: bool, waited: Duration) -> Self {
        pool.counters.leased.fetch_add(1, Ordering::Relaxed);
        Self {
            conn: Some(conn),
            pool,
            reused,
            waited,
        }
    }

    /// The connection.
    pub(crate) fn conn(&self) -> &Conn {
        self.conn.as_ref().expect("held until finished")
    }

    /// The connection, for the byte pump.
    pub(crate) fn conn_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("held until finished")
    }

    /// The pool the connection belongs to.
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Gives the connection back to the idle list, unless its endpoint has
    /// retired meanwhile (gone, or of the wrong role) or an operator asked
    /// for new connections; returns why it was closed instead.
    pub(crate) fn give_back(mut self) -> Option<EvictReason> {
        let mut conn = self.take_conn()?;
        if let Some(reason) = conn.retirement() {
            self.pool.evict(conn, reason);
            return Some(reason);
        }
        if self.pool.is_retired() || self.pool.superseded(&conn) {
            self.pool.evict(conn, EvictReason::Reconnect);
            return Some(EvictReason::Reconnect);
        }
        if self.pool.over_fleet_cap() {
            self.pool.evict(conn, EvictReason::FleetCap);
            return Some(EvictReason::FleetCap);
        }
        conn.mark_idle(Instant::now());
        conn.put_back();
        self.pool.returned_under_cap();
        None
    }

    /// Closes the connection, counted under `reason`.
    pub(crate) fn evict(mut self, reason: EvictReason) {
        if let Some(conn) = self.take_conn() {
            self.pool.evict(conn, reason);
        }
    }

    /// Ends the lease's claim on the connection. `leased` drops here, before
    /// the connection goes back or its slot frees: a checkout that takes it
    /// next counts it again, so `leased` never exceeds `max_size`, not even
    /// for an instant between the two.
    fn take_conn(&mut self) -> Option<PoolConn> {
        let conn = self.conn.take()?;
        self.pool.counters.leased.fetch_sub(1, Ordering::Relaxed);
        let mut conn = conn;
        if conn.role_hint() {
            // The server may have been demoted or promoted: ask it soon
            // (rate-limited), not at the next health interval.
            self.pool.dialer.endpoints().request_recheck();
        }
        conn.refused_write = false;
        Some(conn)
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        if let Some(conn) = self.take_conn() {
            self.pool.evict(conn, EvictReason::ClientAbort);
        }
    }
}
