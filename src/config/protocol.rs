//! How lessor treats an upstream's bytes (`protocol:`), and the settings of
//! the session it opens on a protocol upstream's connections (`redis:`).

use std::fmt;
use std::path::PathBuf;

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
}

impl Protocol {
    /// The name in config, `Granted.protocol`, metrics and traces.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Redis => "redis",
        }
    }
}

/// The Redis session lessor opens on each connection. Credentials never
/// appear in logs, traces, metrics, `Stats` or errors.
#[derive(Clone, Deserialize)]
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
    /// Exchange. Default 64 MiB.
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
            max_frame: ByteSize::mib(64),
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
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
        }
        if let Some(var) = &self.password_env {
            return std::env::var(var).map(Some).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("environment variable {var} is not set"),
                )
            });
        }
        Ok(None)
    }
}
