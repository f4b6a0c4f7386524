//! `lessor-bench --soak N`: N leases against a `lessor serve` child, ending
//! every abnormal way a client can end them (cancelled mid-request, a
//! client that vanishes with its connection, evicted, expired, stalled on
//! a reader that stopped), then the child's descriptors, memory, tokio
//! tasks and `leased` before and after. A leak shows as a figure that grew.
//!
//! Not part of the test suite: a million leases take minutes. Run it with
//! `cargo build --release && cargo run --release -p lessor-bench -- --soak 1000000`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::compare::setup::{Lessor, get};
use crate::load::BenchError;
use lessor::EchoServer;
use lessor_client::pb::Disposition;
use lessor_client::{Client, Lease, LeaseOptions};
use std::path::Path;

/// How a soak lease ends, in the order the mix cycles through them.
const WAYS: [&str; 8] = [
    "clean return",
    "cancelled mid-request",
    "evicted",
    "expired",
    "dropped after the reply",
    "stalled reader",
    "client vanished",
    "ended by lessor first",
];

/// A lease meant to end another way that lessor ended first (its idle
/// timeout, when a loaded machine delays the upstream's reply).
const ENDED_FIRST: usize = 7;

/// One stalled lease (and one vanished client) per this many leases: each
/// costs the lease idle timeout or a new connection.
const RARE: u64 = 2000;

/// The soak upstream's `lease.idle_timeout`: how long a stalled reader
/// holds its lease.
const IDLE: Duration = Duration::from_secs(1);

/// What `--soak` reports.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Leases taken.
    pub leases: u64,
    /// How long they took.
    pub elapsed: Duration,
    /// Leases that ended each way, in `WAYS` order.
    pub ended: [u64; WAYS.len()],
    /// The child's figures before the churn.
    pub before: Figures,
    /// The same once every client is gone and the pool settled.
    pub after: Figures,
}

/// A `lessor serve` process's leak indicators.
#[derive(Debug, Default, Clone, Copy)]
pub struct Figures {
    /// Open file descriptors, pooled sockets excluded.
    pub fds: i64,
    /// Resident memory, KiB.
    pub rss_kib: i64,
    /// Tokio tasks alive.
    pub tasks: i64,
    /// Connections leased.
    pub leased: u32,
    /// Connections open.
    pub connections: u32,
}

/// Runs `leases` leases with `concurrency` loops against a fresh child.
pub(crate) async fn run(
    lessor_bin: &Path,
    leases: u64,
    concurrency: usize,
) -> Result<SoakReport, BenchError> {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let echo = EchoServer::start(Duration::ZERO, &tracker, stop.clone()).await?;
    let config = format!(
        "upstreams:\n  - name: soak\n    address: \"{}\"\n    pool: {{ max_size: 64, min_idle: 8, checkout_timeout: 10s }}\n    lease: {{ idle_timeout: {}ms }}\n",
        echo.addr,
        IDLE.as_millis()
    );
    let lessor = Lessor::spawn(lessor_bin, &config, 2).await?;
    let client = Client::connect(&lessor.grpc).await?;
    let before = settled(&lessor, &client).await?;

    let next = Arc::new(AtomicU64::new(0));
    let ended: Arc<[AtomicU64; WAYS.len()]> = Arc::default();
    let started = Instant::now();
    let loops: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, ended, target) = (
                client.clone(),
                next.clone(),
                ended.clone(),
                lessor.grpc.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= leases {
                        return Ok::<(), BenchError>(());
                    }
                    let way = way_of(i);
                    let how = one(&client, &target, way).await.map_err(|e| {
                        BenchError::Reply(format!("lease {i} ({}): {e}", WAYS[way]))
                    })?;
                    ended[how].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for l in loops {
        l.await
            .map_err(|e| BenchError::Reply(format!("a soak loop failed: {e}")))??;
    }
    let elapsed = started.elapsed();
    let after = settled(&lessor, &client).await?;
    drop(client);
    lessor.stop().await;
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(SoakReport {
        leases,
        elapsed,
        ended: std::array::from_fn(|w| ended[w].load(Ordering::Relaxed)),
        before,
        after,
    })
}

/// Which way lease `i` ends: the cheap ways in turn, the costly ones rarely.
fn way_of(i: u64) -> usize {
    match i % RARE {
        0 => 5,
        1 => 6,
        n => (n % 5) as usize,
    }
}

/// Takes one lease and ends it `way`; returns how it did end.
async fn one(client: &Client, target: &str, way: usize) -> Result<usize, BenchError> {
    let payload = Bytes::from_static(b"soak-request");
    match way {
        // Clean return after a full exchange.
        0 => {
            let mut lease = client.lease("soak", &LeaseOptions::default()).await?;
            if !exchange(&mut lease, &payload).await? {
                return Ok(ENDED_FIRST);
            }
            lease.release(Disposition::Return).await?;
        }
        // Cancelled mid-request: the client drops the lease while its
        // request is on the way.
        1 => {
            let mut lease = client.lease("soak", &LeaseOptions::default()).await?;
            lease.send(payload).await?;
            drop(lease);
        }
        2 => {
            let lease = client.lease("soak", &LeaseOptions::default()).await?;
            lease.release(Disposition::Evict).await?;
        }
        // Expired: lessor ends it.
        3 => {
            let options = LeaseOptions {
                max_lease: Some(Duration::from_millis(1)),
                ..Default::default()
            };
            let lease = client.lease("soak", &options).await?;
            lease.finish().await?;
        }
        // Dropped after the reply, without Release.
        4 => {
            let mut lease = client.lease("soak", &LeaseOptions::default()).await?;
            if !exchange(&mut lease, &payload).await? {
                return Ok(ENDED_FIRST);
            }
            drop(lease);
        }
        // A reader that stops: more comes back than the stream's window
        // holds, nobody reads, the lease idles out while parked on flow
        // control; then the client comes back for the bytes and Ended.
        5 => {
            let mut lease = client.lease("soak", &LeaseOptions::default()).await?;
            let chunk = Bytes::from(vec![b's'; 900 * 1024]);
            for _ in 0..3 {
                // The lease may idle out while a send waits for window.
                if lease.send(chunk.clone()).await.is_err() {
                    break;
                }
            }
            tokio::time::sleep(IDLE + Duration::from_millis(300)).await;
            lease.finish().await?;
        }
        // A client that vanishes with its whole connection, lease open.
        _ => {
            let own = Client::connect(target).await?;
            let mut lease = own.lease("soak", &LeaseOptions::default()).await?;
            lease.send(payload).await?;
            drop((lease, own));
        }
    }
    Ok(way)
}

/// Sends `payload` and reads its echo: `false` when lessor ended the lease
/// first (with an `Ended`, as the lease-end table allows); an end without
/// one is an error.
async fn exchange(lease: &mut Lease, payload: &Bytes) -> Result<bool, BenchError> {
    if lease.send(payload.clone()).await.is_err() {
        // The stream is over: its Ended says why.
        while lease.recv().await?.is_some() {}
    } else if lease.recv_at_least(payload.len()).await.is_ok() {
        return Ok(true);
    }
    match lease.ended() {
        Some(_) => Ok(false),
        None => Err(BenchError::Reply(format!(
            "lease {} ended without Ended",
            lease.granted().lease_id
        ))),
    }
}

/// Waits until nothing is leased or waiting, then reads the figures.
async fn settled(lessor: &Lessor, client: &Client) -> Result<Figures, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = client.stats("soak").await?.remove(0);
        if s.leased == 0 && s.waiting == 0 || Instant::now() > deadline {
            let (_, metrics) = get(&lessor.admin, "/metrics").await?;
            let gauge = |name: &str| {
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<i64>().ok())
                    .unwrap_or(-1)
            };
            return Ok(Figures {
                fds: gauge("lessor_process_open_fds") - i64::from(s.connections),
                rss_kib: gauge("lessor_process_resident_memory_bytes") / 1024,
                tasks: gauge("lessor_runtime_alive_tasks"),
                leased: s.leased,
                connections: s.connections,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl SoakReport {
    /// The report as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let rate = self.leases as f64 / self.elapsed.as_secs_f64().max(1e-9);
        let _ = writeln!(
            out,
            "soak: {} leases in {:.1?} ({rate:.0}/s)",
            self.leases, self.elapsed
        );
        for (way, n) in WAYS.iter().zip(self.ended) {
            let _ = writeln!(out, "  {way:<24} {n}");
        }
        let _ = writeln!(
            out,
            "{:<28} {:>10} {:>10}",
            "lessor serve", "before", "after"
        );
        let rows: [(&str, i64, i64); 5] = [
            ("fds (pooled excluded)", self.before.fds, self.after.fds),
            ("RSS KiB", self.before.rss_kib, self.after.rss_kib),
            ("tokio tasks", self.before.tasks, self.after.tasks),
            (
                "leased",
                i64::from(self.before.leased),
                i64::from(self.after.leased),
            ),
            (
                "connections",
                i64::from(self.before.connections),
                i64::from(self.after.connections),
            ),
        ];
        for (name, before, after) in rows {
            let _ = writeln!(out, "{name:<28} {before:>10} {after:>10}");
        }
        out
    }
}
