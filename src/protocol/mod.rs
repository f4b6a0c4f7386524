//! Protocol-aware upstreams. A `tcp` upstream's leases move bytes lessor
//! does not understand; a protocol upstream's are parsed both ways, so that
//! lessor opens the session itself (credentials stay in the sidecar), knows
//! exactly whether a released connection is clean, and can answer a whole
//! request in one `Exchange` call.
//!
//! The seam: an [`Opener`] runs a new connection's handshake, a [`Session`]
//! tracks one lease's traffic and gives its verdict, and a [`Restore`] puts
//! a used session back the way it was opened before the connection is idle
//! again.
//!
//! This layer sits below the pool: it knows sockets and session records
//! (`postgres::Backend`), never pooled connections. The pool opens
//! connections through an `Opener` and runs a `Restore` in a task of its own
//! (`pool::Leased::restore`).

pub(crate) mod postgres;
pub(crate) mod redis;
pub(crate) mod role;

use crate::net::Stream;
use bytes::Bytes;

use crate::config::{Protocol, UpstreamConfig};
use postgres::Backend;
use postgres::reset::Reset;
use postgres::session::{ClientError, PgSession};
use redis::session::RedisSession;

/// Why a session could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum OpenError {
    /// The password could not be read (the file or variable, not its value).
    #[error("cannot read the password: {0}")]
    Credentials(String),
    /// The server refused the credentials; the text says so and names the
    /// user, never the password.
    #[error("{0}")]
    Auth(String),
    /// Another step was refused (`SELECT` out of range, no such database,
    /// too many connections).
    #[error("{step} refused: {reason}")]
    Refused {
        /// The step, without arguments that could be secret.
        step: &'static str,
        /// The server's error.
        reason: String,
    },
    /// The connection failed or the server answered something else.
    #[error("handshake failed: {0}")]
    Io(String),
}

/// What a new connection needs before it joins the pool: nothing for `tcp`,
/// the session handshake for a protocol upstream.
#[derive(Debug, Clone)]
pub(crate) enum Opener {
    /// Opaque bytes: the connection is ready once connected.
    Tcp,
    /// `AUTH`, `HELLO`, `SELECT`, `CLIENT SETNAME` as configured.
    Redis(crate::config::RedisConfig),
    /// StartupMessage and authentication, up to ReadyForQuery.
    Postgres(crate::config::PostgresConfig),
}

impl Opener {
    /// The opener an upstream's config asks for.
    pub(crate) fn for_upstream(config: &UpstreamConfig) -> Self {
        match config.protocol {
            Protocol::Tcp => Self::Tcp,
            Protocol::Redis => Self::Redis(config.redis.clone()),
            Protocol::Postgres => Self::Postgres(config.postgres.clone()),
        }
    }

    /// Opens the session on a connected socket (inside the dial's timeout);
    /// a PostgreSQL session reports its backend. `confirm`: the TLS server
    /// asked for a client certificate lessor does not have, and TLS 1.3
    /// tells the verdict only on the first read, so the session must make
    /// a round trip before the connection counts as dialed.
    pub(crate) async fn open(
        &self,
        stream: &mut Stream,
        confirm: bool,
    ) -> Result<Option<Backend>, OpenError> {
        match self {
            Self::Tcp => Ok(None),
            Self::Redis(cfg) => redis::handshake::open(stream, cfg, confirm)
                .await
                .map(|()| None),
            // The startup exchange always reads.
            Self::Postgres(cfg) => postgres::handshake::open(stream, cfg).await.map(Some),
        }
    }
}

/// Why a lease's client bytes were not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SessionError {
    /// The client tried to do the sidecar's part (open or authenticate the
    /// session); nothing of it was forwarded.
    #[error("{0}")]
    Refused(String),
    /// The bytes are not the upstream's protocol.
    #[error("{0}")]
    NotProtocol(String),
}

/// The tracker of one lease on a protocol upstream. One per lease, built
/// once and never moved while it works: the variants' sizes may differ.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Session {
    /// RESP commands and replies.
    Redis(RedisSession),
    /// PostgreSQL messages both ways.
    Postgres(PgSession),
}

impl Session {
    /// A tracker for a lease on `config`'s upstream; `None` for `tcp`.
    pub(crate) fn for_upstream(config: &UpstreamConfig) -> Option<Self> {
        match config.protocol {
            Protocol::Tcp => None,
            Protocol::Redis => Some(Self::Redis(RedisSession::new(
                config.redis.max_frame.as_u64(),
                config.redis.resp,
            ))),
            Protocol::Postgres => Some(Self::Postgres(PgSession::new(&config.postgres))),
        }
    }

    /// Takes client bytes; returns what goes to the upstream.
    pub(crate) fn client_sent(&mut self, data: &Bytes) -> Result<Bytes, SessionError> {
        match self {
            Self::Redis(s) => s
                .client_sent(data)
                .map_err(|e| SessionError::NotProtocol(e.to_string())),
            Self::Postgres(s) => s.client_sent(data).map_err(|e| match e {
                ClientError::Refused(_) => SessionError::Refused(e.to_string()),
                ClientError::NotProtocol(_) => SessionError::NotProtocol(e.to_string()),
            }),
        }
    }

    /// Takes upstream bytes; returns what goes to the client.
    pub(crate) fn upstream_sent(&mut self, data: Bytes) -> Result<Bytes, String> {
        match self {
            Self::Redis(s) => s.upstream_sent(data).map_err(|e| e.to_string()),
            Self::Postgres(s) => s
                .upstream_sent(&data)
                .map(|()| data)
                .map_err(|e| e.to_string()),
        }
    }

    /// Replies lessor gives itself, due now (Redis `QUIT`, `AUTH`).
    pub(crate) fn take_local(&mut self) -> Option<Bytes> {
        match self {
            Self::Redis(s) => s.take_local(),
            Self::Postgres(_) => None,
        }
    }

    /// The client said goodbye (`QUIT`, answered; Terminate): the lease ends
    /// as a RETURN.
    pub(crate) fn said_goodbye(&self) -> bool {
        match self {
            Self::Redis(s) => s.quit_done(),
            Self::Postgres(s) => s.terminated(),
        }
    }

    /// Whether the connection may go back as it is, with nothing to restore.
    pub(crate) fn is_clean(&self) -> bool {
        match self {
            Self::Redis(s) => s.is_clean(),
            Self::Postgres(s) => s.is_clean(),
        }
    }

    /// Whether reading the replies still due would make it returnable.
    pub(crate) fn drainable(&self) -> bool {
        match self {
            Self::Redis(s) => s.drainable(),
            Self::Postgres(s) => s.drainable(),
        }
    }

    /// The verdict at the lease's end (`Err`: evict, and why), and what
    /// restores a returnable session before it is idle.
    pub(crate) fn conclude(
        &self,
        config: &UpstreamConfig,
    ) -> (Result<(), String>, Option<Restore>) {
        let (verdict, restore) = match self {
            Self::Redis(s) => {
                let verdict = s.verdict();
                let restore = verdict.is_ok().then(|| s.restore(&config.redis)).flatten();
                (verdict, restore.map(Restore::Redis))
            }
            Self::Postgres(s) => {
                let verdict = s.verdict(config.postgres.on_open_transaction);
                let restore = verdict
                    .is_ok()
                    .then(|| s.restore(&config.postgres))
                    .flatten();
                (verdict, restore.map(Restore::Postgres))
            }
        };
        (verdict, restore)
    }

    /// Between transactions with nothing outstanding (PostgreSQL; for
    /// Redis, every reply delivered and nothing changed).
    pub(crate) fn at_rest(&self) -> bool {
        match self {
            Self::Postgres(s) => s.at_rest(),
            Self::Redis(s) => s.is_clean(),
        }
    }

    /// Whether the server has answered everything sent (PostgreSQL; a
    /// transaction may still be open).
    pub(crate) fn answered(&self) -> bool {
        match self {
            Self::Postgres(s) => s.settled(),
            Self::Redis(s) => s.is_clean(),
        }
    }

    /// The ParameterStatus reports seen since the last take (PostgreSQL),
    /// for a listener that carries them to its client too.
    pub(crate) fn take_reported(&mut self) -> Vec<(String, String)> {
        match self {
            Self::Postgres(s) => s.take_reported(),
            Self::Redis(_) => Vec::new(),
        }
    }

    /// Whether the server refused a write as read-only since the last take
    /// (SQLSTATE 25006, `-READONLY`): the pool then checks its role.
    pub(crate) fn take_refused_write(&mut self) -> bool {
        match self {
            Self::Postgres(s) => s.take_refused_write(),
            Self::Redis(s) => s.take_refused_write(),
        }
    }

    /// Records on the connection what the lease leaves behind: the
    /// ParameterStatus reports it saw, and whether a query may still be
    /// running (an eviction then cancels it).
    pub(crate) fn record(&mut self, backend: Option<&mut Backend>) {
        if let (Self::Postgres(s), Some(backend)) = (self, backend) {
            backend.busy = s.busy();
            backend.parameters.extend(s.take_reported());
        }
    }
}

/// What puts a returnable session back the way it was opened.
#[derive(Debug, Clone)]
pub(crate) enum Restore {
    /// Redis commands undoing `SELECT`, `MULTI`, `WATCH`...
    Redis(redis::session::Restore),
    /// `ROLLBACK` and/or the configured reset.
    Postgres(Reset),
}

impl Restore {
    /// Whether it rolls back an open transaction (counted in
    /// `lessor_rollbacks_total` by whoever runs it).
    pub(crate) fn rolls_back(&self) -> bool {
        matches!(self, Self::Postgres(reset) if reset.rollback)
    }

    /// Runs on a connection's socket; whether the session is back as it
    /// was opened. A PostgreSQL reset's ParameterStatus reports go into
    /// `backend` whatever the outcome: the record is what the server last
    /// said. Who owns the connection (the pool) decides what follows.
    pub(crate) async fn apply(
        &self,
        stream: &mut Stream,
        mut backend: Option<&mut Backend>,
    ) -> bool {
        match self {
            Self::Redis(r) => r.apply(stream).await,
            Self::Postgres(reset) => {
                let settled = reset.apply(stream).await;
                if let Some(backend) = backend.as_deref_mut() {
                    // A reset (`DISCARD ALL`) drops prepared statements.
                    backend.prepared.clear();
                }
                note_reported(backend, settled.reported);
                match settled.outcome {
                    Ok(()) => true,
                    Err(why) => {
                        tracing::debug!(%why, "session reset failed; connection closed");
                        false
                    }
                }
            }
        }
    }
}

/// Applies ParameterStatus reports to a connection's record of its session,
/// so the next `Granted.server_parameters` is current.
pub(crate) fn note_reported(backend: Option<&mut Backend>, reported: Vec<(String, String)>) {
    if let Some(backend) = backend {
        backend.parameters.extend(reported);
    }
}
