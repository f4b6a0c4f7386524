//! Where lessor listens: the gRPC API (TCP or a Unix socket) and the admin
//! server.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer};

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
    #[serde(with = "super::humantime_serde")]
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

/// A local listener for unmodified clients of a protocol upstream (the
/// native door): PostgreSQL drivers, `psql` and `pgbench` (or Redis
/// clients, `redis-cli` and `redis-benchmark`) connect to it as to a
/// server, and lessor pools them over the upstream's connections.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NativeListen {
    /// A TCP address (`127.0.0.1:6432`); `""` for none.
    #[serde(deserialize_with = "optional_addr")]
    pub address: Option<SocketAddr>,
    /// PostgreSQL: a directory where lessor creates the socket
    /// `.s.PGSQL.<port>` (`psql -h DIR -p PORT` finds it); the port is the
    /// TCP address's, or 5432 without one.
    pub unix_socket_dir: Option<PathBuf>,
    /// Redis: the Unix socket's path (`redis-cli -s PATH`).
    pub unix_socket: Option<PathBuf>,
    /// The Unix socket's file mode. Default `0660`.
    pub unix_socket_mode: UnixMode,
    /// When a client's hold on a server connection ends. Default
    /// `transaction` (for Redis: each pipeline of commands).
    pub pool_mode: PoolMode,
    /// How clients authenticate to lessor. Default `trust` (loopback only).
    pub auth: ClientAuth,
    /// The password clients must present (`scram-sha-256`, `password`),
    /// read at start.
    pub password_file: Option<PathBuf>,
    /// Redis: an `AUTH` username accepted besides `default`.
    pub username: Option<String>,
    /// Clients connected at once; one more is refused (PostgreSQL FATAL
    /// 53300, Redis `-ERR max number of clients reached`). Default 1000.
    pub max_clients: u32,
    /// How long a new client has to finish its startup. Default 10s.
    #[serde(with = "super::humantime_serde")]
    pub startup_timeout: Duration,
}

impl Default for NativeListen {
    fn default() -> Self {
        Self {
            address: None,
            unix_socket_dir: None,
            unix_socket: None,
            unix_socket_mode: UnixMode(0o660),
            pool_mode: PoolMode::Transaction,
            auth: ClientAuth::Trust,
            password_file: None,
            username: None,
            max_clients: 1000,
            startup_timeout: Duration::from_secs(10),
        }
    }
}

impl NativeListen {
    /// The port of the Unix socket's name.
    pub fn unix_port(&self) -> u16 {
        self.address.map_or(5432, |a| a.port())
    }
}

/// When a client's hold on a server connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// At the ReadyForQuery `I` that leaves nothing of the client's
    /// outstanding: many clients share few connections.
    #[default]
    Transaction,
    /// When the client disconnects.
    Session,
}

/// How clients of a native listener authenticate to lessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum ClientAuth {
    /// No password: refused off loopback.
    #[default]
    #[serde(rename = "trust")]
    Trust,
    /// SCRAM-SHA-256 against `password_file` (PostgreSQL).
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// `AUTH [username] password` against `password_file` (Redis).
    #[serde(rename = "password")]
    Password,
}
