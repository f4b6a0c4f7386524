//! The pool's background behaviour, on both engines: `min_idle` kept,
//! idle connections beyond it closed, lifetimes enforced, dead idle
//! connections swept, readiness following the upstream, and the pool's
//! invariants under concurrent churn.

use std::time::Duration;

use lessor::EngineKind;
use lessor_client::LeaseOptions;
use lessor_client::pb::Disposition;

use crate::conformance::{FAST_SWEEP, start};
use crate::for_both_engines;
use crate::support::evictions;

for_both_engines!(
    pool_keeps_min_idle,
    pool_closes_idle_beyond_min_idle,
    pool_replaces_connections_past_max_lifetime,
    pool_sweep_evicts_dead_idle_connections,
    pool_readiness_follows_upstream,
    pool_invariants_hold_under_concurrency,
    pool_upstream_sockets_have_nodelay_and_keepalive,
    pool_one_failed_dial_does_not_fail_every_waiter,
    pool_min_idle_zero_holds_nothing_when_idle,
);

async fn pool_keeps_min_idle(engine: EngineKind) {
    let (up, lessor) = start(engine, &["pool: { max_size: 8, min_idle: 3 }"]).await;
    lessor
        .wait_for("min_idle warm-up", |s| s.idle == 3 && s.connections == 3)
        .await;
    // Taking two leaves one idle; the pool refills to three idle.
    let a = lessor.lease().await.unwrap();
    let b = lessor.lease().await.unwrap();
    let s = lessor
        .wait_for("refill to min_idle", |s| s.idle == 3 && s.leased == 2)
        .await;
    assert_eq!(s.connections, 5);
    a.release(Disposition::Evict).await.unwrap();
    b.release(Disposition::Evict).await.unwrap();
    lessor
        .wait_for("back to min_idle", |s| s.idle == 3 && s.connections == 3)
        .await;
    crate::support::eventually("upstream agrees", || async { up.open() == 3 }).await;
}

async fn pool_closes_idle_beyond_min_idle(engine: EngineKind) {
    let (up, lessor) = start(
        engine,
        &[
            "pool: { max_size: 8, min_idle: 1, idle_timeout: 200ms }",
            FAST_SWEEP,
        ],
    )
    .await;
    // Four leases held at once: four connections, whatever the sweep does
    // meanwhile.
    let leases: Vec<_> = futures::future::join_all((0..4).map(|_| lessor.lease()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ids: std::collections::HashSet<u64> =
        leases.iter().map(|l| l.granted().connection_id).collect();
    assert_eq!(ids.len(), 4);
    for lease in leases {
        lease.release(Disposition::Return).await.unwrap();
    }
    let s = lessor
        .wait_for("idle connections beyond min_idle to close", |s| {
            s.idle == 1 && s.connections == 1
        })
        .await;
    assert!(evictions(&s, "idle_timeout") >= 3, "{s:#?}");
    crate::support::eventually("upstream agrees", || async { up.open() == 1 }).await;
}

async fn pool_replaces_connections_past_max_lifetime(engine: EngineKind) {
    let (_up, lessor) = start(
        engine,
        &["pool: { min_idle: 2, max_lifetime: 150ms }", FAST_SWEEP],
    )
    .await;
    lessor
        .wait_for("connections replaced after max_lifetime", |s| {
            evictions(s, "max_lifetime") >= 2 && s.connections_created >= 4 && s.idle >= 2
        })
        .await;
}

async fn pool_sweep_evicts_dead_idle_connections(engine: EngineKind) {
    let (up, lessor) = start(engine, &["pool: { min_idle: 2 }", FAST_SWEEP]).await;
    lessor.wait_for("min_idle", |s| s.idle == 2).await;
    let created = lessor.stats("up").await.connections_created;
    lessor.until_accepted(&up).await;
    up.close_all();
    let s = lessor
        .wait_for("the sweep replaces dead idle connections", |s| {
            evictions(s, "health_check") >= 2 && s.idle == 2 && s.connections_created >= created + 2
        })
        .await;
    assert!(s.health_check_failures >= 2);
}

async fn pool_readiness_follows_upstream(engine: EngineKind) {
    let (up, lessor) = start(engine, &["pool: { min_idle: 1 }", FAST_SWEEP]).await;
    lessor
        .wait_for("ready after the startup dial", |s| s.ready)
        .await;
    up.stop().await;
    lessor
        .wait_for("not ready once the upstream is down", |s| !s.ready)
        .await;
    up.restart().await;
    lessor
        .wait_for("ready again when it returns", |s| s.ready && s.idle == 1)
        .await;
}

async fn pool_invariants_hold_under_concurrency(engine: EngineKind) {
    let (_up, lessor) = start(
        engine,
        &["pool: { max_size: 4, min_idle: 1, checkout_timeout: 10s }"],
    )
    .await;
    let workers = (0..16).map(|w| {
        let client = lessor.client.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                let mut lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
                let msg = format!("w{w}-{i}");
                lease.send(msg.clone()).await.unwrap();
                assert_eq!(
                    lease.recv_at_least(msg.len()).await.unwrap(),
                    msg.as_bytes()
                );
                match i % 3 {
                    0 => drop(lease),
                    1 => {
                        lease.release(Disposition::Evict).await.unwrap();
                    }
                    _ => {
                        lease.release(Disposition::Return).await.unwrap();
                    }
                }
            }
        })
    });
    let all = futures::future::join_all(workers);
    tokio::pin!(all);
    loop {
        tokio::select! {
            done = &mut all => {
                for r in done {
                    r.unwrap();
                }
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(5)) => {
                let s = lessor.stats("up").await;
                assert!(s.connections <= 4, "connections over max_size: {s:#?}");
                assert!(s.leased <= 4, "{s:#?}");
            }
        }
    }
    let s = lessor
        .wait_for("every lease finished", |s| s.leased == 0 && s.waiting == 0)
        .await;
    assert_eq!(s.leases_granted, 16 * 20);
    assert!(s.connections <= 4);
}

/// lessor runs in this process: its sockets are this process's descriptors,
/// so the options the kernel holds for them can be read back directly.
async fn pool_upstream_sockets_have_nodelay_and_keepalive(engine: EngineKind) {
    let (up, lessor) = start(
        engine,
        &["pool: { max_size: 4, min_idle: 3, tcp_keepalive: { idle: 7s, interval: 2s, probes: 4 }, tcp_user_timeout: 9s }"],
    )
    .await;
    lessor.wait_for("min_idle", |s| s.idle == 3).await;
    let upstream: std::net::SocketAddr = up.addr().parse().unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the descriptor belongs to this process and is only read
        // from while borrowed; nothing here closes it.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let Ok(peer) = socket.peer_addr() else {
            continue;
        };
        if peer.as_socket() != Some(upstream) {
            continue;
        }
        seen += 1;
        assert!(socket.tcp_nodelay().unwrap(), "TCP_NODELAY off");
        assert!(socket.keepalive().unwrap(), "SO_KEEPALIVE off");
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(9))
        );
    }
    assert_eq!(seen, 3, "lessor's pooled sockets to the upstream");
}

/// The pool is full, two checkouts wait; one lease evicts its connection and
/// the redial fails. The waiters keep waiting (a lease still holds a healthy
/// connection that can come back) and both are served. (Ejection is out of
/// the picture: the waiters' own redials, however many a slow machine lets
/// them make, must not eject the endpoint here.)
async fn pool_one_failed_dial_does_not_fail_every_waiter(engine: EngineKind) {
    let (up, lessor) = start(
        engine,
        &[
            "pool: { max_size: 2, min_idle: 0, checkout_timeout: 60s }",
            "outlier: { consecutive_failures: 1000 }",
        ],
    )
    .await;
    let a = lessor.lease().await.unwrap();
    let b = lessor.lease().await.unwrap();
    let waiter = || {
        let client = lessor.client.clone();
        tokio::spawn(async move { client.lease("up", &LeaseOptions::default()).await })
    };
    let (w1, w2) = (waiter(), waiter());
    lessor.wait_for("two waiters", |s| s.waiting == 2).await;
    up.stop_listening().await;
    a.release(Disposition::Evict).await.unwrap();
    let s = lessor
        .wait_for("the redial to fail", |s| s.connect_errors >= 1)
        .await;
    assert_eq!(s.waiting, 2, "a failed dial failed the waiters: {s:#?}");
    b.release(Disposition::Return).await.unwrap();
    // One waiter gets the returned connection, then hands it to the other.
    let mut waiters = vec![w1, w2];
    while !waiters.is_empty() {
        let (done, _, rest) = futures::future::select_all(waiters).await;
        let lease = done.unwrap().expect("every waiter is served");
        lease.release(Disposition::Return).await.unwrap();
        waiters = rest;
    }
    let s = lessor.stats("up").await;
    assert_eq!((s.leased, s.waiting), (0, 0), "{s:#?}");
}

/// `min_idle: 0` leaves the upstream alone once `idle_timeout` passes;
/// readiness follows the last outcome and comes back by itself.
async fn pool_min_idle_zero_holds_nothing_when_idle(engine: EngineKind) {
    let (up, lessor) = start(
        engine,
        &["pool: { min_idle: 0, idle_timeout: 200ms }", FAST_SWEEP],
    )
    .await;
    lessor.wait_for("reached at startup", |s| s.ready).await;
    let lease = lessor.lease().await.unwrap();
    lease.release(Disposition::Return).await.unwrap();
    let s = lessor
        .wait_for("nothing held once idle", |s| s.connections == 0)
        .await;
    assert!(s.ready, "{s:#?}");
    assert!(evictions(&s, "idle_timeout") >= 1, "{s:#?}");
    crate::support::eventually("the upstream sees no connection", || async {
        up.open() == 0
    })
    .await;
    // The upstream goes away: the next lease's dial fails, readiness follows.
    up.stop().await;
    let err = lessor.lease().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    lessor.wait_for("not ready", |s| !s.ready).await;
    // It comes back: a re-check dial finds it without any lease asking.
    up.restart().await;
    lessor.wait_for("ready again", |s| s.ready).await;
    lessor
        .wait_for("and nothing held again", |s| s.connections == 0)
        .await;
}
