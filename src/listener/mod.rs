//! Native listeners: the door for unmodified clients. An upstream with a
//! `listen:` block gets a local port (and/or Unix socket) that speaks its
//! protocol to the client, so `psql`, `pgbench`, `redis-cli` and every
//! driver connect as to the server itself. Each time a client holds a
//! server connection is a lease of the upstream's pool, through the same
//! checkout, guard, session tracker, restore rules, metrics and
//! `/debug/leases` as a gRPC lease.
//!
//! - `postgres`: transaction or session pooling for PostgreSQL clients;
//! - `redis`: pooling per pipeline for Redis clients, with the sessions
//!   that need one connection kept whole.

pub(crate) mod postgres;
pub(crate) mod redis;
pub(crate) mod stats;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ClientAuth, NativeListen, OnAbort, Protocol, UpstreamConfig};
use crate::lease::guard::LeaseGuard;
use crate::lease::registry::Leases;
use crate::pool::PoolSet;

/// What every native listener shares with the rest of the sidecar.
#[derive(Clone)]
pub(crate) struct Shared {
    /// The pools, looked up by name at each checkout (so reloads apply).
    pub pools: Arc<PoolSet>,
    /// Live leases, for `/debug/leases`.
    pub leases: Arc<Leases>,
    /// Drain: stop accepting; idle clients are told to go.
    pub stop_accepting: CancellationToken,
    /// Grace over: whatever is still held ends now.
    pub revoke: CancellationToken,
    /// Every open client holds a receiver, so the drain waits for them as
    /// for gRPC clients.
    pub open: watch::Sender<()>,
    /// Every client task belongs to it.
    pub tracker: TaskTracker,
    /// What the listeners count, for `/metrics`.
    pub stats: Arc<stats::ListenerStats>,
}

/// Why a listener's checkout gave no connection.
pub(crate) enum NoConnection {
    /// The grace is over: the client is to be closed.
    Revoked,
    /// None within `pool.checkout_timeout`: why, in the words every
    /// listener's clients get.
    Refused(String),
}

/// A listener's checkout: the pool's own (timeout, fair waiting, metrics),
/// traced on `span` (its `lessor.connection.id` and `otel.status_code` are
/// recorded here), given up when the grace ends.
pub(crate) async fn checkout(
    pool: &Arc<crate::pool::Pool>,
    upstream: &str,
    revoke: &CancellationToken,
    span: &tracing::Span,
) -> Result<LeaseGuard, NoConnection> {
    use tracing::Instrument;
    let timeout = pool.config().pool.checkout_timeout;
    let got = tokio::select! {
        biased;
        () = revoke.cancelled() => return Err(NoConnection::Revoked),
        got = pool.checkout(timeout).instrument(span.clone()) => got,
    };
    match got {
        Ok(leased) => {
            span.record("lessor.connection.id", leased.conn().id() as i64);
            Ok(LeaseGuard::new(leased, OnAbort::Evict))
        }
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            Err(NoConnection::Refused(format!(
                "no server connection for upstream `{upstream}` within {timeout:?}: {e}"
            )))
        }
    }
}

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    /// The address or socket could not be bound.
    #[error("upstreams `{upstream}` listen {addr}: {source}")]
    Bind {
        /// The upstream.
        upstream: String,
        /// What was bound.
        addr: String,
        /// Why not.
        #[source]
        source: io::Error,
    },
    /// The client password could not be read.
    #[error("upstreams `{upstream}` listen.password_file: {source}")]
    Password {
        /// The upstream.
        upstream: String,
        /// Why not.
        #[source]
        source: io::Error,
    },
}

impl BindError {
    /// What could not be bound, and why, for the server's error.
    pub(crate) fn into_parts(self) -> (String, io::Error) {
        match self {
            Self::Bind {
                upstream,
                addr,
                source,
            } => (format!("{addr} (upstreams `{upstream}` listen)"), source),
            Self::Password { upstream, source } => (
                format!("upstreams `{upstream}` listen.password_file"),
                source,
            ),
        }
    }
}

/// A protocol's listener, given each accepted connection.
pub(crate) trait Serve: Send + Sync + Sized + 'static {
    /// Serves one client from its first byte to its close; `peer` is its
    /// address, or `unix`; `id` numbers it among the listener's clients.
    fn run<S>(
        self: Arc<Self>,
        stream: S,
        peer: String,
        id: u64,
    ) -> impl std::future::Future<Output = ()> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The upstream it serves, for logs.
    fn upstream(&self) -> &str;

    /// What it shares with the sidecar.
    fn shared(&self) -> &Shared;

    /// A number for the next client.
    fn next_id(&self) -> u64;
}

/// Serves one accepted connection in a task of its own.
fn serve<L: Serve, S>(listener: Arc<L>, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Held while the client is connected: the drain waits for it.
    let open = listener.shared().open.subscribe();
    let counted = listener.shared().stats.of(listener.upstream()).client();
    let id = listener.next_id();
    let tracker = listener.shared().tracker.clone();
    tracker.spawn(async move {
        listener.run(stream, peer, id).await;
        drop(counted);
        drop(open);
    });
}

/// A listener's sockets, bound before the sidecar serves.
pub(crate) struct Bound {
    upstream: String,
    listen: NativeListen,
    config: UpstreamConfig,
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    /// The password clients present, read at start.
    password: Option<String>,
}

impl Bound {
    /// Binds the listener of `upstream`, if it has one.
    pub(crate) async fn bind(upstream: &UpstreamConfig) -> Result<Option<Self>, BindError> {
        let Some(listen) = upstream.listen.clone() else {
            return Ok(None);
        };
        let name = upstream.name.clone();
        let bind_err = |addr: String| {
            let name = name.clone();
            move |source| BindError::Bind {
                upstream: name,
                addr,
                source,
            }
        };
        let tcp = match listen.address {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(bind_err(addr.to_string()))?,
            ),
            None => None,
        };
        let port = tcp
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(listen.unix_port(), |a| a.port());
        let path = match upstream.protocol {
            Protocol::Redis => listen.unix_socket.clone(),
            _ => listen
                .unix_socket_dir
                .as_ref()
                .map(|dir| dir.join(format!(".s.PGSQL.{port}"))),
        };
        let unix = match path {
            Some(path) => Some(
                bind_unix(&path, listen.unix_socket_mode.0)
                    .map(|l| (l, path.clone()))
                    .map_err(bind_err(path.display().to_string()))?,
            ),
            None => None,
        };
        let password = match (listen.auth, &listen.password_file) {
            (ClientAuth::Trust, _) | (_, None) => None,
            (_, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map(|p| p.trim_end_matches(['\r', '\n']).to_owned())
                    .map_err(|source| BindError::Password {
                        upstream: name.clone(),
                        source,
                    })?,
            ),
        };
        Ok(Some(Self {
            upstream: upstream.name.clone(),
            listen,
            config: upstream.clone(),
            tcp,
            unix,
            password,
        }))
    }

    /// Where it listens, for the log.
    pub(crate) fn describe(&self) -> String {
        let mut at = Vec::new();
        if let Some(addr) = self.tcp.as_ref().and_then(|l| l.local_addr().ok()) {
            at.push(addr.to_string());
        }
        if let Some((_, path)) = &self.unix {
            at.push(path.display().to_string());
        }
        format!("{} ({})", self.upstream, at.join(", "))
    }

    /// Starts accepting, with the listener of the upstream's protocol;
    /// every task belongs to `shared.tracker`.
    pub(crate) fn spawn(self, shared: Shared) {
        let sockets = (self.tcp, self.unix);
        match self.config.protocol {
            Protocol::Redis => {
                let listener = redis::Listener::new(
                    self.upstream,
                    self.listen,
                    self.config,
                    self.password,
                    shared,
                );
                accept(listener, sockets);
            }
            _ => {
                let listener = postgres::Listener::new(
                    self.upstream,
                    self.listen,
                    self.config,
                    self.password,
                    shared,
                );
                accept(listener, sockets);
            }
        }
    }
}

/// Binds a Unix socket at `path` with `mode`, replacing a socket an
/// earlier run left (never another kind of file).
fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to remove it",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// The accept loops of one listener's sockets, until the drain.
fn accept<L: Serve>(
    listener: Arc<L>,
    (tcp, unix): (Option<TcpListener>, Option<(UnixListener, PathBuf)>),
) {
    if let Some(tcp) = tcp {
        let l = listener.clone();
        listener.shared().tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = l.shared().stop_accepting.cancelled() => return,
                    accepted = tcp.accept() => accepted,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        serve(l.clone(), stream, peer.to_string());
                    }
                    Err(e) => accept_failed(l.upstream(), &e).await,
                }
            }
        });
    }
    if let Some((unix, path)) = unix {
        let l = listener.clone();
        listener.shared().tracker.spawn(async move {
            // Removed when the listener stops, so a restart can bind.
            struct Unlink(PathBuf);
            impl Drop for Unlink {
                fn drop(&mut self) {
                    let _ = std::fs::remove_file(&self.0);
                }
            }
            let _unlink = Unlink(path);
            loop {
                let accepted = tokio::select! {
                    () = l.shared().stop_accepting.cancelled() => return,
                    accepted = unix.accept() => accepted,
                };
                match accepted {
                    Ok((stream, _)) => serve(l.clone(), stream, "unix".to_owned()),
                    Err(e) => accept_failed(l.upstream(), &e).await,
                }
            }
        });
    }
}

/// Too many open files and the like: logged, and a short pause so a
/// persistent failure does not spin.
async fn accept_failed(upstream: &str, error: &io::Error) {
    tracing::warn!(upstream, %error, "listener accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
