//! The dynamic cap of one upstream's pool: how many connections this
//! sidecar may hold right now (open ones plus dials under way).
//!
//! The engines are built with the fixed `pool.max_size`; this gate sits in
//! front of every dial instead. A dial takes a [`CapSlot`] first and the
//! connection carries it until it closes, so [`FleetCap::held`] is exactly the
//! sockets this sidecar has (or is opening) to the upstream: the number the
//! fleet's invariant is about. Taking a slot is a compare-and-swap against the
//! cap, so two concurrent dials can never both take the last one.
//!
//! Lowering the cap closes nothing by itself: the pool closes idle
//! connections above it at once and leased ones as they come back, and the
//! coordination loop publishes a lower claim only once `held` is that low.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, watch};

/// How this sidecar's cap is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FleetMode {
    /// Waiting for the first answer from the Kubernetes API: the cap is 0.
    Starting,
    /// Coordinated with the group through Leases.
    Coordinated,
    /// No Kubernetes API (no service account, no `POD_NAME`): the budget is
    /// a local cap.
    Local,
    /// This sidecar could not renew its Lease within the lease duration:
    /// the group no longer counts it, so it holds nothing new (cap 0).
    Fenced,
}

impl FleetMode {
    /// The name shown in `Stats`, metrics and `/readyz?verbose`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Coordinated => "coordinated",
            Self::Local => "local",
            Self::Fenced => "fenced",
        }
    }
}

/// What the coordination loop last knew, for `Stats`, metrics and readiness.
#[derive(Debug, Clone)]
pub(crate) struct FleetView {
    /// The configured budget.
    pub(crate) budget: u32,
    /// The group's name.
    pub(crate) group: String,
    /// This sidecar's published (and accepted) claim.
    pub(crate) claim: u32,
    /// The sum of the live claims of the group, this sidecar's included.
    pub(crate) claimed_total: u32,
    /// Live peers, this sidecar included.
    pub(crate) live_peers: u32,
    /// This sidecar's fair share (before `pool.max_size`).
    pub(crate) share: u32,
    /// How the cap is decided now.
    pub(crate) mode: FleetMode,
    /// The last problem talking to the API, if any.
    pub(crate) last_error: Option<String>,
}

/// A point-in-time view of the gate and the group.
#[derive(Debug, Clone)]
pub(crate) struct FleetSnapshot {
    /// What the coordination loop knew.
    pub(crate) view: FleetView,
    /// The effective cap.
    pub(crate) cap: u32,
    /// Connections open or being dialed.
    pub(crate) held: u32,
    /// Checkouts waiting at the cap now.
    pub(crate) waiting: u32,
    /// Checkouts that waited at the cap.
    pub(crate) waits: u64,
    /// Checkouts that timed out at the cap.
    pub(crate) timeouts: u64,
}

/// One upstream's cap gate, shared by its pool (dials, checkouts, returns)
/// and its coordination loop.
#[derive(Debug)]
pub(crate) struct FleetCap {
    /// `pool.max_size`: the cap never exceeds it.
    max_size: u32,
    /// The effective cap now.
    cap: AtomicU32,
    /// Connections open or being dialed (each holds a [`CapSlot`]).
    held: AtomicU32,
    /// Wakes checkouts waiting at the cap: the cap rose, a slot was
    /// freed, a connection came back idle.
    room: Notify,
    /// Bumped whenever `cap` or `held` changes: the pool's maintenance loop
    /// trims idle connections on it, the coordination loop lowers its claim.
    changes: watch::Sender<()>,
    /// Bumped when a dial was refused at the cap (bb8 hides dial errors from
    /// its waiters, so a checkout learns of it here).
    refusals: watch::Sender<u64>,
    /// Checkouts waiting because of the cap (gauge).
    pub(crate) waiting: AtomicU32,
    /// Checkouts that had to wait because of the cap.
    pub(crate) waits: AtomicU64,
    /// Checkouts whose deadline passed while waiting at the cap.
    pub(crate) timeouts: AtomicU64,
    /// The pool shut down (not merely retired by a reload): the Lease may
    /// be deleted.
    closed: std::sync::atomic::AtomicBool,
    view: Mutex<FleetView>,
}

impl FleetCap {
    /// A gate with cap 0 (a new pod claims nothing until the group agrees).
    pub(crate) fn new(max_size: u32, budget: u32, group: String) -> Arc<Self> {
        Arc::new(Self {
            max_size,
            cap: AtomicU32::new(0),
            held: AtomicU32::new(0),
            room: Notify::new(),
            changes: watch::Sender::new(()),
            refusals: watch::Sender::new(0),
            waiting: AtomicU32::new(0),
            waits: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            view: Mutex::new(FleetView {
                budget,
                group,
                claim: 0,
                claimed_total: 0,
                live_peers: 0,
                share: 0,
                mode: FleetMode::Starting,
                last_error: None,
            }),
        })
    }

    /// The effective cap: at most `pool.max_size`.
    pub(crate) fn cap(&self) -> u32 {
        self.cap.load(Ordering::Acquire)
    }

    /// Connections open or being dialed.
    pub(crate) fn held(&self) -> u32 {
        self.held.load(Ordering::Acquire)
    }

    /// `pool.max_size`.
    pub(crate) fn max_size(&self) -> u32 {
        self.max_size
    }

    /// Sets the cap (clamped to `pool.max_size`). Raising it wakes waiting
    /// checkouts; lowering it makes the pool close idle connections above it.
    pub(crate) fn set_cap(&self, cap: u32) {
        let cap = cap.min(self.max_size);
        let old = self.cap.swap(cap, Ordering::AcqRel);
        if old != cap {
            if cap > old {
                self.room.notify_waiters();
            }
            self.changes.send_replace(());
        }
    }

    /// The pool shut down: nothing more is dialed.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.set_cap(0);
        self.changes.send_replace(());
    }

    /// Whether the pool shut down.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether a dial could take a slot now.
    pub(crate) fn has_room(&self) -> bool {
        self.held() < self.cap()
    }

    /// How many more connections may be dialed now.
    pub(crate) fn room(&self) -> u32 {
        self.cap().saturating_sub(self.held())
    }

    /// Whether this sidecar holds more than its cap (it is shrinking).
    pub(crate) fn over(&self) -> bool {
        self.held() > self.cap()
    }

    /// Takes a slot for a dial, or `None` at the cap.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<CapSlot> {
        let cap = self.cap();
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < cap).then_some(held + 1)
            })
            .is_ok();
        if taken {
            self.changes.send_replace(());
            Some(CapSlot { gate: self.clone() })
        } else {
            self.refusals.send_modify(|n| *n += 1);
            None
        }
    }

    /// Wakes checkouts waiting at the cap (a connection came back idle).
    pub(crate) fn returned(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.room.notify_waiters();
        }
    }

    /// The `room` notification, to be enabled before checking the state.
    pub(crate) fn room_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    /// Changes of `cap` or `held`.
    pub(crate) fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// Dials refused at the cap.
    pub(crate) fn subscribe_refusals(&self) -> watch::Receiver<u64> {
        self.refusals.subscribe()
    }

    /// What the coordination loop last knew.
    pub(crate) fn view(&self) -> FleetView {
        self.view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Everything `Stats`, metrics and readiness show.
    pub(crate) fn snapshot(&self) -> FleetSnapshot {
        FleetSnapshot {
            view: self.view(),
            cap: self.cap(),
            held: self.held(),
            waiting: self.waiting.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
        }
    }

    /// Updates the view (the coordination loop).
    pub(crate) fn update_view(&self, f: impl FnOnce(&mut FleetView)) {
        f(&mut self.view.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// One connection's (or dial's) place under the cap; freed on drop.
#[derive(Debug)]
pub(crate) struct CapSlot {
    gate: Arc<FleetCap>,
}

impl Drop for CapSlot {
    fn drop(&mut self) {
        self.gate.held.fetch_sub(1, Ordering::AcqRel);
        self.gate.room.notify_waiters();
        self.gate.changes.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_never_exceed_the_cap_and_free_on_drop() {
        let gate = FleetCap::new(5, 20, "g".into());
        assert!(gate.try_acquire().is_none(), "a new pod starts at 0");
        gate.set_cap(2);
        let a = gate.try_acquire().unwrap();
        let b = gate.try_acquire().unwrap();
        assert!(gate.try_acquire().is_none());
        assert_eq!(gate.held(), 2);
        gate.set_cap(1);
        assert!(gate.over());
        drop(a);
        assert!(!gate.over());
        assert_eq!(gate.room(), 0);
        drop(b);
        assert_eq!(gate.room(), 1);
        gate.set_cap(50);
        assert_eq!(gate.cap(), 5, "max_size is the ceiling");
    }

    #[test]
    fn concurrent_acquires_respect_the_cap() {
        let gate = FleetCap::new(1000, 1000, "g".into());
        gate.set_cap(100);
        let slots: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let gate = gate.clone();
                    s.spawn(move || {
                        (0..50)
                            .filter_map(|_| gate.try_acquire())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(slots.len(), 100);
        assert_eq!(gate.held(), 100);
        drop(slots);
        assert_eq!(gate.held(), 0);
    }
}
