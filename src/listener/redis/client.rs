//! One client of the Redis listener: its commands framed as Redis frames
//! them, answered locally, or sent in batches on pooled connections (a
//! hold: a lease of the pool, relayed through the session tracker), until
//! it leaves.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tracing::Instrument;
use tracing::field::Empty;

use super::Listener;
use super::local::{Answer, ClientState, Door, NOAUTH, valid_name};
use super::shared;
use crate::config::{ClientAuth, PoolMode, UpstreamConfig};
use crate::lease::guard::LeaseGuard;
use crate::lease::registry::{LiveLease, Printable};
use crate::lease::state::{Direction, End};
use crate::listener::{NoConnection, checkout};
use crate::protocol::redis::command::{
    Command, CommandReader, ProtocolError, full_args, string2ll,
};
use crate::protocol::redis::resp::{Frame, RespError, Scanner, encode_command};
use crate::protocol::redis::session::{RedisSession, blocks};
use crate::telemetry::TARGET;
use lessor_client::pb::Disposition;

/// Bytes buffered one way before lessor stops reading that side (a whole
/// command may need more: up to `redis.max_frame`).
const BUFFERED_MAX: usize = 256 * 1024;
/// The first read buffer of a direction.
const READ_SIZE: usize = 16 * 1024;
/// The most an unauthenticated client's incomplete command may hold:
/// Redis refuses a bulk string over 16 KiB before authentication.
const PREAUTH_MAX: usize = 20 * 1024;
/// How long lessor waits to tell a client why it is closed.
const SAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// How a hold or a local answer ended, for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// It goes on.
    Go,
    /// The client is gone or was told to go.
    Close,
}

/// A command lessor applies for the client, besides sending it: its effect
/// on what follows the client, recorded when Redis answers `+OK`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Follow {
    /// `SELECT n` (`None`: a number Redis took and lessor cannot read).
    Select(Option<u32>),
    /// `CLIENT SETNAME name` (`None`: not one Redis would take).
    SetName(Option<Vec<u8>>),
    /// `READONLY` or `READWRITE`.
    ReadOnly(bool),
}

/// What the listener does with one command, before it is sent.
enum Class {
    /// Part of a batch.
    Batch,
    /// A batch of its own, whose reply changes what follows the client.
    Follow(Follow),
    /// Answered by lessor.
    Local,
    /// Before authentication: `-NOAUTH`.
    NoAuth,
}

/// A connected client.
struct Client<S> {
    listener: Arc<Listener>,
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    /// Client bytes not yet sent or answered; they start at a command.
    buf: BytesMut,
    /// Frames `buf` as Redis frames a request stream.
    reader: CommandReader,
    /// How much of `buf` `reader` has seen.
    fed: usize,
    /// The complete commands at the front of `buf` (their `end`s are
    /// offsets in `buf`).
    ready: VecDeque<Command>,
    /// Batch bytes for the server, and replies for the client (kept across
    /// holds: no allocation per batch).
    to_server: BytesMut,
    to_client: BytesMut,
    /// What the server sent, before it joins `to_client`.
    from_server: BytesMut,
    /// The sidecar's drain and grace tokens, as children of this client's
    /// own (checked at every turn without contending with other clients).
    stop: tokio_util::sync::CancellationToken,
    revoke: tokio_util::sync::CancellationToken,
    /// A protocol error after the commands in `ready`: Redis answers them,
    /// then the error, then closes.
    broken: Option<ProtocolError>,
    state: ClientState,
    /// Pinned for as long as it stays: it changed what follows it while it
    /// held a connection in a state of its own (a `SELECT` inside MULTI),
    /// or the listener pools whole sessions.
    sticky: bool,
    holder: String,
    peer: String,
    /// When it connected (`listen.startup_timeout` runs from here).
    connected: tokio::time::Instant,
    id: u64,
    holds: u64,
    max_frame: u64,
}

/// Serves one connection from its first byte to its close.
pub(super) async fn run<S>(listener: Arc<Listener>, mut stream: S, peer: String, id: u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(_permit) = listener.clients.clone().try_acquire_owned() else {
        let _ = stream
            .write_all(b"-ERR max number of clients reached\r\n")
            .await;
        return;
    };
    if listener.shared.stop_accepting.is_cancelled() {
        return;
    }
    let cfg = &listener.config.redis;
    let (rd, wr) = tokio::io::split(stream);
    let mut client = Client {
        rd,
        wr,
        buf: BytesMut::with_capacity(READ_SIZE),
        reader: CommandReader::new(cfg.max_frame.as_u64()),
        fed: 0,
        ready: VecDeque::new(),
        broken: None,
        to_server: BytesMut::new(),
        to_client: BytesMut::new(),
        from_server: BytesMut::with_capacity(READ_SIZE),
        stop: listener.shared.stop_accepting.child_token(),
        revoke: listener.shared.revoke.child_token(),
        state: ClientState {
            authed: listener.listen.auth == ClientAuth::Trust,
            db: cfg.db,
            name: None,
            readonly: false,
        },
        sticky: listener.listen.pool_mode == PoolMode::Session,
        holder: format!("@{peer}"),
        peer,
        connected: tokio::time::Instant::now(),
        id,
        holds: 0,
        max_frame: cfg.max_frame.as_u64(),
        listener: listener.clone(),
    };
    while client.turn().await == Next::Go {}
    let _ = client.wr.shutdown().await;
}

/// What a relay turn saw.
enum Event {
    Revoked,
    Timeout,
    Stalled,
    ClientRead(io::Result<usize>),
    ServerRead(io::Result<usize>),
    ServerWrote(io::Result<usize>),
    ClientWrote(io::Result<usize>),
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// One step: answers or sends what is ready, or waits for more.
    async fn turn(&mut self) -> Next {
        if self.ready.is_empty() {
            if let Some(e) = self.broken.take() {
                self.reply(format!("-ERR {e}\r\n").as_bytes()).await;
                return Next::Close;
            }
            return self.idle().await;
        }
        let class = self.classify(0);
        match class {
            Class::NoAuth => {
                self.consume(1);
                self.reply(NOAUTH).await
            }
            Class::Local => {
                let (reply, quit) = self.answer_front();
                match self.reply(&reply).await {
                    Next::Go if !quit => Next::Go,
                    _ => Next::Close,
                }
            }
            Class::Follow(follow) => self.hold(1, Some(follow)).await,
            Class::Batch => {
                let mut n = 1;
                while n < self.ready.len() && matches!(self.classify(n), Class::Batch) {
                    n += 1;
                }
                if let Some(next) = self.shared_batch(n).await {
                    return next;
                }
                self.hold(n, None).await
            }
        }
    }

    /// Answers the command at the front (one lessor answers itself), and
    /// consumes it: the reply, and whether the client said `QUIT`.
    fn answer_front(&mut self) -> (Vec<u8>, bool) {
        let end = self.ready[0].end;
        let args = full_args(&self.buf[..end]).unwrap_or_default();
        self.consume(1);
        if let Some(why) = refused(&args) {
            return (format!("-ERR lessor: {why}\r\n").into_bytes(), false);
        }
        let mut state = self.state.clone();
        let answer = self.door().answer(&args, &mut state, self.id);
        self.state = state;
        match answer {
            Answer::Reply(bytes) => (bytes, false),
            Answer::Quit => (b"+OK\r\n".to_vec(), true),
            Answer::Hello { id } => {
                let version = self.listener.version();
                (self.door().hello_reply(id, &version), false)
            }
        }
    }

    fn door(&self) -> Door<'_> {
        let l = &self.listener;
        Door {
            auth: l.listen.auth,
            password: l.password.as_deref(),
            username: l.listen.username.as_deref(),
            resp: l.config.redis.resp,
            db: l.config.redis.db,
        }
    }

    /// The bytes of ready command `i`.
    fn bytes_of(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ready[i - 1].end };
        &self.buf[start..self.ready[i].end]
    }

    /// What the listener does with ready command `i`.
    fn classify(&self, i: usize) -> Class {
        let command = &self.ready[i];
        if command.argc == 0 {
            // Redis skips an empty request without a reply.
            return Class::Batch;
        }
        let name = command.name();
        if Door::answers(&name) || self.redirects(i) {
            return Class::Local;
        }
        if !self.state.authed {
            return Class::NoAuth;
        }
        match (name.as_str(), command.argc) {
            ("SELECT", 2) => Class::Follow(Follow::Select(
                command
                    .args
                    .get(1)
                    .and_then(|a| string2ll(a))
                    .and_then(|n| u32::try_from(n).ok()),
            )),
            ("READONLY", 1) => Class::Follow(Follow::ReadOnly(true)),
            ("READWRITE", 1) => Class::Follow(Follow::ReadOnly(false)),
            ("CLIENT", 3) if command.arg(0).as_deref() == Some("SETNAME") => {
                let args = full_args(self.bytes_of(i));
                let name = args.and_then(|mut a| a.pop()).filter(|n| valid_name(n));
                Class::Follow(Follow::SetName(name))
            }
            _ => Class::Batch,
        }
    }

    /// `CLIENT TRACKING ... REDIRECT id`: the id would name a pooled
    /// connection, whose next client would get this one's invalidations.
    fn redirects(&self, i: usize) -> bool {
        let command = &self.ready[i];
        command.name() == "CLIENT"
            && command.arg(0).as_deref() == Some("TRACKING")
            && full_args(self.bytes_of(i)).is_some_and(|args| refused(&args).is_some())
    }

    /// Drops the first `n` ready commands' bytes.
    fn consume(&mut self, n: usize) {
        let end = self.ready[n - 1].end;
        self.ready.drain(..n);
        for c in &mut self.ready {
            c.end -= end;
        }
        self.fed -= end;
        self.buf.advance(end);
    }

    /// Frames what has arrived since the last call.
    fn frame(&mut self) {
        if self.broken.is_some() || self.fed == self.buf.len() {
            return;
        }
        let base = self.fed;
        let ready = &mut self.ready;
        let result = self.reader.feed(&self.buf[base..], |mut c| {
            c.end += base;
            ready.push_back(c);
        });
        self.fed = self.buf.len();
        let result = result.and_then(|()| self.unauthenticated_limits());
        if let Err(e) = result {
            // Nothing after the error is read, as in Redis.
            let end = self.ready.back().map_or(0, |c| c.end);
            self.buf.truncate(end);
            self.fed = end;
            self.broken = Some(e);
        }
    }

    /// Before authentication a client may send little, as with Redis: at
    /// most 10 arguments a command, and a command still incomplete is
    /// bounded (`PREAUTH_MAX`), so a stranger cannot make lessor hold
    /// `max_frame` bytes per connection.
    fn unauthenticated_limits(&mut self) -> Result<(), ProtocolError> {
        if self.state.authed {
            return Ok(());
        }
        if let Some(at) = self.ready.iter().position(|c| c.argc > 10) {
            self.ready.truncate(at);
            return Err(ProtocolError::UnauthenticatedCount);
        }
        let complete = self.ready.back().map_or(0, |c| c.end);
        if self.ready.is_empty() && self.buf.len() - complete > PREAUTH_MAX {
            return Err(ProtocolError::UnauthenticatedLength);
        }
        Ok(())
    }

    /// Writes a reply lessor gives itself.
    /// A client that does not read them cannot keep its slot: the write
    /// gives up at the grace's end, after `lease.idle_timeout`, and before
    /// authentication at the startup deadline.
    async fn reply(&mut self, bytes: &[u8]) -> Next {
        let revoke = self.revoke.clone();
        let listener = self.listener.clone();
        let mut deadline = tokio::time::Instant::now() + listener.config.lease.idle_timeout;
        if !self.state.authed {
            deadline = deadline.min(self.connected + listener.listen.startup_timeout);
        }
        tokio::select! {
            written = self.wr.write_all(bytes) => match written {
                Ok(()) => Next::Go,
                Err(_) => Next::Close,
            },
            () = revoke.cancelled() => Next::Close,
            () = tokio::time::sleep_until(deadline) => Next::Close,
        }
    }

    /// No server connection: waits for the client's next command. A drain
    /// closes an idle client.
    async fn idle(&mut self) -> Next {
        if self.stop.is_cancelled() {
            return Next::Close;
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_SIZE);
        }
        let stop = self.stop.clone();
        // A client that has not authenticated within startup_timeout of
        // connecting is closed: strangers cannot hold max_clients.
        let unauthenticated = !self.state.authed;
        let deadline = self.connected + self.listener.listen.startup_timeout;
        tokio::select! {
            () = stop.cancelled() => Next::Close,
            () = tokio::time::sleep_until(deadline), if unauthenticated => Next::Close,
            read = self.rd.read_buf(&mut self.buf) => match read {
                Ok(0) | Err(_) => Next::Close,
                Ok(_) => {
                    self.frame();
                    Next::Go
                }
            },
        }
    }

    /// Sends the first `n` ready commands on the listener's shared lane
    /// when they may go there (see `shared`): the client is on its
    /// upstream's defaults and every command is one that changes nothing
    /// and gets one reply. `None`: they need a hold of their own.
    async fn shared_batch(&mut self, n: usize) -> Option<Next> {
        if self.sticky || n > shared::MAX_COMMANDS || self.ready[n - 1].end > shared::MAX_BYTES {
            return None;
        }
        if self.state.name.is_some()
            || self.state.readonly
            || !self
                .ready
                .iter()
                .take(n)
                .all(|c| c.argc > 0 && shared::shareable(&c.name()))
        {
            return None;
        }
        let listener = self.listener.clone();
        let pool = listener.shared.pools.get(&listener.upstream)?;
        if self.state.db != pool.config().redis.db {
            return None;
        }
        let (done, answered) = tokio::sync::oneshot::channel();
        let job = shared::Job {
            bytes: bytes::Bytes::copy_from_slice(&self.buf[..self.ready[n - 1].end]),
            replies: n,
            done,
        };
        listener.lanes.submit(&listener, job).ok()?;
        listener
            .counts
            .shared_batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.consume(n);
        let revoke = self.revoke.clone();
        let replies = tokio::select! {
            biased;
            () = revoke.cancelled() => return Some(Next::Close),
            replies = answered => replies,
        };
        let Ok(shared::Answer { replies, close }) = replies else {
            // The lane was stopped (the grace is over).
            return Some(Next::Close);
        };
        // Most replies fit the socket at once: no timer for them.
        let written = match self.wr.write(&replies).now_or_never() {
            Some(Ok(n)) => n,
            Some(Err(_)) => return Some(Next::Close),
            None => 0,
        };
        let next = if written == replies.len() {
            Next::Go
        } else {
            self.reply(&replies[written..]).await
        };
        Some(if close { Next::Close } else { next })
    }

    /// Answers the first `n` ready commands with the same error (no
    /// connection could be had for them).
    async fn refuse(&mut self, n: usize, why: &str) -> Next {
        let line = format!("-ERR lessor: {}\r\n", why.replace(['\r', '\n'], " "));
        let mut out = Vec::with_capacity(line.len() * n);
        for _ in 0..n {
            out.extend_from_slice(line.as_bytes());
        }
        self.consume(n);
        self.reply(&out).await
    }

    /// Puts the commands that bring a connection to what follows this
    /// client (its db, name and READONLY) in `to_server`, noted by
    /// `session`; how many replies they get.
    fn prefix(&mut self, session: &mut RedisSession, config: &UpstreamConfig) -> usize {
        let db = self.state.db.to_string();
        let mut commands: Vec<Vec<&[u8]>> = Vec::new();
        if self.state.db != config.redis.db {
            commands.push(vec![b"SELECT", db.as_bytes()]);
        }
        if let Some(name) = &self.state.name {
            commands.push(vec![b"CLIENT", b"SETNAME", name]);
        }
        if self.state.readonly {
            commands.push(vec![b"READONLY"]);
        }
        let mut out = Vec::new();
        for args in &commands {
            encode_command(&mut out, args);
            session.command_sent(&Command {
                end: 0,
                argc: args.len() as u64,
                args: args.iter().map(|a| a.to_vec()).collect(),
            });
        }
        self.to_server.extend_from_slice(&out);
        commands.len()
    }

    /// One hold: checks out, sends the first `n` ready commands (after the
    /// client's own db, name and READONLY), relays until they are all
    /// answered (and, while the session binds the client, whatever else it
    /// sends), and ends it by the lease rules.
    async fn hold(&mut self, n: usize, follow: Option<Follow>) -> Next {
        let listener = self.listener.clone();
        let Some(pool) = listener.shared.pools.get(&listener.upstream) else {
            return self.refuse(n, "the upstream is no longer configured").await;
        };
        let config = pool.config();
        self.holds += 1;
        listener
            .counts
            .held_batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let span = tracing::info_span!(
            target: TARGET,
            "pipeline",
            otel.kind = "server",
            otel.status_code = Empty,
            db.system = "redis",
            lessor.upstream = %listener.upstream,
            lessor.holder = %self.holder,
            lessor.commands = n,
            lessor.connection.id = Empty,
        );
        let revoke = self.revoke.clone();
        let mut guard = match checkout(&pool, &listener.upstream, &revoke, &span).await {
            Ok(guard) => guard,
            Err(NoConnection::Revoked) => return Next::Close,
            Err(NoConnection::Refused(why)) => return self.refuse(n, &why).await,
        };
        let mut session = RedisSession::new(self.max_frame, config.redis.resp);
        let skip = self.prefix(&mut session, config);
        // A blocking command may hold the connection for long: listed
        // from the start.
        let blocking = self.ready.iter().take(n).any(|c| blocks(&c.name()));
        let mut start = 0;
        for c in self.ready.iter().take(n) {
            if session.command_sent(c) {
                self.to_server.extend_from_slice(&self.buf[start..c.end]);
            }
            start = c.end;
        }
        self.consume(n);
        let mut hold = Hold {
            skip,
            side: (skip > 0 || follow.is_some()).then(|| Scanner::new(self.max_frame)),
            follow,
            prefix_failed: false,
            gone: false,
            eof: false,
            blocking,
            quit: false,
            yielding: false,
            local: false,
            live: None,
        };
        if blocking {
            self.list(&guard, &mut hold);
        }
        let (end, next) = self
            .relay(&mut guard, &mut session, &mut hold, config)
            .instrument(span.clone())
            .await;
        self.to_server.clear();
        self.to_client.clear();
        // The end, by the lease rules: what the batch changed is restored
        // (the client's db and name with it), or the connection is closed.
        let mut verdict = session.verdict();
        if hold.prefix_failed {
            verdict = Err("the client's db, name or READONLY could not be applied".into());
        }
        if verdict.is_ok()
            && let Some(restore) = session.restore(&config.redis)
        {
            guard.set_restore(crate::protocol::Restore::Redis(restore));
        }
        if verdict.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        guard.set_verdict(verdict);
        guard.conn_mut().refused_write |= session.take_refused_write();
        drop(hold.live.take());
        let done = guard.finish(end);
        tracing::debug!(upstream = %listener.upstream, fate = ?done.outcome.fate, "redis hold ended");
        next
    }

    /// Relays until the hold ends: how it ended, and what comes next.
    async fn relay(
        &mut self,
        guard: &mut LeaseGuard,
        session: &mut RedisSession,
        hold: &mut Hold,
        config: &UpstreamConfig,
    ) -> (End, Next) {
        let revoke = self.revoke.clone();
        let revoked = revoke.cancelled();
        tokio::pin!(revoked);
        let started = tokio::time::Instant::now();
        let mut last = started;
        // The last time the client read a reply or sent a byte: a hold it
        // stalls (replies it does not read, or commands piled up behind one
        // not answered yet) ends after `lease.idle_timeout`.
        let mut client_moved = started;
        let mut pinned = false;
        loop {
            // Writes are tried at once; only what the socket does not take
            // waits in the select below.
            if !self.to_server.is_empty()
                && let Some(w) = guard
                    .conn_mut()
                    .stream
                    .write(&self.to_server)
                    .now_or_never()
            {
                match w {
                    Ok(n) => self.wrote_server(guard, hold, n),
                    Err(_) => return self.server_failed().await,
                }
            }
            if !self.to_client.is_empty()
                && let Some(w) = self.wr.write(&self.to_client).now_or_never()
            {
                match w {
                    Ok(n) => {
                        self.to_client.advance(n);
                        client_moved = tokio::time::Instant::now();
                    }
                    Err(_) => return (End::Release(Disposition::Return), Next::Close),
                }
            }
            let flushed = self.to_server.is_empty() && self.to_client.is_empty();
            if flushed && session.settled() {
                if hold.quit
                    || hold.gone
                    || (hold.eof && self.ready.is_empty() && !hold.local && !hold.yielding)
                {
                    return (End::Release(Disposition::Return), Next::Close);
                }
                if hold.yielding {
                    // A RESET waits at the front: the hold ends by the
                    // rules, then lessor answers it.
                    return (End::Release(Disposition::Return), Next::Go);
                }
                if hold.local {
                    // AUTH, HELLO or a refusal, in its place: everything
                    // before it is answered, nothing after it was sent.
                    hold.local = false;
                    let name = self.ready[0].name();
                    let reply = if session.resp2_pubsub()
                        && matches!(name.as_str(), "AUTH" | "HELLO")
                    {
                        // As Redis refuses it in RESP2's pub/sub context.
                        self.consume(1);
                        format!(
                            "-ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n",
                            name.to_ascii_lowercase()
                        )
                        .into_bytes()
                    } else {
                        let before = self.state.name.clone();
                        let (reply, _) = self.answer_front();
                        if self.state.name != before && session.answers_in_band() {
                            // `HELLO ... SETNAME`: the name applies on this
                            // connection now, as on Redis.
                            self.apply_name(session, hold);
                        }
                        reply
                    };
                    if session.skipping() {
                        // Redis's SKIP silences this request: an empty one
                        // ends the SKIP on the server too, as this would.
                        let empty = Command {
                            end: 0,
                            argc: 0,
                            args: Vec::new(),
                        };
                        session.command_sent(&empty);
                        self.to_server.extend_from_slice(b"\r\n");
                        continue;
                    }
                    if !session.silenced() {
                        self.to_client.extend_from_slice(&reply);
                    }
                    continue;
                }
                let binds = session.binds();
                if binds.is_none() {
                    if self.stop.is_cancelled() {
                        // Draining: the batch is answered, the client goes.
                        return (End::Release(Disposition::Return), Next::Close);
                    }
                    if !self.sticky {
                        // Nothing ties it here: the connection can serve
                        // another client.
                        return (End::Release(Disposition::Return), Next::Go);
                    }
                }
                if !pinned {
                    pinned = true;
                    let why = binds.unwrap_or("session pool_mode");
                    tracing::debug!(upstream = %self.listener.upstream, holder = %Printable(&self.holder), why, "client pinned to its connection");
                    self.list(guard, hold);
                }
            }
            if pinned && !hold.gone && !hold.yielding && !hold.local {
                // Bound to this connection: whatever the client sends goes
                // on it, through the tracker, up to 256 KiB ahead.
                self.forward_ready(session, hold);
                if hold.yielding || hold.local {
                    // Back to the top: it may be its turn already.
                    continue;
                }
                if self.ready.is_empty()
                    && self.to_server.is_empty()
                    && session.settled()
                    && let Some(e) = self.broken.take()
                {
                    self.say(format!("-ERR {e}\r\n").as_bytes()).await;
                    return (End::Release(Disposition::Return), Next::Close);
                }
            }
            // A transaction left open by a client that went quiet is a
            // lease like any other: its idle and age limits apply.
            let timed = pinned && matches!(session.binds(), Some("MULTI" | "WATCH"));
            let deadline =
                (last + config.lease.idle_timeout).min(started + config.lease.max_duration);
            let read_client = !hold.gone
                && !hold.eof
                && !hold.quit
                && self.broken.is_none()
                && (self.buf.len() < BUFFERED_MAX || self.ready.is_empty());
            let stalled = !hold.gone
                && (self.to_client.len() >= BUFFERED_MAX || (!read_client && !session.settled()));
            if stalled {
                self.list(guard, hold);
            }
            let stall_at = client_moved + config.lease.idle_timeout;
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_SIZE);
            }
            if self.from_server.capacity() - self.from_server.len() < 1024 {
                self.from_server.reserve(READ_SIZE);
            }
            let event = {
                let conn = guard.conn_mut();
                let (mut srd, mut swr) = conn.stream.split();
                tokio::select! {
                    biased;
                    () = &mut revoked => Event::Revoked,
                    () = tokio::time::sleep_until(deadline), if timed => Event::Timeout,
                    () = tokio::time::sleep_until(stall_at), if stalled => Event::Stalled,
                    w = swr.write(&self.to_server), if !self.to_server.is_empty() => Event::ServerWrote(w),
                    w = self.wr.write(&self.to_client), if !self.to_client.is_empty() => Event::ClientWrote(w),
                    r = srd.read_buf(&mut self.from_server), if self.to_client.len() < BUFFERED_MAX => Event::ServerRead(r),
                    r = self.rd.read_buf(&mut self.buf), if read_client => Event::ClientRead(r),
                }
            };
            match event {
                Event::Revoked => return (End::Shutdown, Next::Close),
                Event::Timeout => {
                    let (end, what) =
                        if tokio::time::Instant::now() >= started + config.lease.max_duration {
                            let limit = config.lease.max_duration;
                            (End::Expired, format!("lease.max_duration {limit:?}"))
                        } else {
                            let limit = config.lease.idle_timeout;
                            (End::Idle, format!("lease.idle_timeout {limit:?}"))
                        };
                    let line = format!(
                        "-ERR lessor: connection closed: a transaction stayed open past {what}\r\n"
                    );
                    self.say(line.as_bytes()).await;
                    return (end, Next::Close);
                }
                Event::Stalled => {
                    tracing::info!(upstream = %self.listener.upstream, holder = %Printable(&self.holder), "listener client stalled its connection past lease.idle_timeout; closed");
                    return (End::Idle, Next::Close);
                }
                Event::ClientRead(Ok(0)) if !hold.blocking => {
                    // Half-closed: as Redis does, everything it sent is
                    // run and answered, then it is closed.
                    hold.eof = true;
                }
                Event::ClientRead(Ok(0) | Err(_)) => {
                    // Gone (or half-closed while blocked, which Redis
                    // answers by closing): its replies go nowhere; the
                    // tracker decides whether the connection can go back.
                    hold.gone = true;
                    self.to_client.clear();
                    if !session.settled() || pinned {
                        return (End::Release(Disposition::Return), Next::Close);
                    }
                }
                Event::ClientRead(Ok(_)) => {
                    last = tokio::time::Instant::now();
                    client_moved = last;
                    self.frame();
                }
                Event::ServerRead(Ok(0) | Err(_)) => {
                    self.say(b"-ERR lessor: the server closed the connection\r\n")
                        .await;
                    return (End::UpstreamClosed, Next::Close);
                }
                Event::ServerRead(Ok(n)) => {
                    last = tokio::time::Instant::now();
                    guard.record(Direction::ToClient, n);
                    if let Some(live) = &hold.live {
                        live.moved(false, n);
                    }
                    if let Err(e) = self.replies(session, hold) {
                        tracing::debug!(error = %e, "server sent what lessor cannot relay");
                        // What came whole before it goes out first.
                        let _ =
                            tokio::time::timeout(SAY_TIMEOUT, self.wr.write_all(&self.to_client))
                                .await;
                        let line = match e {
                            RespError::TooLarge { len, max } => format!(
                                "-ERR lessor: a reply of {len} bytes exceeds redis.max_frame ({max} bytes); connection closed\r\n"
                            ),
                            _ => "-ERR lessor: the server broke the protocol\r\n".to_owned(),
                        };
                        self.say(line.as_bytes()).await;
                        return (End::UpstreamError, Next::Close);
                    }
                }
                Event::ServerWrote(Ok(n)) => self.wrote_server(guard, hold, n),
                Event::ServerWrote(Err(_)) => return self.server_failed().await,
                Event::ClientWrote(Ok(n)) => {
                    self.to_client.advance(n);
                    client_moved = tokio::time::Instant::now();
                }
                Event::ClientWrote(Err(_)) => {
                    return (End::Release(Disposition::Return), Next::Close);
                }
            }
        }
    }

    /// Tells the client why it is closed, without waiting on a client that
    /// does not read.
    async fn say(&mut self, line: &[u8]) {
        let _ = tokio::time::timeout(SAY_TIMEOUT, self.wr.write_all(line)).await;
    }

    fn wrote_server(&mut self, guard: &mut LeaseGuard, hold: &Hold, n: usize) {
        guard.record(Direction::ToUpstream, n);
        if let Some(live) = &hold.live {
            live.moved(true, n);
        }
        self.to_server.advance(n);
    }

    async fn server_failed(&mut self) -> (End, Next) {
        let _ = self
            .wr
            .write_all(b"-ERR lessor: the server connection failed\r\n")
            .await;
        (End::UpstreamError, Next::Close)
    }

    /// Lists the hold in `/debug/leases` under the client's name (once it
    /// is pinned, or blocks): a lease like a gRPC one.
    fn list(&mut self, guard: &LeaseGuard, hold: &mut Hold) {
        if hold.live.is_some() {
            return;
        }
        let conn = guard.leased().conn();
        hold.live = Some(self.listener.shared.leases.register(LiveLease::new(
            format!("redis-{:x}-{:x}", self.id, self.holds),
            self.listener.upstream.clone(),
            conn.endpoint_str().to_owned(),
            conn.id(),
            self.holder.clone(),
            String::new(),
            None,
        )));
    }

    /// Redis's bytes just read (in `from_server`): counted by the tracker,
    /// with the replies to the client's own settings taken out, and queued
    /// for the client (unless it has gone).
    fn replies(
        &mut self,
        session: &mut RedisSession,
        hold: &mut Hold,
    ) -> Result<(), crate::protocol::redis::resp::RespError> {
        if session.owes_local() {
            // A reply of lessor's own is due in the stream: the tracker
            // puts it at its place.
            let data = self.from_server.split().freeze();
            let out = session.upstream_sent(data)?;
            self.from_server.extend_from_slice(&out);
        } else if let Err((e, whole)) = session.replies_read_whole(&self.from_server) {
            // The frames before the error are the client's all the same.
            self.from_server.truncate(whole);
            if hold.side.is_none() && !hold.gone {
                self.to_client.extend_from_slice(&self.from_server);
            }
            return Err(e);
        }
        if hold.side.is_some() {
            self.take_prefix_replies(hold);
        }
        if hold.gone {
            self.from_server.clear();
        } else if self.to_client.is_empty() {
            std::mem::swap(&mut self.to_client, &mut self.from_server);
        } else {
            self.to_client.extend_from_slice(&self.from_server);
            self.from_server.clear();
        }
        Ok(())
    }

    /// Pinned: sends the complete commands the client has sent, through
    /// the tracker, while less than 256 KiB waits for the server. A command
    /// lessor answers (`AUTH`, `HELLO`, a refusal) or `RESET` stops the
    /// sending there until everything before it is answered. One that
    /// changes what follows the client keeps it on this connection for
    /// good (lessor cannot tell which of its replies is which here).
    fn forward_ready(&mut self, session: &mut RedisSession, hold: &mut Hold) {
        let mut n = 0;
        let mut start = 0;
        while n < self.ready.len() && self.to_server.len() < BUFFERED_MAX {
            let c = &self.ready[n];
            let name = c.name();
            if name == "RESET" && c.argc == 1 {
                hold.yielding = true;
                break;
            }
            if matches!(name.as_str(), "AUTH" | "HELLO") || self.redirects(n) {
                hold.local = true;
                break;
            }
            match name.as_str() {
                "SELECT" | "READONLY" | "READWRITE" => self.sticky = true,
                "CLIENT" if c.arg(0).as_deref() == Some("SETNAME") => self.sticky = true,
                "QUIT" => hold.quit = true,
                _ if blocks(&name) => hold.blocking = true,
                _ => {}
            }
            let end = c.end;
            if session.command_sent(c) {
                self.to_server.extend_from_slice(&self.buf[start..end]);
            }
            start = end;
            n += 1;
        }
        if n > 0 {
            self.consume(n);
        }
        if let Some(local) = session.take_local() {
            self.to_client.extend_from_slice(&local);
        }
    }

    /// Takes the replies to the client's db, name and READONLY out of what
    /// goes to the client (each must be `+OK`), and reads the reply of a
    /// command whose effect follows the client.
    fn take_prefix_replies(&mut self, hold: &mut Hold) {
        let Some(side) = hold.side.as_mut() else {
            return;
        };
        let mut frames: Vec<Frame> = Vec::new();
        if side.feed(&self.from_server, |f| frames.push(f)).is_err() {
            // The tracker read the same bytes as RESP: not reached.
            hold.prefix_failed = true;
            hold.side = None;
            return;
        }
        let mut cut = 0;
        for f in frames {
            if hold.skip > 0 {
                hold.skip -= 1;
                hold.prefix_failed |= f.kind != b'+';
                cut = f.end;
            } else {
                if let Some(follow) = hold.follow.take()
                    && f.kind == b'+'
                {
                    self.followed(follow);
                }
                break;
            }
        }
        if hold.skip > 0 {
            // All of it belongs to replies lessor takes.
            cut = self.from_server.len();
        }
        self.from_server.advance(cut);
        if hold.skip == 0 && hold.follow.is_none() {
            hold.side = None;
        }
    }

    /// Sends the client's name (just set by a `HELLO` lessor answered) on
    /// the connection it is pinned to; its reply is lessor's to take.
    fn apply_name(&mut self, session: &mut RedisSession, hold: &mut Hold) {
        let name = self.state.name.clone().unwrap_or_default();
        let args: [&[u8]; 3] = [b"CLIENT", b"SETNAME", &name];
        let mut out = Vec::new();
        encode_command(&mut out, &args);
        session.command_sent(&Command {
            end: 0,
            argc: 3,
            args: args.iter().map(|a| a.to_vec()).collect(),
        });
        self.to_server.extend_from_slice(&out);
        hold.skip += 1;
        if hold.side.is_none() {
            hold.side = Some(Scanner::new(self.max_frame));
        }
    }

    /// Redis accepted a command whose effect follows the client.
    fn followed(&mut self, follow: Follow) {
        match follow {
            Follow::Select(Some(db)) => self.state.db = db,
            Follow::SetName(Some(name)) => {
                self.holder = format!("{}@{}", String::from_utf8_lossy(&name), self.peer);
                self.state.name = (!name.is_empty()).then_some(name);
            }
            Follow::ReadOnly(on) => self.state.readonly = on,
            // Accepted in a form lessor cannot repeat: the client keeps
            // this connection from now on.
            Follow::Select(None) | Follow::SetName(None) => self.sticky = true,
        }
    }
}

/// Why lessor answers a command with an error instead of sending it: the
/// ones whose meaning on a pooled connection would reach another client.
fn refused(args: &[Vec<u8>]) -> Option<&'static str> {
    let upper = |a: &Vec<u8>| String::from_utf8_lossy(a).to_ascii_uppercase();
    let name = args.first().map(upper)?;
    let sub = args.get(1).map(upper);
    (name == "CLIENT"
        && sub.as_deref() == Some("TRACKING")
        && args.iter().skip(2).any(|a| upper(a) == "REDIRECT"))
    .then_some(
        "CLIENT TRACKING REDIRECT would name a pooled connection; use RESP3 tracking (redis.resp: 3) without REDIRECT",
    )
}

/// One hold's facts.
struct Hold {
    /// Replies still to take out (the client's db, name, READONLY).
    skip: usize,
    /// A command whose `+OK` changes what follows the client.
    follow: Option<Follow>,
    /// Frames the replies while `skip` or `follow` need them.
    side: Option<Scanner>,
    /// One of the client's own settings was refused on this connection.
    prefix_failed: bool,
    /// The client went away.
    gone: bool,
    /// The client half-closed: nothing more is read from it; what it sent
    /// is answered, then it is closed.
    eof: bool,
    /// A command that may block was sent in this hold.
    blocking: bool,
    /// The client sent `QUIT` (pinned: the tracker answers it).
    quit: bool,
    /// Pinned: a `RESET` waits at the front of the client's commands.
    yielding: bool,
    /// Pinned: a command lessor answers waits at the front.
    local: bool,
    /// Listed in `/debug/leases` once pinned.
    live: Option<crate::lease::registry::Registered>,
}
