//! Upstream discovery with real TCP upstreams behind the endpoints. The
//! Kubernetes scenarios run the real `kube` client (in a `lessor serve`
//! process, through a kubeconfig) against the fake API server in
//! `support::kube_api`; DNS runs in-process against a resolver the test
//! controls, and once against the system resolver with `localhost`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use lessor::EngineKind;
use lessor::Resolver;
use lessor::RunOptions;
use lessor_client::pb::{Disposition, EndpointStats, UpstreamStats};
use lessor_client::{Client, LeaseOptions};

use crate::support::kube_api::{FakeApi, slice};
use crate::support::process::Served;
use crate::support::{Lessor, PATIENCE, TestUpstream, evictions, upstream_yaml};

/// Three echo servers on one port of three loopback addresses, like three
/// pods behind one Service.
async fn three_pods() -> (u16, Vec<TestUpstream>) {
    let port = crate::support::ports::reserve();
    let mut pods = Vec::new();
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        pods.push(TestUpstream::start_on(&format!("{ip}:{port}")).await);
    }
    (port, pods)
}

fn kube_config(pool: &str, extra: &[&str]) -> String {
    let mut lines = vec![
        "discovery: { kubernetes: { service: redis, port: redis } }",
        pool,
        "health: { interval: 100ms }",
    ];
    lines.extend_from_slice(extra);
    let upstream = upstream_yaml("up", "unused", EngineKind::Bb8, &lines)
        .replace("    address: \"unused\"\n", "");
    format!("upstreams:\n{upstream}")
}

async fn serve_with(api: &FakeApi, yaml: &str) -> (Served, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let served = Served::start_with(
        yaml,
        &[
            ("KUBECONFIG", kubeconfig.as_str()),
            ("POD_NAMESPACE", "shop"),
        ],
    )
    .await;
    (served, dir)
}

async fn stats(client: &Client) -> UpstreamStats {
    client.stats("up").await.unwrap().remove(0)
}

async fn wait(client: &Client, what: &str, pred: impl Fn(&UpstreamStats) -> bool) -> UpstreamStats {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = stats(client).await;
        if pred(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoint<'a>(s: &'a UpstreamStats, ip: &str) -> Option<&'a EndpointStats> {
    s.endpoints
        .iter()
        .find(|e| e.address.starts_with(&format!("{ip}:")))
}

fn conns(s: &UpstreamStats, ip: &str) -> u32 {
    endpoint(s, ip).map_or(0, |e| e.connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_kubernetes_scale_out_spreads_new_connections() {
    let api = FakeApi::start().await;
    let (port, pods) = three_pods().await;
    api.apply(
        "shop",
        slice(
            "redis-a",
            "redis",
            ("redis", port),
            &[("127.0.0.1", true, false)],
        ),
    );
    let (served, _dir) = serve_with(
        &api,
        &kube_config("pool: { max_size: 12, min_idle: 6 }", &[]),
    )
    .await;
    let client = served.client().await;
    wait(&client, "six connections to the one endpoint", |s| {
        s.ready && conns(s, "127.0.0.1") == 6
    })
    .await;

    // Scale to three pods: a second slice, as the EndpointSlice controller does.
    api.apply(
        "shop",
        slice(
            "redis-b",
            "redis",
            ("redis", port),
            &[("127.0.0.2", true, false), ("127.0.0.3", true, false)],
        ),
    );
    wait(&client, "three endpoints", |s| s.endpoints.len() == 3).await;
    // Take six leases: min_idle dials six more, and they go where there are fewest.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(client.lease("up", &LeaseOptions::default()).await.unwrap());
    }
    let s = wait(&client, "the refill spread over the new pods", |s| {
        s.connections == 12 && conns(s, "127.0.0.2") == 3 && conns(s, "127.0.0.3") == 3
    })
    .await;
    assert_eq!(conns(&s, "127.0.0.1"), 6);
    for lease in held {
        lease.release(Disposition::Return).await.unwrap();
    }
    assert_eq!(pods[1].open() + pods[2].open(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_kubernetes_not_ready_and_terminating_are_drained() {
    let api = FakeApi::start().await;
    let (port, pods) = three_pods().await;
    let all_ready = [
        ("127.0.0.1", true, false),
        ("127.0.0.2", true, false),
        ("127.0.0.3", true, false),
    ];
    api.apply(
        "shop",
        slice("redis-a", "redis", ("redis", port), &all_ready),
    );
    let (served, _dir) = serve_with(
        &api,
        &kube_config("pool: { max_size: 12, min_idle: 6 }", &[]),
    )
    .await;
    let client = served.client().await;
    wait(&client, "two connections per endpoint", |s| {
        ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            .iter()
            .all(|ip| conns(s, ip) == 2)
    })
    .await;
    // Hold a lease on the pod that will turn not-ready.
    let mut on_b = None;
    let mut others = Vec::new();
    while on_b.is_none() {
        let lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
        if lease.granted().endpoint.starts_with("127.0.0.2:") {
            on_b = Some(lease);
        } else {
            others.push(lease);
        }
    }
    for lease in others {
        lease.release(Disposition::Return).await.unwrap();
    }
    let mut on_b = on_b.unwrap();

    api.apply(
        "shop",
        slice(
            "redis-a",
            "redis",
            ("redis", port),
            &[
                ("127.0.0.1", true, false),
                ("127.0.0.2", false, false),
                ("127.0.0.3", false, true),
            ],
        ),
    );
    // Idle connections to B and C close at once; the leased one stays.
    crate::support::eventually("C drained, B down to its leased connection", || async {
        pods[2].open() == 0 && pods[1].open() == 1
    })
    .await;
    let s = stats(&client).await;
    assert!(evictions(&s, "endpoint_removed") >= 3, "{s:#?}");
    let b = endpoint(&s, "127.0.0.2").unwrap();
    assert!(!b.ready);
    assert!(endpoint(&s, "127.0.0.3").unwrap().terminating);
    // The lease on B keeps working; at its end the connection is closed, not returned.
    on_b.send("still here").await.unwrap();
    assert_eq!(on_b.recv_at_least(10).await.unwrap(), "still here");
    let ended = on_b.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    crate::support::eventually("B fully drained", || async { pods[1].open() == 0 }).await;
    // New connections go to A only.
    let s = wait(&client, "min_idle refilled on A", |s| s.idle >= 6).await;
    assert_eq!(conns(&s, "127.0.0.2") + conns(&s, "127.0.0.3"), 0, "{s:#?}");
    for _ in 0..5 {
        let lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
        assert!(lease.granted().endpoint.starts_with("127.0.0.1:"));
        lease.release(Disposition::Return).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_kubernetes_deleted_slice_and_relist_after_410() {
    let api = FakeApi::start().await;
    let (port, pods) = three_pods().await;
    api.apply(
        "shop",
        slice(
            "redis-a",
            "redis",
            ("redis", port),
            &[("127.0.0.1", true, false)],
        ),
    );
    api.apply(
        "shop",
        slice(
            "redis-b",
            "redis",
            ("redis", port),
            &[("127.0.0.2", true, false)],
        ),
    );
    // A slice of another Service is ignored.
    api.apply(
        "shop",
        slice(
            "other",
            "memcached",
            ("redis", port),
            &[("127.0.0.3", true, false)],
        ),
    );
    let (served, _dir) = serve_with(
        &api,
        &kube_config("pool: { max_size: 8, min_idle: 2 }", &[]),
    )
    .await;
    let client = served.client().await;
    wait(&client, "two endpoints", |s| {
        s.endpoints.len() == 2 && s.connections == 2
    })
    .await;
    assert_eq!(pods[2].accepted(), 0);

    api.delete("shop", "redis-b");
    let s = wait(&client, "the deleted slice's endpoint gone", |s| {
        s.endpoints.len() == 1
    })
    .await;
    assert!(endpoint(&s, "127.0.0.2").is_none());
    crate::support::eventually("its connection closed", || async { pods[1].open() == 0 }).await;

    // The watch expires (410 Gone): the watcher relists and keeps following.
    api.expire_watches();
    api.apply(
        "shop",
        slice(
            "redis-c",
            "redis",
            ("redis", port),
            &[("127.0.0.3", true, false)],
        ),
    );
    wait(&client, "the endpoint added after the relist", |s| {
        endpoint(s, "127.0.0.3").is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_kubernetes_api_down_keeps_the_last_endpoints() {
    let api = FakeApi::start().await;
    let (port, _pods) = three_pods().await;
    api.set_down(true);
    api.apply(
        "shop",
        slice(
            "redis-a",
            "redis",
            ("redis", port),
            &[("127.0.0.1", true, false)],
        ),
    );
    let (served, _dir) = serve_with(&api, &kube_config("pool: { min_idle: 1 }", &[])).await;
    // Never synced: not ready, and says why.
    crate::support::eventually("not ready before the first sync", || async {
        let r = crate::support::http::fetch(&served.admin, "/readyz?verbose", None).await;
        r.is_ok_and(|r| r.status == 503 && r.body.contains("kubernetes shop/redis"))
    })
    .await;
    api.set_down(false);
    crate::support::eventually("ready after the first sync", || async {
        crate::support::http::fetch(&served.admin, "/readyz", None)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;

    api.set_down(true);
    crate::support::eventually("the outage reported", || async {
        crate::support::http::fetch(&served.admin, "/readyz?verbose", None)
            .await
            .is_ok_and(|r| {
                r.status == 200
                    && r.body.contains("API unreachable")
                    && r.body.contains("keeping the last 1 endpoints")
            })
    })
    .await;
    // Leases keep working on the last known endpoints.
    let client = served.client().await;
    for _ in 0..3 {
        let mut lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
        lease.send("ok").await.unwrap();
        assert_eq!(lease.recv_at_least(2).await.unwrap(), "ok");
        lease.release(Disposition::Return).await.unwrap();
    }
    api.set_down(false);
    crate::support::eventually("the source recovers", || async {
        crate::support::http::fetch(&served.admin, "/readyz?verbose", None)
            .await
            .is_ok_and(|r| !r.body.contains("API unreachable"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_dead_endpoint_is_ejected_then_readmitted() {
    let api = FakeApi::start().await;
    let port = crate::support::ports::reserve();
    let live = TestUpstream::start_on(&format!("127.0.0.1:{port}")).await;
    // 127.0.0.4: nothing listens there yet.
    api.apply(
        "shop",
        slice(
            "redis-a",
            "redis",
            ("redis", port),
            &[("127.0.0.1", true, false), ("127.0.0.4", true, false)],
        ),
    );
    let outlier = "outlier: { consecutive_failures: 2, base_ejection: 500ms, max_ejection: 2s }";
    let (served, _dir) = serve_with(
        &api,
        &kube_config("pool: { max_size: 8, min_idle: 4 }", &[outlier]),
    )
    .await;
    let client = served.client().await;
    // Its second failed dial ejects it. The warm-up's concurrent dials
    // usually fail twice there; on a loaded machine they may not, so new
    // dials are asked for (each evicting lease makes the pool dial one;
    // once the endpoint's backoff ends, one of them tries it again).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = stats(&client).await;
        if endpoint(&s, "127.0.0.4").is_some_and(|e| e.ejected) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead endpoint was not ejected: {s:#?}"
        );
        // Before discovery's first sync there is nothing to lease yet.
        if let Ok(lease) = client.lease("up", &LeaseOptions::default()).await {
            lease.release(Disposition::Evict).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Checkouts do not stall on it: every lease is served by the live pod.
    for _ in 0..10 {
        let options = LeaseOptions {
            checkout_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        let lease = client.lease("up", &options).await.unwrap();
        assert!(lease.granted().endpoint.starts_with("127.0.0.1:"));
        lease.release(Disposition::Evict).await.unwrap();
    }
    assert!(live.accepted() >= 10);
    // The pod comes up: once its ejection ends, new connections go there
    // again (each evicting lease makes the pool dial one).
    let revived = TestUpstream::start_on(&format!("127.0.0.4:{port}")).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = stats(&client).await;
        if endpoint(&s, "127.0.0.4").is_some_and(|e| !e.ejected && e.connections > 0) {
            assert!(s.ready);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not re-admitted: {s:#?}"
        );
        let lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
        lease.release(Disposition::Evict).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(revived.accepted() > 0);
}

/// A resolver whose answers the test sets.
#[derive(Clone, Default)]
struct Answers(Arc<Mutex<Vec<SocketAddr>>>, Arc<AtomicUsize>);

impl Answers {
    /// Lookups made so far.
    fn lookups(&self) -> usize {
        self.1.load(Ordering::SeqCst)
    }
}

impl Resolver for Answers {
    fn resolve(
        &self,
        _name: &str,
        _port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let answers = self.0.lock().unwrap().clone();
        self.1.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if answers.is_empty() {
                Err(std::io::Error::other("NXDOMAIN"))
            } else {
                Ok(answers)
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_dns_answers_add_and_remove_endpoints() {
    let (port, pods) = three_pods().await;
    let addr = |ip: &str| format!("{ip}:{port}").parse::<SocketAddr>().unwrap();
    let answers = Answers::default();
    *answers.0.lock().unwrap() = vec![addr("127.0.0.1"), addr("127.0.0.2")];
    let yaml = format!(
        "upstreams:\n  - name: up\n    discovery: {{ dns: {{ name: redis-headless.shop.svc, port: {port}, refresh: 100ms }} }}\n    pool: {{ min_idle: 4 }}\n    health: {{ interval: 100ms }}\n"
    );
    let options = RunOptions {
        resolver: Arc::new(answers.clone()),
        ..Default::default()
    };
    let lessor = Lessor::start_with(&yaml, "127.0.0.1:0", options).await;
    lessor
        .wait_for("two endpoints, two connections each", |s| {
            conns(s, "127.0.0.1") == 2 && conns(s, "127.0.0.2") == 2
        })
        .await;
    // A lease on 127.0.0.2, held across its removal.
    let mut on_two = None;
    let mut others = Vec::new();
    while on_two.is_none() {
        let lease = lessor.lease().await.unwrap();
        if lease.granted().endpoint.starts_with("127.0.0.2:") {
            on_two = Some(lease);
        } else {
            others.push(lease);
        }
    }
    for lease in others {
        lease.release(Disposition::Return).await.unwrap();
    }
    let mut on_two = on_two.unwrap();
    // The answer changes: 127.0.0.2 leaves, 127.0.0.3 arrives.
    *answers.0.lock().unwrap() = vec![addr("127.0.0.1"), addr("127.0.0.3")];
    lessor
        .wait_for("the endpoints follow the answer", |s| {
            endpoint(s, "127.0.0.2").is_none()
                && endpoint(s, "127.0.0.3").is_some_and(|e| e.connections > 0)
        })
        .await;
    // Its idle connections close at once; the leased one stays, and works.
    crate::support::eventually("only the leased socket left on .2", || async {
        pods[1].open() == 1
    })
    .await;
    let idle_closed = evictions(&lessor.stats("up").await, "endpoint_removed");
    assert!(idle_closed >= 1);
    on_two.send("still here").await.unwrap();
    assert_eq!(on_two.recv_at_least(10).await.unwrap(), "still here");
    // At its return it is closed, counted, and Ended says so.
    let ended = on_two.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    lessor
        .wait_for("the leased one counted at its return", |s| {
            evictions(s, "endpoint_removed") == idle_closed + 1
        })
        .await;
    crate::support::eventually("the removed endpoint's sockets closed", || async {
        pods[1].open() == 0
    })
    .await;
    lessor.assert_accounted().await;
    // Failing lookups keep the last answer.
    answers.0.lock().unwrap().clear();
    let before = answers.lookups();
    crate::support::eventually("two failed lookups", || async {
        answers.lookups() >= before + 2
    })
    .await;
    let s = lessor.stats("up").await;
    assert_eq!(s.endpoints.len(), 2, "{s:#?}");
    let lease = lessor.lease().await.unwrap();
    lease.release(Disposition::Return).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_dns_localhost_with_the_system_resolver() {
    let up = TestUpstream::start().await;
    let port = up.addr().rsplit(':').next().unwrap().to_owned();
    let yaml = format!(
        "upstreams:\n  - name: up\n    discovery: {{ dns: {{ name: localhost, port: {port} }} }}\n"
    );
    let lessor = Lessor::start(&yaml).await;
    let s = lessor
        .wait_for("localhost resolved", |s| {
            endpoint(s, "127.0.0.1").is_some() && s.ready
        })
        .await;
    assert!(
        s.endpoints
            .iter()
            .all(|e| e.address.ends_with(&format!(":{port}")))
    );
    let mut lease = lessor.lease().await.unwrap();
    lease.send("via dns").await.unwrap();
    assert_eq!(lease.recv_at_least(7).await.unwrap(), "via dns");
    lease.release(Disposition::Return).await.unwrap();
}

/// On deadpool, with DNS discovery: an endpoint that accepts connections but
/// never answers fails its background probes and is ejected (no dial ever
/// failed), new connections go to the healthy one, and the per-endpoint
/// metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_failing_probes_eject_an_endpoint_on_deadpool() {
    let (port, pods) = three_pods().await;
    pods[1].set_mode(crate::support::Mode::Silent);
    let addr = |ip: &str| format!("{ip}:{port}").parse::<SocketAddr>().unwrap();
    let answers = Answers::default();
    *answers.0.lock().unwrap() = vec![addr("127.0.0.1"), addr("127.0.0.2")];
    let yaml = format!(
        "upstreams:\n  - name: up\n    engine: deadpool\n    discovery: {{ dns: {{ name: redis-headless.shop.svc, port: {port}, refresh: 1h }} }}\n    pool: {{ min_idle: 4 }}\n    health: {{ interval: 100ms, probe: {{ send: \"PING\", expect: \"PING\", timeout: 1s }} }}\n    outlier: {{ consecutive_failures: 2, base_ejection: 1h, max_ejection: 1h }}\n"
    );
    let options = RunOptions {
        resolver: Arc::new(answers.clone()),
        ..Default::default()
    };
    let lessor = Lessor::start_with(&yaml, "127.0.0.1:0", options).await;
    let s = lessor
        .wait_for(
            "the silent endpoint ejected, the pool refilled elsewhere",
            |s| {
                endpoint(s, "127.0.0.2").is_some_and(|e| e.ejected && e.connections == 0)
                    && conns(s, "127.0.0.1") == 4
            },
        )
        .await;
    assert_eq!(s.engine, "deadpool");
    assert_eq!(s.connect_errors, 0, "ejected by probes, not dials: {s:#?}");
    assert!(s.health_check_failures >= 2, "{s:#?}");
    assert!(evictions(&s, "health_check") >= 2, "{s:#?}");
    let metrics = crate::support::http::fetch(&lessor.admin, "/metrics", None)
        .await
        .unwrap()
        .body;
    let line = |name: &str, ip: &str| format!("{name}{{upstream=\"up\",endpoint=\"{ip}:{port}\"}}");
    for (want, name, ip) in [
        ("1", "lessor_endpoint_ejected", "127.0.0.2"),
        ("0", "lessor_endpoint_ejected", "127.0.0.1"),
        ("1", "lessor_endpoint_ready", "127.0.0.1"),
    ] {
        let key = line(name, ip);
        assert!(
            metrics.lines().any(|l| l == format!("{key} {want}")),
            "no `{key} {want}` in:\n{metrics}"
        );
    }
    let idle = format!(
        "lessor_endpoint_connections{{upstream=\"up\",endpoint=\"127.0.0.1:{port}\",state=\"idle\"}} 4"
    );
    assert!(
        metrics.lines().any(|l| l == idle),
        "no `{idle}` in:\n{metrics}"
    );
    // Leases are served by the healthy endpoint only.
    for _ in 0..4 {
        let mut lease = lessor.lease().await.unwrap();
        assert!(lease.granted().endpoint.starts_with("127.0.0.1:"));
        lease.send("hi").await.unwrap();
        assert_eq!(lease.recv_at_least(2).await.unwrap(), "hi");
        lease.release(Disposition::Return).await.unwrap();
    }
}

/// Every endpoint of a required upstream turns not-ready: readiness turns off
/// (the pool's last dial was fine, but nothing may take a lease), a lease
/// says why, and both come back with the endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_readiness_follows_endpoints() {
    let api = FakeApi::start().await;
    let (port, _pods) = three_pods().await;
    let pods = |ready: bool| {
        slice(
            "redis-a",
            "redis",
            ("redis", port),
            &[("127.0.0.1", ready, false), ("127.0.0.2", ready, false)],
        )
    };
    api.apply("shop", pods(true));
    let (served, _dir) = serve_with(
        &api,
        &kube_config("pool: { max_size: 4, min_idle: 2 }", &[]),
    )
    .await;
    let readyz = |path: &'static str| {
        let admin = served.admin.clone();
        async move {
            crate::support::http::fetch(&admin, path, None)
                .await
                .unwrap()
        }
    };
    crate::support::eventually("ready", || async { readyz("/readyz").await.status == 200 }).await;
    api.apply("shop", pods(false));
    crate::support::eventually("not ready once no endpoint is", || async {
        readyz("/readyz").await.status == 503
    })
    .await;
    let verbose = readyz("/readyz?verbose").await.body;
    assert!(verbose.contains("no ready endpoint"), "{verbose}");
    let client = served.client().await;
    let err = client
        .lease("up", &LeaseOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    assert!(err.to_string().contains("no ready endpoint"), "{err}");
    api.apply("shop", pods(true));
    crate::support::eventually("ready again", || async {
        readyz("/readyz").await.status == 200
    })
    .await;
    let lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
    lease.release(Disposition::Return).await.unwrap();
}
