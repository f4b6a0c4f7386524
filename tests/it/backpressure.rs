//! Bounded buffers both ways: a client that stops reading stops lessor's
//! reads from the upstream (so a large reply is not buffered in lessor), and
//! an upstream that stops reading stops lessor's reads from the client.

use std::time::Duration;

use bytes::Bytes;
use lessor::EngineKind;
use lessor_client::pb::Disposition;

use crate::for_both_engines;
use crate::support::{Lessor, Mode, TestUpstream, config_one, eventually};

for_both_engines!(
    backpressure_slow_client_stalls_the_upstream,
    backpressure_deaf_upstream_stalls_the_client,
);

const MIB: usize = 1024 * 1024;

/// No progress for this long means the flow has stopped, not slowed.
const STALLED: Duration = Duration::from_secs(1);

/// Waits until `count` stops moving for [`STALLED`]; its value then.
async fn settled(count: impl Fn() -> usize) -> usize {
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    let mut last = count();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = count();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= STALLED {
            return last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still moving: {now} bytes"
        );
    }
}

async fn backpressure_slow_client_stalls_the_upstream(engine: EngineKind) {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(&up.addr(), engine, &[])).await;
    let total = 64 * MIB;
    up.set_mode(Mode::Blast(total));
    let mut lease = lessor.lease().await.unwrap();
    lease.send("go").await.unwrap();
    // The client reads nothing: the upstream soon cannot write any more.
    eventually("the upstream to start writing", || async {
        up.blasted() > 0
    })
    .await;
    // Settled: no progress for a whole second. A loaded machine pauses the
    // writer for moments, never for that long, so an unbounded buffer would
    // be seen taking the whole reply.
    let last = settled(|| up.blasted()).await;
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

async fn backpressure_deaf_upstream_stalls_the_client(engine: EngineKind) {
    let up = TestUpstream::start().await;
    let idle = "lease: { idle_timeout: 5s }";
    let lessor = Lessor::start(&config_one(&up.addr(), engine, &[idle])).await;
    up.set_mode(Mode::Deaf);
    let mut lease = lessor.lease().await.unwrap();
    let chunk = Bytes::from(vec![b'x'; 256 * 1024]);
    let mut sent = 0;
    // Sends complete while buffers have room, then block: a send that takes
    // a whole second is blocked, not slowed by a busy machine.
    while let Ok(result) = tokio::time::timeout(STALLED, lease.send(chunk.clone())).await {
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
    assert_eq!(ended.reason(), lessor_client::pb::EndReason::LeaseIdle);
    lessor
        .wait_for("the lease to end", |s| {
            s.leased == 0 && crate::support::evictions(s, "lease_idle") == 1
        })
        .await;
}
