//! `Exchange` on a PostgreSQL upstream: whole frontend messages ending with
//! a simple Query or a Sync, answered by every backend message through the
//! ReadyForQuery of the last one.
//!
//! The configured reset (`DISCARD ALL`) is written in the same write as the
//! request, so it costs no round trip: the reply is cut at the request's
//! last ReadyForQuery and handed back at once, while a task of the pool's
//! reads the reset's answer before the connection is idle again. A request
//! that leaves a transaction open is rolled back (and counted) or evicted,
//! per `on_open_transaction`.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ExchangeError, ExchangeReply, ExchangeRequest, checkout};
use crate::config::{OnOpenTransaction, PostgresConfig};
use crate::pool::{EvictReason, Leased, Pool};
use crate::protocol::postgres::reset::{Reset, Settled};
use crate::protocol::postgres::session::PgSession;
use crate::protocol::{Restore, note_reported};

/// Frontend messages an Exchange may carry.
fn refused(tag: u8) -> Option<&'static str> {
    Some(match tag {
        0 => "a StartupMessage or SSLRequest: the session is opened by the sidecar",
        b'p' => "a password message: authentication is done by the sidecar",
        b'X' => "Terminate would close a pooled connection",
        b'd' | b'c' | b'f' => "COPY data needs a lease",
        b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F' => return None,
        _ => "not a PostgreSQL frontend message",
    })
}

/// Checks the request without sending anything: whole messages, none
/// refused, an extended batch closed by its Sync, the last message a Query
/// or a Sync; no `COPY ... FROM STDIN`.
fn vet(request: &[u8], max_frame: u64) -> Result<(), ExchangeError> {
    let invalid = |why: String| Err(ExchangeError::Invalid(why));
    let mut rest = request;
    let (mut unsynced, mut last) = (false, None);
    while !rest.is_empty() {
        let tag = rest[0];
        if let Some(why) = refused(tag) {
            return invalid(why.into());
        }
        if rest.len() < 5 {
            return invalid("the request ends inside a message".into());
        }
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 || len as u64 > max_frame {
            return invalid(format!(
                "a message of length {len} (postgres.max_frame: {max_frame})"
            ));
        }
        let end = 1 + len as usize;
        if rest.len() < end {
            return invalid("the request ends inside a message".into());
        }
        let body = &rest[5..end];
        match tag {
            b'P' | b'B' | b'D' | b'E' | b'C' => unsynced = true,
            b'S' => unsynced = false,
            b'Q' if unsynced => {
                return invalid(
                    "an extended-protocol batch must end with Sync before a Query".into(),
                );
            }
            b'Q' if copies_from_stdin(body) => {
                return invalid("COPY FROM STDIN needs a lease".into());
            }
            _ => {}
        }
        last = Some(tag);
        rest = &rest[end..];
    }
    match last {
        None => invalid("the request holds no message".into()),
        Some(b'Q' | b'S') => Ok(()),
        Some(_) => invalid("the request must end with a Query or a Sync".into()),
    }
}

/// Whether a query's text asks for COPY data from the client. Words, not
/// SQL: a false positive is refused with a clear error, a false negative
/// is caught when the server asks for the data.
fn copies_from_stdin(sql: &[u8]) -> bool {
    let text = String::from_utf8_lossy(sql).to_ascii_lowercase();
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    words.first().is_some_and(|w| *w == "copy")
        && words
            .windows(2)
            .any(|w| w[0] == "from" && w[1].starts_with("stdin"))
}

/// Runs one Exchange on a PostgreSQL upstream.
pub(super) async fn run(
    pool: &Arc<Pool>,
    request: ExchangeRequest,
    span: &tracing::Span,
) -> Result<ExchangeReply, ExchangeError> {
    let cfg = &pool.config().postgres;
    vet(&request.request, cfg.max_frame.as_u64())?;
    let (mut leased, deadline) = checkout(pool, &request, span).await?;
    let served = ExchangeReply::served(&leased);
    let pipelined = Reset::new(cfg, false, true);
    let round_trip = round_trip(&mut leased, &request.request, pipelined.as_ref(), cfg);
    match tokio::time::timeout(deadline, round_trip).await {
        Err(_) => {
            // The query may still run: the eviction cancels it.
            if let Some(backend) = leased.conn_mut().backend.as_mut() {
                backend.busy = true;
            }
            leased.evict(EvictReason::LeaseExpired);
            Err(ExchangeError::Timeout(deadline))
        }
        Ok(Err(e)) => {
            leased.evict(match e {
                ExchangeError::Invalid(_) => EvictReason::Dirty,
                _ => EvictReason::UpstreamClosed,
            });
            Err(e)
        }
        Ok(Ok(replied)) => {
            let reply = replied.reply.clone();
            leased.conn_mut().refused_write |= replied.refused_write;
            if replied.status != b'I' && cfg.on_open_transaction == OnOpenTransaction::Evict {
                tracing::debug!(upstream = %pool.name(), "exchange left a transaction open; connection closed");
                leased.evict(EvictReason::Dirty);
            } else {
                note_reported(leased.conn_mut().backend.as_deref_mut(), replied.reported);
                settle(leased, pipelined, replied.rest, replied.status, cfg.clone());
            }
            Ok(ExchangeReply { reply, ..served })
        }
    }
}

/// What came back for the request.
struct Replied {
    /// Every backend message through the last ReadyForQuery.
    reply: Bytes,
    /// Bytes read past it: the pipelined reset's answer, begun.
    rest: BytesMut,
    /// The last ReadyForQuery's transaction status.
    status: u8,
    /// ParameterStatus reports in the reply, for the connection's record.
    reported: Vec<(String, String)>,
    /// The server refused a write as read-only (SQLSTATE 25006).
    refused_write: bool,
}

/// Writes the request and the pipelined reset; reads up to the request's
/// last ReadyForQuery.
async fn round_trip(
    leased: &mut Leased,
    request: &Bytes,
    pipelined: Option<&Reset>,
    cfg: &PostgresConfig,
) -> Result<Replied, ExchangeError> {
    let mut session = PgSession::new(cfg);
    session
        .client_sent(request)
        .map_err(|e| ExchangeError::Invalid(e.to_string()))?;
    let stream = &mut leased.conn_mut().stream;
    let upstream = |e: std::io::Error| ExchangeError::Upstream(e.to_string());
    match pipelined {
        Some(reset) => {
            let mut out = BytesMut::with_capacity(request.len() + reset.request().len());
            out.extend_from_slice(request);
            out.extend_from_slice(reset.request());
            stream.write_all(&out).await.map_err(upstream)?;
        }
        None => stream.write_all(request).await.map_err(upstream)?,
    }
    let max = cfg.max_frame.as_u64().saturating_mul(2);
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(buf.len().max(4096));
        }
        let start = buf.len();
        if stream.read_buf(&mut buf).await.map_err(upstream)? == 0 {
            return Err(ExchangeError::Upstream(
                "the upstream closed the connection".into(),
            ));
        }
        let settled = session
            .reply_read(&buf[start..])
            .map_err(|e| ExchangeError::Upstream(e.to_string()))?;
        if session.wants_copy_data() {
            return Err(ExchangeError::Invalid(
                "the server asked for COPY data, which needs a lease".into(),
            ));
        }
        if let Some(end) = settled {
            let rest = buf.split_off(start + end);
            return Ok(Replied {
                reply: buf.freeze(),
                rest,
                status: session.status(),
                reported: session.take_reported(),
                refused_write: session.take_refused_write(),
            });
        }
        if buf.len() as u64 > max {
            return Err(ExchangeError::Upstream(format!(
                "reply larger than {max} bytes (2 x postgres.max_frame)"
            )));
        }
    }
}

/// Makes the connection idle-ready in a task of the pool's, after the reply
/// went back: reads the pipelined reset's answer and, when the request left
/// a transaction open, rolls it back and resets again. The connection is
/// not idle until then; any failure closes it.
fn settle(
    mut leased: Leased,
    pipelined: Option<Reset>,
    rest: BytesMut,
    status: u8,
    cfg: PostgresConfig,
) {
    if status == b'I' {
        // Most often the reset's answer came in the same read as the reply.
        let done = match &pipelined {
            None => Some(Settled {
                reported: Vec::new(),
                outcome: Ok(()),
            }),
            Some(reset) => reset.answered_by(&rest),
        };
        if let Some(done) = done {
            let counters = leased.pool().counters();
            counters.session_restore.observe(std::time::Duration::ZERO);
            if let Some(backend) = leased.conn_mut().backend.as_deref_mut() {
                backend.prepared.clear();
            }
            note_reported(leased.conn_mut().backend.as_deref_mut(), done.reported);
            match done.outcome {
                Ok(()) => {
                    leased.give_back();
                }
                Err(_) => leased.evict(EvictReason::Dirty),
            }
            return;
        }
    }
    let pool = leased.pool().clone();
    pool.clone().spawn(async move {
        // The pipelined reset and any rollback are one restore, timed once.
        let started = std::time::Instant::now();
        let mut ok = true;
        if let Some(reset) = &pipelined {
            // Inside an open transaction the reset fails: the rollback
            // below then clears both. Its reports count all the same: the
            // record is what the server last said.
            let conn = leased.conn_mut();
            let done = reset.apply_with(&mut conn.stream, rest, false).await;
            if let Some(backend) = conn.backend.as_deref_mut() {
                backend.prepared.clear();
            }
            note_reported(conn.backend.as_deref_mut(), done.reported);
            ok = status != b'I' || done.outcome.is_ok();
        }
        if ok
            && status != b'I'
            && let Some(rollback) = Reset::new(&cfg, true, pipelined.is_some())
        {
            // Counted as after a lease.
            ok = leased.restore_untimed(&Restore::Postgres(rollback)).await;
        }
        pool.counters().session_restore.observe(started.elapsed());
        if ok {
            leased.give_back();
        } else {
            leased.evict(EvictReason::Dirty);
        }
    });
}

/// A simple Query message, for callers building requests (the CLI).
pub(crate) fn query_message(sql: &str) -> Option<Bytes> {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut buf).ok()?;
    Some(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    fn q(sql: &str) -> Vec<u8> {
        query_message(sql).unwrap().to_vec()
    }

    #[test]
    fn requests_are_vetted_before_anything_is_sent() {
        let max = 1 << 20;
        assert!(vet(&q("SELECT 1"), max).is_ok());
        assert!(vet(&[q("BEGIN"), q("SELECT 1")].concat(), max).is_ok());
        let mut batch = BytesMut::new();
        frontend::parse("", "SELECT 1", None, &mut batch).unwrap();
        frontend::sync(&mut batch);
        assert!(vet(&batch, max).is_ok());
        let mut unsynced = BytesMut::new();
        frontend::parse("", "SELECT 1", None, &mut unsynced).unwrap();
        let half = q("SELECT 1");
        for bad in [
            Vec::new(),
            half[..half.len() - 1].to_vec(),
            unsynced.to_vec(),
            [unsynced.to_vec(), q("SELECT 1")].concat(),
            q("copy t from stdin"),
            q("COPY t (a, b) FROM STDIN WITH (FORMAT csv)"),
            b"X\0\0\0\x04".to_vec(),
            b"p\0\0\0\x08pw\0\0".to_vec(),
            b"\0\0\0\x08\x04\xd2\x16\x2f".to_vec(),
        ] {
            assert!(
                matches!(vet(&bad, max), Err(ExchangeError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(vet(&q("SELECT 'copy from stdin'"), max).is_ok());
    }
}
