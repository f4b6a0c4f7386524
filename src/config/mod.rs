//! Configuration: the YAML schema, its defaults, and validation.
//!
//! Every key of the documented sample is part of the schema, even where its
//! behaviour arrives later; unknown keys are errors. Every error names the field
//! it is about (`upstreams[0].pool.max_size: must be at least 1`), so a bad
//! ConfigMap is fixed from the log line alone. Durations are humantime strings
//! (`500ms`, `5m`), sizes are byte strings (`1MiB`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration could not be used. Displays as `field: problem`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The YAML did not fit the schema (wrong type, unknown key, bad syntax).
    #[error("{field}: {message}")]
    Parse {
        /// Dotted path of the offending field (`.` for the document root).
        field: String,
        /// What serde said, with line and column when known.
        message: String,
    },
    /// The YAML fit the schema but a value is out of range or inconsistent.
    #[error("{field}: {problem}")]
    Invalid {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The gRPC API the application talks to.
    pub grpc: GrpcConfig,
    /// Probes and metrics over HTTP.
    pub admin: AdminConfig,
    /// The pools, one per upstream service.
    pub upstreams: Vec<UpstreamConfig>,
    /// How a SIGTERM drains.
    pub shutdown: ShutdownConfig,
    /// The tokio runtime.
    pub runtime: RuntimeConfig,
    /// OTLP trace export.
    pub telemetry: TelemetryConfig,
}

/// How a SIGTERM drains.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Longest wait for clients to leave before leases are revoked. Default 20s.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// After SIGTERM, how long lessor keeps accepting new clients (already
    /// not ready) before it refuses them: time for the endpoint removal to
    /// reach every client. Default 0.
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(20),
            min_delay: Duration::ZERO,
        }
    }
}

/// The tokio runtime.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads. Default 2: a sidecar must not take every core of a node.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { worker_threads: 2 }
    }
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP/gRPC, usually port 4317.
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies, usually port 4318.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// OTLP trace export; `OTEL_*` environment variables win over these.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Collector URL; empty turns export off.
    pub endpoint: String,
    /// `grpc` (default) or `http/protobuf`.
    pub protocol: OtlpProtocol,
}

/// Durations as humantime strings (`500ms`, `5m`), never bare numbers, so a
/// unit is always explicit.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(de)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}`: {e} (expected a duration such as 500ms, 2s, 5m)"
            ))
        })
    }

    /// The same for an optional duration (`warn_after`).
    pub(super) mod option {
        use std::time::Duration;

        use serde::Deserializer;

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
            de: D,
        ) -> Result<Option<Duration>, D::Error> {
            super::deserialize(de).map(Some)
        }
    }
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                "config".to_owned()
            } else {
                field
            };
            let message = e.into_inner().to_string();
            // serde_norway prefixes some messages with a path of its own (the
            // enclosing mapping); ours is complete, so drop the duplicate.
            let message = match message.split_once(": ") {
                Some((prefix, rest)) if field.starts_with(prefix) => rest.to_owned(),
                _ => message,
            };
            ConfigError::Parse { field, message }
        })?;
        config.validate()?;
        Ok(config)
    }
}

mod fleet;
mod listen;
mod pool;
mod protocol;
mod tls;
mod upstream;
mod validate;

pub(crate) use fleet::FleetConfig;
pub use listen::*;
pub(crate) use pool::*;
pub(crate) use tls::{TlsConfig, TlsMode, TlsVersion};
pub use upstream::*;

pub(crate) use protocol::{OnOpenTransaction, PostgresConfig, Protocol, RedisConfig};

#[cfg(test)]
mod tests;
