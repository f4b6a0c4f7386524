//! Configuration: the YAML schema, its defaults, and validation.
//!
//! Every key of DESIGN.md's sample is part of the schema, even where its
//! behaviour arrives later; unknown keys are errors. Every error names the field
//! it is about (`upstreams[0].pool.max_size: must be at least 1`), so a bad
//! ConfigMap is fixed from the log line alone. Durations are humantime strings
//! (`500ms`, `5m`), sizes are byte strings (`1MiB`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer};

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

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
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

/// Where the gRPC API listens and how large a frame it accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// `host:port` or `unix:///path`. Default `127.0.0.1:7070`: only the pod's
    /// own containers may lease.
    pub listen: ListenAddr,
    /// Largest `Data` payload a client may send in one message. Default 1 MiB.
    pub max_frame: ByteSize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 7070))),
            max_frame: ByteSize::mib(1),
        }
    }
}

/// Where the admin HTTP server (`/livez`, `/readyz`, `/metrics`) listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Default `0.0.0.0:9090`: the kubelet probes the pod IP.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

/// A listening address: TCP, or a Unix domain socket shared through a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `host:port` with a literal IP.
    Tcp(SocketAddr),
    /// `unix:///run/lessor/lessor.sock`.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "`{s}`: a unix socket address needs an absolute path (unix:///run/lessor.sock)"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Self::Tcp).map_err(|_| {
            format!("`{s}`: expected ip:port (127.0.0.1:7070, [::1]:7070) or unix:///path")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let s = String::deserialize(de)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which pool implementation backs an upstream. Both behave the same at
/// lessor's boundary; the conformance suite holds them to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// bb8 0.9.
    #[default]
    Bb8,
    /// deadpool 0.13 (managed).
    Deadpool,
}

impl EngineKind {
    /// The name used in config, `Stats` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bb8 => "bb8",
            Self::Deadpool => "deadpool",
        }
    }
}

/// Whether an upstream gates the sidecar's readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// Not ready unless this upstream can serve a lease.
    #[default]
    Required,
    /// Shown in `/readyz?verbose` only.
    Optional,
}

/// What happens to a connection whose lease ends without `Release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAbort {
    /// Close it: the client may have left a request half-sent.
    #[default]
    Evict,
    /// Return it, under the same cleanliness rules as `Release{RETURN}`.
    Return,
}

/// One upstream service and its pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// What clients put in `Acquire.upstream`; also a metric label.
    pub name: String,
    /// `host:port`; a DNS name resolves at dial time.
    pub address: String,
    /// Pool implementation. Default `bb8`.
    #[serde(default)]
    pub engine: EngineKind,
    /// Sizes and timeouts of the pool.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Checks run on checkout and in the background.
    #[serde(default)]
    pub health: HealthConfig,
    /// Limits on each lease.
    #[serde(default)]
    pub lease: LeaseConfig,
    /// Whether this upstream gates readiness. Default `required`.
    #[serde(default)]
    pub readiness: Readiness,
}

/// Sizes and timeouts of one upstream's pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most connections open at once, leased or idle. Default 32.
    pub max_size: u32,
    /// Idle connections kept warm. Default 4 (or `max_size` when smaller).
    pub min_idle: Option<u32>,
    /// Bound on one dial. Default 1s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on a whole checkout (wait, checks, dials). Default 2s.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// Checkouts allowed to wait at once; more fail at once. Default 1024.
    pub max_waiters: u32,
    /// Idle connections beyond `min_idle` close after this. Default 5m.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Every connection closes after this (minus up to 10% jitter). Default 30m.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_size: 32,
            min_idle: None,
            connect_timeout: Duration::from_secs(1),
            checkout_timeout: Duration::from_secs(2),
            max_waiters: 1024,
            idle_timeout: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(1800),
        }
    }
}

impl PoolConfig {
    /// `min_idle` with its default applied.
    pub fn min_idle(&self) -> u32 {
        self.min_idle.unwrap_or(4.min(self.max_size))
    }
}

/// Health checks of one upstream's connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often idle connections are checked in the background. Default 5s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A connection used more recently than this skips the probe on checkout
    /// (the liveness peek always runs). Default 500ms.
    #[serde(with = "humantime_serde")]
    pub skip_if_used_within: Duration,
    /// An active check; none by default (the liveness peek only).
    pub probe: Option<ProbeConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            skip_if_used_within: Duration::from_millis(500),
            probe: None,
        }
    }
}

/// A send/expect probe: write `send`, read exactly `expect.len()` bytes, compare.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Bytes to write (YAML double-quoted strings take `\r\n`).
    pub send: String,
    /// Bytes the upstream must answer with, exactly.
    pub expect: String,
    /// Bound on the round trip. Default 200ms.
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_probe_timeout() -> Duration {
    Duration::from_millis(200)
}

/// Limits on each lease.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// A lease older than this is revoked (`LEASE_EXPIRED`). Default 5m.
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// A lease with no bytes either way for this long is revoked
    /// (`LEASE_IDLE`). Default 60s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// What a lease that ends without `Release` does with its connection.
    pub on_abort: OnAbort,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            max_duration: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            on_abort: OnAbort::Evict,
        }
    }
}

/// How a SIGTERM drains.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Longest wait for clients to leave before leases are revoked. Default 20s.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(20),
        }
    }
}

/// The tokio runtime.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Default, Deserialize)]
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

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(de)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}`: {e} (expected a duration such as 500ms, 2s, 5m)"
            ))
        })
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

    /// Checks ranges and consistency that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let frame = self.grpc.max_frame.as_u64();
        if !(1024..=64 * 1024 * 1024).contains(&frame) {
            return Err(invalid("grpc.max_frame", "must be between 1KiB and 64MiB"));
        }
        if !(1..=1024).contains(&self.runtime.worker_threads) {
            return Err(invalid(
                "runtime.worker_threads",
                "must be between 1 and 1024",
            ));
        }
        if self.upstreams.is_empty() {
            return Err(invalid("upstreams", "at least one upstream is required"));
        }
        for (i, up) in self.upstreams.iter().enumerate() {
            up.validate(&format!("upstreams[{i}]"))?;
            if let Some(j) = self.upstreams[..i].iter().position(|u| u.name == up.name) {
                return Err(invalid(
                    format!("upstreams[{i}].name"),
                    format!("`{}` is already the name of upstreams[{j}]", up.name),
                ));
            }
        }
        Ok(())
    }

    /// The upstream with this name.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

fn positive(field: String, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(field, "must be greater than zero"));
    }
    Ok(())
}

impl UpstreamConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(invalid(
                format!("{at}.name"),
                format!(
                    "`{}`: must be 1-63 characters of letters, digits, `-`, `_` or `.`",
                    self.name
                ),
            ));
        }
        validate_host_port(&self.address).map_err(|p| invalid(format!("{at}.address"), p))?;

        let pool = &self.pool;
        if pool.max_size == 0 {
            return Err(invalid(format!("{at}.pool.max_size"), "must be at least 1"));
        }
        if pool.max_size > 10_000 {
            return Err(invalid(
                format!("{at}.pool.max_size"),
                "must be at most 10000",
            ));
        }
        if pool.min_idle() > pool.max_size {
            return Err(invalid(
                format!("{at}.pool.min_idle"),
                format!("must not exceed pool.max_size ({})", pool.max_size),
            ));
        }
        if pool.max_waiters == 0 {
            return Err(invalid(
                format!("{at}.pool.max_waiters"),
                "must be at least 1",
            ));
        }
        positive(format!("{at}.pool.connect_timeout"), pool.connect_timeout)?;
        positive(format!("{at}.pool.checkout_timeout"), pool.checkout_timeout)?;
        positive(format!("{at}.pool.idle_timeout"), pool.idle_timeout)?;
        positive(format!("{at}.pool.max_lifetime"), pool.max_lifetime)?;
        positive(format!("{at}.health.interval"), self.health.interval)?;
        if let Some(probe) = &self.health.probe {
            if probe.send.is_empty() {
                return Err(invalid(
                    format!("{at}.health.probe.send"),
                    "must not be empty",
                ));
            }
            if probe.expect.is_empty() {
                return Err(invalid(
                    format!("{at}.health.probe.expect"),
                    "must not be empty",
                ));
            }
            if probe.expect.len() > 4096 {
                return Err(invalid(
                    format!("{at}.health.probe.expect"),
                    "must be at most 4096 bytes",
                ));
            }
            positive(format!("{at}.health.probe.timeout"), probe.timeout)?;
        }
        positive(format!("{at}.lease.max_duration"), self.lease.max_duration)?;
        positive(format!("{at}.lease.idle_timeout"), self.lease.idle_timeout)?;
        Ok(())
    }
}

/// Accepts `host:port` and `[v6]:port`, where host may be a DNS name.
fn validate_host_port(s: &str) -> Result<(), String> {
    let bad = || format!("`{s}`: expected host:port (redis:6379, 10.0.0.5:5432, [::1]:6379)");
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = !host.is_empty()
        && !host.contains(':')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if port == 0 || !host_ok {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "upstreams:\n  - name: redis\n    address: 127.0.0.1:6379\n";

    fn err(yaml: &str) -> String {
        Config::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        let up = &c.upstreams[0];
        assert_eq!(c.grpc.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.grpc.max_frame, ByteSize::mib(1));
        assert_eq!(c.admin.listen.to_string(), "0.0.0.0:9090");
        assert_eq!(up.engine, EngineKind::Bb8);
        assert_eq!(up.pool.max_size, 32);
        assert_eq!(up.pool.min_idle(), 4);
        assert_eq!(up.pool.checkout_timeout, Duration::from_secs(2));
        assert_eq!(up.pool.max_waiters, 1024);
        assert_eq!(up.health.interval, Duration::from_secs(5));
        assert!(up.health.probe.is_none());
        assert_eq!(up.lease.on_abort, OnAbort::Evict);
        assert_eq!(up.readiness, Readiness::Required);
        assert_eq!(c.shutdown.grace, Duration::from_secs(20));
        assert_eq!(c.runtime.worker_threads, 2);
        assert_eq!(c.telemetry.protocol, OtlpProtocol::Grpc);
    }

    #[test]
    fn design_sample_parses() {
        let yaml = r#"
grpc:   { listen: "127.0.0.1:7070", max_frame: 1MiB }
admin:  { listen: "0.0.0.0:9090" }
upstreams:
  - name: redis
    address: "127.0.0.1:6379"
    engine: bb8
    pool:   { max_size: 32, min_idle: 4, connect_timeout: 1s, checkout_timeout: 2s,
              max_waiters: 1024, idle_timeout: 5m, max_lifetime: 30m }
    health: { interval: 5s, skip_if_used_within: 500ms,
              probe: { send: "PING\r\n", expect: "+PONG\r\n", timeout: 200ms } }
    lease:  { max_duration: 5m, idle_timeout: 60s, on_abort: evict }
    readiness: required
shutdown: { grace: 20s }
runtime:  { worker_threads: 2 }
telemetry: { endpoint: "", protocol: grpc }
"#;
        let c = Config::from_yaml(yaml).unwrap();
        let probe = c.upstreams[0].health.probe.as_ref().unwrap();
        assert_eq!(probe.send, "PING\r\n");
        assert_eq!(probe.expect, "+PONG\r\n");
        assert_eq!(c.upstreams[0].pool.idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn small_pool_clamps_default_min_idle() {
        let c = Config::from_yaml(&format!("{MINIMAL}    pool: {{ max_size: 2 }}\n")).unwrap();
        assert_eq!(c.upstreams[0].pool.min_idle(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "    pool: { max_size: 0 }\n",
                "upstreams[0].pool.max_size: must be at least 1",
            ),
            (
                "    pool: { max_size: 2, min_idle: 3 }\n",
                "upstreams[0].pool.min_idle: must not exceed",
            ),
            (
                "    pool: { max_size: -1 }\n",
                "upstreams[0].pool.max_size: ",
            ),
            (
                "    pool: { checkout_timeout: 2 }\n",
                "upstreams[0].pool.checkout_timeout: ",
            ),
            (
                "    pool: { checkout_timeout: 2 parsecs }\n",
                "upstreams[0].pool.checkout_timeout: `2 parsecs`",
            ),
            (
                "    pool: { checkout_timeout: 0s }\n",
                "must be greater than zero",
            ),
            (
                "    engine: r2d2\n",
                "upstreams[0].engine: unknown variant `r2d2`",
            ),
            (
                "    lease: { on_abort: keep }\n",
                "upstreams[0].lease.on_abort",
            ),
            ("    readiness: maybe\n", "upstreams[0].readiness"),
            ("    colour: blue\n", "unknown field `colour`"),
            (
                "    pool: { maxsize: 3 }\n",
                "upstreams[0].pool.maxsize: unknown field `maxsize`",
            ),
            (
                "    health: { probe: { send: \"\", expect: x } }\n",
                "upstreams[0].health.probe.send: must not be empty",
            ),
        ];
        for (extra, want) in cases {
            let got = err(&format!("{MINIMAL}{extra}"));
            assert!(
                got.contains(want),
                "for {extra:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn top_level_errors_name_the_field() {
        let cases = [
            ("{}", "upstreams: at least one upstream is required"),
            ("grpc: { listen: nowhere }\n", "grpc.listen: `nowhere`"),
            ("grpc: { listen: \"unix://rel.sock\" }\n", "absolute path"),
            (
                "grpc: { max_frame: 10 }\n",
                "grpc.max_frame: must be between",
            ),
            ("admin: { listen: 9090 }\n", "admin.listen"),
            ("runtime: { worker_threads: 0 }\n", "runtime.worker_threads"),
            ("telemetry: { protocol: thrift }\n", "telemetry.protocol"),
            ("bogus: 1\n", "unknown field `bogus`"),
            ("upstreams:\n  - name: a\n", "missing field `address`"),
            (
                "upstreams:\n  - name: \"a b\"\n    address: x:1\n",
                "upstreams[0].name",
            ),
            (
                "upstreams:\n  - name: a\n    address: nohost\n",
                "upstreams[0].address",
            ),
            (
                "upstreams:\n  - name: a\n    address: h:0\n",
                "upstreams[0].address",
            ),
            (
                "upstreams:\n  - { name: a, address: 'h:1' }\n  - { name: a, address: 'h:2' }\n",
                "upstreams[1].name: `a` is already the name of upstreams[0]",
            ),
            ("upstreams: [", "upstreams: did not find expected node"),
            ("- 1\n", "config: invalid type: sequence"),
        ];
        for (yaml, want) in cases {
            let got = err(yaml);
            assert!(
                got.contains(want),
                "for {yaml:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn listen_addresses() {
        let c = Config::from_yaml(&format!(
            "grpc: {{ listen: \"unix:///run/lessor/l.sock\" }}\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.grpc.listen,
            ListenAddr::Unix(PathBuf::from("/run/lessor/l.sock"))
        );
        assert_eq!(c.grpc.listen.to_string(), "unix:///run/lessor/l.sock");
        for ok in ["redis:6379", "10.0.0.1:5432", "[::1]:6379", "a.b-c_d.svc:1"] {
            assert!(validate_host_port(ok).is_ok(), "{ok}");
        }
        for bad in [
            "redis",
            ":6379",
            "redis:",
            "redis:70000",
            "::1:6379",
            "a b:1",
        ] {
            assert!(validate_host_port(bad).is_err(), "{bad}");
        }
    }
}
