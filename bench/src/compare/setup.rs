//! What `--compare` runs against: its upstream (the echo server, or a
//! `redis-server` child), and `lessor serve` children of this same binary,
//! measured from `/proc`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::CompareOptions;
use crate::load::BenchError;

/// The upstream the run uses.
pub(crate) enum Upstream {
    Echo {
        addr: String,
        _stop: CancellationToken,
    },
    Redis {
        addr: String,
        _child: ChildGuard,
    },
}

impl Upstream {
    pub(crate) fn addr(&self) -> &str {
        match self {
            Self::Echo { addr, .. } | Self::Redis { addr, .. } => addr,
        }
    }
}

/// Kills its child process on drop.
pub(crate) struct ChildGuard(Child);

impl ChildGuard {
    pub(crate) fn new(child: Child) -> Self {
        Self(child)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and reaps it (a failover drill's dying primary).
    pub(crate) fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// `None` while it runs; its exit status once it has exited.
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.0.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(status.to_string()),
            Err(e) => Some(e.to_string()),
        }
    }
}

/// A process's user plus system CPU time, in milliseconds (from clock
/// ticks); 0 once it is gone.
pub(crate) fn cpu_ms_of(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`, which may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat(5): 11 and 12 here.
    (ticks(11) + ticks(12)) * 10
}

/// A process's resident set (`VmRSS`), in KiB; 0 once it is gone.
pub(crate) fn rss_kib_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The first line of a tool's output that reads as an error (`error`,
/// `fatal`, `panicked`, `aborted`), else its first non-empty line.
pub(crate) fn first_error_line(text: &str) -> Option<String> {
    let lines = || text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| {
            let l = l.to_ascii_lowercase();
            ["error", "fatal", "panicked", "aborted"]
                .iter()
                .any(|w| l.contains(w))
        })
        .or_else(|| lines().next())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) async fn start_redis() -> Result<Upstream, BenchError> {
    let (addr, child) = start_redis_server(None).await?;
    Ok(Upstream::Redis {
        addr,
        _child: child,
    })
}

/// A `redis-server` child on a free loopback port, without persistence
/// (`--save ''`), with `--requirepass` when a password is given; its
/// address once it answers `PING` (after `AUTH`).
pub(crate) async fn start_redis_server(
    password: Option<&str>,
) -> Result<(String, ChildGuard), BenchError> {
    let port = free_port()?;
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    if let Some(password) = password {
        cmd.args(["--requirepass", password]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| std::io::Error::other(format!("--redis needs redis-server: {e}")))?;
    let guard = ChildGuard(child);
    let addr = format!("127.0.0.1:{port}");
    let (hello, expect) = match password {
        Some(password) => (
            format!("AUTH {password}\r\nPING\r\n"),
            &b"+OK\r\n+PONG\r\n"[..],
        ),
        None => ("PING\r\n".to_owned(), &b"+PONG\r\n"[..]),
    };
    for _ in 0..500 {
        if let Ok(mut s) = TcpStream::connect(&addr).await {
            let mut buf = vec![0u8; expect.len()];
            if s.write_all(hello.as_bytes()).await.is_ok()
                && s.read_exact(&mut buf).await.is_ok()
                && buf == expect
            {
                return Ok((addr, guard));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(BenchError::Reply("redis-server did not answer PING".into()))
}

fn health(opts: &CompareOptions) -> &'static str {
    if opts.redis {
        "    health: { probe: { send: \"PING\\r\\n\", expect: \"+PONG\\r\\n\" } }\n"
    } else {
        ""
    }
}

pub(crate) fn one_upstream_config(addr: &str, opts: &CompareOptions) -> String {
    let mut yaml = String::from("upstreams:\n");
    for engine in ["bb8", "deadpool"] {
        let _ = write!(
            yaml,
            "  - name: {engine}\n    address: \"{addr}\"\n    engine: {engine}\n    pool: {{ max_size: 160, min_idle: 8 }}\n{}",
            health(opts)
        );
    }
    if opts.redis {
        // The same server through the protocol adapter: Exchange, and the
        // parsing cost on the streaming path (R resp against R bb8).
        let _ = write!(
            yaml,
            "  - name: resp\n    address: \"{addr}\"\n    engine: bb8\n    protocol: redis\n    pool: {{ max_size: 160, min_idle: 8 }}\n"
        );
    }
    yaml
}

pub(crate) fn four_upstreams_config(addr: &str, opts: &CompareOptions) -> String {
    let mut yaml = String::from("upstreams:\n");
    for i in 0..4 {
        let engine = if i % 2 == 0 { "bb8" } else { "deadpool" };
        let _ = write!(
            yaml,
            "  - name: up{i}\n    address: \"{addr}\"\n    engine: {engine}\n    pool: {{ max_size: 32, min_idle: 32 }}\n{}",
            health(opts)
        );
    }
    yaml
}

/// A `lessor serve` child process of the binary under test.
pub(crate) struct Lessor {
    child: ChildGuard,
    pub(crate) grpc: String,
    pub(crate) admin: String,
    /// Where its standard error goes, when not to this process's.
    stderr: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl Lessor {
    pub(crate) async fn spawn(
        bin: &Path,
        upstreams_yaml: &str,
        workers: usize,
    ) -> Result<Self, BenchError> {
        Self::start(bin, upstreams_yaml, workers, false).await
    }

    /// As `spawn`, with its standard error in a file: a config it refuses,
    /// or an exit before it is ready, is an error naming lessor's first
    /// error line.
    pub(crate) async fn spawn_logged(
        bin: &Path,
        upstreams_yaml: &str,
        workers: usize,
    ) -> Result<Self, BenchError> {
        Self::start(bin, upstreams_yaml, workers, true).await
    }

    async fn start(
        bin: &Path,
        upstreams_yaml: &str,
        workers: usize,
        logged: bool,
    ) -> Result<Self, BenchError> {
        let dir = tempfile::tempdir()?;
        let grpc = format!("127.0.0.1:{}", free_port()?);
        let admin = format!("127.0.0.1:{}", free_port()?);
        let path = dir.path().join("lessor.yaml");
        std::fs::write(
            &path,
            format!(
                "grpc: {{ listen: \"{grpc}\" }}\nadmin: {{ listen: \"{admin}\", control_listen: \"\" }}\nruntime: {{ worker_threads: {workers} }}\nshutdown: {{ grace: 1s }}\n{upstreams_yaml}"
            ),
        )?;
        let stderr_path = dir.path().join("lessor.stderr");
        let stderr = if logged {
            Stdio::from(std::fs::File::create(&stderr_path)?)
        } else {
            Stdio::inherit()
        };
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| BenchError::Sidecar(format!("cannot start {}: {e}", bin.display())))?;
        let mut lessor = Self {
            child: ChildGuard(child),
            grpc,
            admin: admin.clone(),
            stderr: logged.then_some(stderr_path),
            _dir: dir,
        };
        for _ in 0..1000 {
            if let Some(exit) = lessor.exited() {
                return Err(BenchError::Sidecar(exit));
            }
            if let Ok((200, _)) = get(&admin, "/readyz").await {
                return Ok(lessor);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(BenchError::Reply(
            "lessor serve did not become ready".into(),
        ))
    }

    /// `None` while it runs; once it has exited, its status and (when
    /// logged) the first error line it printed.
    pub(crate) fn exited(&mut self) -> Option<String> {
        let status = self.child.exited()?;
        let said = self
            .stderr
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .and_then(|text| first_error_line(&text));
        Some(match said {
            Some(line) => format!("lessor exited ({status}): {line}"),
            None => format!("lessor exited ({status})"),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        rss_kib_of(self.pid())
    }

    /// User plus system CPU time, in milliseconds.
    pub(crate) fn cpu_ms(&self) -> u64 {
        cpu_ms_of(self.pid())
    }

    pub(crate) async fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.0.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `GET http://{addr}{path}`: the status and the body.
pub(crate) async fn get(addr: &str, path: &str) -> Result<(u16, String), BenchError> {
    let failed = |e: reqwest::Error| BenchError::Reply(format!("GET {path}: {e}"));
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .map_err(failed)?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.map_err(failed)?))
}
