//! The fleet budget: several `lessor serve` processes (as the pods of one
//! group) share one connection budget to a real redis-server, coordinated
//! through Leases on the fake Kubernetes API (`support::kube_api`). What
//! Redis itself counts (`INFO clients`) is the judge, sampled throughout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lessor_client::pb::{Disposition, UpstreamFleet};
use lessor_client::{Client, LeaseOptions};

use crate::support::kube_api::FakeApi;
use crate::support::process::Served;
use crate::support::redis::Redis;
use crate::support::{PATIENCE, http};

const BUDGET: u32 = 20;

fn config(redis: &str, max_size: u32) -> String {
    format!(
        "upstreams:\n  - name: cache\n    address: \"{redis}\"\n    pool: {{ max_size: {max_size}, min_idle: 1, checkout_timeout: 30s }}\n    health: {{ interval: 1s }}\n    lease: {{ max_duration: 30s }}\n    fleet: {{ budget: {BUDGET}, group: cache, renew_interval: 300ms, lease_duration: 3s }}\n"
    )
}

/// One sidecar of the group: the process and the load on it.
struct Pod {
    name: String,
    served: Served,
    load: Option<Load>,
}

/// Clients leasing in a loop (PING, then return) until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the load saw, across every pod.
#[derive(Default)]
struct Tally {
    leases: AtomicU64,
    failures: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Load {
    async fn start(served: &Served, workers: usize, tally: &Arc<Tally>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let client = served.client().await;
            let (stop, tally) = (stop.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match one_lease(&client).await {
                        Ok(()) => {
                            tally.leases.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tally.failures.fetch_add(1, Ordering::Relaxed);
                            tally.first_failure.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
            }));
        }
        Self { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

async fn one_lease(client: &Client) -> Result<(), String> {
    let mut lease = client
        .lease("cache", &LeaseOptions::default())
        .await
        .map_err(|e| format!("lease: {e}"))?;
    lease.send("PING\r\n").await.map_err(|e| e.to_string())?;
    let pong = lease.recv_at_least(7).await.map_err(|e| e.to_string())?;
    if pong != "+PONG\r\n" {
        return Err(format!("unexpected reply {pong:?}"));
    }
    // Hold it a little, so the pods want more than their share.
    tokio::time::sleep(Duration::from_millis(15)).await;
    let ended = lease
        .release(Disposition::Return)
        .await
        .map_err(|e| format!("release: {e}"))?;
    // A connection above a shrinking cap is closed at its return (EVICT),
    // but the lease itself ended as the client asked.
    if ended.reason() != lessor_client::pb::EndReason::ClientRelease {
        return Err(format!("lease ended {ended:?}"));
    }
    Ok(())
}

async fn start_pod(
    api: &FakeApi,
    kubeconfig: &str,
    redis: &Redis,
    name: &str,
    max_size: u32,
) -> Pod {
    let served = Served::start_with(
        &config(&redis.addr(), max_size),
        &[
            ("KUBECONFIG", kubeconfig),
            ("POD_NAMESPACE", "shop"),
            ("POD_NAME", name),
        ],
    )
    .await;
    let _ = api;
    Pod {
        name: name.to_owned(),
        served,
        load: None,
    }
}

async fn fleet_stats(served: &Served) -> Option<UpstreamFleet> {
    let client = Client::connect(&served.grpc).await.ok()?;
    client.stats("cache").await.ok()?.remove(0).fleet
}

/// The share each of `names` should reach: budget / n, the remainder to the
/// first by name.
fn shares(names: &[&str]) -> BTreeMap<String, u32> {
    let mut sorted: Vec<_> = names.to_vec();
    sorted.sort();
    let n = sorted.len() as u32;
    sorted
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                (*p).to_owned(),
                BUDGET / n + u32::from((i as u32) < BUDGET % n),
            )
        })
        .collect()
}

/// Waits until every pod's cap and published claim are its share and it
/// sees exactly these peers.
async fn wait_for_shares(pods: &[Pod]) {
    let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    let want = shares(&names);
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let mut seen = Vec::new();
        let mut all = true;
        for pod in pods {
            let f = fleet_stats(&pod.served).await;
            let ok = f.as_ref().is_some_and(|f| {
                f.mode == "coordinated"
                    && f.live_peers == pods.len() as u32
                    && f.effective_cap == want[&pod.name]
                    && f.claim == want[&pod.name]
            });
            all &= ok;
            seen.push((pod.name.clone(), f));
        }
        if all {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pods did not reach their shares {want:?}: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Samples Redis's own count of clients (`INFO clients`) until stopped, on
/// one connection kept open (a connection per sample would count the
/// previous one until Redis has processed its close); the highest seen,
/// the sampler's own connection not included.
fn sample_clients(redis: Arc<Redis>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u32, u32)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        let mut conn = tokio::net::TcpStream::connect(redis.addr()).await.unwrap();
        let (mut peak, mut samples) = (0u32, 0u32);
        let mut buf = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            conn.write_all(b"INFO clients\r\n").await.unwrap();
            buf.clear();
            // A bulk string: `$len\r\n` then len bytes and `\r\n`.
            let text = loop {
                let mut chunk = [0u8; 4096];
                let n = conn.read(&mut chunk).await.unwrap();
                assert!(n > 0, "redis closed the sampler");
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some((head, body)) = text.split_once("\r\n") {
                    let len: usize = head.trim_start_matches('$').parse().unwrap();
                    if body.len() >= len + 2 {
                        break body[..len].to_owned();
                    }
                }
            };
            let clients: u32 = text
                .lines()
                .find_map(|l| l.strip_prefix("connected_clients:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("connected_clients in INFO clients");
            peak = peak.max(clients.saturating_sub(1));
            samples += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (peak, samples)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_budget_holds_while_the_group_scales_4_6_2() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let redis = Arc::new(redis);
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_clients(redis.clone(), stop_sampling.clone());
    let tally = Arc::new(Tally::default());
    // max_size 12: above every share but the last (10), so the budget binds.
    let max_size = 12;

    // Four pods, each leasing with more clients than its share.
    let mut pods = Vec::new();
    for i in 0..4 {
        pods.push(start_pod(&api, &kubeconfig, &redis, &format!("pod-{i}"), max_size).await);
    }
    for pod in &mut pods {
        pod.load = Some(Load::start(&pod.served, 8, &tally).await);
    }
    wait_for_shares(&pods).await;

    // Six: two new pods start at 0 and grow into what the others free.
    for i in 4..6 {
        let mut pod = start_pod(&api, &kubeconfig, &redis, &format!("pod-{i}"), max_size).await;
        pod.load = Some(Load::start(&pod.served, 8, &tally).await);
        pods.push(pod);
    }
    wait_for_shares(&pods).await;
    // The first four shrank from 5: connections above the new cap were
    // closed (idle ones at once, leased ones at their return), counted.
    let mut closed = 0;
    for pod in &pods[..4] {
        let client = pod.served.client().await;
        let s = client.stats("cache").await.unwrap().remove(0);
        closed += s.evictions.get("fleet_cap").copied().unwrap_or(0);
        assert!(s.connections <= 4, "{s:#?}");
    }
    assert!(
        closed >= 4,
        "only {closed} connections closed for the fleet cap"
    );

    // Two: one SIGKILLed (its Lease expires), three drained (SIGTERM: their
    // Leases are deleted). Their clients stop first: a killed pod's own
    // leases are not the resize's doing.
    let mut killed = pods.remove(5);
    killed.load.take().unwrap().stop().await;
    killed.served.signal("KILL");
    drop(killed);
    for _ in 0..3 {
        let mut drained = pods.remove(2);
        drained.load.take().unwrap().stop().await;
        drained.served.signal("TERM");
        assert_eq!(drained.served.exit_code(PATIENCE).await, Some(0));
    }
    wait_for_shares(&pods).await;
    // The drained pods handed their claims back: their Leases are gone.
    let names: Vec<String> = api
        .leases
        .all("shop")
        .iter()
        .filter_map(|l| l["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    for gone in [
        "lessor-cache-pod-2",
        "lessor-cache-pod-3",
        "lessor-cache-pod-4",
    ] {
        assert!(
            !names.contains(&gone.to_owned()),
            "{gone} still there: {names:?}"
        );
    }

    for pod in &mut pods {
        pod.load.take().unwrap().stop().await;
    }
    stop_sampling.store(true, Ordering::Relaxed);
    let (peak, samples) = sampler.await.unwrap();
    let leases = tally.leases.load(Ordering::Relaxed);
    let failures = tally.failures.load(Ordering::Relaxed);
    eprintln!(
        "fleet: peak {peak} redis clients over {samples} samples, {leases} leases, {} Lease API requests",
        api.leases.requests.total()
    );
    assert!(samples > 50, "sampled only {samples} times");
    assert!(peak <= BUDGET, "redis saw {peak} clients, budget {BUDGET}");
    assert!(
        peak >= BUDGET - 4,
        "the load should have used most of the budget (peak {peak})"
    );
    assert_eq!(
        failures,
        0,
        "leases failed: {:?}",
        tally.first_failure.lock().unwrap()
    );
    assert!(leases > 100, "only {leases} leases");
    // Waits at the fleet cap are visible apart from the pool's own.
    let f = fleet_stats(&pods[0].served).await.unwrap();
    assert!(
        f.waits > 0,
        "8 clients on a share of 5 wait at the cap: {f:?}"
    );
    let metrics = http::fetch(&pods[0].served.admin, "/metrics", None)
        .await
        .unwrap()
        .body;
    for line in [
        "lessor_fleet_effective_cap{upstream=\"cache\"} 10",
        "lessor_fleet_budget{upstream=\"cache\"} 20",
        "lessor_fleet_live_peers{upstream=\"cache\"} 2",
        "lessor_fleet_claimed_total{upstream=\"cache\"} 20",
        "lessor_fleet_mode{upstream=\"cache\",mode=\"coordinated\"} 1",
    ] {
        assert!(metrics.contains(line), "no `{line}` in:\n{metrics}");
    }
    assert!(
        metrics.contains("lessor_fleet_cap_waits_total{upstream=\"cache\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_without_the_api_the_budget_is_a_local_cap() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    // No POD_NAME, no service account: a local run.
    let served = Served::start_with(&config(&redis.addr(), 12), &[("POD_NAME", "")]).await;
    crate::support::eventually("the local cap", || async {
        fleet_stats(&served)
            .await
            .is_some_and(|f| f.mode == "local" && f.effective_cap == 12)
    })
    .await;
    let f = fleet_stats(&served).await.unwrap();
    assert_eq!((f.budget, f.live_peers, f.claim), (BUDGET, 1, 12), "{f:?}");
    // min(budget, max_size): with max_size above the budget, the budget.
    drop(served);
    let served = Served::start_with(&config(&redis.addr(), 32), &[("POD_NAME", "")]).await;
    crate::support::eventually("the budget as the cap", || async {
        fleet_stats(&served)
            .await
            .is_some_and(|f| f.mode == "local" && f.effective_cap == BUDGET)
    })
    .await;
    let verbose = http::fetch(&served.admin, "/readyz?verbose", None)
        .await
        .unwrap()
        .body;
    assert!(
        verbose.contains("fleet local group=cache cap=20"),
        "{verbose}"
    );
    // Said once, at startup.
    let said = served
        .stdout()
        .matches("the fleet budget acts as a local cap")
        .count();
    assert_eq!(said, 1, "{}", served.stdout());
    // At the cap, a checkout times out naming the fleet budget, not the
    // pool (which has room for 12 more).
    let client = served.client().await;
    let mut held = Vec::new();
    for _ in 0..BUDGET {
        held.push(
            client
                .lease("cache", &LeaseOptions::default())
                .await
                .unwrap(),
        );
    }
    let options = LeaseOptions {
        checkout_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let err = client
        .lease("cache", &options)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fleet budget") && err.contains("fleet cap of 20"),
        "{err}"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_conflicts_are_reread_and_an_unrenewable_lease_stops_dialing() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let pod = start_pod(&api, &kubeconfig, &redis, "solo", 12).await;
    let want_cap = |cap: u32, mode: &'static str| {
        let served = &pod.served;
        move || async move {
            fleet_stats(served)
                .await
                .is_some_and(|f| f.effective_cap == cap && f.mode == mode)
        }
    };
    crate::support::eventually(
        "the whole budget up to max_size",
        want_cap(12, "coordinated"),
    )
    .await;

    // Someone else writes our Lease: our next renewal conflicts (409), reads
    // it again and carries on with the claim intact.
    api.leases.touch("shop", "lessor-cache-solo");
    let conflicts = &api.leases.requests.conflicts;
    crate::support::eventually("a conflict on renewal", || async {
        conflicts.load(Ordering::Relaxed) >= 1
    })
    .await;
    let renewed =
        |lease: &serde_json::Value| lease["spec"]["renewTime"].as_str().map(str::to_owned);
    let before = renewed(&api.leases.all("shop")[0]);
    crate::support::eventually("a renewal after the conflict", || async {
        let lease = api.leases.all("shop").remove(0);
        renewed(&lease) != before && lease["metadata"]["annotations"]["lessor.dev/claim"] == "12"
    })
    .await;
    assert_eq!(fleet_stats(&pod.served).await.unwrap().mode, "coordinated");

    // Hold one connection in a lease across the outage: it is never cut.
    let client = pod.served.client().await;
    let mut held = client
        .lease("cache", &LeaseOptions::default())
        .await
        .unwrap();
    // The API goes away: within the lease duration the sidecar stops
    // counting on its claim (cap 0) and closes its idle connections.
    api.leases.set_down(true);
    crate::support::eventually("fenced at cap 0", want_cap(0, "fenced")).await;
    crate::support::eventually("idle connections closed", || async {
        redis
            .info_field("clients", "connected_clients")
            .await
            .is_some_and(|n| n <= 2)
    })
    .await;
    held.send("PING\r\n").await.unwrap();
    assert_eq!(held.recv_at_least(7).await.unwrap(), "+PONG\r\n");
    held.release(Disposition::Return).await.unwrap();

    // Back: it renews and grows again through the API.
    api.leases.set_down(false);
    crate::support::eventually("coordinated again", want_cap(12, "coordinated")).await;
    one_lease(&client).await.unwrap();
}
