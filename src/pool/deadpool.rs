//! The deadpool adapter. deadpool keeps the idle list and the slot accounting;
//! lessor keeps every rule, as with bb8.
//!
//! deadpool has no way to add a connection from outside and no `min_idle`, so
//! the manager has a one-slot handoff: [`add`] parks a dialed connection there
//! and triggers a `create`, which takes it without touching the network.
//! No deadpool timeouts are set: its wait timeout bounds only the slot wait
//! (observed with deadpool 0.13), so every get runs under lessor's own checkout deadline.

use std::sync::{Arc, Mutex};

use deadpool::managed::{Manager, Metrics, Object, Pool, QueueMode, RecycleResult};
use futures::FutureExt;

use super::conn::Conn;
use super::connect::{DialError, Dialer};

/// Dials through lessor's [`Dialer`], or hands over a connection [`add`] parked.
#[derive(Debug)]
pub(crate) struct DeadpoolManager {
    dialer: Arc<Dialer>,
    /// A dialed connection waiting to enter the pool; filled and drained by
    /// [`add`] without an await in between, so it never holds a socket long.
    handoff: Mutex<Option<Conn>>,
}

impl DeadpoolManager {
    fn take_handoff(&self) -> Option<Conn> {
        self.handoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn has_handoff(&self) -> bool {
        self.handoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl Manager for DeadpoolManager {
    type Type = Conn;
    type Error = DialError;

    async fn create(&self) -> Result<Conn, DialError> {
        if let Some(conn) = self.take_handoff() {
            return Ok(conn);
        }
        self.dialer.dial().await
    }

    async fn recycle(&self, _conn: &mut Conn, _: &Metrics) -> RecycleResult<DialError> {
        // Checks run in Pool::checkout, identically for both engines.
        Ok(())
    }
}

/// Builds a LIFO deadpool pool (hot connections stay hot; extras idle out).
pub(super) fn build(dialer: Arc<Dialer>, max_size: u32) -> Pool<DeadpoolManager> {
    let manager = DeadpoolManager {
        dialer,
        handoff: Mutex::new(None),
    };
    Pool::builder(manager)
        .max_size(max_size as usize)
        .queue_mode(QueueMode::Lifo)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .expect("a runtime is set and no timeouts are used")
}

/// Puts a dialed connection into the pool, or gives it back when the pool is
/// full. Synchronous: every `get` below completes on its first poll (idle
/// objects recycle at once; `create` takes the handoff), so the idle
/// connections it briefly holds are back before any other task could miss them.
pub(super) fn add(pool: &Pool<DeadpoolManager>, conn: Conn) -> Option<Conn> {
    let manager = pool.manager();
    *manager.handoff.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
    let mut held: Vec<Object<DeadpoolManager>> = Vec::new();
    // Idle objects come first out of `get`; once none is left, `get` creates,
    // taking the handoff. A concurrent checkout may take it first: then it has
    // gone to use, and we stop.
    while manager.has_handoff() {
        match pool.get().now_or_never() {
            Some(Ok(obj)) => held.push(obj),
            // No free slot (pool full), or closed.
            _ => break,
        }
    }
    // Newest first, so the idle order (most recently used on top) survives.
    while let Some(obj) = held.pop() {
        drop(obj);
    }
    manager.take_handoff()
}
