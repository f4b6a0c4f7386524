//! The bb8 adapter. bb8 keeps the idle list and the slot accounting; lessor
//! keeps every rule: health checks, timeouts, `min_idle`, eviction reasons.
//!
//! bb8 is configured so it does nothing on its own: no `test_on_check_out`
//! (new connections would be probed too), no reaper (it also closes
//! `min_idle` connections), no `min_idle` (its refill ignores our backoff), no
//! connect retry, and a get timeout far beyond any checkout deadline (ours
//! governs). Eviction is its one path: `has_broken` on a flag set just before
//! the guard drops.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::conn::Conn;
use super::connect::{DialError, Dialer};

/// Dials through lessor's [`Dialer`]; validates nothing itself.
#[derive(Debug)]
pub(crate) struct Bb8Manager {
    dialer: Arc<Dialer>,
}

impl bb8::ManageConnection for Bb8Manager {
    type Connection = Conn;
    type Error = DialError;

    fn connect(&self) -> impl Future<Output = Result<Conn, DialError>> + Send {
        let dialer = self.dialer.clone();
        async move { dialer.dial().await }
    }

    fn is_valid(&self, _conn: &mut Conn) -> impl Future<Output = Result<(), DialError>> + Send {
        // Never called: test_on_check_out is off and checks run in Pool::checkout.
        std::future::ready(Ok(()))
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken
    }
}

/// Builds a bb8 pool that leaves every policy to lessor.
pub(super) fn build(dialer: Arc<Dialer>, max_size: u32) -> bb8::Pool<Bb8Manager> {
    bb8::Pool::builder()
        .max_size(max_size)
        .min_idle(None)
        .test_on_check_out(false)
        .max_lifetime(None)
        .idle_timeout(None)
        .retry_connection(false)
        .connection_timeout(Duration::from_secs(24 * 3600))
        .queue_strategy(bb8::QueueStrategy::Lifo)
        .build_unchecked(Bb8Manager { dialer })
}
