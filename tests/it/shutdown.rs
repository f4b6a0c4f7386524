//! Shutdown is bounded: after SIGTERM a real `lessor serve` exits 0 at the
//! latest shortly after `shutdown.grace`, whatever its clients do: a lease
//! stalled on HTTP/2 flow control, a Lease stream that never sent Acquire, a
//! TCP connection that never sent the HTTP/2 preface, an admin request whose
//! head never ends.

use std::time::{Duration, Instant};

use lessor::EngineKind;
use lessor_client::LeaseOptions;
use lessor_client::pb::LeaseRequest;
use lessor_client::pb::pool_client::PoolClient;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::process::Served;
use crate::support::{Mode, TestUpstream, config_one, eventually};

/// Grace 1s, then a hard deadline of 1s: the process is gone well inside this
/// (the bound only tells "bounded" from "held open"; the figure is printed).
const EXIT_WITHIN: Duration = Duration::from_secs(10);

async fn served(up: &TestUpstream) -> Served {
    Served::start(&format!(
        "shutdown: {{ grace: 1s }}\n{}",
        config_one(
            &up.addr(),
            EngineKind::Bb8,
            &["lease: { max_duration: 1h, idle_timeout: 1h }"]
        )
    ))
    .await
}

async fn terminate(mut served: Served, case: &str) {
    let started = Instant::now();
    served.signal("TERM");
    let code = served.exit_code(EXIT_WITHIN).await;
    eprintln!(
        "{case}: exited {code:?} {:?} after SIGTERM",
        started.elapsed()
    );
    assert_eq!(
        code,
        Some(0),
        "{case}: still running {EXIT_WITHIN:?} after SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_bounded_with_a_lease_stalled_on_flow_control() {
    let up = TestUpstream::start().await;
    let served = served(&up).await;
    let client = served.client().await;
    up.set_mode(Mode::Blast(64 * 1024 * 1024));
    let mut lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
    lease.send("go").await.unwrap();
    // The client never reads: lessor's response stream waits for window.
    eventually("the reply to fill the windows", || async {
        up.blasted() > 4 * 1024 * 1024
    })
    .await;
    terminate(served, "stalled lease").await;
    drop(lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_bounded_with_a_stream_that_never_sent_acquire() {
    let up = TestUpstream::start().await;
    let served = served(&up).await;
    let (_tx, rx) = tokio::sync::mpsc::channel::<LeaseRequest>(1);
    let mut raw = PoolClient::connect(format!("http://{}", served.grpc))
        .await
        .unwrap();
    let _stream = raw
        .lease(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    terminate(served, "no Acquire").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_bounded_with_a_connection_that_never_sent_the_preface() {
    let up = TestUpstream::start().await;
    let served = served(&up).await;
    let _silent = TcpStream::connect(&served.grpc).await.unwrap();
    terminate(served, "no HTTP/2 preface").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_bounded_with_a_half_sent_admin_request() {
    let up = TestUpstream::start().await;
    let served = served(&up).await;
    let mut slow = TcpStream::connect(&served.admin).await.unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nHost: lessor\r\n")
        .await
        .unwrap();
    terminate(served, "half-sent admin request").await;
    drop(slow);
}
