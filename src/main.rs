//! The `lessor` binary: parses arguments and hands off to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lessor::Config;
use lessor::{LogFormat, cli};
use lessor_client::Client;

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
        log_format: LogFormat,
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
    /// Send Redis commands or PostgreSQL queries in one Exchange and print
    /// the replies (Redis: each text is one command, split like redis-cli:
    /// `'SET k "a b"'`; PostgreSQL: each text is one simple query, results
    /// aligned like psql's).
    Exchange {
        /// The upstream's name (a `protocol: redis` or `postgres` upstream).
        upstream: String,
        /// Commands or queries, one per argument.
        #[arg(required = true)]
        commands: Vec<String>,
        /// lessor's gRPC address (host:port or unix:///path).
        #[arg(long, env = "LESSOR_ADDR", default_value = "127.0.0.1:7070")]
        target: String,
        /// The replies' deadline (default: the upstream's lease.idle_timeout).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// List the live leases: who holds each (Acquire.holder, trace id), for
    /// how long, how much it moved, and whether it waits on its client.
    Leases {
        /// Only this upstream's.
        #[arg(long)]
        upstream: Option<String>,
        /// Only leases older than this (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// lessor's admin address.
        #[arg(long, env = "LESSOR_ADMIN_ADDR", default_value = "127.0.0.1:9090")]
        admin: String,
    },
    /// Wait until lessor is ready (its /readyz answers 200): for an
    /// application's entrypoint or an init container. Exits 1 on timeout.
    Wait {
        /// How long to wait.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// lessor's admin address.
        #[arg(long, env = "LESSOR_ADMIN_ADDR", default_value = "127.0.0.1:9090")]
        admin: String,
    },
    /// Stop granting connections of an upstream (all without one): new
    /// checkouts wait, bounded by their deadline; live leases carry on.
    Pause {
        /// The upstream; every upstream when absent.
        upstream: Option<String>,
        /// lessor's control address (admin.control_listen).
        #[arg(long, env = "LESSOR_CONTROL_ADDR", default_value = "127.0.0.1:9091")]
        control: String,
    },
    /// Grant connections again after `pause`.
    Resume {
        /// The upstream; every upstream when absent.
        upstream: Option<String>,
        /// lessor's control address (admin.control_listen).
        #[arg(long, env = "LESSOR_CONTROL_ADDR", default_value = "127.0.0.1:9091")]
        control: String,
    },
    /// Replace every connection dialed so far (a failover, a rotated
    /// password): idle ones close now, leased ones when their lease ends.
    Reconnect {
        /// The upstream; every upstream when absent.
        upstream: Option<String>,
        /// lessor's control address (admin.control_listen).
        #[arg(long, env = "LESSOR_CONTROL_ADDR", default_value = "127.0.0.1:9091")]
        control: String,
    },
    /// Ask the running sidecar to drain and exit, as SIGTERM does (for an
    /// application's preStop hook).
    Shutdown {
        /// lessor's control address (admin.control_listen).
        #[arg(long, env = "LESSOR_CONTROL_ADDR", default_value = "127.0.0.1:9091")]
        control: String,
    },
    /// Take a CPU profile of the running sidecar, for `go tool pprof`.
    Profile {
        /// How long to sample (at most 60).
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Where to write the gzipped profile.proto.
        #[arg(short = 'o', long, default_value = "cpu.pb.gz")]
        output: std::path::PathBuf,
        /// lessor's control address (admin.control_listen).
        #[arg(long, env = "LESSOR_CONTROL_ADDR", default_value = "127.0.0.1:9091")]
        control: String,
    },
    /// Print the running sidecar's tokio runtime figures (JSON).
    Runtime {
        /// lessor's control address (admin.control_listen).
        #[arg(long, env = "LESSOR_CONTROL_ADDR", default_value = "127.0.0.1:9091")]
        control: String,
        /// With every task's stack (tokio's task dump).
        #[arg(long)]
        tasks: bool,
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
    /// Start an in-process upstream and lessor, take a few hundred leases
    /// ending every way, and report what happened.
    Demo {
        /// Leases to take.
        #[arg(long, default_value_t = 400)]
        leases: usize,
    },
}

/// jemalloc, sampling one allocation per 512 KiB on average with its
/// backtrace, so that `/debug/pprof/heap` can say who holds the memory.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts: heap profiling on (sampled,
/// active from the start).
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:true,lg_prof_sample:19\0";

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
        Command::Serve {
            config: path,
            log_format,
        } => match Config::load(&path) {
            Ok(config) => serve(config, path, log_format),
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
        Command::Exchange {
            upstream,
            commands,
            target,
            timeout,
        } => client_command(async move {
            let client = Client::connect(&target)
                .await
                .map_err(cli::ExchangeCommandError::from)?;
            let mut out = String::new();
            let result = cli::exchange(&client, &upstream, &commands, timeout, &mut out).await;
            print!("{out}");
            result
        }),
        Command::Stats { target, upstream } => client_command(async move {
            let client = Client::connect(&target).await?;
            print!("{}", cli::stats_table(&client.stats(&upstream).await?));
            Ok::<_, lessor_client::ClientError>(())
        }),
        Command::Leases {
            upstream,
            older_than,
            json,
            admin,
        } => client_command(async move {
            let listing = cli::leases(&admin, upstream.as_deref(), older_than, json).await?;
            print!("{listing}");
            Ok::<_, cli::AdminCommandError>(())
        }),
        Command::Wait { timeout, admin } => client_command(cli::wait_ready(&admin, timeout)),
        Command::Pause { upstream, control } => control_command(&control, "pause", upstream),
        Command::Resume { upstream, control } => control_command(&control, "resume", upstream),
        Command::Reconnect { upstream, control } => {
            control_command(&control, "reconnect", upstream)
        }
        Command::Shutdown { control } => control_command(&control, "shutdown", None),
        Command::Profile {
            seconds,
            output,
            control,
        } => client_command(async move {
            let profile = cli::profile(&control, seconds)
                .await
                .map_err(|e| e.to_string())?;
            std::fs::write(&output, &profile)
                .map_err(|e| format!("cannot write {}: {e}", output.display()))?;
            println!(
                "wrote {} ({} bytes); read it with: go tool pprof -top {}",
                output.display(),
                profile.len(),
                output.display()
            );
            Ok::<_, String>(())
        }),
        Command::Runtime { control, tasks } => client_command(async move {
            print!("{}", cli::runtime(&control, tasks).await?);
            Ok::<_, cli::AdminCommandError>(())
        }),
        Command::Demo { leases } => {
            let runtime = match small_runtime(2) {
                Ok(rt) => rt,
                Err(e) => return fail(&e),
            };
            match runtime.block_on(lessor::run_demo(leases)) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    LogFormat::parse(s).ok_or_else(|| format!("`{s}`: expected text or json"))
}

fn serve(config: Config, path: PathBuf, log_format: LogFormat) -> ExitCode {
    let runtime = match small_runtime(config.runtime.worker_threads) {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let code = runtime.block_on(async {
        let telemetry = match lessor::init_telemetry(&config.telemetry, log_format) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("lessor: invalid telemetry settings: {e}");
                return ExitCode::from(2);
            }
        };
        // Handlers before any socket: once a probe can see lessor, a
        // SIGTERM drains it.
        let shutdown = lessor::first_signal();
        let listeners = match lessor::Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => return fail(&e),
        };
        // Inside the hard deadline after the grace: a dead collector must not
        // hold the exit.
        let flush_within = Duration::from_secs(1);
        let options = lessor::RunOptions {
            spans: telemetry.spans.clone(),
            config_path: Some(path),
            ..Default::default()
        };
        let served = lessor::run_with(config, listeners, shutdown, options).await;
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

fn control_command(control: &str, action: &str, upstream: Option<String>) -> ExitCode {
    client_command(async move {
        let done = cli::control(control, action, upstream.as_deref()).await?;
        print!("{done}");
        Ok::<_, cli::AdminCommandError>(())
    })
}

fn client_command<E: std::fmt::Display>(
    work: impl std::future::Future<Output = Result<(), E>>,
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

fn invalid_config(e: &lessor::ConfigError) -> ExitCode {
    eprintln!("lessor: invalid configuration: {e}");
    ExitCode::from(2)
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("lessor: {e}");
    ExitCode::FAILURE
}
