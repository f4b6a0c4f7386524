//! A real redis-server behind a fault-injecting proxy (`support::proxy`), on
//! both engines: the path goes silent under load, closes mid-reply, loses
//! one direction, narrows, or slows past a client's deadline. Whatever it
//! does, no connection stays leased once the clients are gone, and every
//! close is counted.

use std::time::Duration;

use lessor::EngineKind;
use lessor_client::LeaseOptions;
use lessor_client::pb::{Disposition, EndReason};

use crate::for_both_engines;
use crate::support::proxy::{Fault, FaultProxy};
use crate::support::redis::Redis;
use crate::support::{Lessor, config_one, eventually, evictions};

for_both_engines!(
    fault_blackholed_upstream_under_load_leaves_nothing_leased,
    fault_close_mid_reply_ends_with_upstream_closed,
    fault_half_open_path_makes_a_return_dirty,
    fault_narrow_path_still_delivers_every_byte,
    fault_latency_beyond_a_client_deadline_keeps_the_connection,
);

/// redis-server, a proxy in front of it, and lessor dialing the proxy.
async fn start(engine: EngineKind, extra: &[&str]) -> Option<(Redis, FaultProxy, Lessor)> {
    let redis = Redis::start().await?;
    let proxy = FaultProxy::start(&redis.addr()).await;
    let lessor = Lessor::start(&config_one(&proxy.addr(), engine, extra)).await;
    Some((redis, proxy, lessor))
}

const PING_PROBE: &str = "health: { interval: 1h, skip_if_used_within: 1ms, probe: { send: \"PING\\r\\n\", expect: \"+PONG\\r\\n\", timeout: 30s } }";

async fn fault_blackholed_upstream_under_load_leaves_nothing_leased(engine: EngineKind) {
    let Some((_redis, proxy, lessor)) = start(
        engine,
        &["pool: { max_size: 4, min_idle: 2, checkout_timeout: 500ms }"],
    )
    .await
    else {
        return;
    };
    lessor.wait_for("warm", |s| s.idle == 2).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let client = lessor.client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut answered = 0;
                while !stop.is_cancelled() {
                    let Ok(mut lease) = client.lease("up", &LeaseOptions::default()).await else {
                        continue;
                    };
                    lease.send("PING\r\n").await.unwrap();
                    // A client that gives up on a silent upstream drops its
                    // lease: an abort.
                    let reply =
                        tokio::time::timeout(Duration::from_millis(200), lease.recv_at_least(7))
                            .await;
                    if let Ok(Ok(_)) = reply {
                        answered += 1;
                        let _ = lease.release(Disposition::Return).await;
                    }
                }
                answered
            })
        })
        .collect();
    eventually("traffic flowing", || async { proxy.forwarded() > 1000 }).await;
    proxy.set(Fault::Blackhole);
    eventually("clients giving up on the silent upstream", || async {
        lessor.stats("up").await.evictions["client_abort"] >= 8
    })
    .await;
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }
    lessor
        .wait_for("nothing leased once the clients are gone", |s| {
            s.leased == 0 && s.waiting == 0
        })
        .await;
    lessor.assert_accounted().await;
}

async fn fault_close_mid_reply_ends_with_upstream_closed(engine: EngineKind) {
    let Some((redis, proxy, lessor)) = start(engine, &["pool: { min_idle: 1 }"]).await else {
        return;
    };
    // A 512 KiB value, cut off after 64 KiB of its reply.
    let value = "v".repeat(512 * 1024);
    let set = format!(
        "*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n{value}\r\n",
        value.len()
    );
    let mut lease = lessor.lease().await.unwrap();
    lease.send(set).await.unwrap();
    assert_eq!(lease.recv_at_least(5).await.unwrap(), "+OK\r\n");
    lease.release(Disposition::Return).await.unwrap();
    let mut lease = lessor.lease().await.unwrap();
    proxy.set(Fault::CloseAfter(proxy.forwarded() + 64 * 1024));
    lease.send("GET big\r\n").await.unwrap();
    let mut got = 0;
    while let Some(bytes) = lease.recv().await.unwrap() {
        got += bytes.len();
    }
    assert!(got < value.len(), "got {got} bytes");
    let ended = lease.ended().cloned().expect("an Ended");
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::UpstreamClosed, "{ended:?}");
    proxy.set(Fault::Pass);
    let s = lessor
        .wait_for("upstream_closed counted", |s| {
            evictions(s, "upstream_closed") == 1 && s.leased == 0
        })
        .await;
    assert!(s.ready);
    drop(redis);
    lessor.assert_accounted().await;
}

async fn fault_half_open_path_makes_a_return_dirty(engine: EngineKind) {
    let Some((redis, proxy, lessor)) = start(engine, &["pool: { min_idle: 1 }"]).await else {
        return;
    };
    proxy.set(Fault::HalfOpen);
    let mut lease = lessor.lease().await.unwrap();
    lease.send("INCR lessor:half\r\n").await.unwrap();
    // Redis ran it (the request got through); the reply never comes back.
    eventually("redis ran the command", || async {
        redis.command(b"GET lessor:half\r\n").await.unwrap() == b"$1\r\n1\r\n"
    })
    .await;
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::Dirty);
    lessor.assert_accounted().await;
}

async fn fault_narrow_path_still_delivers_every_byte(engine: EngineKind) {
    let Some((_redis, proxy, lessor)) = start(engine, &["pool: { min_idle: 1 }"]).await else {
        return;
    };
    let value = "n".repeat(256 * 1024);
    let set = format!(
        "*3\r\n$3\r\nSET\r\n$6\r\nnarrow\r\n${}\r\n{value}\r\n",
        value.len()
    );
    proxy.set(Fault::Bandwidth(2 * 1024 * 1024));
    let mut lease = lessor.lease().await.unwrap();
    lease.send(set).await.unwrap();
    assert_eq!(lease.recv_at_least(5).await.unwrap(), "+OK\r\n");
    lease.send("GET narrow\r\n").await.unwrap();
    let want = format!("${}\r\n{value}\r\n", value.len());
    let got = lease.recv_at_least(want.len()).await.unwrap();
    assert!(got == want.as_bytes(), "a reply of {} bytes", got.len());
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Return);
    lessor.assert_accounted().await;
}

async fn fault_latency_beyond_a_client_deadline_keeps_the_connection(engine: EngineKind) {
    let Some((_redis, proxy, lessor)) =
        start(engine, &["pool: { max_size: 1, min_idle: 1 }", PING_PROBE]).await
    else {
        return;
    };
    let lease = lessor.lease().await.unwrap();
    let id = lease.granted().connection_id;
    lease.release(Disposition::Return).await.unwrap();
    // The probe's round trip takes 1s while the latency lasts.
    crate::conformance::probe_cut_short_keeps_the_connection(
        &lessor,
        id,
        || proxy.set(Fault::Latency(Duration::from_secs(1))),
        || proxy.set(Fault::Pass),
    )
    .await;
}
