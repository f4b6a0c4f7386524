//! What the native listeners count, for `/metrics`: kept per upstream name,
//! so the figures of a listener carry across config reloads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Every listener's counts, by upstream.
#[derive(Debug, Default)]
pub(crate) struct ListenerStats {
    by_upstream: Mutex<BTreeMap<String, Arc<Counts>>>,
}

/// One listener's counts.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Clients connected now.
    pub(crate) clients: AtomicU64,
    /// Clients accepted since start.
    pub(crate) connections: AtomicU64,
    /// Redis batches carried by the shared lane.
    pub(crate) shared_batches: AtomicU64,
    /// Redis batches that held a connection of their own.
    pub(crate) held_batches: AtomicU64,
    /// Whether the listener speaks Redis (batches are counted).
    pub(crate) redis: std::sync::atomic::AtomicBool,
}

impl ListenerStats {
    /// The counts of `upstream`'s listener (made on first use).
    pub(crate) fn of(&self, upstream: &str) -> Arc<Counts> {
        self.by_upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(upstream.to_owned())
            .or_default()
            .clone()
    }

    /// Every listener's counts, by upstream name.
    pub(crate) fn snapshot(&self) -> Vec<(String, Arc<Counts>)> {
        self.by_upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Counts {
    /// Counts a client in; the guard counts it out when dropped.
    pub(crate) fn client(self: &Arc<Self>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
        ClientGuard(self.clone())
    }
}

/// A connected client, counted until dropped.
pub(crate) struct ClientGuard(Arc<Counts>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}
