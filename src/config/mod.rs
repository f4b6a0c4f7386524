//! Configuration: the YAML schema, its defaults, and validation.
//!
//! Every key of the documented sample is part of the schema, even where its
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

/// Where the gRPC API listens and how large a frame it accepts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// `host:port` or `unix:///path`. Default `127.0.0.1:7070`: only the pod's
    /// own containers may lease.
    pub listen: ListenAddr,
    /// Largest `Data` payload a client may send in one message. Default 1 MiB.
    pub max_frame: ByteSize,
    /// How long a new Lease stream may take to send `Acquire`; then it ends
    /// with `DEADLINE_EXCEEDED`. Default 10s: every wait has a deadline.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Concurrent streams (leases, Stats, health) one client connection may
    /// have open. Default 4096: far above what a pool can serve, so it only
    /// stops a runaway client.
    pub max_concurrent_streams: u32,
    /// File mode of a `unix://` socket, in octal. Default `0660`: the pod's
    /// containers share a group, nobody else may lease.
    pub unix_socket_mode: UnixMode,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 7070))),
            max_frame: ByteSize::mib(1),
            acquire_timeout: Duration::from_secs(10),
            max_concurrent_streams: 4096,
            unix_socket_mode: UnixMode(0o660),
        }
    }
}

/// A file mode written in octal (`"0660"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixMode(pub u32);

impl<'de> Deserialize<'de> for UnixMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .map(UnixMode)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a file mode (octal, like \"0660\")"
                ))
            })
    }
}

/// Where the admin HTTP server (`/livez`, `/readyz`, `/metrics`) listens.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Default `0.0.0.0:9090`: the kubelet probes the pod IP.
    pub listen: SocketAddr,
    /// The state-changing endpoints (`/admin/pause`, `resume`, `reconnect`,
    /// `shutdown`): loopback by default (`127.0.0.1:9091`), so only the pod's
    /// own containers reach them, never the pod IP; `""` disables them.
    #[serde(deserialize_with = "optional_addr")]
    pub control_listen: Option<SocketAddr>,
    /// Whether `control_listen` may be an address other than loopback
    /// (default `false`): anyone who reaches it can pause, reconnect or shut
    /// down lessor, so off loopback it is refused unless this says so.
    pub control_allow_remote: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            control_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9091))),
            control_allow_remote: false,
        }
    }
}

/// An `ip:port`, or `""` for none.
fn optional_addr<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(de)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}`: {e} (expected ip:port, or \"\" for none)"
        ))
    })
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
pub enum ReadinessRole {
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
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(try_from = "RawUpstream")]
pub struct UpstreamConfig {
    /// What clients put in `Acquire.upstream`; also a metric label.
    pub name: String,
    /// Where the endpoints come from: `address`, or one `discovery` source.
    pub source: Source,
    /// How lessor treats the bytes: `tcp` (opaque), `redis` or `postgres`
    /// (parsed).
    pub protocol: Protocol,
    /// The Redis session lessor opens, for `protocol: redis`.
    pub redis: RedisConfig,
    /// The PostgreSQL session lessor opens, for `protocol: postgres`.
    pub postgres: PostgresConfig,
    /// Ejection of endpoints that keep failing.
    #[serde(default)]
    pub outlier: OutlierConfig,
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
    pub readiness: ReadinessRole,
}

/// Where an upstream's endpoints come from. The YAML has three keys for it
/// (`address`, `discovery.dns`, `discovery.kubernetes`); parsing turns the
/// one that is set into this, so nothing at run time checks which.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A static `host:port`; a DNS name resolves at dial time.
    Address(String),
    /// Every A/AAAA record of a name, re-resolved.
    Dns(DnsDiscovery),
    /// The EndpointSlices of a Kubernetes Service, watched.
    Kubernetes(KubernetesDiscovery),
}

impl Source {
    /// Whether endpoints come from discovery (their state is worth showing).
    pub fn is_discovered(&self) -> bool {
        !matches!(self, Self::Address(_))
    }
}

impl fmt::Display for Source {
    /// For logs and `/readyz?verbose`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(a) => f.write_str(a),
            Self::Dns(d) => write!(f, "dns {}:{}", d.name, d.port),
            Self::Kubernetes(k) => write!(
                f,
                "kubernetes service {}{} port {}",
                k.namespace
                    .as_deref()
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default(),
                k.service,
                k.port
            ),
        }
    }
}

/// An upstream as written: its source still as three optional keys.
#[derive(Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    discovery: Option<DiscoveryConfig>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    redis: Option<RedisConfig>,
    #[serde(default)]
    postgres: Option<PostgresConfig>,
    #[serde(default)]
    outlier: OutlierConfig,
    #[serde(default)]
    engine: EngineKind,
    #[serde(default)]
    pool: PoolConfig,
    #[serde(default)]
    health: HealthConfig,
    #[serde(default)]
    lease: LeaseConfig,
    #[serde(default)]
    readiness: ReadinessRole,
}

impl TryFrom<RawUpstream> for UpstreamConfig {
    type Error = String;

    fn try_from(raw: RawUpstream) -> Result<Self, String> {
        let discovery = raw.discovery.unwrap_or_default();
        let source = match (raw.address, discovery.dns, discovery.kubernetes) {
            (Some(address), None, None) => Source::Address(address),
            (None, Some(dns), None) => Source::Dns(dns),
            (None, None, Some(kube)) => Source::Kubernetes(kube),
            _ => {
                return Err(
                    "set exactly one of address, discovery.dns and discovery.kubernetes".into(),
                );
            }
        };
        if raw.redis.is_some() && raw.protocol != Protocol::Redis {
            return Err("a `redis:` block needs `protocol: redis`".into());
        }
        match (&raw.postgres, raw.protocol) {
            (Some(_), Protocol::Postgres) | (None, Protocol::Tcp | Protocol::Redis) => {}
            (Some(_), _) => return Err("a `postgres:` block needs `protocol: postgres`".into()),
            (None, Protocol::Postgres) => {
                return Err(
                    "`protocol: postgres` needs a `postgres:` block (at least `user`)".into(),
                );
            }
        }
        let mut health = raw.health;
        if health.probe.is_none() {
            // The protocol's own no-op: a PING, or an empty simple query
            // (EmptyQueryResponse, then ReadyForQuery, idle).
            let (send, expect) = match raw.protocol {
                Protocol::Tcp => ("", ""),
                Protocol::Redis => ("PING\r\n", "+PONG\r\n"),
                Protocol::Postgres => ("Q\0\0\0\x05\0", "I\0\0\0\x04Z\0\0\0\x05I"),
            };
            if !send.is_empty() {
                health.probe = Some(ProbeConfig {
                    send: send.into(),
                    expect: expect.into(),
                    timeout: default_probe_timeout(),
                });
            }
        }
        Ok(Self {
            name: raw.name,
            source,
            protocol: raw.protocol,
            redis: raw.redis.unwrap_or_default(),
            postgres: raw.postgres.unwrap_or_default(),
            outlier: raw.outlier,
            engine: raw.engine,
            pool: raw.pool,
            health,
            lease: raw.lease,
            readiness: raw.readiness,
        })
    }
}

/// The `discovery:` block as written: one of its keys is the source.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DiscoveryConfig {
    dns: Option<DnsDiscovery>,
    kubernetes: Option<KubernetesDiscovery>,
}

/// DNS discovery.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsDiscovery {
    /// The name to resolve (`redis-headless.shop.svc.cluster.local`).
    pub name: String,
    /// The port every address gets.
    pub port: u16,
    /// How often to re-resolve. Default 10s.
    #[serde(default = "default_dns_refresh", with = "humantime_serde")]
    pub refresh: Duration,
}

fn default_dns_refresh() -> Duration {
    Duration::from_secs(10)
}

/// Kubernetes EndpointSlice discovery.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesDiscovery {
    /// The Service whose slices (`kubernetes.io/service-name=SERVICE`) are watched.
    pub service: String,
    /// Its namespace; default the pod's own (`POD_NAMESPACE`, else the
    /// service account's namespace file).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The EndpointSlice port: its name (the Service port's name) or its
    /// number (the target port).
    pub port: PortRef,
}

/// A port by name or number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    /// The target port number.
    Number(u16),
    /// The port's name.
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Name(n) => write!(f, "{n}"),
        }
    }
}

/// Outlier ejection: an endpoint whose dials or probes fail
/// `consecutive_failures` times in a row gets no new connections for
/// `base_ejection`, doubling while it keeps failing, up to `max_ejection`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row that eject. Default 3.
    pub consecutive_failures: u32,
    /// First ejection. Default 10s.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection. Default 5m.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// Sizes and timeouts of one upstream's pool.
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
    /// TCP keepalive on upstream sockets: how a silently vanished upstream
    /// (a node gone, a blackholed route) is noticed without a probe.
    pub tcp_keepalive: KeepaliveConfig,
    /// `TCP_USER_TIMEOUT`: data unacknowledged for this long closes the
    /// socket, so a write into a dead peer fails in seconds, not the
    /// kernel's ~15 minutes of retransmissions. Default 30s; `0s` leaves the
    /// kernel's default.
    #[serde(with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
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
            tcp_keepalive: KeepaliveConfig::default(),
            tcp_user_timeout: Duration::from_secs(30),
        }
    }
}

/// TCP keepalive timing: a dead peer is noticed after about
/// `idle + interval * probes` of silence (default 15s + 3 x 5s = 30s).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveConfig {
    /// Silence before the first probe. Default 15s.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// Between unanswered probes. Default 5s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Unanswered probes before the socket is closed. Default 3.
    pub probes: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(15),
            interval: Duration::from_secs(5),
            probes: 3,
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
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
    /// On a protocol upstream, how long a RETURN with replies still pending
    /// may wait for them (read and discarded) before the connection is
    /// closed instead. Default 0: closed at once.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// A lease held longer than this logs one warning naming its holder
    /// and trace (leak detection). Default: off.
    #[serde(with = "humantime_serde::option")]
    pub warn_after: Option<Duration>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            max_duration: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            on_abort: OnAbort::Evict,
            drain_timeout: Duration::ZERO,
            warn_after: None,
        }
    }
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

mod protocol;
mod validate;

pub(crate) use protocol::{OnOpenTransaction, PostgresConfig, Protocol, RedisConfig};

#[cfg(test)]
mod tests;
