//! `lessor-bench --compare --postgres`, second part: Debian's `pgbench`
//! against PostgreSQL directly, through PgBouncer in transaction pooling
//! and through lessor's PostgreSQL listener (`listen:` on a
//! `protocol: postgres` upstream, `pool_mode: transaction`), both pools 8
//! server connections.
//!
//! Runs: the select-only script (`-S`) and the default TPC-B-like one, each
//! with `-M simple`, `-M extended` and `-M prepared`, at 8 and 32 clients
//! (`-c N -j 2`), `-T` seconds each; the three routes of one setting run
//! one after another, so a drift of the machine shows on all three. tps and
//! average latency come from pgbench's output, the pooler's CPU time per
//! 1,000 transactions from `/proc/<pid>/stat` before and after the run.
//! Then 1,000 idle clients log in on each pooler (a raw StartupMessage, read
//! up to ReadyForQuery) and stay connected while their RSS is read.
//!
//! A run that fails (PgBouncer 1.18 cannot pool `-M prepared` in transaction
//! mode; a listener that refuses a client or is not there yet) is a row of
//! the table, "failed: " and pgbench's first error line, never an error of
//! the benchmark. Every pgbench has a deadline and is killed past it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use super::CompareOptions;
use super::setup::{Lessor, cpu_ms_of, first_error_line, free_port, rss_kib_of};

/// Client counts measured.
const CLIENTS: [usize; 2] = [8, 32];
/// pgbench's query modes.
const MODES: [&str; 3] = ["simple", "extended", "prepared"];
/// Idle clients held open on each pooler for the memory figure.
pub(crate) const IDLE_CLIENTS: usize = 1000;
/// The listener's `max_clients`: the idle clients plus room for a closing
/// pgbench client the listener may still count.
const LISTENER_MAX_CLIENTS: usize = IDLE_CLIENTS + 100;
/// The memory target with `IDLE_CLIENTS` idle clients, KiB.
const RSS_TARGET_KIB: u64 = 40 * 1024;
/// How much longer than `-T` a pgbench may take before it is killed.
const PGBENCH_GRACE: Duration = Duration::from_secs(60);

/// pgbench's scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    SelectOnly,
    TpcB,
}

impl Script {
    fn name(self) -> &'static str {
        match self {
            Self::SelectOnly => "select-only",
            Self::TpcB => "TPC-B-like",
        }
    }
}

/// Where pgbench connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    PgBouncer,
    Lessor,
}

impl Route {
    const ALL: [Route; 3] = [Self::Direct, Self::PgBouncer, Self::Lessor];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "PostgreSQL direct",
            Self::PgBouncer => "PgBouncer",
            Self::Lessor => "lessor listener",
        }
    }
}

/// One pgbench run.
#[derive(Debug, Clone, Serialize)]
pub struct PgbenchRun {
    script: &'static str,
    mode: &'static str,
    clients: usize,
    route: &'static str,
    /// Transactions per second (pgbench's, without initial connection time).
    tps: Option<f64>,
    /// pgbench's average latency, ms.
    latency_ms: Option<f64>,
    /// Transactions pgbench counted.
    transactions: u64,
    /// The pooler's CPU time (user + system) per 1,000 transactions, ms.
    pooler_cpu_ms_per_1k: Option<f64>,
    /// Why the run failed: pgbench's first error line.
    error: Option<String>,
}

/// A pooler's memory with idle clients logged in.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleMemory {
    /// RSS before the clients connect, KiB.
    rss_before_kib: u64,
    /// Clients that completed their startup.
    connected: usize,
    /// RSS with them connected, KiB (when all of them connected).
    rss_with_clients_kib: Option<u64>,
    /// Why not all of them connected.
    error: Option<String>,
}

/// What the pgbench part of one `--compare --postgres` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct PgbenchReport {
    seconds_per_run: u64,
    pool_size: u32,
    lessor_workers: usize,
    cpus: usize,
    /// Why lessor's listener is not measured, when it is not.
    lessor_error: Option<String>,
    runs: Vec<PgbenchRun>,
    lessor_idle: IdleMemory,
    pgbouncer_idle: IdleMemory,
}

/// What the pgbench part runs against; the cluster and PgBouncer are the
/// first part's.
pub(crate) struct Servers<'a> {
    pub postgres_port: u16,
    pub pgbouncer_port: u16,
    pub pgbouncer_pid: u32,
    /// A direct connection's settings, for the vacuum before a TPC-B run.
    pub postgres: &'a tokio_postgres::Config,
    pub pool_size: u32,
}

/// Raises this process's open-file limit to at least `wanted` (up to the
/// hard limit), so it and the servers it starts hold the idle clients.
pub(crate) fn raise_nofile(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The pgbench part. It never fails: what could not run is reported.
pub(crate) async fn run(opts: &CompareOptions, servers: &Servers<'_>) -> PgbenchReport {
    let seconds = if opts.quick { 3 } else { 15 };
    let mut lessor = None;
    let mut lessor_error = None;
    let mut lessor_port = 0;
    match start_listener(opts, servers).await {
        Ok((l, port)) => {
            lessor = Some(l);
            lessor_port = port;
        }
        Err(e) => lessor_error = Some(e),
    }
    let mut runs = Vec::new();
    for script in [Script::SelectOnly, Script::TpcB] {
        for mode in MODES {
            for clients in CLIENTS {
                for route in Route::ALL {
                    let run = |result: Result<Counted, String>| {
                        let (counted, error) = match result {
                            Ok(counted) => (counted, None),
                            Err(e) => (Counted::default(), Some(e)),
                        };
                        PgbenchRun {
                            script: script.name(),
                            mode,
                            clients,
                            route: route.name(),
                            tps: counted.tps,
                            latency_ms: counted.latency_ms,
                            transactions: counted.transactions,
                            pooler_cpu_ms_per_1k: counted.cpu_ms_per_1k,
                            error,
                        }
                    };
                    let (port, pid) = match route {
                        Route::Direct => (servers.postgres_port, None),
                        Route::PgBouncer => (servers.pgbouncer_port, Some(servers.pgbouncer_pid)),
                        Route::Lessor => match (&mut lessor, &lessor_error) {
                            (Some(l), _) => match l.exited() {
                                Some(exit) => {
                                    runs.push(run(Err(exit)));
                                    continue;
                                }
                                None => (lessor_port, Some(l.pid())),
                            },
                            (None, error) => {
                                let error = error.clone().unwrap_or_default();
                                runs.push(run(Err(error)));
                                continue;
                            }
                        },
                    };
                    if script == Script::TpcB {
                        vacuum(servers.postgres).await;
                    }
                    let before = pid.map(cpu_ms_of);
                    let result = pgbench(port, script, mode, clients, seconds).await;
                    let result = result.map(|mut counted| {
                        if let (Some(pid), Some(before)) = (pid, before) {
                            let used = cpu_ms_of(pid).saturating_sub(before) as f64;
                            counted.cpu_ms_per_1k =
                                Some(used * 1000.0 / counted.transactions.max(1) as f64);
                        }
                        counted
                    });
                    runs.push(run(result));
                }
            }
        }
    }
    let lessor_idle = match &mut lessor {
        Some(l) => match l.exited() {
            Some(exit) => IdleMemory {
                error: Some(exit),
                ..IdleMemory::default()
            },
            None => idle_memory(&format!("127.0.0.1:{lessor_port}"), l.pid()).await,
        },
        None => IdleMemory {
            error: lessor_error.clone(),
            ..IdleMemory::default()
        },
    };
    let pgbouncer_idle = idle_memory(
        &format!("127.0.0.1:{}", servers.pgbouncer_port),
        servers.pgbouncer_pid,
    )
    .await;
    if let Some(l) = lessor {
        l.stop().await;
    }
    PgbenchReport {
        seconds_per_run: seconds,
        pool_size: servers.pool_size,
        lessor_workers: opts.lessor_workers,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        lessor_error,
        runs,
        lessor_idle,
        pgbouncer_idle,
    }
}

/// A `lessor serve` child with the listener on one `protocol: postgres`
/// upstream, and the listener's port; the error names what lessor said when
/// it refused the config or the listener does not answer a login.
async fn start_listener(
    opts: &CompareOptions,
    servers: &Servers<'_>,
) -> Result<(Lessor, u16), String> {
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let pool = servers.pool_size;
    let yaml = format!(
        "upstreams:\n  - name: pg\n    address: \"127.0.0.1:{}\"\n    protocol: postgres\n    \
         postgres: {{ user: postgres, database: postgres }}\n    \
         pool: {{ max_size: {pool}, min_idle: {pool} }}\n    \
         listen:\n      address: \"127.0.0.1:{port}\"\n      pool_mode: transaction\n      \
         auth: trust\n      max_clients: {LISTENER_MAX_CLIENTS}\n",
        servers.postgres_port
    );
    let mut lessor = Lessor::spawn_logged(&opts.lessor_bin, &yaml, opts.lessor_workers)
        .await
        .map_err(|e| e.to_string())?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match startup(&addr).await {
            Ok(_) => return Ok((lessor, port)),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("the listener does not accept a login: {e}"));
            }
            Err(_) => {
                if let Some(exit) = lessor.exited() {
                    return Err(exit);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What one successful pgbench run counted.
#[derive(Debug, Default)]
struct Counted {
    tps: Option<f64>,
    latency_ms: Option<f64>,
    transactions: u64,
    cpu_ms_per_1k: Option<f64>,
}

/// Debian's pgbench 15: the server's bin directory, else `PATH`.
fn pgbench_bin() -> PathBuf {
    let bin = Path::new(super::postgres::BIN).join("pgbench");
    if bin.exists() {
        bin
    } else {
        PathBuf::from("pgbench")
    }
}

/// One pgbench run, killed if it outlives `-T` by `PGBENCH_GRACE`.
async fn pgbench(
    port: u16,
    script: Script,
    mode: &str,
    clients: usize,
    seconds: u64,
) -> Result<Counted, String> {
    let mut cmd = Command::new(pgbench_bin());
    cmd.args([
        "-n",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
    ])
    .args(["-c", &clients.to_string(), "-j", "2"])
    .args(["-T", &seconds.to_string(), "-M", mode]);
    if script == Script::SelectOnly {
        cmd.arg("-S");
    }
    cmd.arg("postgres")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", "disable")
        .env("PGGSSENCMODE", "disable")
        .env("PGAPPNAME", "pgbench")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("pgbench: {e}"))?;
    let limit = Duration::from_secs(seconds) + PGBENCH_GRACE;
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("pgbench: {e}")),
        Err(_) => {
            return Err(format!(
                "pgbench still running after {}s, killed",
                limit.as_secs()
            ));
        }
    };
    parse(
        out.status.success(),
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
    )
}

/// tps, latency and transactions from pgbench's report; its first error
/// line when it failed or any client aborted.
fn parse(success: bool, stdout: &str, stderr: &str) -> Result<Counted, String> {
    let value = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| {
                v.split(|c: char| c.is_whitespace() || c == '/')
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
    };
    let counted = Counted {
        tps: value("tps = "),
        latency_ms: value("latency average = "),
        transactions: value("number of transactions actually processed: ").map_or(0, |t| t as u64),
        cpu_ms_per_1k: None,
    };
    let aborted = stderr.contains("aborted") || stdout.contains("aborted");
    if success && !aborted && counted.tps.is_some() && counted.transactions > 0 {
        return Ok(counted);
    }
    Err(first_error_line(stderr)
        .or_else(|| first_error_line(stdout))
        .map(|l| {
            // pgbench's threads may interleave their prefixes.
            let mut l = l.as_str();
            while let Some(rest) = l.trim_start().strip_prefix("pgbench:") {
                l = rest;
            }
            let l = l.trim_start();
            l.strip_prefix("error: ").unwrap_or(l).to_owned()
        })
        .unwrap_or_else(|| "pgbench reported no transactions".into()))
}

/// What pgbench does before a run without `-n`, done directly on the
/// server so every route starts from the same tables.
async fn vacuum(config: &tokio_postgres::Config) {
    let Ok(Ok((client, connection))) = tokio::time::timeout(
        Duration::from_secs(10),
        config.connect(tokio_postgres::NoTls),
    )
    .await
    else {
        return;
    };
    let connection = tokio::spawn(connection);
    for sql in [
        "VACUUM pgbench_branches",
        "VACUUM pgbench_tellers",
        "TRUNCATE pgbench_history",
    ] {
        let _ = tokio::time::timeout(Duration::from_secs(60), client.simple_query(sql)).await;
    }
    drop(client);
    let _ = connection.await;
}

/// One client that logs in and stays idle: a StartupMessage (user and
/// database `postgres`, no TLS), then messages up to ReadyForQuery.
async fn startup(addr: &str) -> Result<TcpStream, String> {
    let login = async {
        let mut socket = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [
                ("user", "postgres"),
                ("database", "postgres"),
                ("application_name", "lessor-bench-idle"),
            ],
            &mut buf,
        )
        .map_err(|e| e.to_string())?;
        socket.write_all(&buf).await.map_err(|e| e.to_string())?;
        loop {
            let mut head = [0u8; 5];
            socket
                .read_exact(&mut head)
                .await
                .map_err(|e| format!("the server closed the login: {e}"))?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if !(4..=1 << 20).contains(&len) {
                return Err(format!("a message of length {len} during the login"));
            }
            let mut body = vec![0; len - 4];
            socket
                .read_exact(&mut body)
                .await
                .map_err(|e| format!("the server closed the login: {e}"))?;
            match head[0] {
                b'Z' => return Ok(socket),
                b'E' => return Err(error_response(&body)),
                b'R' if body.len() >= 4 && body[..4] != [0, 0, 0, 0] => {
                    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    return Err(format!(
                        "the server asks for authentication (request {code})"
                    ));
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), login)
        .await
        .unwrap_or_else(|_| Err("no ReadyForQuery within 10s".into()))
}

/// "SEVERITY: message" of an ErrorResponse body.
fn error_response(body: &[u8]) -> String {
    let (mut severity, mut message) = (String::new(), String::new());
    for field in body.split(|b| *b == 0) {
        if let Some((&kind, text)) = field.split_first() {
            let text = String::from_utf8_lossy(text).into_owned();
            match kind {
                b'S' => severity = text,
                b'M' => message = text,
                _ => {}
            }
        }
    }
    format!("{severity}: {message}")
}

/// The RSS of `pid` before and with `IDLE_CLIENTS` idle clients logged in
/// on `addr`; the clients are closed before it returns.
async fn idle_memory(addr: &str, pid: u32) -> IdleMemory {
    let mut memory = IdleMemory {
        rss_before_kib: rss_kib_of(pid),
        ..IdleMemory::default()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut clients = Vec::with_capacity(IDLE_CLIENTS);
    while clients.len() < IDLE_CLIENTS {
        if Instant::now() >= deadline {
            memory.error = Some("logins took longer than 120s".into());
            break;
        }
        match startup(addr).await {
            Ok(socket) => clients.push(socket),
            Err(e) => {
                memory.error = Some(e);
                break;
            }
        }
    }
    memory.connected = clients.len();
    if memory.error.is_none() {
        // Let the pooler finish what the logins started.
        tokio::time::sleep(Duration::from_millis(500)).await;
        memory.rss_with_clients_kib = Some(rss_kib_of(pid));
    }
    drop(clients);
    tokio::time::sleep(Duration::from_millis(200)).await;
    memory
}

impl PgbenchReport {
    fn find(
        &self,
        script: Script,
        mode: &str,
        clients: usize,
        route: Route,
    ) -> Option<&PgbenchRun> {
        self.runs.iter().find(|r| {
            r.script == script.name()
                && r.mode == mode
                && r.clients == clients
                && r.route == route.name()
        })
    }

    /// The select-only targets at 32 clients for one mode: (tps ratio
    /// verdict, CPU verdict) as text, and whether each was met.
    fn targets(&self, mode: &str) -> [(String, bool); 2] {
        let lessor = self.find(Script::SelectOnly, mode, 32, Route::Lessor);
        let bouncer = self.find(Script::SelectOnly, mode, 32, Route::PgBouncer);
        let ok = |r: Option<&PgbenchRun>| r.is_some_and(|r| r.error.is_none());
        match (
            lessor.filter(|_| ok(lessor)),
            bouncer.filter(|_| ok(bouncer)),
        ) {
            (Some(l), Some(b)) => {
                let (lt, bt) = (l.tps.unwrap_or(0.0), b.tps.unwrap_or(0.0));
                let (lc, bc) = (
                    l.pooler_cpu_ms_per_1k.unwrap_or(f64::INFINITY),
                    b.pooler_cpu_ms_per_1k.unwrap_or(0.0),
                );
                [
                    (
                        format!("{:.2} ({lt:.0} / {bt:.0})", lt / bt.max(1e-9)),
                        lt >= bt,
                    ),
                    (format!("{lc:.1} / {bc:.1} ms"), lc <= bc),
                ]
            }
            (None, _) => {
                let why = "lessor's run failed".to_owned();
                [(why.clone(), false), (why, false)]
            }
            (Some(_), None) => {
                let why = "PgBouncer's run failed".to_owned();
                [(why.clone(), false), (why, false)]
            }
        }
    }

    /// The table, the targets and a summary line, as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "pgbench 15 (scale 1, `-n -c N -j 2 -T {}`; pgbench_branches and pgbench_tellers vacuumed and \
             pgbench_history truncated directly before each TPC-B-like run): PostgreSQL directly, \
             PgBouncer 1.18 (pool_mode = transaction, default_pool_size = {}), lessor's listener \
             (pool_mode: transaction, pool.max_size: {}, runtime.worker_threads: {}); {} CPUs shared by \
             pgbench, PostgreSQL and the pooler\n",
            self.seconds_per_run, self.pool_size, self.pool_size, self.lessor_workers, self.cpus
        );
        if let Some(e) = &self.lessor_error {
            let _ = writeln!(out, "lessor's listener is not measured: {e}\n");
        }
        let _ = writeln!(
            out,
            "| script | -M | clients | route | tps | avg latency ms | pooler CPU ms / 1,000 tx |"
        );
        let _ = writeln!(out, "|---|---|---:|---|---:|---:|---:|");
        for r in &self.runs {
            let (tps, latency, cpu) = match &r.error {
                Some(e) => (
                    format!("failed: {}", short(e)),
                    String::new(),
                    String::new(),
                ),
                None => (
                    r.tps.map_or(String::new(), |t| format!("{t:.0}")),
                    r.latency_ms.map_or(String::new(), |l| format!("{l:.3}")),
                    r.pooler_cpu_ms_per_1k
                        .map_or(String::new(), |c| format!("{c:.1}")),
                ),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.script, r.mode, r.clients, r.route, tps, latency, cpu
            );
        }
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let _ = writeln!(out, "\n| figure | value | target | |");
        let _ = writeln!(out, "|---|---:|---:|---|");
        for mode in ["simple", "extended"] {
            let [(tps, tps_ok), (cpu, cpu_ok)] = self.targets(mode);
            let _ = writeln!(
                out,
                "| select-only, 32 clients, -M {mode}: lessor tps / PgBouncer's | {tps} | ≥ 1.00 | {} |",
                verdict(tps_ok)
            );
            let _ = writeln!(
                out,
                "| select-only, 32 clients, -M {mode}: CPU per 1,000 tx, lessor / PgBouncer | {cpu} | lessor ≤ PgBouncer | {} |",
                verdict(cpu_ok)
            );
        }
        let (rss, rss_ok) = idle_figure(&self.lessor_idle);
        let _ = writeln!(
            out,
            "| lessor RSS, 1,000 idle clients on the listener | {rss} | ≤ 40 MiB | {} |",
            verdict(rss_ok)
        );
        let (bouncer_rss, _) = idle_figure(&self.pgbouncer_idle);
        let _ = writeln!(
            out,
            "| PgBouncer RSS, 1,000 idle clients | {bouncer_rss} | | |"
        );
        let [(_, tps_ok), (_, cpu_ok)] = self.targets("simple");
        let _ = writeln!(
            out,
            "\npgbench targets (select-only, 32 clients, -M simple): lessor tps >= PgBouncer's: {}; \
             lessor CPU/transaction <= PgBouncer's: {}; lessor RSS with 1,000 idle clients <= 40 MiB: {}",
            verdict(tps_ok),
            verdict(cpu_ok),
            verdict(rss_ok)
        );
        out
    }
}

/// "N MiB (M MiB before)", and whether it is within the target.
fn idle_figure(m: &IdleMemory) -> (String, bool) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    match (m.rss_with_clients_kib, &m.error) {
        (Some(kib), _) => (
            format!(
                "{:.1} MiB ({:.1} MiB before)",
                mib(kib),
                mib(m.rss_before_kib)
            ),
            kib <= RSS_TARGET_KIB,
        ),
        (None, error) => (
            format!(
                "failed after {} clients: {}",
                m.connected,
                short(error.as_deref().unwrap_or("no figure"))
            ),
            false,
        ),
    }
}

/// An error short enough for a table cell, without `|`.
fn short(e: &str) -> String {
    let e = e.replace('|', "/");
    match e.char_indices().nth(140) {
        Some((at, _)) => format!("{}…", &e[..at]),
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "pgbench (15.20 (Debian 15.20-0+deb12u1))\n\
        transaction type: <builtin: select only>\nscaling factor: 1\nquery mode: simple\n\
        number of clients: 8\nnumber of threads: 2\nmaximum number of tries: 1\nduration: 3 s\n\
        number of transactions actually processed: 61234\n\
        number of failed transactions: 0 (0.000%)\nlatency average = 0.391 ms\n\
        initial connection time = 12.345 ms\ntps = 20434.123456 (without initial connection time)\n";

    #[test]
    fn a_report_is_parsed() {
        let c = parse(true, REPORT, "").unwrap();
        assert_eq!(c.transactions, 61234);
        assert_eq!(c.latency_ms, Some(0.391));
        assert_eq!(c.tps, Some(20434.123456));
    }

    #[test]
    fn an_aborted_run_names_its_first_error() {
        let stderr = "pgbench: error: client 1 script 0 aborted in command 1 query 0: ERROR:  \
                      prepared statement \"P0_1\" does not exist\n\
                      pgbench: error: Run was aborted; the above results are incomplete.\n";
        let e = parse(false, REPORT, stderr).unwrap_err();
        assert_eq!(
            e,
            "client 1 script 0 aborted in command 1 query 0: ERROR: prepared statement \"P0_1\" does not exist"
        );
        let e = parse(false, "", "pgbench: error: connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n")
            .unwrap_err();
        assert!(e.contains("Connection refused"), "{e}");
        let e = parse(
            false,
            "",
            "pgbench:pgbench: error: ERROR:  lessor: no server connection\n",
        )
        .unwrap_err();
        assert_eq!(e, "ERROR: lessor: no server connection");
    }
}
