//! One upstream: its name, where its endpoints come from (an address, DNS
//! or Kubernetes), the pool engine behind it, and how it gates readiness.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::{
    HealthConfig, LeaseConfig, NativeListen, OutlierConfig, PoolConfig, PostgresConfig,
    ProbeConfig, Protocol, RedisConfig, TlsConfig, pool::default_probe_timeout,
};

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

/// Which endpoints of an upstream may serve it: any, or only those whose
/// server says it is the primary (takes writes) or a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every endpoint; roles are not asked (today's behaviour, no extra
    /// round trip at dial).
    #[default]
    Any,
    /// Only an endpoint that takes writes (PostgreSQL not in recovery and
    /// not read-only by default; Redis `ROLE` master).
    Primary,
    /// Only a read-only endpoint (a hot standby; a Redis replica).
    Replica,
}

impl Role {
    /// The name used in config, `Stats`, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Primary => "primary",
            Self::Replica => "replica",
        }
    }
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
    /// Which endpoints may serve leases, by their server's role. Default
    /// `any`.
    pub role: Role,
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
    /// A local listener for unmodified clients (`protocol: postgres`).
    pub listen: Option<NativeListen>,
    /// TLS towards the upstream; absent: plain TCP.
    pub tls: Option<TlsConfig>,
    /// A connection budget shared with the other sidecars of a group.
    pub fleet: Option<super::FleetConfig>,
}

impl UpstreamConfig {
    /// The `tls:` block when it turns TLS on (not `mode: disable`).
    pub fn tls_enabled(&self) -> Option<&TlsConfig> {
        self.tls.as_ref().filter(|t| t.enabled())
    }
}

/// Where an upstream's endpoints come from. The YAML has four keys for it
/// (`address`, `discovery.static`, `discovery.dns`,
/// `discovery.kubernetes`); parsing turns the one that is set into this,
/// so nothing at run time checks which.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A static `host:port`; a DNS name resolves at dial time.
    Address(String),
    /// A fixed list of `host:port` endpoints (a primary and its replicas
    /// named without DNS), each resolved at dial time.
    Static(Vec<String>),
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
            Self::Static(list) => write!(f, "static {}", list.join(", ")),
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
    role: Role,
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
    #[serde(default)]
    listen: Option<NativeListen>,
    #[serde(default)]
    tls: Option<TlsConfig>,
    #[serde(default)]
    fleet: Option<super::FleetConfig>,
}

impl TryFrom<RawUpstream> for UpstreamConfig {
    type Error = String;

    fn try_from(raw: RawUpstream) -> Result<Self, String> {
        let discovery = raw.discovery.unwrap_or_default();
        let source = match (
            raw.address,
            discovery.r#static,
            discovery.dns,
            discovery.kubernetes,
        ) {
            (Some(address), None, None, None) => Source::Address(address),
            (None, Some(list), None, None) => Source::Static(list),
            (None, None, Some(dns), None) => Source::Dns(dns),
            (None, None, None, Some(kube)) => Source::Kubernetes(kube),
            _ => {
                return Err("set exactly one of address, discovery.static, discovery.dns and discovery.kubernetes".into());
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
            role: raw.role,
            protocol: raw.protocol,
            redis: raw.redis.unwrap_or_default(),
            postgres: raw.postgres.unwrap_or_default(),
            outlier: raw.outlier,
            engine: raw.engine,
            pool: raw.pool,
            health,
            lease: raw.lease,
            readiness: raw.readiness,
            listen: raw.listen,
            tls: raw.tls,
            fleet: raw.fleet,
        })
    }
}

/// The `discovery:` block as written: one of its keys is the source.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DiscoveryConfig {
    r#static: Option<Vec<String>>,
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
    #[serde(default = "default_dns_refresh", with = "super::humantime_serde")]
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
