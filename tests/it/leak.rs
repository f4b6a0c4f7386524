//! The leak test the project's reason to exist calls for: many concurrent clients
//! ending leases every possible way, then the server's alive tokio tasks and
//! the process's open file descriptors must be back at their baseline, with
//! `leased == 0` and `connections <= max_size`.
//!
//! Tasks are counted on a runtime that runs lessor alone (clients and the
//! upstream run on another). File descriptors are counted on a `lessor serve`
//! child process, since the test process's own descriptors move with every
//! other test running beside this one.

use std::time::Duration;

use bytes::Bytes;
use lessor::{Config, EngineKind};
use lessor::{Listener, Listeners};
use lessor_client::pb::pool_client::PoolClient;
use lessor_client::pb::{Acquire, Disposition, LeaseRequest, lease_request};
use lessor_client::{Client, LeaseOptions};
use tokio::runtime::Runtime;

use crate::support::process::Served;
use crate::support::{PATIENCE, TestUpstream, upstream_yaml};

const CLIENTS: usize = 16;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn config(up: &TestUpstream, engine: EngineKind) -> String {
    let pool = "pool: { max_size: 6, min_idle: 2, checkout_timeout: 10s }";
    format!(
        "shutdown: {{ grace: 1s }}\nupstreams:\n{}",
        upstream_yaml("up", &up.addr(), engine, &[pool])
    )
}

/// One client's share of the churn: every way a lease can end.
async fn churn_one(
    client: Client,
    raw: PoolClient<tonic::transport::Channel>,
    leases: usize,
    seed: usize,
) {
    let mut raw = raw;
    for i in 0..leases {
        let way = (i + seed) % 9;
        let payload = Bytes::from(format!("lease-{seed}-{i}"));
        match way {
            // Clean return after a full exchange.
            0 => {
                let mut lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
                lease.send(payload.clone()).await.unwrap();
                lease.recv_at_least(payload.len()).await.unwrap();
                lease.release(Disposition::Return).await.unwrap();
            }
            // Explicit evict.
            1 => {
                let lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
                lease.release(Disposition::Evict).await.unwrap();
            }
            // Abort: dropped mid-exchange.
            2 => {
                let mut lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
                lease.send(payload).await.unwrap();
                drop(lease);
            }
            // Return with a request possibly unanswered (dirty, or clean if
            // the echo won the race).
            3 => {
                let mut lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
                lease.send(payload).await.unwrap();
                lease.release(Disposition::Return).await.unwrap();
            }
            // Expiry.
            4 => {
                let options = LeaseOptions {
                    max_lease: Some(Duration::from_millis(5)),
                    ..Default::default()
                };
                let lease = client.lease("up", &options).await.unwrap();
                lease.finish().await.unwrap();
            }
            // Pipelined lease, then abort before reading anything.
            5 => {
                let lease = client
                    .lease_pipelined("up", &LeaseOptions::default(), Some(payload))
                    .await
                    .unwrap();
                drop(lease);
            }
            // Protocol violation: a second Acquire.
            6 => {
                let acquire = LeaseRequest {
                    msg: Some(lease_request::Msg::Acquire(Acquire {
                        upstream: "up".into(),
                        ..Default::default()
                    })),
                };
                let stream = tokio_stream::iter([acquire.clone(), acquire]);
                let mut inbound = raw.lease(stream).await.unwrap().into_inner();
                while let Ok(Some(_)) = inbound.message().await {}
            }
            // Unknown upstream: no lease at all.
            7 => {
                let err = client
                    .lease("nope", &LeaseOptions::default())
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), Some(tonic::Code::NotFound));
            }
            // Given up while (possibly) waiting for a connection.
            _ => {
                let options = LeaseOptions::default();
                let attempt = client.lease("up", &options);
                let _ = tokio::time::timeout(Duration::from_micros(200), attempt).await;
            }
        }
    }
}

/// `CLIENTS` clients, each on its own HTTP/2 connection, churning at once.
async fn churn(addr: &str, leases_per_client: usize) {
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = Client::connect(addr).await.unwrap();
        let raw = PoolClient::connect(format!("http://{addr}")).await.unwrap();
        tasks.push(tokio::spawn(churn_one(client, raw, leases_per_client, c)));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn settled(client: &Client) -> lessor_client::pb::UpstreamStats {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = client.stats("up").await.unwrap().remove(0);
        if s.leased == 0 && s.waiting == 0 && s.idle >= 2 {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool did not settle: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn leak_tasks_return_to_baseline(engine: EngineKind) {
    let server_rt = runtime();
    let client_rt = runtime();
    let up = client_rt.block_on(TestUpstream::start());
    let config = Config::from_yaml(&config(&up, engine)).unwrap();
    let listeners = server_rt.block_on(async {
        Listeners {
            grpc: Listener::bind(&"127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            control: None,
        }
    });
    let addr = listeners.grpc.local_addr();
    let admin = listeners.admin_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = server_rt.spawn(lessor::run(config, listeners, async {
        let _ = stopped.await;
    }));

    let observer = client_rt.block_on(Client::connect(&addr)).unwrap();
    client_rt.block_on(settled(&observer));
    // The admin server spawns its shutdown watcher once it first runs: the
    // baseline is taken after it answered, or a slow start would look like
    // a task left behind by the churn.
    client_rt.block_on(crate::support::eventually(
        "the admin server answers",
        || async {
            crate::support::http::fetch(&admin, "/livez", None)
                .await
                .is_ok()
        },
    ));
    let baseline = server_rt.metrics().num_alive_tasks();

    client_rt.block_on(churn(&addr, 40));

    let after = client_rt.block_on(async {
        let s = settled(&observer).await;
        assert!(s.connections <= 6, "{s:#?}");
        assert!(s.leases_granted >= (CLIENTS * 40 / 2) as u64, "{s:#?}");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let alive = server_rt.metrics().num_alive_tasks();
            if alive <= baseline {
                return alive;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "lessor's alive tasks stayed at {alive}, baseline {baseline}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(after <= baseline);

    drop(observer);
    let _ = stop.send(());
    server_rt
        .block_on(async { tokio::time::timeout(PATIENCE, served).await })
        .expect("lessor stops")
        .unwrap()
        .unwrap();
    // Everything lessor started is gone once `run` returns (hyper's last
    // connection task may take a moment to finish after releasing tonic).
    server_rt.block_on(crate::support::eventually(
        "no lessor task left",
        || async { server_rt.metrics().num_alive_tasks() == 0 },
    ));
    drop(up);
}

#[test]
fn leak_tasks_return_to_baseline_bb8() {
    leak_tasks_return_to_baseline(EngineKind::Bb8);
}

#[test]
fn leak_tasks_return_to_baseline_deadpool() {
    leak_tasks_return_to_baseline(EngineKind::Deadpool);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_file_descriptors_return_to_baseline_in_a_served_process() {
    let up = TestUpstream::start().await;
    let served = Served::start(&config(&up, EngineKind::Bb8)).await;
    let pid = served.pid();
    let addr = served.grpc.clone();
    let observer = served.client().await;
    // Pooled sockets are fds too, and how many stay idle after the churn
    // (up to max_size, until idle_timeout) is the pool's business: compare
    // the descriptors that are not pooled connections.
    let s = settled(&observer).await;
    let other_before = open_fds(pid) - s.connections as usize;
    let rss_before = rss_kib(pid);

    churn(&addr, 125).await;

    let s = settled(&observer).await;
    // Every dial served a lease or min_idle: none raced a full pool and was
    // thrown away (each would leave a TIME_WAIT socket behind).
    let evicted: u64 = s.evictions.values().sum();
    assert!(
        s.connections_created <= evicted + 6 + 16,
        "wasted dials: {} created, {evicted} evicted",
        s.connections_created
    );
    assert!(s.connections <= 6, "{s:#?}");
    let observer = &observer;
    crate::support::eventually("lessor's descriptors back to baseline", || async move {
        let pooled = observer.stats("up").await.unwrap()[0].connections as usize;
        open_fds(pid).saturating_sub(pooled) <= other_before
    })
    .await;
    let rss_after = rss_kib(pid);
    eprintln!(
        "lessor serve: {} leases churned; non-pool fds {other_before} -> {}; RSS {rss_before} KiB -> {rss_after} KiB",
        CLIENTS * 125,
        open_fds(pid) - s.connections as usize
    );
    // Loose on purpose (allocators keep freed memory): catches buffers
    // piling up per lease, not allocator noise.
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
}

/// Dropping a running server (an embedder aborting `run_with`) stops its
/// admin thread too: no thread outlives the server it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_admin_thread_stops_with_an_aborted_server() {
    let up = TestUpstream::start().await;
    let config = Config::from_yaml(&config(&up, EngineKind::Bb8)).unwrap();
    let listeners = Listeners {
        grpc: Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        control: None,
    };
    let admin = listeners.admin_addr();
    let served = tokio::spawn(lessor::run(config, listeners, std::future::pending()));
    crate::support::eventually("the admin server to answer", || async {
        crate::support::http::fetch(&admin, "/livez", None)
            .await
            .is_ok()
    })
    .await;
    served.abort();
    let _ = served.await;
    // Its port stops answering only when the admin thread's runtime is gone.
    crate::support::eventually("the aborted server's admin thread to stop", || async {
        tokio::net::TcpStream::connect(&admin).await.is_err()
    })
    .await;
}
