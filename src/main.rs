//! The `lessor` binary: parses arguments and hands off to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lessor::client::Client;
use lessor::config::Config;
use lessor::{cli, demo, server, shutdown, telemetry};

/// A connection-pool sidecar: pooled, health-checked upstream sockets leased over gRPC.
#[derive(Parser)]
#[command(name = "lessor", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Serve {
        /// Configuration file (YAML).
        #[arg(long, env = "LESSOR_CONFIG")]
        config: PathBuf,
        /// Log format on stdout: text or json.
        #[arg(long, env = "LESSOR_LOG_FORMAT", default_value = "text", value_parser = parse_log_format)]
        log_format: telemetry::LogFormat,
    },
    /// Validate a configuration file: exit 0 when valid, 2 when not.
    CheckConfig {
        /// Configuration file (YAML).
        #[arg(long, env = "LESSOR_CONFIG")]
        config: PathBuf,
    },
    /// Take one lease, send each text, print the replies, release.
    Lease {
        /// The upstream's name.
        upstream: String,
        /// lessor's gRPC address (host:port or unix:///path).
        #[arg(long, env = "LESSOR_ADDR", default_value = "127.0.0.1:7070")]
        target: String,
        /// Text to send; `\r`, `\n`, `\t`, `\\` and `\xNN` are escapes. Repeatable.
        #[arg(long = "send")]
        sends: Vec<String>,
        /// How long to wait for a reply after each send.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        wait: Duration,
        /// Release with EVICT (close the connection) instead of RETURN.
        #[arg(long)]
        evict: bool,
    },
    /// Print every upstream's pool statistics.
    Stats {
        /// lessor's gRPC address (host:port or unix:///path).
        #[arg(long, env = "LESSOR_ADDR", default_value = "127.0.0.1:7070")]
        target: String,
        /// Only this upstream.
        #[arg(long, default_value = "")]
        upstream: String,
    },
    /// Measure lessor: load against a running sidecar, or `--compare` for a
    /// self-contained side-by-side run against a gRPC and TCP baseline.
    Bench(BenchArgs),
    /// Start an in-process upstream and lessor, take a few hundred leases
    /// ending every way, and report what happened.
    Demo {
        /// Leases to take.
        #[arg(long, default_value_t = 400)]
        leases: usize,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Self-contained comparison: starts its own upstream, baseline and lessor.
    #[arg(long)]
    compare: bool,
    /// With --compare: fewer samples and shorter phases (CI).
    #[arg(long)]
    quick: bool,
    /// With --compare: a real redis-server (PING) as the upstream.
    #[arg(long)]
    redis: bool,
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
    /// The request to send instead of a payload (escapes as in `lease --send`).
    #[arg(long)]
    request: Option<String>,
    /// Reply bytes to wait for (default: the request's length, as from an echo).
    #[arg(long)]
    reply_bytes: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: valid ({} upstreams)",
                    config.display(),
                    c.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => invalid_config(&e),
        },
        Command::Serve { config, log_format } => match Config::load(&config) {
            Ok(config) => serve(config, log_format),
            Err(e) => invalid_config(&e),
        },
        Command::Lease {
            upstream,
            target,
            sends,
            wait,
            evict,
        } => {
            let sends: Result<Vec<_>, _> = sends.iter().map(|s| cli::unescape(s)).collect();
            let sends = match sends {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("lessor: --send: {e}");
                    return ExitCode::from(2);
                }
            };
            let cmd = cli::LeaseCommand {
                upstream,
                sends,
                wait,
                evict,
            };
            client_command(async move {
                let client = Client::connect(&target).await?;
                let mut out = String::new();
                let result = cli::lease(&client, &cmd, &mut out).await;
                print!("{out}");
                result
            })
        }
        Command::Stats { target, upstream } => client_command(async move {
            let client = Client::connect(&target).await?;
            print!("{}", cli::stats_table(&client.stats(&upstream).await?));
            Ok(())
        }),
        Command::Bench(args) => bench(args),
        Command::Demo { leases } => {
            let runtime = match small_runtime(2) {
                Ok(rt) => rt,
                Err(e) => return fail(&e),
            };
            match runtime.block_on(demo::run(leases)) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

fn bench(args: BenchArgs) -> ExitCode {
    let runtime = match small_runtime(lessor::bench::compare::CLIENT_WORKERS) {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    if let Some(leases) = args.soak {
        return match runtime.block_on(lessor::bench::soak::run(leases, args.concurrency)) {
            Ok(report) => {
                print!("{}", report.render());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    if args.compare {
        let opts = lessor::bench::compare::CompareOptions {
            quick: args.quick,
            redis: args.redis,
            payload: args.payload,
            lessor_workers: args.lessor_workers,
            cycles: args
                .cycles
                .unwrap_or(if args.quick { 20_000 } else { 1_000_000 }),
            json: args.json,
        };
        return match runtime.block_on(lessor::bench::compare::run(&opts)) {
            Ok(report) => {
                print!("{}", report.render());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    if args.upstream.is_empty() {
        eprintln!("lessor: bench: --upstream NAME is required (or use --compare)");
        return ExitCode::from(2);
    }
    let request = match &args.request {
        Some(text) => match cli::unescape(text) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!("lessor: --request: {e}");
                return ExitCode::from(2);
            }
        },
        None => vec![b'x'; args.payload.max(1)],
    };
    let opts = lessor::bench::LoadOptions {
        target: args.target,
        upstream: args.upstream,
        concurrency: args.concurrency,
        duration: args.duration,
        reply_bytes: args.reply_bytes.unwrap_or(request.len()),
        request: request.into(),
        pipeline: args.pipeline,
    };
    match runtime.block_on(lessor::bench::load(&opts)) {
        Ok(report) => {
            print!("{}", report.render(&opts));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn parse_log_format(s: &str) -> Result<telemetry::LogFormat, String> {
    telemetry::LogFormat::parse(s).ok_or_else(|| format!("`{s}`: expected text or json"))
}

fn serve(config: Config, log_format: telemetry::LogFormat) -> ExitCode {
    let runtime = match small_runtime(config.runtime.worker_threads) {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let code = runtime.block_on(async {
        let telemetry = match telemetry::init(&config.telemetry, log_format) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("lessor: invalid telemetry settings: {e}");
                return ExitCode::from(2);
            }
        };
        let listeners = match server::Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => return fail(&e),
        };
        // Inside the hard deadline after the grace: a dead collector must not
        // hold the exit.
        let flush_within = Duration::from_secs(1);
        let options = server::RunOptions {
            spans: telemetry.spans.clone(),
            ..Default::default()
        };
        let served = server::run_with(config, listeners, shutdown::first_signal(), options).await;
        telemetry.shutdown(flush_within).await;
        match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    });
    // Connections abandoned at the hard deadline still have tasks: they are
    // dropped here, not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

/// A multi-threaded runtime with exactly `workers` workers: a sidecar must not
/// start one per core of a 64-core node.
fn small_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("lessor")
        .enable_all()
        .build()
}

fn client_command(
    work: impl std::future::Future<Output = Result<(), lessor::client::ClientError>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn invalid_config(e: &lessor::config::ConfigError) -> ExitCode {
    eprintln!("lessor: invalid configuration: {e}");
    ExitCode::from(2)
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("lessor: {e}");
    ExitCode::FAILURE
}
