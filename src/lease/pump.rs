//! One lease stream: Acquire, checkout, Granted, then bytes both ways until
//! the lease ends, then exactly one Ended.
//!
//! Backpressure both ways without buffers that grow: upstream bytes are read
//! into one bounded buffer and handed to the response stream, which is polled
//! again only when HTTP/2 flow control lets the previous message go, so a slow
//! client stops the reads (and TCP stops the upstream); a client message is
//! written to the upstream before the next one is read, so a slow upstream
//! stops the reads from the client. Reading from the upstream and writing to
//! it proceed together, so a large request cannot deadlock against its reply.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{FutureExt, Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::WriteHalf;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use super::error::{InboundError, LeaseError};
use super::guard::LeaseGuard;
use super::registry::{CancelTarget, Leases, LiveLease, Registered};
use super::state::{Direction, End};
use super::watchdog::{LeaseCell, Unparked, Watchdog};
use crate::pool::PoolSet;
use crate::protocol::{Session, SessionError};
use crate::telemetry::TARGET;
use lessor_client::pb::{
    Disposition, Ended, Granted, LeaseRequest, LeaseResponse, lease_request, lease_response,
};

/// The first read buffer of a lease: enough for most replies, small enough
/// that a lease costs little memory.
const READ_FIRST: usize = 4 * 1024;
/// The longest `Acquire.holder`: a name, not a payload.
const HOLDER_MAX: usize = 256;
/// The largest read (one read, one Data message): reads that fill their
/// buffer double it up to this.
const READ_MAX: usize = 64 * 1024;

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

/// A granted lease.
pub(crate) struct Active {
    guard: LeaseGuard,
    lease_id: String,
    /// Client bytes not yet written upstream. While set, no further client
    /// message is read.
    pending: Option<Bytes>,
    read_buf: BytesMut,
    /// Size of the next read buffer; grows while reads fill it.
    read_size: usize,
    max_lease: Duration,
    expires_at: tokio::time::Instant,
    idle_timeout: Duration,
    /// One timer for both limits, at the earlier of expiry and idle
    /// deadline. Re-armed lazily: traffic only moves `last_activity`, and a
    /// firing timer that finds the lease active moves itself.
    timer: Pin<Box<Sleep>>,
    last_activity: tokio::time::Instant,
    /// Registered once per lease: creating `cancelled()` anew on every loop
    /// turn would lock the token's tree each time.
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The session tracker of a protocol upstream.
    session: Option<Session>,
    /// The lease's entry in the registry of live leases, kept current.
    live: Registered,
}

enum Step {
    Data(Bytes),
    End(End, String),
    Violation(LeaseError),
}

enum Event<E> {
    Revoked,
    Timer,
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
    Message(Option<Result<LeaseRequest, E>>),
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
        let idle_timeout = config.lease.idle_timeout;
        let now = tokio::time::Instant::now();
        let expires_at = now + max_lease;
        let active = Active {
            guard: LeaseGuard::new(leased, config.lease.on_abort),
            lease_id,
            pending: None,
            read_buf: BytesMut::new(),
            read_size: READ_FIRST,
            max_lease,
            expires_at,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep_until(expires_at.min(now + idle_timeout))),
            last_activity: now,
            revoked: Box::pin(ctx.revoke.clone().cancelled_owned()),
            session: Session::for_upstream(config),
            live,
        };
        Ok((Box::new(active), granted))
    }
}

impl Active {
    /// Pumps bytes until there is a message for the client or the lease ends.
    async fn step<S, E>(&mut self, inbound: &mut S, ctx: &LeaseContext) -> Step
    where
        S: Stream<Item = Result<LeaseRequest, E>> + Unpin,
        E: InboundError,
    {
        loop {
            if let Some(session) = &self.session
                && session.said_goodbye()
            {
                // QUIT (answered) or Terminate: a goodbye, honoured as a
                // RETURN.
                return Step::End(End::Release(Disposition::Return), String::new());
            }
            if self.read_buf.capacity() - self.read_buf.len() < self.read_size / 4 {
                self.read_buf.reserve(self.read_size);
            }
            let pending = self.pending.is_some();
            let (mut rd, mut wr) = self.guard.conn_mut().stream.split();
            let event = tokio::select! {
                biased;
                _ = &mut self.revoked => Event::Revoked,
                _ = &mut self.timer => Event::Timer,
                read = rd.read_buf(&mut self.read_buf) => Event::Read(read),
                wrote = write_some(&mut wr, &mut self.pending), if pending => Event::Wrote(wrote),
                msg = inbound.next(), if !pending => Event::Message(msg),
            };
            match event {
                Event::Revoked => {
                    return Step::End(End::Shutdown, "lessor is shutting down".into());
                }
                Event::Timer => {
                    if let Some((end, detail)) = self.due(tokio::time::Instant::now(), false) {
                        return Step::End(end, detail);
                    }
                    let idle_deadline = self.last_activity + self.idle_timeout;
                    self.timer
                        .as_mut()
                        .reset(self.expires_at.min(idle_deadline));
                }
                Event::Read(Ok(0)) => {
                    return Step::End(End::UpstreamClosed, "upstream closed the connection".into());
                }
                Event::Read(Ok(n)) => {
                    self.guard.record(Direction::ToClient, n);
                    self.live.moved(false, n);
                    self.last_activity = tokio::time::Instant::now();
                    if n >= self.read_size {
                        self.read_size = (self.read_size * 2).min(READ_MAX);
                    }
                    let data = self.read_buf.split().freeze();
                    let Some(session) = &mut self.session else {
                        return Step::Data(data);
                    };
                    match session.upstream_sent(data) {
                        Ok(data) => {
                            self.guard.set_clean(session.is_clean());
                            return Step::Data(data);
                        }
                        Err(e) => {
                            return Step::End(End::UpstreamError, format!("upstream: {e}"));
                        }
                    }
                }
                Event::Read(Err(e)) | Event::Wrote(Err(e)) => {
                    let end = if crate::pool::health::closed_by_peer(e.kind()) {
                        End::UpstreamClosed
                    } else {
                        End::UpstreamError
                    };
                    return Step::End(end, e.to_string());
                }
                Event::Wrote(Ok(n)) => {
                    self.guard.record(Direction::ToUpstream, n);
                    self.live.moved(true, n);
                    self.last_activity = tokio::time::Instant::now();
                }
                Event::Message(msg) => {
                    if let Some(step) = self.on_message(msg, inbound, ctx.max_frame) {
                        return step;
                    }
                }
            }
        }
    }

    /// A RETURN on a protocol upstream with replies still due: reads and
    /// drops them for at most `lease.drain_timeout`, so the connection can
    /// go back instead of being closed. The client has released; the
    /// replies are no one's any more.
    async fn drain(&mut self) {
        let timeout = self.guard.leased().pool().config().lease.drain_timeout;
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if timeout.is_zero() || !session.drainable() {
            return;
        }
        let stream = &mut self.guard.conn_mut().stream;
        let mut buf = BytesMut::with_capacity(READ_FIRST);
        let drained = tokio::time::timeout(timeout, async {
            while session.drainable() {
                buf.clear();
                match stream.read_buf(&mut buf).await {
                    Ok(n) if n > 0 => {
                        if session.upstream_sent(buf.split().freeze()).is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        })
        .await;
        let _ = drained;
        self.guard.set_clean(session.is_clean());
    }

    /// The limit that ends the lease at `now`, if one has passed (`revoked`:
    /// the shutdown grace is over).
    pub(crate) fn due(&self, now: tokio::time::Instant, revoked: bool) -> Option<(End, String)> {
        if revoked {
            return Some((End::Shutdown, "lessor is shutting down".into()));
        }
        if now >= self.expires_at {
            return Some((
                End::Expired,
                format!("lease reached its maximum duration of {:?}", self.max_lease),
            ));
        }
        if now >= self.last_activity + self.idle_timeout {
            return Some((
                End::Idle,
                format!("no bytes either way for {:?}", self.idle_timeout),
            ));
        }
        None
    }

    /// Handles one client message; `None` means keep pumping.
    fn on_message<S, E>(
        &mut self,
        msg: Option<Result<LeaseRequest, E>>,
        inbound: &mut S,
        max_frame: usize,
    ) -> Option<Step>
    where
        S: Stream<Item = Result<LeaseRequest, E>> + Unpin,
        E: InboundError,
    {
        let request = match msg {
            // A polite half-close and a cancel look the same here (tonic maps a request-side cancel to the end of the stream).
            None => {
                return Some(Step::End(
                    End::Abort,
                    "client stream ended without Release".into(),
                ));
            }
            Some(Err(e)) if e.is_violation() => {
                return Some(Step::Violation(LeaseError::Inbound(Box::new(e))));
            }
            Some(Err(e)) => return Some(Step::End(End::Abort, e.to_string())),
            Some(Ok(request)) => request,
        };
        match request.msg {
            Some(lease_request::Msg::Data(data)) => {
                if data.len() > max_frame {
                    return Some(Step::Violation(LeaseError::FrameTooLarge {
                        len: data.len(),
                        max: max_frame,
                    }));
                }
                self.last_activity = tokio::time::Instant::now();
                let data = match &mut self.session {
                    None => data,
                    Some(session) => match session.client_sent(&data) {
                        Ok(forward) => {
                            self.guard.set_clean(session.is_clean());
                            forward
                        }
                        Err(SessionError::Refused(e)) => {
                            return Some(Step::Violation(LeaseError::Refused(e)));
                        }
                        Err(SessionError::NotProtocol(e)) => {
                            return Some(Step::Violation(LeaseError::NotProtocol(e)));
                        }
                    },
                };
                if !data.is_empty() {
                    self.pending = Some(data);
                }
                // Replies lessor gives itself (QUIT, AUTH), due now.
                self.session
                    .as_mut()
                    .and_then(Session::take_local)
                    .map(Step::Data)
            }
            Some(lease_request::Msg::Release(release)) => {
                // A message already queued behind Release breaks the protocol;
                // one still in flight is never read (the stream ends).
                if let Some(Some(Ok(_))) = inbound.next().now_or_never() {
                    return Some(Step::Violation(LeaseError::AfterRelease));
                }
                let disposition =
                    Disposition::try_from(release.disposition).unwrap_or(Disposition::Unspecified);
                Some(Step::End(End::Release(disposition), String::new()))
            }
            Some(lease_request::Msg::Acquire(_)) => {
                Some(Step::Violation(LeaseError::SecondAcquire))
            }
            None => Some(Step::Violation(LeaseError::EmptyRequest)),
        }
    }

    /// Finishes the lease, records how on its span, and builds its `Ended`,
    /// if its row sends one.
    pub(crate) fn end(mut self, end: End, detail: String, span: &Span) -> Option<LeaseResponse> {
        let upstream = self.guard.leased().pool().name().to_owned();
        if matches!(end, End::Expired | End::Idle | End::Shutdown) {
            tracing::info!(target: TARGET, { lessor.revoke.reason = ?end, lessor.revoke.detail = %detail }, "revoked");
        }
        let mut guard = self.guard;
        if let Some(session) = &mut self.session {
            let (verdict, restore) = session.conclude(guard.leased().pool().config());
            session.record(guard.conn_mut().backend.as_deref_mut());
            if let Some(restore) = restore {
                guard.set_restore(restore);
            }
            guard.set_verdict(verdict);
        }
        let done = guard.finish(end);
        if !span.is_disabled() {
            span.record("lessor.bytes.to_upstream", done.bytes_to_upstream as i64);
            span.record("lessor.bytes.to_client", done.bytes_to_client as i64);
            let disposition = match done.outcome.fate {
                super::Fate::Return => "RETURN",
                super::Fate::Evict(_) => "EVICT",
            };
            span.record("lessor.disposition", disposition);
            if let Some((_, reason)) = done.outcome.ended {
                span.record("lessor.end_reason", reason.as_str_name());
            }
            if end == End::UpstreamError {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", detail.as_str());
            }
        }
        tracing::debug!(
            upstream = %upstream,
            lease_id = %self.lease_id,
            end = ?end,
            fate = ?done.outcome.fate,
            bytes_to_upstream = done.bytes_to_upstream,
            bytes_to_client = done.bytes_to_client,
            detail = %detail,
            "lease ended"
        );
        let (disposition, reason) = done.outcome.ended?;
        let detail = match done.unclean {
            Some(why) if reason == lessor_client::pb::EndReason::Dirty && detail.is_empty() => why,
            _ => detail,
        };
        Some(response(lease_response::Msg::Ended(Ended {
            disposition: disposition.into(),
            reason: reason.into(),
            detail,
        })))
    }
}

fn response(msg: lease_response::Msg) -> LeaseResponse {
    LeaseResponse { msg: Some(msg) }
}

/// Writes some of `pending`, dropping it once fully written. Cancel-safe: a
/// write that did not complete wrote nothing.
async fn write_some(wr: &mut WriteHalf<'_>, pending: &mut Option<Bytes>) -> io::Result<usize> {
    let Some(buf) = pending.as_mut() else {
        return Ok(0);
    };
    let n = wr.write(buf).await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    buf.advance(n);
    if buf.is_empty() {
        *pending = None;
    }
    Ok(n)
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
