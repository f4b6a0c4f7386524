//! The engine enum over the two adapters (their traits use `impl Future`
//! methods, so they cannot be `dyn`), and the guard for a connection taken
//! out of an engine.
//!
//! Invariant: a [`PoolConn`] that is dropped without [`PoolConn::put_back`]
//! closes its connection. Returning a connection is a decision; closing is the
//! default, so an early return or a panic can never hand a half-used socket to
//! the next lease.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::FutureExt;

use super::bb8::Bb8Manager;
use super::conn::Conn;
use super::connect::{DialError, Dialer};
use super::deadpool::DeadpoolManager;
use super::stats::Counters;
use crate::config::EngineKind;

/// Why an engine produced no connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EngineError {
    /// A dial made for this get failed.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The pool is closed (shutdown).
    #[error("pool closed")]
    Closed,
}

/// One upstream's pool implementation.
pub(crate) enum Engine {
    /// bb8 0.9.
    Bb8(bb8::Pool<Bb8Manager>),
    /// deadpool 0.13, managed.
    Deadpool(deadpool::managed::Pool<DeadpoolManager>),
}

enum Guard {
    Bb8(bb8::PooledConnection<'static, Bb8Manager>),
    Deadpool(deadpool::managed::Object<DeadpoolManager>),
}

/// A connection out of its engine's idle list. Closes on drop unless put back.
pub(crate) struct PoolConn {
    guard: Option<Guard>,
    /// Shared with the pool: keeps the `out` gauge exact.
    counters: Arc<Counters>,
}

impl Engine {
    /// Builds the chosen engine. Must run inside a tokio runtime.
    pub(crate) fn new(kind: EngineKind, dialer: Arc<Dialer>, max_size: u32) -> Self {
        match kind {
            EngineKind::Bb8 => Self::Bb8(super::bb8::build(dialer, max_size)),
            EngineKind::Deadpool => Self::Deadpool(super::deadpool::build(dialer, max_size)),
        }
    }

    /// Takes an idle connection, or dials one when there is room, or waits
    /// for one to come back. Unbounded: the caller sets the deadline.
    pub(crate) async fn get(&self, counters: &Arc<Counters>) -> Result<PoolConn, EngineError> {
        let guard = match self {
            Self::Bb8(pool) => match pool.get_owned().await {
                Ok(conn) => Guard::Bb8(conn),
                Err(bb8::RunError::User(e)) => return Err(EngineError::Dial(e)),
                // Only after bb8's day-long connection_timeout.
                Err(bb8::RunError::TimedOut) => return Err(EngineError::Closed),
            },
            Self::Deadpool(pool) => match pool.get().await {
                Ok(obj) => Guard::Deadpool(obj),
                Err(deadpool::managed::PoolError::Backend(e)) => return Err(EngineError::Dial(e)),
                Err(_) => return Err(EngineError::Closed),
            },
        };
        Ok(PoolConn::new(guard, counters))
    }

    /// Idle connections right now: open ones not checked out. The engines'
    /// own idle counts lag a checkout in progress; `out` does not.
    pub(crate) fn idle(&self, counters: &Counters) -> u32 {
        self.size()
            .saturating_sub(counters.out.load(Ordering::Relaxed))
    }

    /// Takes an idle connection if one is there right now; never dials.
    pub(crate) fn try_get_idle(&self, counters: &Arc<Counters>) -> Option<PoolConn> {
        if self.idle(counters) == 0 {
            return None;
        }
        // Both engines hand out an idle connection on the first poll. When
        // the last idle one went to a concurrent checkout in between, the
        // future is dropped before it does anything but queue.
        let guard = match self {
            Self::Bb8(pool) => Guard::Bb8(pool.get_owned().now_or_never()?.ok()?),
            Self::Deadpool(pool) => Guard::Deadpool(pool.get().now_or_never()?.ok()?),
        };
        Some(PoolConn::new(guard, counters))
    }

    /// Adds a connection dialed outside the engine (for `min_idle`); gives it
    /// back when the pool is full.
    pub(crate) fn add(&self, conn: Conn) -> Option<Conn> {
        match self {
            Self::Bb8(pool) => match pool.add(conn) {
                Ok(()) => None,
                Err(bb8::AddError::Broken(c) | bb8::AddError::NoCapacity(c)) => Some(c),
            },
            Self::Deadpool(pool) => super::deadpool::add(pool, conn),
        }
    }

    /// Open connections, idle and out.
    pub(crate) fn size(&self) -> u32 {
        match self {
            Self::Bb8(pool) => pool.state().connections,
            Self::Deadpool(pool) => pool.status().size as u32,
        }
    }

    /// Closes idle connections and makes every later get fail. deadpool closes
    /// for real; bb8 has no close, so its idle connections are drained.
    pub(crate) fn close(&self, counters: &Arc<Counters>) {
        match self {
            Self::Bb8(_) => {
                while let Some(conn) = self.try_get_idle(counters) {
                    conn.discard();
                }
            }
            Self::Deadpool(pool) => pool.close(),
        }
    }
}

impl PoolConn {
    fn new(guard: Guard, counters: &Arc<Counters>) -> Self {
        counters.out.fetch_add(1, Ordering::Relaxed);
        let conn = Self {
            guard: Some(guard),
            counters: counters.clone(),
        };
        conn.endpoint_ref().endpoint().checked_out();
        conn
    }

    /// Back to the idle list.
    pub(crate) fn put_back(mut self) {
        self.endpoint_ref().endpoint().checked_in();
        // Plain drops return to both engines (bb8: `broken` is false).
        drop(self.guard.take());
    }

    /// Closes the connection and frees its slot.
    pub(crate) fn discard(mut self) {
        self.endpoint_ref().endpoint().checked_in();
        self.close_now();
    }

    fn close_now(&mut self) {
        match self.guard.take() {
            Some(Guard::Bb8(mut conn)) => {
                conn.broken = true;
                drop(conn);
            }
            Some(Guard::Deadpool(obj)) => {
                drop(deadpool::managed::Object::take(obj));
            }
            None => {}
        }
    }
}

impl Drop for PoolConn {
    fn drop(&mut self) {
        if self.guard.is_some() {
            self.endpoint_ref().endpoint().checked_in();
        }
        self.close_now();
        self.counters.out.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Deref for PoolConn {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        match self.guard.as_ref() {
            Some(Guard::Bb8(conn)) => conn,
            Some(Guard::Deadpool(obj)) => obj,
            None => unreachable!("a PoolConn holds its guard until consumed"),
        }
    }
}

impl DerefMut for PoolConn {
    fn deref_mut(&mut self) -> &mut Conn {
        match self.guard.as_mut() {
            Some(Guard::Bb8(conn)) => conn,
            Some(Guard::Deadpool(obj)) => obj,
            None => unreachable!("a PoolConn holds its guard until consumed"),
        }
    }
}
