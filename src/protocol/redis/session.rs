//! What a lease on a Redis upstream has done to its connection, tracked
//! from the bytes both ways: commands sent against replies received, the
//! session state the commands changed, and the commands lessor answers
//! itself (`QUIT`, `AUTH`, `HELLO`), whose bytes never reach Redis and
//! whose replies are put in the reply stream at their place.
//!
//! A RETURN is honoured exactly when every command has its whole reply and
//! nothing changed the session; otherwise the connection is closed and
//! `Ended.detail` names what was unfinished.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::resp::{Frame, RespError, Scanner, encode_command};
use crate::config::RedisConfig;

/// The reply lessor gives a client `AUTH` or `HELLO`.
const AUTH_REFUSED: &[u8] = b"-ERR lessor: authentication is done by the sidecar\r\n";
/// The reply to `QUIT`, which never reaches Redis.
const QUIT_OK: &[u8] = b"+OK\r\n";
/// Bytes of a command held back until its name is known (a name longer
/// than this is no command lessor answers itself).
const HOLD_MAX: usize = 1024;

/// One reply the client is owed, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    /// Redis will send it.
    Upstream,
    /// lessor sends it, once every reply before it has gone out.
    Local(&'static [u8]),
}

/// What to do with the current command's bytes while it is incomplete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carry {
    /// Between commands.
    None,
    /// Held back: its name is not known yet.
    Held,
    /// Forwarded as it arrives.
    Forward,
    /// Discarded: lessor answers it.
    Drop,
}

/// The tracker of one lease's session.
#[derive(Debug)]
pub(crate) struct RedisSession {
    commands: Scanner,
    replies: Scanner,
    owed: VecDeque<Owed>,
    carry: Carry,
    held: BytesMut,
    /// Session state changed by a command, for `Ended.detail`.
    changed: Option<String>,
    /// `MULTI` without its `EXEC`/`DISCARD` yet (restored with `DISCARD`).
    multi: bool,
    /// Keys watched (restored with `UNWATCH`).
    watching: bool,
    /// The db was changed by `SELECT` (restored with `SELECT <db>`).
    selected: bool,
    /// `CLIENT SETNAME` (restored with the configured name, or none).
    renamed: bool,
    /// `CLIENT TRACKING` (restored with `CLIENT TRACKING OFF`).
    tracking: bool,
    /// `READONLY` (restored with `READWRITE`).
    readonly: bool,
    /// The client sent `QUIT`: the lease ends once its `+OK` is out.
    quit: bool,
    /// Local replies ready to go out now (every reply before them is out).
    ready: BytesMut,
}

impl RedisSession {
    /// A tracker for a fresh lease; `max_frame` bounds bulk strings.
    pub(crate) fn new(max_frame: u64) -> Self {
        Self {
            commands: Scanner::new(true, max_frame),
            replies: Scanner::new(false, max_frame),
            owed: VecDeque::new(),
            carry: Carry::None,
            held: BytesMut::new(),
            changed: None,
            multi: false,
            watching: false,
            selected: false,
            renamed: false,
            tracking: false,
            readonly: false,
            quit: false,
            ready: BytesMut::new(),
        }
    }

    /// Takes client bytes; returns what goes to Redis. Local replies that
    /// are due now are kept for [`RedisSession::take_local`].
    pub(crate) fn client_sent(&mut self, data: &Bytes) -> Result<Bytes, RespError> {
        let mut ends = Vec::new();
        self.commands.feed(data, |f| ends.push(f))?;
        // What goes out, as ranges of `data` and held bytes: in the common
        // case (nothing answered locally, nothing held) that is all of
        // `data`, sent without a copy.
        let mut out = Pieces::default();
        let mut start = 0;
        for frame in ends {
            let local = self.note_command(&frame);
            match (self.carry, local) {
                (Carry::Drop, _) | (Carry::None | Carry::Held, Some(_)) => self.held.clear(),
                (Carry::Held, None) => {
                    out.held(self.held.split().freeze());
                    out.range(start, frame.end);
                }
                // `Forward` with a local reply cannot happen: a command's head
                // is held until its name is known.
                (Carry::None | Carry::Forward, _) => out.range(start, frame.end),
            }
            self.owe(local.map_or(Owed::Upstream, Owed::Local));
            self.carry = Carry::None;
            start = frame.end;
        }
        if start < data.len() || self.carry != Carry::None {
            match self.carry {
                Carry::Drop => {}
                Carry::Forward => out.range(start, data.len()),
                Carry::None | Carry::Held => {
                    match self.commands.partial_command().as_deref().map(local_reply) {
                        Some(Some(_)) => {
                            self.held.clear();
                            self.carry = Carry::Drop;
                        }
                        Some(None) => {
                            out.held(self.held.split().freeze());
                            out.range(start, data.len());
                            self.carry = Carry::Forward;
                        }
                        None => {
                            self.held.extend_from_slice(&data[start..]);
                            if self.held.len() > HOLD_MAX {
                                out.held(self.held.split().freeze());
                                self.carry = Carry::Forward;
                            } else {
                                self.carry = Carry::Held;
                            }
                        }
                    }
                }
            }
        }
        Ok(out.into_bytes(data))
    }

    /// Takes Redis bytes; returns what goes to the client (with any local
    /// replies that fall due put at their place).
    pub(crate) fn upstream_sent(&mut self, data: Bytes) -> Result<Bytes, RespError> {
        let mut ends = Vec::new();
        self.replies.feed(&data, |f: Frame| {
            if !f.is_push() {
                ends.push(f.end);
            }
        })?;
        if ends.is_empty() || !self.owed.iter().any(|o| matches!(o, Owed::Local(_))) {
            for _ in &ends {
                self.answered();
            }
            return Ok(data);
        }
        let mut out = BytesMut::with_capacity(data.len() + 64);
        let mut start = 0;
        for end in ends {
            out.extend_from_slice(&data[start..end]);
            start = end;
            self.answered();
            out.extend_from_slice(&self.ready.split());
        }
        out.extend_from_slice(&data[start..]);
        Ok(out.freeze())
    }

    /// Counts replies read where lessor owes nothing itself (an Exchange,
    /// whose commands were vetted): the bytes are only scanned, not handed
    /// back, so the caller keeps them in one buffer.
    pub(crate) fn replies_read(&mut self, data: &[u8]) -> Result<(), RespError> {
        let mut replies = 0;
        self.replies.feed(data, |f: Frame| {
            if !f.is_push() {
                replies += 1;
            }
        })?;
        for _ in 0..replies {
            self.answered();
        }
        Ok(())
    }

    /// Replies Redis still owes.
    pub(crate) fn replies_due(&self) -> usize {
        self.owed.iter().filter(|o| **o == Owed::Upstream).count()
    }

    /// Local replies due now (every reply before them has gone out).
    pub(crate) fn take_local(&mut self) -> Option<Bytes> {
        (!self.ready.is_empty()).then(|| self.ready.split().freeze())
    }

    /// The client said `QUIT` and its `+OK` has been handed out: the lease
    /// ends as a RETURN.
    pub(crate) fn quit_done(&self) -> bool {
        self.quit && self.owed.is_empty() && self.ready.is_empty()
    }

    /// Whether the connection may go back to the pool, without saying why
    /// (cheap: kept current after every message, for a lease that is
    /// dropped without a word).
    pub(crate) fn is_clean(&self) -> bool {
        !self.owed.iter().any(|o| *o == Owed::Upstream)
            && (self.commands.at_boundary() || self.carry == Carry::Drop)
            && self.replies.at_boundary()
            && !self.multi
            && !self.watching
            && !self.selected
            && !self.renamed
            && !self.tracking
            && !self.readonly
            && self.changed.is_none()
    }

    /// Whether reading (and dropping) the replies still due would make the
    /// session clean: every command was sent whole and nothing else is
    /// wrong.
    pub(crate) fn drainable(&self) -> bool {
        self.changed.is_none()
            && (self.commands.at_boundary() || self.carry == Carry::Drop)
            && (self.owed.iter().any(|o| *o == Owed::Upstream) || !self.replies.at_boundary())
    }

    /// Whether the connection may go back to the pool, or why not.
    pub(crate) fn verdict(&self) -> Result<(), String> {
        let pending = self.owed.iter().filter(|o| **o == Owed::Upstream).count();
        if pending > 0 {
            return Err(format!(
                "{pending} {} pending",
                if pending == 1 { "reply" } else { "replies" }
            ));
        }
        if !self.commands.at_boundary() && self.carry != Carry::Drop {
            return Err("a command was sent in part".into());
        }
        if !self.replies.at_boundary() {
            return Err("a reply was delivered in part".into());
        }
        if let Some(changed) = &self.changed {
            return Err(changed.clone());
        }
        Ok(())
    }

    /// What puts a clean-but-changed session back as it was opened: a
    /// `MULTI` discarded, watches dropped, the configured db selected again,
    /// the configured name, tracking off, read-write. `None` when there is
    /// nothing to undo. Only for a session whose [`RedisSession::verdict`]
    /// is clean.
    pub(crate) fn restore(&self, cfg: &RedisConfig) -> Option<Restore> {
        let db = cfg.db;
        let max_frame = cfg.max_frame.as_u64();
        let mut request = Vec::new();
        let mut undone = Vec::new();
        if self.multi {
            encode_command(&mut request, &[b"DISCARD"]);
            undone.push("MULTI");
        }
        if self.watching && !self.multi {
            encode_command(&mut request, &[b"UNWATCH"]);
            undone.push("WATCH");
        }
        if self.selected {
            encode_command(&mut request, &[b"SELECT", db.to_string().as_bytes()]);
            undone.push("SELECT");
        }
        if self.renamed {
            let name = cfg.client_name.as_deref().unwrap_or("");
            encode_command(&mut request, &[b"CLIENT", b"SETNAME", name.as_bytes()]);
            undone.push("CLIENT SETNAME");
        }
        if self.tracking {
            encode_command(&mut request, &[b"CLIENT", b"TRACKING", b"OFF"]);
            undone.push("CLIENT TRACKING");
        }
        if self.readonly {
            encode_command(&mut request, &[b"READWRITE"]);
            undone.push("READONLY");
        }
        (!undone.is_empty()).then(|| Restore {
            replies: undone.len(),
            request,
            max_frame,
            undone: undone.join(", "),
        })
    }

    fn owe(&mut self, owed: Owed) {
        self.owed.push_back(owed);
        self.release_due_locals();
    }

    /// One reply from Redis went out.
    fn answered(&mut self) {
        // A reply nobody is owed (after CLIENT REPLY OFF, say) changes
        // nothing: the session is already marked changed.
        if let Some(pos) = self.owed.iter().position(|o| *o == Owed::Upstream) {
            self.owed.remove(pos);
        }
        self.release_due_locals();
    }

    /// Local replies at the front of the queue go out now.
    fn release_due_locals(&mut self) {
        while let Some(Owed::Local(bytes)) = self.owed.front() {
            self.ready.extend_from_slice(bytes);
            self.owed.pop_front();
        }
    }

    /// Records what a complete command does; `Some(reply)` when lessor
    /// answers it instead of Redis.
    fn note_command(&mut self, frame: &Frame) -> Option<&'static [u8]> {
        let name = frame.command();
        let sub = frame.arg(0);
        if let Some(reply) = local_reply(&name) {
            if name == "QUIT" {
                self.quit = true;
            }
            return Some(reply);
        }
        let change = match (name.as_str(), sub.as_deref()) {
            ("MULTI", _) => {
                self.multi = true;
                None
            }
            ("EXEC" | "DISCARD", _) => {
                // Both end the transaction and drop every watch.
                self.multi = false;
                self.watching = false;
                None
            }
            ("SELECT", _) => {
                self.selected = true;
                None
            }
            ("WATCH", _) => {
                self.watching = true;
                None
            }
            ("UNWATCH", _) => {
                self.watching = false;
                None
            }
            ("READONLY", _) => {
                self.readonly = true;
                None
            }
            ("READWRITE", _) => {
                self.readonly = false;
                None
            }
            ("RESET", _) => Some("RESET"),
            ("SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE", _) => Some("subscribed"),
            ("MONITOR", _) => Some("MONITOR"),
            ("CLIENT", Some("REPLY")) => Some("CLIENT REPLY changed"),
            ("CLIENT", Some("TRACKING")) => {
                self.tracking = true;
                None
            }
            ("CLIENT", Some("SETNAME")) => {
                self.renamed = true;
                None
            }
            _ => None,
        };
        if let Some(change) = change {
            self.changed.get_or_insert_with(|| change.to_owned());
        }
        None
    }
}

/// The bytes to forward, as ranges of the input and held bytes, so that the
/// input is forwarded without a copy when it goes out whole.
#[derive(Default)]
struct Pieces(Vec<Piece>);

enum Piece {
    Range(usize, usize),
    Held(Bytes),
}

impl Pieces {
    fn range(&mut self, start: usize, end: usize) {
        if let Some(Piece::Range(_, last)) = self.0.last_mut()
            && *last == start
        {
            *last = end;
        } else if start < end {
            self.0.push(Piece::Range(start, end));
        }
    }

    fn held(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.0.push(Piece::Held(bytes));
        }
    }

    fn into_bytes(self, data: &Bytes) -> Bytes {
        match self.0.as_slice() {
            [] => Bytes::new(),
            [Piece::Range(a, b)] => data.slice(*a..*b),
            [Piece::Held(bytes)] => bytes.clone(),
            pieces => {
                let mut out = BytesMut::new();
                for piece in pieces {
                    match piece {
                        Piece::Range(a, b) => out.extend_from_slice(&data[*a..*b]),
                        Piece::Held(bytes) => out.extend_from_slice(bytes),
                    }
                }
                out.freeze()
            }
        }
    }
}

/// Commands that undo a lease's session changes, sent before its
/// connection goes back to the pool.
#[derive(Debug, Clone)]
pub(crate) struct Restore {
    request: Vec<u8>,
    replies: usize,
    max_frame: u64,
    /// What is undone, for logs.
    undone: String,
}

/// How long the undo may take before the connection is closed instead.
const RESTORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl Restore {
    /// Sends the undo and reads its replies, within `RESTORE_TIMEOUT`;
    /// whether every one was `+OK`.
    pub(crate) async fn apply(&self, stream: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let undo = async {
            stream.write_all(&self.request).await.ok()?;
            let mut scanner = Scanner::new(false, self.max_frame);
            let (mut replies, mut ok) = (0, true);
            let mut buf = [0u8; 512];
            while replies < self.replies {
                let n = stream.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                scanner
                    .feed(&buf[..n], |f| {
                        replies += 1;
                        ok &= f.kind == b'+';
                    })
                    .ok()?;
            }
            (ok && scanner.at_boundary()).then_some(())
        };
        let done = matches!(
            tokio::time::timeout(RESTORE_TIMEOUT, undo).await,
            Ok(Some(()))
        );
        if !done {
            tracing::debug!(undone = %self.undone, "session restore failed; connection closed");
        }
        done
    }
}

/// The reply lessor gives instead of forwarding, for the commands it answers.
fn local_reply(name: &str) -> Option<&'static [u8]> {
    match name {
        "QUIT" => Some(QUIT_OK),
        "AUTH" | "HELLO" => Some(AUTH_REFUSED),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> RedisSession {
        RedisSession::new(1 << 20)
    }

    #[test]
    fn replies_pending_until_each_arrives() {
        let mut s = session();
        let sent = s
            .client_sent(&Bytes::from_static(b"INCR a\r\nINCR a\r\n"))
            .unwrap();
        assert_eq!(&sent[..], b"INCR a\r\nINCR a\r\n");
        assert_eq!(s.verdict(), Err("2 replies pending".into()));
        s.upstream_sent(Bytes::from_static(b":1\r\n:")).unwrap();
        assert_eq!(s.verdict(), Err("1 reply pending".into()));
        s.upstream_sent(Bytes::from_static(b"2\r\n")).unwrap();
        assert_eq!(s.verdict(), Ok(()));
    }

    #[test]
    fn whole_commands_go_out_without_a_copy() {
        let mut s = session();
        let data = Bytes::from(b"SET k v\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec());
        let sent = s.client_sent(&data).unwrap();
        assert_eq!(sent, data);
        assert_eq!(sent.as_ptr(), data.as_ptr(), "the same bytes, not a copy");
        // A large value streams through in pieces, each forwarded as is.
        let head = Bytes::from(b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$100000\r\nxxxx".to_vec());
        let sent = s.client_sent(&head).unwrap();
        assert_eq!(sent.as_ptr(), head.as_ptr());
        let body = Bytes::from(vec![b'x'; 99_996]);
        assert_eq!(s.client_sent(&body).unwrap().as_ptr(), body.as_ptr());
    }

    #[test]
    fn auth_is_answered_in_order_and_never_forwarded() {
        let mut s = session();
        let sent = s
            .client_sent(&Bytes::from_static(b"GET a\r\nAUTH pw\r\nGET b\r\n"))
            .unwrap();
        assert_eq!(&sent[..], b"GET a\r\nGET b\r\n");
        assert_eq!(s.take_local(), None, "not before GET a's reply");
        let out = s
            .upstream_sent(Bytes::from_static(b"$1\r\nx\r\n$1\r\ny\r\n"))
            .unwrap();
        assert_eq!(
            &out[..],
            b"$1\r\nx\r\n-ERR lessor: authentication is done by the sidecar\r\n$1\r\ny\r\n"
        );
        assert_eq!(s.verdict(), Ok(()));
    }

    #[test]
    fn a_split_auth_never_leaks_its_head() {
        let mut s = session();
        assert!(
            s.client_sent(&Bytes::from_static(b"*2\r\n$4\r\nAU"))
                .unwrap()
                .is_empty()
        );
        assert!(
            s.client_sent(&Bytes::from_static(b"TH\r\n$2\r\npw"))
                .unwrap()
                .is_empty()
        );
        assert!(
            s.client_sent(&Bytes::from_static(b"\r\n"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            s.take_local().as_deref(),
            Some(&b"-ERR lessor: authentication is done by the sidecar\r\n"[..])
        );
        let sent = s
            .client_sent(&Bytes::from_static(b"*2\r\n$4\r\nPI"))
            .unwrap();
        assert!(sent.is_empty(), "held until named");
        let sent = s
            .client_sent(&Bytes::from_static(b"NG\r\n$2\r\nh"))
            .unwrap();
        assert_eq!(
            &sent[..],
            b"*2\r\n$4\r\nPING\r\n$2\r\nh",
            "named: streams on"
        );
    }

    #[test]
    fn quit_is_answered_locally_and_ends_the_lease() {
        let mut s = session();
        assert!(
            s.client_sent(&Bytes::from_static(b"QUIT\r\n"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.take_local().as_deref(), Some(QUIT_OK));
        assert!(s.quit_done());
        assert_eq!(s.verdict(), Ok(()));
    }

    #[test]
    fn state_changes_are_named() {
        for (cmd, why) in [
            (&b"SUBSCRIBE ch\r\n"[..], "subscribed"),
            (b"CLIENT REPLY OFF\r\n", "CLIENT REPLY changed"),
        ] {
            let mut s = session();
            s.client_sent(&Bytes::copy_from_slice(cmd)).unwrap();
            s.upstream_sent(Bytes::from_static(b"+OK\r\n")).unwrap();
            assert_eq!(s.verdict(), Err(why.into()));
        }
        let mut s = session();
        s.client_sent(&Bytes::from_static(
            b"SELECT 5\r\nWATCH k\r\nMULTI\r\nSET a 1\r\n",
        ))
        .unwrap();
        s.upstream_sent(Bytes::from_static(b"+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n"))
            .unwrap();
        assert_eq!(s.verdict(), Ok(()), "clean, but changed");
        assert!(!s.is_clean());
        let undo = s.restore(&RedisConfig::default()).unwrap();
        assert_eq!(undo.undone, "MULTI, SELECT");
        assert_eq!(undo.replies, 2);
        assert_eq!(
            &undo.request[..],
            b"*1\r\n$7\r\nDISCARD\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n"
        );
        s.client_sent(&Bytes::from_static(b"EXEC\r\n")).unwrap();
        s.upstream_sent(Bytes::from_static(b"*1\r\n+OK\r\n"))
            .unwrap();
        assert_eq!(
            s.restore(&RedisConfig::default()).map(|r| r.undone),
            Some("SELECT".into())
        );
    }
}
