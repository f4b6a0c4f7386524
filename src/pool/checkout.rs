//! Checkout: an idle connection vetted (or a dial) under one deadline, with
//! the probe run where the deadline cannot cut it in half.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::Instrument;

use super::connect::DialError;
use super::{CheckoutError, Counters, EngineError, EvictReason, Leased, Pool, PoolConn, health};
use crate::telemetry::TARGET;

/// Bounds of a checkout's pause between a dial it could not use and its next
/// request to the engine.
const REDIAL_MIN: Duration = Duration::from_millis(5);
const REDIAL_MAX: Duration = Duration::from_millis(250);

impl Pool {
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
        if self.is_paused() {
            let deadline = tokio::time::Instant::now() + timeout;
            if !self.unpaused(deadline).await {
                self.counters
                    .checkout_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                self.counters.checkout_wait.observe(start.elapsed());
                return Err(CheckoutError::Paused {
                    waited: start.elapsed(),
                });
            }
        }
        let timeout = timeout.saturating_sub(start.elapsed());
        // Set while a probe runs for this checkout: a deadline that cuts one
        // short is the deadline's fault, not the upstream's.
        let probing = AtomicBool::new(false);
        // Fast path: a warm idle connection that needs no probe is vetted
        // with one peek, without arming a timer or subscribing to anything.
        // The slow path is boxed: inline, its state (dial, probe, role and
        // fleet waits) would size every future that awaits a checkout,
        // each idle listener client's task included, by its largest case.
        let outcome = match self
            .engine
            .try_get_idle(&self.counters)
            .map(|c| self.vet(c, Instant::now(), VetFor::Checkout))
        {
            Some(Vetted::Ready(conn)) => Ok(Ok(conn)),
            Some(Vetted::NeedsProbe(conn)) => {
                let slow = Box::pin(self.checkout_loop(Some(conn), &probing));
                tokio::time::timeout(timeout, slow).await
            }
            Some(Vetted::Evicted) | None => {
                let slow = Box::pin(self.checkout_loop(None, &probing));
                tokio::time::timeout(timeout, slow).await
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
        self.counters.leases_granted.fetch_add(1, Ordering::Relaxed);
        Ok(Leased::new(conn, self.clone(), reused, start.elapsed()))
    }

    /// What a deadline means depends on why the checkout was waiting: with
    /// every slot taken, the pool is exhausted; with room left, a dial was
    /// under way and did not finish.
    fn timeout_error(&self, waited: Duration) -> CheckoutError {
        if let Some(fleet) = self.fleet_cap()
            && !fleet.has_room()
            && fleet.cap() < self.config.pool.max_size
        {
            // Waiting on the fleet budget, not on the pool's own size.
            fleet.timeouts.fetch_add(1, Ordering::Relaxed);
            return CheckoutError::FleetCap {
                waited,
                leased: self.counters.leased.load(Ordering::Relaxed),
                cap: fleet.cap(),
                share: fleet.snapshot().view.share,
            };
        }
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
        // A dial refused at the fleet cap: back to waiting there (bb8 only
        // tells its error sink).
        let mut refusals = self.fleet_cap().map(|f| f.subscribe_refusals());
        loop {
            let conn = match first.take() {
                Some(conn) => conn,
                None => {
                    if let Some(conn) = self.wait_at_fleet_cap().await {
                        first = Some(conn);
                        continue;
                    }
                    let failed = tokio::select! {
                        biased;
                        got = self.engine.get(&self.counters).instrument(self.dial_span()) => match got {
                            Ok(conn) => Ok(conn),
                            Err(EngineError::Dial(DialError::FleetCap)) => continue,
                            Err(EngineError::Dial(e)) => Err(e.to_string()),
                            Err(EngineError::Closed) => return Err(CheckoutError::Closed),
                        },
                        Ok(()) = failures.changed() => {
                            Err(self.dialer.last_error().unwrap_or_else(|| "dial failed".into()))
                        }
                        () = async {
                            let refused = match refusals.as_mut() {
                                Some(r) => r.changed().await.is_ok(),
                                None => false,
                            };
                            if !refused {
                                std::future::pending::<()>().await;
                            }
                        } => continue,
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
        let endpoints = self.dialer.endpoints();
        // Servers that answer but none with the wanted role (a switchover
        // under way): a role check may find one within the deadline.
        let roles_pending = endpoints.wanted() != crate::config::Role::Any
            && endpoints.status().synced
            && !endpoints.snapshot().is_empty();
        (!endpoints.any_usable() && !roles_pending)
            || (self.dialer.last_dial_ok() == Some(false) && self.engine.size() == 0)
    }

    /// Why a checkout cannot get a connection, for its error: discovery's
    /// word when no endpoint is ready, else the last dial's.
    fn unavailable(&self, dial_error: String) -> CheckoutError {
        let endpoints = self.dialer.endpoints();
        if endpoints.any_usable() {
            CheckoutError::Unavailable(dial_error)
        } else {
            let roles = self
                .roles_detail()
                .map(|r| format!("; {r}"))
                .unwrap_or_default();
            CheckoutError::Unavailable(format!(
                "no ready endpoint ({}{roles})",
                endpoints.status().detail
            ))
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
    pub(crate) fn vet(&self, mut conn: PoolConn, now: Instant, at: VetFor) -> Vetted {
        if let Some(reason) = conn.retirement() {
            self.evict(conn, reason);
            return Vetted::Evicted;
        }
        if self.superseded(&conn) {
            self.evict(conn, EvictReason::Reconnect);
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
        if let Err(e) = health::liveness(&mut conn) {
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
            server.address = %self.config.source,
            lessor.upstream = self.name(),
        )
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
