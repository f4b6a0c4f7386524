//! How lessor treats an upstream's bytes (`protocol:`), and the settings of
//! the session it opens on a protocol upstream's connections (`redis:`,
//! `postgres:`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use serde::Deserialize;

/// How lessor treats an upstream's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque bytes: the DIRTY rule decides a RETURN.
    #[default]
    Tcp,
    /// RESP, parsed both ways: lessor authenticates, and a RETURN is honoured
    /// exactly when the session is clean.
    Redis,
    /// The PostgreSQL wire protocol (v3), parsed both ways: lessor runs the
    /// startup and authentication, never returns a session inside a
    /// transaction, and resets it before it is idle again.
    Postgres,
}

impl Protocol {
    /// The name in config, `Granted.protocol`, metrics and traces.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Redis => "redis",
            Self::Postgres => "postgres",
        }
    }
}

/// The Redis session lessor opens on each connection. Credentials never
/// appear in logs, traces, metrics, `Stats` or errors.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// ACL user (`AUTH user password`); `AUTH password` alone when absent.
    pub username: Option<String>,
    /// A file holding the password (a mounted Secret), re-read on each dial.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password, read on each dial.
    pub password_env: Option<String>,
    /// `SELECT` on connect when not 0; the db every lease starts on.
    pub db: u32,
    /// 2, or 3 (`HELLO 3` on connect).
    pub resp: u8,
    /// `CLIENT SETNAME` on connect.
    pub client_name: Option<String>,
    /// The largest bulk string accepted either way, and the largest
    /// Exchange request; a larger one ends the lease (evicted) or fails the
    /// Exchange. Default 16 MiB: an Exchange holds its request and reply in
    /// memory (README, "Memory").
    pub max_frame: ByteSize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            username: None,
            password_file: None,
            password_env: None,
            db: 0,
            resp: 2,
            client_name: None,
            max_frame: ByteSize::mib(16),
        }
    }
}

impl fmt::Debug for RedisConfig {
    /// Without the password's source contents, which it never holds anyway.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("db", &self.db)
            .field("resp", &self.resp)
            .field("client_name", &self.client_name)
            .finish()
    }
}

impl RedisConfig {
    /// The password, read now from its file or variable (`None`: no AUTH).
    /// A trailing newline in the file is not part of it.
    pub fn password(&self) -> std::io::Result<Option<String>> {
        read_password(self.password_file.as_deref(), self.password_env.as_deref())
    }
}

/// A password from a file (a mounted Secret; one trailing newline is not
/// part of it) or an environment variable, read at each dial; `None` when
/// neither is configured.
fn read_password(file: Option<&Path>, env: Option<&str>) -> std::io::Result<Option<String>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
    }
    if let Some(var) = env {
        return std::env::var(var).map(Some).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("environment variable {var} is not set"),
            )
        });
    }
    Ok(None)
}

/// What a lease (or Exchange) that leaves a transaction open does to its
/// connection before it may be idle again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOpenTransaction {
    /// `ROLLBACK`, then the reset; the connection stays pooled.
    #[default]
    Rollback,
    /// The connection is closed (`Ended.reason` DIRTY).
    Evict,
}

impl OnOpenTransaction {
    /// The name in config, for `Ended.detail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rollback => "rollback",
            Self::Evict => "evict",
        }
    }
}

/// The PostgreSQL session lessor opens on each connection. Credentials never
/// appear in logs, traces, metrics, `Stats` or errors.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// The role to log in as (required).
    pub user: String,
    /// The database; the user's name when absent (as libpq does).
    pub database: Option<String>,
    /// A file holding the password (a mounted Secret), re-read on each dial.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password, read on each dial.
    pub password_env: Option<String>,
    /// `application_name`, seen in `pg_stat_activity`. Default `lessor`.
    pub application_name: String,
    /// Further startup parameters (`search_path`, `TimeZone`, `options`...):
    /// the state every lease starts from, and the state `reset` returns to.
    pub parameters: BTreeMap<String, String>,
    /// Sent as a simple query before a used connection is idle again.
    /// Default `DISCARD ALL`; `""` keeps whatever a lease left (`SET`,
    /// prepared statements, temp tables) for the next one.
    pub reset: String,
    /// What a transaction left open at the end of a lease does.
    pub on_open_transaction: OnOpenTransaction,
    /// The largest message accepted either way, and the largest Exchange
    /// request; a larger one ends the lease (evicted) or fails the
    /// Exchange. Default 16 MiB: an Exchange holds its request and reply in
    /// memory (README, "Memory").
    pub max_frame: ByteSize,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            user: String::new(),
            database: None,
            password_file: None,
            password_env: None,
            application_name: "lessor".into(),
            parameters: BTreeMap::new(),
            reset: "DISCARD ALL".into(),
            on_open_transaction: OnOpenTransaction::Rollback,
            max_frame: ByteSize::mib(16),
        }
    }
}

impl fmt::Debug for PostgresConfig {
    /// Every field but the parameters' values, which may be anything.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("user", &self.user)
            .field("database", &self.database())
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("application_name", &self.application_name)
            .field("parameters", &self.parameters.keys().collect::<Vec<_>>())
            .field("reset", &self.reset)
            .field("on_open_transaction", &self.on_open_transaction)
            .finish()
    }
}

impl PostgresConfig {
    /// The password, read now from its file or variable (`None`: the server
    /// must not ask for one).
    pub fn password(&self) -> std::io::Result<Option<String>> {
        read_password(self.password_file.as_deref(), self.password_env.as_deref())
    }

    /// The database to connect to.
    pub fn database(&self) -> &str {
        self.database.as_deref().unwrap_or(&self.user)
    }
}
