//! `lessor-bench --compare --postgres`: PostgreSQL 15, PgBouncer and lessor
//! on this machine, one run. It `initdb`s a throwaway cluster (as `nobody`
//! when run as root: PostgreSQL and PgBouncer refuse root), loads a
//! pgbench table (`pgbench -i -s 1`: 100,000 accounts), starts PgBouncer
//! in transaction pooling and a `lessor serve` child with the same pool
//! size, and measures two queries, `SELECT 1` and a primary-key `SELECT`
//! on `pgbench_accounts`, five ways:
//!
//! - direct, a new connection per query (an application without a pool);
//! - direct, a kept connection per client (the floor);
//! - through PgBouncer, a kept client connection each;
//! - through lessor's Exchange (one unary gRPC call per query);
//! - through a lessor lease (Acquire, the query, Release RETURN per query).
//!
//! Every path speaks the simple-query protocol (tokio-postgres's
//! `simple_query`; PgBouncer 1.18 cannot pool named prepared statements),
//! so the upstream does the same work on each. Latency percentiles and
//! throughput at 1, 8 and 32 concurrent clients; CPU time per 1,000
//! queries of lessor and of PgBouncer from `/proc`.
//!
//! Then, on the same cluster and PgBouncer, Debian's `pgbench` against
//! PostgreSQL, PgBouncer and lessor's PostgreSQL listener (`pgbench.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio_postgres::NoTls;

use super::CompareOptions;
use super::pgbench::{self, PgbenchReport};
use super::setup::{ChildGuard, Lessor, cpu_ms_of, free_port};
use crate::load::{BenchError, Percentiles, histogram, lease_cycle, record};
use lessor_client::Client;

/// Debian's server binaries (not on PATH).
pub(crate) const BIN: &str = "/usr/lib/postgresql/15/bin";
/// `nobody:nogroup`, for servers started by root.
pub(crate) const NOBODY: u32 = 65534;
/// The pool size of both PgBouncer and lessor.
const POOL: u32 = 8;
/// Client concurrencies measured.
const CONCURRENCY: [usize; 3] = [1, 8, 32];
/// Rows `pgbench -i -s 1` loads.
const ACCOUNTS: u64 = 100_000;

/// The queries measured.
#[derive(Debug, Clone, Copy, Serialize)]
enum Query {
    /// `SELECT 1`: the round trip, nothing else.
    One,
    /// `SELECT abalance FROM pgbench_accounts WHERE aid = $n`.
    PrimaryKey,
}

impl Query {
    fn name(self) -> &'static str {
        match self {
            Self::One => "SELECT 1",
            Self::PrimaryKey => "pk SELECT",
        }
    }

    /// The `i`th query's text (the key moves through the table).
    fn sql(self, i: u64) -> String {
        match self {
            Self::One => "SELECT 1".into(),
            Self::PrimaryKey => format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
                i.wrapping_mul(7919) % ACCOUNTS + 1
            ),
        }
    }
}

/// The ways a query reaches PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Route {
    DirectNew,
    DirectKept,
    PgBouncer,
    Exchange,
    /// Exchange on an upstream with `reset: ""`: what `DISCARD ALL` costs.
    ExchangeNoReset,
    Lease,
}

impl Route {
    const ALL: [Route; 6] = [
        Self::DirectNew,
        Self::DirectKept,
        Self::PgBouncer,
        Self::Exchange,
        Self::ExchangeNoReset,
        Self::Lease,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::DirectNew => "direct, new connection",
            Self::DirectKept => "direct, kept connection",
            Self::PgBouncer => "PgBouncer (transaction)",
            Self::Exchange => "lessor Exchange",
            Self::ExchangeNoReset => "lessor Exchange, no reset",
            Self::Lease => "lessor Lease",
        }
    }
}

/// One cell of the table.
#[derive(Debug, Clone, Serialize)]
pub struct PgMeasure {
    query: &'static str,
    route: &'static str,
    concurrency: usize,
    latency: Percentiles,
    per_sec: f64,
}

/// Everything one `--compare --postgres` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct PgReport {
    pool_size: u32,
    seconds_per_cell: f64,
    lessor_workers: usize,
    cpus: usize,
    measures: Vec<PgMeasure>,
    /// lessor's CPU time per 1,000 Exchanges of `SELECT 1` at 32 clients.
    lessor_cpu_ms_per_1k: f64,
    /// PgBouncer's CPU time per 1,000 `SELECT 1` at 32 clients.
    pgbouncer_cpu_ms_per_1k: f64,
    /// pgbench against PostgreSQL, PgBouncer and lessor's listener.
    pgbench: PgbenchReport,
}

/// What the workers connect to.
struct Targets {
    postgres: tokio_postgres::Config,
    pgbouncer: tokio_postgres::Config,
    lessor: Client,
    /// A lease's reply to each query, in bytes (constant: every balance
    /// is 0 after `pgbench -i`).
    reply_bytes: [usize; 2],
}

/// One client's connection for a route.
enum Worker {
    DirectNew(tokio_postgres::Config),
    Kept(tokio_postgres::Client),
    /// Exchange on this upstream.
    Exchange(Client, &'static str),
    Lease(Client, [usize; 2]),
}

impl Worker {
    async fn new(route: Route, targets: &Targets) -> Result<Self, BenchError> {
        Ok(match route {
            Route::DirectNew => Self::DirectNew(targets.postgres.clone()),
            Route::DirectKept => Self::Kept(connect(&targets.postgres).await?),
            Route::PgBouncer => Self::Kept(connect(&targets.pgbouncer).await?),
            Route::Exchange => Self::Exchange(targets.lessor.clone(), "db"),
            Route::ExchangeNoReset => Self::Exchange(targets.lessor.clone(), "db_noreset"),
            Route::Lease => Self::Lease(targets.lessor.clone(), targets.reply_bytes),
        })
    }

    async fn one(&mut self, query: Query, i: u64) -> Result<(), BenchError> {
        let sql = query.sql(i);
        match self {
            Self::DirectNew(config) => {
                connect(config)
                    .await?
                    .simple_query(&sql)
                    .await
                    .map_err(pg)?;
            }
            Self::Kept(client) => {
                client.simple_query(&sql).await.map_err(pg)?;
            }
            Self::Exchange(client, upstream) => {
                let reply = client.exchange(upstream, query_message(&sql), None).await?;
                if reply.reply.last() != Some(&b'I') {
                    return Err(BenchError::Reply(format!("{:?}", reply.reply)));
                }
            }
            Self::Lease(client, reply_bytes) => {
                let n = reply_bytes[query as usize];
                lease_cycle(client, "db", &query_message(&sql), n, true).await?;
            }
        }
        Ok(())
    }
}

fn pg(e: tokio_postgres::Error) -> BenchError {
    BenchError::Reply(format!("PostgreSQL: {e}"))
}

async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, BenchError> {
    let (client, connection) = config.connect(NoTls).await.map_err(pg)?;
    tokio::spawn(connection);
    Ok(client)
}

fn query_message(sql: &str) -> Bytes {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut buf).expect("no NUL in the queries");
    buf.freeze()
}

/// Runs `concurrency` clients of `route` for `duration`.
async fn measure(
    route: Route,
    query: Query,
    concurrency: usize,
    duration: Duration,
    targets: &Targets,
) -> Result<PgMeasure, BenchError> {
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut worker = Worker::new(route, targets).await?;
        worker.one(query, 0).await?;
        workers.push(worker);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(w, mut worker)| {
            tokio::spawn(async move {
                let mut h = histogram();
                let mut i = w as u64 * 1_000_003;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    worker.one(query, i).await?;
                    record(&mut h, t.elapsed());
                    i += 1;
                }
                Ok::<_, BenchError>(h)
            })
        })
        .collect();
    let mut all = histogram();
    for task in tasks {
        let h = task
            .await
            .map_err(|e| BenchError::Reply(format!("a client task failed: {e}")))??;
        all.add(&h).map_err(|e| BenchError::Reply(e.to_string()))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(PgMeasure {
        query: query.name(),
        route: route.name(),
        concurrency,
        latency: Percentiles::of(&all),
        per_sec: all.len() as f64 / elapsed,
    })
}

/// The whole run.
pub(crate) async fn run(opts: &CompareOptions) -> Result<PgReport, BenchError> {
    // The pgbench part holds 1,000 idle clients on each pooler: room for
    // them here and in the servers started from here.
    pgbench::raise_nofile(4 * pgbench::IDLE_CLIENTS as u64);
    let cluster = Cluster::start().await?;
    let pgbouncer = PgBouncer::start(&cluster).await?;
    let upstream = |name: &str, reset: &str| {
        format!(
            "  - name: {name}\n    address: \"127.0.0.1:{}\"\n    protocol: postgres\n    postgres: {{ user: postgres, database: postgres{reset} }}\n    pool: {{ max_size: {POOL}, min_idle: {POOL} }}\n",
            cluster.port
        )
    };
    let yaml = format!(
        "upstreams:\n{}{}",
        upstream("db", ""),
        upstream("db_noreset", ", reset: \"\"")
    );
    let lessor = Lessor::spawn(&opts.lessor_bin, &yaml, opts.lessor_workers).await?;
    let client = Client::connect(&lessor.grpc).await?;
    let mut reply_bytes = [0; 2];
    for (i, query) in [Query::One, Query::PrimaryKey].into_iter().enumerate() {
        let reply = client
            .exchange("db", query_message(&query.sql(0)), None)
            .await?;
        reply_bytes[i] = reply.reply.len();
    }
    let targets = Targets {
        postgres: cluster.config(cluster.port),
        pgbouncer: cluster.config(pgbouncer.port),
        lessor: client,
        reply_bytes,
    };
    let duration = if opts.quick {
        Duration::from_millis(700)
    } else {
        Duration::from_secs(4)
    };
    let mut measures = Vec::new();
    let (mut lessor_cpu, mut pgbouncer_cpu) = (0.0, 0.0);
    for query in [Query::One, Query::PrimaryKey] {
        for route in Route::ALL {
            for concurrency in CONCURRENCY {
                let cpu = |route| match route {
                    Route::Exchange => cpu_ms_of(lessor.pid()),
                    Route::PgBouncer => cpu_ms_of(pgbouncer.pid()),
                    _ => 0,
                };
                let before = cpu(route);
                let m = measure(route, query, concurrency, duration, &targets).await?;
                let used = cpu(route).saturating_sub(before) as f64;
                if matches!(query, Query::One) && concurrency == 32 {
                    let per_1k = used * 1000.0 / (m.per_sec * duration.as_secs_f64()).max(1.0);
                    match route {
                        Route::Exchange => lessor_cpu = per_1k,
                        Route::PgBouncer => pgbouncer_cpu = per_1k,
                        _ => {}
                    }
                }
                measures.push(m);
            }
        }
    }
    lessor.stop().await;
    let pgbench = pgbench::run(
        opts,
        &pgbench::Servers {
            postgres_port: cluster.port,
            pgbouncer_port: pgbouncer.port,
            pgbouncer_pid: pgbouncer.pid(),
            postgres: &targets.postgres,
            pool_size: POOL,
        },
    )
    .await;
    drop(pgbouncer);
    drop(cluster);
    let report = PgReport {
        pool_size: POOL,
        seconds_per_cell: duration.as_secs_f64(),
        lessor_workers: opts.lessor_workers,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        measures,
        lessor_cpu_ms_per_1k: lessor_cpu,
        pgbouncer_cpu_ms_per_1k: pgbouncer_cpu,
        pgbench,
    };
    if let Some(path) = &opts.json {
        let json = serde_json::to_vec_pretty(&report)
            .map_err(|e| BenchError::Reply(format!("JSON report: {e}")))?;
        std::fs::write(path, json)?;
    }
    Ok(report)
}

impl PgReport {
    fn find(&self, query: &str, route: Route, concurrency: usize) -> Option<&PgMeasure> {
        self.measures
            .iter()
            .find(|m| m.query == query && m.route == route.name() && m.concurrency == concurrency)
    }

    /// The table, the targets and the CPU figures, as text.
    pub fn render(&self) -> String {
        let mut out = format!(
            "PostgreSQL 15 / PgBouncer 1.18 (transaction pooling) / lessor: pool size {} each, \
             simple-query protocol, {} CPUs, lessor worker_threads {}, {:.1}s per cell\n\n",
            self.pool_size, self.cpus, self.lessor_workers, self.seconds_per_cell
        );
        out.push_str(&format!(
            "{:<10} {:<25} {:>3} {:>9} {:>9} {:>10}\n",
            "query", "route", "c", "p50 µs", "p99 µs", "queries/s"
        ));
        for m in &self.measures {
            out.push_str(&format!(
                "{:<10} {:<25} {:>3} {:>9} {:>9} {:>10.0}\n",
                m.query, m.route, m.concurrency, m.latency.p50, m.latency.p99, m.per_sec
            ));
        }
        out.push('\n');
        for query in [Query::One.name(), Query::PrimaryKey.name()] {
            let (Some(e32), Some(b32), Some(e1), Some(b1)) = (
                self.find(query, Route::Exchange, 32),
                self.find(query, Route::PgBouncer, 32),
                self.find(query, Route::Exchange, 1),
                self.find(query, Route::PgBouncer, 1),
            ) else {
                continue;
            };
            let met = |ok: bool| if ok { "met" } else { "missed" };
            let throughput = e32.per_sec / b32.per_sec.max(1.0);
            let latency = e1.latency.p50 as f64 / b1.latency.p50.max(1) as f64;
            out.push_str(&format!(
                "{query}: Exchange throughput at 32 = {throughput:.2} x PgBouncer's (target >= 1.0: {}); \
                 Exchange p50 at 1 = {latency:.2} x PgBouncer's (target <= 1.3: {})\n",
                met(throughput >= 1.0),
                met(latency <= 1.3)
            ));
        }
        out.push_str(&format!(
            "CPU per 1,000 SELECT 1 at 32 clients: lessor {:.1} ms (Exchange), PgBouncer {:.1} ms\n",
            self.lessor_cpu_ms_per_1k, self.pgbouncer_cpu_ms_per_1k
        ));
        out.push('\n');
        out.push_str(&self.pgbench.render());
        out
    }
}

/// A throwaway PostgreSQL 15 cluster with the pgbench tables, killed on
/// drop.
struct Cluster {
    _dir: tempfile::TempDir,
    port: u16,
    _child: ChildGuard,
}

impl Cluster {
    async fn start() -> Result<Self, BenchError> {
        let dir = server_dir()?;
        let data = dir.path().join("data");
        initdb("--postgres", &data)?;
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
            .args(["-c", "shared_buffers=128MB", "-c", "max_connections=100"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Sidecar(format!("cannot start postgres: {e}")))?;
        let cluster = Self {
            _dir: dir,
            port,
            _child: ChildGuard::new(child),
        };
        wait_for(&cluster.config(port), "postgres").await?;
        run_tool(
            Command::new(Path::new(BIN).join("pgbench"))
                .args([
                    "-i",
                    "-s",
                    "1",
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .args(["-U", "postgres", "postgres"]),
            "pgbench -i",
        )?;
        Ok(cluster)
    }

    /// tokio-postgres settings for a server on `port` (this cluster, or
    /// PgBouncer in front of it).
    fn config(&self, port: u16) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        config
    }
}

/// PgBouncer in transaction pooling in front of the cluster, killed on
/// drop.
struct PgBouncer {
    _dir: tempfile::TempDir,
    port: u16,
    child: ChildGuard,
}

impl PgBouncer {
    async fn start(cluster: &Cluster) -> Result<Self, BenchError> {
        let dir = server_dir()?;
        let port = free_port()?;
        let ini: PathBuf = dir.path().join("pgbouncer.ini");
        let userlist = dir.path().join("userlist.txt");
        std::fs::write(&userlist, "\"postgres\" \"\"\n")?;
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = transaction\n\
                 default_pool_size = {POOL}\nmin_pool_size = {POOL}\nmax_client_conn = {max_clients}\n\
                 logfile = {}\nlog_connections = 0\nlog_disconnections = 0\n",
                cluster.port,
                userlist.display(),
                dir.path().join("pgbouncer.log").display(),
                max_clients = pgbench::IDLE_CLIENTS + 200,
            ),
        )?;
        chown_to_server(dir.path())?;
        let child = as_server(Command::new("pgbouncer"))
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                BenchError::Sidecar(format!("--postgres needs pgbouncer (Debian package): {e}"))
            })?;
        let bouncer = Self {
            _dir: dir,
            port,
            child: ChildGuard::new(child),
        };
        wait_for(&cluster.config(port), "pgbouncer").await?;
        Ok(bouncer)
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// Waits until a login and a query work.
pub(crate) async fn wait_for(
    config: &tokio_postgres::Config,
    what: &str,
) -> Result<(), BenchError> {
    for _ in 0..1000 {
        if let Ok(client) = connect(config).await
            && client.simple_query("SELECT 1").await.is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(BenchError::Sidecar(format!(
        "{what} did not accept a query"
    )))
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd` as `nobody` when this process is root.
pub(crate) fn as_server(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;
    if is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd.env("LC_ALL", "C");
    cmd
}

/// A temp dir the servers' user may write.
pub(crate) fn server_dir() -> Result<tempfile::TempDir, BenchError> {
    let dir = tempfile::tempdir()?;
    chown_to_server(dir.path())?;
    Ok(dir)
}

pub(crate) fn chown_to_server(path: &Path) -> Result<(), BenchError> {
    if is_root() {
        for entry in std::iter::once(path.to_owned()).chain(
            std::fs::read_dir(path)?
                .filter_map(Result::ok)
                .map(|e| e.path()),
        ) {
            std::os::unix::fs::chown(&entry, Some(NOBODY), Some(NOBODY))?;
        }
    }
    Ok(())
}

/// A new cluster in `data` (`trust` for every connection), for the part of
/// the bench named `flag`, which needs PostgreSQL 15 installed.
pub(crate) fn initdb(flag: &str, data: &Path) -> Result<(), BenchError> {
    if !Path::new(BIN).join("initdb").exists() {
        return Err(BenchError::Sidecar(format!(
            "{flag} needs PostgreSQL 15 ({BIN}/initdb; Debian package postgresql-15)"
        )));
    }
    run_tool(
        as_server(Command::new(Path::new(BIN).join("initdb")))
            .arg("-D")
            .arg(data)
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(["--auth-host=trust", "--auth-local=trust"]),
        "initdb",
    )
}

pub(crate) fn run_tool(cmd: &mut Command, what: &str) -> Result<(), BenchError> {
    let out = cmd
        .output()
        .map_err(|e| BenchError::Sidecar(format!("{what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Sidecar(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
