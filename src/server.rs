//! The sidecar: binds the gRPC API, starts the pools, and drains on shutdown.
//!
//! [`run`] takes its listener and its shutdown future from the caller, so the
//! binary passes a bound socket and the signal handler, and tests pass
//! `127.0.0.1:0` and a future of their own.
//!
//! Drain (PgBouncer's WAIT_FOR_CLIENTS): when `shutdown` resolves, the
//! listener closes (new clients are refused) but the accept stream never
//! ends, because tonic treats its end as "GOAWAY everyone".
//! Connected clients keep working, new streams included. Each accepted socket
//! holds a `watch` receiver, so the sender's `closed()` fires when the last
//! client connection is gone; or, at the latest, after `shutdown.grace`, live
//! leases are revoked (Ended SHUTDOWN) and waiting checkouts fail UNAVAILABLE.
//! Then tonic shuts the connections down, the pools close, and `run` returns.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

use crate::admin::{self, AdminState, Readiness};
use crate::config::{Config, ListenAddr, UnixMode};
use crate::discovery::{Resolver, SystemResolver};
use crate::grpc::PoolService;
use crate::lease::LeaseContext;
use crate::pool::PoolSet;
use crate::telemetry::SpanCounters;
use lessor_client::pb;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The admin server's thread or runtime could not start.
    #[error("cannot start the admin server: {0}")]
    Admin(#[source] io::Error),
    /// The reflection service could not load the descriptor set.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The HTTP/2 server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Both listening sockets, bound before anything else starts so a taken port
/// fails fast and tests can bind port 0.
pub struct Listeners {
    /// The gRPC API.
    pub grpc: Listener,
    /// The admin HTTP server.
    pub admin: TcpListener,
    /// The control endpoints (pause, resume, reconnect, shutdown); `None`
    /// disables them.
    pub control: Option<TcpListener>,
}

impl Listeners {
    /// Binds `grpc.listen` and `admin.listen`.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let grpc =
            Listener::bind_with_mode(&config.grpc.listen, config.grpc.unix_socket_mode).await?;
        let addr = config.admin.listen;
        let admin = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        let control = match config.admin.control_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServerError::Bind {
                            addr: addr.to_string(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        Ok(Self {
            grpc,
            admin,
            control,
        })
    }

    /// The admin server's bound address.
    pub fn admin_addr(&self) -> String {
        self.admin
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into())
    }
}

/// A bound gRPC listener: TCP, or a Unix socket shared with the app container.
pub enum Listener {
    /// `host:port`.
    Tcp(TcpListener),
    /// `unix:///path`; the file is removed when the listener drops.
    Unix(UnixListener, UnixSocketFile),
}

/// Removes the socket file when the listener goes away, so a restart can bind.
pub struct UnixSocketFile(PathBuf);

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Binds `addr` (a Unix socket with the default mode, `0660`).
    pub async fn bind(addr: &ListenAddr) -> Result<Self, ServerError> {
        Self::bind_with_mode(addr, UnixMode(0o660)).await
    }

    /// Binds `addr`. A stale Unix socket from an earlier run is removed first
    /// (binding would fail on it), but nothing that is not a socket: a typo in
    /// `listen` must not delete a file. The socket gets `mode`.
    pub async fn bind_with_mode(addr: &ListenAddr, mode: UnixMode) -> Result<Self, ServerError> {
        let bind_err = |source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Tcp(sock) => {
                Ok(Self::Tcp(TcpListener::bind(sock).await.map_err(bind_err)?))
            }
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(bind_err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "the path exists and is not a socket; refusing to remove it",
                        )));
                    }
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                let listener = UnixListener::bind(path).map_err(bind_err)?;
                let file = UnixSocketFile(path.clone());
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode.0))
                    .map_err(bind_err)?;
                Ok(Self::Unix(listener, file))
            }
        }
    }

    /// The bound address, as clients should dial it.
    pub fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Self::Unix(_, file) => format!("unix://{}", file.0.display()),
        }
    }

    async fn accept(&self) -> io::Result<Io> {
        match self {
            Self::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                // Lease traffic is small request/response messages.
                stream.set_nodelay(true)?;
                Ok(Io::Tcp(stream))
            }
            Self::Unix(l, _) => Ok(Io::Unix(l.accept().await?.0)),
        }
    }
}

enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// An accepted client connection. Holding `_open` is what counts it as open
/// for the drain.
pub(crate) struct ClientIo {
    io: Io,
    _open: watch::Receiver<()>,
}

/// Nothing is recorded per connection: leases do not depend on the peer.
impl Connected for ClientIo {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Accepted connections until `stop` fires; then the listener is dropped (new
/// clients are refused) and the stream stays pending forever. Accept errors
/// (EMFILE under a connection flood) are logged and retried after a pause.
fn incoming(
    listener: Listener,
    open: watch::Sender<()>,
    stop: CancellationToken,
) -> impl Stream<Item = io::Result<ClientIo>> {
    let accepted = futures::stream::unfold((listener, open), |(listener, open)| async move {
        loop {
            match listener.accept().await {
                Ok(io) => {
                    let client = ClientIo {
                        io,
                        _open: open.subscribe(),
                    };
                    return Some((Ok(client), (listener, open)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a gRPC client failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    accepted
        .take_until(stop.cancelled_owned())
        .chain(futures::stream::pending())
}

/// What `run_with` takes beyond the config: handles owned by the caller.
pub struct RunOptions {
    /// Span export accounting from `telemetry::init`, shown in `/metrics`.
    pub spans: Arc<SpanCounters>,
    /// Name resolution for DNS discovery (the system's by default; tests
    /// substitute their own answers).
    pub resolver: Arc<dyn Resolver>,
    /// The file the config came from: SIGHUP, or a change of the file,
    /// reloads it. `None`: no reload.
    pub config_path: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            spans: Arc::default(),
            resolver: Arc::new(SystemResolver),
            config_path: None,
        }
    }
}

/// Runs the sidecar until `shutdown` resolves and the drain completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    run_with(config, listeners, shutdown, RunOptions::default()).await
}

/// [`run`], with caller-owned handles.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    options: RunOptions,
) -> Result<(), ServerError> {
    // One cancellation tree: `background` stops the pools' loops and the
    // health updater, `revoke` ends leases, checkouts and health watches,
    // `admin_stop` ends the admin server last. Every task is on `tracker`.
    let tracker = TaskTracker::new();
    let background = CancellationToken::new();
    let revoke = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let pools = Arc::new(PoolSet::new(&config.upstreams));
    let readiness = Readiness::new(pools.clone());
    pools.start(&tracker, &background, options.resolver.clone());

    let (health, reporter) = crate::grpc::health::service(&readiness, revoke.clone()).await;
    tracker.spawn(crate::grpc::health::keep_updated(
        reporter,
        readiness.clone(),
        background.clone(),
    ));
    let leases = Arc::new(crate::lease::registry::Leases::default());
    let reloads = Arc::new(crate::reload::Reloads::new(options.config_path.as_deref()));
    if let Some(path) = options.config_path.clone() {
        tracker.spawn(crate::reload::watch(
            path,
            config.clone(),
            pools.clone(),
            reloads.clone(),
            background.clone(),
        ));
    }
    let listener_stats = Arc::new(crate::listener::stats::ListenerStats::default());
    let admin_state = AdminState {
        readiness: readiness.clone(),
        registry: Arc::new(admin::metrics::registry(
            pools.clone(),
            options.spans,
            reloads.clone(),
            listener_stats.clone(),
        )),
        leases: leases.clone(),
    };
    let admin_addr = listeners.admin_addr();
    // `/admin/shutdown` drains like SIGTERM.
    let control_shutdown = CancellationToken::new();
    let control = listeners.control.map(|l| {
        let state = admin::control::ControlState {
            pools: pools.clone(),
            shutdown: control_shutdown.clone(),
            profile: admin::profile::ProfileState {
                runtime: tokio::runtime::Handle::current(),
                busy: Default::default(),
            },
        };
        (l, state)
    });
    let admin_done = admin::spawn(listeners.admin, admin_state, control, admin_stop.clone())
        .map_err(ServerError::Admin)?;
    // The admin thread outlives nothing: if this future is dropped (an
    // embedder aborts it) rather than run to the end, it stops too.
    let _admin_guard = admin_stop.clone().drop_guard();

    let max_frame = usize::try_from(config.grpc.max_frame.as_u64()).unwrap_or(usize::MAX);
    let ctx = Arc::new(LeaseContext::new(
        pools.clone(),
        leases.clone(),
        max_frame,
        config.grpc.acquire_timeout,
        revoke.clone(),
    ));
    tracker.spawn(ctx.watchdog.clone().run(revoke.clone(), background.clone()));
    tracker.spawn(crate::lease::registry::warn_overdue(
        leases,
        pools.clone(),
        background.clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (open_tx, open_rx) = watch::channel(());
    drop(open_rx);
    let stop_accepting = CancellationToken::new();
    // Native listeners (unmodified PostgreSQL and Redis clients): bound now, so a
    // taken port fails the start; their clients count for the drain.
    let mut native = Vec::new();
    for upstream in &config.upstreams {
        match crate::listener::Bound::bind(upstream).await {
            Ok(Some(bound)) => native.push(bound),
            Ok(None) => {}
            Err(e) => {
                let (addr, source) = e.into_parts();
                return Err(ServerError::Bind { addr, source });
            }
        }
    }
    let shared = crate::listener::Shared {
        pools: pools.clone(),
        leases: ctx.leases.clone(),
        stop_accepting: stop_accepting.clone(),
        revoke: revoke.clone(),
        open: open_tx.clone(),
        tracker: tracker.clone(),
        stats: listener_stats.clone(),
    };
    for bound in native {
        tracing::info!(listener = %bound.describe(), "native listener serving");
        bound.spawn(shared.clone());
    }
    tracing::info!(
        listen = %listeners.grpc.local_addr(),
        admin = %admin_addr,
        upstreams = ?pools.names(),
        "lessor serving"
    );
    let incoming = incoming(listeners.grpc, open_tx.clone(), stop_accepting.clone());
    let grace = config.shutdown.grace;
    let min_delay = config.shutdown.min_delay;
    let drain = async {
        tokio::select! {
            () = shutdown => {}
            () = control_shutdown.cancelled() => {}
        }
        readiness.drain();
        if !min_delay.is_zero() {
            // Not ready, still accepting: clients that have not yet seen the
            // endpoint go away can still connect.
            tracing::info!(min_delay = ?min_delay, "shutdown: not ready; accepting new clients a little longer");
            tokio::time::sleep(min_delay).await;
        }
        tracing::info!(grace = ?grace, "shutdown: not ready; refusing new clients, waiting for connected ones");
        stop_accepting.cancel();
        tokio::select! {
            () = open_tx.closed() => tracing::info!("shutdown: every client is gone"),
            () = tokio::time::sleep(grace) => {
                tracing::info!("shutdown: grace period over, revoking leases");
                revoke.cancel();
            }
        }
    };

    let serving = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .http2_max_pending_accept_reset_streams(Some(1000))
        .http2_max_local_error_reset_streams(Some(1024))
        .max_concurrent_streams(Some(config.grpc.max_concurrent_streams))
        .add_service(crate::grpc::limits::PoolRoutes::new(
            PoolService::new(ctx),
            max_frame,
        ))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, drain);
    // tonic waits for every connection to close. Once the grace is over,
    // what still holds one (a lease stalled on flow control, a stream that
    // never asked, a client that never finished its handshake) gets
    // `HARD_DEADLINE`, then is abandoned: nothing holds the process.
    let served = tokio::select! {
        served = serving => served,
        () = async {
            revoke.cancelled().await;
            tokio::time::sleep(HARD_DEADLINE).await;
        } => {
            tracing::warn!(after = ?HARD_DEADLINE, "shutdown: connections still open after the grace; abandoning them");
            Ok(())
        }
    };

    revoke.cancel();
    background.cancel();
    pools.close();
    admin_stop.cancel();
    tracker.close();
    let stopped = async {
        tracker.wait().await;
        pools.wait_tasks().await;
        let _ = admin_done.await;
    };
    if tokio::time::timeout(HARD_DEADLINE, stopped).await.is_err() {
        tracing::warn!("shutdown: background tasks did not stop in time");
    }
    tracing::info!("lessor stopped");
    served.map_err(ServerError::from)
}

/// How long the teardown after the grace may take before lessor stops
/// waiting for what is still open.
pub(crate) const HARD_DEADLINE: Duration = Duration::from_secs(1);
