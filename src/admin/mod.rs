//! The admin HTTP server, on `admin.listen` (default `0.0.0.0:9090`, the pod
//! IP, where the kubelet probes), separate from the gRPC port:
//!
//! - `/livez`: 200 while the process and its runtime answer; never depends on
//!   an upstream;
//! - `/readyz`: 200 when ready, 503 otherwise; `/readyz?verbose` lists each
//!   upstream, its state and why;
//! - `/metrics`: Prometheus text, or OpenMetrics when asked for.
//!
//! It listens on the pod network, so it is built for strangers: at most
//! `MAX_CONNECTIONS` at once, a request head must arrive within
//! `HEADER_READ_TIMEOUT`, and shutdown waits for a request at most
//! `SHUTDOWN_GRACE`.
//!
//! Also here: readiness itself, which `grpc::health` mirrors on the gRPC port.

pub(crate) mod control;
mod fleet_metrics;
pub(crate) mod leases;
pub(crate) mod metrics;
pub(crate) mod profile;
pub(crate) mod readiness;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use readiness::Readiness;

/// What the handlers read.
#[derive(Clone)]
pub(crate) struct AdminState {
    /// The readiness verdict.
    pub readiness: Arc<Readiness>,
    /// The metrics registry.
    pub registry: Arc<Registry>,
    /// Every live lease, for `/debug/leases`.
    pub leases: Arc<crate::lease::registry::Leases>,
}

/// Most admin connections served at once. The kubelet and Prometheus need a
/// handful; a flood from the pod network waits in the accept queue instead of
/// costing memory and tasks.
const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive within this, or its connection is closed: a
/// slow or half-sent request cannot hold a connection slot, or the shutdown.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request in flight may finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Runs [`serve`] on a thread and a single-threaded runtime of its own, so a
/// data plane that keeps its workers busy cannot starve `/livez`, `/readyz`
/// or `/metrics` (linkerd2-proxy runs its admin server the same way). The
/// returned receiver resolves once the server has stopped after `stop`.
pub(crate) fn spawn(
    listener: TcpListener,
    state: AdminState,
    control: Option<(TcpListener, control::ControlState)>,
    stop: CancellationToken,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    // A tokio listener belongs to the runtime that made it: hand the socket
    // over as a std one and register it again on the admin runtime.
    let listener = listener.into_std()?;
    let control = match control {
        Some((l, state)) => Some((l.into_std()?, state)),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lessor-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let admin = async {
                    let served = match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            serve(listener, routes(state), stop.clone().cancelled_owned()).await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = served {
                        tracing::error!(error = %e, "admin server failed");
                    }
                };
                let control = async {
                    let Some((listener, state)) = control else {
                        return;
                    };
                    let served = match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            serve(
                                listener,
                                control::router(state),
                                stop.clone().cancelled_owned(),
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = served {
                        tracing::error!(error = %e, "control server failed");
                    }
                };
                tokio::join!(admin, control);
            });
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

/// Serves the admin endpoints until `shutdown` resolves, then lets requests
/// in flight finish for at most `SHUTDOWN_GRACE`. HTTP/1.1 with keep-alive;
/// every connection task is owned here and waited for.
pub(crate) async fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The permit moves into the connection's task: the bound cannot leak.
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting an admin connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        });
    }
    drop(listener);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// The read-only routes of the admin address.
fn routes(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/leases", get(debug_leases))
        .with_state(state)
}

async fn debug_leases(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Response {
    match leases::render(&state.leases, query.as_deref().unwrap_or("")) {
        Ok((body, content_type)) => {
            ([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Err(e) => (axum::http::StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Response {
    let report = state.readiness.report();
    let verbose = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|p| p == "verbose" || p.starts_with("verbose="));
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = if verbose {
        report.verbose()
    } else if report.ready {
        "ok\n".to_owned()
    } else {
        "not ready\n".to_owned()
    };
    (code, body).into_response()
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = metrics::Format::negotiate(accept);
    match metrics::render(&state.registry, format) {
        Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response(),
    }
}

/// An admin endpoint's answer, as [`fetch`] reads it.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    /// The HTTP status code.
    pub status: u16,
    /// The body.
    pub body: String,
}

/// A minimal HTTP/1.0 GET of our own admin endpoints, for `lessor demo`:
/// reading two plain-text endpoints needs no HTTP client dependency.
pub(crate) async fn fetch(addr: &str, path: &str) -> std::io::Result<Fetched> {
    request(addr, "GET", path).await
}

/// One HTTP/1.0 request of `method` (no body); the status and the body.
pub(crate) async fn request(addr: &str, method: &str, path: &str) -> std::io::Result<Fetched> {
    let (status, body) = request_bytes(addr, method, path).await?;
    let body = String::from_utf8(body).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "response is not UTF-8")
    })?;
    Ok(Fetched { status, body })
}

/// [`request`], for a binary body (a gzipped profile).
pub(crate) async fn request_bytes(
    addr: &str,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    Ok((status, raw[split + 4..].to_vec()))
}
