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

use super::command::{Command, CommandReader, Head, ProtocolError};
use super::resp::{Frame, RespError, Scanner, encode_command};
pub(crate) use super::restore::Restore;
use crate::config::RedisConfig;

/// The reply lessor gives a client `AUTH` or `HELLO`.
const AUTH_REFUSED: &[u8] = b"-ERR lessor: authentication is done by the sidecar\r\n";
/// The reply to `QUIT`, which never reaches Redis.
const QUIT_OK: &[u8] = b"+OK\r\n";

/// One reply (or group of replies) the client is owed, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    /// Redis will send one reply.
    Reply,
    /// A pub/sub command: one reply per channel (arrays in RESP2, pushes in
    /// RESP3, each naming `kind`), or a single error when it is refused.
    Group {
        kind: &'static str,
        left: u64,
        total: u64,
    },
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
    /// Discarded: lessor answers it, or Redis would never read it.
    Drop,
}

/// What becomes of one complete command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Forward,
    Drop,
}

/// The tracker of one lease's session (or one Exchange's request).
#[derive(Debug)]
pub(crate) struct RedisSession {
    commands: CommandReader,
    replies: Scanner,
    /// The protocol the connection speaks (`redis.resp`): pub/sub replies
    /// are pushes in RESP3.
    resp: u8,
    owed: VecDeque<Owed>,
    carry: Carry,
    /// The head of a command whose name is not known yet (bounded: an
    /// inline line or a count or length line, each at most 64 KiB, or a
    /// name of at most `NAME_MAX` bytes).
    held: BytesMut,
    /// Session state changed by a command, for `Ended.detail`.
    changed: Option<String>,
    /// Why the count of replies due is not known exactly (the session is
    /// evicted, never guessed at).
    unknown: Option<&'static str>,
    /// An Exchange: the first command it cannot carry, with why.
    refused: Option<String>,
    /// A reply was `-READONLY` (a replica refused a write): the server may
    /// have been demoted. Taken by the pool.
    refused_write: bool,
    exchange: bool,
    /// `MULTI` without its `EXEC`/`DISCARD` yet (restored with `DISCARD`).
    multi: bool,
    /// Keys watched (restored with `UNWATCH`).
    watching: bool,
    /// The db was changed by `SELECT` (restored with `SELECT <db>`).
    selected: bool,
    /// `CLIENT SETNAME` (restored with the configured name, or none).
    renamed: bool,
    /// `CLIENT TRACKING on` (restored with `CLIENT TRACKING OFF`).
    tracking: bool,
    /// `READONLY` (restored with `READWRITE`).
    readonly: bool,
    /// `CLIENT NO-EVICT on` (restored with `CLIENT NO-EVICT off`).
    no_evict: bool,
    /// `CLIENT NO-TOUCH on` (restored with `CLIENT NO-TOUCH off`).
    no_touch: bool,
    /// `CLIENT REPLY OFF`: Redis answers nothing until `CLIENT REPLY ON`.
    reply_off: bool,
    /// `CLIENT REPLY SKIP` was the last request: the next gets no reply.
    skip_next: bool,
    /// The request being answered gets no reply (`CLIENT REPLY SKIP`).
    skip: bool,
    /// Subscribed to something (or asked to be, and not yet told): the
    /// connection is in pub/sub until every subscription has ended.
    subscribed: bool,
    /// Subscriptions as the server last counted them, from the counts its
    /// pub/sub replies carry: channels, patterns (the two share one count
    /// on the wire, told apart by which reply moved it) and shard
    /// channels. An argument-less unsubscribe owes one reply per
    /// subscription of its kind.
    channels: i64,
    patterns: i64,
    shard: i64,
    /// The client sent `QUIT`: Redis would read nothing after it, and the
    /// lease ends once its `+OK` is out.
    quit: bool,
    /// Local replies ready to go out now (every reply before them is out).
    ready: BytesMut,
    /// Every complete command, for the differential tests.
    log: Option<Vec<Command>>,
}

impl RedisSession {
    /// A tracker for a fresh lease on a connection speaking RESP `resp`;
    /// `max_frame` bounds bulk strings.
    pub(crate) fn new(max_frame: u64, resp: u8) -> Self {
        Self {
            commands: CommandReader::new(max_frame),
            replies: Scanner::new(max_frame),
            resp,
            owed: VecDeque::new(),
            carry: Carry::None,
            held: BytesMut::new(),
            changed: None,
            unknown: None,
            refused: None,
            refused_write: false,
            exchange: false,
            multi: false,
            watching: false,
            selected: false,
            renamed: false,
            tracking: false,
            readonly: false,
            no_evict: false,
            no_touch: false,
            reply_off: false,
            skip_next: false,
            skip: false,
            subscribed: false,
            channels: 0,
            patterns: 0,
            shard: 0,
            quit: false,
            ready: BytesMut::new(),
            log: None,
        }
    }

    /// A tracker for an Exchange: commands lessor would answer itself, or
    /// whose replies it could not count, are refused (see
    /// [`RedisSession::refusal`]) instead of carried.
    pub(crate) fn for_exchange(max_frame: u64, resp: u8) -> Self {
        Self {
            exchange: true,
            ..Self::new(max_frame, resp)
        }
    }

    /// Keeps every complete command (its first arguments), for tests that
    /// hold the tracker to the real server.
    pub(crate) fn keep_log(&mut self) {
        self.log = Some(Vec::new());
    }

    /// The commands kept by [`RedisSession::keep_log`].
    pub(crate) fn log(&self) -> &[Command] {
        self.log.as_deref().unwrap_or_default()
    }

    /// Takes client bytes; returns what goes to Redis. Local replies that
    /// are due now are kept for [`RedisSession::take_local`]. A protocol
    /// error forwards nothing of `data`: Redis would close the connection
    /// there, and the lease ends evicted.
    pub(crate) fn client_sent(&mut self, data: &Bytes) -> Result<Bytes, ProtocolError> {
        let mut done = Vec::new();
        if let Err(e) = self.commands.feed(data, |c| done.push(c)) {
            if let Some(log) = self.log.as_mut() {
                log.extend(done);
            }
            return Err(e);
        }
        // What goes out, as ranges of `data` and held bytes: in the common
        // case (nothing answered locally, nothing held) that is all of
        // `data`, sent without a copy.
        let mut out = Pieces::default();
        let mut start = 0;
        for command in done {
            let action = if self.quit {
                Action::Drop
            } else {
                self.note(&command)
            };
            match (self.carry, action) {
                (Carry::Drop, _) | (_, Action::Drop) => self.held.clear(),
                (Carry::Held, Action::Forward) => {
                    out.held(self.held.split().freeze());
                    out.range(start, command.end);
                }
                (Carry::None | Carry::Forward, Action::Forward) => {
                    out.range(start, command.end);
                }
            }
            self.carry = Carry::None;
            start = command.end;
            if let Some(log) = self.log.as_mut() {
                log.push(command);
            }
        }
        if start < data.len() {
            match self.carry {
                Carry::Drop => {}
                Carry::Forward => out.range(start, data.len()),
                Carry::None | Carry::Held => match self.commands.head() {
                    _ if self.quit => {
                        self.held.clear();
                        self.carry = Carry::Drop;
                    }
                    Head::Named(name) if local_reply(&name).is_some() => {
                        self.held.clear();
                        self.carry = Carry::Drop;
                    }
                    Head::Unknown => {
                        self.held.extend_from_slice(&data[start..]);
                        self.carry = Carry::Held;
                    }
                    Head::Named(_) | Head::Long | Head::Between => {
                        out.held(self.held.split().freeze());
                        out.range(start, data.len());
                        self.carry = Carry::Forward;
                    }
                },
            }
        }
        Ok(out.into_bytes(data))
    }

    /// Takes one whole command the caller framed itself (the native
    /// listener, which has already read it with the same rules): records
    /// what it does and what it is owed, as [`RedisSession::client_sent`]
    /// would. Whether its bytes go to Redis (`false`: lessor answers it,
    /// or Redis would never read it after a `QUIT`).
    pub(crate) fn command_sent(&mut self, command: &Command) -> bool {
        debug_assert!(self.commands.at_boundary() && self.carry == Carry::None);
        let action = if self.quit {
            Action::Drop
        } else {
            self.note(command)
        };
        action == Action::Forward
    }

    /// Whether a reply lessor gives itself waits in the reply stream: then
    /// Redis's bytes must go through [`RedisSession::upstream_sent`], which
    /// puts it at its place.
    pub(crate) fn owes_local(&self) -> bool {
        !self.ready.is_empty() || self.owed.iter().any(|o| matches!(o, Owed::Local(_)))
    }

    /// Takes Redis bytes; returns what goes to the client (with any local
    /// replies that fall due put at their place).
    pub(crate) fn upstream_sent(&mut self, data: Bytes) -> Result<Bytes, RespError> {
        let mut frames = Vec::new();
        self.replies.feed(&data, |f: Frame| frames.push(f))?;
        if !self.owed.iter().any(|o| matches!(o, Owed::Local(_))) {
            for f in &frames {
                self.answered(f);
            }
            return Ok(data);
        }
        let mut out = BytesMut::with_capacity(data.len() + 64);
        let mut start = 0;
        for f in &frames {
            out.extend_from_slice(&data[start..f.end]);
            start = f.end;
            self.answered(f);
            out.extend_from_slice(&self.ready.split());
        }
        out.extend_from_slice(&data[start..]);
        Ok(out.freeze())
    }

    /// Counts replies read where lessor owes nothing itself (an Exchange,
    /// whose commands were vetted): the bytes are only scanned, not handed
    /// back, so the caller keeps them in one buffer.
    pub(crate) fn replies_read(&mut self, data: &[u8]) -> Result<(), RespError> {
        let mut frames = Vec::new();
        self.replies.feed(data, |f: Frame| frames.push(f))?;
        for f in &frames {
            self.answered(f);
        }
        Ok(())
    }

    /// As [`RedisSession::replies_read`], and on an error how much of
    /// `data` held whole frames before it (those may still be relayed).
    pub(crate) fn replies_read_whole(&mut self, data: &[u8]) -> Result<(), (RespError, usize)> {
        let mut frames = Vec::new();
        let fed = self.replies.feed(data, |f: Frame| frames.push(f));
        for f in &frames {
            self.answered(f);
        }
        fed.map_err(|e| (e, frames.last().map_or(0, |f| f.end)))
    }

    /// Whether a reply was `-READONLY` since the last take.
    pub(crate) fn take_refused_write(&mut self) -> bool {
        std::mem::take(&mut self.refused_write)
    }

    /// Replies Redis still owes.
    pub(crate) fn replies_due(&self) -> u64 {
        self.owed
            .iter()
            .map(|o| match o {
                Owed::Reply => 1,
                Owed::Group { left, .. } => *left,
                Owed::Local(_) => 0,
            })
            .sum()
    }

    /// Every command sent so far has had its whole reply, and lessor's own
    /// replies have been taken: nothing is in flight either way.
    pub(crate) fn settled(&self) -> bool {
        self.owed.is_empty()
            && self.ready.is_empty()
            && self.replies.at_boundary()
            && (self.commands.at_boundary() || self.carry == Carry::Drop)
    }

    /// Whether Redis would send no reply to the next request (`CLIENT
    /// REPLY OFF`, or a `SKIP` just before it).
    pub(crate) fn silenced(&self) -> bool {
        self.reply_off || self.skip
    }

    /// Whether the next request is the one a `CLIENT REPLY SKIP` silences
    /// (replies otherwise on).
    pub(crate) fn skipping(&self) -> bool {
        self.skip && !self.reply_off
    }

    /// Whether a command sent now gets exactly one reply, in band and in
    /// order: no transaction queues it, no subscription or MONITOR
    /// interleaves, and replies are on.
    pub(crate) fn answers_in_band(&self) -> bool {
        !self.multi
            && !self.subscribed
            && !self.reply_off
            && !self.skip
            && !self.skip_next
            && self.unknown.is_none()
    }

    /// Whether the connection is in RESP2's pub/sub context, where Redis
    /// refuses all but the subscribe family, `PING`, `QUIT` and `RESET`.
    pub(crate) fn resp2_pubsub(&self) -> bool {
        self.subscribed && self.resp == 2
    }

    /// Whether the bytes so far end between commands.
    pub(crate) fn at_boundary(&self) -> bool {
        self.commands.at_boundary()
    }

    /// An Exchange's request holds something it cannot carry.
    pub(crate) fn refusal(&self) -> Option<String> {
        self.refused.clone().or_else(|| {
            self.unknown
                .map(|why| format!("its replies could not be counted: {why}"))
        })
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
        self.owed.iter().all(|o| matches!(o, Owed::Local(_)))
            && (self.commands.at_boundary() || self.carry == Carry::Drop)
            && self.replies.at_boundary()
            && !self.state_changed()
            && !self.subscribed
            && self.changed.is_none()
            && self.unknown.is_none()
    }

    /// Whether the session state is the one lessor opened (replies aside).
    pub(crate) fn unchanged(&self) -> bool {
        !self.state_changed()
            && !self.subscribed
            && self.changed.is_none()
            && self.unknown.is_none()
    }

    /// Session state a restore puts back.
    fn state_changed(&self) -> bool {
        self.multi
            || self.watching
            || self.selected
            || self.renamed
            || self.tracking
            || self.readonly
            || self.no_evict
            || self.no_touch
            || self.reply_off
            || self.skip
            || self.skip_next
    }

    /// What ties the session to its connection now, beyond what a restore
    /// undoes or a client of the native listener carries along (its db,
    /// name and READONLY): a transaction, watched keys, subscriptions,
    /// tracking, silenced replies, MONITOR, or replies lessor cannot count.
    /// `None` when another client could be served next.
    pub(crate) fn binds(&self) -> Option<&str> {
        if let Some(why) = self.unknown {
            return Some(why);
        }
        if let Some(changed) = &self.changed {
            return Some(changed);
        }
        [
            (self.multi, "MULTI"),
            (self.watching, "WATCH"),
            (self.subscribed, "subscribed"),
            (self.tracking, "CLIENT TRACKING"),
            (
                self.reply_off || self.skip || self.skip_next,
                "CLIENT REPLY",
            ),
            (self.no_evict, "CLIENT NO-EVICT"),
            (self.no_touch, "CLIENT NO-TOUCH"),
        ]
        .into_iter()
        .find_map(|(on, what)| on.then_some(what))
    }

    /// Whether reading (and dropping) the replies still due would make the
    /// session clean: every command was sent whole and nothing else is
    /// wrong.
    pub(crate) fn drainable(&self) -> bool {
        self.changed.is_none()
            && !self.subscribed
            && self.unknown.is_none()
            && (self.commands.at_boundary() || self.carry == Carry::Drop)
            && (self.replies_due() > 0 || !self.replies.at_boundary())
    }

    /// Whether the connection may go back to the pool, or why not.
    pub(crate) fn verdict(&self) -> Result<(), String> {
        if let Some(why) = self.unknown {
            return Err(format!("replies not countable: {why}"));
        }
        let pending = self.replies_due();
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
        if self.subscribed {
            return Err("subscribed".into());
        }
        if self.reply_off && self.multi {
            return Err("CLIENT REPLY OFF inside MULTI".into());
        }
        Ok(())
    }

    /// What puts a clean-but-changed session back as it was opened: replies
    /// on again, a `MULTI` discarded, watches dropped, the configured db
    /// selected again, the configured name, tracking, no-evict and
    /// no-touch off, read-write. `None` when there is nothing to undo. Only
    /// for a session whose [`RedisSession::verdict`] is clean.
    pub(crate) fn restore(&self, cfg: &RedisConfig) -> Option<Restore> {
        let db = cfg.db;
        let max_frame = cfg.max_frame.as_u64();
        let mut request = Vec::new();
        let mut undone = Vec::new();
        let mut undo = |args: &[&[u8]], what: &'static str| {
            encode_command(&mut request, args);
            undone.push(what);
        };
        // First, so that every later undo is answered.
        if self.reply_off || self.skip || self.skip_next {
            undo(&[b"CLIENT", b"REPLY", b"ON"], "CLIENT REPLY");
        }
        if self.multi {
            undo(&[b"DISCARD"], "MULTI");
        }
        if self.watching && !self.multi {
            undo(&[b"UNWATCH"], "WATCH");
        }
        if self.selected {
            undo(&[b"SELECT", db.to_string().as_bytes()], "SELECT");
        }
        if self.renamed {
            let name = cfg.client_name.as_deref().unwrap_or("");
            undo(&[b"CLIENT", b"SETNAME", name.as_bytes()], "CLIENT SETNAME");
        }
        if self.tracking {
            undo(&[b"CLIENT", b"TRACKING", b"OFF"], "CLIENT TRACKING");
        }
        if self.no_evict {
            undo(&[b"CLIENT", b"NO-EVICT", b"OFF"], "CLIENT NO-EVICT");
        }
        if self.no_touch {
            undo(&[b"CLIENT", b"NO-TOUCH", b"OFF"], "CLIENT NO-TOUCH");
        }
        if self.readonly {
            undo(&[b"READWRITE"], "READONLY");
        }
        (!undone.is_empty()).then(|| Restore {
            replies: undone.len(),
            request,
            max_frame,
            undone: undone.join(", "),
        })
    }

    /// One frame from Redis went out: it answers the oldest owed reply, or
    /// is out-of-band (a RESP3 push that answers no command).
    fn answered(&mut self, frame: &Frame) {
        if frame.is_error()
            && frame
                .args
                .first()
                .is_some_and(|e| e.starts_with(b"READONLY"))
        {
            self.refused_write = true;
        }
        // Out of band: a RESP3 push, or a message to a RESP2 subscriber
        // (an array, in the one context where no reply can start so).
        let oob = frame.is_push()
            || (self.subscribed
                && self.resp == 2
                && frame.kind == b'*'
                && matches!(frame.first().as_str(), "message" | "pmessage" | "smessage"));
        let pos = self.owed.iter().position(|o| !matches!(o, Owed::Local(_)));
        match pos.map(|p| (p, self.owed[p])) {
            Some((p, Owed::Group { kind, left, total })) => {
                let counts = (frame.is_push() || (self.resp == 2 && frame.kind == b'*'))
                    && frame.first() == kind;
                if counts {
                    if left > 1 {
                        self.owed[p] = Owed::Group {
                            kind,
                            left: left - 1,
                            total,
                        };
                    } else {
                        self.owed.remove(p);
                    }
                    self.subscriptions_now(kind, frame.count);
                } else if oob {
                    // An invalidation, a message.
                } else {
                    // A refused command gets one error instead of its group.
                    if !(frame.is_error() && left == total) {
                        self.unknown
                            .get_or_insert("a pub/sub reply of another kind");
                    }
                    self.owed.remove(p);
                }
            }
            Some((_, _)) if oob => {}
            Some((p, _)) => {
                self.owed.remove(p);
            }
            None if oob => {}
            None => {
                self.unknown.get_or_insert("a reply no command was owed");
            }
        }
        self.release_due_locals();
    }

    /// A pub/sub reply of `kind` said how many subscriptions remain: the
    /// change is the count's move since the last reply of that count.
    fn subscriptions_now(&mut self, kind: &str, count: Option<i64>) {
        let Some(count) = count else {
            self.uncountable("a pub/sub reply without its count");
            return;
        };
        match kind {
            "ssubscribe" | "sunsubscribe" => self.shard = count,
            "subscribe" | "unsubscribe" => self.channels = count - self.patterns,
            _ => self.patterns = count - self.channels,
        }
        let owes_group = self.owed.iter().any(|o| matches!(o, Owed::Group { .. }));
        if self.channels <= 0 && self.patterns <= 0 && self.shard <= 0 && !owes_group {
            // Redis leaves pub/sub when the last subscription ends.
            self.subscribed = false;
        }
    }

    /// Local replies at the front of the queue go out now.
    fn release_due_locals(&mut self) {
        while let Some(Owed::Local(bytes)) = self.owed.front() {
            self.ready.extend_from_slice(bytes);
            self.owed.pop_front();
        }
    }

    fn owe(&mut self, owed: Owed) {
        self.owed.push_back(owed);
        self.release_due_locals();
    }

    /// Records what a complete request does to the session and what it is
    /// owed, as Redis would process it.
    fn note(&mut self, command: &Command) -> Action {
        if command.argc == 0 {
            // Redis skips an empty request, but it still ends a SKIP.
            self.skip = std::mem::take(&mut self.skip_next);
            return Action::Forward;
        }
        let name = command.name();
        let sub = command.arg(0);
        let mut silent = self.reply_off || self.skip;
        // Replies Redis sends for it, unless silenced.
        let mut owed = Some(Owed::Reply);
        if let Some(reply) = local_reply(&name) {
            // Redis never sees it: a SKIP still applies to the next command
            // Redis gets, and only OFF silences lessor's own answer.
            if name == "QUIT" {
                self.quit = true;
            }
            if self.exchange {
                self.refuse(&name, refused_in_exchange(&name, None).unwrap_or_default());
            }
            if !self.reply_off {
                self.owe(Owed::Local(reply));
            }
            return Action::Drop;
        } else if self.multi
            && !matches!(
                name.as_str(),
                "EXEC" | "DISCARD" | "MULTI" | "WATCH" | "RESET"
            )
        {
            // Queued: `+QUEUED` now, its effect at EXEC.
            match (name.as_str(), sub.as_deref()) {
                (n, _) if pubsub_kind(n).is_some() => {
                    self.uncountable("a pub/sub command inside MULTI");
                }
                ("CLIENT", Some("REPLY")) => self.uncountable("CLIENT REPLY inside MULTI"),
                _ => self.note_effect(&name, sub.as_deref(), command),
            }
        } else if let Some(kind) = pubsub_kind(&name) {
            owed = self.note_pubsub(&name, kind, command, silent);
        } else {
            match (name.as_str(), sub.as_deref()) {
                ("RESET", _) if command.argc == 1 => {
                    // Answered even with replies off (but not when skipped);
                    // back to a fresh connection's state (RESP2, db 0,
                    // default user), which is not the one lessor opened:
                    // the session is evicted.
                    silent = self.skip;
                    self.reply_off = false;
                    self.skip_next = false;
                    self.multi = false;
                    self.watching = false;
                    self.subscribed = false;
                    (self.channels, self.patterns, self.shard) = (0, 0, 0);
                    self.resp = 2;
                    self.changed.get_or_insert_with(|| "RESET".to_owned());
                }
                ("MULTI", _) if command.argc == 1 => self.multi = true,
                ("EXEC" | "DISCARD", _) if command.argc == 1 && self.multi => {
                    // Both end the transaction and drop every watch.
                    self.multi = false;
                    self.watching = false;
                }
                ("WATCH", _) if command.argc >= 2 && !self.multi => self.watching = true,
                ("CLIENT", Some("REPLY")) if self.subscribed && self.resp == 2 => {
                    // Refused in RESP2's pub/sub context, unless every
                    // subscription has ended, which lessor does not count.
                    self.uncountable("CLIENT REPLY while subscribed");
                }
                ("CLIENT", Some("REPLY")) if command.argc == 3 => {
                    match command.option(1).as_deref() {
                        Some("ON") => {
                            // Answered: ON lifts the silence before replying.
                            self.reply_off = false;
                            self.skip = false;
                            silent = false;
                        }
                        Some("OFF") => {
                            self.reply_off = true;
                            owed = None;
                        }
                        Some("SKIP") => {
                            if !self.reply_off {
                                self.skip_next = true;
                            }
                            owed = None;
                        }
                        _ => {}
                    }
                }
                _ => self.note_effect(&name, sub.as_deref(), command),
            }
        }
        if self.exchange
            && let Some(why) = refused_in_exchange(&name, sub.as_deref())
        {
            self.refuse(&name, why);
        }
        if let Some(owed) = owed
            && !silent
        {
            self.owe(owed);
        }
        if silent && !self.multi && blocks(&name) {
            // Redis holds the connection until it is served, and nothing
            // will say when.
            self.uncountable("a blocking command with its reply silenced");
        }
        self.skip = std::mem::take(&mut self.skip_next);
        Action::Forward
    }

    /// A pub/sub command outside MULTI: one reply per channel (one in all
    /// for an argument-less unsubscribe), or one error for a wrong arity.
    fn note_pubsub(
        &mut self,
        name: &str,
        kind: &'static str,
        command: &Command,
        silent: bool,
    ) -> Option<Owed> {
        let subscribing = !name.contains("UNSUB");
        if subscribing && command.argc < 2 {
            return Some(Owed::Reply);
        }
        if silent {
            // Pushes may still be delivered under CLIENT REPLY OFF.
            self.uncountable("a pub/sub command with replies off");
            return None;
        }
        let mut channels = command.argc - 1;
        if channels == 0 {
            // One reply per subscription of its kind (one when there is
            // none): known once every earlier pub/sub reply has come.
            if self.owed.iter().any(|o| matches!(o, Owed::Group { .. })) {
                self.uncountable("an unsubscribe from every channel");
            }
            let held = match kind {
                "unsubscribe" => self.channels,
                "punsubscribe" => self.patterns,
                _ => self.shard,
            };
            channels = u64::try_from(held).unwrap_or(0);
        }
        if subscribing {
            self.subscribed = true;
        }
        Some(Owed::Group {
            kind,
            left: channels.max(1),
            total: channels.max(1),
        })
    }

    /// The session state a command changes (outside MULTI, or when a queued
    /// one runs at EXEC: marked at once, which at worst undoes nothing).
    fn note_effect(&mut self, name: &str, sub: Option<&str>, command: &Command) {
        // Queued in MULTI, a command may run at EXEC or never (DISCARD,
        // EXECABORT, a failed WATCH): it can only ever set a flag to
        // restore, never clear one.
        let queued = self.multi;
        let switch = |flag: bool| match command.option(1).as_deref() {
            _ if queued => true,
            Some("ON") => true,
            Some("OFF") => false,
            _ => flag,
        };
        let change = match (name, sub) {
            ("SELECT", _) => {
                self.selected = true;
                None
            }
            ("UNWATCH", _) if !queued => {
                self.watching = false;
                None
            }
            ("READONLY", _) => {
                self.readonly = true;
                None
            }
            ("READWRITE", _) if !queued => {
                self.readonly = false;
                None
            }
            ("MONITOR", _) => {
                self.uncountable("MONITOR");
                Some("MONITOR")
            }
            ("SYNC" | "PSYNC", _) => {
                self.uncountable("a replication stream");
                Some("replication stream")
            }
            ("CLIENT", Some("TRACKING")) => {
                self.tracking = switch(self.tracking);
                None
            }
            ("CLIENT", Some("SETNAME")) => {
                self.renamed = true;
                None
            }
            ("CLIENT", Some("NO-EVICT")) => {
                self.no_evict = switch(self.no_evict);
                None
            }
            ("CLIENT", Some("NO-TOUCH")) => {
                self.no_touch = switch(self.no_touch);
                None
            }
            _ => None,
        };
        if let Some(change) = change {
            self.changed.get_or_insert_with(|| change.to_owned());
        }
    }

    fn uncountable(&mut self, why: &'static str) {
        self.unknown.get_or_insert(why);
    }

    fn refuse(&mut self, name: &str, why: &str) {
        self.refused
            .get_or_insert_with(|| format!("{}: {why}", printable(name)));
    }
}

/// Commands that may wait on the server before they reply.
pub(crate) fn blocks(name: &str) -> bool {
    matches!(
        name,
        "BLPOP"
            | "BRPOP"
            | "BRPOPLPUSH"
            | "BLMOVE"
            | "BLMPOP"
            | "BZPOPMIN"
            | "BZPOPMAX"
            | "BZMPOP"
            | "XREAD"
            | "XREADGROUP"
            | "WAIT"
            | "WAITAOF"
    )
}

/// The pub/sub family of a command, as its replies name it.
fn pubsub_kind(name: &str) -> Option<&'static str> {
    Some(match name {
        "SUBSCRIBE" => "subscribe",
        "PSUBSCRIBE" => "psubscribe",
        "SSUBSCRIBE" => "ssubscribe",
        "UNSUBSCRIBE" => "unsubscribe",
        "PUNSUBSCRIBE" => "punsubscribe",
        "SUNSUBSCRIBE" => "sunsubscribe",
        _ => return None,
    })
}

/// Commands refused in an Exchange: they would leave the connection in a
/// state no reply count describes, or are the sidecar's to send.
fn refused_in_exchange(name: &str, sub: Option<&str>) -> Option<&'static str> {
    Some(match (name, sub) {
        ("SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE", _) => "subscriptions need a lease",
        ("MONITOR", _) => "MONITOR needs a lease",
        ("SYNC" | "PSYNC", _) => "replication needs a lease",
        ("RESET", _) => "RESET would undo the sidecar's session",
        ("AUTH", _) => "authentication is done by the sidecar",
        ("HELLO", _) => "the protocol version is the sidecar's (redis.resp)",
        ("QUIT", _) => "QUIT would close a pooled connection",
        ("CLIENT", Some("REPLY")) => "CLIENT REPLY would desynchronize the replies",
        _ => return None,
    })
}

/// A command name as it may be shown: printable, and short.
fn printable(name: &str) -> String {
    name.chars().take(32).flat_map(char::escape_debug).collect()
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

/// The reply lessor gives instead of forwarding, for the commands it answers.
fn local_reply(name: &str) -> Option<&'static [u8]> {
    match name {
        "QUIT" => Some(QUIT_OK),
        "AUTH" | "HELLO" => Some(AUTH_REFUSED),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
