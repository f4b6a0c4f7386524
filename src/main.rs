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
    /// Start an in-process upstream and lessor, take a few hundred leases
    /// ending every way, and report what happened.
    Demo {
        /// Leases to take.
        #[arg(long, default_value_t = 400)]
        leases: usize,
    },
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
        Command::Serve { config } => match Config::load(&config) {
            Ok(config) => serve(config),
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

fn serve(config: Config) -> ExitCode {
    let runtime = match small_runtime(config.runtime.worker_threads) {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async {
        telemetry::init();
        let listeners = match server::Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => return fail(&e),
        };
        match server::run(config, listeners, shutdown::first_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    })
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
