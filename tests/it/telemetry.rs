//! Traces over OTLP into real receivers (gRPC and HTTP/protobuf), joined to
//! the caller's `traceparent`; resource attributes; the config file's
//! endpoint and the environment's precedence; a dead collector that leases
//! never notice; JSON logs carrying the trace id; and, when `LESSOR_ROTEL`
//! names a `rotel-agent` binary, the same through a real collector.

use lessor::EngineKind;
use lessor_client::pb::Disposition;
use lessor_client::{Client, LeaseOptions};

use crate::support::otlp::{Got, Received, Receiver};
use crate::support::process::Served;
use crate::support::{TestUpstream, config_one};

/// A W3C trace context for the client's own span.
struct Caller {
    trace_id: String,
    span_id: String,
}

impl Caller {
    fn new() -> Self {
        let hex = |n: usize| {
            (0..n)
                .map(|_| format!("{:x}", fastrand::u8(0..16)))
                .collect::<String>()
        };
        Self {
            trace_id: hex(32),
            span_id: hex(16),
        }
    }

    fn options(&self) -> LeaseOptions {
        LeaseOptions {
            metadata: vec![(
                "traceparent".into(),
                format!("00-{}-{}-01", self.trace_id, self.span_id),
            )],
            ..Default::default()
        }
    }
}

const FAST_EXPORT: [(&str, &str); 1] = [("OTEL_BSP_SCHEDULE_DELAY", "50")];

async fn one_lease(served: &Served, caller: &Caller) {
    let client = served.client().await;
    let mut lease = client.lease("up", &caller.options()).await.unwrap();
    lease.send("hello").await.unwrap();
    assert_eq!(lease.recv_at_least(5).await.unwrap(), "hello");
    lease.release(Disposition::Return).await.unwrap();
}

fn lease_span<'a>(spans: &'a [Got], caller: &Caller) -> Option<&'a Got> {
    spans
        .iter()
        .find(|s| s.name == "lease" && s.trace_id == caller.trace_id)
}

async fn wait_lease(received: &Received, caller: &Caller) -> Vec<Got> {
    received
        .wait("the lease span in the caller's trace", |spans| {
            lease_span(spans, caller).is_some()
                && spans
                    .iter()
                    .any(|s| s.name == "checkout" && s.trace_id == caller.trace_id)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_grpc_export_joins_the_callers_trace() {
    let receiver = Receiver::grpc().await;
    let up = TestUpstream::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url.as_str()),
        ("POD_NAME", "shop-7d9f"),
        ("POD_NAMESPACE", "shop"),
        ("NODE_NAME", "node-3"),
        FAST_EXPORT[0],
    ];
    // min_idle 0: lessor keeps one connection warm, so a second concurrent
    // lease needs a dial.
    let served = Served::start_with(
        &config_one(&up.addr(), EngineKind::Bb8, &["pool: { min_idle: 0 }"]),
        &env,
    )
    .await;
    let caller = Caller::new();
    one_lease(&served, &caller).await;
    let spans = wait_lease(&receiver.spans, &caller).await;

    let lease = lease_span(&spans, &caller).unwrap();
    assert_eq!(
        lease.parent, caller.span_id,
        "the lease is a child of the caller's span"
    );
    assert_eq!(lease.kind, 2, "a server span");
    let a = &lease.attrs;
    assert_eq!(a["lessor.upstream"], "up");
    assert_eq!(a["server.address"], "127.0.0.1");
    assert_eq!(a["server.port"], up.addr().rsplit(':').next().unwrap());
    assert_eq!(a["rpc.system"], "grpc");
    assert_eq!(a["rpc.method"], "Lease");
    assert_eq!(a["lessor.bytes.to_upstream"], "5");
    assert_eq!(a["lessor.bytes.to_client"], "5");
    assert_eq!(a["lessor.disposition"], "RETURN");
    assert_eq!(a["lessor.end_reason"], "CLIENT_RELEASE");
    for key in [
        "lessor.connection.id",
        "lessor.connection.reused",
        "lessor.checkout.wait_us",
        "lessor.lease.id",
    ] {
        assert!(a.contains_key(key), "missing {key}: {a:?}");
    }
    let checkout = spans
        .iter()
        .find(|s| s.name == "checkout" && s.trace_id == caller.trace_id)
        .unwrap();
    assert_eq!(
        checkout.parent, lease.span_id,
        "checkout nests under the lease"
    );
    assert!(checkout.attrs.contains_key("lessor.checkout.wait_us"));
    let r = &lease.resource;
    assert_eq!(r["service.name"], "lessor");
    assert_eq!(r["service.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(r["k8s.pod.name"], "shop-7d9f");
    assert_eq!(r["k8s.namespace.name"], "shop");
    assert_eq!(r["k8s.node.name"], "node-3");

    // A lease that needs a dial (the one idle connection is held) shows a
    // connect span under its checkout; one that is evicted, an eviction event.
    let client = served.client().await;
    let held = client.lease("up", &LeaseOptions::default()).await.unwrap();
    let second = Caller::new();
    let lease = client.lease("up", &second.options()).await.unwrap();
    lease.release(Disposition::Evict).await.unwrap();
    held.release(Disposition::Return).await.unwrap();
    // The batch exporter may send these three in different batches: wait
    // for every span read below, not just the first one.
    let spans = receiver
        .spans
        .wait(
            "the second lease's lease, checkout and connect spans",
            |spans| {
                ["lease", "checkout", "connect"].iter().all(|name| {
                    spans
                        .iter()
                        .any(|s| s.name == *name && s.trace_id == second.trace_id)
                })
            },
        )
        .await;
    let lease = lease_span(&spans, &second).unwrap();
    assert!(lease.events.iter().any(|e| e == "eviction"), "{lease:?}");
    assert_eq!(lease.attrs["lessor.disposition"], "EVICT");
    let checkout = spans
        .iter()
        .find(|s| s.name == "checkout" && s.trace_id == second.trace_id)
        .unwrap();
    let connect = spans
        .iter()
        .find(|s| s.name == "connect" && s.trace_id == second.trace_id)
        .unwrap();
    assert_eq!(connect.parent, checkout.span_id);

    // A lease that fails sets its span's status to error, with the gRPC code.
    let third = Caller::new();
    let err = client.lease("nope", &third.options()).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    let spans = receiver
        .spans
        .wait("the failed lease's span", |spans| {
            lease_span(spans, &third).is_some()
        })
        .await;
    let failed = lease_span(&spans, &third).unwrap();
    assert_eq!(failed.status, 2, "status error: {failed:?}");
    assert_eq!(failed.attrs["rpc.grpc.status_code"], "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_http_protobuf_export() {
    let receiver = Receiver::http().await;
    let up = TestUpstream::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_SERVICE_NAME", "cart-lessor"),
        FAST_EXPORT[0],
    ];
    let served = Served::start_with(&config_one(&up.addr(), EngineKind::Deadpool, &[]), &env).await;
    let caller = Caller::new();
    one_lease(&served, &caller).await;
    let spans = wait_lease(&receiver.spans, &caller).await;
    let lease = lease_span(&spans, &caller).unwrap();
    assert_eq!(lease.parent, caller.span_id);
    assert_eq!(lease.resource["service.name"], "cart-lessor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_config_file_endpoint_and_env_precedence() {
    let from_file = Receiver::http().await;
    let from_env = Receiver::grpc().await;
    let up = TestUpstream::start().await;
    let yaml = format!(
        "telemetry: {{ endpoint: \"{}\", protocol: http/protobuf }}\n{}",
        from_file.url,
        config_one(&up.addr(), EngineKind::Bb8, &[])
    );
    // The file alone: HTTP to its endpoint, /v1/traces appended.
    let served = Served::start_with(&yaml, &FAST_EXPORT).await;
    let caller = Caller::new();
    one_lease(&served, &caller).await;
    wait_lease(&from_file.spans, &caller).await;
    drop(served);
    // The environment wins over the file: gRPC to the environment's endpoint.
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", from_env.url.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        FAST_EXPORT[0],
    ];
    let mut served = Served::start_with(&yaml, &env).await;
    let caller = Caller::new();
    one_lease(&served, &caller).await;
    wait_lease(&from_env.spans, &caller).await;
    // Once the process has flushed its exporter and exited, nothing more can
    // arrive: only then is "the file's endpoint got nothing" a fact.
    served.signal("TERM");
    assert_eq!(served.exit_code(crate::support::PATIENCE).await, Some(0));
    assert!(lease_span(&from_file.spans.all(), &caller).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_dead_collector_leaves_leases_alone() {
    // A reserved port nothing listens on: connections are refused.
    let endpoint = format!("http://127.0.0.1:{}", crate::support::ports::reserve());
    let up = TestUpstream::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "16"),
        ("LESSOR_LOG_FORMAT", "json"),
        ("RUST_LOG", "lessor=debug"),
    ];
    let served = Served::start_with(&config_one(&up.addr(), EngineKind::Bb8, &[]), &env).await;
    let client = Client::connect(&served.grpc).await.unwrap();
    let caller = Caller::new();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let client = client.clone();
            let options = caller.options();
            tokio::spawn(async move {
                for i in 0..50 {
                    let mut lease = client.lease("up", &options).await.unwrap();
                    let msg = format!("{w}-{i}");
                    lease.send(msg.clone()).await.unwrap();
                    assert_eq!(
                        lease.recv_at_least(msg.len()).await.unwrap(),
                        msg.as_bytes()
                    );
                    assert_eq!(
                        lease
                            .release(Disposition::Return)
                            .await
                            .unwrap()
                            .disposition(),
                        Disposition::Return
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    // Spans that could not go anywhere are counted, not kept.
    crate::support::eventually("failed or dropped spans counted", || async {
        let m = crate::support::http::fetch(&served.admin, "/metrics", None)
            .await
            .unwrap()
            .body;
        let count = |outcome: &str| {
            m.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "lessor_trace_spans_total{{outcome=\"{outcome}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        count("exported") == 0 && count("failed") + count("dropped") > 0
    })
    .await;
    // JSON logs carry the caller's trace id.
    let logs = served.stdout();
    let granted: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("lease granted"))
        .collect();
    assert!(
        !granted.is_empty(),
        "no `lease granted` log lines in:\n{logs}"
    );
    for line in granted.iter().take(5) {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not JSON: {line}"
        );
        assert!(
            line.contains(&format!("\"trace_id\":\"{}\"", caller.trace_id)),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_through_a_real_collector() {
    let Ok(rotel) = std::env::var("LESSOR_ROTEL") else {
        crate::support::skip("set LESSOR_ROTEL to a rotel-agent binary to run the collector test");
        return;
    };
    let receiver = Receiver::grpc().await;
    let port = crate::support::ports::reserve();
    let http_port = crate::support::ports::reserve();
    let agent = crate::support::process::command(&rotel)
        .args([
            "start",
            "--otlp-grpc-endpoint",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
        .args([
            "--exporter",
            "otlp",
            "--otlp-exporter-endpoint",
            &receiver.url,
        ])
        .args(["--batch-timeout", "100ms"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start rotel-agent");
    let _agent = KillOnDrop(agent);
    crate::support::eventually("rotel listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let up = TestUpstream::start().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        FAST_EXPORT[0],
    ];
    let served = Served::start_with(&config_one(&up.addr(), EngineKind::Bb8, &[]), &env).await;
    let caller = Caller::new();
    one_lease(&served, &caller).await;
    let spans = wait_lease(&receiver.spans, &caller).await;
    assert_eq!(lease_span(&spans, &caller).unwrap().parent, caller.span_id);
}

/// Stops the collector however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A PostgreSQL client that knows nothing of lessor joins lessor's span of
/// its transaction to its trace with a sqlcommenter comment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_pg_listener_joins_a_sqlcommenter_trace() {
    let Some(pg) = crate::support::postgres::Postgres::start().await else {
        return;
    };
    let receiver = Receiver::grpc().await;
    let port = crate::support::ports::reserve();
    let listen = format!("listen: {{ address: \"127.0.0.1:{port}\" }}");
    let served = Served::start_with(
        &config_one(
            &pg.addr(),
            EngineKind::Bb8,
            &[
                "protocol: postgres",
                "postgres: { user: trustuser, database: app }",
                &listen,
            ],
        ),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url.as_str()),
            FAST_EXPORT[0],
        ],
    )
    .await;
    let caller = Caller::new();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("trustuser")
        .dbname("app")
        .connect_timeout(crate::support::PATIENCE);
    // The listener binds as the process starts: retried until it accepts.
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    let client = loop {
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                break client;
            }
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let _ = &served;
    let sql = format!(
        "SELECT 1 /*traceparent='00-{}-{}-01'*/",
        caller.trace_id, caller.span_id
    );
    client.simple_query(&sql).await.unwrap();
    let spans = receiver
        .spans
        .wait("the transaction span", |s| {
            s.iter()
                .any(|g| g.name == "transaction" && g.trace_id == caller.trace_id)
        })
        .await;
    let tx = spans
        .iter()
        .find(|g| g.name == "transaction" && g.trace_id == caller.trace_id)
        .unwrap();
    assert_eq!(tx.parent, caller.span_id);
    assert_eq!(tx.attrs["lessor.upstream"], "up");
    assert_eq!(tx.attrs["db.system"], "postgresql");
}
