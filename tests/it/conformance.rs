//! The engine conformance suite: every behaviour users see, run once on bb8
//! and once on deadpool (`conformance::bb8::*`, `conformance::deadpool::*`).
//! Real sockets throughout: lessor in-process on a free port, a real TCP
//! upstream from `support::upstream`.

use std::time::Duration;

use bytes::Bytes;
use lessor::EngineKind;
use lessor_client::LeaseOptions;
use lessor_client::pb::{Disposition, EndReason};
use tonic::Code;

use crate::for_both_engines;
use crate::support::{
    Lessor, Mode, TestUpstream, config_one, eventually, evictions, port_of, sockets_to,
    wait_close_wait,
};

/// Connections closed for any reason but `surplus` (a startup dial that lost
/// the race to the first lease's own, closed unused).
fn closed(s: &lessor_client::pb::UpstreamStats) -> u64 {
    s.evictions
        .iter()
        .filter(|(reason, _)| *reason != "surplus")
        .map(|(_, n)| n)
        .sum()
}

/// `/proc/net/tcp`'s `ESTABLISHED`.
const ESTABLISHED: u8 = 1;

for_both_engines!(
    lease_return_reuses_the_connection,
    lease_pipelined_data_before_granted,
    lease_release_evict_closes,
    lease_return_with_unanswered_request_is_dirty_and_late_reply_never_leaks,
    lease_abort_evicts_by_default,
    lease_abort_returns_clean_connection_with_on_abort_return,
    lease_abort_with_unanswered_request_evicts_even_with_on_abort_return,
    lease_client_connection_lost_without_reset_stream_aborts,
    lease_upstream_close_mid_lease_ends_lease,
    lease_upstream_reset_mid_lease_ends_lease,
    lease_expiry_is_clamped_to_configured_cap,
    lease_client_max_lease_shortens,
    lease_idle_timeout_revokes,
    lease_large_payload_round_trips,
    checkout_exhausted_after_timeout,
    checkout_max_waiters_fails_at_once,
    checkout_unavailable_when_upstream_down,
    checkout_catches_closed_idle_connections,
    checkout_catches_reset_idle_connections,
    checkout_evicts_connections_with_unsolicited_bytes,
    checkout_probe_failure_evicts_and_moves_on,
    checkout_skips_probe_when_recently_used,
    checkout_deadline_during_a_probe_keeps_the_healthy_connection,
);

pub(crate) const FAST_SWEEP: &str = "health: { interval: 50ms }";

pub(crate) async fn start(engine: EngineKind, extra: &[&str]) -> (TestUpstream, Lessor) {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(&up.addr(), engine, extra)).await;
    (up, lessor)
}

async fn lease_return_reuses_the_connection(engine: EngineKind) {
    let (up, lessor) = start(engine, &["pool: { min_idle: 0 }"]).await;
    lessor.wait_for("the startup dial", |s| s.idle == 1).await;
    let mut lease = lessor.lease().await.unwrap();
    let first = lease.granted().clone();
    assert_eq!(first.upstream, "up");
    assert_eq!(first.connection_uses, 1);
    lease.send("hello").await.unwrap();
    assert_eq!(lease.recv_at_least(5).await.unwrap(), "hello");
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Return);
    assert_eq!(ended.reason(), EndReason::ClientRelease);

    let lease = lessor.lease().await.unwrap();
    assert_eq!(lease.granted().connection_id, first.connection_id);
    assert!(lease.granted().reused);
    assert_eq!(lease.granted().connection_uses, 2);
    assert_ne!(lease.granted().lease_id, first.lease_id);
    lease.release(Disposition::Unspecified).await.unwrap();

    // One socket served both leases, as the upstream saw it.
    assert_eq!(up.accepted(), 1);
    let s = lessor.stats("up").await;
    assert_eq!(s.engine, engine.as_str());
    assert_eq!(s.leases_granted, 2);
    assert_eq!(s.leased, 0);
    assert_eq!(s.evictions.values().sum::<u64>(), 0);
    lessor.assert_accounted().await;
}

async fn lease_pipelined_data_before_granted(engine: EngineKind) {
    let (_up, lessor) = start(engine, &[]).await;
    let mut lease = lessor
        .client
        .lease_pipelined(
            "up",
            &LeaseOptions::default(),
            Some(Bytes::from_static(b"ping")),
        )
        .await
        .unwrap();
    assert_eq!(lease.recv_at_least(4).await.unwrap(), "ping");
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Return);
    lessor.assert_accounted().await;
}

async fn lease_release_evict_closes(engine: EngineKind) {
    let (up, lessor) = start(engine, &["pool: { min_idle: 0 }"]).await;
    let lease = lessor.lease().await.unwrap();
    let id = lease.granted().connection_id;
    let ended = lease.release(Disposition::Evict).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::ClientRelease);
    let s = lessor.stats("up").await;
    assert_eq!(evictions(&s, "client_evict"), 1);
    // The floor of one connection redials; the next lease is on a new socket.
    let lease = lessor.lease().await.unwrap();
    assert_ne!(lease.granted().connection_id, id);
    lease.release(Disposition::Return).await.unwrap();
    crate::support::eventually("the evicted socket closes upstream", || async {
        up.open() == 1
    })
    .await;
    lessor.assert_accounted().await;
}

async fn lease_return_with_unanswered_request_is_dirty_and_late_reply_never_leaks(
    engine: EngineKind,
) {
    let (up, lessor) = start(engine, &["pool: { max_size: 1, min_idle: 0 }"]).await;
    // The reply is held until the gate opens: it cannot beat the release.
    up.set_mode(Mode::Gated);
    let mut lease = lessor.lease().await.unwrap();
    let first = lease.granted().connection_id;
    lease.send("late-reply").await.unwrap();
    eventually("the request reached the upstream", || async {
        up.received() >= 10
    })
    .await;
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::Dirty);
    assert_eq!(evictions(&lessor.stats("up").await, "dirty"), 1);

    // The late reply is sent now, onto the evicted connection; the next
    // lease (a new connection: max_size 1) sees only its own reply.
    let mut lease = lessor.lease().await.unwrap();
    assert_ne!(lease.granted().connection_id, first);
    up.open_gate();
    eventually(
        "the late reply was written to the dead connection",
        || async { up.open() == 1 },
    )
    .await;
    lease.send("mine").await.unwrap();
    assert_eq!(lease.recv_at_least(4).await.unwrap(), "mine");
    lease.release(Disposition::Return).await.unwrap();
}

async fn lease_abort_evicts_by_default(engine: EngineKind) {
    let (_up, lessor) = start(engine, &[]).await;
    let mut lease = lessor.lease().await.unwrap();
    lease.send("x").await.unwrap();
    lease.recv_at_least(1).await.unwrap();
    drop(lease);
    let s = lessor
        .wait_for("the aborted lease to finish", |s| {
            s.leased == 0 && evictions(s, "client_abort") == 1
        })
        .await;
    assert_eq!(evictions(&s, "dirty"), 0);
    lessor.assert_accounted().await;
}

async fn lease_abort_returns_clean_connection_with_on_abort_return(engine: EngineKind) {
    let (_up, lessor) = start(
        engine,
        &[
            "pool: { max_size: 1, min_idle: 0 }",
            "lease: { on_abort: return }",
        ],
    )
    .await;
    let mut lease = lessor.lease().await.unwrap();
    let id = lease.granted().connection_id;
    lease.send("x").await.unwrap();
    lease.recv_at_least(1).await.unwrap();
    drop(lease);
    lessor
        .wait_for("the aborted lease to finish", |s| s.leased == 0)
        .await;
    let lease = lessor.lease().await.unwrap();
    assert_eq!(
        lease.granted().connection_id,
        id,
        "a clean aborted connection is returned"
    );
    lease.release(Disposition::Return).await.unwrap();
    let s = lessor.stats("up").await;
    assert_eq!(closed(&s), 0, "{s:#?}");
    lessor.assert_accounted().await;
}

async fn lease_abort_with_unanswered_request_evicts_even_with_on_abort_return(engine: EngineKind) {
    let (up, lessor) = start(engine, &["lease: { on_abort: return }"]).await;
    up.set_mode(Mode::Silent);
    let mut lease = lessor.lease().await.unwrap();
    lease.send("unanswered").await.unwrap();
    // Wait until the bytes left lessor (the upstream read them).
    eventually("the request reached the upstream", || async {
        up.received() >= 10
    })
    .await;
    drop(lease);
    lessor
        .wait_for("the aborted lease to be evicted", |s| {
            s.leased == 0 && evictions(s, "client_abort") == 1
        })
        .await;
    lessor.assert_accounted().await;
}

/// The client's TCP connection dies under a live lease (both sides reset, no
/// RST_STREAM or GOAWAY): the lease ends as an abort and its connection is
/// evicted; other clients are unaffected.
async fn lease_client_connection_lost_without_reset_stream_aborts(engine: EngineKind) {
    let (_up, lessor) = start(engine, &[]).await;
    let proxy = crate::support::proxy::CutProxy::start(&lessor.addr).await;
    let far = lessor_client::Client::connect(&proxy.addr()).await.unwrap();
    let mut lease = far.lease("up", &LeaseOptions::default()).await.unwrap();
    lease.send("x").await.unwrap();
    lease.recv_at_least(1).await.unwrap();
    lessor.wait_for("one lease", |s| s.leased == 1).await;
    proxy.cut();
    lessor
        .wait_for("the lost client's lease evicted", |s| {
            s.leased == 0 && evictions(s, "client_abort") == 1
        })
        .await;
    let mut other = lessor.lease().await.unwrap();
    other.send("still").await.unwrap();
    assert_eq!(other.recv_at_least(5).await.unwrap(), "still");
    other.release(Disposition::Return).await.unwrap();
    drop(lease);
    lessor.assert_accounted().await;
}

async fn lease_upstream_close_mid_lease_ends_lease(engine: EngineKind) {
    let (up, lessor) = start(engine, &[]).await;
    let mut lease = lessor.lease().await.unwrap();
    lease.send("a").await.unwrap();
    lease.recv_at_least(1).await.unwrap();
    lessor.until_accepted(&up).await;
    up.close_all();
    assert_eq!(lease.recv().await.unwrap(), None);
    let ended = lease.ended().cloned().unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::UpstreamClosed);
    lessor
        .wait_for("upstream_closed eviction", |s| {
            evictions(s, "upstream_closed") == 1 && s.leased == 0
        })
        .await;
    lessor.assert_accounted().await;
}

async fn lease_upstream_reset_mid_lease_ends_lease(engine: EngineKind) {
    let (up, lessor) = start(engine, &[]).await;
    let mut lease = lessor.lease().await.unwrap();
    lessor.until_accepted(&up).await;
    up.reset_all();
    assert_eq!(lease.recv().await.unwrap(), None);
    let ended = lease.ended().cloned().unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::UpstreamClosed, "{ended:?}");
    lessor.assert_accounted().await;
}

async fn lease_expiry_is_clamped_to_configured_cap(engine: EngineKind) {
    let (_up, lessor) = start(engine, &["lease: { max_duration: 200ms }"]).await;
    let options = LeaseOptions {
        max_lease: Some(Duration::from_secs(3600)),
        ..Default::default()
    };
    let mut lease = lessor.client.lease("up", &options).await.unwrap();
    // Ends by itself, long before the hour the client asked for.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while lease.recv().await.unwrap().is_some() {}
        lease.ended().cloned().unwrap()
    })
    .await
    .expect("the configured cap wins over the client's request");
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::LeaseExpired);
    lessor
        .wait_for("lease_expired eviction", |s| {
            evictions(s, "lease_expired") == 1
        })
        .await;
    lessor.assert_accounted().await;
}

async fn lease_client_max_lease_shortens(engine: EngineKind) {
    let (_up, lessor) = start(engine, &[]).await;
    let options = LeaseOptions {
        max_lease: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let lease = lessor.client.lease("up", &options).await.unwrap();
    let ended = lease.finish().await.unwrap().unwrap();
    assert_eq!(ended.reason(), EndReason::LeaseExpired);
    lessor.assert_accounted().await;
}

async fn lease_idle_timeout_revokes(engine: EngineKind) {
    let (_up, lessor) = start(engine, &["lease: { idle_timeout: 150ms }"]).await;
    let lease = lessor.lease().await.unwrap();
    let ended = lease.finish().await.unwrap().unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    assert_eq!(ended.reason(), EndReason::LeaseIdle);
    lessor
        .wait_for("lease_idle eviction", |s| evictions(s, "lease_idle") == 1)
        .await;
    lessor.assert_accounted().await;
}

async fn lease_large_payload_round_trips(engine: EngineKind) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_up, lessor) = start(engine, &[]).await;
    let lease = lessor.lease().await.unwrap();
    // Larger than every buffer on the way (read chunk, HTTP/2 windows,
    // socket buffers), written and read at once as a socket would be.
    let payload: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(lease);
    let (written, got) = tokio::join!(
        async {
            for chunk in payload.chunks(256 * 1024) {
                wr.write_all(chunk).await.unwrap();
            }
        },
        async {
            let mut got = vec![0u8; payload.len()];
            rd.read_exact(&mut got).await.unwrap();
            got
        }
    );
    let () = written;
    assert!(got == payload, "echoed bytes differ");
    let lease = rd.unsplit(wr);
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Return);
    let s = lessor.stats("up").await;
    assert_eq!(s.leased, 0);
    lessor.assert_accounted().await;
}

async fn checkout_exhausted_after_timeout(engine: EngineKind) {
    let (_up, lessor) = start(
        engine,
        &["pool: { max_size: 1, min_idle: 0, checkout_timeout: 60s }"],
    )
    .await;
    let held = lessor.lease().await.unwrap();
    let options = LeaseOptions {
        checkout_timeout: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    // The client's 100ms wins over the configured minute (the bound only
    // tells the two apart, with room for a loaded machine).
    let err = tokio::time::timeout(Duration::from_secs(30), lessor.client.lease("up", &options))
        .await
        .expect("the client's checkout timeout applies, not the configured one")
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    let s = lessor.stats("up").await;
    assert_eq!(s.checkout_timeouts, 1);
    assert_eq!(s.leased, 1);
    assert!(s.connections <= 1);
    held.release(Disposition::Return).await.unwrap();
    // The slot is free again at once.
    lessor
        .lease()
        .await
        .unwrap()
        .release(Disposition::Return)
        .await
        .unwrap();
    lessor.assert_accounted().await;
}

async fn checkout_max_waiters_fails_at_once(engine: EngineKind) {
    let (_up, lessor) = start(
        engine,
        &["pool: { max_size: 1, min_idle: 0, max_waiters: 1, checkout_timeout: 60s }"],
    )
    .await;
    let held = lessor.lease().await.unwrap();
    let client = lessor.client.clone();
    let waiter = tokio::spawn(async move { client.lease("up", &LeaseOptions::default()).await });
    lessor.wait_for("one waiter", |s| s.waiting == 1).await;
    // At once, not after the configured minute.
    let err = tokio::time::timeout(Duration::from_secs(30), lessor.lease())
        .await
        .expect("max_waiters fails at once")
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert!(err.to_string().contains("max_waiters"), "{err}");
    held.release(Disposition::Return).await.unwrap();
    let lease = waiter
        .await
        .unwrap()
        .expect("the waiter gets the returned connection");
    lease.release(Disposition::Return).await.unwrap();
    assert_eq!(lessor.stats("up").await.waiting, 0);
    lessor.assert_accounted().await;
}

async fn checkout_unavailable_when_upstream_down(engine: EngineKind) {
    let (up, lessor) = start(
        engine,
        &["pool: { min_idle: 0, checkout_timeout: 60s }", FAST_SWEEP],
    )
    .await;
    lessor
        .wait_for("warm-up dial", |s| s.connections == 1)
        .await;
    up.stop().await;
    lessor
        .wait_for("the closed connection to be noticed", |s| {
            s.connect_errors > 0 || s.connections == 0
        })
        .await;
    // Fails on the dial error, not at the configured minute: nothing is
    // leased that could come back. (The bound only tells the two apart.)
    let err = tokio::time::timeout(Duration::from_secs(30), lessor.lease())
        .await
        .expect("a checkout fails fast when the upstream is down")
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    up.restart().await;
    crate::support::eventually("leases work again after the upstream returns", || async {
        match lessor.lease().await {
            Ok(lease) => lease.release(Disposition::Return).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    lessor.assert_accounted().await;
}

/// Only checkouts see dead connections here: the background sweep runs hourly.
const NO_SWEEP: &str = "health: { interval: 1h }";

async fn checkout_catches_closed_idle_connections(engine: EngineKind) {
    let (up, lessor) = start(engine, &["pool: { min_idle: 2 }", NO_SWEEP]).await;
    lessor.wait_for("min_idle", |s| s.idle == 2).await;
    lessor.until_accepted(&up).await;
    up.close_all();
    wait_close_wait(port_of(&up.addr()), 2).await;
    let mut lease = lessor
        .lease()
        .await
        .expect("a dead idle connection is skipped, not handed out");
    lease.send("ok").await.unwrap();
    assert_eq!(lease.recv_at_least(2).await.unwrap(), "ok");
    lease.release(Disposition::Return).await.unwrap();
    let s = lessor.stats("up").await;
    assert!(s.health_check_failures >= 2, "{s:#?}");
    assert!(evictions(&s, "health_check") >= 2, "{s:#?}");
    lessor.assert_accounted().await;
}

async fn checkout_catches_reset_idle_connections(engine: EngineKind) {
    let (up, lessor) = start(engine, &["pool: { min_idle: 1 }", NO_SWEEP]).await;
    lessor.wait_for("min_idle", |s| s.idle == 1).await;
    lessor.until_accepted(&up).await;
    up.reset_all();
    eventually("lessor's sockets saw the reset", || async {
        up.open() == 0
            && sockets_to(port_of(&up.addr()))
                .iter()
                .all(|s| s.state != ESTABLISHED)
    })
    .await;
    let lease = lessor.lease().await.unwrap();
    lease.release(Disposition::Return).await.unwrap();
    assert!(evictions(&lessor.stats("up").await, "health_check") >= 1);
    lessor.assert_accounted().await;
}

async fn checkout_evicts_connections_with_unsolicited_bytes(engine: EngineKind) {
    let (up, lessor) = start(engine, &["pool: { max_size: 1, min_idle: 1 }", NO_SWEEP]).await;
    lessor.wait_for("min_idle", |s| s.idle == 1).await;
    let id = {
        let lease = lessor.lease().await.unwrap();
        let id = lease.granted().connection_id;
        lease.release(Disposition::Return).await.unwrap();
        id
    };
    lessor.until_accepted(&up).await;
    up.inject(b"-ERR stray\r\n");
    eventually("the stray bytes reached lessor's socket", || async {
        sockets_to(port_of(&up.addr()))
            .iter()
            .any(|s| s.rx_queue > 0)
    })
    .await;
    let mut lease = lessor.lease().await.unwrap();
    assert_ne!(
        lease.granted().connection_id,
        id,
        "the dirty connection was not reused"
    );
    lease.send("clean").await.unwrap();
    assert_eq!(lease.recv_at_least(5).await.unwrap(), "clean");
    lease.release(Disposition::Return).await.unwrap();
    assert_eq!(evictions(&lessor.stats("up").await, "health_check"), 1);
    lessor.assert_accounted().await;
}

async fn checkout_probe_failure_evicts_and_moves_on(engine: EngineKind) {
    let probe = "health: { interval: 1h, skip_if_used_within: 1ms, probe: { send: \"PING\\r\\n\", expect: \"PING\\r\\n\", timeout: 1s } }";
    let (up, lessor) = start(
        engine,
        &[
            // One slot: with two, the pool may refill min_idle while the
            // first lease holds its connection, and hand out that fresh
            // one next instead of the one the probe is meant to check.
            "pool: { max_size: 1, min_idle: 1, checkout_timeout: 30s }",
            probe,
        ],
    )
    .await;
    lessor.wait_for("min_idle", |s| s.idle == 1).await;
    // A fresh connection is not probed; once a lease has used it, it is.
    let lease = lessor.lease().await.unwrap();
    let healthy = lease.granted().connection_id;
    lease.release(Disposition::Return).await.unwrap();
    assert_eq!(up.received(), 0, "a fresh connection was probed");
    // A healthy probe: the echo answers PING with PING, the same connection
    // is handed out.
    let quiet = std::time::Instant::now();
    eventually("past skip_if_used_within", || async {
        quiet.elapsed() > Duration::from_millis(5)
    })
    .await;
    let lease = lessor.lease().await.unwrap();
    assert_eq!(lease.granted().connection_id, healthy);
    lease.release(Disposition::Return).await.unwrap();
    assert_eq!(up.received(), 6, "one PING probe reached the upstream");
    assert_eq!(lessor.stats("up").await.health_check_failures, 0);
    // Now the upstream stops answering: the probe times out, the connection
    // is evicted and the checkout dials a fresh one (not probed again).
    up.set_mode(Mode::Silent);
    let quiet = std::time::Instant::now();
    eventually("past skip_if_used_within", || async {
        quiet.elapsed() > Duration::from_millis(5)
    })
    .await;
    let lease = lessor.lease().await.unwrap();
    assert_ne!(lease.granted().connection_id, healthy);
    assert!(!lease.granted().reused);
    lease.release(Disposition::Return).await.unwrap();
    let s = lessor.stats("up").await;
    assert_eq!(s.health_check_failures, 1);
    assert_eq!(evictions(&s, "health_check"), 1);
    assert!(s.health_checks >= 2);
    lessor.assert_accounted().await;
}

async fn checkout_skips_probe_when_recently_used(engine: EngineKind) {
    // A silent upstream fails every probe; a connection used within the
    // window is not probed, so it is reused.
    let probe = "health: { interval: 1h, skip_if_used_within: 1h, probe: { send: \"PING\\r\\n\", expect: \"PING\\r\\n\", timeout: 1s } }";
    let (up, lessor) = start(engine, &["pool: { max_size: 1, min_idle: 0 }", probe]).await;
    up.set_mode(Mode::Silent);
    let first = lessor.lease().await.unwrap();
    let id = first.granted().connection_id;
    first.release(Disposition::Return).await.unwrap();
    let second = lessor.lease().await.unwrap();
    assert_eq!(second.granted().connection_id, id);
    second.release(Disposition::Return).await.unwrap();
    assert_eq!(lessor.stats("up").await.health_check_failures, 0);
    lessor.assert_accounted().await;
}

/// A client deadline shorter than the probe's round trip: the checkout fails
/// with DEADLINE_EXCEEDED, the probe finishes in the background, and the
/// healthy connection goes back to the pool instead of being destroyed.
async fn checkout_deadline_during_a_probe_keeps_the_healthy_connection(engine: EngineKind) {
    let probe = "health: { interval: 1h, skip_if_used_within: 1ms, probe: { send: \"PING\\r\\n\", expect: \"PING\\r\\n\", timeout: 30s } }";
    let (up, lessor) = start(engine, &["pool: { max_size: 1, min_idle: 1 }", probe]).await;
    let lease = lessor.lease().await.unwrap();
    let id = lease.granted().connection_id;
    lease.release(Disposition::Return).await.unwrap();
    // The probe's reply is held until the gate opens.
    probe_cut_short_keeps_the_connection(
        &lessor,
        id,
        || up.set_mode(Mode::Gated),
        || up.open_gate(),
    )
    .await;
}

/// With the probe's reply held up by `hold`, a checkout whose client allows
/// 100ms fails with DEADLINE_EXCEEDED; once `release` lets the reply through,
/// the probe finishes in the background and the healthy connection `id` is
/// handed out again: nothing closed, every close counted.
pub(crate) async fn probe_cut_short_keeps_the_connection(
    lessor: &Lessor,
    id: u64,
    hold: impl FnOnce(),
    release: impl FnOnce(),
) {
    // Past skip_if_used_within (1ms), so the next checkout probes.
    let quiet = std::time::Instant::now();
    eventually("past skip_if_used_within", || async {
        quiet.elapsed() > Duration::from_millis(5)
    })
    .await;
    hold();
    let options = LeaseOptions {
        checkout_timeout: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let err = lessor.client.lease("up", &options).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    release();
    lessor
        .wait_for("the probe finished in the background", |s| {
            s.idle == 1 && s.health_checks >= 2
        })
        .await;
    let lease = lessor.lease().await.unwrap();
    assert_eq!(
        lease.granted().connection_id,
        id,
        "the healthy connection was kept"
    );
    lease.release(Disposition::Return).await.unwrap();
    let s = lessor.stats("up").await;
    assert_eq!(closed(&s), 0, "{s:#?}");
    assert_eq!(s.health_check_failures, 0, "{s:#?}");
    lessor.assert_accounted().await;
}
