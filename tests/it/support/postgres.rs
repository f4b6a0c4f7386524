//! A real PostgreSQL 15 on a port of its own, started per test from a
//! cluster `initdb` made once per test run (copied, so each test may kill,
//! restart or exhaust its server alone). No unix socket; `pg_hba.conf`
//! has one role per authentication method:
//!
//! | role | method | password |
//! |---|---|---|
//! | `postgres` | trust (superuser, for the tests' own checks) | |
//! | `trustuser` | trust | |
//! | `md5user` | md5 | `md5pw` |
//! | `scramuser` | scram-sha-256 | `scrampw` |
//! | `passuser` | password (cleartext) | `passpw` |
//!
//! PostgreSQL refuses to run as root: as root, the servers run as
//! `nobody`. Where the binaries are missing the test is skipped, unless
//! `LESSOR_REQUIRE_POSTGRES=1` (CI), where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::PATIENCE;
use super::ports;
use super::process::command;

/// Where Debian puts the server binaries (not on PATH).
const BIN: &str = "/usr/lib/postgresql/15/bin";
/// `nobody:nogroup`, for servers started by root.
const NOBODY: u32 = 65534;

const HBA: &str = "\
host replication postgres 127.0.0.1/32 trust
host all postgres 127.0.0.1/32 trust
host all trustuser 127.0.0.1/32 trust
host all md5user 127.0.0.1/32 md5
host all passuser 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
";

const ROLES: &str = "\
CREATE ROLE trustuser LOGIN;
SET password_encryption = 'md5';
CREATE ROLE md5user LOGIN PASSWORD 'md5pw';
SET password_encryption = 'scram-sha-256';
CREATE ROLE scramuser LOGIN PASSWORD 'scrampw';
CREATE ROLE passuser LOGIN PASSWORD 'passpw';
CREATE DATABASE app;
GRANT ALL ON DATABASE app TO trustuser, md5user, scramuser, passuser;
\\c app
GRANT ALL ON SCHEMA public TO PUBLIC;
";

/// A running PostgreSQL, killed on drop (and with the test process).
pub struct Postgres {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Starts a server, or returns `None` (skip) when PostgreSQL is not
    /// installed and not required.
    pub async fn start() -> Option<Self> {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra settings (`max_connections=5`).
    pub async fn start_with(settings: &[&str]) -> Option<Self> {
        Self::start_prepared(settings, |_| {}).await
    }

    /// Starts a server with extra settings, after `prepare` has changed its
    /// data directory (TLS files, `pg_hba.conf`).
    pub async fn start_prepared(settings: &[&str], prepare: impl FnOnce(&Path)) -> Option<Self> {
        let required = std::env::var("LESSOR_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let template = match template() {
            Ok(t) => t,
            Err(e) if !required => {
                super::skip(&format!(
                    "PostgreSQL not available ({e}); set LESSOR_REQUIRE_POSTGRES=1 to fail instead"
                ));
                return None;
            }
            Err(e) => panic!("LESSOR_REQUIRE_POSTGRES=1 but PostgreSQL cannot start: {e}"),
        };
        let mut dir = owned_tempdir();
        let data = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&data)
            .status()
            .expect("cp");
        assert!(status.success(), "copying the template cluster");
        let mut conf = String::new();
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), conf).unwrap();
        prepare(&data);
        for _ in 0..5 {
            let port = ports::reserve();
            let child = spawn(&data, port);
            let mut pg = Self { child, port, dir };
            if pg.wait_ready().await {
                return Some(pg);
            }
            dir = pg.into_dir();
        }
        panic!("postgres exited at start on five ports in a row");
    }

    /// Starts a streaming replica of this server: `pg_basebackup -R` (a
    /// hot standby following this one), on a port of its own.
    pub async fn start_replica(&self) -> Self {
        let mut dir = owned_tempdir();
        let data = dir.path().join("data");
        let out = as_server(Command::new(Path::new(BIN).join("pg_basebackup")))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"])
            .output()
            .expect("pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..5 {
            let port = ports::reserve();
            let child = spawn(&data, port);
            let mut pg = Self { child, port, dir };
            if pg.wait_ready().await {
                return pg;
            }
            dir = pg.into_dir();
        }
        panic!("the replica exited at start on five ports in a row");
    }

    fn into_dir(mut self) -> tempfile::TempDir {
        self.kill();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL to the postmaster; its backends exit when
    /// they notice): every connection to it dies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Backends of a killed postmaster linger until they notice; a
        // restart waits for the data directory's lock instead.
    }

    /// A connection of the tests' own, retried while the server refuses it
    /// (a slot freed by a closed session frees a moment after the close).
    pub async fn connect_retrying(&self, user: &str) -> tokio_postgres::Client {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut config = tokio_postgres::Config::new();
            config
                .host("127.0.0.1")
                .port(self.port)
                .user(user)
                .dbname("app");
            match config.connect(tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    return client;
                }
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "connect as {user}: {e:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A connection of the tests' own (tokio-postgres), as `user`.
    pub async fn connect(&self, user: &str, password: Option<&str>) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname("app")
            .connect_timeout(PATIENCE);
        if let Some(password) = password {
            config.password(password);
        }
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
        tokio::spawn(connection);
        client
    }

    /// The superuser, for checks behind lessor's back.
    pub async fn admin(&self) -> tokio_postgres::Client {
        self.connect("postgres", None).await
    }

    /// Waits until a trust login works; false when the server exited
    /// instead (its port was taken).
    async fn wait_ready(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        while tokio::time::Instant::now() < deadline {
            let mut config = tokio_postgres::Config::new();
            config
                .host("127.0.0.1")
                .port(self.port)
                .user("postgres")
                .dbname("postgres");
            if config.connect(tokio_postgres::NoTls).await.is_ok() {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "postgres on port {} did not accept a login; log:\n{}",
            self.port,
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The postmaster, as `nobody` when the tests run as root.
fn spawn(data: &Path, port: u16) -> Child {
    let log = std::fs::File::create(data.parent().unwrap().join("log")).unwrap();
    as_server(command(Path::new(BIN).join("postgres")))
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "unix_socket_directories="])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn postgres")
}

/// Runs `cmd` as `nobody` when this process is root (PostgreSQL refuses
/// root), with a locale that every machine has.
fn as_server(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd.env("LC_ALL", "C").env_remove("PGDATA");
    cmd
}

/// Writes `contents` into `data` as a file only the server's user may read
/// (PostgreSQL refuses a key file others can read).
pub fn write_private(data: &Path, name: &str, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let path = data.join(name);
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
}

/// A temp dir the server's user may write.
fn owned_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    dir
}

/// The cluster every test's server is copied from: `initdb`, the roles and
/// `pg_hba.conf` of the table above. Made once per test process.
fn template() -> Result<&'static Path, String> {
    static TEMPLATE: OnceLock<Result<(tempfile::TempDir, PathBuf), String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(make_template)
        .as_ref()
        .map(|(_, data)| data.as_path())
        .map_err(Clone::clone)
}

fn make_template() -> Result<(tempfile::TempDir, PathBuf), String> {
    if !Path::new(BIN).join("initdb").exists() {
        return Err(format!("{BIN}/initdb not found"));
    }
    let dir = owned_tempdir();
    let data = dir.path().join("data");
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    run(
        as_server(Command::new(Path::new(BIN).join("initdb")))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(["--auth-host=trust", "--auth-local=trust"]),
        "initdb",
    )?;
    // Small, fast, and room for the tests' own connections.
    let conf = "\nshared_buffers = 16MB\nmax_connections = 40\nfsync = off\n\
                synchronous_commit = off\nfull_page_writes = off\n";
    let mut postgresql_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    postgresql_conf.push_str(conf);
    std::fs::write(data.join("postgresql.conf"), postgresql_conf).unwrap();
    std::fs::write(data.join("pg_hba.conf"), HBA).unwrap();
    let port = ports::reserve();
    let options = format!("-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=");
    run(
        as_server(Command::new(Path::new(BIN).join("pg_ctl")))
            .arg("-D")
            .arg(&data)
            .args(["-o", &options, "-w", "-t", "60", "-l"])
            .arg(dir.path().join("template.log"))
            .arg("start"),
        "pg_ctl start",
    )?;
    let setup = run(
        Command::new(Path::new(BIN).join("psql"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c"])
            .arg("SELECT 1")
            .env("PGCONNECT_TIMEOUT", "30"),
        "psql",
    )
    .and_then(|()| {
        let script = dir.path().join("roles.sql");
        std::fs::write(&script, ROLES).unwrap();
        run(
            Command::new(Path::new(BIN).join("psql"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-f"])
                .arg(&script),
            "creating roles",
        )
    });
    let stop = run(
        as_server(Command::new(Path::new(BIN).join("pg_ctl")))
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "stop"]),
        "pg_ctl stop",
    );
    setup?;
    stop?;
    Ok((dir, data))
}
