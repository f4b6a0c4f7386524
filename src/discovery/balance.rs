//! An upstream's endpoints: which ones exist, which may get new connections,
//! how many connections each holds, and outlier ejection. Written by a
//! discovery source (or fixed, for a static `address`); read by the dialer
//! (which endpoint next), the pool (which connections must go), `Stats` and
//! metrics.
//!
//! Invariants: an endpoint's `connections` counts exactly the open
//! connections to it (each holds an [`EndpointRef`], which counts on drop);
//! a retired endpoint (gone, not ready, terminating, or known to have
//! another role than the upstream wants) is never dialed, and its
//! connections are never returned to the pool.
//!
//! Roles: an endpoint's role is unknown until a dial or a check asks its
//! server. An unknown one may be dialed (the dial asks); a connection is
//! handed out only once its endpoint's role is known to match.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::{OutlierConfig, Role};
use crate::protocol::role::ServerRole;

const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_CAP: Duration = Duration::from_secs(1);

/// What a discovery source reports about one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Discovered {
    /// `ip:port` (or `host:port`, resolved at dial time).
    pub target: String,
    /// May get new connections (ready and not terminating).
    pub ready: bool,
    /// Being shut down: no new connections, and its idle ones close.
    pub terminating: bool,
}

/// One endpoint.
#[derive(Debug)]
pub(crate) struct Endpoint {
    target: String,
    ready: AtomicBool,
    terminating: AtomicBool,
    removed: AtomicBool,
    connections: AtomicU32,
    /// Connections out of the idle list (leased or being checked).
    out: AtomicU32,
    dialing: AtomicU32,
    health: Mutex<Health>,
    /// The last role its server reported: 0 unknown, 1 primary, 2 replica.
    role: AtomicU8,
    /// The role the upstream wants (`any`: roles are not asked).
    wanted: Role,
    /// When it last became a primary, in its set's order of such events.
    primary_seq: std::sync::atomic::AtomicU64,
    /// The set's primary of longest standing (its `primary_seq`; 0: none).
    leader: Arc<std::sync::atomic::AtomicU64>,
}

/// Why an endpoint may no longer hold pooled connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retirement {
    /// Gone from discovery, not ready, or terminating.
    Removed,
    /// Its server's role is not the one the upstream wants.
    WrongRole,
}

fn role_code(role: Option<ServerRole>) -> u8 {
    match role {
        None => 0,
        Some(ServerRole::Primary) => 1,
        Some(ServerRole::Replica) => 2,
    }
}

/// Whether a server of `role` may serve an upstream that wants `wanted`.
pub(crate) fn role_fits(wanted: Role, role: ServerRole) -> bool {
    match wanted {
        Role::Any => true,
        Role::Primary => role == ServerRole::Primary,
        Role::Replica => role == ServerRole::Replica,
    }
}

/// Failure bookkeeping; the mutex is held for arithmetic only.
#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    /// Dial backoff: no dial before this.
    not_before: Option<Instant>,
    last_error: Option<String>,
}

/// A point-in-time view of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointSnapshot {
    /// `ip:port`.
    pub target: String,
    /// May get new connections.
    pub ready: bool,
    /// Being shut down.
    pub terminating: bool,
    /// Ejected for failing.
    pub ejected: bool,
    /// Open connections.
    pub connections: u32,
    /// Idle connections.
    pub idle: u32,
    /// Its server's last reported role (`None`: not asked yet, or the
    /// upstream's role is `any`).
    pub role: Option<ServerRole>,
}

impl Endpoint {
    fn new(d: &Discovered, wanted: Role, leader: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self {
            target: d.target.clone(),
            ready: AtomicBool::new(d.ready),
            terminating: AtomicBool::new(d.terminating),
            removed: AtomicBool::new(false),
            connections: AtomicU32::new(0),
            out: AtomicU32::new(0),
            dialing: AtomicU32::new(0),
            health: Mutex::new(Health::default()),
            role: AtomicU8::new(0),
            wanted,
            primary_seq: std::sync::atomic::AtomicU64::new(0),
            leader,
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What to dial.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Gone, not ready, terminating, or of the wrong role: no new
    /// connections, and its connections leave the pool.
    pub(crate) fn retired(&self) -> bool {
        self.retirement().is_some()
    }

    /// Why it is retired, if it is.
    pub(crate) fn retirement(&self) -> Option<Retirement> {
        if self.removed.load(Ordering::Acquire)
            || !self.ready.load(Ordering::Acquire)
            || self.terminating.load(Ordering::Acquire)
        {
            return Some(Retirement::Removed);
        }
        match self.role() {
            Some(role) if !role_fits(self.wanted, role) => Some(Retirement::WrongRole),
            // A split brain: only the primary of longest standing serves.
            Some(ServerRole::Primary)
                if self.wanted == Role::Primary
                    && self.primary_seq.load(Ordering::Acquire)
                        != self.leader.load(Ordering::Acquire) =>
            {
                Some(Retirement::WrongRole)
            }
            _ => None,
        }
    }

    /// Present, and its server last said it is the primary.
    fn is_primary(&self) -> bool {
        !self.removed.load(Ordering::Acquire) && self.role() == Some(ServerRole::Primary)
    }

    /// The role the upstream wants of it.
    pub(crate) fn wanted(&self) -> Role {
        self.wanted
    }

    /// Its server's last reported role.
    pub(crate) fn role(&self) -> Option<ServerRole> {
        match self.role.load(Ordering::Acquire) {
            1 => Some(ServerRole::Primary),
            2 => Some(ServerRole::Replica),
            _ => None,
        }
    }

    /// Records the role its server reported; returns the previous one when
    /// it changed (from unknown too).
    pub(crate) fn observe_role(&self, role: ServerRole) -> Option<Option<ServerRole>> {
        let before = self.role.swap(role_code(Some(role)), Ordering::AcqRel);
        let before = match before {
            1 => Some(ServerRole::Primary),
            2 => Some(ServerRole::Replica),
            _ => None,
        };
        (before != Some(role)).then_some(before)
    }

    /// Open connections to it (leased, idle, or being checked).
    pub(crate) fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Ejected right now.
    pub(crate) fn ejected(&self, now: Instant) -> bool {
        self.health().ejected_until.is_some_and(|t| t > now)
    }

    /// Counts a connection leaving the idle list.
    pub(crate) fn checked_out(&self) {
        self.out.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection back in the idle list (or closed while out).
    pub(crate) fn checked_in(&self) {
        self.out.fetch_sub(1, Ordering::Relaxed);
    }

    /// A dial or probe succeeded: the failure streak ends.
    pub(crate) fn record_success(&self) {
        let mut h = self.health();
        h.consecutive_failures = 0;
        h.ejections = 0;
        h.ejected_until = None;
        h.not_before = None;
    }

    /// A dial or probe failed. Returns true when this failure ejected it.
    pub(crate) fn record_failure(&self, error: &str, outlier: &OutlierConfig, dial: bool) -> bool {
        let now = Instant::now();
        let mut h = self.health();
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        h.last_error = Some(error.to_owned());
        if dial {
            let exp = h.consecutive_failures.saturating_sub(1).min(16);
            h.not_before = Some(now + BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP));
        }
        if h.consecutive_failures >= outlier.consecutive_failures
            && h.ejected_until.is_none_or(|t| t <= now)
        {
            let exp = h.ejections.min(16);
            let length = outlier
                .base_ejection
                .saturating_mul(1 << exp)
                .min(outlier.max_ejection);
            h.ejections = h.ejections.saturating_add(1);
            h.ejected_until = Some(now + length);
            return true;
        }
        false
    }

    /// When the dial backoff ends, if it is on.
    pub(crate) fn backoff_until(&self, now: Instant) -> Option<Instant> {
        self.health().not_before.filter(|t| *t > now)
    }

    /// Reserves the next dial after a failure (one probe dial at a time).
    fn hold_dials(&self, now: Instant) {
        let mut h = self.health();
        if h.consecutive_failures > 0 {
            let exp = h.consecutive_failures.saturating_sub(1).min(16);
            h.not_before = Some(now + BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP));
        }
    }

    /// The last failure, for error details.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.health().last_error.clone()
    }

    fn snapshot(&self, now: Instant) -> EndpointSnapshot {
        let connections = self.connections.load(Ordering::Relaxed);
        EndpointSnapshot {
            target: self.target.clone(),
            ready: self.ready.load(Ordering::Relaxed),
            terminating: self.terminating.load(Ordering::Relaxed),
            ejected: self.ejected(now),
            connections,
            idle: connections.saturating_sub(self.out.load(Ordering::Relaxed)),
            role: self.role(),
        }
    }
}

/// A connection's hold on its endpoint: counts it while the connection lives.
#[derive(Debug)]
pub(crate) struct EndpointRef(Arc<Endpoint>);

impl EndpointRef {
    /// Counts one more connection to `endpoint`.
    pub(crate) fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.connections.fetch_add(1, Ordering::Relaxed);
        Self(endpoint)
    }

    /// The endpoint.
    pub(crate) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for EndpointRef {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A dial in progress to one endpoint; keeps it counted while it lasts so
/// concurrent dials spread.
#[derive(Debug)]
pub(crate) struct Dialing(Arc<Endpoint>);

impl Dialing {
    /// The endpoint being dialed.
    pub(crate) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for Dialing {
    fn drop(&mut self) {
        self.0.dialing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoEndpoint {
    /// Discovery has produced no usable endpoint (none ready, or not synced).
    NoneReady,
    /// Every usable endpoint's dial backoff is on.
    Backoff {
        /// Time until the first one reopens.
        retry_in: Duration,
        /// The failure that started it.
        last: String,
    },
}

/// How discovery is doing, for `/readyz?verbose` and logs.
#[derive(Debug, Clone, Default)]
pub(crate) struct SourceStatus {
    /// The first successful sync happened.
    pub synced: bool,
    /// The last attempt failed (the last known endpoints are kept).
    pub failing: bool,
    /// Human-readable state.
    pub detail: String,
}

/// The endpoints of one upstream.
#[derive(Debug)]
pub(crate) struct EndpointSet {
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    status: Mutex<SourceStatus>,
    /// Wakes the pool's maintenance loop when endpoints change, so retired
    /// endpoints lose their idle connections at once.
    changed: Notify,
    outlier: OutlierConfig,
    /// The role the upstream wants of its endpoints.
    wanted: Role,
    /// Wakes the pool's role check now (a write refused as read-only).
    recheck: Notify,
    /// A round of role probes is under way.
    probing: AtomicBool,
    /// Bumped each time an endpoint is seen to become a primary: among
    /// several primaries (a split brain), the one that has been primary
    /// longest serves.
    primary_seq: std::sync::atomic::AtomicU64,
    /// That one's `primary_seq` (0: no primary known), shared with every
    /// endpoint so each can tell whether it is retired.
    leader: Arc<std::sync::atomic::AtomicU64>,
}

impl EndpointSet {
    /// An empty set waiting for its discovery source.
    #[cfg(test)]
    pub(crate) fn discovered(outlier: OutlierConfig, detail: &str) -> Arc<Self> {
        Self::with_role(outlier, detail, Role::Any)
    }

    /// An empty set whose endpoints serve only servers of `wanted`'s role.
    pub(crate) fn with_role(outlier: OutlierConfig, detail: &str, wanted: Role) -> Arc<Self> {
        Arc::new(Self {
            endpoints: RwLock::new(Vec::new()),
            status: Mutex::new(SourceStatus {
                synced: false,
                failing: false,
                detail: detail.to_owned(),
            }),
            changed: Notify::new(),
            outlier,
            wanted,
            recheck: Notify::new(),
            probing: AtomicBool::new(false),
            primary_seq: std::sync::atomic::AtomicU64::new(0),
            leader: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// Elects the primary of longest standing among those present.
    fn elect_leader(&self) {
        let first = self
            .read()
            .iter()
            .filter(|ep| ep.is_primary())
            .map(|ep| ep.primary_seq.load(Ordering::Acquire))
            .min()
            .unwrap_or(0);
        self.leader.store(first, Ordering::Release);
    }

    /// Claims the next round of role probes; false while one runs.
    pub(crate) fn begin_probes(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    /// The round of role probes is over.
    pub(crate) fn end_probes(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// A fixed single endpoint (a static `address`).
    #[cfg(test)]
    pub(crate) fn fixed(address: &str, outlier: OutlierConfig) -> Arc<Self> {
        Self::listed(&[address.to_owned()], outlier, Role::Any, "static address")
    }

    /// A fixed list of endpoints (`discovery.static`, or one `address`).
    pub(crate) fn listed(
        targets: &[String],
        outlier: OutlierConfig,
        wanted: Role,
        detail: &str,
    ) -> Arc<Self> {
        let set = Self::with_role(outlier, detail, wanted);
        set.update(
            targets
                .iter()
                .map(|target| Discovered {
                    target: target.clone(),
                    ready: true,
                    terminating: false,
                })
                .collect(),
        );
        set
    }

    /// The role the upstream wants.
    pub(crate) fn wanted(&self) -> Role {
        self.wanted
    }

    /// Records the role `endpoint`'s server reported. A change is logged
    /// (an event of the current span: the dial's or the role check's) and,
    /// when it retires the endpoint or brings it back, wakes the pool so
    /// idle connections of the wrong role close at once.
    pub(crate) fn observe_role(&self, endpoint: &Endpoint, role: ServerRole) {
        let Some(before) = endpoint.observe_role(role) else {
            return;
        };
        if role == ServerRole::Primary {
            let seq = self.primary_seq.fetch_add(1, Ordering::Relaxed) + 1;
            endpoint.primary_seq.store(seq, Ordering::Release);
        }
        self.elect_leader();
        match before {
            None => {
                tracing::debug!(endpoint = %endpoint.target(), role = role.as_str(), "endpoint role learned")
            }
            Some(before) => tracing::info!(
                endpoint = %endpoint.target(),
                from = before.as_str(),
                to = role.as_str(),
                wanted = self.wanted.as_str(),
                "endpoint role changed"
            ),
        }
        if role == ServerRole::Primary && self.primaries() > 1 {
            let primaries: Vec<String> = self
                .read()
                .iter()
                .filter(|ep| ep.is_primary())
                .map(|ep| ep.target.clone())
                .collect();
            tracing::warn!(
                primaries = %primaries.join(", "),
                "more than one endpoint reports being the primary (a split brain?); new connections go to the one that was primary first"
            );
        }
        self.changed.notify_one();
    }

    /// How many present endpoints last reported being the primary (more
    /// than one: a split brain, shown in `/readyz?verbose`).
    pub(crate) fn primaries(&self) -> usize {
        self.read().iter().filter(|ep| ep.is_primary()).count()
    }

    /// `endpoint` could not be reached: what its server said before no
    /// longer counts (a dead primary is not a primary, and must not hold
    /// the place of a promoted one).
    pub(crate) fn forget_role(&self, endpoint: &Endpoint) {
        if self.wanted != Role::Any && endpoint.role.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!(endpoint = %endpoint.target(), "endpoint unreachable; its role is unknown until it answers");
            self.elect_leader();
            self.changed.notify_one();
        }
    }

    /// Asks the pool to check its endpoints' roles now.
    pub(crate) fn request_recheck(&self) {
        self.recheck.notify_one();
    }

    /// Resolves when a role check was asked for.
    pub(crate) async fn recheck_requested(&self) {
        self.recheck.notified().await;
    }

    /// Every endpoint now, for the role check.
    pub(crate) fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.read().clone()
    }

    /// The outlier settings.
    pub(crate) fn outlier(&self) -> &OutlierConfig {
        &self.outlier
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Endpoint>>> {
        self.endpoints.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the set with what discovery found: new endpoints are added,
    /// known ones updated, missing ones removed. Marks the source synced.
    pub(crate) fn update(&self, found: Vec<Discovered>) {
        {
            let mut list = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
            for ep in list.iter() {
                if !found.iter().any(|d| d.target == ep.target) {
                    ep.removed.store(true, Ordering::Release);
                }
            }
            list.retain(|ep| !ep.removed.load(Ordering::Acquire));
            for d in &found {
                match list.iter().find(|ep| ep.target == d.target) {
                    Some(ep) => {
                        ep.ready.store(d.ready, Ordering::Release);
                        ep.terminating.store(d.terminating, Ordering::Release);
                    }
                    None => list.push(Arc::new(Endpoint::new(d, self.wanted, self.leader.clone()))),
                }
            }
        }
        self.elect_leader();
        {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.synced = true;
            status.failing = false;
        }
        self.changed.notify_one();
    }

    /// Records the source's state (`failing`: the last attempt failed and
    /// the last known endpoints are kept).
    pub(crate) fn set_status(&self, failing: bool, detail: String) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.failing = failing;
        status.detail = detail;
    }

    /// The source's state.
    pub(crate) fn status(&self) -> SourceStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether some endpoint may take new connections (present, ready, not
    /// terminating) and, for an upstream that wants a role, is known to have
    /// it. With none, the upstream cannot serve a lease, whatever its pool
    /// still holds.
    pub(crate) fn any_usable(&self) -> bool {
        self.read()
            .iter()
            .any(|ep| !ep.retired() && (self.wanted == Role::Any || ep.role().is_some()))
    }

    /// Resolves when the set changed since the last call.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Every endpoint, for `Stats` and metrics.
    pub(crate) fn snapshot(&self) -> Vec<EndpointSnapshot> {
        let now = Instant::now();
        self.read().iter().map(|ep| ep.snapshot(now)).collect()
    }

    /// Picks the endpoint for the next dial: among usable ones (not retired),
    /// those not ejected and not backing off, the one with the fewest
    /// connections (dials under way included). When every usable endpoint is
    /// ejected, ejection is ignored (an upstream is better tried than
    /// abandoned).
    pub(crate) fn choose(&self) -> Result<Dialing, NoEndpoint> {
        let now = Instant::now();
        let list = self.read();
        let usable: Vec<&Arc<Endpoint>> = list.iter().filter(|ep| !ep.retired()).collect();
        if usable.is_empty() {
            return Err(NoEndpoint::NoneReady);
        }
        let not_ejected: Vec<&Arc<Endpoint>> = usable
            .iter()
            .copied()
            .filter(|ep| !ep.ejected(now))
            .collect();
        let pool = if not_ejected.is_empty() {
            usable
        } else {
            not_ejected
        };
        let open: Vec<&Arc<Endpoint>> = pool
            .iter()
            .copied()
            .filter(|ep| ep.backoff_until(now).is_none())
            .collect();
        let Some(best) = open.iter().min_by_key(|ep| {
            ep.connections.load(Ordering::Relaxed) + ep.dialing.load(Ordering::Relaxed)
        }) else {
            let first = pool
                .iter()
                .filter_map(|ep| ep.backoff_until(now).map(|t| (t, ep)))
                .min_by_key(|(t, _)| *t);
            let (until, ep) = first.expect("every endpoint in `pool` is backing off");
            return Err(NoEndpoint::Backoff {
                retry_in: until - now,
                last: ep.last_error().unwrap_or_default(),
            });
        };
        best.hold_dials(now);
        best.dialing.fetch_add(1, Ordering::Relaxed);
        Ok(Dialing(Arc::clone(best)))
    }

    /// The earliest time a backing-off endpoint reopens, for the refill loop.
    pub(crate) fn next_reopen(&self) -> Option<Instant> {
        let now = Instant::now();
        self.read()
            .iter()
            .filter_map(|ep| ep.backoff_until(now))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(target: &str, ready: bool, terminating: bool) -> Discovered {
        Discovered {
            target: target.into(),
            ready,
            terminating,
        }
    }

    fn outlier() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(40),
        }
    }

    #[test]
    fn new_connections_go_to_the_least_loaded_usable_endpoint() {
        let set = EndpointSet::discovered(outlier(), "test");
        set.update(vec![
            ep("a:1", true, false),
            ep("b:1", true, false),
            ep("c:1", false, false),
            ep("d:1", true, true),
        ]);
        let mut refs = Vec::new();
        let mut chosen = Vec::new();
        for _ in 0..4 {
            let d = set.choose().unwrap();
            chosen.push(d.endpoint().target().to_owned());
            refs.push(EndpointRef::new(d.endpoint().clone()));
        }
        chosen.sort();
        assert_eq!(
            chosen,
            ["a:1", "a:1", "b:1", "b:1"],
            "spread evenly, never to not-ready or terminating"
        );
        let snap = set.snapshot();
        assert_eq!(
            snap.iter().find(|s| s.target == "a:1").unwrap().connections,
            2
        );
        drop(refs);
        assert!(set.snapshot().iter().all(|s| s.connections == 0));
    }

    #[test]
    fn updates_add_change_and_remove() {
        let set = EndpointSet::discovered(outlier(), "test");
        assert!(!set.status().synced);
        set.update(vec![ep("a:1", true, false), ep("b:1", true, false)]);
        assert!(set.status().synced);
        let a = set.read()[0].clone();
        set.update(vec![ep("b:1", false, false), ep("c:1", true, false)]);
        assert!(a.retired(), "a removed");
        let targets: Vec<_> = set
            .snapshot()
            .into_iter()
            .map(|s| (s.target, s.ready))
            .collect();
        assert_eq!(
            targets,
            [("b:1".to_owned(), false), ("c:1".to_owned(), true)]
        );
        assert_eq!(set.choose().unwrap().endpoint().target(), "c:1");
        set.update(vec![]);
        assert_eq!(set.choose().unwrap_err(), NoEndpoint::NoneReady);
    }

    #[test]
    fn failing_endpoints_are_ejected_and_then_ignored_only_when_all_are() {
        let set = EndpointSet::discovered(outlier(), "test");
        set.update(vec![ep("a:1", true, false), ep("b:1", true, false)]);
        let a = set
            .read()
            .iter()
            .find(|e| e.target == "a:1")
            .unwrap()
            .clone();
        assert!(!a.record_failure("refused", &outlier(), false));
        assert!(
            a.record_failure("refused", &outlier(), false),
            "ejected on the second failure"
        );
        assert!(a.ejected(Instant::now()));
        for _ in 0..5 {
            assert_eq!(set.choose().unwrap().endpoint().target(), "b:1");
        }
        let b = set
            .read()
            .iter()
            .find(|e| e.target == "b:1")
            .unwrap()
            .clone();
        b.record_failure("refused", &outlier(), false);
        b.record_failure("refused", &outlier(), false);
        // Both ejected: both are tried rather than none.
        assert!(set.choose().is_ok());
        a.record_success();
        assert!(!a.ejected(Instant::now()));
    }

    #[test]
    fn ejections_double_up_to_the_cap() {
        let o = outlier();
        let set = EndpointSet::discovered(o.clone(), "test");
        set.update(vec![ep("a:1", true, false)]);
        let a = set.read()[0].clone();
        let mut lengths = Vec::new();
        for _ in 0..4 {
            a.health().ejected_until = None;
            a.record_failure("x", &o, false);
            a.record_failure("x", &o, false);
            let until = a.health().ejected_until.unwrap();
            lengths.push((until - Instant::now()).as_secs_f64().round() as u64);
        }
        assert_eq!(lengths, [10, 20, 40, 40]);
    }

    #[test]
    fn dial_failures_back_off_per_endpoint() {
        let set = EndpointSet::discovered(outlier(), "test");
        set.update(vec![ep("a:1", true, false), ep("b:1", true, false)]);
        let a = set.read()[0].clone();
        a.record_failure("refused", &outlier(), true);
        // a backs off; b still takes dials.
        assert_eq!(set.choose().unwrap().endpoint().target(), "b:1");
        let fixed = EndpointSet::fixed("h:1", outlier());
        let only = fixed.read()[0].clone();
        only.record_failure("refused", &outlier(), true);
        assert!(matches!(fixed.choose(), Err(NoEndpoint::Backoff { .. })));
    }
}
