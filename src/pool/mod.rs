//! One upstream's pool: checkout with health checks under one deadline, the
//! leased-connection guard, and the background maintenance loop.
//!
//! The engines (bb8, deadpool) keep the idle list and count slots; every rule
//! users see lives here, identical for both:
//!
//! - a checkout is bounded by its deadline, whatever the engine does;
//! - `max_waiters` checkouts may be in progress; more fail at once;
//! - every checkout peeks the socket and probes it when it was quiet for
//!   `skip_if_used_within`; a failure evicts and the checkout moves on;
//! - a connection no lease has used yet is peeked but never probed on
//!   checkout (a broken probe cannot turn into a dial storm);
//! - `leased` counts [`Leased`] guards, so it equals the live leases.

mod bb8;
mod capped;
mod checkout;
mod conn;
mod connect;
mod deadpool;
mod engine;
mod error;
pub(crate) mod health;
mod leased;
mod maintain;
mod restore;
mod role;
mod set;
mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

pub(crate) use self::checkout::{VetFor, Vetted};
pub(crate) use self::conn::Conn;
pub(crate) use self::connect::{CONNECT_ERROR_REASONS, Dialer};
pub(crate) use self::engine::{Engine, EngineError, PoolConn};
pub(crate) use self::error::CheckoutError;
pub(crate) use self::leased::Leased;
pub(crate) use self::set::{PoolSet, printable_name};
pub(crate) use self::stats::{
    Counters, EXCHANGE_OUTCOMES, EvictReason, Histogram, HistogramSnapshot,
};

use crate::config::UpstreamConfig;
use crate::discovery::{EndpointSnapshot, SourceStatus};
use crate::telemetry::TARGET;

/// Raised when an input of some pool's readiness may have changed: a dial
/// outcome flipped, the last connection closed, the endpoints changed, the
/// pool closed, a drain began. Those are the only ways [`Pool::ready`] can
/// change, so whoever mirrors readiness (gRPC health) waits on this instead
/// of polling. A watch, not a notification: a change is never missed.
pub(crate) type ReadySignal = Arc<tokio::sync::watch::Sender<()>>;

/// What readiness is decided from, at one instant.
#[derive(Debug, Clone)]
pub(crate) struct PoolReadiness {
    /// The verdict ([`Pool::ready`]).
    pub ready: bool,
    /// The pool is shut down.
    pub closed: bool,
    /// The endpoint source's state.
    pub source: SourceStatus,
    /// Endpoints come from DNS or Kubernetes (their state is worth showing).
    pub discovered: bool,
    /// Some endpoint may take connections.
    pub any_usable: bool,
    /// Open connections.
    pub connections: u32,
    /// Idle connections.
    pub idle: u32,
    /// Connections held by leases.
    pub leased: u32,
    /// The last dial's error, if it failed.
    pub last_dial_error: Option<String>,
    /// Paused by an operator (shown; it does not make the pod unready).
    pub paused: bool,
    /// TLS towards the upstream (shown in `/readyz?verbose`).
    pub tls: Option<crate::net::TlsStatus>,
    /// The wanted role and each endpoint's, for an upstream that wants one.
    pub roles: Option<String>,
    /// The fleet budget (shown in `/readyz?verbose`).
    pub fleet: Option<crate::fleet::FleetSnapshot>,
}

/// A point-in-time view of a pool, for `Stats`, metrics and readiness.
#[derive(Debug, Clone)]
pub(crate) struct PoolSnapshot {
    /// The upstream's name.
    pub name: String,
    /// `bb8` or `deadpool`.
    pub engine: &'static str,
    /// `tcp` or `redis`.
    pub protocol: &'static str,
    /// Exchange calls by outcome.
    pub exchanges: Vec<(&'static str, u64)>,
    /// Configured `max_size`.
    pub max_size: u32,
    /// Open connections.
    pub connections: u32,
    /// Idle connections.
    pub idle: u32,
    /// Connections held by live leases.
    pub leased: u32,
    /// Checkouts in progress.
    pub waiting: u32,
    /// Leases granted so far.
    pub leases_granted: u64,
    /// Dials that succeeded.
    pub connections_created: u64,
    /// Dials that failed.
    pub connect_errors: u64,
    /// Closed connections by reason (every reason present, zeros included).
    pub evictions: Vec<(EvictReason, u64)>,
    /// Checks run.
    pub health_checks: u64,
    /// Checks failed.
    pub health_check_failures: u64,
    /// Checkouts that hit their deadline.
    pub checkout_timeouts: u64,
    /// Whether the upstream can serve a lease now.
    pub ready: bool,
    /// Paused by an operator: checkouts wait.
    pub paused: bool,
    /// Every endpoint (one for a static address).
    pub endpoints: Vec<EndpointSnapshot>,
    /// TLS towards the upstream; `None`: plain TCP.
    pub tls: Option<crate::net::TlsStatus>,
    /// The fleet budget, for an upstream with a `fleet:` block.
    pub fleet: Option<crate::fleet::FleetSnapshot>,
}

/// One upstream's pool. Shared as `Arc<Pool>` by the gRPC service, leases and
/// the maintenance loop.
pub(crate) struct Pool {
    config: UpstreamConfig,
    engine: Engine,
    dialer: Arc<Dialer>,
    counters: Arc<Counters>,
    /// Wakes the maintenance loop after a checkout or eviction, so `min_idle`
    /// refills within a scheduler tick instead of a sweep interval.
    refill_wanted: Notify,
    /// Raised when an input of [`Pool::ready`] may have changed.
    ready_signal: ReadySignal,
    closed: AtomicBool,
    /// Probes that outlive the checkout that started them.
    tasks: TaskTracker,
    /// `lessor pause`: checkouts wait (bounded by their deadline) until
    /// `resume`; live leases carry on.
    paused: tokio::sync::watch::Sender<bool>,
    /// `lessor reconnect`: connections dialed before this instant are
    /// closed at their next return, or at once when idle.
    reconnect_before: std::sync::Mutex<Option<std::time::Instant>>,
    /// A reload replaced or removed this pool: every connection it still
    /// has is closed at its return, whenever it was dialed.
    retired: AtomicBool,
    /// The fleet budget's cap, for an upstream with a `fleet:` block.
    fleet: Option<Arc<crate::fleet::FleetCap>>,
}

/// How long the CancelRequest for an evicted session's query may take.
const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Pool {
    /// Builds the pool. Connections are dialed by the maintenance loop
    /// ([`Pool::maintain`]) and by checkouts, never here.
    pub(crate) fn new(
        config: UpstreamConfig,
        next_conn_id: Arc<AtomicU64>,
        ready_signal: ReadySignal,
    ) -> Arc<Self> {
        let counters = Arc::new(Counters::default());
        let tls = config.tls_enabled().map(|tls| {
            let tls = crate::net::Tls::new(tls, &config.source);
            if let Some(error) = tls.status().last_reload_error {
                tracing::error!(upstream = %config.name, %error, "TLS files unusable; dials fail until they are fixed");
            }
            Arc::new(tls)
        });
        let fleet = crate::fleet::gate_for(&config);
        let dialer = Arc::new(
            Dialer::new(
                crate::discovery::endpoint_set(&config),
                &config.pool,
                next_conn_id,
                counters.clone(),
                ready_signal.clone(),
                crate::protocol::Opener::for_upstream(&config),
                tls,
            )
            .with_fleet_cap(fleet.clone()),
        );
        let engine = Engine::new(config.engine, dialer.clone(), config.pool.max_size);
        Arc::new(Self {
            config,
            engine,
            dialer,
            counters,
            refill_wanted: Notify::new(),
            ready_signal,
            closed: AtomicBool::new(false),
            paused: tokio::sync::watch::Sender::new(false),
            reconnect_before: std::sync::Mutex::new(None),
            retired: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            fleet,
        })
    }

    /// The upstream's name.
    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    /// The upstream's configuration.
    pub(crate) fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Dials one connection and drops it (the benchmark's dial timing).
    pub(crate) async fn dial_once(&self) -> Result<(), connect::DialError> {
        self.dialer.dial().await.map(drop)
    }

    /// The upstream's TLS client, when dials use TLS.
    pub(crate) fn dialer_tls(&self) -> Option<Arc<crate::net::Tls>> {
        self.dialer.tls().cloned()
    }

    /// The upstream's endpoints.
    pub(crate) fn endpoints(&self) -> &Arc<crate::discovery::EndpointSet> {
        self.dialer.endpoints()
    }

    /// The live counters.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Checks a connection out for a lease, waiting at most `timeout`.
    /// Wakes the maintenance loop when the pool is below what it keeps warm.
    /// Checked here, not there: a wake-up per lease would cost more than the
    /// lease.
    fn poke(&self) {
        if self.engine.size() == 0 || self.idle() < self.config.pool.min_idle() {
            self.refill_wanted.notify_one();
        }
    }

    /// Runs work that finishes with one of the pool's connections (a probe
    /// that outlived its checkout, a session being restored) in a task the
    /// pool owns, so shutdown waits for it.
    pub(crate) fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }

    /// Waits for probes that outlived their checkouts (after [`Pool::close`]).
    pub(crate) async fn wait_tasks(&self) {
        self.tasks.wait().await;
    }

    /// Closes a connection and counts why.
    pub(crate) fn evict(&self, conn: PoolConn, reason: EvictReason) {
        // A span event on the lease or checkout this happens in (none in the
        // background sweep).
        tracing::info!(
            target: TARGET,
            { lessor.evict.reason = reason.as_str(), lessor.connection.id = conn.id() as i64 },
            "eviction"
        );
        self.counters.evicted(reason);
        self.cancel_running(&conn);
        conn.discard();
        if self.engine.size() == 0 {
            // The last connection: readiness now rests on the last dial.
            self.ready_signal.send_replace(());
        }
        self.poke();
    }

    /// Closing a PostgreSQL connection leaves the backend running its
    /// query (it notices only when it next writes): when the last lease
    /// left one running, the session's CancelRequest goes out too, in a
    /// task of the pool's.
    fn cancel_running(&self, conn: &Conn) {
        let Some(backend) = conn.backend.as_deref().filter(|b| b.busy) else {
            return;
        };
        let Some(secret) = backend.secret_i32() else {
            return;
        };
        let (endpoint, pid) = (conn.endpoint(), backend.pid);
        let tls = self.dialer_tls();
        self.spawn(async move {
            let sent =
                crate::protocol::postgres::cancel::send(endpoint, pid, secret, CANCEL_TIMEOUT, tls)
                    .await;
            if let Err(error) = sent {
                tracing::debug!(%endpoint, %error, "cancel of an evicted session's query failed");
            }
        });
    }

    /// Open connections right now.
    pub(crate) fn connections(&self) -> u32 {
        self.engine.size()
    }

    /// Idle connections right now.
    pub(crate) fn idle(&self) -> u32 {
        self.engine.idle(&self.counters)
    }

    /// Whether the upstream can serve a lease: discovery has synced and
    /// knows a ready endpoint, and its last dial succeeded or it holds a
    /// connection that has not failed a check since. Saturation plays no
    /// part.
    pub(crate) fn ready(&self) -> bool {
        let endpoints = self.dialer.endpoints();
        !self.closed.load(Ordering::Acquire)
            && endpoints.status().synced
            && endpoints.any_usable()
            && match self.dialer.last_dial_ok() {
                Some(ok) => ok || self.engine.size() > 0,
                None => false,
            }
    }

    /// Whether the upstream can serve a lease, and the facts behind it;
    /// `admin::readiness` words them for `/readyz?verbose`.
    pub(crate) fn readiness(&self) -> PoolReadiness {
        let endpoints = self.dialer.endpoints();
        PoolReadiness {
            ready: self.ready(),
            closed: self.closed.load(Ordering::Acquire),
            source: endpoints.status(),
            discovered: self.config.source.is_discovered(),
            any_usable: endpoints.any_usable(),
            connections: self.engine.size(),
            idle: self.idle(),
            leased: self.counters.leased.load(Ordering::Relaxed),
            last_dial_error: self.dialer.last_error(),
            paused: self.is_paused(),
            tls: self.dialer.tls().map(|t| t.status()),
            roles: self.roles_detail(),
            fleet: self.fleet.as_ref().map(|f| f.snapshot()),
        }
    }

    /// For an upstream that wants a role: which it wants and what each
    /// endpoint's server last said, for `/readyz?verbose`.
    pub(crate) fn roles_detail(&self) -> Option<String> {
        let wanted = self.config.role;
        if wanted == crate::config::Role::Any {
            return None;
        }
        let endpoints: Vec<String> = self
            .dialer
            .endpoints()
            .snapshot()
            .into_iter()
            .map(|e| {
                let role = e.role.map_or("role unknown", |r| r.as_str());
                format!("{} {role}", e.target)
            })
            .collect();
        let split = match self.dialer.endpoints().primaries() {
            n if n > 1 => format!("; {n} endpoints report being the primary (split brain?)"),
            _ => String::new(),
        };
        Some(format!(
            "role {}: {}{split}",
            wanted.as_str(),
            endpoints.join(", ")
        ))
    }

    /// Stops granting connections: checkouts wait until [`Pool::resume`]
    /// (or their deadline); live leases are not touched.
    pub(crate) fn pause(&self) {
        if !self.paused.send_replace(true) {
            tracing::info!(upstream = %self.config.name, "upstream paused");
        }
    }

    /// Grants connections again; waiting checkouts proceed.
    pub(crate) fn resume(&self) {
        if self.paused.send_replace(false) {
            tracing::info!(upstream = %self.config.name, "upstream resumed");
        }
    }

    /// Whether the upstream is paused.
    pub(crate) fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Waits until the upstream is not paused; false when `deadline`
    /// passes first.
    pub(crate) async fn unpaused(&self, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.paused.subscribe();
        tokio::time::timeout_at(deadline, rx.wait_for(|paused| !*paused))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Every connection dialed until now is replaced: idle ones are closed
    /// at once, leased ones when their lease ends, and `min_idle` refills
    /// with new dials (a failover's new address, a rotated password).
    pub(crate) fn reconnect(&self) {
        let now = std::time::Instant::now();
        *self
            .reconnect_before
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now);
        let mut keep = Vec::new();
        while let Some(conn) = self.engine.try_get_idle(&self.counters) {
            if self.superseded(&conn) {
                self.evict(conn, EvictReason::Reconnect);
            } else {
                keep.push(conn);
            }
            if keep.len() >= self.config.pool.max_size as usize {
                break;
            }
        }
        for conn in keep.into_iter().rev() {
            conn.put_back();
        }
        tracing::info!(upstream = %self.config.name, "reconnect: connections dialed before now are replaced");
        self.refill_wanted.notify_one();
    }

    /// Takes the pool out of service after a reload replaced or removed its
    /// upstream: every connection is replaced (idle ones close now, leased
    /// ones at their return); checkouts already under way still finish.
    pub(crate) fn retire(&self) {
        tracing::info!(upstream = %self.config.name, "pool retired by a reload");
        self.retired.store(true, Ordering::Release);
        self.reconnect();
    }

    /// Waits until the pool is ready (a new pool of a reload), or until
    /// `deadline`.
    pub(crate) async fn warm(&self, deadline: tokio::time::Instant) {
        let mut changes = self.ready_signal.subscribe();
        while !self.ready() && tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
        }
    }

    /// Whether `lessor reconnect` replaced this connection.
    pub(crate) fn superseded(&self, conn: &Conn) -> bool {
        self.reconnect_before
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|before| conn.born() < before)
    }

    /// Whether a reload retired this pool: a connection coming back is
    /// closed, whenever it was dialed (a checkout that was already under way
    /// at the swap still gets one, and uses it once).
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Dials under way now (connections the pool is opening).
    pub(crate) fn connecting(&self) -> u32 {
        self.dialer.in_flight()
    }

    /// Counters and gauges for `Stats`.
    pub(crate) fn snapshot(&self) -> PoolSnapshot {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PoolSnapshot {
            name: self.config.name.clone(),
            engine: self.config.engine.as_str(),
            protocol: self.config.protocol.as_str(),
            paused: self.is_paused(),
            exchanges: EXCHANGE_OUTCOMES
                .iter()
                .zip(&c.exchanges)
                .map(|(outcome, n)| (*outcome, load(n)))
                .collect(),
            max_size: self.config.pool.max_size,
            connections: self.connections(),
            idle: self.idle(),
            leased: c.leased.load(Ordering::Relaxed),
            waiting: c.waiting.load(Ordering::Relaxed),
            leases_granted: load(&c.leases_granted),
            connections_created: load(&c.connections_created),
            connect_errors: load(&c.connect_errors),
            evictions: EvictReason::ALL
                .iter()
                .map(|r| (*r, c.evictions(*r)))
                .collect(),
            health_checks: load(&c.health_checks),
            health_check_failures: load(&c.health_check_failures),
            checkout_timeouts: load(&c.checkout_timeouts),
            ready: self.ready(),
            endpoints: self.dialer.endpoints().snapshot(),
            tls: self.dialer.tls().map(|t| t.status()),
            fleet: self.fleet.as_ref().map(|f| f.snapshot()),
        }
    }

    /// Refuses new checkouts and closes idle connections. Leased connections
    /// close as their leases end.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(fleet) = &self.fleet {
            fleet.close();
        }
        self.ready_signal.send_replace(());
        self.tasks.close();
        let idle = self.idle();
        self.engine.close(&self.counters);
        for _ in 0..idle {
            self.counters.evicted(EvictReason::Shutdown);
        }
    }
}
