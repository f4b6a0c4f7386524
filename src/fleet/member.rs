//! One sidecar's membership in a group: its own Lease, a watch on the
//! group's Leases, and the loop that applies `rules.rs` to what it sees and
//! sets the pool's cap ([`FleetCap`]).
//!
//! Order of operations is what keeps the fleet within its budget:
//!
//! - growing: publish the higher claim (an update of our own Lease, with its
//!   `resourceVersion`: a conflict means read again), then read the group's
//!   Leases fresh from the API (a consistent list, not the watch cache); only
//!   if the live claims sum to at most the budget does the cap rise. Of two
//!   sidecars growing at once, the later writer's read sees the earlier
//!   write, so at most one of them can be wrong about room, and it backs off;
//! - shrinking: the cap drops at once; the published claim drops only as far
//!   as what the pool still holds;
//! - a sidecar that cannot renew its Lease for `lease_duration -
//!   renew_interval` stops dialing (cap 0, "fenced"): soon the group stops
//!   counting it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, InitialListStrategy};
use kube::runtime::{WatchStreamExt, reflector as reflect};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::cap::{FleetCap, FleetMode};
use super::lease;
use super::rules::{self, PeerClaim, Step};
use crate::config::FleetConfig;

/// How long a stopping sidecar waits for its connections to close before
/// it deletes its Lease anyway (its process is about to end them).
const DELETE_AFTER: Duration = Duration::from_secs(3);

/// Who this sidecar is in the group.
pub(crate) struct Identity {
    /// `POD_NAME`.
    pub pod: String,
    /// The pod's namespace (where the Leases live).
    pub namespace: String,
}

/// The state of one sidecar's membership.
struct Member {
    api: Api<Lease>,
    upstream: String,
    group: String,
    pod: String,
    name: String,
    config: FleetConfig,
    gate: Arc<FleetCap>,
    /// Our Lease as the API last returned it (its `resourceVersion`).
    lease: Lease,
    /// The claim in our Lease now.
    published: u32,
    /// The claim we may dial under (the cap, before fencing).
    accepted: u32,
    /// The last successful write of our Lease.
    renewed: Instant,
    /// A growth that lost a race waits until then.
    grow_after: Option<Instant>,
    /// A fresh list showed live peers the watch does not: restart it.
    stale_view: bool,
}

/// Runs the membership until `cancel`, then deletes the Lease once the pool
/// has closed its connections (a graceful shutdown hands the claim back at
/// once instead of after the lease duration).
pub(crate) async fn run(
    upstream: String,
    config: FleetConfig,
    gate: Arc<FleetCap>,
    client: Client,
    identity: Identity,
    cancel: CancellationToken,
) {
    let group = config.group_for(&upstream);
    let api: Api<Lease> = Api::namespaced(client, &identity.namespace);
    let name = lease::name(&group, &identity.pod);
    let Some(mut member) = Member::join(
        api.clone(),
        upstream,
        group.clone(),
        identity.pod,
        config,
        gate.clone(),
        &cancel,
    )
    .await
    else {
        return;
    };
    let (mut store, mut stream) = watch(&api, &group);
    // Our own renewals reach the watch every renew_interval: a watch that
    // has said nothing for three of them is stuck, and is started afresh.
    let mut last_event = Instant::now();
    let mut changes = gate.subscribe();
    let renew = member.config.renew_interval;
    let mut next_renew = tokio::time::Instant::now() + renew;
    loop {
        let wake_grow = member
            .grow_after
            .map(tokio::time::Instant::from_std)
            .unwrap_or(next_renew);
        tokio::select! {
            _ = cancel.cancelled() => break,
            event = stream.next() => match event {
                None => break,
                // Only news counts as a live watch: a watch failing over
                // and over keeps a stale view.
                Some(Ok(_)) => last_event = Instant::now(),
                Some(Err(e)) => {
                    tracing::debug!(upstream = %member.upstream, error = %e, "fleet: watch of the group's Leases failed; retrying");
                    member.gate.update_view(|v| v.last_error = Some(format!("watch Leases: {e}")));
                }
            },
            Ok(()) = changes.changed() => {}
            () = tokio::time::sleep_until(next_renew) => {
                member.renew().await;
                next_renew = tokio::time::Instant::now() + renew;
                if last_event.elapsed() > renew * 3 {
                    tracing::warn!(upstream = %member.upstream, "fleet: the watch of the group's Leases went quiet; restarting it");
                    (store, stream) = watch(&api, &group);
                    last_event = Instant::now();
                }
            }
            () = tokio::time::sleep_until(wake_grow), if member.grow_after.is_some() => {
                member.grow_after = None;
            }
        }
        if store
            .wait_until_ready()
            .now_or_never()
            .is_some_and(|ready| ready.is_ok())
        {
            member.step(&store).await;
            if std::mem::take(&mut member.stale_view) {
                tracing::warn!(upstream = %member.upstream, "fleet: the watch of the group's Leases is behind the API; restarting it");
                (store, stream) = watch(&api, &group);
                last_event = Instant::now();
            }
        } else {
            // No view of the group (a watch starting again): only the
            // fencing rule can be applied, and it must be.
            member.fence_if_unrenewed();
        }
    }
    // Graceful end: nothing new, wait (briefly) for the pool to close what
    // it holds, then hand the claim back by deleting the Lease. A pool that
    // a reload retired (not closed) leaves the Lease to its successor.
    gate.set_cap(0);
    let deadline = tokio::time::Instant::now() + DELETE_AFTER;
    while !(gate.is_closed() && gate.held() == 0) && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
    if !gate.is_closed() {
        return;
    }
    match bounded(DELETE_AFTER, api.delete(&name, &DeleteParams::default())).await {
        Ok(_) => {
            tracing::info!(upstream = %member.upstream, lease = %name, "fleet: Lease deleted, claim handed back")
        }
        Err(e) => {
            tracing::warn!(upstream = %member.upstream, lease = %name, error = %e, "fleet: could not delete the Lease; it expires after its duration")
        }
    }
}

/// A reflector on the group's Leases: its store and the stream that feeds it.
fn watch(
    api: &Api<Lease>,
    group: &str,
) -> (
    Store<Lease>,
    futures::stream::BoxStream<'static, Result<watcher::Event<Lease>, watcher::Error>>,
) {
    let selector = format!("{}={group}", lease::GROUP_LABEL);
    let mut watch_config = watcher::Config::default().labels(&selector);
    watch_config.initial_list_strategy = InitialListStrategy::ListWatch;
    let (store, writer) = reflector::store();
    let stream = reflect(writer, watcher::watcher(api.clone(), watch_config))
        .default_backoff()
        .boxed();
    (store, stream)
}

/// Bounds one API call: a hung request must not freeze the loop (fencing
/// and renewals run in it).
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {limit:?}"),
        )))),
    }
}

impl Member {
    /// The longest one API call may take: half a renewal period (at least
    /// 200ms), so a hung call cannot delay fencing past the Lease's expiry.
    fn call_limit(&self) -> Duration {
        (self.config.renew_interval / 2).max(Duration::from_millis(200))
    }

    /// Creates (or adopts, after a restart of the same pod) our Lease with a
    /// claim of 0, retrying until the API answers or `cancel`.
    async fn join(
        api: Api<Lease>,
        upstream: String,
        group: String,
        pod: String,
        config: FleetConfig,
        gate: Arc<FleetCap>,
        cancel: &CancellationToken,
    ) -> Option<Self> {
        let name = lease::name(&group, &pod);
        let mut retry = Duration::from_millis(200);
        loop {
            let fresh = lease::build(&group, &pod, config.lease_duration, 0, SystemTime::now());
            // Each call bounded on its own: a slow API makes joining slow,
            // not impossible.
            let limit = (config.renew_interval / 2).max(Duration::from_millis(200));
            let created = async {
                match bounded(limit, api.create(&PostParams::default(), &fresh)).await {
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        match bounded(limit, api.get(&name)).await {
                            // Ours from a previous run of this pod: we hold nothing
                            // now, so claiming 0 is safe.
                            Ok(mut old) => {
                                lease::stamp(&mut old, 0, SystemTime::now());
                                if let Some(spec) = old.spec.as_mut() {
                                    spec.holder_identity = Some(pod.clone());
                                    spec.lease_duration_seconds =
                                        fresh.spec.as_ref().and_then(|s| s.lease_duration_seconds);
                                }
                                bounded(limit, api.replace(&name, &PostParams::default(), &old))
                                    .await
                            }
                            Err(e) => Err(e),
                        }
                    }
                    other => other,
                }
            }
            .await;
            match created {
                Ok(lease) => {
                    tracing::info!(upstream = %upstream, %group, lease = %name, budget = config.budget, "fleet: joined the group with a claim of 0");
                    gate.update_view(|v| {
                        v.mode = FleetMode::Coordinated;
                        v.last_error = None;
                    });
                    return Some(Self {
                        api,
                        upstream,
                        group,
                        pod,
                        name,
                        config,
                        gate,
                        lease,
                        published: 0,
                        accepted: 0,
                        renewed: Instant::now(),
                        grow_after: None,
                        stale_view: false,
                    });
                }
                Err(e) => {
                    tracing::warn!(upstream = %upstream, lease = %name, error = %e, "fleet: cannot create our Lease; holding no connections until it exists");
                    gate.update_view(|v| v.last_error = Some(format!("create Lease {name}: {e}")));
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(Duration::from_secs(5));
        }
    }

    /// Whether our Lease went unrenewed so long that the group is about to
    /// stop counting it.
    fn unrenewed(&self) -> bool {
        self.renewed.elapsed()
            >= self
                .config
                .lease_duration
                .saturating_sub(self.config.renew_interval)
    }

    /// The fencing rule alone: unrenewed, the cap drops to 0.
    fn fence_if_unrenewed(&mut self) {
        if self.unrenewed() {
            self.accepted = 0;
            self.gate.set_cap(0);
            self.gate.update_view(|v| v.mode = FleetMode::Fenced);
        }
    }

    /// Applies the rules to the watched state: sets the cap, publishes a
    /// lower claim once the pool holds that few, or grows (and verifies).
    async fn step(&mut self, store: &Store<Lease>) {
        let now = SystemTime::now();
        let peers = lease::live_peers(store.state().iter().map(|l| &**l), &self.name, now);
        let fenced = self.unrenewed();
        let max_size = self.gate.max_size();
        let decision = rules::decide(
            self.config.budget,
            max_size,
            &self.pod,
            self.accepted,
            &peers,
        );
        if fenced {
            if self.accepted > 0 {
                tracing::warn!(upstream = %self.upstream, "fleet: Lease not renewed in time; holding no new connections until it is");
            }
            self.accepted = 0;
        } else {
            match decision.step {
                Step::Hold => {}
                Step::Shrink(target) => self.accepted = target,
                Step::Grow(to) => {
                    let ready = self.grow_after.is_none_or(|t| Instant::now() >= t);
                    if ready {
                        self.grow(to, peers.len()).await;
                    }
                }
            }
        }
        self.gate.set_cap(self.accepted);
        // Hand back what is no longer held.
        let held = self.gate.held();
        let floor = self.accepted.max(held);
        if floor < self.published && (held <= self.accepted || fenced) {
            let _ = self.write(floor).await;
        }
        // Claims are whatever the Leases say: a hostile or broken writer's
        // huge number must not overflow the sum.
        let others = peers
            .iter()
            .fold(0u32, |sum, p| sum.saturating_add(p.claim));
        self.gate.update_view(|v| {
            v.claim = self.published;
            v.claimed_total = others.saturating_add(self.published);
            v.live_peers = decision.live;
            v.share = decision.share;
            v.mode = if fenced {
                FleetMode::Fenced
            } else {
                FleetMode::Coordinated
            };
        });
    }

    /// Publishes `to`, reads the group back, and accepts it only if the
    /// live claims fit the budget; otherwise takes it back and retries
    /// after a random pause (so two racing sidecars do not race again).
    async fn grow(&mut self, to: u32, watched_peers: usize) {
        if self.write(to).await.is_err() {
            return;
        }
        let selector = format!("{}={}", lease::GROUP_LABEL, self.group);
        let fresh = match bounded(
            self.call_limit(),
            self.api.list(&ListParams::default().labels(&selector)),
        )
        .await
        {
            Ok(list) => list.items,
            Err(e) => {
                self.note_error(format!("list Leases: {e}"));
                let _ = self.write(self.accepted.max(self.gate.held())).await;
                return;
            }
        };
        let peers: Vec<PeerClaim> = lease::live_peers(&fresh, &self.name, SystemTime::now());
        if peers.len() > watched_peers {
            self.stale_view = true;
        }
        if rules::accepted(self.config.budget, to, &peers) {
            tracing::debug!(upstream = %self.upstream, claim = to, "fleet: claim grown");
            self.accepted = to;
        } else {
            let back = self.accepted.max(self.gate.held());
            tracing::debug!(upstream = %self.upstream, wanted = to, back, "fleet: lost a race for room; backing off");
            let _ = self.write(back).await;
            let pause = self
                .config
                .renew_interval
                .mul_f64(0.1 + fastrand::f64() * 0.4);
            self.grow_after = Some(Instant::now() + pause);
        }
    }

    /// The periodic renewal. It carries the claim, lowered as far as the
    /// connections closed so far allow while shrinking.
    async fn renew(&mut self) {
        let claim = self.published.min(self.accepted.max(self.gate.held()));
        let _ = self.write(claim).await;
    }

    /// Writes our Lease with `claim`, renewed now: an update against the
    /// `resourceVersion` we hold. A conflict (someone else wrote it, or an
    /// earlier write we did not hear back from) means read it and try once
    /// more; a missing Lease is created again.
    async fn write(&mut self, claim: u32) -> Result<(), ()> {
        for _ in 0..2 {
            let mut next = self.lease.clone();
            lease::stamp(&mut next, claim, SystemTime::now());
            let written = bounded(
                self.call_limit(),
                self.api.replace(&self.name, &PostParams::default(), &next),
            )
            .await;
            match written {
                Ok(lease) => {
                    self.lease = lease;
                    self.published = claim;
                    self.renewed = Instant::now();
                    self.gate.update_view(|v| {
                        v.claim = claim;
                        v.last_error = None;
                    });
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    match bounded(self.call_limit(), self.api.get(&self.name)).await {
                        Ok(current) => {
                            let found = lease::claim(&current);
                            if found != self.published && found != claim {
                                // Not a write of ours we missed the answer
                                // to: another process writes this Lease (two
                                // pods of one name?), and its connections
                                // are invisible to the group.
                                self.note_error(format!(
                                    "Lease {} was written by someone else (claim {} where we published {}): is another pod named {}?",
                                    self.name,
                                    found,
                                    self.published,
                                    self.pod
                                ));
                            }
                            self.lease = current;
                        }
                        Err(e) => {
                            self.note_error(format!("read Lease after a conflict: {e}"));
                            return Err(());
                        }
                    }
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    let fresh = lease::build(
                        &self.group,
                        &self.pod,
                        self.config.lease_duration,
                        claim,
                        SystemTime::now(),
                    );
                    match bounded(
                        self.call_limit(),
                        self.api.create(&PostParams::default(), &fresh),
                    )
                    .await
                    {
                        Ok(lease) => self.lease = lease,
                        Err(e) => {
                            self.note_error(format!("recreate Lease: {e}"));
                            return Err(());
                        }
                    }
                }
                Err(e) => {
                    self.note_error(format!("update Lease: {e}"));
                    return Err(());
                }
            }
        }
        Err(())
    }

    fn note_error(&self, error: String) {
        tracing::warn!(upstream = %self.upstream, lease = %self.name, %error, "fleet: Kubernetes API call failed");
        self.gate.update_view(|v| v.last_error = Some(error));
    }
}
