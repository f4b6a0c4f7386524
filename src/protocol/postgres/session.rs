//! What a lease on a PostgreSQL upstream has done to its session, tracked
//! from the messages both ways: every simple Query, FunctionCall and Sync
//! is owed one ReadyForQuery, whose status byte says whether a transaction
//! is open; extended-protocol messages since the last Sync, and COPY FROM
//! STDIN in progress, are states no reset can repair.
//!
//! A RETURN is honoured when every ReadyForQuery has arrived and nothing is
//! half done. A transaction left open is rolled back (or the connection
//! evicted, per `on_open_transaction`), then the configured `reset` runs
//! before the connection is idle again. Terminate (`X`) is not forwarded:
//! it ends the lease as a RETURN. A client's StartupMessage, SSLRequest or
//! password message never reaches the server.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::frame::{Event, FrameError, Framer, parse};
use crate::config::{OnOpenTransaction, PostgresConfig};

/// Backend messages whose body the tracker reads: ReadyForQuery,
/// ParameterStatus, ErrorResponse.
const KEPT: &[u8] = b"ZSE";

/// Why client bytes are not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ClientError {
    /// The client tried to open or authenticate the session, which is the
    /// sidecar's; nothing of it was forwarded, the session is untouched.
    #[error("{0}: the session is opened and authenticated by the sidecar")]
    Refused(&'static str),
    /// Not the frontend protocol.
    #[error("not PostgreSQL: {0}")]
    NotProtocol(String),
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        Self::NotProtocol(e.to_string())
    }
}

/// The tracker of one lease's session.
#[derive(Debug)]
pub(crate) struct PgSession {
    frontend: Framer,
    backend: Framer,
    /// What the server's messages said.
    replies: Replies,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The client said Terminate: nothing more is forwarded.
    terminated: bool,
    /// Something was forwarded, so the configured reset is due.
    used: bool,
    /// Whether a reset is configured (a used session is not clean without).
    resets: bool,
}

/// The session state the server's messages carry: one place reads them,
/// for a lease's stream and for an Exchange's reply alike.
#[derive(Debug)]
struct Replies {
    /// ReadyForQuery messages the server still owes.
    owed: u32,
    /// The status of the last ReadyForQuery: `I`, `T` or `E`.
    status: u8,
    /// COPY FROM STDIN: the server waits for CopyDone or CopyFail.
    copy_in: bool,
    /// COPY BOTH (replication): never clean again.
    copy_both: bool,
    /// ParameterStatus reports seen, applied to the connection's record.
    reported: Vec<(String, String)>,
}

impl Replies {
    /// One whole backend message (its bytes when its tag is kept).
    fn on_message(&mut self, tag: u8, whole: Option<&mut BytesMut>) {
        match tag {
            b'Z' => {
                self.owed = self.owed.saturating_sub(1);
                self.copy_in = false;
                if let Some(Message::ReadyForQuery(body)) = whole.and_then(parse) {
                    self.status = body.status();
                }
            }
            b'S' => {
                if let Some(Message::ParameterStatus(body)) = whole.and_then(parse)
                    && let (Ok(name), Ok(value)) = (body.name(), body.value())
                {
                    self.reported.push((name.to_owned(), value.to_owned()));
                }
            }
            b'G' => self.copy_in = true,
            b'W' => self.copy_both = true,
            _ => {}
        }
    }
}

impl PgSession {
    /// A tracker for a fresh lease on a session opened with `cfg`.
    pub(crate) fn new(cfg: &PostgresConfig) -> Self {
        let max = cfg.max_frame.as_u64();
        Self {
            frontend: Framer::new(max, b""),
            backend: Framer::new(max, KEPT),
            replies: Replies {
                owed: 0,
                status: b'I',
                copy_in: false,
                copy_both: false,
                reported: Vec::new(),
            },
            unsynced: false,
            terminated: false,
            used: false,
            resets: !cfg.reset.is_empty(),
        }
    }

    /// Takes client bytes; returns what goes to the server (everything
    /// before a Terminate).
    pub(crate) fn client_sent(&mut self, data: &Bytes) -> Result<Bytes, ClientError> {
        if self.terminated {
            return Ok(Bytes::new());
        }
        let mut cut = None;
        let mut queries = 0;
        let mut unsynced = self.unsynced;
        let mut copy_in = self.replies.copy_in;
        self.frontend.feed(data, |event| {
            if cut.is_some() {
                return Ok(());
            }
            match event {
                Event::Begin { tag, at } => match tag {
                    // Untyped: StartupMessage, SSLRequest, GSSENCRequest,
                    // CancelRequest all start with a length below 2^24.
                    0 => return Err(ClientError::Refused("a StartupMessage or SSLRequest")),
                    b'p' => return Err(ClientError::Refused("a password message")),
                    b'X' => cut = Some(at),
                    b'P' | b'B' | b'D' | b'E' | b'C' => unsynced = true,
                    b'Q' | b'F' | b'S' | b'H' | b'd' | b'c' | b'f' => {}
                    other => {
                        return Err(ClientError::NotProtocol(format!(
                            "unknown frontend message {:?}",
                            char::from(other)
                        )));
                    }
                },
                Event::End { tag, .. } => match tag {
                    b'Q' | b'F' => queries += 1,
                    // Sync is ignored in COPY FROM STDIN; it closes a batch.
                    b'S' if !copy_in => {
                        queries += 1;
                        unsynced = false;
                    }
                    b'c' | b'f' => copy_in = false,
                    _ => {}
                },
            }
            Ok(())
        })?;
        self.replies.owed += queries;
        self.unsynced = unsynced;
        self.replies.copy_in = copy_in;
        let out = match cut {
            Some(at) => {
                self.terminated = true;
                // The Terminate and anything after it stay here: the
                // framer's state no longer matters.
                self.frontend = Framer::new(0, b"");
                data.slice(..at)
            }
            None => data.clone(),
        };
        self.used |= !out.is_empty();
        Ok(out)
    }

    /// Takes server bytes; they go to the client as they are.
    pub(crate) fn upstream_sent(&mut self, data: &[u8]) -> Result<(), FrameError> {
        let replies = &mut self.replies;
        self.backend.feed(data, |event| {
            if let Event::End { tag, whole, .. } = event {
                replies.on_message(tag, whole);
            }
            Ok::<(), FrameError>(())
        })
    }

    /// Takes server bytes that may run past the reply (an Exchange
    /// pipelines its reset behind the request): reads up to the
    /// ReadyForQuery that settles the last query owed, and returns the
    /// offset just past it; `None` while more is due.
    pub(crate) fn reply_read(&mut self, data: &[u8]) -> Result<Option<usize>, FrameError> {
        let mut settled = None;
        let replies = &mut self.replies;
        self.backend.feed(data, |event| {
            if settled.is_none()
                && let Event::End { tag, end, whole } = event
            {
                replies.on_message(tag, whole);
                if tag == b'Z' && replies.owed == 0 {
                    settled = Some(end);
                }
            }
            Ok::<(), FrameError>(())
        })?;
        Ok(settled)
    }

    /// Whether the server asked for COPY data (an Exchange cannot give it).
    pub(crate) fn wants_copy_data(&self) -> bool {
        self.replies.copy_in || self.replies.copy_both
    }

    /// The transaction status of the last ReadyForQuery.
    pub(crate) fn status(&self) -> u8 {
        self.replies.status
    }

    /// The ParameterStatus reports seen so far, taken.
    pub(crate) fn take_reported(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.replies.reported)
    }

    /// The client said Terminate: the lease ends as a RETURN.
    pub(crate) fn terminated(&self) -> bool {
        self.terminated
    }

    /// Whether the connection may go back to the pool as it is, with no
    /// rollback or reset: what decides a lease dropped without a word.
    pub(crate) fn is_clean(&self) -> bool {
        self.unfinished().is_none()
            && self.replies.owed == 0
            && self.replies.status == b'I'
            && !(self.used && self.resets)
    }

    /// Whether reading the ReadyForQuery messages still due would make the
    /// session returnable: every message was sent whole, no COPY, no
    /// unsynced batch.
    pub(crate) fn drainable(&self) -> bool {
        (self.replies.owed > 0 || !self.backend.at_boundary())
            && self.frontend.at_boundary()
            && !self.unsynced
            && !self.replies.copy_in
            && !self.replies.copy_both
    }

    /// What keeps the session from being returned even after a rollback.
    fn unfinished(&self) -> Option<String> {
        Some(if self.replies.copy_both {
            "COPY BOTH (replication) in progress".into()
        } else if self.replies.copy_in {
            "COPY in progress".into()
        } else if !self.frontend.at_boundary() {
            "a message was sent in part".into()
        } else if self.unsynced {
            "an extended-protocol batch without its Sync".into()
        } else if self.replies.owed > 0 {
            format!(
                "{} {} pending",
                self.replies.owed,
                if self.replies.owed == 1 {
                    "query"
                } else {
                    "queries"
                }
            )
        } else if !self.backend.at_boundary() {
            "a reply was delivered in part".into()
        } else {
            return None;
        })
    }

    /// Whether the connection may go back (after [`PgSession::restore`]),
    /// or why not, for `Ended.detail`.
    pub(crate) fn verdict(&self, on_open: OnOpenTransaction) -> Result<(), String> {
        if let Some(why) = self.unfinished() {
            return Err(why);
        }
        if self.replies.status != b'I' && on_open == OnOpenTransaction::Evict {
            let which = if self.replies.status == b'E' {
                "failed transaction"
            } else {
                "transaction"
            };
            return Err(format!("{which} open, on_open_transaction: evict"));
        }
        Ok(())
    }

    /// What makes a returnable session idle-ready: ROLLBACK when a
    /// transaction is open, then the reset when the lease used the
    /// session. `None`: nothing to run. Only for a session whose
    /// [`PgSession::verdict`] is clean.
    pub(crate) fn restore(&self, cfg: &PostgresConfig) -> Option<Reset> {
        Reset::new(cfg, self.replies.status != b'I', self.used)
    }
}

/// The queries that make a session idle-ready, sent before its connection
/// goes back to the pool.
#[derive(Debug, Clone)]
pub(crate) struct Reset {
    request: BytesMut,
    /// ReadyForQuery messages to read.
    replies: u32,
    /// Whether it rolls back a transaction (counted).
    pub(crate) rollback: bool,
    max_frame: u64,
}

/// How long the rollback and reset may take before the connection is
/// closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

impl Reset {
    /// The queries for a session left with a transaction open (`rollback`)
    /// and/or used (`used`: the configured reset is due). `None`: nothing.
    pub(crate) fn new(cfg: &PostgresConfig, rollback: bool, used: bool) -> Option<Self> {
        let mut request = BytesMut::new();
        let mut replies = 0;
        // Separate queries: DISCARD ALL refuses to run inside the implicit
        // transaction of a multi-statement query.
        if rollback {
            frontend::query("ROLLBACK", &mut request).ok()?;
            replies += 1;
        }
        if used && !cfg.reset.is_empty() {
            frontend::query(&cfg.reset, &mut request).ok()?;
            replies += 1;
        }
        (replies > 0).then(|| Self {
            request,
            replies,
            rollback,
            max_frame: cfg.max_frame.as_u64(),
        })
    }

    /// Sends the queries and reads through their ReadyForQuery, within
    /// `RESET_TIMEOUT`. `Ok(reports)`: every query succeeded and the session
    /// is idle, with these ParameterStatus changes; `Err(why)` otherwise.
    pub(crate) async fn apply(
        &self,
        stream: &mut TcpStream,
    ) -> Result<Vec<(String, String)>, String> {
        self.apply_with(stream, BytesMut::new(), true).await
    }

    /// The request bytes, for a caller that pipelines them behind its own.
    pub(crate) fn request(&self) -> &[u8] {
        &self.request
    }

    /// [`Reset::apply`], where `read` holds bytes of the answer already read
    /// and `send` is false when the request went out already (pipelined).
    pub(crate) async fn apply_with(
        &self,
        stream: &mut TcpStream,
        read: BytesMut,
        send: bool,
    ) -> Result<Vec<(String, String)>, String> {
        let run = async {
            if send {
                stream
                    .write_all(&self.request)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let mut answer = Answer::new(self);
            let mut buf = read;
            answer.feed(&buf)?;
            while answer.replies < self.replies {
                buf.clear();
                if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                    return Err("the server closed the connection".into());
                }
                answer.feed(&buf)?;
            }
            answer.outcome()
        };
        tokio::time::timeout(RESET_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {RESET_TIMEOUT:?}")))
    }

    /// The outcome when `read` already holds the whole answer (a pipelined
    /// reset often arrives with the reply before it); `None` when more is
    /// due, and [`Reset::apply_with`] must read it.
    pub(crate) fn answered_by(&self, read: &[u8]) -> Option<Result<Vec<(String, String)>, String>> {
        let mut answer = Answer::new(self);
        if let Err(e) = answer.feed(read) {
            return Some(Err(e));
        }
        (answer.replies >= self.replies).then(|| answer.outcome())
    }
}

/// The server's answer to a [`Reset`], as read so far.
struct Answer {
    framer: Framer,
    replies: u32,
    status: u8,
    failed: Option<String>,
    reported: Vec<(String, String)>,
}

impl Answer {
    fn new(reset: &Reset) -> Self {
        Self {
            framer: Framer::new(reset.max_frame, KEPT),
            replies: 0,
            status: b'I',
            failed: None,
            reported: Vec::new(),
        }
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        let Self {
            framer,
            replies,
            status,
            failed,
            reported,
        } = self;
        framer
            .feed(data, |event| {
                if let Event::End { whole, .. } = event {
                    match whole.and_then(parse) {
                        Some(Message::ReadyForQuery(body)) => {
                            *replies += 1;
                            *status = body.status();
                        }
                        Some(Message::ErrorResponse(body)) => {
                            let error = super::handshake::ServerError::from_body(&body);
                            failed.get_or_insert(error.to_string());
                        }
                        Some(Message::ParameterStatus(body)) => {
                            if let (Ok(n), Ok(v)) = (body.name(), body.value()) {
                                reported.push((n.to_owned(), v.to_owned()));
                            }
                        }
                        _ => {}
                    }
                }
                Ok::<(), FrameError>(())
            })
            .map_err(|e| e.to_string())
    }

    /// Every query succeeded and the session is idle: its ParameterStatus
    /// changes; otherwise why not.
    fn outcome(self) -> Result<Vec<(String, String)>, String> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        if self.status != b'I' || !self.framer.at_boundary() {
            return Err("the session is not idle after the reset".into());
        }
        Ok(self.reported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> PgSession {
        PgSession::new(&PostgresConfig {
            user: "app".into(),
            ..PostgresConfig::default()
        })
    }

    fn query(sql: &str) -> Bytes {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).unwrap();
        buf.freeze()
    }

    const RFQ_I: &[u8] = b"Z\0\0\0\x05I";
    const RFQ_T: &[u8] = b"Z\0\0\0\x05T";

    #[test]
    fn a_query_is_pending_until_its_ready_for_query() {
        let mut s = session();
        assert!(s.is_clean());
        s.client_sent(&query("SELECT 1")).unwrap();
        assert_eq!(
            s.verdict(OnOpenTransaction::Rollback),
            Err("1 query pending".into())
        );
        assert!(s.drainable());
        s.upstream_sent(b"C\0\0\0\x0dSELECT 1\0Z\0\0").unwrap();
        assert_eq!(s.replies.owed, 1);
        s.upstream_sent(b"\0\x05I").unwrap();
        assert_eq!(s.verdict(OnOpenTransaction::Rollback), Ok(()));
        assert!(!s.is_clean(), "used: the reset is due");
        let reset = s.restore(&PostgresConfig::default()).unwrap();
        assert!(!reset.rollback);
        assert_eq!(reset.replies, 1);
    }

    #[test]
    fn an_open_transaction_is_rolled_back_or_evicted() {
        let mut s = session();
        s.client_sent(&query("BEGIN")).unwrap();
        s.upstream_sent(RFQ_T).unwrap();
        assert_eq!(s.verdict(OnOpenTransaction::Rollback), Ok(()));
        assert!(s.restore(&PostgresConfig::default()).unwrap().rollback);
        assert_eq!(
            s.verdict(OnOpenTransaction::Evict),
            Err("transaction open, on_open_transaction: evict".into())
        );
    }

    #[test]
    fn unsynced_batches_and_copy_are_not_returnable() {
        let mut s = session();
        let mut buf = BytesMut::new();
        frontend::parse("", "SELECT 1", None, &mut buf).unwrap();
        s.client_sent(&buf.split().freeze()).unwrap();
        assert_eq!(
            s.verdict(OnOpenTransaction::Rollback),
            Err("an extended-protocol batch without its Sync".into())
        );
        frontend::sync(&mut buf);
        s.client_sent(&buf.split().freeze()).unwrap();
        s.upstream_sent(b"1\0\0\0\x04").unwrap();
        s.upstream_sent(RFQ_I).unwrap();
        assert_eq!(s.verdict(OnOpenTransaction::Rollback), Ok(()));

        let mut s = session();
        s.client_sent(&query("COPY t FROM STDIN")).unwrap();
        s.upstream_sent(b"G\0\0\0\x07\0\0\0").unwrap();
        assert_eq!(
            s.verdict(OnOpenTransaction::Rollback),
            Err("COPY in progress".into())
        );
        assert!(!s.drainable());
    }

    #[test]
    fn terminate_is_kept_and_startup_refused() {
        let mut s = session();
        let mut data = query("SELECT 1").to_vec();
        data.extend_from_slice(b"X\0\0\0\x04");
        let sent = s.client_sent(&Bytes::from(data)).unwrap();
        assert_eq!(sent, query("SELECT 1"));
        assert!(s.terminated());

        let mut s = session();
        let mut startup = BytesMut::new();
        frontend::startup_message([("user", "x")], &mut startup).unwrap();
        assert!(matches!(
            s.client_sent(&startup.freeze()),
            Err(ClientError::Refused(_))
        ));
        let mut password = BytesMut::new();
        frontend::password_message(b"secret", &mut password).unwrap();
        assert!(matches!(
            session().client_sent(&password.freeze()),
            Err(ClientError::Refused(_))
        ));
        assert!(s.is_clean(), "nothing reached the server");
    }
}
