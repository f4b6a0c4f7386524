//! The fleet budget: one connection budget to an upstream shared by every
//! sidecar of a group (the replicas of a workload), live as it scales.
//!
//! Each sidecar publishes what it claims in a `coordination.k8s.io/v1` Lease
//! of its own (`lease.rs`), watches its group's Leases, and follows the rules
//! (`rules.rs`, applied by `member.rs`):
//!
//! - it grows its claim only while the live claims sum to at most the
//!   budget, and dials only under a claim it published and read back;
//! - its fair share is `budget / live peers` (at least one each while the
//!   budget allows); above it, it shrinks: idle connections above the new cap
//!   close at once, leased ones when they come back (no lease is cut short),
//!   and the published claim drops only once the pool holds that few;
//! - a new pod starts at a claim of 0 and grows into what others free;
//! - a peer whose Lease expired (`renewTime + leaseDurationSeconds` past) no
//!   longer counts; a sidecar that cannot renew its own stops dialing first.
//!
//! The pool enforces the cap through [`FleetCap`] (`cap.rs`): every dial
//! takes a slot under it, so the connections this sidecar holds never exceed
//! its accepted claim. Without a Kubernetes API (no `POD_NAME`, no service
//! account or kubeconfig) the budget is a local cap, said once at startup.

mod cap;
mod lease;
mod member;
mod rules;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use self::cap::{CapSlot, FleetCap, FleetMode, FleetSnapshot};
pub(crate) use self::member::{Identity, run as run_member};

use crate::config::UpstreamConfig;

const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The gate for `config`'s pool, when it has a `fleet:` block.
pub(crate) fn gate_for(config: &UpstreamConfig) -> Option<Arc<FleetCap>> {
    let fleet = config.fleet.as_ref()?;
    Some(FleetCap::new(
        config.pool.max_size,
        fleet.budget,
        fleet.group_for(&config.name),
    ))
}

/// Starts the coordination of `config`'s upstream on `tracker`, until
/// `cancel`: membership through the Kubernetes API, or a local cap without
/// one.
pub(crate) fn start(
    config: &UpstreamConfig,
    gate: Arc<FleetCap>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let Some(fleet) = config.fleet.clone() else {
        return;
    };
    let upstream = config.name.clone();
    let cancel = cancel.clone();
    tracker.spawn(async move {
        let identity = match identity() {
            Ok(identity) => identity,
            Err(why) => return local(&upstream, &gate, &why),
        };
        let client = match kube::Client::try_default().await {
            Ok(client) => client,
            Err(e) => return local(&upstream, &gate, &format!("no Kubernetes client ({e})")),
        };
        member::run(upstream, fleet, gate, client, identity, cancel).await;
    });
}

/// Without the API: the budget as a local cap, said once.
fn local(upstream: &str, gate: &FleetCap, why: &str) {
    let view = gate.view();
    let cap = view.budget.min(gate.max_size());
    tracing::warn!(
        upstream = %upstream,
        group = %view.group,
        budget = view.budget,
        cap,
        reason = %why,
        "fleet: no Kubernetes API; the fleet budget acts as a local cap for this sidecar alone"
    );
    gate.update_view(|v| {
        v.mode = FleetMode::Local;
        v.claim = cap;
        v.claimed_total = cap;
        v.live_peers = 1;
        v.share = view.budget;
        v.last_error = Some(why.to_owned());
    });
    gate.set_cap(cap);
}

/// This pod's name (`POD_NAME`, from the downward API) and namespace
/// (`POD_NAMESPACE`, else the service account's).
fn identity() -> Result<member::Identity, String> {
    let pod = std::env::var("POD_NAME")
        .ok()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .ok_or("POD_NAME is not set")?;
    let namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .or_else(|| std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok())
        .map(|ns| ns.trim().to_owned())
        .filter(|ns| !ns.is_empty())
        .ok_or("no POD_NAMESPACE and no service account namespace")?;
    Ok(member::Identity { pod, namespace })
}

/// The fleet facts in words, for `/readyz?verbose` (and logs):
/// `fleet coordinated group=cache cap=5 claim=5 share=5 claimed=20/20 live_peers=4`.
pub(crate) fn describe(f: &FleetSnapshot) -> String {
    let v = &f.view;
    let mut out = format!(
        "fleet {} group={} cap={} claim={} share={} claimed={}/{} live_peers={}",
        v.mode.as_str(),
        v.group,
        f.cap,
        v.claim,
        v.share,
        v.claimed_total,
        v.budget,
        v.live_peers
    );
    if f.waiting > 0 {
        out.push_str(&format!(" waiting_at_cap={}", f.waiting));
    }
    if let Some(e) = &v.last_error {
        out.push_str(&format!(" last_error={e:?}"));
    }
    out
}
