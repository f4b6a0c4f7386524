//! The server around the pools: Unix-socket listener, gRPC reflection, and
//! the WAIT_FOR_CLIENTS drain.

use std::time::Duration;

use lessor::EngineKind;
use lessor_client::pb::{Disposition, EndReason};
use lessor_client::{Client, LeaseOptions};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::for_both_engines;
use crate::support::{Lessor, PATIENCE, SERVING, TestUpstream, config_one};

#[tokio::test]
async fn server_listens_on_a_unix_socket() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lessor.sock");
    let listen = format!("unix://{}", path.display());
    let lessor = Lessor::start_on(&config_one(&up.addr(), EngineKind::Bb8, &[]), &listen).await;
    assert_eq!(lessor.addr, listen);
    let mut lease = lessor.lease().await.unwrap();
    lease.send("over a unix socket").await.unwrap();
    assert_eq!(lease.recv_at_least(18).await.unwrap(), "over a unix socket");
    lease.release(Disposition::Return).await.unwrap();
    lessor.shutdown().await.unwrap();
    assert!(!path.exists(), "the socket file is removed on exit");
}

#[tokio::test]
async fn server_reflection_lists_the_pool_service() {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(&up.addr(), EngineKind::Bb8, &[])).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", lessor.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"lessor.v1.Pool"), "{names:?}");
}

#[tokio::test]
async fn server_without_clients_stops_at_once() {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&long_grace(&up)).await;
    // `shutdown` allows PATIENCE, far below the two-minute grace: nothing
    // holds the drain open.
    lessor.shutdown().await.unwrap();
}

#[tokio::test]
async fn server_drain_serves_connected_clients_and_refuses_new_ones() {
    let up = TestUpstream::start().await;
    let mut lessor = Lessor::start(&long_grace(&up)).await;
    let held = lessor.lease().await.unwrap();
    lessor.begin_shutdown();
    // The listener closes: a new client connection is refused.
    let addr = lessor.addr.clone();
    crate::support::eventually("new clients refused", || {
        let addr = addr.clone();
        async move { Client::connect(&addr).await.is_err() }
    })
    .await;
    // A connected client keeps leasing, new streams included.
    let mut second = lessor
        .lease()
        .await
        .expect("connected clients keep leasing during the drain");
    second.send("still here").await.unwrap();
    assert_eq!(second.recv_at_least(10).await.unwrap(), "still here");
    assert_eq!(
        second.release(Disposition::Return).await.unwrap().reason(),
        EndReason::ClientRelease
    );
    assert_eq!(
        held.release(Disposition::Return).await.unwrap().reason(),
        EndReason::ClientRelease
    );
    // The last client leaves: lessor stops (within PATIENCE) long before
    // its two-minute grace.
    lessor.stopped().await.unwrap();
}

/// A config whose grace no test waits for.
fn long_grace(up: &TestUpstream) -> String {
    format!(
        "shutdown: {{ grace: 120s }}\n{}",
        config_one(&up.addr(), EngineKind::Bb8, &[])
    )
}

#[tokio::test]
async fn server_grace_over_revokes_leases_with_shutdown() {
    let up = TestUpstream::start().await;
    let yaml = format!(
        "shutdown: {{ grace: 200ms }}\n{}",
        config_one(&up.addr(), EngineKind::Bb8, &[])
    );
    let mut lessor = Lessor::start(&yaml).await;
    let held = lessor.lease().await.unwrap();
    lessor.begin_shutdown();
    let ended = held
        .finish()
        .await
        .unwrap()
        .expect("an Ended for the revoked lease");
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::Shutdown);
    lessor.stopped().await.unwrap();
    crate::support::eventually("every upstream socket closed", || async { up.open() == 0 }).await;
}

for_both_engines!(server_grace_end_revokes_leases_fails_waiters_and_ends_health_watches);

/// At the end of grace, on either engine: the live lease ends with
/// SHUTDOWN, a checkout still waiting gets UNAVAILABLE, a health `Watch`
/// stream ends, and `run` returns with every upstream socket closed.
async fn server_grace_end_revokes_leases_fails_waiters_and_ends_health_watches(engine: EngineKind) {
    let up = TestUpstream::start().await;
    let yaml = format!(
        "shutdown: {{ grace: 1s }}\n{}",
        config_one(
            &up.addr(),
            engine,
            &["pool: { max_size: 1, min_idle: 0, checkout_timeout: 60s }"]
        )
    );
    let mut lessor = Lessor::start(&yaml).await;
    let held = lessor.lease().await.unwrap();
    let client = lessor.client.clone();
    let waiter = tokio::spawn(async move { client.lease("up", &LeaseOptions::default()).await });
    lessor.wait_for("a waiter", |s| s.waiting == 1).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", lessor.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(PATIENCE, async {
        while watch.message().await.unwrap().unwrap().status != SERVING {}
    })
    .await
    .expect("SERVING before the drain");

    lessor.begin_shutdown();
    let ended = tokio::time::timeout(PATIENCE, held.finish())
        .await
        .expect("revoked at the end of grace")
        .unwrap()
        .expect("an Ended for the revoked lease");
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::Shutdown);
    let err = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the waiter is answered at the end of grace")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    // The watch reports NOT_SERVING, then ends.
    tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(_)) = watch.message().await {}
    })
    .await
    .expect("the health watch ends with the grace");
    drop((watch, health));
    lessor.stopped().await.unwrap();
    crate::support::eventually("every upstream socket closed", || async { up.open() == 0 }).await;
}

#[tokio::test]
async fn server_unix_socket_gets_its_mode_and_never_replaces_a_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lessor.sock");
    let addr: lessor::ListenAddr = format!("unix://{}", path.display()).parse().unwrap();
    let listener = lessor::Listener::bind_with_mode(&addr, lessor::UnixMode(0o600))
        .await
        .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(listener);
    // A regular file where the socket should go is an error, and survives.
    std::fs::write(&path, "precious").unwrap();
    let err = lessor::Listener::bind(&addr).await.err().expect("refused");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

/// `grpc.max_concurrent_streams` is advertised to clients: with 16 leases
/// open on one channel, a 17th waits (the client queues it) until one ends,
/// then is granted. One connection cannot open streams without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_caps_concurrent_streams_per_connection() {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&format!(
        "grpc: {{ max_concurrent_streams: 16 }}\n{}",
        config_one(
            &up.addr(),
            EngineKind::Bb8,
            &[
                "pool: { max_size: 32 }",
                "lease: { idle_timeout: 1h, max_duration: 1h }"
            ]
        )
    ))
    .await;
    let client = lessor.client.clone();
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(client.lease("up", &LeaseOptions::default()).await.unwrap());
    }
    let queued = tokio::spawn({
        let client = client.clone();
        async move { client.lease("up", &LeaseOptions::default()).await }
    });
    // Were the cap not advertised, the 17th would be granted at once. A
    // pause cannot make a correct server fail here, only a broken one pass.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "a 17th stream opened beside 16");
    // Stats on a connection of its own: this one has no stream to spare.
    let other = Client::connect(&lessor.addr).await.unwrap();
    assert_eq!(other.stats("up").await.unwrap()[0].leased, 16);
    let first = held.remove(0);
    first.release(Disposition::Return).await.unwrap();
    let lease = tokio::time::timeout(PATIENCE, queued)
        .await
        .expect("the queued lease was never granted")
        .unwrap()
        .unwrap();
    held.push(lease);
    for lease in held {
        lease.release(Disposition::Return).await.unwrap();
    }
    lessor
        .wait_for("every lease returned", |s| s.leased == 0)
        .await;
}

/// A simple-query message whose length field is exactly `len` (the
/// PostgreSQL length counts itself): `SELECT length('xx...')`.
fn pg_query_of_length(len: usize) -> Vec<u8> {
    let head = b"SELECT length('";
    let tail = b"')\0";
    let fill = len - 4 - head.len() - tail.len();
    let mut msg = Vec::with_capacity(len + 1);
    msg.push(b'Q');
    msg.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
    msg.extend_from_slice(head);
    msg.resize(msg.len() + fill, b'x');
    msg.extend_from_slice(tail);
    msg
}

/// Exchange's decoding limit is the documented one: with only PostgreSQL
/// upstreams, a request whose message is exactly `postgres.max_frame`
/// (larger than `grpc.max_frame`) goes through; one well above it is
/// refused by size, before it is buffered, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_exchange_limit_is_the_largest_protocol_max_frame() {
    let Some(pg) = crate::support::postgres::Postgres::start().await else {
        return;
    };
    const MAX: usize = 2 << 20;
    let yaml = format!(
        "upstreams:\n  - name: pg\n    address: \"{}\"\n    protocol: postgres\n    postgres: {{ user: trustuser, database: app, max_frame: 2MiB }}\n    pool: {{ checkout_timeout: 10s }}\n",
        pg.addr()
    );
    let lessor = Lessor::start(&yaml).await;
    let fill = MAX - 4 - "SELECT length('')\0".len();
    let done = lessor
        .client
        .exchange("pg", pg_query_of_length(MAX), None)
        .await
        .expect("a request of postgres.max_frame passes");
    let reply = String::from_utf8_lossy(&done.reply);
    assert!(reply.contains(&fill.to_string()), "{reply:?}");

    let over = pg_query_of_length(MAX + 4096);
    match lessor.client.exchange("pg", over, None).await {
        Err(lessor_client::ClientError::Status(s)) => {
            assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");
            assert!(s.message().contains("too large"), "{s:?}");
            assert!(
                s.message().contains(&(MAX + 1024).to_string()),
                "the limit is named: {s:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Still serving.
    let done = lessor
        .client
        .exchange("pg", pg_query_of_length(64), None)
        .await
        .unwrap();
    assert!(!done.reply.is_empty());
}

/// A lease's decoding limit is `grpc.max_frame`, whatever a protocol
/// upstream's `max_frame`: a 4 MiB `Data` is refused by size
/// (`OUT_OF_RANGE`), not decoded and then refused by the pump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lease_limit_is_grpc_max_frame_beside_a_redis_upstream() {
    let up = TestUpstream::start().await;
    let yaml = format!(
        "{}  - name: cache\n    address: \"127.0.0.1:1\"\n    protocol: redis\n    readiness: optional\n    pool: {{ min_idle: 0 }}\n",
        config_one(&up.addr(), EngineKind::Bb8, &[])
    );
    let lessor = Lessor::start(&yaml).await;
    let mut lease = lessor
        .client
        .lease("up", &LeaseOptions::default())
        .await
        .unwrap();
    let _ = lease.send(vec![b'x'; 4 << 20]).await;
    match lease.recv_at_least(1).await {
        Err(lessor_client::ClientError::Status(s)) => {
            assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");
        }
        other => panic!("{other:?}"),
    }
    lessor
        .wait_for("the connection evicted", |s| {
            s.leased == 0 && crate::support::evictions(s, "client_abort") == 1
        })
        .await;
}

/// One client connection carries thousands of leases, each released or
/// dropped: the HTTP/2 limits on reset streams never turn a busy client
/// away (GOAWAY ENHANCE_YOUR_CALM would fail its leases in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_one_connection_carries_thousands_of_leases() {
    let up = crate::support::TestUpstream::start().await;
    let lessor = crate::support::Lessor::start(&crate::support::config_one(
        &up.addr(),
        lessor::EngineKind::Bb8,
        &["pool: { max_size: 4, min_idle: 1 }"],
    ))
    .await;
    for i in 0..1500 {
        let lease = lessor
            .client
            .lease("up", &lessor_client::LeaseOptions::default())
            .await
            .unwrap_or_else(|e| panic!("lease {i}: {e}"));
        if i % 2 == 0 {
            lease
                .release(lessor_client::pb::Disposition::Return)
                .await
                .unwrap_or_else(|e| panic!("release {i}: {e}"));
        } else {
            drop(lease);
        }
    }
}
