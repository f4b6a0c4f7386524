//! One client of the PostgreSQL listener: startup, then turns of idle (no
//! server connection) and holding (a lease of the pool, relayed both ways
//! through the upstream's session tracker), until it leaves.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tracing::Instrument;
use tracing::field::Empty;

use super::inspect::{binds_session, drops_statements, next_message, statement_text};
use super::messages::{self, Severity};
use super::prepared::{Prepared, RewriteError};
use super::startup::{self, Hello};
use super::{Listener, Slot};
use crate::config::{ClientAuth, PoolMode, UpstreamConfig};
use crate::lease::guard::LeaseGuard;
use crate::lease::registry::{CancelTarget, LiveLease};
use crate::lease::state::{Direction, End};
use crate::listener::{NoConnection, checkout};
use crate::protocol::{Session, SessionError, note_reported};
use crate::telemetry::TARGET;
use lessor_client::pb::Disposition;

/// Bytes buffered one way before lessor stops reading the other side.
const BUFFERED_MAX: usize = 256 * 1024;
/// The first read buffer of a direction.
const READ_SIZE: usize = 16 * 1024;

type Reader<S> = ReadHalf<S>;
type Writer<S> = WriteHalf<S>;

/// How a client's turn ended.
enum Next {
    /// Back to idle: the hold ended at a transaction's end.
    Idle,
    /// The client is gone or was told to go.
    Close,
}

/// A connected client after its startup.
struct Client<S> {
    listener: Arc<Listener>,
    rd: Reader<S>,
    wr: Writer<S>,
    /// Client bytes read, not yet forwarded: at most a partial message.
    buf: BytesMut,
    /// What the client was told of each reported parameter, kept current
    /// from the ParameterStatus its holds saw.
    params: BTreeMap<String, String>,
    /// The client's name in `/debug/leases`: application_name@address.
    holder: String,
    slot: Arc<Slot>,
    /// It uses what binds it to one server session: holds never end early.
    pinned: bool,
    /// Transaction mode: named prepared statements follow the client.
    rename: bool,
    /// Its prepared statements, under lessor's names on the server.
    prepared: Prepared,
    holds: u64,
    id: u64,
    max_frame: usize,
}

/// Serves one connection from its first byte to its close.
pub(super) async fn run<S>(listener: Arc<Listener>, mut stream: S, peer: String, id: u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = listener.listen.startup_timeout;
    let hello = match tokio::time::timeout(timeout, startup::hello(&mut stream)).await {
        Err(_) => {
            startup::fatal(&mut stream, "08P01", "lessor: startup timed out").await;
            return;
        }
        Ok(Err(startup::StartupError::Protocol(why))) => {
            startup::fatal(&mut stream, "08P01", &format!("lessor: {why}")).await;
            return;
        }
        Ok(Err(startup::StartupError::Io(_))) => return,
        Ok(Ok(hello)) => hello,
    };
    let params = match hello {
        Hello::Cancel { pid, secret } => {
            super::cancel(&listener, pid, secret).await;
            return;
        }
        Hello::Startup(params) => params,
    };
    let Ok(_permit) = listener.clients.clone().try_acquire_owned() else {
        startup::fatal(&mut stream, "53300", "sorry, too many clients already").await;
        return;
    };
    if listener.shared.stop_accepting.is_cancelled() {
        startup::fatal(&mut stream, "57P03", "lessor is shutting down").await;
        return;
    }
    let cfg = &listener.config.postgres;
    let user = params.get("user").cloned().unwrap_or_default();
    if user != cfg.user {
        startup::fatal(
            &mut stream,
            "28000",
            &format!(
                "lessor: this listener serves user \"{}\", not \"{}\"",
                cfg.user,
                user.escape_debug()
            ),
        )
        .await;
        return;
    }
    let database = params
        .get("database")
        .cloned()
        .unwrap_or_else(|| user.clone());
    if database != cfg.database() {
        startup::fatal(
            &mut stream,
            "3D000",
            &format!(
                "lessor: this listener serves database \"{}\", not \"{}\"",
                cfg.database(),
                database.escape_debug()
            ),
        )
        .await;
        return;
    }
    if listener.listen.auth == ClientAuth::ScramSha256 {
        match tokio::time::timeout(timeout, authenticate(&listener, &mut stream)).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                startup::fatal(&mut stream, "28P01", &why).await;
                return;
            }
            Err(_) => {
                startup::fatal(&mut stream, "08P01", "lessor: authentication timed out").await;
                return;
            }
        }
    }
    let Some(server) = server_parameters(&listener).await else {
        startup::fatal(
            &mut stream,
            "08006",
            &format!(
                "lessor: no server connection for upstream `{}`",
                listener.upstream
            ),
        )
        .await;
        return;
    };
    // What the client is told: the server's values, with its own startup
    // values of the parameters that follow a client.
    let mut told = server;
    for (name, value) in &params {
        let name = startup::canonical(name);
        if startup::settable(&name) {
            told.insert(name, value.clone());
        }
    }
    let (pid, secret, slot) = listener.keys.issue();
    let mut out = BytesMut::new();
    messages::auth_ok(&mut out);
    for (name, value) in &told {
        messages::parameter_status(&mut out, name, value);
    }
    messages::backend_key(&mut out, pid, secret);
    messages::ready(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        listener.keys.remove(pid, secret);
        return;
    }
    let app = told.get("application_name").cloned().unwrap_or_default();
    let (rd, wr) = tokio::io::split(stream);
    let max_frame = usize::try_from(cfg.max_frame.as_u64()).unwrap_or(usize::MAX);
    let mut client = Client {
        listener: listener.clone(),
        rd,
        wr,
        buf: BytesMut::with_capacity(READ_SIZE),
        params: told,
        holder: format!("{app}@{peer}"),
        slot,
        pinned: listener.listen.pool_mode == PoolMode::Session,
        rename: listener.listen.pool_mode == PoolMode::Transaction,
        prepared: Prepared::default(),
        holds: 0,
        id,
        max_frame,
    };
    loop {
        match client.idle().await {
            Next::Close => break,
            Next::Idle => {}
        }
        match client.hold().await {
            Next::Close => break,
            Next::Idle => {}
        }
    }
    listener.keys.remove(pid, secret);
    let _ = client.wr.shutdown().await;
}

/// SCRAM-SHA-256 against the listener's password; the error is what the
/// client is told (never the password).
async fn authenticate<S>(listener: &Listener, stream: &mut S) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use crate::protocol::postgres::scram_server as scram;
    let failed = || {
        format!(
            "password authentication failed for user \"{}\"",
            listener.config.postgres.user
        )
    };
    let password = listener.password.as_deref().unwrap_or_default();
    let mut exchange = scram::ScramServer::new(password).map_err(|_| failed())?;
    let mut out = BytesMut::new();
    scram::authentication_sasl(&mut out);
    stream.write_all(&out).await.map_err(|_| failed())?;
    let first = read_password_message(stream).await?;
    let first = scram::parse_sasl_initial_response(&first).map_err(|e| format!("lessor: {e}"))?;
    let server_first = exchange.client_first(first).map_err(|_| failed())?;
    out.clear();
    scram::authentication_sasl_continue(&server_first, &mut out);
    stream.write_all(&out).await.map_err(|_| failed())?;
    let last = read_password_message(stream).await?;
    let last = scram::parse_sasl_response(&last).map_err(|e| format!("lessor: {e}"))?;
    // The key derivation is thousands of HMAC rounds: off the runtime.
    let last = last.to_vec();
    let (exchange, server_final) = tokio::task::spawn_blocking(move || {
        let result = exchange.client_final(&last);
        (exchange, result)
    })
    .await
    .map_err(|_| failed())?;
    drop(exchange);
    let server_final = server_final.map_err(|_| failed())?;
    out.clear();
    scram::authentication_sasl_final(&server_final, &mut out);
    stream.write_all(&out).await.map_err(|_| failed())?;
    Ok(())
}

/// The longest SASL message body accepted.
fn scram_max() -> i32 {
    crate::protocol::postgres::scram_server::MAX_SASL_MESSAGE as i32
}

/// A `p` message's body (SASL messages are small).
async fn read_password_message<S>(stream: &mut S) -> Result<Vec<u8>, String>
where
    S: AsyncRead + Unpin,
{
    let io = |e: io::Error| format!("lessor: {e}");
    let tag = stream.read_u8().await.map_err(io)?;
    let len = stream.read_i32().await.map_err(io)?;
    if tag != b'p' || !(4..=4 + scram_max()).contains(&len) {
        return Err("lessor: expected a SASL response".into());
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await.map_err(io)?;
    Ok(body)
}

/// The server parameters a new client is told: those a server connection
/// last reported, or a checkout's when none is known yet.
async fn server_parameters(listener: &Listener) -> Option<BTreeMap<String, String>> {
    if let Some(known) = listener
        .parameters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        return Some(known);
    }
    let pool = listener.shared.pools.get(&listener.upstream)?;
    let leased = pool
        .checkout(listener.config.pool.checkout_timeout)
        .await
        .ok()?;
    let known = leased.conn().backend.as_ref()?.initial.clone();
    leased.give_back();
    *listener
        .parameters
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(known.clone());
    Some(known)
}

/// What a relay turn saw.
enum Event {
    Revoked,
    Idle,
    ClientRead(io::Result<usize>),
    ServerRead(io::Result<usize>),
    ServerWrote(io::Result<usize>),
    ClientWrote(io::Result<usize>),
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// No server connection: waits for the client's next message. A drain
    /// tells an idle client to go.
    async fn idle(&mut self) -> Next {
        loop {
            match next_message(&self.buf, self.max_frame) {
                Err(why) => return self.violation(&why).await,
                Ok(Some(_)) if self.buf[0] == b'X' => return Next::Close,
                Ok(Some(_)) => return Next::Idle,
                Ok(None) => {}
            }
            let shared = &self.listener.shared;
            tokio::select! {
                () = shared.stop_accepting.cancelled() => {
                    self.fatal("57P01", "terminating connection due to administrator command (lessor is shutting down)").await;
                    return Next::Close;
                }
                read = self.rd.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => {}
                },
            }
        }
    }

    /// A protocol violation: FATAL 08P01, and the connection ends.
    async fn violation(&mut self, why: &str) -> Next {
        self.fatal("08P01", &format!("lessor: {why}")).await;
        Next::Close
    }

    async fn fatal(&mut self, code: &str, text: &str) {
        let mut out = BytesMut::new();
        messages::error(&mut out, Severity::Fatal, code, text);
        let _ = self.wr.write_all(&out).await;
        let _ = self.wr.flush().await;
    }

    /// No connection could be had for the client's request: an ERROR that
    /// names lessor, the upstream and the wait, and the request is
    /// answered (up to its Sync) as failed.
    async fn refuse_request(&mut self, why: &str) -> Next {
        let mut out = BytesMut::new();
        messages::error(&mut out, Severity::Error, "08P01", why);
        if self.wr.write_all(&out).await.is_err() {
            return Next::Close;
        }
        // Skip to the end of the request: a simple Query, or the Sync of
        // an extended batch (PostgreSQL skips to Sync after an error too).
        loop {
            match next_message(&self.buf, self.max_frame) {
                Err(why) => return self.violation(&why).await,
                Ok(Some(n)) => {
                    let tag = self.buf[0];
                    self.buf.advance(n);
                    match tag {
                        b'Q' | b'S' => {
                            out.clear();
                            messages::ready(&mut out, b'I');
                            return match self.wr.write_all(&out).await {
                                Ok(()) => Next::Idle,
                                Err(_) => Next::Close,
                            };
                        }
                        b'X' => return Next::Close,
                        _ => {}
                    }
                }
                Ok(None) => match self.rd.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => {}
                },
            }
        }
    }

    /// One hold: checks out, brings the server's session to the client's
    /// parameters, relays until the hold ends, and ends it by the lease
    /// rules.
    async fn hold(&mut self) -> Next {
        let listener = self.listener.clone();
        let shared = &listener.shared;
        let Some(pool) = shared.pools.get(&listener.upstream) else {
            self.fatal("08006", "lessor: the upstream is no longer configured")
                .await;
            return Next::Close;
        };
        let config = pool.config().clone();
        self.holds += 1;
        let span = tracing::info_span!(
            target: TARGET,
            "transaction",
            otel.kind = "server",
            otel.status_code = Empty,
            db.system = "postgresql",
            lessor.upstream = %listener.upstream,
            lessor.holder = %self.holder,
            lessor.connection.id = Empty,
        );
        // A sqlcommenter `traceparent` in the transaction's first
        // statement joins its span to the caller's trace.
        let mut trace_id = String::new();
        if let Ok(Some(n)) = next_message(&self.buf, self.max_frame)
            && matches!(self.buf[0], b'Q' | b'P')
            && let Some(tp) = crate::telemetry::propagation::sqlcommenter_traceparent(
                statement_text(&self.buf[..n]),
            )
        {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let (parent, id) = crate::telemetry::propagation::from_traceparent(&tp);
            let _ = span.set_parent(parent);
            trace_id = id;
        }
        let mut guard = match checkout(&pool, &listener.upstream, &shared.revoke, &span).await {
            Ok(guard) => guard,
            Err(NoConnection::Revoked) => {
                self.fatal(
                    "57P01",
                    "terminating connection due to administrator command (lessor is shutting down)",
                )
                .await;
                return Next::Close;
            }
            Err(NoConnection::Refused(why)) => {
                return self.refuse_request(&format!("lessor: {why}")).await;
            }
        };
        let leased = guard.leased();
        let conn = leased.conn();
        let target = conn.backend.as_ref().and_then(|b| {
            b.secret_i32().map(|secret| CancelTarget {
                endpoint: conn.endpoint(),
                pid: b.pid,
                secret,
                tls: leased.pool().dialer_tls(),
            })
        });
        let lease_id = format!("pg-{:x}-{:x}", self.id, self.holds);
        let live = shared.leases.register(LiveLease::new(
            lease_id,
            listener.upstream.clone(),
            conn.endpoint_str().to_owned(),
            conn.id(),
            self.holder.clone(),
            trace_id,
            target.clone(),
        ));
        self.slot.set(target).await;
        let mut session = Session::for_upstream(&config);
        self.prepared.begin_hold();
        let (end, next) = match self.sync_parameters(&mut guard).await {
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                // The server refused one of the client's own startup values
                // (the connection is as it was: the SETs were one implicit
                // transaction): the client goes, as a server would have
                // refused its startup.
                self.fatal("22023", &format!("lessor: {e}")).await;
                (End::Release(Disposition::Return), Next::Close)
            }
            Err(e) => {
                tracing::debug!(upstream = %listener.upstream, error = %e, "could not set the client's parameters");
                let _ = self
                    .refuse_request("lessor: the server connection failed")
                    .await;
                (End::UpstreamError, Next::Idle)
            }
            Ok(()) => {
                self.relay(&mut guard, session.as_mut(), &live, &config)
                    .instrument(span.clone())
                    .await
            }
        };
        self.slot.set(None).await;
        // The end, by the lease rules: a transaction left open is rolled
        // back (or evicted); in transaction mode no reset runs between
        // transactions, in session mode the configured one does.
        let mut rules = config.clone();
        if listener.listen.pool_mode == PoolMode::Transaction && matches!(next, Next::Idle) {
            rules.postgres.reset = String::new();
        }
        if let Some(session) = session.as_mut() {
            let (verdict, restore) = session.conclude(&rules);
            let reported = session.take_reported();
            for (name, value) in &reported {
                if startup::settable(name) {
                    self.params.insert(name.clone(), value.clone());
                }
            }
            let backend = guard.conn_mut().backend.as_deref_mut();
            note_reported(backend, reported);
            session.record(guard.conn_mut().backend.as_deref_mut());
            guard.conn_mut().refused_write |= session.take_refused_write();
            if let Some(restore) = restore {
                guard.set_restore(restore);
            }
            if verdict.is_err() {
                span.record("otel.status_code", "ERROR");
            }
            guard.set_verdict(verdict);
        }
        drop(live);
        let done = guard.finish(end);
        tracing::debug!(upstream = %listener.upstream, fate = ?done.outcome.fate, "hold ended");
        next
    }

    /// Brings the server connection's reported parameters to what this
    /// client was told (a `SET` per difference, answered before the client's
    /// own request goes out).
    async fn sync_parameters(&mut self, guard: &mut LeaseGuard) -> io::Result<()> {
        let conn = guard.conn_mut();
        let Some(backend) = conn.backend.as_mut() else {
            return Ok(());
        };
        let mut sql = String::new();
        for (name, value) in &self.params {
            if startup::settable(name) && backend.parameters.get(name) != Some(value) {
                sql.push_str(&format!(
                    "SET \"{}\" TO '{}';",
                    name.replace('"', "\"\""),
                    value.replace('\'', "''")
                ));
            }
        }
        if sql.is_empty() {
            return Ok(());
        }
        let mut message = BytesMut::new();
        postgres_protocol::message::frontend::query(&sql, &mut message)?;
        conn.stream.write_all(&message).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let mut failed: Option<String> = None;
        loop {
            while let Some(message) = crate::protocol::postgres::frame::parse(&mut buf) {
                use postgres_protocol::message::backend::Message;
                match message {
                    Message::ParameterStatus(p) => {
                        if let (Ok(name), Ok(value)) = (p.name(), p.value()) {
                            backend.parameters.insert(name.to_owned(), value.to_owned());
                        }
                    }
                    Message::ErrorResponse(body) => {
                        let error =
                            crate::protocol::postgres::handshake::ServerError::from_body(&body);
                        failed.get_or_insert(error.to_string());
                    }
                    Message::ReadyForQuery(r) => {
                        return match (failed, r.status()) {
                            (Some(why), b'I') => {
                                Err(io::Error::new(io::ErrorKind::InvalidInput, why))
                            }
                            (None, b'I') => Ok(()),
                            _ => Err(io::Error::other(
                                "SET of a client parameter left a transaction",
                            )),
                        };
                    }
                    _ => {}
                }
            }
            if conn.stream.read_buf(&mut buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Relays both ways until the hold ends; how it ended, and what comes
    /// next for the client.
    async fn relay(
        &mut self,
        guard: &mut LeaseGuard,
        mut session: Option<&mut Session>,
        live: &crate::lease::registry::Registered,
        config: &UpstreamConfig,
    ) -> (End, Next) {
        let transaction_mode = self.listener.listen.pool_mode == PoolMode::Transaction;
        let idle_timeout = config.lease.idle_timeout;
        let revoke = self.listener.shared.revoke.clone();
        let stop = self.listener.shared.stop_accepting.clone();
        let mut to_server = BytesMut::new();
        let mut to_client = BytesMut::new();
        let mut sbuf = BytesMut::with_capacity(READ_SIZE);
        let mut goodbye = false;
        let mut last = tokio::time::Instant::now();
        loop {
            // The hold ends at a transaction's end with nothing of the
            // client's outstanding (or, once the client said goodbye, as
            // soon as what it sent is written).
            let clean = session.as_ref().is_none_or(|s| s.at_rest());
            let flushed = to_server.is_empty() && to_client.is_empty();
            let answered = session.as_ref().is_none_or(|s| s.answered());
            if goodbye && to_server.is_empty() && answered {
                // What it sent before Terminate ran to its end, as on a
                // server; the replies go nowhere.
                return (End::Release(Disposition::Return), Next::Close);
            }
            if goodbye {
                to_client.clear();
            }
            // A partial next message may wait in `buf`: none of it reached
            // the server, so the hold still ends (a client cannot keep a
            // connection by sending half a message).
            let complete = matches!(next_message(&self.buf, self.max_frame), Ok(Some(_)));
            if flushed && clean && !complete {
                if stop.is_cancelled() {
                    // Draining: the transaction is over, the client goes.
                    self.fatal("57P01", "terminating connection due to administrator command (lessor is shutting down)").await;
                    return (End::Release(Disposition::Return), Next::Close);
                }
                if transaction_mode && !self.pinned {
                    return (End::Release(Disposition::Return), Next::Idle);
                }
            }
            // Whatever the client already sent is forwarded first.
            let held = guard
                .conn_mut()
                .backend
                .as_deref_mut()
                .map(|b| &mut b.prepared);
            match self.take_messages(held) {
                Err(why) => {
                    let _ = self.violation(&why).await;
                    return (End::Violation, Next::Close);
                }
                Ok(Some((out, bye))) => {
                    goodbye |= bye;
                    if !out.is_empty() {
                        let forward = match session.as_deref_mut() {
                            None => out,
                            Some(s) => match s.client_sent(&out) {
                                Ok(forward) => forward,
                                Err(SessionError::Refused(e) | SessionError::NotProtocol(e)) => {
                                    let _ = self.violation(&e).await;
                                    return (End::Violation, Next::Close);
                                }
                            },
                        };
                        to_server.extend_from_slice(&forward);
                    }
                    continue;
                }
                Ok(None) => {}
            }
            let in_transaction = !clean;
            let idle_at = last + idle_timeout;
            let event = {
                let conn = guard.conn_mut();
                let (mut srd, mut swr) = conn.stream.split();
                let read_client = !goodbye && to_server.len() < BUFFERED_MAX;
                let read_server = to_client.len() < BUFFERED_MAX;
                tokio::select! {
                    biased;
                    () = revoke.cancelled() => Event::Revoked,
                    () = tokio::time::sleep_until(idle_at), if in_transaction => Event::Idle,
                    w = swr.write(&to_server), if !to_server.is_empty() => Event::ServerWrote(w),
                    w = self.wr.write(&to_client), if !to_client.is_empty() => Event::ClientWrote(w),
                    r = srd.read_buf(&mut sbuf), if read_server => Event::ServerRead(r),
                    r = self.rd.read_buf(&mut self.buf), if read_client => Event::ClientRead(r),
                }
            };
            match event {
                Event::Revoked => {
                    self.fatal("57P01", "terminating connection due to administrator command (lessor is shutting down)").await;
                    return (End::Shutdown, Next::Close);
                }
                Event::Idle => {
                    self.fatal(
                        "25P03",
                        &format!(
                            "terminating connection due to idle-in-transaction timeout (lessor lease.idle_timeout {idle_timeout:?})"
                        ),
                    )
                    .await;
                    return (End::Idle, Next::Close);
                }
                Event::ClientRead(Ok(0) | Err(_)) => {
                    // Gone: what it left open is rolled back by the rules.
                    return (End::Release(Disposition::Return), Next::Close);
                }
                Event::ClientRead(Ok(_)) => last = tokio::time::Instant::now(),
                Event::ServerRead(Ok(0)) | Event::ServerRead(Err(_)) => {
                    self.fatal("08006", "lessor: the server closed the connection")
                        .await;
                    return (End::UpstreamClosed, Next::Close);
                }
                Event::ServerRead(Ok(n)) => {
                    last = tokio::time::Instant::now();
                    let data = sbuf.split().freeze();
                    if sbuf.capacity() < READ_SIZE / 4 {
                        sbuf.reserve(READ_SIZE);
                    }
                    if let Some(s) = session.as_deref_mut()
                        && let Err(e) = s.upstream_sent(data.clone())
                    {
                        tracing::debug!(error = %e, "server sent what is not the protocol");
                        self.fatal("08P01", "lessor: the server broke the protocol")
                            .await;
                        return (End::UpstreamError, Next::Close);
                    }
                    guard.record(Direction::ToClient, n);
                    live.moved(false, n);
                    if self.rename {
                        let mut none = std::collections::HashSet::new();
                        let held = match guard.conn_mut().backend.as_deref_mut() {
                            Some(b) => &mut b.prepared,
                            None => &mut none,
                        };
                        match self.prepared.filter(&data, held, &mut to_client) {
                            // A notification means LISTEN: the client keeps
                            // this session. (In session mode it keeps it
                            // anyway, and its stream is not filtered.)
                            Ok(notified) => self.pinned |= notified,
                            Err(e) => {
                                tracing::debug!(error = %e, "prepared statements out of step");
                                self.fatal("08P01", &format!("lessor: {e}")).await;
                                return (End::UpstreamError, Next::Close);
                            }
                        }
                    } else {
                        to_client.extend_from_slice(&data);
                    }
                }
                Event::ServerWrote(Ok(n)) => {
                    guard.record(Direction::ToUpstream, n);
                    live.moved(true, n);
                    to_server.advance(n);
                }
                Event::ClientWrote(Ok(n)) => to_client.advance(n),
                Event::ServerWrote(Err(_)) => {
                    self.fatal("08006", "lessor: the server connection failed")
                        .await;
                    return (End::UpstreamError, Next::Close);
                }
                Event::ClientWrote(Err(_)) => {
                    return (End::Release(Disposition::Return), Next::Close);
                }
            }
        }
    }

    /// Takes the complete messages at the front of the client's buffer:
    /// their bytes (without a Terminate, which is the client's goodbye and
    /// never forwarded) and whether it said goodbye. `None` when there is
    /// no complete message.
    fn take_messages(
        &mut self,
        held: Option<&mut std::collections::HashSet<String>>,
    ) -> Result<Option<(Bytes, bool)>, String> {
        let mut none = std::collections::HashSet::new();
        let held = held.unwrap_or(&mut none);
        let mut end = 0;
        let mut goodbye = false;
        let mut out = BytesMut::new();
        loop {
            match next_message(&self.buf[end..], self.max_frame)? {
                None => break,
                Some(n) => {
                    let message = &self.buf[end..end + n];
                    if message[0] == b'X' {
                        goodbye = true;
                        break;
                    }
                    if binds_session(message) {
                        self.pinned = true;
                    }
                    if matches!(message[0], b'Q' | b'P') && drops_statements(message) {
                        // What the server holds is no longer known.
                        held.clear();
                    }
                    if self.rename {
                        match self
                            .prepared
                            .rewrite(&self.listener.names, held, message, &mut out)
                        {
                            Ok(()) => {}
                            Err(RewriteError::TooMany) => {
                                // Past the bound: this client keeps its
                                // connection, and its names go as they are.
                                self.pinned = true;
                            }
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                    end += n;
                }
            }
        }
        if end == 0 && !goodbye {
            return Ok(None);
        }
        let taken = self.buf.split_to(end).freeze();
        if goodbye {
            // The Terminate and anything after it are dropped.
            self.buf.clear();
        }
        let out = if self.rename { out.freeze() } else { taken };
        Ok(Some((out, goodbye)))
    }
}
