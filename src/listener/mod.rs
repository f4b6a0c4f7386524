//! Native listeners: the door for unmodified clients. An upstream with a
//! `listen:` block gets a local port (and/or Unix socket) that speaks its
//! protocol to the client, so `psql`, `pgbench` and every driver connect as
//! to the database itself. Each time a client holds a server connection is
//! a lease of the upstream's pool, through the same checkout, guard, session
//! tracker, restore rules, metrics and `/debug/leases` as a gRPC lease.
//!
//! - `postgres`: transaction or session pooling for PostgreSQL clients.

pub(crate) mod postgres;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lease::registry::Leases;
use crate::pool::PoolSet;

/// What every native listener shares with the rest of the sidecar.
#[derive(Clone)]
pub(crate) struct Shared {
    /// The pools, looked up by name at each checkout (so reloads apply).
    pub pools: Arc<PoolSet>,
    /// Live leases, for `/debug/leases`.
    pub leases: Arc<Leases>,
    /// Drain: stop accepting; idle clients are told to go.
    pub stop_accepting: CancellationToken,
    /// Grace over: whatever is still held ends now.
    pub revoke: CancellationToken,
    /// Every open client holds a receiver, so the drain waits for them as
    /// for gRPC clients.
    pub open: watch::Sender<()>,
    /// Every client task belongs to it.
    pub tracker: TaskTracker,
}
