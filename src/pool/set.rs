//! Every configured upstream's pool, looked up by name on each Acquire.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tokio::sync::watch;

use super::{Pool, ReadySignal};
use crate::config::UpstreamConfig;
use crate::discovery::Resolver;

/// The pools, in configuration order. Immutable after start.
pub(crate) struct PoolSet {
    pools: Vec<Arc<Pool>>,
    by_name: HashMap<String, usize>,
    /// Shared by every pool: raised when any pool's readiness may change.
    ready_signal: ReadySignal,
}

impl PoolSet {
    /// Builds one pool per upstream; connection ids are unique across them.
    /// Must run inside a tokio runtime. Dials nothing until [`PoolSet::start`].
    pub(crate) fn new(upstreams: &[UpstreamConfig]) -> Self {
        let next_conn_id = Arc::new(AtomicU64::new(1));
        let ready_signal: ReadySignal = Arc::new(watch::channel(()).0);
        let pools: Vec<_> = upstreams
            .iter()
            .map(|u| Pool::new(u.clone(), next_conn_id.clone(), ready_signal.clone()))
            .collect();
        let by_name = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name().to_owned(), i))
            .collect();
        Self {
            pools,
            by_name,
            ready_signal,
        }
    }

    /// Changes whenever some pool's readiness may have changed (or
    /// [`PoolSet::signal_readiness`] was called).
    pub(crate) fn readiness_changes(&self) -> watch::Receiver<()> {
        self.ready_signal.subscribe()
    }

    /// Wakes readiness watchers for a change outside the pools (a drain).
    pub(crate) fn signal_readiness(&self) {
        self.ready_signal.send_replace(());
    }

    /// Starts each pool's discovery source and maintenance loop (which also
    /// makes the startup dial) on `tracker`, stopped by `cancel`. `resolver`
    /// serves DNS discovery.
    pub(crate) fn start(
        &self,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
        resolver: Arc<dyn Resolver>,
    ) {
        for pool in &self.pools {
            crate::discovery::start(
                pool.config(),
                pool.endpoints().clone(),
                resolver.clone(),
                tracker,
                cancel,
            );
            tracker.spawn(pool.clone().maintain(cancel.clone()));
        }
    }

    /// The pool named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name).map(|&i| &self.pools[i])
    }

    /// All pools, in configuration order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.iter()
    }

    /// The configured names, in order.
    pub(crate) fn names(&self) -> Vec<&str> {
        self.pools.iter().map(|p| p.name()).collect()
    }

    /// Waits for every pool's background probes (after [`PoolSet::close`]).
    pub(crate) async fn wait_tasks(&self) {
        for pool in &self.pools {
            pool.wait_tasks().await;
        }
    }

    /// Closes every pool (shutdown).
    pub(crate) fn close(&self) {
        for pool in &self.pools {
            pool.close();
        }
    }
}

/// Longest upstream name an error message repeats back.
const NAME_ECHO_MAX: usize = 64;

/// A client-supplied upstream name as an error message may repeat it: cut to
/// `NAME_ECHO_MAX` bytes (on a character boundary), with the full length
/// said. A 20 kB name must not turn NOT_FOUND into a metadata-size error.
pub(crate) fn printable_name(name: &str) -> String {
    if name.len() <= NAME_ECHO_MAX {
        return name.to_owned();
    }
    let mut end = NAME_ECHO_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &name[..end], name.len())
}
