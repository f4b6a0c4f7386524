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

use bytes::Bytes;

use super::frame::{Event, FrameError, Framer};
use super::reset::Reset;
use super::server::Server;
use crate::config::{OnOpenTransaction, PostgresConfig};

/// Backend messages whose body the tracker reads: ReadyForQuery,
/// ParameterStatus.
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
    /// What the server has made of the messages, from its answers.
    server: Server,
    /// Extended-protocol messages sent since the last Sync (the client's
    /// side: a batch it has not closed).
    unsynced: bool,
    /// The client said Terminate: nothing more is forwarded.
    terminated: bool,
    /// Something was forwarded, so the configured reset is due.
    used: bool,
    /// Whether a reset is configured (a used session is not clean without).
    resets: bool,
}

/// Why the end of an Exchange's reply cannot be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplyError {
    /// The bytes are not the protocol.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The server answered something the request cannot explain.
    #[error("cannot follow the server: {0}")]
    Lost(&'static str),
}

impl PgSession {
    /// A tracker for a fresh lease on a session opened with `cfg`.
    pub(crate) fn new(cfg: &PostgresConfig) -> Self {
        let max = cfg.max_frame.as_u64();
        Self {
            frontend: Framer::new(max, b""),
            backend: Framer::new(max, KEPT),
            server: Server::default(),
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
        let mut unsynced = self.unsynced;
        let server = &mut self.server;
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
                    b'S' => unsynced = false,
                    b'Q' | b'F' | b'H' | b'd' | b'c' | b'f' => {}
                    other => {
                        return Err(ClientError::NotProtocol(format!(
                            "unknown frontend message {:?}",
                            char::from(other)
                        )));
                    }
                },
                // The server reads a message once it is whole.
                Event::End { tag, .. } => server.sent(tag),
            }
            Ok(())
        })?;
        self.unsynced = unsynced;
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
        let server = &mut self.server;
        self.backend.feed(data, |event| {
            if let Event::End { tag, whole, .. } = event {
                server.received(tag, whole);
            }
            Ok::<(), FrameError>(())
        })
    }

    /// Takes server bytes that may run past the reply (an Exchange
    /// pipelines its reset behind the request): reads up to the
    /// ReadyForQuery that settles everything sent, and returns the offset
    /// just past it; `None` while more is due.
    pub(crate) fn reply_read(&mut self, data: &[u8]) -> Result<Option<usize>, ReplyError> {
        let mut settled = None;
        let server = &mut self.server;
        self.backend.feed(data, |event| {
            if settled.is_none()
                && let Event::End { tag, end, whole } = event
            {
                server.received(tag, whole);
                if tag == b'Z' && server.answered() {
                    settled = Some(end);
                }
            }
            Ok::<(), FrameError>(())
        })?;
        match self.server.lost() {
            Some(why) => Err(ReplyError::Lost(why)),
            None => Ok(settled),
        }
    }

    /// Whether the server asked for COPY data (an Exchange cannot give it).
    pub(crate) fn wants_copy_data(&self) -> bool {
        self.server.copy_in() || self.server.copy_both()
    }

    /// The transaction status of the last ReadyForQuery.
    pub(crate) fn status(&self) -> u8 {
        self.server.status()
    }

    /// ReadyForQuery messages received so far.
    pub(crate) fn ready_for_query(&self) -> u64 {
        self.server.ready()
    }

    /// Whether the server has answered everything sent and no batch is
    /// open.
    pub(crate) fn settled(&self) -> bool {
        self.server.settled() && self.backend.at_boundary()
    }

    /// Why the server's state cannot be known, if it cannot.
    pub(crate) fn lost(&self) -> Option<&'static str> {
        self.server.lost()
    }

    /// Whether the server refused a write as read-only (SQLSTATE 25006)
    /// since the last take.
    pub(crate) fn take_refused_write(&mut self) -> bool {
        self.server.take_refused_write()
    }

    /// The ParameterStatus reports seen so far, taken.
    pub(crate) fn take_reported(&mut self) -> Vec<(String, String)> {
        self.server.take_reported()
    }

    /// The client said Terminate: the lease ends as a RETURN.
    pub(crate) fn terminated(&self) -> bool {
        self.terminated
    }

    /// Whether the server may still be running something the client sent:
    /// what makes an eviction cancel it.
    pub(crate) fn busy(&self) -> bool {
        !self.server.answered() || self.server.lost().is_some() || !self.frontend.at_boundary()
    }

    /// Whether the session is between transactions with nothing
    /// outstanding (a reset may still be due): where a listener in
    /// transaction mode ends a client's hold.
    pub(crate) fn at_rest(&self) -> bool {
        self.unfinished().is_none() && self.server.status() == b'I'
    }

    /// Whether the connection may go back to the pool as it is, with no
    /// rollback or reset: what decides a lease dropped without a word.
    pub(crate) fn is_clean(&self) -> bool {
        self.unfinished().is_none() && self.server.status() == b'I' && !(self.used && self.resets)
    }

    /// Whether reading the answers still due would make the session
    /// returnable: every message was sent whole, no COPY, no unsynced
    /// batch.
    pub(crate) fn drainable(&self) -> bool {
        (!self.server.answered() || !self.backend.at_boundary())
            && self.frontend.at_boundary()
            && !self.unsynced
            && !self.server.copy_in()
            && !self.server.copy_both()
            && self.server.lost().is_none()
    }

    /// What keeps the session from being returned even after a rollback.
    fn unfinished(&self) -> Option<String> {
        let owed = self.server.owed();
        Some(if self.server.copy_both() {
            "COPY BOTH (replication) in progress".into()
        } else if let Some(why) = self.server.lost() {
            why.into()
        } else if self.server.copy_in() {
            "COPY in progress".into()
        } else if !self.frontend.at_boundary() {
            "a message was sent in part".into()
        } else if self.unsynced || (self.server.answered() && !self.server.settled()) {
            "an extended-protocol batch without its Sync".into()
        } else if !self.server.answered() {
            format!(
                "{owed} {} pending",
                if owed == 1 { "query" } else { "queries" }
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
        let status = self.server.status();
        if status != b'I' && on_open == OnOpenTransaction::Evict {
            let which = if status == b'E' {
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
        Reset::new(cfg, self.server.status() != b'I', self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;

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
        assert_eq!(s.server.owed(), 1);
        s.upstream_sent(b"\0\x05I").unwrap();
        assert_eq!(s.verdict(OnOpenTransaction::Rollback), Ok(()));
        assert!(!s.is_clean(), "used: the reset is due");
        let reset = s.restore(&PostgresConfig::default()).unwrap();
        assert!(!reset.rollback);
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
