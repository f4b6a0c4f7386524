//! The pool's side of the fleet budget (`crate::fleet`): checkouts that wait
//! at the cap, and connections closed when the cap drops.
//!
//! The cap gates dials (each takes a slot), so a checkout at the cap with
//! nothing idle must wait for a connection to come back or for the cap to
//! rise, and is counted as waiting on the fleet, not on the pool. When the
//! cap drops, idle connections above it close at once (`fleet_cap`), and
//! leased ones when they come back; no lease is cut short.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{EvictReason, Pool, PoolConn};
use crate::fleet::FleetCap;

/// A waiting checkout re-checks at least this often (a connection put back
/// by the background sweep does not announce itself).
const RECHECK: Duration = Duration::from_millis(100);

impl Pool {
    /// The fleet budget's cap, when the upstream has one.
    pub(crate) fn fleet_cap(&self) -> Option<&Arc<FleetCap>> {
        self.fleet.as_ref()
    }

    /// Whether the pool holds more connections than its fleet cap allows.
    pub(crate) fn over_fleet_cap(&self) -> bool {
        self.fleet.as_ref().is_some_and(|f| f.over())
    }

    /// A connection went back idle: checkouts waiting at the cap may take it.
    pub(crate) fn returned_under_cap(&self) {
        if let Some(fleet) = &self.fleet {
            fleet.returned();
        }
    }

    /// Before a checkout asks the engine (which would dial): at the fleet
    /// cap with nothing idle, waits until a connection is idle (returned) or
    /// there is room to dial. `Some` is an idle connection taken meanwhile.
    pub(super) async fn wait_at_fleet_cap(&self) -> Option<PoolConn> {
        let fleet = self.fleet.as_ref()?;
        let mut waiting = WaitingAtCap {
            fleet,
            counted: false,
        };
        loop {
            let notified = fleet.room_notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(conn) = self.engine.try_get_idle(&self.counters) {
                return Some(conn);
            }
            if fleet.has_room() {
                return None;
            }
            waiting.count();
            let _ = tokio::time::timeout(RECHECK, notified).await;
        }
    }

    /// Closes idle connections while the pool holds more than its cap.
    pub(super) fn trim_to_fleet_cap(&self) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        while fleet.over() {
            match self.engine.try_get_idle(&self.counters) {
                Some(conn) => self.evict(conn, EvictReason::FleetCap),
                None => break,
            }
        }
    }

    /// Resolves when the fleet cap or the connections under it change;
    /// never without a fleet budget.
    pub(super) async fn fleet_cap_changed(
        &self,
        rx: &mut Option<tokio::sync::watch::Receiver<()>>,
    ) {
        match rx {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// Room under the fleet cap for the `min_idle` refill (no limit
    /// without a budget).
    pub(super) fn fleet_room(&self) -> u32 {
        self.fleet.as_ref().map_or(u32::MAX, |f| f.room())
    }
}

/// Counts a checkout as waiting at the fleet cap from its first wait until
/// it ends, however it ends (a connection, room, its deadline, its client
/// gone).
struct WaitingAtCap<'a> {
    fleet: &'a FleetCap,
    counted: bool,
}

impl WaitingAtCap<'_> {
    fn count(&mut self) {
        if !self.counted {
            self.counted = true;
            self.fleet.waits.fetch_add(1, Ordering::Relaxed);
            self.fleet.waiting.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for WaitingAtCap<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.fleet.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
