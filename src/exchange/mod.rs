//! `Exchange`: one request and exactly its reply on a pooled connection, in
//! one call. The request is vetted before anything is sent (whole commands
//! only, nothing that would change the session beyond what lessor can put
//! back), the reply is read to the end of the last one, and the connection
//! goes back clean: after a `SELECT` the configured db is selected again;
//! any other change of session state closes it instead.
//!
//! The unary fast path for the common case: one gRPC round trip instead of a
//! lease stream's three messages each way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tracing::Instrument;
use tracing::field::Empty;

use crate::config::Protocol;
use crate::lease::clamp_ms;
use crate::pool::{CheckoutError, EvictReason, Leased, Pool, PoolSet, printable_name};
use crate::protocol::redis::session::RedisSession;
use crate::telemetry::TARGET;

/// Why an Exchange failed (an error reply from the upstream is not one of
/// these: it is the upstream's answer).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// `upstream` names no configured upstream.
    #[error("unknown upstream `{name}` (configured: {known})")]
    UnknownUpstream {
        /// The name asked for, cut to a printable length.
        name: String,
        /// The configured names.
        known: String,
    },
    /// The upstream's bytes are opaque to lessor.
    #[error(
        "upstream `{0}` is `protocol: tcp`; Exchange needs a protocol upstream (redis, postgres)"
    )]
    NotAProtocolUpstream(String),
    /// The request is not a whole number of acceptable commands; nothing
    /// was sent.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No connection could be checked out.
    #[error(transparent)]
    Checkout(#[from] CheckoutError),
    /// The reply did not complete within its deadline; the connection was
    /// closed.
    #[error("no complete reply within {0:?}")]
    Timeout(Duration),
    /// The upstream closed, failed, or answered with something that is not
    /// RESP; the connection was closed.
    #[error("upstream failed mid-exchange: {0}")]
    Upstream(String),
    /// The sidecar is shutting down.
    #[error("lessor is shutting down")]
    ShuttingDown,
}

impl ExchangeError {
    /// The metric label of the outcome.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Self::UnknownUpstream { .. } | Self::NotAProtocolUpstream(_) | Self::Invalid(_) => {
                "invalid"
            }
            Self::Checkout(_) | Self::ShuttingDown => "checkout_failed",
            Self::Timeout(_) => "timeout",
            Self::Upstream(_) => "upstream_error",
        }
    }
}

/// What the client asked for.
#[derive(Debug, Clone)]
pub(crate) struct ExchangeRequest {
    /// The upstream's name.
    pub upstream: String,
    /// Whole commands.
    pub request: Bytes,
    /// Shortens the checkout timeout; 0: the configured one.
    pub checkout_timeout_ms: u32,
    /// The reply's deadline; 0: the upstream's `lease.idle_timeout`.
    pub timeout_ms: u32,
}

/// The reply and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct ExchangeReply {
    /// Exactly the replies to the request's commands.
    pub reply: Bytes,
    /// The connection that served it.
    pub connection_id: u64,
    /// Whether the connection served before.
    pub reused: bool,
    /// Time spent in the checkout.
    pub waited: Duration,
    /// The upstream address.
    pub endpoint: String,
}

mod postgres;

pub(crate) use postgres::query_message;

/// Requests larger than this are read on a blocking thread: reading costs
/// O(bytes) (inline commands are split byte by byte), and a runtime worker
/// must not stall for a large one.
const VET_INLINE_MAX: usize = 256 * 1024;

/// Reads the request as Redis will, without sending anything: the tracker
/// that will count its replies, or why it cannot be carried.
async fn vet(request: &Bytes, max_frame: u64, resp: u8) -> Result<RedisSession, ExchangeError> {
    let read = {
        let request = request.clone();
        move || {
            let mut session = RedisSession::for_exchange(max_frame, resp);
            session.client_sent(&request).map(|_| session)
        }
    };
    let result = if request.len() > VET_INLINE_MAX {
        tokio::task::spawn_blocking(read)
            .await
            .map_err(|e| ExchangeError::Invalid(format!("request could not be read: {e}")))?
    } else {
        read()
    };
    let session = result.map_err(|e| ExchangeError::Invalid(e.to_string()))?;
    if let Some(why) = session.refusal() {
        return Err(ExchangeError::Invalid(why));
    }
    if !session.at_boundary() {
        return Err(ExchangeError::Invalid(
            "the request ends inside a command".into(),
        ));
    }
    if session.replies_due() == 0 {
        return Err(ExchangeError::Invalid(
            "the request holds no command".into(),
        ));
    }
    Ok(session)
}

/// Runs one Exchange.
pub(crate) async fn exchange(
    pools: &PoolSet,
    request: ExchangeRequest,
) -> Result<ExchangeReply, ExchangeError> {
    let pool = pools
        .get(&request.upstream)
        .ok_or_else(|| ExchangeError::UnknownUpstream {
            name: printable_name(&request.upstream),
            known: pools.names().join(", "),
        })?;
    let span = tracing::info_span!(
        target: TARGET,
        "exchange",
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_description = Empty,
        rpc.system = "grpc",
        rpc.service = "lessor.v1.Pool",
        rpc.method = "Exchange",
        lessor.upstream = pool.name(),
        lessor.protocol = pool.config().protocol.as_str(),
        lessor.exchange.replies = Empty,
        lessor.connection.id = Empty,
        lessor.checkout.wait_us = Empty,
    );
    let started = Instant::now();
    let result = run(&pool, request, &span).instrument(span.clone()).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", e.to_string());
            e.outcome()
        }
    };
    pool.counters().exchanged(outcome, started.elapsed());
    result
}

async fn run(
    pool: &Arc<Pool>,
    request: ExchangeRequest,
    span: &tracing::Span,
) -> Result<ExchangeReply, ExchangeError> {
    let config = pool.config();
    match config.protocol {
        Protocol::Tcp => return Err(ExchangeError::NotAProtocolUpstream(pool.name().to_owned())),
        Protocol::Postgres => return postgres::run(pool, request, span).await,
        Protocol::Redis => {}
    }
    let max_frame = config.redis.max_frame.as_u64();
    let session = vet(&request.request, max_frame, config.redis.resp).await?;
    span.record("lessor.exchange.replies", session.replies_due() as i64);
    let (mut leased, deadline) = checkout(pool, &request, span).await?;
    let result = tokio::time::timeout(
        deadline,
        round_trip(&mut leased, &request.request, session, pool),
    )
    .await;
    let served = ExchangeReply::served(&leased);
    match result {
        Err(_) => {
            leased.evict(EvictReason::LeaseExpired);
            Err(ExchangeError::Timeout(deadline))
        }
        Ok(Err(e)) => {
            leased.evict(EvictReason::UpstreamClosed);
            Err(e)
        }
        Ok(Ok((reply, clean))) => {
            match clean {
                Ok(()) => {
                    leased.give_back();
                }
                Err(change) => {
                    tracing::debug!(upstream = %pool.name(), %change, "exchange changed the session; connection closed");
                    leased.evict(EvictReason::Dirty);
                }
            }
            Ok(ExchangeReply { reply, ..served })
        }
    }
}

/// Checks out for an Exchange, recording the connection on its span;
/// returns the reply's deadline too.
async fn checkout(
    pool: &Arc<Pool>,
    request: &ExchangeRequest,
    span: &tracing::Span,
) -> Result<(Leased, Duration), ExchangeError> {
    let config = pool.config();
    let checkout_timeout = clamp_ms(request.checkout_timeout_ms, config.pool.checkout_timeout);
    let deadline = match request.timeout_ms {
        0 => config.lease.idle_timeout,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let leased = pool.checkout(checkout_timeout).await?;
    span.record("lessor.connection.id", leased.conn().id() as i64);
    span.record(
        "lessor.checkout.wait_us",
        i64::try_from(leased.waited.as_micros()).unwrap_or(i64::MAX),
    );
    Ok((leased, deadline))
}

impl ExchangeReply {
    /// Where an Exchange on `leased` was served; the reply comes later.
    fn served(leased: &Leased) -> Self {
        let conn = leased.conn();
        Self {
            reply: Bytes::new(),
            connection_id: conn.id(),
            reused: leased.reused,
            waited: leased.waited,
            endpoint: conn.endpoint_str().to_owned(),
        }
    }
}

/// Writes the request, reads exactly its replies, and puts the session
/// back the way a lease's is (the same tracker decides what changed and
/// undoes it). `Ok((reply, Err(why)))`: the reply is complete, but the
/// connection must be closed.
async fn round_trip(
    leased: &mut Leased,
    request: &Bytes,
    mut session: RedisSession,
    pool: &Arc<Pool>,
) -> Result<(Bytes, Result<(), String>), ExchangeError> {
    let redis = &pool.config().redis;
    let max_frame = redis.max_frame.as_u64();
    // Vetted: nothing in it is answered locally, so it goes out whole.
    let stream = &mut leased.conn_mut().stream;
    let upstream = |e: std::io::Error| ExchangeError::Upstream(e.to_string());
    stream.write_all(request).await.map_err(upstream)?;
    let reply = read_replies(stream, &mut session, max_frame).await?;
    let clean = match (session.verdict(), session.restore(redis)) {
        (Err(why), _) => Err(why),
        (Ok(()), Some(restore)) if !restore.apply(stream).await => {
            Err("the session could not be restored".into())
        }
        (Ok(()), _) => Ok(()),
    };
    leased.conn_mut().refused_write |= session.take_refused_write();
    Ok((reply, clean))
}

/// Reads until the session has every reply it is owed, scanning each read
/// once. The connection carries nothing else, so the bytes end there.
async fn read_replies(
    stream: &mut crate::net::Stream,
    session: &mut RedisSession,
    max_frame: u64,
) -> Result<Bytes, ExchangeError> {
    let mut buf = BytesMut::with_capacity(4096);
    while session.replies_due() > 0 {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(buf.len().max(4096));
        }
        let start = buf.len();
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| ExchangeError::Upstream(e.to_string()))?;
        if n == 0 {
            return Err(ExchangeError::Upstream(
                "the upstream closed the connection".into(),
            ));
        }
        if buf.len() as u64 > max_frame.saturating_mul(2) {
            return Err(ExchangeError::Upstream(format!(
                "reply larger than {} bytes (redis.max_frame)",
                max_frame.saturating_mul(2)
            )));
        }
        session
            .replies_read(&buf[start..])
            .map_err(|e| ExchangeError::Upstream(e.to_string()))?;
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_are_vetted_before_anything_is_sent() {
        let max = 1 << 20;
        let vetted = |r: &'static [u8]| async move { vet(&Bytes::from_static(r), max, 2).await };
        assert_eq!(
            vetted(b"*1\r\n$4\r\nPING\r\nGET k\r\n")
                .await
                .unwrap()
                .replies_due(),
            2
        );
        assert_eq!(
            vetted(b"UNSUBSCRIBE a b c\r\n")
                .await
                .unwrap()
                .replies_due(),
            3,
            "one reply per channel"
        );
        assert!(
            vetted(b"*2\r\n$3\r\nGET\r\n$1\r\n").await.is_err(),
            "incomplete"
        );
        assert!(vetted(b"").await.is_err(), "empty");
        assert!(vetted(b"\r\n*0\r\n").await.is_err(), "no command");
        for bad in [
            &b"SUBSCRIBE ch\r\n"[..],
            b"\"SUBSCRIBE\" ch\r\n",
            b"MONITOR\r\n",
            b"AUTH secret\r\n",
            b"QUIT\r\n",
            b"HELLO 3\r\n",
            b"'hello' 3\r\n",
            b"\x0bHELLO 3\r\n",
            b"CLIENT REPLY OFF\r\n",
            b"RESET\r\n",
            b"*1\r\n*1\r\n$4\r\nPING\r\n",
            b"MULTI\r\nSUBSCRIBE a\r\nEXEC\r\n",
        ] {
            assert!(
                matches!(vetted(bad).await, Err(ExchangeError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            vetted(b"MULTI\r\nINCR a\r\nEXEC\r\n")
                .await
                .unwrap()
                .replies_due(),
            3
        );
    }
}
