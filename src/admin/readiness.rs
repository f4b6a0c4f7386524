//! Readiness as a value, not a flag scattered around: lessor is ready when it
//! is not draining and every `readiness: required` upstream can serve a lease
//! (it holds a connection that passed its checks, or its last dial
//! succeeded). Saturation plays no part: taking every replica out under load
//! is how outages spread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::ReadinessRole;
use crate::pool::{PoolReadiness, PoolSet};

/// The sidecar's readiness, shared by `/readyz` and gRPC health.
pub(crate) struct Readiness {
    pools: Arc<PoolSet>,
    draining: AtomicBool,
}

/// One upstream's part in readiness.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamReadiness {
    /// The upstream's name.
    pub name: String,
    /// Whether it gates readiness.
    pub required: bool,
    /// Whether it can serve a lease now.
    pub ready: bool,
    /// Why (connection counts, or the last dial error).
    pub detail: String,
}

/// Readiness and its reasons at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    /// The verdict.
    pub ready: bool,
    /// Whether a drain has begun.
    pub draining: bool,
    /// Every upstream, required or not.
    pub upstreams: Vec<UpstreamReadiness>,
}

impl Readiness {
    /// Readiness over these pools; not draining.
    pub(crate) fn new(pools: Arc<PoolSet>) -> Arc<Self> {
        Arc::new(Self {
            pools,
            draining: AtomicBool::new(false),
        })
    }

    /// Turns readiness off for good: the drain has begun.
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.pools.signal_readiness();
    }

    /// Whether the drain has begun.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Changes whenever the verdict may have changed: an upstream's
    /// readiness inputs, or the drain.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.pools.readiness_changes()
    }

    /// The verdict and its reasons.
    pub(crate) fn report(&self) -> Report {
        let upstreams: Vec<_> = self
            .pools
            .all()
            .iter()
            .map(|pool| {
                let facts = pool.readiness();
                UpstreamReadiness {
                    name: pool.name().to_owned(),
                    required: pool.config().readiness == ReadinessRole::Required,
                    ready: facts.ready,
                    detail: explain(&facts),
                }
            })
            .collect();
        let draining = self.draining();
        let ready = !draining && upstreams.iter().all(|u| u.ready || !u.required);
        Report {
            ready,
            draining,
            upstreams,
        }
    }
}

/// Why an upstream is or is not ready, in words: the most basic missing
/// condition first, then the endpoint source's state when it is discovered.
fn explain(p: &PoolReadiness) -> String {
    let detail = if p.closed {
        "pool closed (shutting down)".to_owned()
    } else if !p.source.synced {
        p.source.detail.clone()
    } else if !p.any_usable && p.roles.is_some() {
        "no ready endpoint of the wanted role".to_owned()
    } else if !p.any_usable {
        "no ready endpoint".to_owned()
    } else if p.ready {
        format!(
            "{} connections ({} idle, {} leased)",
            p.connections, p.idle, p.leased
        )
    } else {
        match &p.last_dial_error {
            Some(e) if p.connections == 0 => format!("no connection; last dial failed: {e}"),
            Some(e) => format!("last dial failed: {e}"),
            None => "not dialed yet".to_owned(),
        }
    };
    let detail = if p.discovered && p.source.synced {
        format!("{detail}; {}", p.source.detail)
    } else {
        detail
    };
    let detail = match &p.roles {
        Some(roles) => format!("{detail}; {roles}"),
        None => detail,
    };
    let detail = match &p.tls {
        Some(tls) => format!("{detail}; {}", tls_detail(tls)),
        None => detail,
    };
    let detail = match &p.fleet {
        Some(fleet) => format!("{detail}; {}", crate::fleet::describe(fleet)),
        None => detail,
    };
    if p.paused {
        format!("{detail}; paused (lessor resume to grant again)")
    } else {
        detail
    }
}

/// `tls verify-full`, the client certificate's expiry, a failing reload.
fn tls_detail(tls: &crate::net::TlsStatus) -> String {
    let mut out = format!("tls {}", tls.mode);
    if let Some(at) = tls.client_cert_not_after {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(at.unsigned_abs());
        out.push_str(&format!(
            ", client certificate expires {}",
            humantime::format_rfc3339_seconds(at)
        ));
    }
    if let Some(e) = &tls.last_reload_error {
        out.push_str(&format!(", reload failing: {e}"));
    }
    out
}

impl Report {
    /// The `/readyz?verbose` body, in the Kubernetes API server's style.
    pub(crate) fn verbose(&self) -> String {
        let mut out = String::new();
        for u in &self.upstreams {
            let mark = if u.ready { '+' } else { '-' };
            let optional = if u.required { "" } else { " (optional)" };
            let verdict = if u.ready { "ok" } else { "failed" };
            out.push_str(&format!(
                "[{mark}]upstream {}{optional} {verdict}: {}\n",
                u.name, u.detail
            ));
        }
        if self.draining {
            out.push_str("[-]draining failed: shutting down, refusing new clients\n");
        } else {
            out.push_str("[+]draining ok\n");
        }
        out.push_str(if self.ready {
            "readyz check passed\n"
        } else {
            "readyz check failed\n"
        });
        out
    }
}
