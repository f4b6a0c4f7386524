//! `lessor-bench --compare --tls`: what upstream TLS costs, for Redis and
//! PostgreSQL, each one server listening both in plain TCP and in TLS (a
//! certificate made for the run, `verify-full`):
//!
//! - the dial, as lessor's pool makes it (TCP, SSLRequest and handshake where
//!   TLS, the session's startup): what a pool saves per request;
//! - Exchange through a warm pool, p50 one at a time and throughput at 32
//!   clients: what TLS costs once the handshake is paid.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lessor_client::Client;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::postgres::{BIN, NOBODY, as_server, initdb, is_root, server_dir, wait_for};
use super::setup::{ChildGuard, Lessor, free_port};
use super::{CompareOptions, Samples, rate, wait_warm};
use crate::load::{BenchError, Percentiles, histogram, record};

/// Clients of the throughput phase.
const CLIENTS: usize = 32;
/// Throughput phases per upstream (plain and TLS alternating).
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One engine's figures, plain against TLS.
#[derive(Debug, Clone, Serialize)]
pub struct TlsRow {
    /// `redis` or `postgres`.
    pub upstream: String,
    /// Dial latency in plain TCP.
    pub dial_plain: Percentiles,
    /// Dial latency over TLS.
    pub dial_tls: Percentiles,
    /// Exchange latency, warm pool, plain.
    pub exchange_plain: Percentiles,
    /// Exchange latency, warm pool, TLS.
    pub exchange_tls: Percentiles,
    /// Exchanges per second at 32 clients, plain (median of the rounds).
    pub exchanges_per_sec_plain: f64,
    /// Exchanges per second at 32 clients, TLS (median of the rounds).
    pub exchanges_per_sec_tls: f64,
    /// lessor's CPU time per 1,000 Exchanges at 32 clients, plain (ms).
    pub cpu_ms_per_1k_plain: f64,
    /// lessor's CPU time per 1,000 Exchanges at 32 clients, TLS (ms).
    pub cpu_ms_per_1k_tls: f64,
}

/// What `--compare --tls` measured.
#[derive(Debug, Clone, Serialize)]
pub struct TlsReport {
    /// Redis, then PostgreSQL.
    pub rows: Vec<TlsRow>,
    /// lessor's worker threads.
    pub lessor_workers: usize,
}

/// A CA and a server certificate for 127.0.0.1 it signed, PEM.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki() -> Result<Pki, BenchError> {
    let bad = |e: rcgen::Error| BenchError::Sidecar(format!("making certificates: {e}"));
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(bad)?).map_err(bad)?;
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned()]).map_err(bad)?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(bad)?;
    let cert = server.signed_by(&key, &ca).map_err(bad)?;
    Ok(Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// redis-server on a plain port and a TLS port at once.
async fn start_redis(dir: &Path) -> Result<(ChildGuard, u16, u16), BenchError> {
    let (plain, tls) = (free_port()?, free_port()?);
    let child = Command::new("redis-server")
        .args(["--port", &plain.to_string(), "--tls-port", &tls.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--tls-cert-file")
        .arg(dir.join("server.crt"))
        .arg("--tls-key-file")
        .arg(dir.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.crt"))
        .args(["--tls-auth-clients", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| std::io::Error::other(format!("--tls needs redis-server: {e}")))?;
    let guard = ChildGuard::new(child);
    let addr = format!("127.0.0.1:{plain}");
    for _ in 0..500 {
        if let Ok(mut s) = TcpStream::connect(&addr).await {
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").await.is_ok() && s.read_exact(&mut buf).await.is_ok() {
                return Ok((guard, plain, tls));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(BenchError::Reply("redis-server did not answer PING".into()))
}

/// A PostgreSQL 15 cluster with `ssl=on` (the `trust` rules of initdb match
/// TLS and plain connections alike).
async fn start_postgres(pki: &Pki) -> Result<(tempfile::TempDir, ChildGuard, u16), BenchError> {
    let dir = server_dir()?;
    let data = dir.path().join("data");
    initdb("--tls", &data)?;
    for (name, contents) in [("server.crt", &pki.cert), ("server.key", &pki.key)] {
        let path = data.join(name);
        std::fs::write(&path, contents)?;
        // PostgreSQL refuses a key others can read.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if is_root() {
            std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY))?;
        }
    }
    let port = free_port()?;
    let child = as_server(Command::new(Path::new(BIN).join("postgres")))
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string()])
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
        ])
        .args(["-c", "ssl=on", "-c", "ssl_cert_file=server.crt"])
        .args(["-c", "ssl_key_file=server.key", "-c", "max_connections=100"])
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| BenchError::Sidecar(format!("cannot start postgres: {e}")))?;
    let guard = ChildGuard::new(child);
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10));
    wait_for(&config, "postgres").await?;
    Ok((dir, guard, port))
}

/// The four upstreams: each server plain and over TLS.
fn upstreams(ca: &Path, redis: (u16, u16), pg: u16) -> String {
    let pool =
        "    pool: { max_size: 32, min_idle: 32, connect_timeout: 5s, checkout_timeout: 5s }\n";
    let tls = format!(
        "    tls: {{ mode: verify-full, ca_file: \"{}\" }}\n",
        ca.display()
    );
    let mut yaml = String::from("upstreams:\n");
    for (name, port, protocol, tls) in [
        ("redis_plain", redis.0, "redis", ""),
        ("redis_tls", redis.1, "redis", tls.as_str()),
        ("pg_plain", pg, "postgres", ""),
        ("pg_tls", pg, "postgres", tls.as_str()),
    ] {
        yaml.push_str(&format!(
            "  - name: {name}\n    address: \"127.0.0.1:{port}\"\n    protocol: {protocol}\n{pool}{tls}"
        ));
        if protocol == "postgres" {
            yaml.push_str("    postgres: { user: postgres, database: postgres }\n");
        }
    }
    yaml
}

/// Dial latencies of `upstream`, through lessor's own dial path.
async fn dials(
    config: &lessor::Config,
    upstream: &str,
    n: usize,
) -> Result<Percentiles, BenchError> {
    let probe = lessor::testing::DialProbe::new(config, upstream)
        .ok_or_else(|| BenchError::Sidecar(format!("no upstream {upstream}")))?;
    let mut hist = histogram();
    for i in 0..n + n / 10 {
        let start = Instant::now();
        probe.dial().await.map_err(BenchError::Reply)?;
        // The first tenth warms caches and the allocator.
        if i >= n / 10 {
            record(&mut hist, start.elapsed());
        }
    }
    Ok(Percentiles::of(&hist))
}

/// One Exchange on `upstream`, its reply checked.
async fn exchange(
    client: &Client,
    upstream: &str,
    request: &Bytes,
    reply: usize,
) -> Result<(), BenchError> {
    let got = client.exchange(upstream, request.clone(), None).await?;
    if got.reply.len() != reply {
        return Err(BenchError::Reply(format!(
            "{upstream}: {} bytes, expected {reply}",
            got.reply.len()
        )));
    }
    Ok(())
}

fn select_1() -> Bytes {
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT 1", &mut buf).unwrap_or_default();
    buf.freeze()
}

/// Runs the comparison.
pub(crate) async fn run(opts: &CompareOptions) -> Result<TlsReport, BenchError> {
    let pki = pki()?;
    let files = tempfile::tempdir()?;
    for (name, contents) in [
        ("ca.crt", &pki.ca),
        ("server.crt", &pki.cert),
        ("server.key", &pki.key),
    ] {
        std::fs::write(files.path().join(name), contents)?;
    }
    let (_redis, redis_plain, redis_tls) = start_redis(files.path()).await?;
    let (_pg_dir, _pg, pg_port) = start_postgres(&pki).await?;
    let yaml = upstreams(
        &files.path().join("ca.crt"),
        (redis_plain, redis_tls),
        pg_port,
    );
    let config =
        lessor::Config::from_yaml(&yaml).map_err(|e| BenchError::Sidecar(e.to_string()))?;

    let (n_dials, n_samples, phase) = if opts.quick {
        (50, 300, Duration::from_secs(1))
    } else {
        (500, 3000, Duration::from_secs(3))
    };
    let mut dial = Vec::new();
    for name in ["redis_plain", "redis_tls", "pg_plain", "pg_tls"] {
        dial.push(dials(&config, name, n_dials).await?);
    }

    let lessor = Lessor::spawn_logged(&opts.lessor_bin, &yaml, opts.lessor_workers).await?;
    let client = Client::connect(&lessor.grpc).await?;
    wait_warm(&client, 32).await?;
    let ping = Bytes::from_static(b"PING\r\n");
    let select = select_1();
    // RowDescription, DataRow, CommandComplete, ReadyForQuery.
    let select_reply = client
        .exchange("pg_plain", select.clone(), None)
        .await?
        .reply
        .len();
    let cases = [
        ("redis_plain", ping.clone(), 7),
        ("redis_tls", ping, 7),
        ("pg_plain", select.clone(), select_reply),
        ("pg_tls", select, select_reply),
    ];
    let mut latency = Vec::new();
    for (name, request, reply) in &cases {
        let mut samples = Samples::new();
        for _ in 0..n_samples + super::WARMUP {
            let start = Instant::now();
            exchange(&client, name, request, *reply).await?;
            samples.record(start.elapsed());
        }
        latency.push(samples.percentiles());
    }
    // Throughput on a shared machine drifts: plain and TLS phases alternate
    // (ABBA order) and each reports its median.
    let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    // lessor's own CPU time per Exchange: what TLS costs the sidecar,
    // whatever else the machine runs (the servers' TLS included).
    let mut cpu: Vec<(u64, f64)> = vec![(0, 0.0); cases.len()];
    for round in 0..ROUNDS {
        for pair in [0, 2] {
            let order = if round % 2 == 0 {
                [pair, pair + 1]
            } else {
                [pair + 1, pair]
            };
            for i in order {
                let (name, request, reply) = cases[i].clone();
                let c = client.clone();
                let request = Arc::new(request);
                let cpu_before = lessor.cpu_ms();
                let per_sec = rate(CLIENTS, phase, move || {
                    let (c, request) = (c.clone(), request.clone());
                    async move { exchange(&c, name, &request, reply).await }
                })
                .await?;
                cpu[i].0 += lessor.cpu_ms().saturating_sub(cpu_before);
                cpu[i].1 += per_sec * phase.as_secs_f64();
                rounds[i].push(per_sec);
            }
        }
    }
    let throughput: Vec<f64> = rounds.into_iter().map(median).collect();
    let cpu_per_1k: Vec<f64> = cpu
        .iter()
        .map(|(ms, ops)| *ms as f64 * 1000.0 / ops.max(1.0))
        .collect();
    lessor.stop().await;
    let row = |upstream: &str, i: usize| TlsRow {
        upstream: upstream.to_owned(),
        dial_plain: dial[i],
        dial_tls: dial[i + 1],
        exchange_plain: latency[i],
        exchange_tls: latency[i + 1],
        exchanges_per_sec_plain: throughput[i],
        exchanges_per_sec_tls: throughput[i + 1],
        cpu_ms_per_1k_plain: cpu_per_1k[i],
        cpu_ms_per_1k_tls: cpu_per_1k[i + 1],
    };
    Ok(TlsReport {
        rows: vec![row("redis", 0), row("postgres", 2)],
        lessor_workers: opts.lessor_workers,
    })
}

impl TlsReport {
    /// The comparison as a table.
    pub fn render(&self) -> String {
        let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
        let mut out = format!(
            "Upstream TLS (verify-full, rustls/ring, loopback; lessor worker_threads={})\n\n",
            self.lessor_workers
        );
        out.push_str(&format!(
            "{:<10} {:<28} {:>12} {:>12} {:>10}\n",
            "upstream", "measure", "plain", "TLS", "TLS/plain"
        ));
        for r in &self.rows {
            let line = |what: &str, plain: String, tls: String, ratio: f64| {
                format!(
                    "{:<10} {what:<28} {plain:>12} {tls:>12} {ratio:>9.2}x\n",
                    r.upstream
                )
            };
            let ratio = |a: u64, b: u64| b as f64 / a.max(1) as f64;
            out.push_str(&line(
                "dial p50",
                ms(r.dial_plain.p50),
                ms(r.dial_tls.p50),
                ratio(r.dial_plain.p50, r.dial_tls.p50),
            ));
            out.push_str(&line(
                "dial p99",
                ms(r.dial_plain.p99),
                ms(r.dial_tls.p99),
                ratio(r.dial_plain.p99, r.dial_tls.p99),
            ));
            out.push_str(&line(
                "Exchange p50 (1 client)",
                ms(r.exchange_plain.p50),
                ms(r.exchange_tls.p50),
                ratio(r.exchange_plain.p50, r.exchange_tls.p50),
            ));
            out.push_str(&line(
                &format!("Exchange/s ({CLIENTS} clients)"),
                format!("{:.0}", r.exchanges_per_sec_plain),
                format!("{:.0}", r.exchanges_per_sec_tls),
                r.exchanges_per_sec_tls / r.exchanges_per_sec_plain.max(1.0),
            ));
            out.push_str(&line(
                "lessor CPU ms / 1k Exchanges",
                format!("{:.1}", r.cpu_ms_per_1k_plain),
                format!("{:.1}", r.cpu_ms_per_1k_tls),
                r.cpu_ms_per_1k_tls / r.cpu_ms_per_1k_plain.max(0.001),
            ));
        }
        out.push_str(
            "\nTarget: pooled TLS within 10% of plain at 32 clients (Exchange/s TLS/plain >= 0.90).\n",
        );
        out
    }
}
