//! Counters and gauges of one pool, shared lock-free between checkouts, leases,
//! the engine adapters and the maintenance loop.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::connect::CONNECT_ERROR_REASONS;

/// Why a connection was closed. The names are the keys of
/// `UpstreamStats.evictions` and of the `reason` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum EvictReason {
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
    /// A background dial finished after checkouts had filled the pool: the
    /// connection had no slot and was closed unused.
    Surplus,
    /// An operator asked for new connections (`lessor reconnect`): one
    /// dialed before was closed at its return, or at once when idle.
    Reconnect,
    /// Its endpoint's server is no longer of the role the upstream wants
    /// (a primary demoted, a replica promoted), or refused a write as
    /// read-only.
    RoleChanged,
    /// The fleet budget lowered this sidecar's cap: an idle connection
    /// above it closed at once, a leased one at its return.
    FleetCap,
}

impl EvictReason {
    /// Every reason, in a stable order.
    pub(crate) const ALL: [EvictReason; 15] = [
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
        Self::Surplus,
        Self::Reconnect,
        Self::RoleChanged,
        Self::FleetCap,
    ];

    /// The wire and label name.
    pub(crate) fn as_str(self) -> &'static str {
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
            Self::Surplus => "surplus",
            Self::Reconnect => "reconnect",
            Self::RoleChanged => "role_changed",
            Self::FleetCap => "fleet_cap",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Monotonic counters and live gauges. Relaxed ordering throughout: each
/// value is independent and read only for reporting.
#[derive(Debug)]
pub(crate) struct Counters {
    /// Leases handed a connection.
    pub leases_granted: AtomicU64,
    /// Dials that produced a connection.
    pub connections_created: AtomicU64,
    /// Dials that reached the network and failed.
    pub connect_errors: AtomicU64,
    /// The same, by reason (`CONNECT_ERROR_REASONS` order).
    connect_error_reasons: [AtomicU64; CONNECT_ERROR_REASONS.len()],
    /// Checks run (peek, plus probe when due).
    pub health_checks: AtomicU64,
    /// Passes over the endpoints' roles (`role: primary` or `replica`).
    pub role_checks: AtomicU64,
    /// Checks that failed (and evicted their connection).
    pub health_check_failures: AtomicU64,
    /// Checkouts that hit their deadline.
    pub checkout_timeouts: AtomicU64,
    evictions: [AtomicU64; EvictReason::ALL.len()],
    /// Connections held by live leases (gauge).
    pub leased: AtomicU32,
    /// Checkouts in progress (gauge).
    pub waiting: AtomicU32,
    /// Connections currently out of the engine's idle list, for any reason:
    /// leased, being checked, held by a sweep (gauge).
    pub out: AtomicU32,
    /// Bytes written to the upstream by leases.
    pub bytes_to_upstream: AtomicU64,
    /// Bytes read from the upstream and handed to clients.
    pub bytes_to_client: AtomicU64,
    /// Lease durations of leases whose connection went back to the pool.
    pub lease_returned: Histogram,
    /// Lease durations of leases whose connection was closed.
    pub lease_evicted: Histogram,
    /// Time checkouts took, successful or not.
    pub checkout_wait: Histogram,
    /// Exchanges, by outcome (`EXCHANGE_OUTCOMES` order).
    pub exchanges: [AtomicU64; EXCHANGE_OUTCOMES.len()],
    /// How long Exchanges took, checkout included, successful or not.
    pub exchange_duration: Histogram,
    /// Transactions left open by a lease or Exchange, rolled back by lessor.
    pub rollbacks: AtomicU64,
    /// How long restoring a used session took (Redis undo, PostgreSQL
    /// rollback and reset), successful or not.
    pub session_restore: Histogram,
}

/// The outcomes an Exchange is counted under.
pub(crate) const EXCHANGE_OUTCOMES: [&str; 5] = [
    "ok",
    "invalid",
    "checkout_failed",
    "timeout",
    "upstream_error",
];

impl Counters {
    /// Counts one failed dial under its reason.
    pub(crate) fn connect_error(&self, reason: &str) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = CONNECT_ERROR_REASONS.iter().position(|r| *r == reason) {
            self.connect_error_reasons[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Failed dials counted under `reason`.
    pub(crate) fn connect_errors_for(&self, reason: &str) -> u64 {
        CONNECT_ERROR_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.connect_error_reasons[i].load(Ordering::Relaxed))
    }

    /// Counts one Exchange and its duration.
    pub(crate) fn exchanged(&self, outcome: &str, took: std::time::Duration) {
        if let Some(i) = EXCHANGE_OUTCOMES.iter().position(|o| *o == outcome) {
            self.exchanges[i].fetch_add(1, Ordering::Relaxed);
        }
        self.exchange_duration.observe(took);
    }
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            leases_granted: AtomicU64::new(0),
            connections_created: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            connect_error_reasons: Default::default(),
            health_checks: AtomicU64::new(0),
            role_checks: AtomicU64::new(0),
            health_check_failures: AtomicU64::new(0),
            checkout_timeouts: AtomicU64::new(0),
            evictions: Default::default(),
            leased: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            out: AtomicU32::new(0),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            lease_returned: Histogram::new(LEASE_BUCKETS),
            lease_evicted: Histogram::new(LEASE_BUCKETS),
            checkout_wait: Histogram::new(WAIT_BUCKETS),
            exchanges: Default::default(),
            exchange_duration: Histogram::new(LEASE_BUCKETS),
            rollbacks: AtomicU64::new(0),
            session_restore: Histogram::new(WAIT_BUCKETS),
        }
    }
}

/// Upper bounds (seconds) for lease durations: from a pipelined request to a
/// lease held for minutes.
pub(super) const LEASE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// Upper bounds (seconds) for checkout waits: from a warm idle connection to
/// a checkout timeout.
pub(super) const WAIT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// A lock-free fixed-bucket histogram: one atomic add per bucket, count and
/// sum on the hot path; the exporter reads it on scrape.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// One slot per bound, plus one for `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// A histogram read out: per-bucket (not cumulative) counts with their upper
/// bounds, the last being `+Inf`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HistogramSnapshot {
    /// Sum of observations, in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
    /// `(upper bound, observations in this bucket)`.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending, in seconds).
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the histogram.
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
            buckets,
        }
    }
}

impl Counters {
    /// Counts one closed connection.
    pub(crate) fn evicted(&self, reason: EvictReason) {
        self.evictions[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Closed connections so far, by reason.
    pub(crate) fn evictions(&self, reason: EvictReason) -> u64 {
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

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets, vec![(0.001, 2), (0.01, 1), (f64::INFINITY, 1)]);
        assert!((s.sum - 1.0065).abs() < 1e-9, "{}", s.sum);
    }
}
