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
mod conn;
mod connect;
mod deadpool;
mod engine;
pub(crate) mod health;
mod maintain;
mod set;
mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};
use tokio_util::task::TaskTracker;

pub(crate) use self::conn::Conn;
pub(crate) use self::connect::Dialer;
pub(crate) use self::engine::{Engine, EngineError, PoolConn};
pub(crate) use self::set::{PoolSet, printable_name};
pub(crate) use self::stats::{Counters, EvictReason, HistogramSnapshot};
use tracing::Instrument;

use crate::config::UpstreamConfig;
use crate::discovery::EndpointSnapshot;
use crate::telemetry::TARGET;

/// Bounds of a checkout's pause between a dial it could not use and its next
/// request to the engine.
const REDIAL_MIN: Duration = Duration::from_millis(5);
const REDIAL_MAX: Duration = Duration::from_millis(250);

/// Why a checkout produced no connection. Mapped to gRPC statuses in `grpc/`.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// Every slot stayed leased until the deadline.
    #[error(
        "pool exhausted: no connection came free within {waited:?} ({leased} of {max_size} leased)"
    )]
    Exhausted {
        /// How long the checkout waited.
        waited: Duration,
        /// Leased connections at the deadline.
        leased: u32,
        /// The pool's `max_size`.
        max_size: u32,
    },
    /// `max_waiters` checkouts were already waiting.
    #[error("pool exhausted: {0} checkouts already waiting (pool.max_waiters)")]
    TooManyWaiters(u32),
    /// Dials failed, or did not finish before the deadline.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// The pool is shutting down.
    #[error("pool is shutting down")]
    Closed,
    /// The deadline passed while a health check ran; the check finishes in
    /// the background, and a healthy connection goes back to the pool.
    #[error("checkout deadline of {waited:?} passed during a health check")]
    DeadlineExceeded {
        /// How long the checkout took.
        waited: Duration,
    },
}

/// A point-in-time view of a pool, for `Stats`, metrics and readiness.
#[derive(Debug, Clone)]
pub(crate) struct PoolSnapshot {
    /// The upstream's name.
    pub name: String,
    /// `bb8` or `deadpool`.
    pub engine: &'static str,
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
    /// Every endpoint (one for a static address).
    pub endpoints: Vec<EndpointSnapshot>,
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
    closed: AtomicBool,
    /// Probes that outlive the checkout that started them.
    tasks: TaskTracker,
}

/// A connection checked out for a lease. Counts as `leased` until finished;
/// dropping it unfinished evicts it as `client_abort`.
pub(crate) struct Leased {
    conn: Option<PoolConn>,
    pool: Arc<Pool>,
    /// Whether the connection served an earlier lease.
    pub reused: bool,
    /// Time spent in the checkout.
    pub waited: Duration,
}

impl Pool {
    /// Builds the pool. Connections are dialed by the maintenance loop
    /// ([`Pool::maintain`]) and by checkouts, never here.
    pub(crate) fn new(config: UpstreamConfig, next_conn_id: Arc<AtomicU64>) -> Arc<Self> {
        let counters = Arc::new(Counters::default());
        let dialer = Arc::new(Dialer::new(
            crate::discovery::endpoint_set(&config),
            &config.pool,
            next_conn_id,
            counters.clone(),
        ));
        let engine = Engine::new(config.engine, dialer.clone(), config.pool.max_size);
        Arc::new(Self {
            config,
            engine,
            dialer,
            counters,
            refill_wanted: Notify::new(),
            closed: AtomicBool::new(false),
            tasks: TaskTracker::new(),
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

    /// The upstream's endpoints.
    pub(crate) fn endpoints(&self) -> &Arc<crate::discovery::EndpointSet> {
        self.dialer.endpoints()
    }

    /// The live counters.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Checks a connection out for a lease, waiting at most `timeout`.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        timeout: Duration,
    ) -> Result<Leased, CheckoutError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(CheckoutError::Closed);
        }
        let max_waiters = self.config.pool.max_waiters;
        let waiting = WaitingGuard::enter(&self.counters);
        if waiting.before >= max_waiters {
            return Err(CheckoutError::TooManyWaiters(max_waiters));
        }
        let start = Instant::now();
        // Set while a probe runs for this checkout: a deadline that cuts one
        // short is the deadline's fault, not the upstream's.
        let probing = AtomicBool::new(false);
        // Fast path: a warm idle connection that needs no probe is vetted
        // with one peek, without arming a timer or subscribing to anything.
        let outcome = match self
            .engine
            .try_get_idle(&self.counters)
            .map(|c| self.vet(c, Instant::now(), VetFor::Checkout))
        {
            Some(Vetted::Ready(conn)) => Ok(Ok(conn)),
            Some(Vetted::NeedsProbe(conn)) => {
                tokio::time::timeout(timeout, self.checkout_loop(Some(conn), &probing)).await
            }
            Some(Vetted::Evicted) | None => {
                tokio::time::timeout(timeout, self.checkout_loop(None, &probing)).await
            }
        };
        drop(waiting);
        self.counters.checkout_wait.observe(start.elapsed());
        self.poke();
        let mut conn = match outcome {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                self.counters
                    .checkout_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                if probing.load(Ordering::Relaxed) {
                    return Err(CheckoutError::DeadlineExceeded {
                        waited: start.elapsed(),
                    });
                }
                return Err(self.timeout_error(start.elapsed()));
            }
        };
        let reused = conn.uses() > 0;
        conn.mark_leased();
        self.counters.leased.fetch_add(1, Ordering::Relaxed);
        self.counters.leases_granted.fetch_add(1, Ordering::Relaxed);
        Ok(Leased {
            conn: Some(conn),
            pool: self.clone(),
            reused,
            waited: start.elapsed(),
        })
    }

    /// What a deadline means depends on why the checkout was waiting: with
    /// every slot taken, the pool is exhausted; with room left, a dial was
    /// under way and did not finish.
    fn timeout_error(&self, waited: Duration) -> CheckoutError {
        let max_size = self.config.pool.max_size;
        if self.engine.size() < max_size {
            let why = match self.dialer.last_error() {
                Some(e) => format!("no connection within {waited:?} (last dial: {e})"),
                None => format!("dial did not finish within {waited:?}"),
            };
            self.unavailable(why)
        } else {
            CheckoutError::Exhausted {
                waited,
                leased: self.counters.leased.load(Ordering::Relaxed),
                max_size,
            }
        }
    }

    /// Waits for connections (idle, or dialed) and vets them until one
    /// passes. `first` is a connection the fast path already holds.
    async fn checkout_loop(
        self: &Arc<Self>,
        mut first: Option<PoolConn>,
        probing: &AtomicBool,
    ) -> Result<PoolConn, CheckoutError> {
        // bb8 dials in tasks of its own and hides their errors; a failure
        // seen here while waiting means the upstream is not answering.
        let mut failures = self.dialer.subscribe_failures();
        loop {
            let conn = match first.take() {
                Some(conn) => conn,
                None => {
                    let failed = tokio::select! {
                        biased;
                        got = self.engine.get(&self.counters).instrument(self.dial_span()) => match got {
                            Ok(conn) => Ok(conn),
                            Err(EngineError::Dial(e)) => Err(e.to_string()),
                            Err(EngineError::Closed) => return Err(CheckoutError::Closed),
                        },
                        Ok(()) = failures.changed() => {
                            Err(self.dialer.last_error().unwrap_or_else(|| "dial failed".into()))
                        }
                    };
                    match failed {
                        Ok(conn) => conn,
                        Err(error) => {
                            if self.hopeless() {
                                return Err(self.unavailable(error));
                            }
                            // A dial was held back (backoff after failed
                            // checks) or failed while a lease may still
                            // return its connection: ask again once the
                            // endpoint reopens, inside the same deadline.
                            tokio::time::sleep(self.redial_delay()).await;
                            continue;
                        }
                    }
                }
            };
            let mut conn = match self.vet(conn, Instant::now(), VetFor::Checkout) {
                Vetted::Ready(conn) => return Ok(conn),
                Vetted::Evicted => continue,
                Vetted::NeedsProbe(conn) => conn,
            };
            // The probe runs in a task of the pool's, so a checkout that
            // gives up (its deadline, its client gone) leaves it to finish:
            // the connection goes back idle or is evicted and counted, never
            // dropped half-checked.
            let (done_tx, done_rx) = oneshot::channel();
            let pool = Arc::clone(self);
            let span = tracing::info_span!(
                target: TARGET,
                "health_check",
                lessor.connection.id = conn.id() as i64,
                otel.status_code = tracing::field::Empty,
                otel.status_description = tracing::field::Empty,
            );
            probing.store(true, Ordering::Relaxed);
            self.tasks.spawn(
                async move {
                    let probed = pool.probe(&mut conn).await;
                    if let Err((conn, probed)) = done_tx.send((conn, probed)) {
                        match probed {
                            Ok(()) => conn.put_back(),
                            Err(e) => pool.failed_check(conn, &e),
                        }
                    }
                }
                .instrument(span),
            );
            let Ok((conn, probed)) = done_rx.await else {
                // The task is gone without an answer: only a panic does that.
                return Err(CheckoutError::Closed);
            };
            probing.store(false, Ordering::Relaxed);
            match probed {
                Ok(()) => return Ok(conn),
                Err(e) => self.failed_check(conn, &e),
            }
        }
    }

    /// Runs the upstream's probe on `conn`, counted, its outcome on the
    /// current (`health_check`) span and the endpoint's health.
    async fn probe(&self, conn: &mut PoolConn) -> Result<(), health::HealthError> {
        let probed = health::check(conn, self.config.health.probe.as_ref()).await;
        match &probed {
            Ok(()) => conn.endpoint_ref().endpoint().record_success(),
            Err(e) => {
                let span = tracing::Span::current();
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", e.to_string());
            }
        }
        self.counters.health_checks.fetch_add(1, Ordering::Relaxed);
        probed
    }

    /// Whether a checkout that saw a dial fail should give up before its
    /// deadline: only when the last dial that reached the network failed and
    /// no connection exists that could come to it (leased, idle, or being
    /// checked by another checkout). A dial refused by
    /// backoff after failed health checks, or a failure while leases are
    /// out, is no reason to fail every waiter.
    fn hopeless(&self) -> bool {
        !self.dialer.endpoints().any_usable()
            || (self.dialer.last_dial_ok() == Some(false) && self.engine.size() == 0)
    }

    /// Why a checkout cannot get a connection, for its error: discovery's
    /// word when no endpoint is ready, else the last dial's.
    fn unavailable(&self, dial_error: String) -> CheckoutError {
        let endpoints = self.dialer.endpoints();
        if endpoints.any_usable() {
            CheckoutError::Unavailable(dial_error)
        } else {
            CheckoutError::Unavailable(format!("no ready endpoint ({})", endpoints.status().detail))
        }
    }

    /// How long a checkout waits before asking the engine again after a
    /// dial it could not use: until the first endpoint's backoff ends, within
    /// bounds that neither spin nor oversleep a returned connection.
    fn redial_delay(&self) -> Duration {
        let now = Instant::now();
        self.dialer
            .endpoints()
            .next_reopen()
            .map_or(REDIAL_MIN, |t| t.saturating_duration_since(now))
            .clamp(REDIAL_MIN, REDIAL_MAX)
    }

    /// The synchronous checks of an idle connection, the one policy for
    /// checkouts and the sweep, in order: endpoint retired, lifetime over,
    /// idle too long (sweep, above the floor), the liveness peek, then
    /// whether the probe is due. Counts the check unless a probe must follow
    /// (the probe counts then).
    pub(crate) fn vet(&self, conn: PoolConn, now: Instant, at: VetFor) -> Vetted {
        if conn.retired() {
            self.evict(conn, EvictReason::EndpointRemoved);
            return Vetted::Evicted;
        }
        if conn.expired(now) {
            self.evict(conn, EvictReason::MaxLifetime);
            return Vetted::Evicted;
        }
        if let VetFor::Sweep {
            idle_limit: Some(limit),
        } = at
            && conn.idle_for(now) >= limit
        {
            self.evict(conn, EvictReason::IdleTimeout);
            return Vetted::Evicted;
        }
        let health = &self.config.health;
        if let Err(e) = health::liveness(&conn) {
            self.counters.health_checks.fetch_add(1, Ordering::Relaxed);
            self.failed_check(conn, &e);
            return Vetted::Evicted;
        }
        let quiet = conn.idle_for(now).min(conn.unchecked_for(now));
        let probe_due = health.probe.is_some()
            && match at {
                // A connection no lease has used yet is peeked but not
                // probed on checkout: it was validated by its dial, and idle
                // ones are probed by the sweep. Probing it here is how a
                // failing probe becomes a dial storm (each fresh dial probed,
                // failed, evicted, redialed).
                VetFor::Checkout => conn.uses() > 0 && quiet >= health.skip_if_used_within,
                // Twice per interval, so no idle connection goes a whole
                // interval unprobed.
                VetFor::Sweep { .. } => quiet >= health.interval / 2,
            };
        if probe_due {
            return Vetted::NeedsProbe(conn);
        }
        self.counters.health_checks.fetch_add(1, Ordering::Relaxed);
        let mut conn = conn;
        conn.mark_validated(now);
        Vetted::Ready(conn)
    }

    /// Counts a failed check and evicts its connection.
    pub(crate) fn failed_check(&self, conn: PoolConn, error: &health::HealthError) {
        tracing::debug!(upstream = %self.name(), connection_id = conn.id(), error = %error, "health check failed");
        let endpoint = conn.endpoint_ref().endpoint();
        if endpoint.record_failure(&error.to_string(), &self.config.outlier, false) {
            tracing::warn!(upstream = %self.name(), endpoint = %endpoint.target(), error = %error, "endpoint ejected after repeated failures");
        }
        self.counters
            .health_check_failures
            .fetch_add(1, Ordering::Relaxed);
        self.evict(conn, EvictReason::HealthCheck);
    }

    /// When a checkout will wait on a dial (nothing idle, room left), a
    /// `connect` span around the wait, so the dial shows in the lease's
    /// trace. deadpool dials inside `get`, in this span; bb8 dials in a task
    /// of its own (its errors and timing still land here: the checkout waits
    /// for exactly that dial). Disabled otherwise, and without an exporter.
    fn dial_span(&self) -> tracing::Span {
        if tracing::Span::current().is_none()
            || self.idle() > 0
            || self.engine.size() >= self.config.pool.max_size
        {
            return tracing::Span::none();
        }
        tracing::info_span!(
            target: TARGET,
            "connect",
            server.address = %self.config.source(),
            lessor.upstream = self.name(),
        )
    }

    /// Wakes the maintenance loop when the pool is below what it keeps warm.
    /// Checked here, not there: a wake-up per lease would cost more than the
    /// lease.
    fn poke(&self) {
        if self.engine.size() == 0 || self.idle() < self.config.pool.min_idle() {
            self.refill_wanted.notify_one();
        }
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
        conn.discard();
        self.poke();
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

    /// Whether the upstream can serve a lease, and why, for `/readyz?verbose`.
    pub(crate) fn readiness(&self) -> (bool, String) {
        let ready = self.ready();
        let size = self.engine.size();
        let source = self.dialer.endpoints().status();
        let detail = if self.closed.load(Ordering::Acquire) {
            "pool closed (shutting down)".to_owned()
        } else if !source.synced {
            source.detail.clone()
        } else if !self.dialer.endpoints().any_usable() {
            "no ready endpoint".to_owned()
        } else if ready {
            format!(
                "{size} connections ({} idle, {} leased)",
                self.idle(),
                self.counters.leased.load(Ordering::Relaxed)
            )
        } else {
            match self.dialer.last_error() {
                Some(e) if size == 0 => format!("no connection; last dial failed: {e}"),
                Some(e) => format!("last dial failed: {e}"),
                None => "not dialed yet".to_owned(),
            }
        };
        let detail = if self.config.discovery.is_some() && source.synced {
            format!("{detail}; {}", source.detail)
        } else {
            detail
        };
        (ready, detail)
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
        }
    }

    /// Refuses new checkouts and closes idle connections. Leased connections
    /// close as their leases end.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.tasks.close();
        let idle = self.idle();
        self.engine.close(&self.counters);
        for _ in 0..idle {
            self.counters.evicted(EvictReason::Shutdown);
        }
    }
}

impl Leased {
    /// The connection.
    pub(crate) fn conn(&self) -> &Conn {
        self.conn.as_ref().expect("held until finished")
    }

    /// The connection, for the byte pump.
    pub(crate) fn conn_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("held until finished")
    }

    /// The pool the connection belongs to.
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Gives the connection back to the idle list, unless its endpoint has
    /// retired meanwhile (then it is closed as `endpoint_removed`); returns
    /// whether it went back.
    pub(crate) fn give_back(mut self) -> bool {
        let Some(mut conn) = self.take_conn() else {
            return false;
        };
        if conn.retired() {
            self.pool.evict(conn, EvictReason::EndpointRemoved);
            return false;
        }
        conn.mark_idle(Instant::now());
        conn.put_back();
        true
    }

    /// Closes the connection, counted under `reason`.
    pub(crate) fn evict(mut self, reason: EvictReason) {
        if let Some(conn) = self.take_conn() {
            self.pool.evict(conn, reason);
        }
    }

    /// Ends the lease's claim on the connection. `leased` drops here, before
    /// the connection goes back or its slot frees: a checkout that takes it
    /// next counts it again, so `leased` never exceeds `max_size`, not even
    /// for an instant between the two.
    fn take_conn(&mut self) -> Option<PoolConn> {
        let conn = self.conn.take()?;
        self.pool.counters.leased.fetch_sub(1, Ordering::Relaxed);
        Some(conn)
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        if let Some(conn) = self.take_conn() {
            self.pool.evict(conn, EvictReason::ClientAbort);
        }
    }
}

/// Where a connection is vetted: the checks are the same, what makes a probe
/// due differs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum VetFor {
    /// Before a lease gets it.
    Checkout,
    /// In the background sweep; `idle_limit` when the pool holds more than
    /// its floor, so connections idle that long close.
    Sweep {
        /// `pool.idle_timeout`, or `None` while at or below `min_idle`.
        idle_limit: Option<Duration>,
    },
}

/// What the synchronous checks made of a connection.
pub(crate) enum Vetted {
    /// Passed: hand it out.
    Ready(PoolConn),
    /// Failed and closed.
    Evicted,
    /// Alive, but quiet long enough that the probe must run.
    NeedsProbe(PoolConn),
}

/// Counts a checkout as waiting for exactly as long as it exists.
struct WaitingGuard<'a> {
    counters: &'a Counters,
    before: u32,
}

impl<'a> WaitingGuard<'a> {
    fn enter(counters: &'a Counters) -> Self {
        let before = counters.waiting.fetch_add(1, Ordering::Relaxed);
        Self { counters, before }
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}
