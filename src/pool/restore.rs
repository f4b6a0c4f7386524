//! Putting a used session back before its connection is idle again: the
//! protocol layer knows what to send (`protocol::Restore`), the pool owns
//! the connection, the task that runs it, and what is counted.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{EvictReason, Leased};
use crate::protocol::Restore;

impl Leased {
    /// Runs `restore` in a task of the pool's and returns the connection to
    /// the pool when it succeeds, closes it (counted `dirty`) when not. The
    /// lease has ended; the connection is not idle until then, so no other
    /// lease can see a session half restored. Its time is counted in
    /// `lessor_session_restore_seconds`.
    pub(crate) fn restore_then_return(mut self, restore: Restore) {
        let pool = self.pool().clone();
        pool.spawn(async move {
            if self.restore(&restore).await {
                self.give_back();
            } else {
                self.evict(EvictReason::Dirty);
            }
        });
    }

    /// Runs `restore` on this connection; whether it is idle-ready now.
    /// Timed in `lessor_session_restore_seconds`.
    pub(crate) async fn restore(&mut self, restore: &Restore) -> bool {
        let started = Instant::now();
        let ok = self.restore_untimed(restore).await;
        self.pool()
            .counters()
            .session_restore
            .observe(started.elapsed());
        ok
    }

    /// [`Leased::restore`] for a caller that times the whole restore it is
    /// a part of (an Exchange's settle). A rollback is counted in
    /// `lessor_rollbacks_total`.
    pub(crate) async fn restore_untimed(&mut self, restore: &Restore) -> bool {
        if restore.rolls_back() {
            self.pool()
                .counters()
                .rollbacks
                .fetch_add(1, Ordering::Relaxed);
        }
        let conn = self.conn_mut();
        restore
            .apply(&mut conn.stream, conn.backend.as_deref_mut())
            .await
    }
}
