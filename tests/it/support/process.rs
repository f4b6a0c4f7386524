//! `lessor serve` as a child process, for what only a real process shows:
//! signals, exit codes, its own file descriptors.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lessor_client::Client;

/// A running `lessor serve`, killed on drop.
pub struct Served {
    child: Child,
    /// gRPC `127.0.0.1:port`.
    pub grpc: String,
    /// Admin HTTP `127.0.0.1:port`.
    pub admin: String,
    /// The control endpoints' `127.0.0.1:port`.
    pub control: String,
    /// The listen lines every version of its config file starts with.
    prefix: String,
    dir: tempfile::TempDir,
}

/// A command whose process dies with the test process, however that ends
/// (a panic, `cargo test` killed): the kernel sends it SIGKILL when the
/// thread that spawned it exits. Every server a test starts goes through
/// here, so no redis-server or `lessor serve` outlives a run.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    // SAFETY: prctl is async-signal-safe and touches only the child's own
    // attributes, which is all that may run between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

impl Served {
    /// Starts `lessor serve` with `yaml` (which must not set the listen
    /// addresses) on free ports, and waits until `/livez` answers.
    pub async fn start(yaml: &str) -> Self {
        Self::start_with(yaml, &[]).await
    }

    /// [`Served::start`] with extra environment variables; stdout is kept
    /// for [`Served::stdout`].
    pub async fn start_with(yaml: &str, env: &[(&str, &str)]) -> Self {
        // A reserved port can still be taken by another program on the
        // machine: lessor then exits with a bind error, and other ports are
        // tried.
        for _ in 0..4 {
            if let Some(served) = Self::try_start(yaml, env).await {
                return served;
            }
        }
        panic!("lessor serve exited at start on four sets of ports in a row");
    }

    /// One attempt: `None` when the process exited before it was live.
    async fn try_start(yaml: &str, env: &[(&str, &str)]) -> Option<Self> {
        let (grpc, admin, control) = (
            format!("127.0.0.1:{}", super::ports::reserve()),
            format!("127.0.0.1:{}", super::ports::reserve()),
            format!("127.0.0.1:{}", super::ports::reserve()),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lessor.yaml");
        let prefix = format!(
            "grpc: {{ listen: \"{grpc}\" }}\nadmin: {{ listen: \"{admin}\", control_listen: \"{control}\" }}\n"
        );
        let full = format!("{prefix}{yaml}");
        std::fs::write(&path, full).unwrap();
        let stdout = std::fs::File::create(dir.path().join("stdout")).unwrap();
        let mut command = command(env!("CARGO_BIN_EXE_lessor"));
        command
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(stdout));
        for var in std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("OTEL_"))
        {
            command.env_remove(var);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn lessor serve");
        let mut served = Self {
            child,
            grpc,
            admin,
            control,
            prefix,
            dir,
        };
        let deadline = tokio::time::Instant::now() + super::PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if crate::support::http::fetch(&served.admin, "/livez", None)
                .await
                .is_ok()
            {
                return Some(served);
            }
            if let Some(status) = served.child.try_wait().expect("try_wait") {
                eprintln!(
                    "lessor serve exited before it was live ({status}):\n{}",
                    served.stdout()
                );
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("lessor serve did not come up:\n{}", served.stdout());
    }

    /// Replaces the config file's content after the listen lines (the way
    /// a ConfigMap update lands: a new file renamed over the old one).
    pub fn rewrite(&self, yaml: &str) {
        let path = self.dir.path().join("lessor.yaml");
        let next = self.dir.path().join("lessor.yaml.next");
        std::fs::write(&next, format!("{}{yaml}", self.prefix)).unwrap();
        std::fs::rename(&next, &path).unwrap();
    }

    /// What the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client on a new connection.
    pub async fn client(&self) -> Client {
        Client::connect(&self.grpc)
            .await
            .expect("connect to lessor serve")
    }

    /// Sends a signal (`TERM`, `INT`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit; its exit code, or `None` if it is
    /// still running after `within`.
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
