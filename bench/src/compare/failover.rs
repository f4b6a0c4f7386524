//! `--compare --failover`: the failover drill. A write loop runs through
//! lessor (Exchange, and leases) and beside it the same loop without lessor
//! (a client that reconnects on error and finds the primary itself) while
//! the primary is switched; reported per route: the time from the switch
//! to the first successful write, and the writes that failed after it.
//!
//! - Redis: two redis-servers, `b` a replica of `a`; the switch is
//!   `REPLICAOF NO ONE` on `b`, then `REPLICAOF b` on `a` (a live demotion:
//!   the old primary keeps its connections and answers `-READONLY`). The
//!   direct client reconnects on an error and asks each server `ROLE`.
//! - PostgreSQL: a primary and a `pg_basebackup -R` streaming replica; the
//!   switch kills the primary, then `pg_promote()`s the replica, and counts
//!   from the promotion's end (the kill is the start of the outage; the
//!   promotion's own length is reported apart). The direct client is
//!   tokio-postgres with both hosts and `target_session_attrs=read-write`,
//!   reconnecting on error, as libpq users configure it.
//!
//! lessor runs with `role: primary` over `discovery.static` and
//! `health.interval: 1s`; the target is a first write within one interval
//! plus one dial of the switch.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lessor_client::{Client, LeaseOptions};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

use super::CompareOptions;
use super::postgres::{BIN, as_server, initdb, run_tool, server_dir, wait_for};
use super::setup::{ChildGuard, Lessor, free_port, start_redis_server};
use crate::load::BenchError;

/// lessor's `health.interval` in the drill.
const INTERVAL: Duration = Duration::from_secs(1);
/// The pause between two writes of one loop.
const PACE: Duration = Duration::from_millis(2);

/// One route's account of one switch.
#[derive(Debug, Clone, Serialize)]
pub struct DrillRow {
    /// `redis` or `postgres`.
    pub engine: &'static str,
    /// `lessor Exchange`, `lessor lease`, or `direct (reconnect on error)`.
    pub route: &'static str,
    /// From the switch to the first successful write after it, in ms;
    /// `None`: none succeeded before the drill ended.
    pub first_write_ms: Option<f64>,
    /// Writes after the switch that failed (errors, refusals).
    pub failed_writes: u64,
    /// Writes that failed from the start of the outage (the kill, for
    /// PostgreSQL; the switch, for Redis).
    pub failed_in_outage: u64,
    /// Writes after the switch that succeeded.
    pub ok_writes: u64,
}

/// The drill's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    /// Every route of both engines.
    pub rows: Vec<DrillRow>,
    /// How long `pg_promote()` took (the PostgreSQL outage before the
    /// switch counted here), in ms.
    pub promote_ms: f64,
    /// One dial to the new primary through lessor's path, measured apart
    /// (connect and session), in ms, per engine.
    pub dial_ms: [f64; 2],
}

impl FailoverReport {
    /// The table, with the target verdict per lessor row.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "failover drill (lessor health.interval 1s; switch = REPLICAOF swap for Redis, pg_promote() done for PostgreSQL)\n",
        );
        out.push_str(&format!(
            "{:<9} {:<28} {:>16} {:>8} {:>10} {:>8}  target\n",
            "engine", "route", "first write (ms)", "failed", "in outage", "ok"
        ));
        for r in &self.rows {
            let dial = if r.engine == "redis" {
                self.dial_ms[0]
            } else {
                self.dial_ms[1]
            };
            let budget = INTERVAL.as_secs_f64() * 1000.0 + dial;
            let target = if r.route.starts_with("lessor") {
                match r.first_write_ms {
                    Some(ms) if ms <= budget => format!("met (<= {budget:.0} ms)"),
                    _ => format!("MISSED (> {budget:.0} ms)"),
                }
            } else {
                String::new()
            };
            out.push_str(&format!(
                "{:<9} {:<28} {:>16} {:>8} {:>10} {:>8}  {target}\n",
                r.engine,
                r.route,
                r.first_write_ms
                    .map_or("none".to_owned(), |ms| format!("{ms:.1}")),
                r.failed_writes,
                r.failed_in_outage,
                r.ok_writes
            ));
        }
        out.push_str(&format!(
            "pg_promote() took {:.0} ms (after the old primary was killed); one dial: redis {:.1} ms, postgres {:.1} ms\n",
            self.promote_ms, self.dial_ms[0], self.dial_ms[1]
        ));
        out
    }
}

/// A running write loop: its route, and its task, which returns when
/// each write ended and whether it succeeded.
type Loop = (&'static str, tokio::task::JoinHandle<Vec<(Instant, bool)>>);

/// What one write loop does.
#[allow(clippy::large_enum_variant)] // a handful per drill
enum Writer {
    Exchange(Client, Bytes),
    Lease(Client, Bytes, Protocol),
    DirectRedis {
        addrs: Vec<String>,
        conn: Option<TcpStream>,
    },
    DirectPg {
        config: tokio_postgres::Config,
        client: Option<tokio_postgres::Client>,
    },
}

#[derive(Clone, Copy)]
enum Protocol {
    Redis,
    Postgres,
}

impl Writer {
    /// One write; whether it succeeded.
    async fn write(&mut self) -> bool {
        match self {
            Self::Exchange(client, request) => {
                match client.exchange("up", request.clone(), None).await {
                    Ok(r) => reply_ok(&r.reply, protocol_of(request)),
                    Err(_) => false,
                }
            }
            Self::Lease(client, request, protocol) => lease_write(client, request, *protocol)
                .await
                .unwrap_or(false),
            Self::DirectRedis { addrs, conn } => {
                if conn.is_none() {
                    *conn = find_redis_primary(addrs).await;
                }
                let Some(stream) = conn.as_mut() else {
                    return false;
                };
                let ok = redis_set(stream).await;
                if ok != Some(true) {
                    // Reconnect on any error, -READONLY included.
                    *conn = None;
                }
                ok == Some(true)
            }
            Self::DirectPg { config, client } => {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    *client = match config.connect(NoTls).await {
                        Ok((c, connection)) => {
                            tokio::spawn(connection);
                            Some(c)
                        }
                        Err(_) => None,
                    };
                }
                let Some(c) = client.as_ref() else {
                    return false;
                };
                match c.simple_query("INSERT INTO w VALUES (1)").await {
                    Ok(_) => true,
                    Err(_) => {
                        *client = None;
                        false
                    }
                }
            }
        }
    }
}

fn protocol_of(request: &Bytes) -> Protocol {
    if request.first() == Some(&b'Q') {
        Protocol::Postgres
    } else {
        Protocol::Redis
    }
}

/// A whole reply that is no error: `+OK` for Redis; no ErrorResponse
/// before ReadyForQuery for PostgreSQL.
fn reply_ok(reply: &[u8], protocol: Protocol) -> bool {
    match protocol {
        Protocol::Redis => reply.starts_with(b"+OK"),
        Protocol::Postgres => {
            let mut at = 0;
            while at + 5 <= reply.len() {
                let tag = reply[at];
                let len = u32::from_be_bytes([
                    reply[at + 1],
                    reply[at + 2],
                    reply[at + 3],
                    reply[at + 4],
                ]) as usize;
                if tag == b'E' {
                    return false;
                }
                if tag == b'Z' {
                    return true;
                }
                at += 1 + len;
            }
            false
        }
    }
}

/// Whether `buf` holds a whole reply.
fn reply_done(buf: &[u8], protocol: Protocol) -> bool {
    match protocol {
        Protocol::Redis => buf.ends_with(b"\r\n"),
        Protocol::Postgres => {
            let mut at = 0;
            while at + 5 <= buf.len() {
                let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]])
                    as usize;
                if buf[at] == b'Z' && at + 1 + len <= buf.len() {
                    return true;
                }
                at += 1 + len;
            }
            false
        }
    }
}

/// A lease, one write on it, its reply, and the release.
async fn lease_write(client: &Client, request: &Bytes, protocol: Protocol) -> Option<bool> {
    let mut lease = client.lease("up", &LeaseOptions::default()).await.ok()?;
    lease.send(request.clone()).await.ok()?;
    let mut buf = BytesMut::new();
    while !reply_done(&buf, protocol) {
        let data = tokio::time::timeout(Duration::from_secs(5), lease.recv())
            .await
            .ok()?
            .ok()??;
        buf.extend_from_slice(&data);
    }
    let ok = reply_ok(&buf, protocol);
    let _ = lease.release(lessor_client::pb::Disposition::Return).await;
    Some(ok)
}

/// The first address whose server says `master` to `ROLE`.
async fn find_redis_primary(addrs: &[String]) -> Option<TcpStream> {
    for addr in addrs {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            continue;
        };
        if s.write_all(b"ROLE\r\n").await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 512];
        let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await else {
            continue;
        };
        if buf[..n].windows(6).any(|w| w == b"master") {
            return Some(s);
        }
    }
    None
}

/// `SET k v` on a direct connection: `Some(true)` for `+OK`.
async fn redis_set(s: &mut TcpStream) -> Option<bool> {
    s.write_all(b"SET k v\r\n").await.ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while !buf.ends_with(b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf.starts_with(b"+OK"))
}

/// Runs every writer until `stop`, recording each write's end and outcome.
fn spawn_loops(
    writers: Vec<(&'static str, Writer)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Loop> {
    writers
        .into_iter()
        .map(|(route, mut writer)| {
            let stop = stop.clone();
            let task = tokio::spawn(async move {
                let mut log = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ok = writer.write().await;
                    log.push((Instant::now(), ok));
                    tokio::time::sleep(PACE).await;
                }
                log
            });
            (route, task)
        })
        .collect()
}

/// Stops the loops once every one has written successfully after `switch`
/// (or `limit` has passed), and turns their logs into rows.
async fn finish(
    engine: &'static str,
    loops: Vec<Loop>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    outage: Instant,
    switch: Instant,
    limit: Duration,
) -> Result<Vec<DrillRow>, BenchError> {
    // Let every route run well past its recovery: 2 intervals and a margin.
    tokio::time::sleep_until((switch + limit).into()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rows = Vec::new();
    for (route, task) in loops {
        let log = task
            .await
            .map_err(|e| BenchError::Reply(format!("a write loop failed: {e}")))?;
        let after: Vec<_> = log.iter().filter(|(t, _)| *t > switch).collect();
        rows.push(DrillRow {
            engine,
            route,
            first_write_ms: after
                .iter()
                .find(|(_, ok)| *ok)
                .map(|(t, _)| (*t - switch).as_secs_f64() * 1000.0),
            failed_writes: after.iter().filter(|(_, ok)| !ok).count() as u64,
            failed_in_outage: log.iter().filter(|(t, ok)| *t > outage && !ok).count() as u64,
            ok_writes: after.iter().filter(|(_, ok)| *ok).count() as u64,
        });
    }
    Ok(rows)
}

fn upstream_yaml(addrs: &[&str], protocol: &str) -> String {
    let list = addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let session = if protocol == "postgres" {
        "\n    postgres: { user: postgres, database: postgres }"
    } else {
        ""
    };
    format!(
        "upstreams:\n  - name: up\n    discovery: {{ static: [{list}] }}\n    role: primary\n    protocol: {protocol}{session}\n    pool: {{ max_size: 8, min_idle: 2, checkout_timeout: 500ms }}\n    health: {{ interval: {}ms }}\n",
        INTERVAL.as_millis()
    )
}

/// The lessor routes and the direct one, for one engine.
fn writers(client: &Client, request: Bytes, direct: Writer) -> Vec<(&'static str, Writer)> {
    let protocol = protocol_of(&request);
    vec![
        (
            "lessor Exchange",
            Writer::Exchange(client.clone(), request.clone()),
        ),
        (
            "lessor lease",
            Writer::Lease(client.clone(), request, protocol),
        ),
        ("direct (reconnect on error)", direct),
    ]
}

async fn redis_drill(opts: &CompareOptions) -> Result<(Vec<DrillRow>, f64), BenchError> {
    let (a, _a) = start_redis_server(None).await?;
    let (b, _b) = start_redis_server(None).await?;
    let replicaof = |of: &str| {
        let (host, port) = of.rsplit_once(':').unwrap_or((of, "0"));
        format!("REPLICAOF {host} {port}\r\n")
    };
    inline(&b, &replicaof(&a)).await?;
    let lessor = Lessor::spawn_logged(
        &opts.lessor_bin,
        &upstream_yaml(&[&a, &b], "redis"),
        opts.lessor_workers,
    )
    .await?;
    let client = Client::connect(&lessor.grpc).await?;
    let dial = timed_dial(|| async {
        let mut s = TcpStream::connect(&b).await.ok()?;
        s.set_nodelay(true).ok()?;
        redis_set(&mut s).await
    })
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let direct = Writer::DirectRedis {
        addrs: vec![a.clone(), b.clone()],
        conn: None,
    };
    let loops = spawn_loops(
        writers(&client, Bytes::from_static(b"SET k v\r\n"), direct),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let switch = Instant::now();
    inline(&b, "REPLICAOF NO ONE\r\n").await?;
    inline(&a, &replicaof(&b)).await?;
    let rows = finish(
        "redis",
        loops,
        stop,
        switch,
        switch,
        INTERVAL * 2 + Duration::from_secs(1),
    )
    .await?;
    lessor.stop().await;
    Ok((rows, dial))
}

/// One inline command on a fresh connection, answered `+OK`.
async fn inline(addr: &str, command: &str) -> Result<(), BenchError> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(command.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await?;
    if !buf[..n].starts_with(b"+OK") {
        return Err(BenchError::Reply(format!(
            "{command:?} answered {:?}",
            String::from_utf8_lossy(&buf[..n])
        )));
    }
    Ok(())
}

/// The median of five runs of `dial`, in ms.
async fn timed_dial<F, Fut>(dial: F) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future,
{
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        dial().await;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    times[2]
}

/// A PostgreSQL server as `nobody` when root, on `port`, over `data`.
fn start_postgres(data: &Path, port: u16) -> Result<ChildGuard, BenchError> {
    let child = as_server(Command::new(Path::new(BIN).join("postgres")))
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string()])
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
        ])
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| BenchError::Sidecar(format!("cannot start postgres: {e}")))?;
    Ok(ChildGuard::new(child))
}

fn pg_config(port: u16) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    c
}

async fn postgres_drill(opts: &CompareOptions) -> Result<(Vec<DrillRow>, f64, f64), BenchError> {
    let dir = server_dir()?;
    let primary_data = dir.path().join("primary");
    initdb("--failover", &primary_data)?;
    let primary_port = free_port()?;
    let mut primary = start_postgres(&primary_data, primary_port)?;
    wait_for(&pg_config(primary_port), "postgres").await?;
    let (setup, connection) = pg_config(primary_port)
        .connect(NoTls)
        .await
        .map_err(|e| BenchError::Reply(format!("PostgreSQL: {e}")))?;
    tokio::spawn(connection);
    setup
        .batch_execute("CREATE TABLE w (v int)")
        .await
        .map_err(|e| BenchError::Reply(format!("PostgreSQL: {e}")))?;
    drop(setup);
    let replica_data = dir.path().join("replica");
    run_tool(
        as_server(Command::new(Path::new(BIN).join("pg_basebackup")))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&replica_data)
            .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"]),
        "pg_basebackup",
    )?;
    let replica_port = free_port()?;
    let _replica = start_postgres(&replica_data, replica_port)?;
    wait_for(&pg_config(replica_port), "the replica").await?;
    let (p, r) = (
        format!("127.0.0.1:{primary_port}"),
        format!("127.0.0.1:{replica_port}"),
    );
    let lessor = Lessor::spawn_logged(
        &opts.lessor_bin,
        &upstream_yaml(&[&r, &p], "postgres"),
        opts.lessor_workers,
    )
    .await?;
    let client = Client::connect(&lessor.grpc).await?;
    let dial = timed_dial(|| async {
        let (c, connection) = pg_config(replica_port).connect(NoTls).await.ok()?;
        let task = tokio::spawn(connection);
        drop(c);
        task.await.ok()
    })
    .await;
    let mut direct = tokio_postgres::Config::new();
    direct
        .host("127.0.0.1")
        .port(primary_port)
        .host("127.0.0.1")
        .port(replica_port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2))
        .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut insert = BytesMut::new();
    postgres_protocol::message::frontend::query("INSERT INTO w VALUES (1)", &mut insert)
        .map_err(|e| BenchError::Reply(e.to_string()))?;
    let loops = spawn_loops(
        writers(
            &client,
            insert.freeze(),
            Writer::DirectPg {
                config: direct,
                client: None,
            },
        ),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The outage: the primary dies; the replica is promoted.
    let killed = Instant::now();
    primary.kill();
    let (promoter, connection) = pg_config(replica_port)
        .connect(NoTls)
        .await
        .map_err(|e| BenchError::Reply(format!("PostgreSQL: {e}")))?;
    tokio::spawn(connection);
    promoter
        .batch_execute("SELECT pg_promote()")
        .await
        .map_err(|e| BenchError::Reply(format!("pg_promote: {e}")))?;
    let switch = Instant::now();
    let promote_ms = (switch - killed).as_secs_f64() * 1000.0;
    let rows = finish(
        "postgres",
        loops,
        stop,
        killed,
        switch,
        INTERVAL * 2 + Duration::from_secs(1),
    )
    .await?;
    lessor.stop().await;
    Ok((rows, promote_ms, dial))
}

/// The whole drill: Redis, then PostgreSQL.
pub(crate) async fn run(opts: &CompareOptions) -> Result<FailoverReport, BenchError> {
    let (mut rows, redis_dial) = redis_drill(opts).await?;
    let (pg_rows, promote_ms, pg_dial) = postgres_drill(opts).await?;
    rows.extend(pg_rows);
    Ok(FailoverReport {
        rows,
        promote_ms,
        dial_ms: [redis_dial, pg_dial],
    })
}
