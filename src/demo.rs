//! `lessor demo`: the README's first command. Starts a small TCP upstream in
//! this process (`echo`: it delays replies to lines starting with `SLOW`), a
//! lessor server in front of it on both engines, and clients that
//! take leases ending every way; then reports what happened, in the words a
//! newcomer needs to understand lessor.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli;
use crate::config::Config;
use crate::echo::EchoServer;
use crate::server::{self, Listener, Listeners, ServerError};
use lessor_client::pb::{Disposition, EndReason};
use lessor_client::{Client, ClientError, LeaseOptions};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Binding or serving a socket failed.
    #[error("demo setup: {0}")]
    Io(#[from] std::io::Error),
    /// The embedded configuration was rejected (a bug).
    #[error("demo config: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The lessor server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A client call failed where the demo expected success.
    #[error("demo client: {0}")]
    Client(#[from] ClientError),
}

const CONCURRENCY: usize = 8;
const SLOW_REPLY: Duration = Duration::from_millis(30);

/// How a demo lease is meant to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Way {
    Return,
    Evict,
    Dirty,
    Expire,
    Abort,
}

impl Way {
    fn pick(i: usize) -> Self {
        match i % 10 {
            0 => Self::Evict,
            1 => Self::Dirty,
            2 => Self::Expire,
            3 => Self::Abort,
            _ => Self::Return,
        }
    }
}

/// What one lease came to, as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Ended(i32, i32),
    NoEnded,
}

struct Tally {
    ends: BTreeMap<Seen, u64>,
    /// Acquire latencies in µs: a few hundred samples, sorted for the report.
    acquire_us: Vec<u64>,
    reused: u64,
    granted: u64,
}

/// Runs the demo with `leases` leases and returns its report.
pub async fn run(leases: usize) -> Result<String, DemoError> {
    let tracker = TaskTracker::new();
    let stop_upstream = CancellationToken::new();
    let upstream_addr = EchoServer::start(SLOW_REPLY, &tracker, stop_upstream.clone())
        .await?
        .addr;

    let config = Config::from_yaml(&demo_config(&upstream_addr.to_string()))?;
    let listeners = Listeners {
        grpc: Listener::bind(&"127.0.0.1:0".parse().expect("a literal address")).await?,
        admin: TcpListener::bind("127.0.0.1:0").await?,
        control: None,
    };
    let lessor_addr = listeners.grpc.local_addr();
    let admin_addr = listeners.admin_addr();
    let (stop_lessor, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server::run(config, listeners, async {
        let _ = stopped.await;
    }));

    let client = Client::connect(&lessor_addr).await?;
    // Warm pools make the reuse figures mean something; a cold one only
    // makes them smaller.
    client.wait_idle(2, Duration::from_secs(5)).await?;
    let started = Instant::now();
    let mut tally = drive(&client, leases).await?;
    let elapsed = started.elapsed();
    // Let the pools finish with the last leases (aborts finish server-side).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = client.stats("").await?;
    let readyz = crate::admin::fetch(&admin_addr, "/readyz?verbose").await?;
    let metrics = crate::admin::fetch(&admin_addr, "/metrics").await?;

    drop(client);
    let _ = stop_lessor.send(());
    served.await.map_err(std::io::Error::other)??;
    stop_upstream.cancel();
    tracker.close();
    tracker.wait().await;

    let mut out = String::new();
    let _ = writeln!(out, "lessor demo");
    let _ = writeln!(
        out,
        "  upstream: an echo server on {upstream_addr} (lines starting SLOW answer after {SLOW_REPLY:?})"
    );
    let _ = writeln!(
        out,
        "  lessor:   gRPC on {lessor_addr}; upstream `echo` on bb8, `echo-dp` on deadpool"
    );
    let _ = writeln!(
        out,
        "  clients:  {CONCURRENCY} concurrent, {leases} leases in {:.2}s\n",
        elapsed.as_secs_f64()
    );
    report_ends(&mut out, &tally);
    let created: u64 = stats.iter().map(|s| s.connections_created).sum();
    let _ = writeln!(out, "\nConnections");
    let _ = writeln!(
        out,
        "  {} of {} leases got a warm connection from the pool ({:.0}% reuse); {created} connections dialed in all",
        tally.reused,
        tally.granted,
        100.0 * tally.reused as f64 / tally.granted.max(1) as f64
    );
    let _ = writeln!(
        out,
        "  (every lease that ended in EVICT closed its connection, so a later lease had to dial a new one)"
    );
    let mut h = std::mem::take(&mut tally.acquire_us);
    h.sort_unstable();
    let at = |q: f64| {
        h.get(((h.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let _ = writeln!(
        out,
        "  acquire latency (Acquire sent -> Granted received): p50 {}µs, p99 {}µs, max {}µs",
        at(0.50),
        at(0.99),
        at(1.0)
    );
    let _ = writeln!(
        out,
        "\nPool statistics at the end (what `lessor stats` prints)"
    );
    for line in cli::stats_table(&stats).lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(
        out,
        "\nReadiness (GET /readyz?verbose on the admin port {admin_addr}: {})",
        readyz.status
    );
    for line in readyz.body.lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(out, "\nA few metrics (GET /metrics)");
    for line in metrics.body.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("lessor_leases_total")
                || l.starts_with("lessor_evictions_total") && !l.ends_with(" 0")
                || l.starts_with("lessor_pool_connections{")
                || l.starts_with("lessor_runtime_alive_tasks")
                || l.starts_with("lessor_process_open_fds"))
    }) {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(
        out,
        "\nEvery lease got exactly one outcome, every connection was returned or closed by lessor, and LEASED is 0."
    );
    Ok(out)
}

fn demo_config(upstream: &str) -> String {
    let common = "    pool: { max_size: 6, min_idle: 2, checkout_timeout: 5s }\n    health: { interval: 1s }\n";
    format!(
        "shutdown: {{ grace: 2s }}\nupstreams:\n  - name: echo\n    address: \"{upstream}\"\n    engine: bb8\n{common}  - name: echo-dp\n    address: \"{upstream}\"\n    engine: deadpool\n{common}"
    )
}

async fn drive(client: &Client, leases: usize) -> Result<Tally, DemoError> {
    let mut workers = Vec::new();
    for w in 0..CONCURRENCY {
        let client = client.clone();
        let mine: Vec<usize> = (w..leases).step_by(CONCURRENCY).collect();
        workers.push(tokio::spawn(async move {
            let mut tally = Tally {
                ends: BTreeMap::new(),
                acquire_us: Vec::new(),
                reused: 0,
                granted: 0,
            };
            for i in mine {
                one_lease(&client, i, &mut tally).await?;
            }
            Ok::<_, ClientError>(tally)
        }));
    }
    let mut total = Tally {
        ends: BTreeMap::new(),
        acquire_us: Vec::new(),
        reused: 0,
        granted: 0,
    };
    for w in workers {
        let t = w.await.map_err(std::io::Error::other)??;
        for (k, v) in t.ends {
            *total.ends.entry(k).or_default() += v;
        }
        total.acquire_us.extend(t.acquire_us);
        total.reused += t.reused;
        total.granted += t.granted;
    }
    Ok(total)
}

async fn one_lease(client: &Client, i: usize, tally: &mut Tally) -> Result<(), ClientError> {
    let way = Way::pick(i);
    // Alternate engines per ten leases, so each sees every way of ending.
    let upstream = if (i / 10).is_multiple_of(2) {
        "echo"
    } else {
        "echo-dp"
    };
    let options = LeaseOptions {
        max_lease: (way == Way::Expire).then_some(Duration::from_millis(20)),
        ..Default::default()
    };
    let started = Instant::now();
    let mut lease = client.lease(upstream, &options).await?;
    let waited = started.elapsed().as_micros().try_into().unwrap_or(u64::MAX);
    tally.acquire_us.push(waited.max(1));
    tally.granted += 1;
    tally.reused += u64::from(lease.granted().reused);
    let ended = match way {
        Way::Return | Way::Evict => {
            lease.send(Bytes::from(format!("hello {i}\n"))).await?;
            lease.recv().await?;
            let disposition = if way == Way::Return {
                Disposition::Return
            } else {
                Disposition::Evict
            };
            Some(lease.release(disposition).await?)
        }
        Way::Dirty => {
            lease.send(Bytes::from(format!("SLOW {i}\n"))).await?;
            Some(lease.release(Disposition::Return).await?)
        }
        Way::Expire => lease.finish().await?,
        Way::Abort => {
            lease.send(Bytes::from(format!("hello {i}\n"))).await?;
            drop(lease);
            None
        }
    };
    let seen = match ended {
        Some(e) => Seen::Ended(e.disposition, e.reason),
        None => Seen::NoEnded,
    };
    *tally.ends.entry(seen).or_default() += 1;
    Ok(())
}

fn report_ends(out: &mut String, tally: &Tally) {
    let _ = writeln!(
        out,
        "How the leases ended (the Ended message each client received)"
    );
    for (seen, n) in &tally.ends {
        let (what, why) = match *seen {
            Seen::Ended(d, r) => {
                let d = Disposition::try_from(d).unwrap_or_default();
                let r = EndReason::try_from(r).unwrap_or_default();
                let why = match (d, r) {
                    (Disposition::Return, EndReason::ClientRelease) => {
                        "released with RETURN: the connection went back to the pool"
                    }
                    (Disposition::Evict, EndReason::ClientRelease) => {
                        "released with EVICT: lessor closed the connection"
                    }
                    (_, EndReason::Dirty) => {
                        "RETURN while a reply was still on its way: closed, so the late reply reaches nobody"
                    }
                    (_, EndReason::LeaseExpired) => {
                        "held past its max_lease_ms: lessor revoked it and closed the connection"
                    }
                    _ => "",
                };
                (format!("{} / {}", d.as_str_name(), r.as_str_name()), why)
            }
            Seen::NoEnded => (
                "(no Ended)".to_owned(),
                "client dropped the lease without Release: lease.on_abort=evict closed the connection",
            ),
        };
        let _ = writeln!(out, "  {n:>5}  {what:<28} {why}");
    }
}
