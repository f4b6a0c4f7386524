//! `lessor-bench --compare`: one self-contained run on this machine. It
//! starts an upstream (the in-process echo server, or `redis-server` with
//! `--redis`), a bare tonic echo server as the gRPC baseline, and a
//! `lessor serve` child process, then measures side by side:
//!
//! - U: a unary gRPC echo (the floor for a lease: one loopback gRPC round trip)
//! - T: a request/response on a kept-alive TCP socket to the upstream
//! - N: a new TCP connection per request (an application without a pool)
//! - A: lease acquire (Acquire → Granted), warm pool
//! - R: a request/response through a held lease
//! - C: a whole pipelined lease cycle (Acquire+Data → Granted+reply → Release
//!   → Ended and the end of the stream)
//!
//! plus C's throughput at several concurrencies against U's, bb8 against
//! deadpool, and lessor's RSS and CPU time from `/proc`. With `--redis`,
//! then `redis-benchmark` against a redis-server, twemproxy and lessor's
//! Redis listener (`redis_benchmark/`). The servers run on a
//! runtime of their own and lessor on `runtime.worker_threads` (both
//! reported), so runs on the same machine compare.

use std::future::Future;
use std::path::PathBuf;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::load::{BenchError, Percentiles, histogram, lease_cycle, read_reply, record};
use lessor::EchoServer;
use lessor_client::pb::Disposition;
use lessor_client::{Client, LeaseOptions};

pub(crate) mod failover;
pub(crate) mod pgbench;
pub(crate) mod postgres;
pub(crate) mod redis_benchmark;
mod report;
pub(crate) mod setup;
pub(crate) mod tls;

use setup::{Lessor, Upstream, four_upstreams_config, one_upstream_config, start_redis};

/// The baseline's generated code.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("lessor.bench.v1");
}

/// What `--compare` does.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Fewer samples and shorter phases (CI).
    pub quick: bool,
    /// Use a real `redis-server` (PING) instead of the echo upstream.
    pub redis: bool,
    /// Request size for the echo upstream.
    pub payload: usize,
    /// lessor's `runtime.worker_threads`.
    pub lessor_workers: usize,
    /// Lease cycles for the memory-stability phase.
    pub cycles: u64,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
    /// The `lessor` binary to measure.
    pub lessor_bin: PathBuf,
}

/// One measured operation.
#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    /// `U`, `T`, `N`, `A`, `R` or `C`, with the engine for lessor's.
    pub name: String,
    /// What it is.
    pub what: String,
    /// Latency, one operation at a time.
    pub latency: Percentiles,
}

/// Throughput at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Concurrent loops on one HTTP/2 connection.
    pub concurrency: usize,
    /// Unary echoes per second.
    pub u_per_sec: f64,
    /// Pipelined lease cycles per second on bb8.
    pub c_bb8_per_sec: f64,
    /// Pipelined lease cycles per second on deadpool.
    pub c_deadpool_per_sec: f64,
    /// Exchanges (`PING`) per second, with `--redis`.
    pub e_per_sec: Option<f64>,
}

/// Everything one `--compare` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// `echo` or `redis`.
    pub upstream: String,
    /// Request size in bytes.
    pub payload: usize,
    /// lessor's worker threads.
    pub lessor_workers: usize,
    /// The bench's client runtime worker threads.
    pub client_workers: usize,
    /// The baseline and upstream servers' runtime worker threads.
    pub server_workers: usize,
    /// Online CPUs on this machine.
    pub cpus: usize,
    /// Sequential latencies.
    pub measures: Vec<Measure>,
    /// Throughput by concurrency.
    pub throughput: Vec<Throughput>,
    /// lessor's RSS once warm (KiB).
    pub rss_idle_kib: u64,
    /// lessor's RSS with 4 upstreams × 32 idle connections (KiB).
    pub rss_idle_4x32_kib: u64,
    /// lessor's RSS after the first 10k cycles of the stability phase (KiB).
    pub rss_after_10k_kib: u64,
    /// lessor's RSS after all cycles of the stability phase (KiB).
    pub rss_after_all_kib: u64,
    /// Cycles in the stability phase.
    pub stability_cycles: u64,
    /// lessor's CPU time (user+system) per 1000 lease cycles, in ms.
    pub cpu_ms_per_1k_cycles: f64,
    /// A p50 / U p50.
    pub ratio_a_over_u: f64,
    /// R p50 / (U p50 + T p50).
    pub ratio_r_over_u_plus_t: f64,
    /// C throughput / U throughput at concurrency 32.
    pub ratio_c_over_u_throughput_32: f64,
    /// With `--redis`: Exchange p50 over (U + T) p50.
    pub ratio_e_over_u_plus_t: Option<f64>,
    /// With `--redis`: Exchange throughput over U's, at concurrency 32.
    pub ratio_e_over_u_throughput_32: Option<f64>,
    /// With `--redis`: lessor's CPU time per 1000 Exchanges, in ms.
    pub cpu_ms_per_1k_exchanges: Option<f64>,
    /// With `--redis`: redis-benchmark directly, through twemproxy and
    /// through lessor's Redis listener.
    pub redis_benchmark: Option<redis_benchmark::RedisBenchmarkReport>,
}

const SERVER_WORKERS: usize = 1;
/// The bench's own client runtime: one worker, so runs compare.
pub const CLIENT_WORKERS: usize = 1;

/// The baseline and upstream servers' runtime. Dropping a runtime inside
/// another one's async context panics, so this shuts it down in the
/// background instead, on every path out of `run`.
struct ServerRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for ServerRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The baseline: a unary echo with nothing in the way.
struct EchoService;

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoService {
    async fn echo(
        &self,
        request: Request<pb::EchoMessage>,
    ) -> Result<Response<pb::EchoMessage>, Status> {
        Ok(Response::new(request.into_inner()))
    }
}

/// Runs the comparison. Call from a runtime with [`CLIENT_WORKERS`] workers;
/// it starts its own server runtime.
pub async fn run(opts: &CompareOptions) -> Result<CompareReport, BenchError> {
    let servers = ServerRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVER_WORKERS)
            .thread_name("bench-servers")
            .enable_all()
            .build()?,
    ));
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();

    let upstream = if opts.redis {
        start_redis().await?
    } else {
        let echo = {
            let (tracker, stop) = (tracker.clone(), stop.clone());
            servers
                .spawn(async move { EchoServer::start(Duration::from_millis(1), &tracker, stop).await })
                .await
                .map_err(std::io::Error::other)??
        };
        Upstream::Echo {
            addr: echo.addr.to_string(),
            _stop: stop.clone(),
        }
    };
    let (request, reply_len) = if opts.redis {
        (Bytes::from_static(b"PING\r\n"), 7)
    } else {
        (
            Bytes::from(vec![b'x'; opts.payload.max(1)]),
            opts.payload.max(1),
        )
    };

    let baseline_addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = stop.clone();
        servers.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(pb::echo_server::EchoServer::new(EchoService))
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
        });
        addr.to_string()
    };

    let lessor = Lessor::spawn(
        &opts.lessor_bin,
        &one_upstream_config(upstream.addr(), opts),
        opts.lessor_workers,
    )
    .await?;
    let client = Client::connect(&lessor.grpc).await?;
    wait_warm(&client, 8).await?;
    let rss_idle_kib = lessor.rss_kib();
    let cpu_start = lessor.cpu_ms();

    let n = if opts.quick { 2_000 } else { 20_000 };
    let mut measures = Vec::new();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{baseline_addr}"))
        .map_err(|e| BenchError::Baseline(e.to_string()))?
        .connect()
        .await
        .map_err(|e| BenchError::Baseline(e.to_string()))?;
    let echo = pb::echo_client::EchoClient::new(channel);
    let u = {
        let echo = echo.clone();
        let request = request.clone();
        sample(n, move || {
            let mut echo = echo.clone();
            let payload = request.clone();
            async move {
                echo.echo(pb::EchoMessage { payload })
                    .await
                    .map_err(|e| BenchError::Baseline(e.to_string()))?;
                Ok(())
            }
        })
        .await?
    };
    measures.push(Measure {
        name: "U".into(),
        what: "unary gRPC echo (baseline)".into(),
        latency: u,
    });

    let mut kept = TcpStream::connect(upstream.addr()).await?;
    kept.set_nodelay(true)?;
    let t = {
        let mut buf = vec![0u8; reply_len];
        let mut samples = Samples::new();
        for _ in 0..n + WARMUP {
            let start = Instant::now();
            kept.write_all(&request).await?;
            kept.read_exact(&mut buf).await?;
            samples.record(start.elapsed());
        }
        samples.percentiles()
    };
    measures.push(Measure {
        name: "T".into(),
        what: "TCP request/response, kept-alive socket".into(),
        latency: t,
    });

    let fresh = {
        let mut buf = vec![0u8; reply_len];
        let mut hist = histogram();
        // New connections leave TIME_WAIT sockets behind: fewer samples.
        for _ in 0..(n / 4).max(200) {
            let start = Instant::now();
            let mut s = TcpStream::connect(upstream.addr()).await?;
            s.set_nodelay(true)?;
            s.write_all(&request).await?;
            s.read_exact(&mut buf).await?;
            record(&mut hist, start.elapsed());
        }
        Percentiles::of(&hist)
    };
    measures.push(Measure {
        name: "N".into(),
        what: "new TCP connection per request".into(),
        latency: fresh,
    });

    for engine in ["bb8", "deadpool"] {
        let a = {
            let mut samples = Samples::new();
            for _ in 0..n + WARMUP {
                let start = Instant::now();
                let lease = client.lease(engine, &LeaseOptions::default()).await?;
                samples.record(start.elapsed());
                lease.release(Disposition::Return).await?;
            }
            samples.percentiles()
        };
        measures.push(Measure {
            name: format!("A {engine}"),
            what: "lease acquire, warm pool".into(),
            latency: a,
        });
        let r = {
            let mut lease = client.lease(engine, &LeaseOptions::default()).await?;
            let mut samples = Samples::new();
            for _ in 0..n + WARMUP {
                let start = Instant::now();
                lease.send(request.clone()).await?;
                read_reply(&mut lease, reply_len).await?;
                samples.record(start.elapsed());
            }
            lease.release(Disposition::Return).await?;
            samples.percentiles()
        };
        measures.push(Measure {
            name: format!("R {engine}"),
            what: "request/response through a held lease".into(),
            latency: r,
        });
        let c = {
            let client = client.clone();
            let request = request.clone();
            sample(n, move || {
                let client = client.clone();
                let request = request.clone();
                async move {
                    lease_cycle(&client, engine, &request, reply_len, true)
                        .await
                        .map(|_| ())
                }
            })
            .await?
        };
        measures.push(Measure {
            name: format!("C {engine}"),
            what: "whole pipelined lease cycle".into(),
            latency: c,
        });
    }

    if opts.redis {
        exchange_latencies(&client, n, &mut measures).await?;
    }

    let phase = if opts.quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(3)
    };
    let mut throughput = Vec::new();
    for concurrency in [1, 8, 32, 128] {
        let u_rate = {
            let echo = echo.clone();
            let request = request.clone();
            rate(concurrency, phase, move || {
                let mut echo = echo.clone();
                let payload = request.clone();
                async move {
                    echo.echo(pb::EchoMessage { payload })
                        .await
                        .map_err(|e| BenchError::Baseline(e.to_string()))
                        .map(|_| ())
                }
            })
            .await?
        };
        let mut c_rates = Vec::new();
        for engine in ["bb8", "deadpool"] {
            let client = client.clone();
            let request = request.clone();
            c_rates.push(
                rate(concurrency, phase, move || {
                    let client = client.clone();
                    let request = request.clone();
                    async move {
                        lease_cycle(&client, engine, &request, reply_len, true)
                            .await
                            .map(|_| ())
                    }
                })
                .await?,
            );
        }
        let e_rate = if opts.redis {
            let client = client.clone();
            Some(
                rate(concurrency, phase, move || {
                    let client = client.clone();
                    async move { exchange_once(&client, b"PING\r\n", 7).await }
                })
                .await?,
            )
        } else {
            None
        };
        throughput.push(Throughput {
            concurrency,
            u_per_sec: u_rate,
            c_bb8_per_sec: c_rates[0],
            c_deadpool_per_sec: c_rates[1],
            e_per_sec: e_rate,
        });
    }

    // Memory stability: RSS after the first 10k cycles against after all.
    let stability_cycles = opts.cycles.max(20_000);
    let run_cycles = |count: u64| {
        let client = client.clone();
        let request = request.clone();
        async move { cycles(&client, &request, reply_len, count, 32).await }
    };
    run_cycles(10_000).await?;
    let rss_after_10k_kib = lessor.rss_kib();
    run_cycles(stability_cycles - 10_000).await?;
    let rss_after_all_kib = lessor.rss_kib();

    let total_cycles: u64 = stability_cycles
        + throughput
            .iter()
            .map(|t| ((t.c_bb8_per_sec + t.c_deadpool_per_sec) * phase.as_secs_f64()) as u64)
            .sum::<u64>()
        + 2 * (n + WARMUP) as u64;
    let cpu_ms = lessor.cpu_ms().saturating_sub(cpu_start);
    let cpu_ms_per_1k_exchanges = if opts.redis {
        let count = if opts.quick { 5_000 } else { 50_000 };
        let before = lessor.cpu_ms();
        let client = client.clone();
        let done = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..32)
            .map(|_| {
                let (client, done) = (client.clone(), done.clone());
                tokio::spawn(async move {
                    while done.fetch_add(1, Ordering::Relaxed) < count {
                        exchange_once(&client, b"PING\r\n", 7).await?;
                    }
                    Ok::<_, BenchError>(())
                })
            })
            .collect();
        for w in workers {
            w.await.map_err(std::io::Error::other)??;
        }
        Some(lessor.cpu_ms().saturating_sub(before) as f64 * 1000.0 / count as f64)
    } else {
        None
    };
    drop(client);
    lessor.stop().await;

    let idle_4x32 = Lessor::spawn(
        &opts.lessor_bin,
        &four_upstreams_config(upstream.addr(), opts),
        opts.lessor_workers,
    )
    .await?;
    let idle_client = Client::connect(&idle_4x32.grpc).await?;
    wait_warm(&idle_client, 32).await?;
    drop(idle_client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_idle_4x32_kib = idle_4x32.rss_kib();
    idle_4x32.stop().await;

    let redis_benchmark = if opts.redis {
        Some(redis_benchmark::run(opts).await?)
    } else {
        None
    };

    stop.cancel();
    tracker.close();
    drop(upstream);
    drop(servers);

    let p50 = |name: &str| {
        measures
            .iter()
            .find(|m| m.name == name)
            .map_or(0, |m| m.latency.p50) as f64
    };
    let at32 = throughput.iter().find(|t| t.concurrency == 32);
    let ratio_e_over_u_plus_t = opts
        .redis
        .then(|| p50("E PING") / (p50("U") + p50("T")).max(1.0));
    let ratio_e_over_u_throughput_32 =
        at32.and_then(|t| Some(t.e_per_sec? / t.u_per_sec.max(1e-9)));
    let report = CompareReport {
        upstream: if opts.redis { "redis" } else { "echo" }.into(),
        payload: request.len(),
        lessor_workers: opts.lessor_workers,
        client_workers: CLIENT_WORKERS,
        server_workers: SERVER_WORKERS,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        ratio_a_over_u: p50("A bb8") / p50("U").max(1.0),
        ratio_r_over_u_plus_t: p50("R bb8") / (p50("U") + p50("T")).max(1.0),
        ratio_c_over_u_throughput_32: at32.map_or(0.0, |t| t.c_bb8_per_sec / t.u_per_sec.max(1e-9)),
        measures,
        throughput,
        rss_idle_kib,
        rss_idle_4x32_kib,
        rss_after_10k_kib,
        rss_after_all_kib,
        stability_cycles,
        cpu_ms_per_1k_cycles: cpu_ms as f64 * 1000.0 / total_cycles.max(1) as f64,
        ratio_e_over_u_plus_t,
        ratio_e_over_u_throughput_32,
        cpu_ms_per_1k_exchanges,
        redis_benchmark,
    };
    if let Some(path) = &opts.json {
        let json = serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?;
        std::fs::write(path, json)?;
    }
    Ok(report)
}

/// One Exchange, its reply checked for length.
async fn exchange_once(
    client: &Client,
    request: &'static [u8],
    reply_len: usize,
) -> Result<(), BenchError> {
    let reply = client.exchange("resp", request, None).await?;
    if reply.reply.len() == reply_len {
        Ok(())
    } else {
        Err(BenchError::Reply(format!("{:?}", reply.reply)))
    }
}

/// E (Exchange of `PING`, and of `GET` of a 64-byte value) and R resp (a
/// held lease on the protocol upstream: the streaming path's parsing cost).
async fn exchange_latencies(
    client: &Client,
    n: usize,
    measures: &mut Vec<Measure>,
) -> Result<(), BenchError> {
    let value = "v".repeat(64);
    client
        .exchange("resp", format!("SET bench:k {value}\r\n"), None)
        .await?;
    let get_len = format!("$64\r\n{value}\r\n").len();
    for (name, request, reply_len) in [
        ("E PING", &b"PING\r\n"[..], 7),
        ("E GET", &b"GET bench:k\r\n"[..], get_len),
    ] {
        let latency = sample(n, || exchange_once(client, request, reply_len)).await?;
        measures.push(Measure {
            name: name.into(),
            what: "Exchange, one unary call (protocol: redis)".into(),
            latency,
        });
    }
    let mut lease = client.lease("resp", &LeaseOptions::default()).await?;
    let mut samples = Samples::new();
    for _ in 0..n + WARMUP {
        let start = Instant::now();
        lease.send(Bytes::from_static(b"PING\r\n")).await?;
        read_reply(&mut lease, 7).await?;
        samples.record(start.elapsed());
    }
    lease.release(Disposition::Return).await?;
    measures.push(Measure {
        name: "R resp".into(),
        what: "request/response through a held lease, protocol: redis".into(),
        latency: samples.percentiles(),
    });
    Ok(())
}

async fn sample<F, Fut>(n: usize, mut op: F) -> Result<Percentiles, BenchError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), BenchError>>,
{
    let mut samples = Samples::new();
    for _ in 0..n + WARMUP {
        let start = Instant::now();
        op().await?;
        samples.record(start.elapsed());
    }
    Ok(samples.percentiles())
}

/// Operations run before any is recorded: connections, caches and the
/// allocator settle first.
pub(crate) const WARMUP: usize = 200;

/// A latency histogram that ignores its first [`WARMUP`] samples.
pub(crate) struct Samples {
    hist: hdrhistogram::Histogram<u64>,
    seen: usize,
}

impl Samples {
    pub(crate) fn new() -> Self {
        Self {
            hist: histogram(),
            seen: 0,
        }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        if self.seen >= WARMUP {
            record(&mut self.hist, d);
        }
        self.seen += 1;
    }

    pub(crate) fn percentiles(&self) -> Percentiles {
        Percentiles::of(&self.hist)
    }
}

/// Operations per second with `concurrency` loops for `phase`.
pub(crate) async fn rate<F, Fut>(
    concurrency: usize,
    phase: Duration,
    op: F,
) -> Result<f64, BenchError>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + phase;
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, done) = (op.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    op().await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, BenchError>(())
            })
        })
        .collect();
    for w in workers {
        w.await.map_err(std::io::Error::other)??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

async fn cycles(
    client: &Client,
    request: &Bytes,
    reply_len: usize,
    count: u64,
    concurrency: u64,
) -> Result<(), BenchError> {
    let left = Arc::new(AtomicU64::new(count));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, request, left) = (client.clone(), request.clone(), left.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    lease_cycle(&client, "bb8", &request, reply_len, true).await?;
                }
                Ok::<_, BenchError>(())
            })
        })
        .collect();
    for w in workers {
        w.await.map_err(std::io::Error::other)??;
    }
    Ok(())
}

pub(crate) async fn wait_warm(client: &Client, idle: u32) -> Result<(), BenchError> {
    if client.wait_idle(idle, Duration::from_secs(10)).await? {
        Ok(())
    } else {
        Err(BenchError::Reply("lessor's pools did not warm up".into()))
    }
}
