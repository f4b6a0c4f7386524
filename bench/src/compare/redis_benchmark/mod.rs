//! `lessor-bench --compare --redis`, listener part: Debian's
//! `redis-benchmark` against a `redis-server` with `--requirepass`
//! directly, through twemproxy (Debian's `nutcracker`: one server,
//! `server_connections: 1`, `preconnect: true`, `redis_auth`) and through
//! lessor's Redis listener (`listen:` on a `protocol: redis` upstream, a
//! pool of 8 connections that authenticate with `redis.password_file`).
//!
//! Runs: PING (`PING_MBULK`), SET, GET, INCR, LPUSH and LRANGE_100 at 50
//! clients, without and with `-P 16`, one redis-benchmark per test so
//! that each run's CPU is its own; the three routes of one setting run one
//! after another, so a drift of the machine shows on all three.
//! LRANGE_100 is run as the command it sends (`LRANGE mylist 0 99`):
//! `-t lrange_100` first runs an LPUSH of its own, which would count in
//! the run's CPU. requests/s come from redis-benchmark's `--csv` line; the
//! proxy's and redis-server's CPU time per 1,000 commands from
//! `/proc/<pid>/stat` before and after the run.
//!
//! A run that fails (a proxy that did not start or exited, an error reply,
//! which makes redis-benchmark exit) is a row of the table, "failed: " and
//! what redis-benchmark said, never an error of the benchmark. Every
//! redis-benchmark has a deadline and is killed past it.

mod render;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use super::CompareOptions;
use super::setup::{ChildGuard, Lessor, cpu_ms_of, free_port, start_redis_server};
use crate::load::BenchError;

/// redis-benchmark's `-c`.
const CLIENTS: usize = 50;
/// redis-benchmark's `-P`: without and with pipelining.
const PIPELINES: [usize; 2] = [1, 16];
/// lessor's pool: `max_size` and `min_idle`.
const POOL_SIZE: u32 = 8;
/// The throwaway redis-server's `requirepass`.
const PASSWORD: &str = "lessor-bench-requirepass";
/// `PING` as a RESP array, as redis-benchmark's PING_MBULK sends it.
const PING: &str = "*1\r\n$4\r\nPING\r\n";
/// How long a proxy has to answer its first `PING`.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// The tests, in the order they run (LPUSH fills the list LRANGE_100 reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Ping,
    Set,
    Get,
    Incr,
    Lpush,
    Lrange100,
}

impl Test {
    const ALL: [Test; 6] = [
        Self::Ping,
        Self::Set,
        Self::Get,
        Self::Incr,
        Self::Lpush,
        Self::Lrange100,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Ping => "PING_MBULK",
            Self::Set => "SET",
            Self::Get => "GET",
            Self::Incr => "INCR",
            Self::Lpush => "LPUSH",
            Self::Lrange100 => "LRANGE_100",
        }
    }

    /// redis-benchmark's last arguments: a `-t` test, or the command itself.
    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Ping => &["-t", "ping_mbulk"],
            Self::Set => &["-t", "set"],
            Self::Get => &["-t", "get"],
            Self::Incr => &["-t", "incr"],
            Self::Lpush => &["-t", "lpush"],
            Self::Lrange100 => &["LRANGE", "mylist", "0", "99"],
        }
    }
}

/// Where redis-benchmark connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Twemproxy,
    Lessor,
}

impl Route {
    const ALL: [Route; 3] = [Self::Direct, Self::Twemproxy, Self::Lessor];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "redis-server direct",
            Self::Twemproxy => "twemproxy",
            Self::Lessor => "lessor listener",
        }
    }
}

/// One redis-benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct RedisBenchmarkRun {
    test: &'static str,
    pipeline: usize,
    route: &'static str,
    /// Requests (commands) per second, redis-benchmark's.
    requests_per_sec: Option<f64>,
    /// The proxy's CPU time (user + system) per 1,000 commands, ms.
    proxy_cpu_ms_per_1k: Option<f64>,
    /// redis-server's CPU time per 1,000 commands, ms.
    redis_cpu_ms_per_1k: Option<f64>,
    /// Why the run failed.
    error: Option<String>,
}

/// What the listener part of one `--compare --redis` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RedisBenchmarkReport {
    redis_benchmark_version: String,
    twemproxy_version: String,
    clients: usize,
    /// `-n` without pipelining.
    requests: u64,
    /// `-n` with `-P 16`.
    requests_pipelined: u64,
    pool_size: u32,
    lessor_workers: usize,
    cpus: usize,
    runs: Vec<RedisBenchmarkRun>,
}

/// Where one run connects: a port, and the proxy process behind it.
struct Target {
    port: u16,
    /// The proxy's, for its CPU time; none for redis-server directly.
    proxy_pid: Option<u32>,
}

/// The listener part. Fails only when redis-server cannot start; what
/// else could not run is reported.
pub(crate) async fn run(opts: &CompareOptions) -> Result<RedisBenchmarkReport, BenchError> {
    let (requests, requests_pipelined) = if opts.quick {
        (2_000, 4_000)
    } else {
        (100_000, 1_000_000)
    };
    let dir = tempfile::tempdir()?;
    let (redis_addr, redis) = start_redis_server(Some(PASSWORD)).await?;
    let redis_port = port_of(&redis_addr)?;
    let mut routes = Routes {
        twemproxy: Twemproxy::start(dir.path(), redis_port).await,
        lessor: start_listener(opts, dir.path(), redis_port).await,
        redis,
        redis_port,
        quick: opts.quick,
    };
    // Not recorded: connections, caches and the allocator settle first.
    for route in Route::ALL {
        routes.measure(Test::Ping, 1, route, requests).await;
    }
    let mut runs = Vec::new();
    for test in Test::ALL {
        for pipeline in PIPELINES {
            let n = if pipeline == 1 {
                requests
            } else {
                requests_pipelined
            };
            for route in Route::ALL {
                runs.push(routes.measure(test, pipeline, route, n).await);
            }
        }
    }
    if let Ok((lessor, _)) = routes.lessor {
        lessor.stop().await;
    }
    drop(routes.twemproxy);
    drop(routes.redis);
    Ok(RedisBenchmarkReport {
        redis_benchmark_version: version_of("redis-benchmark").await,
        twemproxy_version: version_of("nutcracker").await,
        clients: CLIENTS,
        requests,
        requests_pipelined,
        pool_size: POOL_SIZE,
        lessor_workers: opts.lessor_workers,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        runs,
    })
}

/// The three routes to one redis-server.
struct Routes {
    redis: ChildGuard,
    redis_port: u16,
    twemproxy: Result<Twemproxy, String>,
    lessor: Result<(Lessor, u16), String>,
    quick: bool,
}

impl Routes {
    /// Where `route` is served now, or why it is not.
    fn target(&mut self, route: Route) -> Result<Target, String> {
        match route {
            Route::Direct => Ok(Target {
                port: self.redis_port,
                proxy_pid: None,
            }),
            Route::Twemproxy => {
                let t = self.twemproxy.as_mut().map_err(|e| e.clone())?;
                match t.child.exited() {
                    Some(exit) => Err(format!("twemproxy exited ({exit})")),
                    None => Ok(Target {
                        port: t.port,
                        proxy_pid: Some(t.child.pid()),
                    }),
                }
            }
            Route::Lessor => {
                let (l, port) = self.lessor.as_mut().map_err(|e| e.clone())?;
                match l.exited() {
                    Some(exit) => Err(exit),
                    None => Ok(Target {
                        port: *port,
                        proxy_pid: Some(l.pid()),
                    }),
                }
            }
        }
    }

    /// One redis-benchmark run of `requests` commands through `route`,
    /// with the CPU time the proxy and redis-server spent on it.
    async fn measure(
        &mut self,
        test: Test,
        pipeline: usize,
        route: Route,
        requests: u64,
    ) -> RedisBenchmarkRun {
        let mut run = RedisBenchmarkRun {
            test: test.name(),
            pipeline,
            route: route.name(),
            requests_per_sec: None,
            proxy_cpu_ms_per_1k: None,
            redis_cpu_ms_per_1k: None,
            error: None,
        };
        let target = match self.target(route) {
            Ok(target) => target,
            Err(e) => {
                run.error = Some(e);
                return run;
            }
        };
        let redis_pid = self.redis.pid();
        let proxy_before = target.proxy_pid.map(cpu_ms_of);
        let redis_before = cpu_ms_of(redis_pid);
        let result = redis_benchmark(&target, route, test, pipeline, requests, self.quick).await;
        let per_1k = |pid: u32, before: u64| {
            cpu_ms_of(pid).saturating_sub(before) as f64 * 1000.0 / requests as f64
        };
        match result {
            Ok(rps) => {
                run.requests_per_sec = Some(rps);
                run.redis_cpu_ms_per_1k = Some(per_1k(redis_pid, redis_before));
                run.proxy_cpu_ms_per_1k = target
                    .proxy_pid
                    .zip(proxy_before)
                    .map(|(pid, before)| per_1k(pid, before));
            }
            Err(e) => run.error = Some(e),
        }
        run
    }
}

fn port_of(addr: &str) -> Result<u16, BenchError> {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .ok_or_else(|| BenchError::Reply(format!("no port in {addr}")))
}

/// A `nutcracker` child: one pool, one server, one server connection.
struct Twemproxy {
    child: ChildGuard,
    port: u16,
}

impl Twemproxy {
    /// Started and answering `AUTH` and `PING`, or why not (nutcracker's
    /// log's first error line, when it wrote one).
    async fn start(dir: &Path, redis_port: u16) -> Result<Self, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let stats = free_port().map_err(|e| format!("no free port: {e}"))?;
        let (conf, log) = (dir.join("nutcracker.yml"), dir.join("nutcracker.log"));
        std::fs::write(
            &conf,
            format!(
                "bench:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  distribution: ketama\n  \
                 redis: true\n  redis_auth: {PASSWORD}\n  server_connections: 1\n  \
                 preconnect: true\n  auto_eject_hosts: false\n  servers:\n    - 127.0.0.1:{redis_port}:1\n"
            ),
        )
        .map_err(|e| format!("{}: {e}", conf.display()))?;
        let child = std::process::Command::new("nutcracker")
            .arg("-c")
            .arg(&conf)
            .args(["-s", &stats.to_string(), "-a", "127.0.0.1", "-o"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("nutcracker (Debian's twemproxy): {e}"))?;
        let mut proxy = Self {
            child: ChildGuard::new(child),
            port,
        };
        // What nutcracker logged that reads as a cause (its log opens with
        // a banner).
        let said = || {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            log.lines()
                .find(|l| {
                    let l = l.to_ascii_lowercase();
                    ["error", "fail", "invalid"].iter().any(|w| l.contains(w))
                })
                .map_or_else(String::new, |l| format!(": {}", l.trim()))
        };
        // twemproxy reads no inline commands: RESP arrays only.
        let hello = format!(
            "*2\r\n$4\r\nAUTH\r\n${}\r\n{PASSWORD}\r\n{PING}",
            PASSWORD.len()
        );
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(exit) = proxy.child.exited() {
                return Err(format!("twemproxy exited ({exit}){}", said()));
            }
            match ask(port, hello.as_bytes(), b"+OK\r\n+PONG\r\n").await {
                Ok(()) => return Ok(proxy),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("twemproxy does not answer PING: {e}{}", said()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// A `lessor serve` child with the listener on one `protocol: redis`
/// upstream, and the listener's port, once it answers `PING`.
async fn start_listener(
    opts: &CompareOptions,
    dir: &Path,
    redis_port: u16,
) -> Result<(Lessor, u16), String> {
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let password_file = dir.join("redis-password");
    std::fs::write(&password_file, PASSWORD)
        .map_err(|e| format!("{}: {e}", password_file.display()))?;
    let yaml = format!(
        "upstreams:\n  - name: cache\n    address: \"127.0.0.1:{redis_port}\"\n    protocol: redis\n    \
         redis: {{ password_file: \"{}\" }}\n    \
         pool: {{ max_size: {POOL_SIZE}, min_idle: {POOL_SIZE} }}\n    \
         listen: {{ address: \"127.0.0.1:{port}\", auth: trust, max_clients: {} }}\n",
        password_file.display(),
        CLIENTS * 4
    );
    let mut lessor = Lessor::spawn_logged(&opts.lessor_bin, &yaml, opts.lessor_workers)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        match ask(port, PING.as_bytes(), b"+PONG\r\n").await {
            Ok(()) => return Ok((lessor, port)),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("the listener does not answer PING: {e}"));
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

/// Sends `request` on a new connection and expects exactly `expect`.
async fn ask(port: u16, request: &[u8], expect: &[u8]) -> Result<(), String> {
    let exchange = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(request).await.map_err(|e| e.to_string())?;
        let mut reply = vec![0u8; expect.len()];
        s.read_exact(&mut reply).await.map_err(|e| e.to_string())?;
        if reply == expect {
            Ok(())
        } else {
            Err(format!("replied {:?}", String::from_utf8_lossy(&reply)))
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .unwrap_or_else(|_| Err("no reply within 2s".into()))
}

/// One redis-benchmark run: its requests/s, or what it said when it
/// failed. Killed past its deadline.
async fn redis_benchmark(
    target: &Target,
    route: Route,
    test: Test,
    pipeline: usize,
    requests: u64,
    quick: bool,
) -> Result<f64, String> {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", &target.port.to_string()])
        .args(["-c", &CLIENTS.to_string(), "-n", &requests.to_string()])
        .args(["-P", &pipeline.to_string(), "--csv"]);
    // lessor answers AUTH itself and its listener trusts loopback clients;
    // twemproxy with `redis_auth` demands AUTH of every client.
    if route != Route::Lessor {
        cmd.args(["-a", PASSWORD]);
    }
    cmd.args(test.args())
        .env_remove("REDISCLI_AUTH")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("redis-benchmark: {e}"))?;
    let limit = Duration::from_secs(if quick { 60 } else { 300 });
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("redis-benchmark: {e}")),
        Err(_) => {
            return Err(format!(
                "redis-benchmark still running after {}s, killed",
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

/// requests/s from redis-benchmark's `--csv` output (a header, then one
/// line per test); what it said on standard error when it failed.
fn parse(success: bool, stdout: &str, stderr: &str) -> Result<f64, String> {
    let rps = stdout
        .lines()
        .filter(|l| !l.starts_with("\"test\""))
        .find_map(|l| l.split(',').nth(1)?.trim_matches('"').parse::<f64>().ok());
    match rps {
        Some(rps) if success && rps > 0.0 => Ok(rps),
        _ => {
            // twemproxy does not answer CONFIG GET: a warning, not the cause.
            let said: Vec<&str> = stderr
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("WARNING"))
                .collect();
            Err(if said.is_empty() {
                "redis-benchmark reported no requests/s".into()
            } else {
                said.join(" ")
            })
        }
    }
}

/// The first line of `tool --version`, or why there is none.
async fn version_of(tool: &str) -> String {
    match Command::new(tool).arg("--version").output().await {
        Ok(out) => {
            let (stdout, stderr) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            let first = stdout.lines().chain(stderr.lines()).next();
            first.unwrap_or_default().trim().to_owned()
        }
        Err(e) => format!("{tool}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\
                          \"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n";

    #[test]
    fn a_csv_line_is_parsed() {
        let out = format!(
            "{HEADER}\"GET\",\"58823.53\",\"0.716\",\"0.080\",\"0.495\",\"2.583\",\"4.535\",\"4.639\"\n"
        );
        assert_eq!(parse(true, &out, ""), Ok(58823.53));
        let out = format!(
            "{HEADER}\"LRANGE mylist 0 99\",\"47961.63\",\"15.961\",\"5.992\",\"15.063\",\"26.399\",\"29.263\",\"32.063\"\n"
        );
        let stderr = "WARNING: Could not fetch server CONFIG\n";
        assert_eq!(parse(true, &out, stderr), Ok(47961.63));
    }

    #[test]
    fn a_failed_run_says_why_without_the_config_warning() {
        let stderr = "WARNING: Could not fetch server CONFIG\nNode 127.0.0.1:16501 replied with error:\n\
                      NOAUTH Authentication required.\n";
        assert_eq!(
            parse(false, "", stderr),
            Err("Node 127.0.0.1:16501 replied with error: NOAUTH Authentication required.".into())
        );
        assert_eq!(
            parse(true, HEADER, ""),
            Err("redis-benchmark reported no requests/s".into())
        );
    }
}
