//! Every configured upstream's pool, looked up by name on each Acquire.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tokio::sync::watch;

use super::{Pool, ReadySignal};
use crate::config::UpstreamConfig;
use crate::discovery::Resolver;

/// The pools, in configuration order. A reload swaps in a new list (new
/// and changed upstreams' pools, warmed first); lookups take the current one.
pub(crate) struct PoolSet {
    current: RwLock<Arc<Pools>>,
    /// Shared by every pool: raised when any pool's readiness may change.
    ready_signal: ReadySignal,
    /// Connection ids are unique across every pool, old and new.
    next_conn_id: Arc<AtomicU64>,
    /// Where pools run, once started: a reload starts new ones there.
    runner: Mutex<Option<Runner>>,
    /// Pools a reload replaced or removed, draining: closed at shutdown.
    retired: Mutex<Vec<Arc<Pool>>>,
}

/// One list of pools, with its index.
struct Pools {
    list: Vec<Arc<Pool>>,
    by_name: HashMap<String, usize>,
}

impl Pools {
    fn new(list: Vec<Arc<Pool>>) -> Self {
        let by_name = list
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name().to_owned(), i))
            .collect();
        Self { list, by_name }
    }
}

/// What starting a pool needs.
#[derive(Clone)]
struct Runner {
    tracker: TaskTracker,
    cancel: CancellationToken,
    resolver: Arc<dyn Resolver>,
    /// Each pool's own stop, a child of `cancel`: a retired pool's loops end.
    stops: HashMap<usize, CancellationToken>,
}

/// What a reload did to the upstreams.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Reloaded {
    /// Upstreams that did not exist.
    pub added: Vec<String>,
    /// Upstreams whose settings changed (a new pool replaced the old one).
    pub changed: Vec<String>,
    /// Upstreams no longer configured.
    pub removed: Vec<String>,
}

/// A reload refused because a new pool could not open a session within its
/// warm-up time while the pool it would replace serves (or, for a new
/// upstream, while it would gate readiness): nothing was swapped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Each upstream whose new pool did not warm, and why (its last dial
    /// error, or what it still lacked).
    pub not_warm: Vec<(String, String)>,
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
        Self {
            current: RwLock::new(Arc::new(Pools::new(pools))),
            ready_signal,
            next_conn_id,
            runner: Mutex::new(None),
            retired: Mutex::new(Vec::new()),
        }
    }

    fn current(&self) -> Arc<Pools> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
        let mut runner = Runner {
            tracker: tracker.clone(),
            cancel: cancel.clone(),
            resolver,
            stops: HashMap::new(),
        };
        for pool in &self.current().list {
            runner.run(pool);
        }
        *self.runner.lock().unwrap_or_else(PoisonError::into_inner) = Some(runner);
    }

    /// The pool named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Pool>> {
        let current = self.current();
        current.by_name.get(name).map(|&i| current.list[i].clone())
    }

    /// All pools, in configuration order.
    pub(crate) fn all(&self) -> Vec<Arc<Pool>> {
        self.current().list.clone()
    }

    /// The configured names, in order.
    pub(crate) fn names(&self) -> Vec<String> {
        self.current()
            .list
            .iter()
            .map(|p| p.name().to_owned())
            .collect()
    }

    /// Applies a reloaded list of upstreams: a pool for each new or changed
    /// upstream is started and warmed (until ready, or `warm_for`) before it
    /// takes the name; an unchanged upstream keeps its pool and
    /// connections; a replaced or removed pool drains: its idle connections
    /// close now, its leased ones when their lease ends.
    ///
    /// The swap is all or nothing: when a new pool is not ready by the end
    /// of its warm-up while the pool it replaces is ready (a wrong password,
    /// an unreachable new address), or a new `required` upstream is not,
    /// every new pool is closed and the running pools stay: [`Refused`].
    pub(crate) async fn reload(
        &self,
        upstreams: &[UpstreamConfig],
        warm_for: std::time::Duration,
    ) -> Result<Reloaded, Refused> {
        let old = self.current();
        let mut done = Reloaded::default();
        let mut list = Vec::with_capacity(upstreams.len());
        // Each new pool, with whether it must be ready to take its name.
        let mut fresh: Vec<(Arc<Pool>, bool)> = Vec::new();
        for u in upstreams {
            match old.by_name.get(&u.name).map(|&i| &old.list[i]) {
                Some(pool) if pool.config() == u => list.push(pool.clone()),
                existing => {
                    let pool = Pool::new(
                        u.clone(),
                        self.next_conn_id.clone(),
                        self.ready_signal.clone(),
                    );
                    let must_warm = match existing {
                        Some(serving) => {
                            done.changed.push(u.name.clone());
                            serving.ready()
                        }
                        None => {
                            done.added.push(u.name.clone());
                            u.readiness == crate::config::ReadinessRole::Required
                        }
                    };
                    fresh.push((pool.clone(), must_warm));
                    list.push(pool);
                }
            }
        }
        let runner = self
            .runner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(mut runner) = runner {
            for (pool, _) in &fresh {
                runner.run(pool);
            }
            let deadline = tokio::time::Instant::now() + warm_for;
            for (pool, _) in &fresh {
                pool.warm(deadline).await;
            }
            let not_warm: Vec<(String, String)> = fresh
                .iter()
                .filter(|(pool, must)| *must && !pool.ready())
                .map(|(pool, _)| (pool.name().to_owned(), why_not_ready(pool)))
                .collect();
            if !not_warm.is_empty() {
                for (pool, _) in &fresh {
                    if let Some(stop) = runner.stops.remove(&(Arc::as_ptr(pool) as usize)) {
                        stop.cancel();
                    }
                    pool.close();
                }
                self.signal_readiness();
                return Err(Refused { not_warm });
            }
            if let Some(r) = self
                .runner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
            {
                r.stops.extend(runner.stops.drain());
            }
        }
        let kept: std::collections::HashSet<*const Pool> = list.iter().map(Arc::as_ptr).collect();
        let gone: Vec<Arc<Pool>> = old
            .list
            .iter()
            .filter(|p| !kept.contains(&Arc::as_ptr(p)))
            .cloned()
            .collect();
        for pool in &gone {
            if !upstreams.iter().any(|u| u.name == pool.name()) {
                done.removed.push(pool.name().to_owned());
            }
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Pools::new(list));
        for pool in gone {
            if let Some(stop) = self
                .runner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
                .and_then(|r| r.stops.remove(&(Arc::as_ptr(&pool) as usize)))
            {
                stop.cancel();
            }
            pool.retire();
            self.retired
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(pool);
        }
        self.signal_readiness();
        Ok(done)
    }

    /// Waits for every pool's background probes (after [`PoolSet::close`]).
    pub(crate) async fn wait_tasks(&self) {
        for pool in self.all_with_retired() {
            pool.wait_tasks().await;
        }
    }

    /// Closes every pool, retired ones included (shutdown).
    pub(crate) fn close(&self) {
        for pool in self.all_with_retired() {
            pool.close();
        }
    }

    fn all_with_retired(&self) -> Vec<Arc<Pool>> {
        let mut all = self.all();
        all.extend(
            self.retired
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .cloned(),
        );
        all
    }
}

/// Why a new pool is not ready, for the log of a refused reload.
fn why_not_ready(pool: &Pool) -> String {
    let facts = pool.readiness();
    match facts.last_dial_error {
        Some(e) => format!("cannot open a session: {e}"),
        None if !facts.source.synced => facts.source.detail,
        None if !facts.any_usable => "no ready endpoint".to_owned(),
        None => "no session opened within the warm-up time".to_owned(),
    }
}

impl Runner {
    /// Starts `pool`'s discovery and maintenance under a stop of its own.
    fn run(&mut self, pool: &Arc<Pool>) {
        let stop = self.cancel.child_token();
        crate::discovery::start(
            pool.config(),
            pool.endpoints().clone(),
            self.resolver.clone(),
            &self.tracker,
            &stop,
        );
        if let Some(gate) = pool.fleet_cap() {
            crate::fleet::start(pool.config(), gate.clone(), &self.tracker, &stop);
        }
        self.tracker.spawn(pool.clone().maintain(stop.clone()));
        self.stops.insert(Arc::as_ptr(pool) as usize, stop);
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
