//! The admin server and gRPC health: readiness that follows the pool (off
//! before warm-up, off when the upstream dies, back when it returns, never
//! off for saturation), `/livez`, `/metrics` parsed as Prometheus text, and
//! the drain of a real `lessor serve` process on SIGTERM.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::http::fetch;
use lessor::EngineKind;
use lessor_client::pb::{Disposition, EndReason};
use lessor_client::{Client, LeaseOptions};

use crate::support::process::Served;
use crate::support::{
    Lessor, NOT_SERVING, PATIENCE, SERVING, TestUpstream, config_one, eventually, grpc_health,
    upstream_yaml,
};

const FAST: &str = "health: { interval: 50ms }";

async fn readyz(admin: &str) -> (u16, String) {
    let got = fetch(admin, "/readyz?verbose", None)
        .await
        .expect("GET /readyz");
    (got.status, got.body)
}

async fn wait_ready(lessor: &Lessor, want: u16) -> String {
    let deadline = Instant::now() + crate::support::PATIENCE;
    loop {
        let (status, body) = readyz(&lessor.admin).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status}, want {want}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_health(addr: &str, service: &str, want: i32) {
    let deadline = Instant::now() + crate::support::PATIENCE;
    loop {
        let got = grpc_health(addr, service).await;
        if got.as_ref().ok() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health of {service:?} is {got:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_not_ready_until_the_upstream_answers() {
    let up = TestUpstream::start().await;
    up.stop().await;
    let lessor = Lessor::start(&config_one(
        &up.addr(),
        EngineKind::Bb8,
        &["pool: { min_idle: 0 }", FAST],
    ))
    .await;
    let body = wait_ready(&lessor, 503).await;
    assert!(body.contains("[-]upstream up failed"), "{body}");
    assert!(body.ends_with("readyz check failed\n"), "{body}");
    assert_eq!(grpc_health(&lessor.addr, "").await.unwrap(), NOT_SERVING);
    // Liveness never depends on an upstream.
    let live = fetch(&lessor.admin, "/livez", None).await.unwrap();
    assert_eq!(live.status, 200);

    up.restart().await;
    let body = wait_ready(&lessor, 200).await;
    assert!(
        body.contains("[+]upstream up ok: 1 connections (1 idle, 0 leased)"),
        "{body}"
    );
    assert!(body.ends_with("readyz check passed\n"), "{body}");
    for service in ["", "lessor.v1.Pool", "lessor.v1.Pool/up"] {
        wait_health(&lessor.addr, service, SERVING).await;
    }
    let plain = fetch(&lessor.admin, "/readyz", None).await.unwrap();
    assert_eq!((plain.status, plain.body.as_str()), (200, "ok\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_readiness_follows_an_upstream_kill_and_return() {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(
        &up.addr(),
        EngineKind::Deadpool,
        &["pool: { min_idle: 2 }", FAST],
    ))
    .await;
    wait_ready(&lessor, 200).await;
    wait_health(&lessor.addr, "lessor.v1.Pool/up", SERVING).await;
    up.stop().await;
    let body = wait_ready(&lessor, 503).await;
    assert!(body.contains("last dial failed"), "{body}");
    for service in ["", "lessor.v1.Pool", "lessor.v1.Pool/up"] {
        wait_health(&lessor.addr, service, NOT_SERVING).await;
    }
    up.restart().await;
    wait_ready(&lessor, 200).await;
    wait_health(&lessor.addr, "", SERVING).await;
    let unknown = grpc_health(&lessor.addr, "no.such.Service")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_optional_upstreams_do_not_gate_readiness() {
    let up = TestUpstream::start().await;
    let down = TestUpstream::start().await;
    down.stop().await;
    let yaml = format!(
        "upstreams:\n{}{}",
        upstream_yaml("main", &up.addr(), EngineKind::Bb8, &[FAST]),
        upstream_yaml(
            "cache",
            &down.addr(),
            EngineKind::Bb8,
            &[FAST, "readiness: optional"]
        )
    );
    let lessor = Lessor::start(&yaml).await;
    let body = wait_ready(&lessor, 200).await;
    assert!(
        body.contains("[-]upstream cache (optional) failed"),
        "{body}"
    );
    assert!(body.contains("[+]upstream main ok"), "{body}");
    wait_health(&lessor.addr, "lessor.v1.Pool/cache", NOT_SERVING).await;
    wait_health(&lessor.addr, "", SERVING).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_saturation_never_turns_readiness_off() {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(
        &up.addr(),
        EngineKind::Bb8,
        &["pool: { max_size: 1, min_idle: 0, checkout_timeout: 30s }"],
    ))
    .await;
    wait_ready(&lessor, 200).await;
    wait_health(&lessor.addr, "", SERVING).await;
    let held = lessor.lease().await.unwrap();
    let client = lessor.client.clone();
    let waiter = tokio::spawn(async move { client.lease("up", &LeaseOptions::default()).await });
    lessor.wait_for("a waiter", |s| s.waiting == 1).await;
    let (status, body) = readyz(&lessor.admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(grpc_health(&lessor.addr, "").await.unwrap(), SERVING);
    held.release(Disposition::Return).await.unwrap();
    waiter
        .await
        .unwrap()
        .unwrap()
        .release(Disposition::Return)
        .await
        .unwrap();
}

/// Parses Prometheus text into `name{labels}` -> value, sorted labels.
fn samples(text: &str) -> HashMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let mut labels: Vec<_> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            (format!("{}{{{}}}", s.metric, labels.join(",")), value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_metrics_parse_and_agree_with_stats() {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(
        &up.addr(),
        EngineKind::Bb8,
        &["pool: { max_size: 4, min_idle: 1 }"],
    ))
    .await;
    lessor.wait_for("warm", |s| s.idle == 1).await;
    for _ in 0..3 {
        let mut lease = lessor.lease().await.unwrap();
        lease.send("12345").await.unwrap();
        lease.recv_at_least(5).await.unwrap();
        lease.release(Disposition::Return).await.unwrap();
    }
    lessor
        .lease()
        .await
        .unwrap()
        .release(Disposition::Evict)
        .await
        .unwrap();
    let stats = lessor
        .wait_for("settled", |s| s.leased == 0 && s.idle >= 1)
        .await;

    let got = fetch(&lessor.admin, "/metrics", None).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let m = samples(&got.body);
    let get = |key: &str| {
        *m.get(key)
            .unwrap_or_else(|| panic!("no {key} in:\n{}", got.body))
    };
    assert_eq!(get("lessor_leases_total{upstream=up}"), 4.0);
    assert_eq!(
        get("lessor_evictions_total{reason=client_evict,upstream=up}"),
        1.0
    );
    assert_eq!(get("lessor_evictions_total{reason=dirty,upstream=up}"), 0.0);
    assert_eq!(
        get("lessor_lease_bytes_total{direction=to_upstream,upstream=up}"),
        15.0
    );
    assert_eq!(
        get("lessor_lease_bytes_total{direction=to_client,upstream=up}"),
        15.0
    );
    assert_eq!(get("lessor_pool_max_connections{upstream=up}"), 4.0);
    assert_eq!(
        get("lessor_pool_connections{state=leased,upstream=up}"),
        0.0
    );
    assert_eq!(
        get("lessor_pool_connections{state=idle,upstream=up}"),
        f64::from(stats.idle)
    );
    assert_eq!(get("lessor_pool_waiters{upstream=up}"), 0.0);
    assert_eq!(get("lessor_upstream_ready{upstream=up}"), 1.0);
    assert_eq!(
        get("lessor_connections_created_total{upstream=up}"),
        stats.connections_created as f64
    );
    assert_eq!(
        get("lessor_connect_errors_total{reason=connect,upstream=up}"),
        0.0
    );
    assert_eq!(
        get("lessor_connect_errors_total{reason=tls_untrusted,upstream=up}"),
        0.0
    );
    assert_eq!(get("lessor_checkout_timeouts_total{upstream=up}"), 0.0);
    assert_eq!(
        get("lessor_health_checks_total{result=failed,upstream=up}"),
        0.0
    );
    assert!(get("lessor_health_checks_total{result=ok,upstream=up}") >= 4.0);
    // Histogram counts (the +Inf bucket).
    assert_eq!(
        get("lessor_lease_duration_seconds{disposition=return,upstream=up}"),
        3.0
    );
    assert_eq!(
        get("lessor_lease_duration_seconds{disposition=evict,upstream=up}"),
        1.0
    );
    assert_eq!(get("lessor_checkout_wait_seconds{upstream=up}"), 4.0);
    assert!(get("lessor_runtime_alive_tasks{}") > 0.0);
    assert!(get("lessor_process_open_fds{}") > 0.0);
    assert!(get("lessor_process_resident_memory_bytes{}") > 1e6);
    assert_eq!(
        get(&format!(
            "lessor_build_info{{version={}}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );

    let om = fetch(
        &lessor.admin,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    )
    .await
    .unwrap();
    assert_eq!(
        om.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(
        om.body.contains("lessor_leases_total{upstream=\"up\"} 4"),
        "{}",
        om.body
    );
}

/// A config for a served process with a short grace.
fn served_config(up: &TestUpstream, grace: &str) -> String {
    format!(
        "shutdown: {{ grace: {grace} }}\n{}",
        config_one(&up.addr(), EngineKind::Bb8, &[])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_without_clients_exits_at_once_with_status_0() {
    let up = TestUpstream::start().await;
    let mut served = Served::start(&served_config(&up, "120s")).await;
    eventually("ready", || async {
        fetch(&served.admin, "/readyz", None)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    served.signal("TERM");
    // Far below the two-minute grace: nothing held it open. (The bound only
    // tells "at once" from "at the end of grace", with room for a loaded
    // machine.)
    let code = served.exit_code(Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "still running long before the grace ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sequence_on_sigterm() {
    let up = TestUpstream::start().await;
    // Long enough for every step below on a loaded machine; the held lease
    // is revoked when it ends.
    let mut served = Served::start(&served_config(&up, "4s")).await;
    eventually("ready", || async {
        fetch(&served.admin, "/readyz", None)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let client = served.client().await;
    let mut held = client.lease("up", &LeaseOptions::default()).await.unwrap();
    held.send("before").await.unwrap();
    held.recv_at_least(6).await.unwrap();

    served.signal("TERM");
    // Readiness and gRPC health turn off at once.
    eventually("/readyz 503", || async {
        fetch(&served.admin, "/readyz", None)
            .await
            .is_ok_and(|r| r.status == 503)
    })
    .await;
    let verbose = fetch(&served.admin, "/readyz?verbose", None)
        .await
        .unwrap()
        .body;
    assert!(verbose.contains("[-]draining failed"), "{verbose}");
    // (A new connection for the health check would be refused: ask on the
    // connected client's channel instead, via a lease-free Stats call.)
    assert!(
        client.stats("up").await.is_ok(),
        "connected clients keep working"
    );
    // New client connections are refused (the listener closes right after
    // readiness turns off).
    eventually("a new client is refused", || async {
        Client::connect(&served.grpc).await.is_err()
    })
    .await;
    // A connected client can still take a new lease.
    let mut during = client
        .lease("up", &LeaseOptions::default())
        .await
        .expect("lease during the drain");
    during.send("during").await.unwrap();
    assert_eq!(during.recv_at_least(6).await.unwrap(), "during");
    during.release(Disposition::Return).await.unwrap();
    // The held lease is revoked when the grace runs out.
    let ended = tokio::time::timeout(PATIENCE, held.finish())
        .await
        .expect("revoked when the grace ends")
        .unwrap()
        .expect("an Ended");
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::Shutdown);
    drop(client);
    assert_eq!(served.exit_code(PATIENCE).await, Some(0));
    eventually("lessor's upstream sockets closed", || async {
        up.open() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_health_turns_not_serving_for_connected_watchers() {
    let up = TestUpstream::start().await;
    let mut lessor = Lessor::start(&config_one(&up.addr(), EngineKind::Bb8, &[])).await;
    wait_health(&lessor.addr, "", SERVING).await;
    // One health client connected before the drain.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", lessor.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = || tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let mut watch = health.watch(request()).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, SERVING);
    lessor.begin_shutdown();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a status change");
    assert_eq!(next.unwrap().unwrap().status, NOT_SERVING);
    assert_eq!(
        health.check(request()).await.unwrap().into_inner().status,
        NOT_SERVING
    );
    drop(watch);
    drop(health);
    lessor.stopped().await.unwrap();
}

/// SIGINT drains like SIGTERM; a second signal ends the process at once,
/// long before the grace, with status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_on_sigint_and_a_second_signal_exits_at_once() {
    let up = TestUpstream::start().await;
    let mut served = Served::start(&served_config(&up, "120s")).await;
    let client = served.client().await;
    let held = client.lease("up", &LeaseOptions::default()).await.unwrap();
    served.signal("INT");
    eventually("/readyz 503 after SIGINT", || async {
        fetch(&served.admin, "/readyz", None)
            .await
            .is_ok_and(|r| r.status == 503)
    })
    .await;
    // The held lease keeps the drain open.
    assert_eq!(served.exit_code(Duration::from_millis(300)).await, None);
    served.signal("INT");
    assert_eq!(
        served.exit_code(PATIENCE).await,
        Some(1),
        "a second signal exits without waiting for the lease"
    );
    drop(held);
}

/// The admin endpoints as a kubelet or Prometheus sees them: an ordinary
/// HTTP/1.1 client (reqwest), not lessor's own `admin::fetch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_a_standard_http_client() {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(&up.addr(), EngineKind::Deadpool, &[FAST])).await;
    wait_ready(&lessor, 200).await;
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let get = |path: &str| {
        let url = format!("http://{}{path}", lessor.admin);
        let http = http.clone();
        async move { http.get(url).send().await.expect("an HTTP answer") }
    };
    let livez = get("/livez").await;
    assert_eq!(livez.status(), 200);
    assert_eq!(livez.version(), reqwest::Version::HTTP_11);
    let readyz = get("/readyz?verbose").await;
    assert_eq!(readyz.status(), 200);
    let body = readyz.text().await.unwrap();
    assert!(body.contains("up"), "{body}");
    let metrics = get("/metrics").await;
    assert_eq!(metrics.status(), 200);
    let content_type = metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let m = samples(&metrics.text().await.unwrap());
    assert!(m.contains_key("lessor_leases_total{upstream=up}"), "{m:?}");
    assert_eq!(get("/no-such-page").await.status(), 404);
    up.stop().await;
    wait_ready(&lessor, 503).await;
    assert_eq!(get("/readyz").await.status(), 503);
}

/// A request head that never ends does not hold an admin connection: the
/// server closes it after its header-read timeout (5s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_closes_a_connection_whose_request_head_never_ends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(&up.addr(), EngineKind::Bb8, &[])).await;
    let mut slow = tokio::net::TcpStream::connect(&lessor.admin).await.unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nHost: lessor\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the half-sent request still holds its connection"
    );
    // Others are served meanwhile and after.
    wait_ready(&lessor, 200).await;
}

/// The admin server runs on a thread of its own: with the data plane's only
/// worker blocked, `/livez`, `/readyz` and `/metrics` still answer. Were they
/// served by the data plane, they would answer only after the worker is
/// released (here: after PATIENCE), and the release signal would find the
/// worker gone.
#[test]
fn admin_answers_while_the_data_plane_is_blocked() {
    let data_plane = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (up, lessor) = data_plane.block_on(async {
        let up = TestUpstream::start().await;
        let lessor = Lessor::start(&config_one(&up.addr(), EngineKind::Bb8, &[])).await;
        lessor.wait_for("warm", |s| s.idle >= 1).await;
        (up, lessor)
    });
    let (blocked_tx, blocked_rx) = std::sync::mpsc::channel();
    let (answered_tx, answered_rx) = std::sync::mpsc::channel::<()>();
    data_plane.spawn(async move {
        blocked_tx.send(()).unwrap();
        // Deliberately blocking: this is the saturated worker.
        let _ = answered_rx.recv_timeout(PATIENCE);
    });
    blocked_rx.recv().unwrap();
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin = lessor.admin.clone();
    let answers = client.block_on(async {
        let mut answers = Vec::new();
        for path in ["/livez", "/readyz", "/metrics"] {
            answers.push((path, fetch(&admin, path, None).await.unwrap().status));
        }
        answers
    });
    assert!(
        answered_tx.send(()).is_ok(),
        "the admin server answered only once the data plane was free: {answers:?}"
    );
    assert_eq!(
        answers,
        [("/livez", 200), ("/readyz", 200), ("/metrics", 200)]
    );
    data_plane.block_on(async move {
        drop(lessor);
        drop(up);
    });
}

/// The admin server serves at most 64 connections at once: with 64 silent
/// connections open, a 65th request waits in the accept queue, and is
/// answered once they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_caps_concurrent_connections() {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(&up.addr(), EngineKind::Bb8, &[])).await;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(tokio::net::TcpStream::connect(&lessor.admin).await.unwrap());
    }
    let admin = lessor.admin.clone();
    let queued = tokio::spawn(async move { fetch(&admin, "/livez", None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The silent ones are closed by the 5 s header timeout; past that, this
    // check would prove nothing (a loaded machine), so it is only made before.
    if started.elapsed() < Duration::from_secs(4) {
        assert!(
            !queued.is_finished(),
            "a 65th connection was served beside 64"
        );
    }
    drop(silent);
    let got = tokio::time::timeout(PATIENCE, queued)
        .await
        .expect("the queued request was never served")
        .unwrap()
        .unwrap();
    assert_eq!(got.status, 200);
}
