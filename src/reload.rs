//! Hot reload: SIGHUP, or a change of the config file (a ConfigMap update
//! arrives as an atomic symlink swap; the file's content is compared every
//! two seconds, which sees it whatever the mechanism), re-reads and
//! validates the config. An invalid one is logged with its field error and
//! ignored: the running config stays. Upstreams change live (new ones warm
//! before they take their name, changed ones get a new pool, removed ones
//! drain); a reload whose new pool cannot open a session (a wrong password,
//! an unreachable address) while the pool it replaces serves is refused as a
//! whole and counted `failed`; what cannot change without a restart (listen
//! addresses, worker threads, gRPC limits, telemetry, shutdown timing) is
//! logged as "restart required" and otherwise ignored.
//!
//! `lessor_config_info{hash}` is the hash of the file in force: a refused
//! file (invalid or failed) does not change it, and is not tried again until
//! its content changes or SIGHUP asks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pool::PoolSet;

/// How often the file is compared with what was loaded.
const POLL: Duration = Duration::from_secs(2);

/// The results a reload is counted under.
pub(crate) const RESULTS: [&str; 4] = ["ok", "invalid", "failed", "restart_required"];

/// Reload accounting for `/metrics`.
#[derive(Debug)]
pub(crate) struct Reloads {
    counts: [AtomicU64; RESULTS.len()],
    /// The hash of the config file in force (the last one applied).
    hash: Mutex<String>,
}

impl Reloads {
    /// Accounting for a sidecar started from `path` (none: no file).
    pub(crate) fn new(path: Option<&Path>) -> Self {
        let hash = path
            .and_then(|p| std::fs::read(p).ok())
            .map(|bytes| digest(&bytes))
            .unwrap_or_default();
        Self {
            counts: Default::default(),
            hash: Mutex::new(hash),
        }
    }

    /// Reloads counted under `result`.
    pub(crate) fn count(&self, result: &str) -> u64 {
        RESULTS
            .iter()
            .position(|r| *r == result)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    /// The running config's hash (empty when not loaded from a file).
    pub(crate) fn hash(&self) -> String {
        self.hash
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn counted(&self, result: &str) {
        if let Some(i) = RESULTS.iter().position(|r| *r == result) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn set_hash(&self, hash: String) {
        *self.hash.lock().unwrap_or_else(PoisonError::into_inner) = hash;
    }
}

/// A short, stable fingerprint of the config file's bytes (FNV-1a, 64 bits):
/// enough to tell which config a pod runs, not a security measure.
fn digest(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Watches for SIGHUP and for changes of `path`, and reloads, until `stop`.
pub(crate) async fn watch(
    path: PathBuf,
    mut running: Config,
    pools: Arc<PoolSet>,
    reloads: Arc<Reloads>,
    stop: CancellationToken,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the config file is still watched");
            None
        }
    };
    // The last content tried, applied or not: a refused file is not tried
    // again every poll, only when it changes or on SIGHUP.
    let mut tried = reloads.hash();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            () = stop.cancelled() => return,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
            _ = tick.tick() => false,
        };
        let Ok(bytes) = std::fs::read(&path) else {
            if forced {
                tracing::warn!(path = %path.display(), "config reload: cannot read the file; the running config stays");
                reloads.counted("invalid");
            }
            continue;
        };
        let hash = digest(&bytes);
        if !forced && hash == tried {
            continue;
        }
        tried = hash.clone();
        if let Some(config) = reload(&path, &running, &pools, &reloads).await {
            running = config;
            reloads.set_hash(hash);
        }
    }
}

/// One reload; the config now running when it was applied.
async fn reload(
    path: &Path,
    running: &Config,
    pools: &PoolSet,
    reloads: &Reloads,
) -> Option<Config> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "config reload: invalid; the running config stays");
            reloads.counted("invalid");
            return None;
        }
    };
    // A new pool gets its checkout timeout plus its connect timeout to warm.
    let warm_for = config
        .upstreams
        .iter()
        .map(|u| u.pool.checkout_timeout + u.pool.connect_timeout)
        .max()
        .unwrap_or_default();
    let done = match pools.reload(&config.upstreams, warm_for).await {
        Ok(done) => done,
        Err(refused) => {
            for (upstream, why) in &refused.not_warm {
                tracing::error!(
                    upstream = %upstream,
                    error = %why,
                    warm_for = ?warm_for,
                    "config reload: the new pool cannot open a session; the running config stays"
                );
            }
            reloads.counted("failed");
            return None;
        }
    };
    let fixed = restart_required(running, &config);
    if !fixed.is_empty() {
        tracing::warn!(
            sections = %fixed.join(", "),
            "config reload: these settings need a restart; they keep their running values"
        );
        reloads.counted("restart_required");
    }
    tracing::info!(
        added = ?done.added,
        changed = ?done.changed,
        removed = ?done.removed,
        "config reloaded"
    );
    reloads.counted("ok");
    // Sections that need a restart stay as they run.
    Some(Config {
        upstreams: config.upstreams,
        ..running.clone()
    })
}

/// The sections of `new` that differ from `running` and cannot change live.
fn restart_required(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut fixed = Vec::new();
    if format!("{:?}", running.grpc) != format!("{:?}", new.grpc) {
        fixed.push("grpc");
    }
    if format!("{:?}", running.admin) != format!("{:?}", new.admin) {
        fixed.push("admin");
    }
    if format!("{:?}", running.runtime) != format!("{:?}", new.runtime) {
        fixed.push("runtime");
    }
    if format!("{:?}", running.shutdown) != format!("{:?}", new.shutdown) {
        fixed.push("shutdown");
    }
    if format!("{:?}", running.telemetry) != format!("{:?}", new.telemetry) {
        fixed.push("telemetry");
    }
    // Native listeners are bound at start; their upstreams' pools reload.
    let listeners = |c: &Config| {
        c.upstreams
            .iter()
            .filter_map(|u| {
                u.listen
                    .as_ref()
                    .map(|l| (u.name.clone(), format!("{l:?}")))
            })
            .collect::<Vec<_>>()
    };
    if listeners(running) != listeners(new) {
        fixed.push("upstreams[].listen");
    }
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_and_threads_need_a_restart_upstreams_do_not() {
        let base = "upstreams:\n  - name: a\n    address: 127.0.0.1:6379\n";
        let running = Config::from_yaml(base).unwrap();
        let same = Config::from_yaml(&format!("{base}    pool: {{ max_size: 4 }}\n")).unwrap();
        assert!(restart_required(&running, &same).is_empty());
        let moved = Config::from_yaml(&format!(
            "grpc: {{ listen: \"127.0.0.1:7171\" }}\nruntime: {{ worker_threads: 4 }}\n{base}"
        ))
        .unwrap();
        assert_eq!(restart_required(&running, &moved), ["grpc", "runtime"]);
        assert_eq!(digest(b"a"), digest(b"a"));
        assert_ne!(digest(b"a"), digest(b"b"));
    }
}
