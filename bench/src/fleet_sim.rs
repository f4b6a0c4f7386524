//! `--fleet-sim N`: N simulated sidecars of one fleet group against an
//! in-process Kubernetes Lease API (the one the integration tests use). Each
//! runs lessor's real coordination loop with its own `kube` client and the
//! real cap gate, over a stand-in pool that always wants every connection its
//! cap allows (`lessor::testing::SimMember`).
//!
//! Scenario: half the sidecars start and settle; the other half join at once
//! (scale up); a steady phase; then a fifth are killed (their Leases expire)
//! and three tenths stop gracefully (their Leases are deleted): scale down.
//! Measured: the time from each scale event until every sidecar's cap and
//! claim equal its fair share, the Lease API requests per second per sidecar
//! at steady state, and the fleet's total connections sampled every
//! millisecond (never above the budget, or the run fails).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lessor::testing::{FakeLeases, SimConfig, SimMember, kubeconfig};
use tokio_util::sync::CancellationToken;

use crate::load::BenchError;

/// What to simulate.
pub struct FleetSimOptions {
    /// Sidecars at the peak.
    pub sidecars: usize,
    /// The group's budget.
    pub budget: u32,
    /// Lease renewal period.
    pub renew_interval: Duration,
    /// Lease duration.
    pub lease_duration: Duration,
    /// How long the steady phase lasts.
    pub steady: Duration,
}

/// The measurements.
pub struct FleetSimReport {
    opts: (usize, u32, Duration, Duration),
    scale_up: Duration,
    scale_down: Duration,
    requests_per_sidecar: f64,
    peak: u32,
    samples: u64,
    conflicts: u64,
}

impl FleetSimReport {
    /// The report as BENCHMARKS.md records it.
    pub fn render(&self) -> String {
        let (n, budget, renew, lease) = self.opts;
        format!(
            "fleet simulation: {n} sidecars, budget {budget}, renew_interval {renew:?}, lease_duration {lease:?}\n\
             scale up {} -> {n}: every sidecar at its share after {:.2}s\n\
             scale down {n} -> {} ({} killed, {} drained): every sidecar at its share after {:.2}s\n\
             steady state: {:.2} Lease API requests/s per sidecar (watches not counted)\n\
             fleet total: peak {} of budget {budget} over {} samples (1 ms apart); 409 conflicts: {}\n",
            n / 2,
            self.scale_up.as_secs_f64(),
            n - n / 5 - n * 3 / 10,
            n / 5,
            n * 3 / 10,
            self.scale_down.as_secs_f64(),
            self.requests_per_sidecar,
            self.peak,
            self.samples,
            self.conflicts,
        )
    }
}

/// Runs the scenario.
pub async fn run(opts: &FleetSimOptions) -> Result<FleetSimReport, BenchError> {
    let n = opts.sidecars.max(4);
    let leases = FakeLeases::default();
    let stop_api = CancellationToken::new();
    let _stop_api = stop_api.clone().drop_guard();
    let url = leases.serve(stop_api).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = kubeconfig(dir.path(), &url)?;
    let sim = SimConfig {
        budget: opts.budget,
        group: "sim".into(),
        max_size: opts.budget,
        renew_interval: opts.renew_interval,
        lease_duration: opts.lease_duration,
        dial_time: Duration::from_millis(2),
        max_hold: Duration::from_millis(50),
    };
    let members: Arc<std::sync::Mutex<Vec<(String, SimMember)>>> = Arc::default();
    // The fleet's total, sampled every millisecond.
    let peak = Arc::new(AtomicU32::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (members, peak, sampling) = (members.clone(), peak.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut samples = 0u64;
            while sampling.load(Ordering::Relaxed) {
                let total: u32 = members.lock().unwrap().iter().map(|(_, m)| m.held()).sum();
                peak.fetch_max(total, Ordering::Relaxed);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples
        })
    };
    let start = |count: usize, from: usize| {
        let (members, kubeconfig, sim) = (members.clone(), kubeconfig.clone(), sim.clone());
        async move {
            for i in from..from + count {
                let pod = format!("sim-{i:03}");
                let member = SimMember::start(&kubeconfig, &pod, &sim)
                    .await
                    .map_err(|e| BenchError::Sidecar(format!("kube client: {e}")))?;
                members.lock().unwrap().push((pod, member));
            }
            Ok::<_, BenchError>(())
        }
    };
    let patience = opts.lease_duration * 10 + Duration::from_secs(30);

    start(n / 2, 0).await?;
    at_shares(&members, opts.budget, patience).await?;

    let t = Instant::now();
    start(n - n / 2, n / 2).await?;
    at_shares(&members, opts.budget, patience).await?;
    let scale_up = t.elapsed();

    let before = leases.requests.total();
    tokio::time::sleep(opts.steady).await;
    let steady = leases.requests.total() - before;
    let requests_per_sidecar = steady as f64 / opts.steady.as_secs_f64() / n as f64;

    let t = Instant::now();
    let (killed, drained): (Vec<_>, Vec<_>) = {
        let mut all = members.lock().unwrap();
        let killed: Vec<_> = all.drain(..n / 5).collect();
        let drained: Vec<_> = all.drain(..n * 3 / 10).collect();
        (killed, drained)
    };
    for (_, m) in killed {
        m.kill().await;
    }
    for (_, m) in drained {
        m.stop().await;
    }
    at_shares(&members, opts.budget, patience).await?;
    let scale_down = t.elapsed();

    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.await.unwrap_or(0);
    let conflicts = leases.requests.conflicts.load(Ordering::Relaxed);
    let remaining: Vec<_> = members.lock().unwrap().drain(..).collect();
    for (_, m) in remaining {
        m.stop().await;
    }
    let peak = peak.load(Ordering::Relaxed);
    if peak > opts.budget {
        return Err(BenchError::Reply(format!(
            "the fleet held {peak} connections, over its budget of {}",
            opts.budget
        )));
    }
    Ok(FleetSimReport {
        opts: (n, opts.budget, opts.renew_interval, opts.lease_duration),
        scale_up,
        scale_down,
        requests_per_sidecar,
        peak,
        samples,
        conflicts,
    })
}

/// Waits until every member's cap and claim equal its fair share among the
/// members running now.
async fn at_shares(
    members: &std::sync::Mutex<Vec<(String, SimMember)>>,
    budget: u32,
    patience: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + patience;
    loop {
        let settled = {
            let all = members.lock().unwrap();
            let mut names: Vec<&str> = all.iter().map(|(p, _)| p.as_str()).collect();
            names.sort_unstable();
            let live = names.len() as u32;
            all.iter().all(|(pod, m)| {
                let rank = names.iter().position(|p| p == pod).unwrap_or(0) as u32;
                let share = budget / live + u32::from(rank < budget % live);
                let (claim, _, peers, coordinated) = m.view();
                coordinated && peers == live && claim == share && m.cap() == share
            })
        };
        if settled {
            return Ok(());
        }
        if Instant::now() > deadline {
            let all = members.lock().unwrap();
            let mut names: Vec<&str> = all.iter().map(|(p, _)| p.as_str()).collect();
            names.sort_unstable();
            let live = names.len() as u32;
            let off: Vec<String> = all
                .iter()
                .filter_map(|(pod, m)| {
                    let rank = names.iter().position(|p| p == pod).unwrap_or(0) as u32;
                    let share = budget / live + u32::from(rank < budget % live);
                    let (claim, seen_share, peers, coordinated) = m.view();
                    let ok = coordinated && peers == live && claim == share && m.cap() == share;
                    (!ok).then(|| {
                        format!(
                            "{pod}: share {share} (it thinks {seen_share}), claim {claim}, cap {}, held {}, peers {peers}, coordinated {coordinated}, last error {:?}",
                            m.cap(),
                            m.held(),
                            m.last_error()
                        )
                    })
                })
                .collect();
            return Err(BenchError::Reply(format!(
                "the sidecars did not reach their shares in time:\n{}",
                off.join("\n")
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
