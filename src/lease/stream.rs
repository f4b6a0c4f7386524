//! One lease stream as a protocol: Acquire, checkout, Granted, then the
//! byte pump (`pump`) until the lease ends, then exactly one Ended. Between
//! two messages a granted lease is parked where the watchdog can end it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, Span};

use super::error::{InboundError, LeaseError};
use super::guard::LeaseGuard;
use super::pump::{Active, Step, response};
use super::registry::{CancelTarget, Leases, LiveLease};
use super::state::End;
use super::watchdog::{LeaseCell, Unparked, Watchdog};
use crate::pool::PoolSet;
use crate::protocol::Session;
use crate::telemetry::TARGET;
use lessor_client::pb::{
    Disposition, Granted, LeaseRequest, LeaseResponse, lease_request, lease_response,
};

/// The longest `Acquire.holder`: a name, not a payload.
const HOLDER_MAX: usize = 256;

/// What every lease stream shares.
pub(crate) struct LeaseContext {
    /// The upstreams, by name.
    pub pools: Arc<PoolSet>,
    /// `grpc.max_frame` in bytes.
    pub max_frame: usize,
    /// `grpc.acquire_timeout`: how long a stream may wait before `Acquire`.
    pub acquire_timeout: Duration,
    /// Fires when the shutdown grace is over: live leases end with SHUTDOWN
    /// and checkouts fail.
    pub revoke: CancellationToken,
    /// Ends leases parked on a client that stopped reading.
    pub watchdog: Arc<Watchdog>,
    /// Every live lease: `/debug/leases`, `Cancel`, `lease.warn_after`.
    pub leases: Arc<Leases>,
    next_id: AtomicU64,
    id_salt: u64,
}

impl LeaseContext {
    /// A context over `pools`, registering live leases in `leases`.
    pub(crate) fn new(
        pools: Arc<PoolSet>,
        leases: Arc<Leases>,
        max_frame: usize,
        acquire_timeout: Duration,
        revoke: CancellationToken,
    ) -> Self {
        Self {
            pools,
            max_frame,
            acquire_timeout,
            revoke,
            watchdog: Arc::default(),
            leases,
            next_id: AtomicU64::new(1),
            id_salt: fastrand::u64(..),
        }
    }

    /// Process-unique (a counter), and unlikely to repeat across restarts
    /// (salted; XOR keeps it a bijection).
    fn lease_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed) ^ self.id_salt;
        const HEX: &[u8; 16] = b"0123456789abcdef";
        (0..16)
            .rev()
            .map(|i| char::from(HEX[((n >> (i * 4)) & 0xf) as usize]))
            .collect()
    }
}

/// The response stream of one lease, over the client's request stream (any
/// transport's: the gRPC layer passes tonic's). `span` is the lease's trace
/// span (disabled when no exporter is configured); every poll runs in it.
pub(crate) fn lease_stream<S, E>(
    inbound: S,
    ctx: Arc<LeaseContext>,
    span: Span,
    trace_id: String,
) -> impl Stream<Item = Result<LeaseResponse, LeaseError>> + Send + 'static
where
    S: Stream<Item = Result<LeaseRequest, E>> + Send + Unpin + 'static,
    E: InboundError,
{
    let pump = Pump {
        inbound,
        ctx,
        phase: Phase::Start,
        span,
        trace_id,
    };
    futures::stream::unfold(pump, |mut pump| async move {
        let span = pump.span.clone();
        let item = pump.next().instrument(span).await?;
        Some((item, pump))
    })
}

/// The lease span, with every attribute it will carry declared up front
/// (`tracing` records only declared fields). OpenTelemetry semantic
/// convention names where one exists, `lessor.*` otherwise.
pub(crate) fn lease_span() -> Span {
    tracing::info_span!(
        target: TARGET,
        "lease",
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_description = Empty,
        rpc.system = "grpc",
        rpc.service = "lessor.v1.Pool",
        rpc.method = "Lease",
        rpc.grpc.status_code = Empty,
        server.address = Empty,
        server.port = Empty,
        lessor.upstream = Empty,
        lessor.protocol = Empty,
        lessor.lease.id = Empty,
        lessor.connection.id = Empty,
        lessor.connection.reused = Empty,
        lessor.connection.uses = Empty,
        lessor.checkout.wait_us = Empty,
        lessor.bytes.to_upstream = Empty,
        lessor.bytes.to_client = Empty,
        lessor.disposition = Empty,
        lessor.end_reason = Empty,
    )
}

/// Marks `span` failed with `error` (the transport records the status it
/// becomes).
fn fail_span(span: &Span, error: &LeaseError) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", error.to_string());
}

struct Pump<S> {
    inbound: S,
    ctx: Arc<LeaseContext>,
    phase: Phase,
    span: Span,
    /// The caller's W3C trace id, for `/debug/leases` (empty: none came).
    trace_id: String,
}

enum Phase {
    Start,
    /// Granted: between two messages the lease is parked in its cell, where
    /// the watchdog can end it; while a message is being pumped, the pump
    /// holds it.
    Granted(Arc<LeaseCell>),
    Done,
}

impl<S, E> Pump<S>
where
    S: Stream<Item = Result<LeaseRequest, E>> + Unpin,
    E: InboundError,
{
    async fn next(&mut self) -> Option<Result<LeaseResponse, LeaseError>> {
        // Until this call finishes, the phase is Done: if the stream is
        // dropped mid-await, the Active moved out below drops with it and its
        // guard finishes the lease as an abort.
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Start => match self.start().await {
                Ok((active, granted)) => {
                    let cell = self.ctx.watchdog.watch(self.span.clone());
                    cell.park(active);
                    self.phase = Phase::Granted(cell);
                    Some(Ok(response(lease_response::Msg::Granted(granted))))
                }
                Err(Some(e)) => {
                    fail_span(&self.span, &e);
                    Some(Err(e))
                }
                Err(None) => None,
            },
            Phase::Granted(cell) => {
                let mut active = match cell.unpark() {
                    Unparked::Active(active) => {
                        active.live.parked(false);
                        active
                    }
                    // The watchdog ended it while it was parked.
                    Unparked::Ended(ended) => return ended.map(Ok),
                };
                match active.step(&mut self.inbound, &self.ctx).await {
                    Step::Data(bytes) => {
                        // Parked until hyper polls again, which it does only
                        // once the client has window for this message.
                        active.live.parked(true);
                        cell.park(active);
                        self.phase = Phase::Granted(cell);
                        Some(Ok(response(lease_response::Msg::Data(bytes))))
                    }
                    Step::End(end @ End::Release(Disposition::Return), detail) => {
                        active.live.ending();
                        active.drain().await;
                        active.end(end, detail, &self.span).map(Ok)
                    }
                    Step::End(end, detail) => active.end(end, detail, &self.span).map(Ok),
                    Step::Violation(e) => {
                        fail_span(&self.span, &e);
                        let end = match e {
                            LeaseError::Refused(_) => End::Refused,
                            _ => End::Violation,
                        };
                        active.end(end, e.to_string(), &self.span);
                        Some(Err(e))
                    }
                }
            }
            Phase::Done => None,
        }
    }

    /// Reads Acquire, checks out, and builds Granted. `Err(None)`: the client
    /// left before asking for anything.
    async fn start(&mut self) -> Result<(Box<Active>, Granted), Option<LeaseError>> {
        // A stream that never asks holds an HTTP/2 stream and, in a drain, the
        // whole process: it gets `acquire_timeout`, and revocation ends it.
        let first = tokio::select! {
            biased;
            _ = self.ctx.revoke.cancelled() => return Err(Some(LeaseError::ShuttingDown)),
            first = tokio::time::timeout(self.ctx.acquire_timeout, self.inbound.next()) => first,
        };
        let Ok(first) = first else {
            return Err(Some(LeaseError::AcquireTimeout(self.ctx.acquire_timeout)));
        };
        let acquire = match first {
            None => return Err(None),
            Some(Err(e)) => return Err(Some(LeaseError::Inbound(Box::new(e)))),
            Some(Ok(LeaseRequest {
                msg: Some(lease_request::Msg::Acquire(acquire)),
            })) => acquire,
            Some(Ok(_)) => return Err(Some(LeaseError::FirstNotAcquire)),
        };
        if acquire.holder.len() > HOLDER_MAX {
            return Err(Some(LeaseError::HolderTooLong(acquire.holder.len())));
        }
        let ctx = &self.ctx;
        let pool = ctx
            .pools
            .get(&acquire.upstream)
            .ok_or_else(|| LeaseError::UnknownUpstream {
                name: crate::pool::printable_name(&acquire.upstream),
                known: ctx.pools.names().join(", "),
            })?;
        let config = pool.config();
        let checkout_timeout = clamp_ms(acquire.checkout_timeout_ms, config.pool.checkout_timeout);
        let max_lease = clamp_ms(acquire.max_lease_ms, config.lease.max_duration);
        self.span.record("lessor.upstream", pool.name());
        self.span
            .record("lessor.protocol", config.protocol.as_str());
        let checkout_span = tracing::info_span!(
            target: TARGET,
            "checkout",
            lessor.upstream = pool.name(),
            lessor.checkout.wait_us = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        // Revocation first: at the end of grace the revoked leases free
        // their slots, and a waiter woken by both must not take one.
        let checked_out = tokio::select! {
            biased;
            _ = ctx.revoke.cancelled() => return Err(Some(LeaseError::ShuttingDown)),
            got = pool.checkout(checkout_timeout).instrument(checkout_span.clone()) => got,
        };
        let leased = match checked_out {
            Ok(leased) => leased,
            Err(e) => {
                checkout_span.record("otel.status_code", "ERROR");
                checkout_span.record("otel.status_description", e.to_string());
                return Err(Some(e.into()));
            }
        };
        let lease_id = ctx.lease_id();
        let conn = leased.conn();
        let granted = Granted {
            lease_id: lease_id.clone(),
            upstream: pool.name().to_owned(),
            endpoint: conn.endpoint_str().to_owned(),
            connection_id: conn.id(),
            reused: leased.reused,
            wait_us: leased.waited.as_micros().try_into().unwrap_or(u64::MAX),
            connection_uses: conn.uses(),
            protocol: config.protocol.as_str().to_owned(),
            ..Granted::default()
        };
        let mut granted = granted;
        if let Some(backend) = &conn.backend {
            granted.server_parameters = backend
                .parameters
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            granted.backend_pid = backend.pid;
            granted.backend_secret = backend.secret.clone();
        }
        checkout_span.record("lessor.checkout.wait_us", granted.wait_us as i64);
        let span = &self.span;
        if !span.is_disabled() {
            span.record("lessor.lease.id", lease_id.as_str());
            span.record("server.address", conn.endpoint().ip().to_string());
            span.record("server.port", i64::from(conn.endpoint().port()));
            span.record("lessor.connection.id", conn.id() as i64);
            span.record("lessor.connection.reused", leased.reused);
            span.record("lessor.connection.uses", conn.uses() as i64);
            span.record("lessor.checkout.wait_us", granted.wait_us as i64);
        }
        tracing::debug!(
            upstream = %pool.name(),
            lease_id = %lease_id,
            connection_id = conn.id(),
            reused = leased.reused,
            wait_us = granted.wait_us,
            "lease granted"
        );
        let cancel = conn
            .backend
            .as_ref()
            .and_then(|b| b.secret_i32().map(|secret| (b.pid, secret)))
            .map(|(pid, secret)| CancelTarget {
                endpoint: conn.endpoint(),
                pid,
                secret,
                tls: pool.dialer_tls(),
            });
        let live = ctx.leases.register(LiveLease::new(
            lease_id.clone(),
            pool.name().to_owned(),
            conn.endpoint_str().to_owned(),
            conn.id(),
            acquire.holder.clone(),
            self.trace_id.clone(),
            cancel,
        ));
        let active = Active::new(
            LeaseGuard::new(leased, config.lease.on_abort),
            lease_id,
            max_lease,
            config.lease.idle_timeout,
            ctx.revoke.clone(),
            Session::for_upstream(config),
            live,
        );
        Ok((Box::new(active), granted))
    }
}

/// A client's millisecond value, where 0 means "the configured one" and
/// nothing may exceed it.
pub(crate) fn clamp_ms(ms: u32, cap: Duration) -> Duration {
    match ms {
        0 => cap,
        ms => Duration::from_millis(u64::from(ms)).min(cap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_values_shorten_never_extend() {
        let cap = Duration::from_secs(5);
        assert_eq!(clamp_ms(0, cap), cap);
        assert_eq!(clamp_ms(100, cap), Duration::from_millis(100));
        assert_eq!(clamp_ms(u32::MAX, cap), cap);
    }
}
