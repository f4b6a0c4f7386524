//! Misuse of the lease protocol through the raw generated client: each gets
//! its documented status, evicts what it held, and leaves the server serving.

use std::time::Duration;

use bytes::Bytes;
use lessor::EngineKind;
use lessor_client::pb::pool_client::PoolClient;
use lessor_client::pb::{
    Acquire, LeaseRequest, LeaseResponse, Release, lease_request, lease_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use crate::for_both_engines;
use crate::support::{Lessor, TestUpstream, config_one, evictions};

for_both_engines!(
    protocol_first_message_must_be_acquire,
    protocol_unknown_upstream_is_not_found,
    protocol_second_acquire_is_invalid_and_evicts,
    protocol_empty_request_is_invalid,
    protocol_oversized_frame_is_refused_and_evicts,
    protocol_data_after_release_is_invalid,
    protocol_half_close_without_release_is_an_abort,
    protocol_cancel_while_waiting_for_a_connection_leaks_nothing,
    protocol_frame_of_exactly_max_frame_is_accepted,
    protocol_no_acquire_within_acquire_timeout_is_deadline_exceeded,
    protocol_unknown_upstream_name_is_truncated_in_errors,
);

fn acquire(upstream: &str) -> LeaseRequest {
    LeaseRequest {
        msg: Some(lease_request::Msg::Acquire(Acquire {
            upstream: upstream.into(),
            ..Default::default()
        })),
    }
}

fn data(bytes: impl Into<Bytes>) -> LeaseRequest {
    LeaseRequest {
        msg: Some(lease_request::Msg::Data(bytes.into())),
    }
}

fn release() -> LeaseRequest {
    LeaseRequest {
        msg: Some(lease_request::Msg::Release(Release { disposition: 1 })),
    }
}

/// Opens a raw lease stream with these requests queued (the sender stays
/// open, so no half-close is implied).
async fn raw(
    lessor: &Lessor,
    requests: Vec<LeaseRequest>,
) -> (mpsc::Sender<LeaseRequest>, Streaming<LeaseResponse>) {
    let (tx, rx) = mpsc::channel(16);
    for r in requests {
        tx.send(r).await.unwrap();
    }
    let mut client = PoolClient::connect(format!("http://{}", lessor.addr))
        .await
        .unwrap()
        .max_encoding_message_size(64 * 1024 * 1024);
    let stream = client
        .lease(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

/// Reads the stream to its status: the messages, then the error (if any).
async fn drain(
    stream: &mut Streaming<LeaseResponse>,
) -> (Vec<LeaseResponse>, Option<tonic::Status>) {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("stream ends")
        {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, None),
            Err(status) => return (got, Some(status)),
        }
    }
}

fn is_granted(m: &LeaseResponse) -> bool {
    matches!(m.msg, Some(lease_response::Msg::Granted(_)))
}

async fn setup(engine: EngineKind) -> (TestUpstream, Lessor) {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(&up.addr(), engine, &[])).await;
    (up, lessor)
}

async fn still_serving(lessor: &Lessor) {
    let mut lease = lessor
        .lease()
        .await
        .expect("the server still grants leases");
    lease.send("ok").await.unwrap();
    assert_eq!(lease.recv_at_least(2).await.unwrap(), "ok");
    lease
        .release(lessor_client::pb::Disposition::Return)
        .await
        .unwrap();
}

async fn protocol_first_message_must_be_acquire(engine: EngineKind) {
    let (_up, lessor) = setup(engine).await;
    let (_tx, mut stream) = raw(&lessor, vec![data("hello")]).await;
    let (msgs, status) = drain(&mut stream).await;
    assert!(msgs.is_empty());
    let status = status.expect("an error status");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("Acquire"), "{status:?}");
    still_serving(&lessor).await;
}

async fn protocol_unknown_upstream_is_not_found(engine: EngineKind) {
    let (_up, lessor) = setup(engine).await;
    let (_tx, mut stream) = raw(&lessor, vec![acquire("nope")]).await;
    let status = drain(&mut stream).await.1.expect("an error status");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("nope") && status.message().contains("up"),
        "{status:?}"
    );
    let err = lessor.client.stats("nope").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
}

async fn protocol_second_acquire_is_invalid_and_evicts(engine: EngineKind) {
    let (_up, lessor) = setup(engine).await;
    let (_tx, mut stream) = raw(&lessor, vec![acquire("up"), acquire("up")]).await;
    let (msgs, status) = drain(&mut stream).await;
    assert!(is_granted(&msgs[0]));
    assert_eq!(msgs.len(), 1, "no Ended after a violation: {msgs:?}");
    assert_eq!(
        status.expect("an error status").code(),
        Code::InvalidArgument
    );
    lessor
        .wait_for("client_abort eviction", |s| {
            evictions(s, "client_abort") == 1 && s.leased == 0
        })
        .await;
    still_serving(&lessor).await;
}

async fn protocol_empty_request_is_invalid(engine: EngineKind) {
    let (_up, lessor) = setup(engine).await;
    let (_tx, mut stream) = raw(&lessor, vec![acquire("up"), LeaseRequest { msg: None }]).await;
    let status = drain(&mut stream).await.1.expect("an error status");
    assert_eq!(status.code(), Code::InvalidArgument);
}

async fn protocol_oversized_frame_is_refused_and_evicts(engine: EngineKind) {
    let up = TestUpstream::start().await;
    let yaml = format!(
        "grpc: {{ max_frame: 64KiB }}\n{}",
        config_one(&up.addr(), engine, &[])
    );
    let lessor = Lessor::start(&yaml).await;
    // Just over the limit: refused by lessor's own check.
    let (_tx, mut stream) = raw(
        &lessor,
        vec![acquire("up"), data(vec![b'x'; 64 * 1024 + 1])],
    )
    .await;
    let (msgs, status) = drain(&mut stream).await;
    assert!(is_granted(&msgs[0]));
    let status = status.expect("an error status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Far over: refused by tonic's decoder before it is buffered.
    let (_tx, mut stream) = raw(
        &lessor,
        vec![acquire("up"), data(vec![b'x'; 8 * 1024 * 1024])],
    )
    .await;
    let status = drain(&mut stream).await.1.expect("an error status");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::InvalidArgument),
        "{status:?}"
    );
    lessor
        .wait_for("both connections evicted", |s| {
            evictions(s, "client_abort") == 2 && s.leased == 0
        })
        .await;
    still_serving(&lessor).await;
}

async fn protocol_data_after_release_is_invalid(engine: EngineKind) {
    let (_up, lessor) = setup(engine).await;
    let (_tx, mut stream) = raw(&lessor, vec![acquire("up"), release(), data("late")]).await;
    let (msgs, status) = drain(&mut stream).await;
    assert!(is_granted(&msgs[0]));
    assert_eq!(msgs.len(), 1, "no Ended after a violation: {msgs:?}");
    assert_eq!(
        status.expect("an error status").code(),
        Code::InvalidArgument
    );
    lessor
        .wait_for("client_abort eviction", |s| {
            evictions(s, "client_abort") == 1
        })
        .await;
}

async fn protocol_half_close_without_release_is_an_abort(engine: EngineKind) {
    let (_up, lessor) = setup(engine).await;
    let (tx, mut stream) = raw(&lessor, vec![acquire("up"), data("x")]).await;
    drop(tx);
    let (msgs, status) = drain(&mut stream).await;
    assert!(status.is_none(), "{status:?}");
    assert!(
        msgs.iter()
            .all(|m| !matches!(m.msg, Some(lease_response::Msg::Ended(_)))),
        "no Ended for an abort: {msgs:?}"
    );
    lessor
        .wait_for("client_abort eviction", |s| {
            evictions(s, "client_abort") == 1
        })
        .await;
}

async fn protocol_cancel_while_waiting_for_a_connection_leaks_nothing(engine: EngineKind) {
    let up = TestUpstream::start().await;
    let lessor = Lessor::start(&config_one(
        &up.addr(),
        engine,
        &["pool: { max_size: 1, min_idle: 0, checkout_timeout: 30s }"],
    ))
    .await;
    let held = lessor.lease().await.unwrap();
    // Many clients wait for the one connection, then give up; none may take
    // the slot later.
    let mut waiting = Vec::new();
    for _ in 0..50 {
        waiting.push(raw(&lessor, vec![acquire("up")]).await);
    }
    lessor
        .wait_for("every client waiting", |s| s.waiting == 50)
        .await;
    drop(waiting);
    lessor.wait_for("waiters gone", |s| s.waiting == 0).await;
    held.release(lessor_client::pb::Disposition::Return)
        .await
        .unwrap();
    still_serving(&lessor).await;
    let s = lessor.stats("up").await;
    assert_eq!(s.leased, 0);
    assert_eq!(s.leases_granted, 2);
}

async fn protocol_frame_of_exactly_max_frame_is_accepted(engine: EngineKind) {
    let up = TestUpstream::start().await;
    let yaml = format!(
        "grpc: {{ max_frame: 64KiB }}\n{}",
        config_one(&up.addr(), engine, &[])
    );
    let lessor = Lessor::start(&yaml).await;
    let frame = vec![b'x'; 64 * 1024];
    let (tx, mut stream) = raw(&lessor, vec![acquire("up"), data(frame.clone())]).await;
    let mut echoed = 0;
    while echoed < frame.len() {
        match stream
            .message()
            .await
            .expect("no error status")
            .expect("open")
        {
            LeaseResponse {
                msg: Some(lease_response::Msg::Data(d)),
            } => echoed += d.len(),
            other => assert!(is_granted(&other), "{other:?}"),
        }
    }
    assert_eq!(echoed, frame.len());
    tx.send(release()).await.unwrap();
    let (msgs, status) = drain(&mut stream).await;
    assert!(status.is_none(), "{status:?}");
    assert!(
        matches!(msgs.last().and_then(|m| m.msg.as_ref()), Some(lease_response::Msg::Ended(e)) if e.disposition() == lessor_client::pb::Disposition::Return),
        "{msgs:?}"
    );
}

async fn protocol_no_acquire_within_acquire_timeout_is_deadline_exceeded(engine: EngineKind) {
    let up = TestUpstream::start().await;
    let yaml = format!(
        "grpc: {{ acquire_timeout: 200ms }}\n{}",
        config_one(&up.addr(), engine, &[])
    );
    let lessor = Lessor::start(&yaml).await;
    // The stream opens and says nothing (the sender stays open).
    let (_tx, mut stream) = raw(&lessor, vec![]).await;
    let (msgs, status) = drain(&mut stream).await;
    assert!(msgs.is_empty(), "{msgs:?}");
    let status = status.expect("an error status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("acquire_timeout"), "{status:?}");
    still_serving(&lessor).await;
}

async fn protocol_unknown_upstream_name_is_truncated_in_errors(engine: EngineKind) {
    let (_up, lessor) = setup(engine).await;
    let huge = "x".repeat(20_000);
    let (_tx, mut stream) = raw(&lessor, vec![acquire(&huge)]).await;
    let status = drain(&mut stream).await.1.expect("an error status");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().len() < 512,
        "{} bytes",
        status.message().len()
    );
    assert!(status.message().contains("20000 bytes"), "{status:?}");
    let err = lessor.client.stats(&huge).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    still_serving(&lessor).await;
}
