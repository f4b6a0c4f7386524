//! A real `redis-server` on a free port, started per test. Where the binary is
//! missing the suite is skipped with a message, unless `LESSOR_REQUIRE_REDIS=1`
//! (CI), where that is a failure.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A running redis-server, killed on drop.
pub struct Redis {
    child: Child,
    port: u16,
    binary: String,
}

impl Redis {
    /// Starts redis-server, or returns `None` (skip) when it is not installed
    /// and not required.
    pub async fn start() -> Option<Self> {
        let binary = std::env::var("LESSOR_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let required = std::env::var("LESSOR_REQUIRE_REDIS").is_ok_and(|v| v == "1");
        let port = free_port();
        let spawned = Command::new(&binary)
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
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if !required => {
                eprintln!(
                    "SKIPPED: redis-server not available ({e}); set LESSOR_REQUIRE_REDIS=1 to fail instead"
                );
                return None;
            }
            Err(e) => panic!("LESSOR_REQUIRE_REDIS=1 but {binary} cannot start: {e}"),
        };
        let redis = Self {
            child,
            port,
            binary,
        };
        redis.wait_ready().await;
        Some(redis)
    }

    /// Kills the server (SIGKILL): every connection to it dies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new server on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.binary, self.port).expect("restart redis-server");
        self.wait_ready().await;
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&self) {
        for _ in 0..500 {
            if let Ok(reply) = self.command(b"PING\r\n").await
                && reply == b"+PONG\r\n"
            {
                return;
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
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("redis reply timed out"))??;
        buf.truncate(n);
        Ok(buf)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(binary: &str, port: u16) -> std::io::Result<Child> {
    Command::new(binary)
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
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
