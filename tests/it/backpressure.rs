//! Bounded buffers both ways: a client that stops reading stops lessor's
//! reads from the upstream (so a large reply is not buffered in lessor), and
//! an upstream that stops reading stops lessor's reads from the client.

use std::time::Duration;

use bytes::Bytes;
use lessor::config::EngineKind;
use lessor::pb::Disposition;

use crate::support::{Lessor, Mode, TestUpstream, config_one, eventually};

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_slow_client_stalls_the_upstream() {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(&up.addr(), EngineKind::Bb8, &[])).await;
    let total = 64 * MIB;
    up.set_mode(Mode::Blast(total));
    let mut lease = lessor.lease().await.unwrap();
    lease.send("go").await.unwrap();
    // The client reads nothing: the upstream soon cannot write any more.
    eventually("the upstream to start writing", || async {
        up.blasted() > 0
    })
    .await;
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = up.blasted();
        if now == last {
            break;
        }
        last = now;
    }
    // Socket buffers, HTTP/2 windows and one read chunk: a few MiB at most,
    // far from the 64 MiB reply.
    assert!(
        last < 16 * MIB,
        "upstream wrote {last} bytes with nobody reading"
    );
    // Reading resumes the flow, to the last byte.
    let mut got = 0;
    while got < total {
        got += lease
            .recv()
            .await
            .unwrap()
            .expect("bytes until the reply ends")
            .len();
    }
    assert_eq!(got, total);
    lease.release(Disposition::Return).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_deaf_upstream_stalls_the_client() {
    let up = TestUpstream::start().await;
    let idle = "lease: { idle_timeout: 2s }";
    let lessor = Lessor::start(&config_one(&up.addr(), EngineKind::Bb8, &[idle])).await;
    up.set_mode(Mode::Deaf);
    let mut lease = lessor.lease().await.unwrap();
    let chunk = Bytes::from(vec![b'x'; 256 * 1024]);
    let mut sent = 0;
    // Sends complete while buffers have room, then block.
    while let Ok(result) =
        tokio::time::timeout(Duration::from_millis(200), lease.send(chunk.clone())).await
    {
        result.unwrap();
        sent += chunk.len();
        assert!(
            sent < 64 * MIB,
            "lessor accepted {sent} bytes for a deaf upstream"
        );
    }
    assert!(sent > 0);
    // No byte moves either way now, so the lease idle timeout revokes it.
    // (Dropping the lease would not help: the client's HTTP/2 stream stays
    // open while its upload waits for window, which is what this test shows.)
    let ended = lease.finish().await.unwrap().expect("an Ended");
    assert_eq!(ended.reason(), lessor::pb::EndReason::LeaseIdle);
    lessor
        .wait_for("the lease to end", |s| {
            s.leased == 0 && crate::support::evictions(s, "lease_idle") == 1
        })
        .await;
}
