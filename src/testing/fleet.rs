//! One simulated sidecar of a fleet group, for `lessor-bench fleet-sim`: the
//! real coordination loop (`crate::fleet`, its own `kube` client against an
//! API) over the real cap gate, with a stand-in for the pool that always
//! wants every connection its cap allows. "Connections" here are slots of
//! the gate: a dial takes one after a short delay, a shrink gives them back
//! as simulated leases end.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::FleetConfig;
use crate::fleet::{CapSlot, FleetCap, FleetMode};

/// The group every simulated sidecar joins.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The fleet budget.
    pub budget: u32,
    /// The group's name.
    pub group: String,
    /// Each sidecar's `pool.max_size`.
    pub max_size: u32,
    /// Lease renewal period.
    pub renew_interval: Duration,
    /// Lease duration (whole seconds).
    pub lease_duration: Duration,
    /// How long a simulated dial takes.
    pub dial_time: Duration,
    /// The longest a simulated lease holds a connection before it comes back
    /// (each takes a random fraction of it).
    pub max_hold: Duration,
}

/// A kubeconfig for `url` in `dir` (namespace `sim`), for the simulated
/// sidecars' `kube` clients.
pub fn kubeconfig(dir: &std::path::Path, url: &str) -> std::io::Result<std::path::PathBuf> {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {url}\ncontexts:\n- name: sim\n  context: {{ cluster: sim, user: sim, namespace: sim }}\ncurrent-context: sim\nusers:\n- name: sim\n  user: {{ token: sim }}\n"
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// One running simulated sidecar.
pub struct SimMember {
    gate: Arc<FleetCap>,
    stop: CancellationToken,
    member: tokio::task::JoinHandle<()>,
    pool: tokio::task::JoinHandle<()>,
}

impl SimMember {
    /// Joins the group as `pod`, with its own client from `kubeconfig`.
    pub async fn start(
        kubeconfig: &std::path::Path,
        pod: &str,
        sim: &SimConfig,
    ) -> Result<Self, kube::Error> {
        let options = kube::config::KubeConfigOptions::default();
        let file = kube::config::Kubeconfig::read_from(kubeconfig)
            .map_err(|e| kube::Error::Service(Box::new(e)))?;
        let config = kube::Config::from_custom_kubeconfig(file, &options)
            .await
            .map_err(|e| kube::Error::Service(Box::new(e)))?;
        let client = kube::Client::try_from(config)?;
        let fleet = FleetConfig {
            budget: sim.budget,
            group: Some(sim.group.clone()),
            renew_interval: sim.renew_interval,
            lease_duration: sim.lease_duration,
        };
        let gate = FleetCap::new(sim.max_size, sim.budget, sim.group.clone());
        let stop = CancellationToken::new();
        let identity = crate::fleet::Identity {
            pod: pod.to_owned(),
            namespace: "sim".to_owned(),
        };
        let member = tokio::spawn(crate::fleet::run_member(
            sim.group.clone(),
            fleet,
            gate.clone(),
            client,
            identity,
            stop.clone(),
        ));
        let pool = tokio::spawn(busy_pool(gate.clone(), sim.clone(), stop.clone()));
        Ok(Self {
            gate,
            stop,
            member,
            pool,
        })
    }

    /// Connections held (or being dialed) now.
    pub fn held(&self) -> u32 {
        self.gate.held()
    }

    /// The effective cap now.
    pub fn cap(&self) -> u32 {
        self.gate.cap()
    }

    /// `(claim, share, live_peers, coordinated)` as the member last knew.
    pub fn view(&self) -> (u32, u32, u32, bool) {
        let v = self.gate.view();
        (
            v.claim,
            v.share,
            v.live_peers,
            v.mode == FleetMode::Coordinated,
        )
    }

    /// The last Kubernetes API error the member saw, if any.
    pub fn last_error(&self) -> Option<String> {
        self.gate.view().last_error
    }

    /// A graceful stop: connections close, the Lease is deleted.
    pub async fn stop(self) {
        self.stop.cancel();
        self.gate.close();
        let _ = self.pool.await;
        let _ = self.member.await;
    }

    /// A crash (SIGKILL): connections vanish at once, the Lease stays until
    /// it expires.
    pub async fn kill(self) {
        self.member.abort();
        self.pool.abort();
        let _ = self.member.await;
        let _ = self.pool.await;
    }
}

/// A pool under constant load: dials up to the cap; above it, gives back a
/// connection each time a simulated lease ends.
async fn busy_pool(gate: Arc<FleetCap>, sim: SimConfig, stop: CancellationToken) {
    let mut held: Vec<CapSlot> = Vec::new();
    let mut changes = gate.subscribe();
    loop {
        while let Some(slot) = (held.len() < gate.cap() as usize)
            .then(|| gate.try_acquire())
            .flatten()
        {
            tokio::time::sleep(sim.dial_time).await;
            held.push(slot);
        }
        if held.len() > gate.cap() as usize {
            let hold = sim.max_hold.mul_f64(fastrand::f64());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(hold) => {}
            }
            held.pop();
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changes.changed() => {}
        }
    }
}
