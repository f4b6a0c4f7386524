//! Lease limits that fire while nobody polls the lease.
//!
//! A lease runs inside its response stream, which hyper polls only while the
//! HTTP/2 stream has flow-control window. A client that stops reading leaves
//! its lease parked between two messages, and the timers and the shutdown
//! revoke inside the pump would never run: the very leak lessor exists to
//! stop. So between messages a lease parks its state in a [`LeaseCell`], and
//! the watchdog, one task per server, ends parked leases whose
//! `max_duration` or `idle_timeout` has passed, or all of them once the
//! shutdown grace is over: the connection is evicted and counted at once, and
//! the `Ended` message waits in the cell for the client's next read.
//!
//! Invariant: an `Active` lease is either inside the pump (being stepped) or
//! in its cell (parked), never both; whoever takes it out of the cell owns
//! its end. The pump checks its own timers whenever it runs, so the watchdog
//! only has to catch leases that stopped running.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::pump::Active;
use lessor_client::pb::LeaseResponse;

/// How often parked leases are checked: a stalled lease ends at most this
/// long after its limit.
const TICK: Duration = Duration::from_millis(100);

/// Where a lease waits between two messages.
pub(crate) struct LeaseCell {
    state: Mutex<CellState>,
    span: tracing::Span,
}

enum CellState {
    /// The pump holds the lease (running, or about to park it).
    Running,
    /// Between two messages: the watchdog may end it.
    Parked(Box<Active>),
    /// The watchdog ended it; the pump yields this (`None`: no `Ended` for
    /// this row) and finishes.
    Ended(Option<LeaseResponse>),
}

/// What the pump finds when it comes back for its lease.
pub(crate) enum Unparked {
    /// The lease, to keep pumping.
    Active(Box<Active>),
    /// The watchdog ended it meanwhile.
    Ended(Option<LeaseResponse>),
}

impl LeaseCell {
    fn lock(&self) -> MutexGuard<'_, CellState> {
        // A poisoned lock means a panic mid-update elsewhere; the state is a
        // plain enum and still meaningful.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leaves the lease here until [`LeaseCell::unpark`].
    pub(crate) fn park(&self, active: Box<Active>) {
        *self.lock() = CellState::Parked(active);
    }

    /// Takes the lease back, or what the watchdog left instead.
    pub(crate) fn unpark(&self) -> Unparked {
        match std::mem::replace(&mut *self.lock(), CellState::Running) {
            CellState::Parked(active) => Unparked::Active(active),
            CellState::Ended(ended) => Unparked::Ended(ended),
            CellState::Running => Unparked::Ended(None),
        }
    }

    /// Ends the parked lease if `why` says it is due; true if it did.
    fn end_if_due(&self, revoked: bool) -> bool {
        let mut state = self.lock();
        let CellState::Parked(active) = &*state else {
            return false;
        };
        let Some((end, detail)) = active.due(tokio::time::Instant::now(), revoked) else {
            return false;
        };
        let CellState::Parked(active) = std::mem::replace(&mut *state, CellState::Running) else {
            return false;
        };
        let ended = active.end(end, detail, &self.span);
        *state = CellState::Ended(ended);
        true
    }
}

/// The live leases the watchdog looks after.
#[derive(Default)]
pub(crate) struct Watchdog {
    /// Weak: a lease whose stream is dropped goes away with it; the list is
    /// pruned on every tick.
    cells: Mutex<Vec<Weak<LeaseCell>>>,
}

impl Watchdog {
    /// A cell for a newly granted lease, watched from now on.
    pub(crate) fn watch(&self, span: tracing::Span) -> Arc<LeaseCell> {
        let cell = Arc::new(LeaseCell {
            state: Mutex::new(CellState::Running),
            span,
        });
        self.cells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&cell));
        cell
    }

    /// Ends due parked leases every `TICK`, and every parked lease once
    /// `revoke` fires (the shutdown grace is over). Runs until `stop`.
    pub(crate) async fn run(self: Arc<Self>, revoke: CancellationToken, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.sweep(revoke.is_cancelled());
        }
    }

    fn sweep(&self, revoked: bool) {
        // Upgrade under the lock, end outside it: ending a lease evicts a
        // connection and must not hold up leases being granted.
        let cells: Vec<Arc<LeaseCell>> = {
            let mut cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
            cells.retain(|c| c.strong_count() > 0);
            cells.iter().filter_map(Weak::upgrade).collect()
        };
        let mut ended = 0;
        for cell in cells {
            if cell.end_if_due(revoked) {
                ended += 1;
            }
        }
        if ended > 0 {
            tracing::info!(ended, "ended leases stalled on their client");
        }
    }
}
