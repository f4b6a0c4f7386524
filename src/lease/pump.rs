//! The byte pump of a granted lease (`Active`): bytes both ways until the
//! lease ends, then its Ended.
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
use std::time::Duration;

use crate::net::WriteHalf;
use bytes::{Buf, Bytes, BytesMut};
use futures::{FutureExt, Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::Span;

use super::error::{InboundError, LeaseError};
use super::guard::LeaseGuard;
use super::registry::Registered;
use super::state::{Direction, End};
use super::stream::LeaseContext;
use crate::protocol::{Session, SessionError};
use crate::telemetry::TARGET;
use lessor_client::pb::{
    Disposition, Ended, LeaseRequest, LeaseResponse, lease_request, lease_response,
};

/// The first read buffer of a lease: enough for most replies, small enough
/// that a lease costs little memory.
const READ_FIRST: usize = 4 * 1024;
/// The largest read (one read, one Data message): reads that fill their
/// buffer double it up to this.
const READ_MAX: usize = 64 * 1024;

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
    pub(super) live: Registered,
}

impl Active {
    /// A granted lease over `guard`'s connection: the clocks start now.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        guard: LeaseGuard,
        lease_id: String,
        max_lease: Duration,
        idle_timeout: Duration,
        revoke: CancellationToken,
        session: Option<Session>,
        live: Registered,
    ) -> Self {
        let now = tokio::time::Instant::now();
        let expires_at = now + max_lease;
        Self {
            guard,
            lease_id,
            pending: None,
            read_buf: BytesMut::new(),
            read_size: READ_FIRST,
            max_lease,
            expires_at,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep_until(expires_at.min(now + idle_timeout))),
            last_activity: now,
            revoked: Box::pin(revoke.cancelled_owned()),
            session,
            live,
        }
    }
}

/// What one turn of the pump yields.
pub(super) enum Step {
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

impl Active {
    /// Pumps bytes until there is a message for the client or the lease ends.
    pub(super) async fn step<S, E>(&mut self, inbound: &mut S, ctx: &LeaseContext) -> Step
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
    pub(super) async fn drain(&mut self) {
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
            guard.conn_mut().refused_write |= session.take_refused_write();
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

/// A response message.
pub(super) fn response(msg: lease_response::Msg) -> LeaseResponse {
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
