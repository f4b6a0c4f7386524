//! `lessor-bench`: measures a `lessor` sidecar binary from outside.
//!
//! - load mode: lease loops against a running sidecar (`--target`,
//!   `--upstream`), latency percentiles and lease rate;
//! - `--compare`: a self-contained run that starts its own upstream, a bare
//!   gRPC echo and a `lessor serve` child, and measures them side by side
//!   (`--redis`, `--postgres`: against real servers; `--tls`: upstream TLS
//!   against plain TCP);
//! - `--soak N`: N leases ending every abnormal way against a `lessor serve`
//!   child, and its leak indicators before and after;
//! - `--fleet-sim N`: N simulated sidecars sharing a fleet budget through an
//!   in-process Kubernetes Lease API (lessor's own coordination loop):
//!   time to every share after scale events, API requests per sidecar, the
//!   fleet's peak total.
//!
//! The sidecar under test is always a separate process of the binary given
//! by `--lessor-bin`, so what is measured is what ships.

mod compare;
mod fleet_sim;
mod load;
mod soak;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Measures lessor: load against a running sidecar, `--compare` for a
/// self-contained side-by-side run against a gRPC and TCP baseline, or
/// `--soak N` for a leak check.
#[derive(Parser)]
#[command(name = "lessor-bench", version, about)]
struct Args {
    /// The sidecar binary to start for `--compare` and `--soak` (default:
    /// `lessor` next to this binary, i.e. the workspace's
    /// `target/<profile>/lessor`; build it first).
    #[arg(long, value_name = "PATH")]
    lessor_bin: Option<PathBuf>,
    /// Self-contained comparison: starts its own upstream, baseline and lessor.
    #[arg(long)]
    compare: bool,
    /// With --compare: fewer samples and shorter phases (CI).
    #[arg(long)]
    quick: bool,
    /// With --compare: a real redis-server (PING) as the upstream, then
    /// redis-benchmark against redis-server, twemproxy (`nutcracker`) and
    /// lessor's Redis listener.
    #[arg(long)]
    redis: bool,
    /// With --compare --redis: only the listener part (redis-benchmark
    /// against redis-server, twemproxy and lessor's Redis listener).
    #[arg(long, requires = "redis")]
    listener_only: bool,
    /// With --compare: PostgreSQL 15, PgBouncer and lessor side by side
    /// (`SELECT 1` and a primary-key SELECT, direct, through PgBouncer,
    /// through Exchange and through a lease), then pgbench against
    /// PostgreSQL, PgBouncer and lessor's PostgreSQL listener.
    #[arg(long, conflicts_with = "redis")]
    postgres: bool,
    /// With --compare: upstream TLS against plain TCP (dial time, Exchange
    /// p50 and throughput at 32 clients) on redis-server and PostgreSQL.
    #[arg(long, conflicts_with_all = ["redis", "postgres"])]
    tls: bool,
    /// With --compare: the failover drill (a write loop through lessor and
    /// directly while a Redis and a PostgreSQL primary are switched).
    #[arg(long, conflicts_with_all = ["redis", "postgres", "tls"])]
    failover: bool,
    /// With --compare: also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// With --compare: lessor's runtime.worker_threads.
    #[arg(long, default_value_t = 1)]
    lessor_workers: usize,
    /// With --compare: lease cycles for the memory-stability phase.
    #[arg(long)]
    cycles: Option<u64>,
    /// Self-contained soak: this many leases ending every abnormal way
    /// against a `lessor serve` child, then its descriptors, memory, tasks
    /// and leased connections before and after.
    #[arg(long, value_name = "LEASES")]
    soak: Option<u64>,
    /// Fleet simulation: this many sidecars (half start, half join, then
    /// half leave) share `--fleet-budget` through an in-process Lease API;
    /// `--duration` is the steady phase.
    #[arg(long, value_name = "SIDECARS")]
    fleet_sim: Option<usize>,
    /// With --fleet-sim: the group's budget.
    #[arg(long, default_value_t = 200)]
    fleet_budget: u32,
    /// With --fleet-sim: Lease renewal period.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    fleet_renew: Duration,
    /// With --fleet-sim: Lease duration (whole seconds).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    fleet_lease: Duration,
    /// lessor's gRPC address.
    #[arg(long, env = "LESSOR_ADDR", default_value = "127.0.0.1:7070")]
    target: String,
    /// The upstream to lease from.
    #[arg(long, default_value = "")]
    upstream: String,
    /// Concurrent lease loops.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Request size in bytes, for an echo upstream.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Send the request right behind Acquire, without waiting for Granted.
    #[arg(long)]
    pipeline: bool,
    /// One Exchange per request instead of a lease (a `protocol: redis`
    /// upstream; give `--request` and `--reply-bytes`).
    #[arg(long)]
    exchange: bool,
    /// The request to send instead of a payload (escapes as in `lease --send`).
    #[arg(long)]
    request: Option<String>,
    /// Reply bytes to wait for (default: the request's length, as from an echo).
    #[arg(long)]
    reply_bytes: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match small_runtime(compare::CLIENT_WORKERS) {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let lessor_bin = match args.lessor_bin.clone().map_or_else(default_lessor_bin, Ok) {
        Ok(bin) => bin,
        Err(e) => return fail(&e),
    };
    if let Some(sidecars) = args.fleet_sim {
        let opts = fleet_sim::FleetSimOptions {
            sidecars,
            budget: args.fleet_budget,
            renew_interval: args.fleet_renew,
            lease_duration: args.fleet_lease,
            steady: args.duration,
        };
        return match runtime.block_on(fleet_sim::run(&opts)) {
            Ok(report) => {
                print!("{}", report.render());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    if let Some(leases) = args.soak {
        if let Err(e) = runnable(&lessor_bin) {
            return fail(&e);
        }
        return match runtime.block_on(soak::run(&lessor_bin, leases, args.concurrency)) {
            Ok(report) => {
                print!("{}", report.render());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    if args.compare {
        if let Err(e) = runnable(&lessor_bin) {
            return fail(&e);
        }
        let opts = compare::CompareOptions {
            quick: args.quick,
            redis: args.redis,
            payload: args.payload,
            lessor_workers: args.lessor_workers,
            cycles: args
                .cycles
                .unwrap_or(if args.quick { 20_000 } else { 1_000_000 }),
            json: args.json,
            lessor_bin,
        };
        if args.listener_only {
            return match runtime.block_on(compare::redis_benchmark::run(&opts)) {
                Ok(report) => {
                    print!("{}", report.render());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        if args.failover {
            return match runtime.block_on(compare::failover::run(&opts)) {
                Ok(report) => {
                    print!("{}", report.render());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        if args.tls {
            return match runtime.block_on(compare::tls::run(&opts)) {
                Ok(report) => {
                    print!("{}", report.render());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        if args.postgres {
            return match runtime.block_on(compare::postgres::run(&opts)) {
                Ok(report) => {
                    print!("{}", report.render());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        return match runtime.block_on(compare::run(&opts)) {
            Ok(report) => {
                print!("{}", report.render());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    if args.upstream.is_empty() {
        eprintln!("lessor-bench: --upstream NAME is required (or use --compare)");
        return ExitCode::from(2);
    }
    let request = match &args.request {
        Some(text) => match lessor::cli::unescape(text) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!("lessor-bench: --request: {e}");
                return ExitCode::from(2);
            }
        },
        None => vec![b'x'; args.payload.max(1)],
    };
    let opts = load::LoadOptions {
        target: args.target,
        upstream: args.upstream,
        concurrency: args.concurrency,
        duration: args.duration,
        reply_bytes: args.reply_bytes.unwrap_or(request.len()),
        request: request.into(),
        pipeline: args.pipeline,
        exchange: args.exchange,
    };
    match runtime.block_on(load::load(&opts)) {
        Ok(report) => {
            print!("{}", report.render(&opts));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `lessor` beside this binary: `cargo build --release` puts both in
/// `target/release`.
fn default_lessor_bin() -> Result<PathBuf, load::BenchError> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| load::BenchError::Sidecar("this binary has no directory".into()))?;
    Ok(dir.join("lessor"))
}

/// A clear error before anything starts, instead of a failed spawn later.
fn runnable(bin: &Path) -> Result<(), load::BenchError> {
    if bin.is_file() {
        Ok(())
    } else {
        Err(load::BenchError::Sidecar(format!(
            "no lessor binary at {}: build it (`cargo build --release -p lessor`) or pass --lessor-bin PATH",
            bin.display()
        )))
    }
}

/// A multi-threaded runtime with exactly `workers` workers, so runs on the
/// same machine compare.
fn small_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("lessor-bench")
        .enable_all()
        .build()
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("lessor-bench: {e}");
    ExitCode::FAILURE
}
