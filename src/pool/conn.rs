//! A pooled upstream connection: the socket and the facts the pool's rules
//! need about it (age, last use, last successful check).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::EvictReason;
use crate::config::Role;
use crate::discovery::{EndpointRef, Retirement};

/// One upstream socket owned by a pool. Only the pool and the lease holding it
/// ever touch the socket; nothing else can keep it alive.
#[derive(Debug)]
pub(crate) struct Conn {
    /// The socket (plain or TLS). Leases split it for their byte pump.
    pub(crate) stream: crate::net::Stream,
    id: u64,
    endpoint: SocketAddr,
    /// `endpoint` formatted once: every lease's Granted carries it.
    endpoint_str: String,
    /// Dial time `+ max_lifetime - jitter`: closed at or after this instant.
    expires_at: Instant,
    /// When it was dialed: a `reconnect` closes the ones dialed before it.
    born: Instant,
    /// When a lease last gave the connection back (creation before that).
    /// Engines' own "last used" clocks count from checkout, not return
    /// (deadpool counts from checkout), so the idle timeout and the probe window use this one.
    idle_since: Instant,
    /// When a health check last succeeded (creation counts as one).
    validated_at: Instant,
    uses: u64,
    /// Counts this connection against its endpoint while it lives.
    endpoint_ref: EndpointRef,
    /// Set just before an engine guard drops it: bb8 closes connections
    /// whose `has_broken` says so, which is its only eviction path.
    pub(crate) broken: bool,
    /// A PostgreSQL session's parameters and backend key, from its startup.
    pub(crate) backend: Option<Box<crate::protocol::postgres::Backend>>,
    /// A lease saw the server refuse a write as read-only (SQLSTATE 25006,
    /// Redis `-READONLY`): on a `primary` upstream its endpoint's role is
    /// asked at once. Cleared when the connection goes back.
    pub(crate) refused_write: bool,
    /// Its place under the fleet budget's cap, freed when it closes.
    pub(crate) cap_slot: Option<crate::fleet::CapSlot>,
}

impl Conn {
    /// Wraps a freshly dialed socket.
    pub(crate) fn new(
        stream: crate::net::Stream,
        id: u64,
        endpoint: SocketAddr,
        max_lifetime: Duration,
        endpoint_ref: EndpointRef,
    ) -> Self {
        let now = Instant::now();
        Self {
            stream,
            id,
            endpoint,
            endpoint_str: endpoint.to_string(),
            expires_at: now + jittered(max_lifetime),
            born: now,
            idle_since: now,
            validated_at: now,
            uses: 0,
            endpoint_ref,
            broken: false,
            backend: None,
            refused_write: false,
            cap_slot: None,
        }
    }

    /// When the connection was dialed.
    pub(crate) fn born(&self) -> Instant {
        self.born
    }

    /// The discovered endpoint this connection belongs to.
    pub(crate) fn endpoint_ref(&self) -> &EndpointRef {
        &self.endpoint_ref
    }

    /// Why the connection must leave the pool, if it must: its endpoint is
    /// gone, not ready or terminating, or its server is of another role than
    /// the upstream wants.
    pub(crate) fn retirement(&self) -> Option<EvictReason> {
        match self.endpoint_ref.endpoint().retirement() {
            Some(Retirement::Removed) => Some(EvictReason::EndpointRemoved),
            Some(Retirement::WrongRole) => Some(EvictReason::RoleChanged),
            None => None,
        }
    }

    /// Whether what the last lease saw hints that its server's role changed:
    /// a write refused as read-only on a `primary` upstream (on a `replica`
    /// one that is the normal answer), or PostgreSQL reports that disagree
    /// with the endpoint's known role. A hint only: the server is asked
    /// before anything is closed.
    pub(crate) fn role_hint(&self) -> bool {
        let endpoint = self.endpoint_ref.endpoint();
        match endpoint.wanted() {
            Role::Any => false,
            wanted => {
                (self.refused_write && wanted == Role::Primary)
                    || super::role::reports_disagree(self)
            }
        }
    }

    /// Process-unique id, stable for the connection's life.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The address the socket is connected to.
    pub(crate) fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// The endpoint as text.
    pub(crate) fn endpoint_str(&self) -> &str {
        &self.endpoint_str
    }

    /// How many leases this connection has been handed to.
    pub(crate) fn uses(&self) -> u64 {
        self.uses
    }

    /// Time since the connection last went idle (or was dialed).
    pub(crate) fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.idle_since)
    }

    /// Time since a health check last passed.
    pub(crate) fn unchecked_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.validated_at)
    }

    /// Whether `max_lifetime` (with its jitter) has passed.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        now >= self.expires_at
    }

    pub(crate) fn mark_validated(&mut self, now: Instant) {
        self.validated_at = now;
    }

    pub(crate) fn mark_leased(&mut self) {
        self.uses += 1;
    }

    pub(crate) fn mark_idle(&mut self, now: Instant) {
        self.idle_since = now;
    }
}

/// Shortens a lifetime by up to 10%, so connections dialed together (a fleet
/// rolling out, a pool warming up) do not all expire and redial together.
fn jittered(lifetime: Duration) -> Duration {
    let spread = lifetime / 10;
    lifetime - spread.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let base = Duration::from_secs(1000);
        for _ in 0..1000 {
            let j = jittered(base);
            assert!(j <= base && j >= Duration::from_secs(900), "{j:?}");
        }
    }
}
