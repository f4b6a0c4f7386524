//! The control endpoints, on their own listener (`admin.control_listen`,
//! loopback by default, so only the pod's own containers reach them):
//!
//! - `POST /admin/pause[?upstream=U]`: stop granting connections (new
//!   checkouts wait, bounded by their deadline); live leases carry on.
//! - `POST /admin/resume[?upstream=U]`: grant again.
//! - `POST /admin/reconnect[?upstream=U]`: replace every connection dialed
//!   so far: idle ones close now, leased ones at their return.
//! - `POST /admin/shutdown`: drain, as SIGTERM does (an app's `preStop`).
//! - `GET /debug/pprof/profile`, `/debug/pprof/heap`, `/debug/runtime`:
//!   lessor's own CPU profile and runtime figures (`admin::profile`).
//!
//! Without `upstream`, every upstream. Each answers with what it did.

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::pool::{Pool, PoolSet};

/// What the control handlers act on.
#[derive(Clone)]
pub(crate) struct ControlState {
    /// The upstreams.
    pub pools: Arc<PoolSet>,
    /// Cancelled by `/admin/shutdown`: the server drains as on SIGTERM.
    pub shutdown: CancellationToken,
    /// CPU profiles and runtime figures.
    pub profile: super::profile::ProfileState,
}

/// The control routes, and the profiling ones (`admin::profile`).
pub(crate) fn router(state: ControlState) -> Router {
    let profile = state.profile.clone();
    Router::new()
        .route("/admin/pause", post(pause))
        .route("/admin/resume", post(resume))
        .route("/admin/reconnect", post(reconnect))
        .route("/admin/shutdown", post(shutdown))
        .with_state(state)
        .merge(
            Router::new()
                .route("/debug/pprof/profile", get(super::profile::cpu))
                .route("/debug/pprof/heap", get(super::profile::heap))
                .route("/debug/runtime", get(super::profile::runtime))
                .with_state(profile),
        )
}

async fn pause(state: State<ControlState>, query: RawQuery) -> Response {
    each(&state, query, "paused", |p| p.pause())
}

async fn resume(state: State<ControlState>, query: RawQuery) -> Response {
    each(&state, query, "resumed", |p| p.resume())
}

async fn reconnect(state: State<ControlState>, query: RawQuery) -> Response {
    each(&state, query, "reconnecting", |p| p.reconnect())
}

async fn shutdown(State(state): State<ControlState>) -> Response {
    tracing::info!("shutdown requested on the control address");
    state.shutdown.cancel();
    "draining\n".into_response()
}

/// Applies `action` to the upstream named by `?upstream=`, or to all.
fn each(
    state: &ControlState,
    RawQuery(query): RawQuery,
    done: &str,
    action: impl Fn(&Pool),
) -> Response {
    let mut upstream = None;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("upstream", name)) if !name.is_empty() => upstream = Some(name.to_owned()),
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter `{pair}` (upstream=NAME)\n"),
                )
                    .into_response();
            }
        }
    }
    let names: Vec<String> = match upstream {
        Some(name) if state.pools.get(&name).is_none() => {
            return (
                StatusCode::NOT_FOUND,
                format!(
                    "unknown upstream `{}` (configured: {})\n",
                    crate::pool::printable_name(&name),
                    state.pools.names().join(", ")
                ),
            )
                .into_response();
        }
        Some(name) => vec![name],
        None => state.pools.names().iter().map(|n| n.to_string()).collect(),
    };
    for name in &names {
        if let Some(pool) = state.pools.get(name) {
            action(&pool);
        }
    }
    format!("{done}: {}\n", names.join(", ")).into_response()
}
