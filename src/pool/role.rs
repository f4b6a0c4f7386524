//! Keeping endpoints' roles fresh for an upstream that wants a primary or
//! a replica: every `health.interval`, and at once when a lease saw a hint
//! (a write refused as read-only; a PostgreSQL `in_hot_standby` report),
//! one idle connection per endpoint asks its server, and an endpoint the
//! pool holds no connection to (a replica that may have been promoted, a
//! primary just restarted) is asked over a connection of its own, closed
//! after. A change retires or restores the endpoint: its idle connections
//! of the wrong role close at once (`role_changed`), leased ones at their
//! return, and new dials go to the endpoints that fit.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::future::join_all;
use tracing::Instrument;

use super::{EvictReason, Pool, PoolConn};
use crate::config::Role;
use crate::discovery::Retirement;
use crate::protocol::role;

impl Pool {
    /// One pass over the endpoints' roles (nothing for `role: any`).
    pub(super) async fn check_roles(&self) {
        let set = self.dialer.endpoints().clone();
        if set.wanted() == Role::Any {
            return;
        }
        self.counters.role_checks.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("role_check", lessor.upstream = %self.name());
        async {
            let mut held = Vec::new();
            while held.len() < self.config.pool.max_size as usize {
                match self.engine.try_get_idle(&self.counters) {
                    Some(conn) => held.push(conn),
                    None => break,
                }
            }
            // The first idle connection of each endpoint asks for it.
            let mut asking = vec![false; held.len()];
            for i in 0..held.len() {
                let endpoint = held[i].endpoint_ref().endpoint();
                asking[i] = !held[..i]
                    .iter()
                    .any(|c| Arc::ptr_eq(c.endpoint_ref().endpoint(), endpoint));
            }
            let timeout = self
                .config
                .health
                .probe
                .as_ref()
                .map_or(self.config.pool.connect_timeout, |p| p.timeout);
            let opener = self.dialer.opener().clone();
            let asked = join_all(held.iter_mut().zip(&asking).filter(|(_, ask)| **ask).map(
                |(conn, _)| {
                    let opener = &opener;
                    async move {
                        let asked =
                            tokio::time::timeout(timeout, opener.ask_role(&mut conn.stream)).await;
                        (conn.id(), asked)
                    }
                },
            ))
            .await;
            let mut failed = Vec::new();
            for (id, asked) in asked {
                match asked {
                    Ok(Ok(Some(found))) => {
                        if let Some(conn) = held.iter().find(|c| c.id() == id) {
                            set.observe_role(conn.endpoint_ref().endpoint(), found);
                        }
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => failed.push((id, e.to_string())),
                    Err(_) => failed.push((id, format!("no answer within {timeout:?}"))),
                }
            }
            // Back in their order (most recently used first); a connection
            // whose question failed is in an unknown state and closes.
            let mut keep: Vec<PoolConn> = Vec::new();
            for conn in held {
                if let Some((_, error)) = failed.iter().find(|(id, _)| *id == conn.id()) {
                    tracing::debug!(connection_id = conn.id(), %error, "role check failed");
                    self.counters
                        .health_check_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.evict(conn, EvictReason::HealthCheck);
                } else if let Some(reason) = conn.retirement() {
                    self.evict(conn, reason);
                } else {
                    keep.push(conn);
                }
            }
            for conn in keep.into_iter().rev() {
                conn.put_back();
            }
            // Endpoints without a connection: asked over one of their own,
            // in a task (a server that accepts and never answers holds a
            // probe for `connect_timeout`, and must not hold this loop),
            // one round of probes at a time.
            let lonely: Vec<_> = set
                .endpoints()
                .into_iter()
                .filter(|ep| ep.connections() == 0 && ep.retirement() != Some(Retirement::Removed))
                .collect();
            if !lonely.is_empty() && set.begin_probes() {
                let dialer = self.dialer.clone();
                let ready = self.ready_signal.clone();
                let set = set.clone();
                self.spawn(
                    async move {
                        let probed = join_all(lonely.iter().map(|ep| dialer.probe_role(ep))).await;
                        for (ep, probed) in lonely.iter().zip(probed) {
                            match probed {
                                Ok(found) => set.observe_role(ep, found),
                                Err(e) => {
                                    tracing::debug!(endpoint = %ep.target(), error = %e, "role probe failed");
                                    if e.unreachable() {
                                        set.forget_role(ep);
                                    }
                                }
                            }
                        }
                        set.end_probes();
                        ready.send_replace(());
                    }
                    .instrument(tracing::Span::current()),
                );
            }
        }
        .instrument(span)
        .await;
        self.ready_signal.send_replace(());
    }
}

/// Whether a PostgreSQL session's reports (merged into its record at the
/// lease's end) disagree with what its endpoint's server last said: a
/// promotion reports `in_hot_standby: off` to every session. A hint only:
/// a client's own `SET default_transaction_read_only` reports too, so the
/// server is asked before anything changes.
pub(super) fn reports_disagree(conn: &super::Conn) -> bool {
    let endpoint = conn.endpoint_ref().endpoint();
    conn.backend
        .as_ref()
        .and_then(|b| role::from_parameters(&b.parameters))
        .is_some_and(|reported| endpoint.role() != Some(reported))
}
