//! The load mode: lease loops against a running sidecar, and the pieces the
//! other modes share (errors, one lease cycle, latency histograms).
//!
//! Latencies go into `hdrhistogram`s in microseconds; the reports print
//! p50, p90, p99 and p99.9.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;

use lessor_client::pb::Disposition;
use lessor_client::{Client, ClientError, Lease, LeaseOptions};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A lessor call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A socket, file or child process failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The sidecar binary could not be found or started.
    #[error("{0}")]
    Sidecar(String),
    /// The baseline gRPC server or client failed.
    #[error("baseline gRPC: {0}")]
    Baseline(String),
    /// The upstream answered something else than expected.
    #[error("unexpected reply: {0}")]
    Reply(String),
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Samples taken.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

/// A latency histogram in microseconds (1µs to 60s, 3 significant figures).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` in microseconds (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, 60_000_000);
    h.saturating_record(us);
}

impl Percentiles {
    /// Reads a histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What `lessor-bench` (without `--compare` or `--soak`) does.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// lessor's gRPC address.
    pub target: String,
    /// The upstream to lease from.
    pub upstream: String,
    /// Concurrent lease loops.
    pub concurrency: usize,
    /// How long to run.
    pub duration: Duration,
    /// The request: sent on each lease.
    pub request: Bytes,
    /// Bytes of reply to wait for (the request's length for an echo).
    pub reply_bytes: usize,
    /// Send the request right behind Acquire, without waiting for Granted.
    pub pipeline: bool,
    /// One `Exchange` per request instead of a lease (a `protocol: redis`
    /// upstream).
    pub exchange: bool,
}

/// What a load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Lease cycles completed.
    pub leases: u64,
    /// Requests answered (one per lease).
    pub requests: u64,
    /// Cycles that failed.
    pub errors: u64,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
    /// Acquire sent to Granted received.
    pub acquire: Percentiles,
    /// Request sent to full reply received.
    pub request: Percentiles,
    /// Acquire to the end of the stream after Release.
    pub cycle: Percentiles,
}

impl LoadReport {
    /// Lease cycles per second.
    pub fn leases_per_sec(&self) -> f64 {
        self.leases as f64 / self.seconds.max(1e-9)
    }

    /// The human-readable report.
    pub fn render(&self, opts: &LoadOptions) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "lessor-bench: {} on {}, concurrency {}, {:.1}s, {}-byte requests{}",
            opts.upstream,
            opts.target,
            opts.concurrency,
            self.seconds,
            opts.request.len(),
            if opts.exchange {
                ", one Exchange each"
            } else if opts.pipeline {
                ", pipelined"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "  {:.0} leases/s, {:.0} requests/s, {} errors",
            self.leases_per_sec(),
            self.requests as f64 / self.seconds.max(1e-9),
            self.errors
        );
        let _ = writeln!(
            out,
            "  {:<10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "µs", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, p) in [
            ("acquire", &self.acquire),
            ("request", &self.request),
            ("cycle", &self.cycle),
        ] {
            let _ = writeln!(
                out,
                "  {name:<10} {:>8} {:>8} {:>8} {:>8} {:>8}",
                p.p50, p.p90, p.p99, p.p999, p.max
            );
        }
        out
    }
}

/// The timings of one lease cycle.
pub struct CycleTimes {
    /// Acquire to Granted.
    pub acquire: Duration,
    /// Request to reply.
    pub request: Duration,
    /// The whole cycle.
    pub cycle: Duration,
}

/// One lease: acquire, one request/reply, release RETURN, end of stream.
pub async fn lease_cycle(
    client: &Client,
    upstream: &str,
    request: &Bytes,
    reply_bytes: usize,
    pipeline: bool,
) -> Result<CycleTimes, BenchError> {
    let start = Instant::now();
    let options = LeaseOptions::default();
    let (mut lease, acquire, sent_at) = if pipeline {
        let lease = client
            .lease_pipelined(upstream, &options, Some(request.clone()))
            .await?;
        (lease, start.elapsed(), start)
    } else {
        let mut lease = client.lease(upstream, &options).await?;
        let acquire = start.elapsed();
        let sent_at = Instant::now();
        lease.send(request.clone()).await?;
        (lease, acquire, sent_at)
    };
    read_reply(&mut lease, reply_bytes).await?;
    let request_time = sent_at.elapsed();
    let ended = lease.release(Disposition::Return).await?;
    if ended.disposition() != Disposition::Return {
        return Err(BenchError::Reply(format!("lease ended {ended:?}")));
    }
    Ok(CycleTimes {
        acquire,
        request: request_time,
        cycle: start.elapsed(),
    })
}

/// Reads until `n` bytes of reply arrived.
pub async fn read_reply(lease: &mut Lease, n: usize) -> Result<(), BenchError> {
    let mut got = 0;
    while got < n.max(1) {
        match lease.recv().await? {
            Some(data) => got += data.len(),
            None => return Err(BenchError::Reply("the lease ended before the reply".into())),
        }
    }
    Ok(())
}

/// One request the way `opts` asks: a lease cycle, or an Exchange (whose
/// acquire time is its checkout wait, as lessor reports it).
async fn one(client: &Client, opts: &LoadOptions) -> Result<CycleTimes, BenchError> {
    if !opts.exchange {
        return lease_cycle(
            client,
            &opts.upstream,
            &opts.request,
            opts.reply_bytes,
            opts.pipeline,
        )
        .await;
    }
    let start = Instant::now();
    let reply = client
        .exchange(&opts.upstream, opts.request.clone(), None)
        .await?;
    let took = start.elapsed();
    if reply.reply.len() < opts.reply_bytes.max(1) {
        return Err(BenchError::Reply(format!("{:?}", reply.reply)));
    }
    Ok(CycleTimes {
        acquire: Duration::from_micros(reply.wait_us),
        request: took,
        cycle: took,
    })
}

/// Runs `concurrency` lease loops against `opts.target` for `opts.duration`.
pub async fn load(opts: &LoadOptions) -> Result<LoadReport, BenchError> {
    let client = Client::connect(&opts.target).await?;
    // One warm-up cycle: fails fast on a wrong upstream name.
    one(&client, opts).await?;
    let deadline = Instant::now() + opts.duration;
    let started = Instant::now();
    let opts = Arc::new(opts.clone());
    let workers: Vec<_> = (0..opts.concurrency.max(1))
        .map(|_| {
            let client = client.clone();
            let opts = opts.clone();
            tokio::spawn(async move {
                let (mut a, mut r, mut c) = (histogram(), histogram(), histogram());
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    match one(&client, &opts).await {
                        Ok(t) => {
                            record(&mut a, t.acquire);
                            record(&mut r, t.request);
                            record(&mut c, t.cycle);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (a, r, c, errors)
            })
        })
        .collect();
    let (mut a, mut r, mut c, mut errors) = (histogram(), histogram(), histogram(), 0);
    for w in workers {
        let (wa, wr, wc, we) = w.await.map_err(std::io::Error::other)?;
        let _ = a.add(&wa);
        let _ = r.add(&wr);
        let _ = c.add(&wc);
        errors += we;
    }
    Ok(LoadReport {
        leases: c.len(),
        requests: r.len(),
        errors,
        seconds: started.elapsed().as_secs_f64(),
        acquire: Percentiles::of(&a),
        request: Percentiles::of(&r),
        cycle: Percentiles::of(&c),
    })
}
