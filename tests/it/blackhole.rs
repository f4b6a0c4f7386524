//! An upstream that vanishes without a word: its host stops answering (the
//! link goes down in its network namespace), so no FIN, no reset, nothing a
//! peek or a read could see. Only the kernel can notice, through the socket
//! options lessor sets: `TCP_USER_TIMEOUT` fails a lease whose request is
//! never acknowledged, and keepalive fails idle connections, which the next
//! checkout then evicts with one peek, without a probe. Needs a network
//! namespace (root, iproute2) and redis-server; skipped, saying so, without.

use std::process::Child;
use std::time::Duration;

use lessor::EngineKind;
use lessor_client::LeaseOptions;
use lessor_client::pb::EndReason;
use tokio::net::TcpStream;

use crate::support::netns::Netns;
use crate::support::{Lessor, PATIENCE, config_one, eventually, evictions, ports, sockets_to};

/// Kills the server inside the namespace before the namespace goes.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_available() -> bool {
    let required = std::env::var("LESSOR_REQUIRE_REDIS").is_ok_and(|v| v == "1");
    let found = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && !required {
        crate::support::skip("redis-server not available");
    }
    assert!(
        found || !required,
        "LESSOR_REQUIRE_REDIS=1 but no redis-server"
    );
    found
}

/// ESTABLISHED, in `/proc/net/tcp`.
const ESTABLISHED: u8 = 1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_vanished_upstream_is_noticed_by_the_kernel() {
    if !redis_available() {
        return;
    }
    let Some(ns) = Netns::create() else {
        return;
    };
    let port = ports::reserve();
    let _redis = Killed(ns.spawn(
        "redis-server",
        &[
            "--port",
            &port.to_string(),
            "--bind",
            &ns.peer_ip,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
    ));
    let addr = format!("{}:{port}", ns.peer_ip);
    eventually("redis-server in the namespace to listen", || async {
        TcpStream::connect(&addr).await.is_ok()
    })
    .await;
    let lessor = Lessor::start(&config_one(
        &addr,
        EngineKind::Bb8,
        &[
            "pool: { max_size: 4, min_idle: 2, connect_timeout: 1s, tcp_keepalive: { idle: 1s, interval: 1s, probes: 2 }, tcp_user_timeout: 3s }",
            // No probe and no sweep within the test: only the kernel can
            // notice the upstream is gone.
            "health: { interval: 1h }",
            "lease: { idle_timeout: 1h, max_duration: 1h }",
        ],
    ))
    .await;
    lessor
        .wait_for("two idle connections", |s| s.idle >= 2)
        .await;
    let mut lease = lessor
        .client
        .lease("up", &LeaseOptions::default())
        .await
        .unwrap();
    lease.send("PING\r\n").await.unwrap();
    assert_eq!(&lease.recv_at_least(7).await.unwrap()[..], b"+PONG\r\n");
    // min_idle refills the one the lease took.
    lessor
        .wait_for("two idle beside the lease", |s| {
            s.idle == 2 && s.leased == 1
        })
        .await;

    ns.blackhole();

    // A request nobody acknowledges: TCP_USER_TIMEOUT fails the socket and
    // the lease ends with UPSTREAM_ERROR, not at its one-hour limits.
    lease.send("PING\r\n").await.unwrap();
    let ended = tokio::time::timeout(PATIENCE, lease.finish())
        .await
        .expect("the lease outlived TCP_USER_TIMEOUT")
        .unwrap()
        .expect("an Ended");
    assert_eq!(ended.reason(), EndReason::UpstreamError, "{ended:?}");

    // Keepalive: the idle connections' sockets fail in the kernel (without
    // it they would stay ESTABLISHED for as long as the process lives).
    eventually("keepalive to fail the idle sockets", || async {
        sockets_to(port).iter().all(|s| s.state != ESTABLISHED)
    })
    .await;

    // The next checkout evicts both with one peek each (no probe is
    // configured), dials, and fails: the host is unreachable. No lease ever
    // lands on a dead socket.
    let before = lessor.stats("up").await;
    let options = LeaseOptions {
        checkout_timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let refused = lessor.client.lease("up", &options).await.unwrap_err();
    assert!(
        matches!(
            refused.code(),
            Some(tonic::Code::Unavailable | tonic::Code::ResourceExhausted)
        ),
        "{refused}"
    );
    let after = lessor.stats("up").await;
    assert_eq!(after.leases_granted, before.leases_granted, "{after:#?}");
    assert_eq!(
        evictions(&after, "health_check") - evictions(&before, "health_check"),
        2,
        "{after:#?}"
    );
    assert_eq!(evictions(&after, "upstream_closed"), 1, "{after:#?}");
}
