//! Counters and gauges of one pool, shared lock-free between checkouts, leases,
//! the engine adapters and the maintenance loop.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Why a connection was closed. The names are the keys of
/// `UpstreamStats.evictions` and of the `reason` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvictReason {
    /// A liveness peek or probe failed.
    HealthCheck,
    /// Idle beyond `min_idle` for longer than `idle_timeout`.
    IdleTimeout,
    /// Older than `max_lifetime`.
    MaxLifetime,
    /// The client sent `Release{EVICT}`.
    ClientEvict,
    /// The lease ended without `Release`, or broke the protocol.
    ClientAbort,
    /// The upstream closed or failed mid-lease.
    UpstreamClosed,
    /// The lease reached its maximum duration.
    LeaseExpired,
    /// The lease was idle too long.
    LeaseIdle,
    /// `Release{RETURN}` while a reply could still be in flight or unread.
    Dirty,
    /// The sidecar shut down.
    Shutdown,
    /// Discovery removed the connection's endpoint.
    EndpointRemoved,
}

impl EvictReason {
    /// Every reason, in a stable order.
    pub const ALL: [EvictReason; 11] = [
        Self::HealthCheck,
        Self::IdleTimeout,
        Self::MaxLifetime,
        Self::ClientEvict,
        Self::ClientAbort,
        Self::UpstreamClosed,
        Self::LeaseExpired,
        Self::LeaseIdle,
        Self::Dirty,
        Self::Shutdown,
        Self::EndpointRemoved,
    ];

    /// The wire and label name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HealthCheck => "health_check",
            Self::IdleTimeout => "idle_timeout",
            Self::MaxLifetime => "max_lifetime",
            Self::ClientEvict => "client_evict",
            Self::ClientAbort => "client_abort",
            Self::UpstreamClosed => "upstream_closed",
            Self::LeaseExpired => "lease_expired",
            Self::LeaseIdle => "lease_idle",
            Self::Dirty => "dirty",
            Self::Shutdown => "shutdown",
            Self::EndpointRemoved => "endpoint_removed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Monotonic counters and live gauges. Relaxed ordering throughout: each
/// value is independent and read only for reporting.
#[derive(Debug, Default)]
pub struct Counters {
    /// Leases handed a connection.
    pub leases_granted: AtomicU64,
    /// Dials that produced a connection.
    pub connections_created: AtomicU64,
    /// Dials that reached the network and failed.
    pub connect_errors: AtomicU64,
    /// Checks run (peek, plus probe when due).
    pub health_checks: AtomicU64,
    /// Checks that failed (and evicted their connection).
    pub health_check_failures: AtomicU64,
    /// Checkouts that hit their deadline.
    pub checkout_timeouts: AtomicU64,
    evictions: [AtomicU64; 11],
    /// Connections held by live leases (gauge).
    pub leased: AtomicU32,
    /// Checkouts in progress (gauge).
    pub waiting: AtomicU32,
    /// Connections currently out of the engine's idle list, for any reason:
    /// leased, being checked, held by a sweep (gauge).
    pub out: AtomicU32,
}

impl Counters {
    /// Counts one closed connection.
    pub fn evicted(&self, reason: EvictReason) {
        self.evictions[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Closed connections so far, by reason.
    pub fn evictions(&self, reason: EvictReason) -> u64 {
        self.evictions[reason.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_slot() {
        let c = Counters::default();
        for (i, r) in EvictReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            c.evicted(*r);
        }
        c.evicted(EvictReason::Dirty);
        assert_eq!(c.evictions(EvictReason::Dirty), 2);
        assert_eq!(c.evictions(EvictReason::Shutdown), 1);
        let names: std::collections::HashSet<_> =
            EvictReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), EvictReason::ALL.len());
    }
}
