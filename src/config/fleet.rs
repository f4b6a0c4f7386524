//! The `fleet:` block of an upstream: one connection budget shared by every
//! sidecar of a group (see `crate::fleet` for how it is kept).

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// A budget of connections to one upstream that every sidecar of a group
/// shares, coordinated through `coordination.k8s.io/v1` Leases.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The most connections all sidecars of the group may hold to this
    /// upstream together. `pool.max_size` stays the per-pod ceiling.
    pub budget: u32,
    /// The group's name (a Lease label value and part of each Lease name).
    /// Default: the upstream's name, lowercased with `_` as `-`; groups are
    /// scoped to the pod's namespace.
    #[serde(default)]
    pub group: Option<String>,
    /// How often a sidecar renews its Lease. Default 5s.
    #[serde(default = "default_renew", with = "super::humantime_serde")]
    pub renew_interval: Duration,
    /// How long a Lease counts after its last renewal (whole seconds, at
    /// least twice `renew_interval`). Default 15s.
    #[serde(default = "default_lease", with = "super::humantime_serde")]
    pub lease_duration: Duration,
}

fn default_renew() -> Duration {
    Duration::from_secs(5)
}

fn default_lease() -> Duration {
    Duration::from_secs(15)
}

impl FleetConfig {
    /// The group name in force: the configured one, else derived from the
    /// upstream's name.
    pub fn group_for(&self, upstream: &str) -> String {
        match &self.group {
            Some(group) => group.clone(),
            None => derived_group(upstream),
        }
    }

    /// Ranges and the shape of the group name; `at` is the upstream's path.
    pub(super) fn validate(&self, at: &str, upstream: &str) -> Result<(), ConfigError> {
        let at = format!("{at}.fleet");
        if self.budget == 0 {
            return Err(invalid(format!("{at}.budget"), "must be at least 1"));
        }
        if self.budget > 1_000_000 {
            return Err(invalid(format!("{at}.budget"), "must be at most 1000000"));
        }
        let group = self.group_for(upstream);
        if let Err(problem) = check_group(&group) {
            let field = if self.group.is_some() {
                format!("{at}.group")
            } else {
                format!("{at}.group (derived from the upstream's name)")
            };
            return Err(invalid(field, format!("`{group}`: {problem}")));
        }
        if self.renew_interval < Duration::from_millis(100) {
            return Err(invalid(
                format!("{at}.renew_interval"),
                "must be at least 100ms",
            ));
        }
        if self.lease_duration.subsec_nanos() != 0 || self.lease_duration.is_zero() {
            return Err(invalid(
                format!("{at}.lease_duration"),
                "must be a whole number of seconds, at least 1s (Lease leaseDurationSeconds)",
            ));
        }
        if self.lease_duration < self.renew_interval * 2 {
            return Err(invalid(
                format!("{at}.lease_duration"),
                format!(
                    "must be at least twice renew_interval ({:?}): one late renewal must not expire a live sidecar",
                    self.renew_interval
                ),
            ));
        }
        Ok(())
    }
}

/// The default group: a label value and Lease name part made of the
/// upstream's name.
fn derived_group(upstream: &str) -> String {
    let lowered: String = upstream
        .chars()
        .map(|c| match c {
            '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    lowered
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// A group is a label value and part of a Lease name: 1-40 characters
/// (room for `lessor-`, `-` and a pod name), lowercase letters, digits, `-`
/// and `.`, starting and ending with a letter or digit.
fn check_group(group: &str) -> Result<(), &'static str> {
    let ok_chars = group
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    let ends = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if group.is_empty() || group.len() > 40 || !ok_chars {
        return Err(
            "must be 1-40 characters of lowercase letters, digits, `-` and `.` (a label value and part of a Lease name)",
        );
    }
    if !ends(group.bytes().next()) || !ends(group.bytes().last()) {
        return Err("must start and end with a letter or digit");
    }
    // Each `.`-separated part of a Lease name must itself start and end
    // with a letter or digit (a DNS subdomain).
    if group.contains("..") || group.contains(".-") || group.contains("-.") {
        return Err("must not have `..`, `.-` or `-.` (the Lease name is a DNS subdomain)");
    }
    Ok(())
}
