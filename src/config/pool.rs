//! An upstream's pool: sizes and timeouts, keepalive, outlier ejection,
//! health checks and the limits of each lease.

use std::time::Duration;

use serde::Deserialize;

use super::OnAbort;

/// Outlier ejection: an endpoint whose dials or probes fail
/// `consecutive_failures` times in a row gets no new connections for
/// `base_ejection`, doubling while it keeps failing, up to `max_ejection`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row that eject. Default 3.
    pub consecutive_failures: u32,
    /// First ejection. Default 10s.
    #[serde(with = "super::humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection. Default 5m.
    #[serde(with = "super::humantime_serde")]
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// Sizes and timeouts of one upstream's pool.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most connections open at once, leased or idle. Default 32.
    pub max_size: u32,
    /// Idle connections kept warm. Default 4 (or `max_size` when smaller).
    pub min_idle: Option<u32>,
    /// Bound on one dial. Default 1s.
    #[serde(with = "super::humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on a whole checkout (wait, checks, dials). Default 2s.
    #[serde(with = "super::humantime_serde")]
    pub checkout_timeout: Duration,
    /// Checkouts allowed to wait at once; more fail at once. Default 1024.
    pub max_waiters: u32,
    /// Idle connections beyond `min_idle` close after this. Default 5m.
    #[serde(with = "super::humantime_serde")]
    pub idle_timeout: Duration,
    /// Every connection closes after this (minus up to 10% jitter). Default 30m.
    #[serde(with = "super::humantime_serde")]
    pub max_lifetime: Duration,
    /// TCP keepalive on upstream sockets: how a silently vanished upstream
    /// (a node gone, a blackholed route) is noticed without a probe.
    pub tcp_keepalive: KeepaliveConfig,
    /// `TCP_USER_TIMEOUT`: data unacknowledged for this long closes the
    /// socket, so a write into a dead peer fails in seconds, not the
    /// kernel's ~15 minutes of retransmissions. Default 30s; `0s` leaves the
    /// kernel's default.
    #[serde(with = "super::humantime_serde")]
    pub tcp_user_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_size: 32,
            min_idle: None,
            connect_timeout: Duration::from_secs(1),
            checkout_timeout: Duration::from_secs(2),
            max_waiters: 1024,
            idle_timeout: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(1800),
            tcp_keepalive: KeepaliveConfig::default(),
            tcp_user_timeout: Duration::from_secs(30),
        }
    }
}

/// TCP keepalive timing: a dead peer is noticed after about
/// `idle + interval * probes` of silence (default 15s + 3 x 5s = 30s).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveConfig {
    /// Silence before the first probe. Default 15s.
    #[serde(with = "super::humantime_serde")]
    pub idle: Duration,
    /// Between unanswered probes. Default 5s.
    #[serde(with = "super::humantime_serde")]
    pub interval: Duration,
    /// Unanswered probes before the socket is closed. Default 3.
    pub probes: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(15),
            interval: Duration::from_secs(5),
            probes: 3,
        }
    }
}

impl PoolConfig {
    /// `min_idle` with its default applied.
    pub fn min_idle(&self) -> u32 {
        self.min_idle.unwrap_or(4.min(self.max_size))
    }
}

/// Health checks of one upstream's connections.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often idle connections are checked in the background. Default 5s.
    #[serde(with = "super::humantime_serde")]
    pub interval: Duration,
    /// A connection used more recently than this skips the probe on checkout
    /// (the liveness peek always runs). Default 500ms.
    #[serde(with = "super::humantime_serde")]
    pub skip_if_used_within: Duration,
    /// An active check; none by default (the liveness peek only).
    pub probe: Option<ProbeConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            skip_if_used_within: Duration::from_millis(500),
            probe: None,
        }
    }
}

/// A send/expect probe: write `send`, read exactly `expect.len()` bytes, compare.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Bytes to write (YAML double-quoted strings take `\r\n`).
    pub send: String,
    /// Bytes the upstream must answer with, exactly.
    pub expect: String,
    /// Bound on the round trip. Default 200ms.
    #[serde(default = "default_probe_timeout", with = "super::humantime_serde")]
    pub timeout: Duration,
}

pub(super) fn default_probe_timeout() -> Duration {
    Duration::from_millis(200)
}

/// Limits on each lease.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// A lease older than this is revoked (`LEASE_EXPIRED`). Default 5m.
    #[serde(with = "super::humantime_serde")]
    pub max_duration: Duration,
    /// A lease with no bytes either way for this long is revoked
    /// (`LEASE_IDLE`). Default 60s.
    #[serde(with = "super::humantime_serde")]
    pub idle_timeout: Duration,
    /// What a lease that ends without `Release` does with its connection.
    pub on_abort: OnAbort,
    /// On a protocol upstream, how long a RETURN with replies still pending
    /// may wait for them (read and discarded) before the connection is
    /// closed instead. Default 0: closed at once.
    #[serde(with = "super::humantime_serde")]
    pub drain_timeout: Duration,
    /// A lease held longer than this logs one warning naming its holder
    /// and trace (leak detection). Default: off.
    #[serde(with = "super::humantime_serde::option")]
    pub warn_after: Option<Duration>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            max_duration: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            on_abort: OnAbort::Evict,
            drain_timeout: Duration::ZERO,
            warn_after: None,
        }
    }
}
