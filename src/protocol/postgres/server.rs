//! What a PostgreSQL 15 backend does with the frontend messages of a
//! lease, followed message by message from both directions: which
//! messages it reads and drops, which it answers, and which it owes a
//! ReadyForQuery for. The rules are the server's (`postgres.c`'s main
//! loop and COPY FROM STDIN's reader), not the protocol document's:
//!
//! - Query, FunctionCall and Sync are answered through a ReadyForQuery.
//!   Parse, Bind, Describe, Execute and Close are answered without one;
//!   after an error in one of them the server reads and drops everything
//!   up to the next Sync (a Query in between is never run).
//! - Flush, and CopyData, CopyDone, CopyFail outside COPY, are read and
//!   dropped.
//! - In COPY FROM STDIN (entered when the server sends CopyInResponse)
//!   the server reads CopyData, Flush and Sync (both ignored) until
//!   CopyDone or CopyFail. An error ends COPY early: entered from a Query,
//!   the ReadyForQuery follows at once; from an Execute, everything up to
//!   the next Sync is dropped. What the server does with the rest of the
//!   COPY stream is then ordinary: a Sync sent inside it is answered.
//!
//! The one thing that cannot be known from outside is where in the COPY
//! stream an error struck: when COPY fails and a Sync was already inside
//! its data, the ReadyForQuery count is unknowable, and the session is
//! marked lost (evicted) rather than guessed at.
//!
//! Frontend messages wait in a queue until the server's answers show it
//! has reached them; the queue holds runs of one tag, so a pipelined COPY
//! of a million rows costs one entry.

use std::collections::VecDeque;

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;

use super::frame::parse;

/// Queue entries (runs of one tag) beyond which the model gives up.
const MAX_QUEUED: usize = 1 << 16;

/// Where the server is in the frontend stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reading the next message.
    Idle,
    /// After an error in an extended-protocol message: dropping
    /// everything up to the next Sync.
    Skip,
    /// Answering the message with this tag.
    Busy(u8),
    /// COPY FROM STDIN, entered from an Execute (`extended`) or a Query;
    /// `syncs` Sync messages were read (and ignored) inside it.
    CopyIn { extended: bool, syncs: u32 },
    /// COPY FROM STDIN read its CopyDone (or CopyFail, `failed`): the
    /// server answers CommandComplete or ErrorResponse next.
    CopyEnd {
        extended: bool,
        failed: bool,
        syncs: u32,
    },
}

/// The server's side of one session, as its answers reveal it.
#[derive(Debug)]
pub(crate) struct Server {
    /// Frontend messages the server has not reached yet: (tag, count).
    queue: VecDeque<(u8, u32)>,
    mode: Mode,
    /// The status of the last ReadyForQuery: `I`, `T` or `E`.
    status: u8,
    /// ReadyForQuery messages received, every one of them expected.
    ready: u64,
    /// An extended-protocol message was run since the last
    /// ReadyForQuery: its implicit transaction waits for a Sync.
    extended_open: bool,
    /// COPY BOTH (replication): never clean again.
    copy_both: bool,
    /// Why the server's state can no longer be known.
    lost: Option<&'static str>,
    /// ParameterStatus reports, in arrival order.
    reported: Vec<(String, String)>,
    /// An ErrorResponse said SQLSTATE 25006 (read-only SQL transaction):
    /// the server may have been demoted. Taken by the pool.
    refused_write: bool,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            mode: Mode::Idle,
            status: b'I',
            ready: 0,
            extended_open: false,
            copy_both: false,
            lost: None,
            reported: Vec::new(),
            refused_write: false,
        }
    }
}

impl Server {
    /// A whole frontend message went to the server.
    pub(crate) fn sent(&mut self, tag: u8) {
        if self.lost.is_some() {
            return;
        }
        let full = self.queue.len() >= MAX_QUEUED;
        match self.queue.back_mut() {
            Some((last, n)) if *last == tag => *n += 1,
            _ if full => return self.lose("too many messages outstanding"),
            _ => self.queue.push_back((tag, 1)),
        }
        self.advance();
    }

    /// A whole backend message arrived (its bytes when the framer kept
    /// them: ReadyForQuery, ParameterStatus).
    pub(crate) fn received(&mut self, tag: u8, mut whole: Option<&mut BytesMut>) {
        match tag {
            // Asynchronous: NoticeResponse, NotificationResponse, and
            // ParameterStatus (kept, whatever the state).
            b'N' | b'A' => return,
            b'S' => {
                if let Some(Message::ParameterStatus(body)) = whole.and_then(parse)
                    && let (Ok(name), Ok(value)) = (body.name(), body.value())
                {
                    self.reported.push((name.to_owned(), value.to_owned()));
                }
                return;
            }
            b'W' => self.copy_both = true,
            b'E' => {
                if let Some(Message::ErrorResponse(body)) = whole.as_deref_mut().and_then(parse)
                    && super::handshake::ServerError::from_body(&body).code == "25006"
                {
                    self.refused_write = true;
                }
            }
            _ => {}
        }
        if self.lost.is_some() || self.copy_both {
            return;
        }
        self.mode = match (self.mode, tag) {
            (Mode::Busy(b'Q' | b'F' | b'S'), b'Z') => {
                if let Some(Message::ReadyForQuery(body)) = whole.and_then(parse) {
                    self.status = body.status();
                }
                self.ready += 1;
                self.extended_open = false;
                Mode::Idle
            }
            (Mode::Busy(b'Q'), b'G') => Mode::CopyIn {
                extended: false,
                syncs: 0,
            },
            (Mode::Busy(b'E'), b'G') => Mode::CopyIn {
                extended: true,
                syncs: 0,
            },
            // A Query's, FunctionCall's or Sync's error is followed by
            // its ReadyForQuery.
            (Mode::Busy(b'Q' | b'F' | b'S'), _) => self.mode,
            (Mode::Busy(_), b'E') => Mode::Skip,
            (Mode::Busy(b'P'), b'1')
            | (Mode::Busy(b'B'), b'2')
            | (Mode::Busy(b'C'), b'3')
            | (Mode::Busy(b'D'), b'T' | b'n')
            | (Mode::Busy(b'E'), b'C' | b'I' | b's') => Mode::Idle,
            (Mode::Busy(_), b'Z') => return self.lose("a ReadyForQuery no message asked for"),
            (Mode::Busy(_), _) => self.mode,
            (
                Mode::CopyIn { extended, syncs }
                | Mode::CopyEnd {
                    extended, syncs, ..
                },
                b'E',
            ) => {
                if syncs > 0 {
                    return self.lose("COPY failed with a Sync inside its data");
                }
                if extended {
                    Mode::Skip
                } else {
                    Mode::Busy(b'Q')
                }
            }
            (
                Mode::CopyEnd {
                    extended,
                    failed: false,
                    ..
                },
                b'C',
            ) => {
                if extended {
                    Mode::Idle
                } else {
                    Mode::Busy(b'Q')
                }
            }
            _ => return self.lose("a backend message out of turn"),
        };
        self.advance();
    }

    fn lose(&mut self, why: &'static str) {
        self.lost = Some(why);
        self.queue.clear();
    }

    /// Lets the server read every queued message it reads without
    /// answering, up to the first one it answers.
    fn advance(&mut self) {
        while self.lost.is_none() {
            let Some((tag, n)) = self.queue.front_mut() else {
                return;
            };
            let tag = *tag;
            let consumed = match self.mode {
                Mode::Idle => match tag {
                    b'H' | b'd' | b'c' | b'f' => *n,
                    _ => {
                        if matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C') {
                            self.extended_open = true;
                        }
                        self.mode = Mode::Busy(tag);
                        1
                    }
                },
                Mode::Skip => match tag {
                    b'S' => {
                        self.mode = Mode::Busy(b'S');
                        1
                    }
                    _ => *n,
                },
                Mode::CopyIn {
                    extended,
                    ref mut syncs,
                } => match tag {
                    b'd' | b'H' => *n,
                    b'S' => {
                        *syncs = syncs.saturating_add(*n);
                        *n
                    }
                    b'c' | b'f' => {
                        let syncs = *syncs;
                        self.mode = Mode::CopyEnd {
                            extended,
                            failed: tag == b'f',
                            syncs,
                        };
                        1
                    }
                    // The server ends the session (protocol violation).
                    _ => return self.lose("a message other than COPY data during COPY FROM STDIN"),
                },
                Mode::Busy(_) | Mode::CopyEnd { .. } => return,
            };
            let (_, n) = self.queue.front_mut().expect("just read");
            *n -= consumed;
            if *n == 0 {
                self.queue.pop_front();
            }
        }
    }

    /// Whether the server has answered everything sent and waits for the
    /// next message outside any batch.
    pub(crate) fn settled(&self) -> bool {
        self.lost.is_none()
            && !self.copy_both
            && self.queue.is_empty()
            && self.mode == Mode::Idle
            && !self.extended_open
    }

    /// Whether the server has answered everything sent (an extended batch
    /// may still wait for its Sync).
    pub(crate) fn answered(&self) -> bool {
        self.queue.is_empty() && matches!(self.mode, Mode::Idle | Mode::Skip)
    }

    /// ReadyForQuery messages still due for what was sent, counting every
    /// Query as run: for `Ended.detail`.
    pub(crate) fn owed(&self) -> u64 {
        let queued: u64 = self
            .queue
            .iter()
            .filter(|(tag, _)| matches!(tag, b'Q' | b'F' | b'S'))
            .map(|(_, n)| u64::from(*n))
            .sum();
        let current = match self.mode {
            Mode::Busy(b'Q' | b'F' | b'S') => 1,
            Mode::CopyIn {
                extended: false, ..
            }
            | Mode::CopyEnd {
                extended: false, ..
            } => 1,
            _ => 0,
        };
        queued + current
    }

    /// The server waits for COPY data from the client.
    pub(crate) fn copy_in(&self) -> bool {
        matches!(self.mode, Mode::CopyIn { .. })
    }

    /// COPY BOTH (replication) began.
    pub(crate) fn copy_both(&self) -> bool {
        self.copy_both
    }

    /// Why the session's state cannot be known, if it cannot.
    pub(crate) fn lost(&self) -> Option<&'static str> {
        self.lost
    }

    /// The transaction status of the last ReadyForQuery.
    pub(crate) fn status(&self) -> u8 {
        self.status
    }

    /// ReadyForQuery messages received so far.
    pub(crate) fn ready(&self) -> u64 {
        self.ready
    }

    /// Whether a write was refused as read-only since the last take.
    pub(crate) fn take_refused_write(&mut self) -> bool {
        std::mem::take(&mut self.refused_write)
    }

    /// The ParameterStatus reports so far, taken.
    pub(crate) fn take_reported(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.reported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfq(status: u8) -> BytesMut {
        BytesMut::from(&[b'Z', 0, 0, 0, 5, status][..])
    }

    fn run(server: &mut Server, sent: &[u8], received: &[u8]) {
        for &tag in sent {
            server.sent(tag);
        }
        for &tag in received {
            let mut z = rfq(b'I');
            server.received(tag, (tag == b'Z').then_some(&mut z));
        }
    }

    #[test]
    fn libpq_copy_through_exec_params_owes_one_ready_for_query() {
        // Parse, Bind, Describe, Execute, Sync; CopyData, CopyDone, Sync.
        let mut s = Server::default();
        run(&mut s, b"PBDES", b"12nG");
        assert!(s.copy_in());
        run(&mut s, b"ddcS", b"C");
        assert_eq!(s.owed(), 1);
        run(&mut s, b"", b"Z");
        assert!(s.settled(), "{s:?}");
        assert_eq!(s.ready(), 1);
    }

    #[test]
    fn an_error_in_a_batch_skips_to_the_sync() {
        let mut s = Server::default();
        run(&mut s, b"PBEQS", b"E");
        run(&mut s, b"", b"Z");
        assert!(s.settled(), "the Query was never run: {s:?}");
        assert_eq!(s.ready(), 1);
    }

    #[test]
    fn a_failed_copy_with_a_sync_inside_is_lost_without_one_exact() {
        let mut s = Server::default();
        run(&mut s, b"QddSdc", b"GE");
        assert!(s.lost().is_some());

        let mut s = Server::default();
        run(&mut s, b"QddcS", b"GEZ");
        assert_eq!(s.owed(), 1, "the Sync after the failed COPY is answered");
        run(&mut s, b"", b"Z");
        assert!(s.settled());

        let mut s = Server::default();
        run(&mut s, b"PBESddfS", b"12GE");
        assert!(s.lost().is_some(), "an Execute's COPY with the Sync inside");
    }

    #[test]
    fn copy_data_of_a_copy_that_never_began_is_dropped() {
        let mut s = Server::default();
        run(&mut s, b"QdcS", b"EZ");
        assert_eq!(s.owed(), 1);
        run(&mut s, b"", b"Z");
        assert!(s.settled());
    }

    #[test]
    fn an_execute_without_sync_leaves_the_batch_open() {
        let mut s = Server::default();
        run(&mut s, b"PBESdc", b"12GC");
        assert!(s.answered());
        assert!(!s.settled(), "the Sync went into COPY: {s:?}");
    }
}
