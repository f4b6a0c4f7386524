//! A real `redis-server` on a port of its own, started per test. Where the
//! binary is missing the test is skipped, saying so on the terminal (not in
//! captured output), unless `LESSOR_REQUIRE_REDIS=1` (CI), where that is a
//! failure.

use std::process::{Child, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PATIENCE;
use super::ports;
use super::process::command;

/// A running redis-server, killed on drop (and with the test process).
pub struct Redis {
    child: Child,
    port: u16,
    binary: String,
    /// Extra server arguments (`--requirepass`, ACL users).
    extra: Vec<String>,
}

impl Redis {
    /// Starts redis-server, or returns `None` (skip) when it is not installed
    /// and not required.
    pub async fn start() -> Option<Self> {
        Self::start_with(&[]).await
    }

    /// Starts redis-server with extra arguments (e.g. `--requirepass pw`).
    pub async fn start_with(extra: &[&str]) -> Option<Self> {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let binary = std::env::var("LESSOR_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let required = std::env::var("LESSOR_REQUIRE_REDIS").is_ok_and(|v| v == "1");
        // A reserved port can still be taken by another program on the
        // machine: redis-server then exits, and another port is tried.
        for _ in 0..5 {
            let port = ports::reserve();
            let child = match spawn(&binary, port, &extra) {
                Ok(c) => c,
                Err(e) if !required => {
                    super::skip(&format!(
                        "redis-server not available ({e}); set LESSOR_REQUIRE_REDIS=1 to fail instead"
                    ));
                    return None;
                }
                Err(e) => panic!("LESSOR_REQUIRE_REDIS=1 but {binary} cannot start: {e}"),
            };
            let mut redis = Self {
                child,
                port,
                binary: binary.clone(),
                extra: extra.clone(),
            };
            if redis.wait_ready().await {
                return Some(redis);
            }
        }
        panic!("redis-server exited at start on five ports in a row");
    }

    /// Kills the server (SIGKILL): every connection to it dies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new server on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.binary, self.port, &self.extra).expect("restart redis-server");
        assert!(
            self.wait_ready().await,
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits for PONG; false when the server exited instead (its port was
    /// taken).
    async fn wait_ready(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            // With requirepass, NOAUTH: the server is up all the same.
            if let Ok(reply) = self.command(b"PING\r\n").await
                && (reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
            {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    /// Sends one inline command on a fresh connection and returns the first
    /// reply chunk.
    pub async fn command(&self, cmd: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(self.addr()).await?;
        s.write_all(cmd).await?;
        let mut buf = vec![0; 16 * 1024];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("redis reply timed out"))??;
        buf.truncate(n);
        Ok(buf)
    }

    /// How many times redis-server ran `command` (lower case, e.g. `ping`),
    /// from `INFO commandstats`: what the server saw, not what lessor counted.
    pub async fn calls(&self, command: &str) -> u64 {
        let info = self.bulk(b"INFO commandstats\r\n").await;
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Redis {
    /// One `field:value` of `INFO section`, as a number.
    pub async fn info_field(&self, section: &str, field: &str) -> Option<u64> {
        let info = self.bulk(format!("INFO {section}\r\n").as_bytes()).await;
        let prefix = format!("{field}:");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Sends `cmd` and reads its bulk-string reply to the last byte.
    async fn bulk(&self, cmd: &[u8]) -> String {
        let mut s = TcpStream::connect(self.addr()).await.expect("connect");
        s.write_all(cmd).await.expect("send");
        let mut reply = Vec::new();
        let read = async {
            loop {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0, "redis closed mid-reply");
                reply.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&reply);
                if let Some((head, body)) = text.split_once("\r\n") {
                    let len: usize = head.trim_start_matches('$').parse().expect("a bulk reply");
                    if body.len() >= len + 2 {
                        return body[..len].to_owned();
                    }
                }
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("redis replies")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(binary: &str, port: u16, extra: &[String]) -> std::io::Result<Child> {
    command(binary)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}
