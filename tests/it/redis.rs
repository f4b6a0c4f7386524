//! Against a real redis-server started per test on a free port, on both
//! engines: the PING probe, connections killed behind lessor's back
//! (`CLIENT KILL`), the upstream closing mid-lease (`QUIT`), a late reply
//! (a blocked `BLPOP`) that must never reach the next lease, and
//! readiness through a kill and restart. Skipped with a message where
//! redis-server is missing, unless `LESSOR_REQUIRE_REDIS=1`.

use lessor::EngineKind;
use lessor_client::pb::{Disposition, EndReason};

use crate::for_both_engines;
use crate::support::redis::Redis;
use crate::support::{Lessor, config_one, eventually, evictions, port_of, wait_close_wait};

for_both_engines!(
    redis_commands_through_a_lease_with_ping_probe,
    redis_client_kill_is_caught_on_checkout,
    redis_quit_mid_lease_ends_with_upstream_closed,
    redis_late_reply_never_leaks_into_next_lease,
    redis_readiness_follows_kill_and_restart,
);

const PING_PROBE: &str = "probe: { send: \"PING\\r\\n\", expect: \"+PONG\\r\\n\", timeout: 5s }";

fn health(interval: &str) -> String {
    format!("health: {{ interval: {interval}, skip_if_used_within: 1ms, {PING_PROBE} }}")
}

async fn start(engine: EngineKind, pool: &str, interval: &str) -> Option<(Redis, Lessor)> {
    let redis = Redis::start().await?;
    let lessor = Lessor::start(&config_one(
        &redis.addr(),
        engine,
        &[pool, &health(interval)],
    ))
    .await;
    Some((redis, lessor))
}

async fn redis_commands_through_a_lease_with_ping_probe(engine: EngineKind) {
    let Some((redis, lessor)) = start(engine, "pool: { min_idle: 1 }", "50ms").await else {
        return;
    };
    let mut lease = lessor.lease().await.unwrap();
    lease.send("SET lessor:k v1\r\n").await.unwrap();
    assert_eq!(lease.recv_at_least(5).await.unwrap(), "+OK\r\n");
    lease.send("GET lessor:k\r\n").await.unwrap();
    assert_eq!(lease.recv_at_least(8).await.unwrap(), "$2\r\nv1\r\n");
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Return);
    // The background sweep probes the idle connection with PING, as
    // redis-server itself counts (the client sent none).
    let before = redis.calls("ping").await;
    eventually("background PING probes reach redis", || async {
        redis.calls("ping").await >= before + 2
    })
    .await;
    let s = lessor.stats("up").await;
    assert_eq!(s.health_check_failures, 0, "{s:#?}");
}

async fn redis_client_kill_is_caught_on_checkout(engine: EngineKind) {
    // max_size 2: both leases below need both slots, so both killed sockets
    // are vetted by checkouts, whatever order a refill puts fresh ones in.
    let Some((redis, lessor)) = start(engine, "pool: { max_size: 2, min_idle: 2 }", "1h").await
    else {
        return;
    };
    lessor.wait_for("min_idle", |s| s.idle == 2).await;
    // redis-server has accepted both (the third client is the one asking).
    eventually("redis accepted lessor's connections", || async {
        redis.info_field("clients", "connected_clients").await == Some(3)
    })
    .await;
    // Kill every normal client but the one asking: lessor's pooled sockets.
    let reply = redis
        .command(b"CLIENT KILL TYPE normal SKIPME yes\r\n")
        .await
        .unwrap();
    assert_eq!(reply, b":2\r\n", "{}", String::from_utf8_lossy(&reply));
    // Once the FINs have landed, checkouts must skip both.
    wait_close_wait(port_of(&redis.addr()), 2).await;
    let mut leases = Vec::new();
    for _ in 0..2 {
        let mut lease = lessor.lease().await.unwrap();
        lease.send("PING\r\n").await.unwrap();
        assert_eq!(lease.recv_at_least(7).await.unwrap(), "+PONG\r\n");
        leases.push(lease);
    }
    for lease in leases {
        lease.release(Disposition::Return).await.unwrap();
    }
    let s = lessor.stats("up").await;
    assert_eq!(evictions(&s, "health_check"), 2, "{s:#?}");
    assert_eq!(s.health_check_failures, 2);
}

async fn redis_quit_mid_lease_ends_with_upstream_closed(engine: EngineKind) {
    let Some((_redis, lessor)) = start(engine, "pool: { min_idle: 1 }", "1h").await else {
        return;
    };
    let mut lease = lessor.lease().await.unwrap();
    lease.send("QUIT\r\n").await.unwrap();
    assert_eq!(lease.recv_at_least(5).await.unwrap(), "+OK\r\n");
    assert_eq!(lease.recv().await.unwrap(), None);
    let ended = lease.ended().cloned().unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::UpstreamClosed);
    lessor
        .wait_for("upstream_closed eviction", |s| {
            evictions(s, "upstream_closed") == 1 && s.leased == 0
        })
        .await;
}

async fn redis_late_reply_never_leaks_into_next_lease(engine: EngineKind) {
    let Some((redis, lessor)) = start(engine, "pool: { max_size: 1, min_idle: 1 }", "1h").await
    else {
        return;
    };
    let mut lease = lessor.lease().await.unwrap();
    // BLPOP blocks until the list gets an element: its reply is late for as
    // long as the test wants. The client releases while it is blocked.
    lease.send("BLPOP lessor:late 0\r\n").await.unwrap();
    eventually("redis has the BLPOP blocked", || async {
        redis.info_field("clients", "blocked_clients").await == Some(1)
    })
    .await;
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::Dirty);

    let mut lease = lessor.lease().await.unwrap();
    lease.send("PING\r\n").await.unwrap();
    assert_eq!(lease.recv_at_least(7).await.unwrap(), "+PONG\r\n");
    // Now the BLPOP's reply exists; it must not arrive on this lease. The
    // evicted connection is gone from redis, so no client is blocked and
    // the element stays in the list.
    eventually("the evicted connection left redis", || async {
        redis.info_field("clients", "blocked_clients").await == Some(0)
    })
    .await;
    let pushed = redis.command(b"LPUSH lessor:late x\r\n").await.unwrap();
    assert_eq!(pushed, b":1\r\n", "{}", String::from_utf8_lossy(&pushed));
    lease.send("LLEN lessor:late\r\n").await.unwrap();
    assert_eq!(lease.recv_at_least(4).await.unwrap(), ":1\r\n");
    lease.release(Disposition::Return).await.unwrap();
    assert_eq!(evictions(&lessor.stats("up").await, "dirty"), 1);
}

async fn redis_readiness_follows_kill_and_restart(engine: EngineKind) {
    let Some((mut redis, lessor)) = start(engine, "pool: { min_idle: 1 }", "50ms").await else {
        return;
    };
    lessor.wait_for("ready", |s| s.ready && s.idle == 1).await;
    redis.kill();
    lessor
        .wait_for("not ready after the kill", |s| !s.ready)
        .await;
    let err = lessor.lease().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    redis.restart().await;
    lessor
        .wait_for("ready after the restart", |s| s.ready && s.idle == 1)
        .await;
    let mut lease = lessor.lease().await.unwrap();
    lease.send("PING\r\n").await.unwrap();
    assert_eq!(lease.recv_at_least(7).await.unwrap(), "+PONG\r\n");
    lease.release(Disposition::Return).await.unwrap();
}
