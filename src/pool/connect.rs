//! Dialing upstream connections: endpoint choice, resolution, connect
//! timeout, socket options, and per-endpoint backoff so a dead upstream (or a
//! dead pod behind it) cannot cause a dial storm.
//!
//! The endpoint comes from the upstream's [`EndpointSet`]: the ready one with
//! the fewest connections, skipping ejected and backing-off endpoints. After
//! a failed dial an endpoint backs off (25ms doubling to 1s) and the dials it
//! would have taken go elsewhere, or fail at once with
//! [`DialError::Backoff`] when no endpoint is left; one dial passes when the
//! backoff ends and its success resets it. Every failure bumps a `watch`
//! generation so checkouts waiting on an engine that hides dial errors (bb8)
//! can fail fast.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::net::{Handshake, Stream, Tls, TlsError};

use super::conn::Conn;
use super::stats::Counters;
use crate::config::{KeepaliveConfig, PoolConfig, Role};
use crate::discovery::{Endpoint, EndpointRef, EndpointSet, NoEndpoint, role_fits};
use crate::protocol::postgres::Backend;
use crate::protocol::role::ServerRole;
use crate::protocol::{OpenError, Opener};

/// Why a dial produced no connection.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum DialError {
    /// The host name did not resolve.
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        /// The `host:port` dialed.
        address: String,
        /// What the resolver said (shared: a dial error is kept and cloned).
        source: Arc<io::Error>,
    },
    /// Every resolved address refused or failed.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// What the OS said.
        source: Arc<io::Error>,
    },
    /// The socket options (keepalive, user timeout) could not be set.
    #[error("setting socket options on {addr}: {source}")]
    Tune {
        /// The connected address.
        addr: SocketAddr,
        /// What the OS said.
        source: Arc<io::Error>,
    },
    /// No address answered within `connect_timeout`.
    #[error("connect to {address} timed out after {after:?}")]
    Timeout {
        /// The `host:port` dialed.
        address: String,
        /// The configured `connect_timeout`.
        after: Duration,
    },
    /// Recent dials failed and every endpoint is backing off; nothing was sent.
    #[error("upstream unreachable, not redialing for {retry_in:?} (last dial: {last})")]
    Backoff {
        /// Time until the first endpoint reopens.
        retry_in: Duration,
        /// The failure that started the backoff.
        last: String,
    },
    /// The connection opened, but its session did not (a wrong password).
    #[error("{source} (at {addr})")]
    Open {
        /// The connected address.
        addr: SocketAddr,
        /// What the handshake said.
        source: OpenError,
    },
    /// Discovery knows no endpoint that may take connections.
    #[error("no ready endpoint ({0})")]
    NoEndpoints(String),
    /// The fleet budget's cap is reached: nothing was dialed (not a
    /// failure of the upstream; never counted as one).
    #[error("at the fleet cap")]
    FleetCap,
    /// TLS could not be set up: refused, untrusted, wrong name, expired, a
    /// client certificate demanded (the error says which).
    #[error("TLS to {addr}: {source}")]
    Tls {
        /// The connected address.
        addr: SocketAddr,
        /// What went wrong, classified.
        source: TlsError,
    },
}

/// The `reason` label values of `lessor_connect_errors_total`, in the order
/// of `Counters::connect_error_reasons`.
pub(crate) const CONNECT_ERROR_REASONS: [&str; 12] = [
    "resolve",
    "connect",
    "socket",
    "timeout",
    "open",
    "tls_refused",
    "tls_untrusted",
    "tls_name_mismatch",
    "tls_expired",
    "tls_client_cert_required",
    "tls_client_cert_rejected",
    "tls_handshake",
];

impl DialError {
    /// The endpoint did not answer at all (refused, unresolvable, silent):
    /// what it said before, its role included, is stale.
    pub(crate) fn unreachable(&self) -> bool {
        matches!(
            self,
            Self::Resolve { .. } | Self::Connect { .. } | Self::Timeout { .. }
        )
    }

    /// Its `reason` label (one of [`CONNECT_ERROR_REASONS`]).
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Resolve { .. } => "resolve",
            Self::Connect { .. } => "connect",
            Self::Tune { .. } => "socket",
            Self::Timeout { .. } | Self::Backoff { .. } | Self::NoEndpoints(_) | Self::FleetCap => {
                "timeout"
            }
            Self::Open { .. } => "open",
            Self::Tls { source, .. } => source.failure.reason(),
        }
    }
}

/// Dials one upstream. Shared by the engine adapters and the maintenance loop.
#[derive(Debug)]
pub(crate) struct Dialer {
    endpoints: Arc<EndpointSet>,
    connect_timeout: Duration,
    max_lifetime: Duration,
    keepalive: KeepaliveConfig,
    user_timeout: Duration,
    next_id: Arc<AtomicU64>,
    counters: Arc<Counters>,
    /// The most recent dial that reached the network: `(ok, error)`.
    last: Mutex<(Option<bool>, Option<String>)>,
    /// Bumped on every failed dial; checkouts subscribe to fail fast.
    failures: watch::Sender<u64>,
    /// The session handshake of a protocol upstream.
    opener: Opener,
    /// Raised when the last dial's outcome flips.
    ready_signal: super::ReadySignal,
    /// Dials on the network now. Engines do not count a connection until its
    /// dial ends, so the `min_idle` refill needs this not to overshoot.
    in_flight: AtomicU32,
    /// TLS towards the upstream, when configured.
    tls: Option<Arc<Tls>>,
    /// The fleet budget's cap: every dial takes a slot under it first.
    fleet: Option<Arc<crate::fleet::FleetCap>>,
}

impl Dialer {
    /// `next_id` is shared by every pool of the process, so connection ids are
    /// unique across upstreams.
    pub(crate) fn new(
        endpoints: Arc<EndpointSet>,
        pool: &PoolConfig,
        next_id: Arc<AtomicU64>,
        counters: Arc<Counters>,
        ready_signal: super::ReadySignal,
        opener: Opener,
        tls: Option<Arc<Tls>>,
    ) -> Self {
        Self {
            endpoints,
            connect_timeout: pool.connect_timeout,
            max_lifetime: pool.max_lifetime,
            keepalive: pool.tcp_keepalive.clone(),
            user_timeout: pool.tcp_user_timeout,
            next_id,
            counters,
            last: Mutex::new((None, None)),
            failures: watch::Sender::new(0),
            ready_signal,
            opener,
            in_flight: AtomicU32::new(0),
            tls,
            fleet: None,
        }
    }

    /// Puts every dial under the fleet budget's cap.
    pub(crate) fn with_fleet_cap(mut self, fleet: Option<Arc<crate::fleet::FleetCap>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// The upstream's TLS client, when it has one.
    pub(crate) fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.as_ref()
    }

    /// The endpoints this dialer picks from.
    pub(crate) fn endpoints(&self) -> &Arc<EndpointSet> {
        &self.endpoints
    }

    /// A receiver whose `changed()` fires on the next failed dial.
    pub(crate) fn subscribe_failures(&self) -> watch::Receiver<u64> {
        self.failures.subscribe()
    }

    fn last(&self) -> std::sync::MutexGuard<'_, (Option<bool>, Option<String>)> {
        // A poisoned lock only means a panic elsewhere mid-assignment; the
        // values are still usable.
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recent failure, for error details.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last().1.clone()
    }

    /// `Some(true)` when the last dial that reached the network succeeded.
    pub(crate) fn last_dial_ok(&self) -> Option<bool> {
        self.last().0
    }

    /// Dials under way right now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Dials once: picks an endpoint, connects, counts. On an upstream that
    /// wants a role, a server of another role is recorded as such and the
    /// next endpoint is tried (each at most once: a retired one is not
    /// chosen again).
    pub(crate) async fn dial(&self) -> Result<Conn, DialError> {
        // The slot first: the dial itself counts against the fleet budget.
        let mut slot = match &self.fleet {
            Some(fleet) => Some(fleet.try_acquire().ok_or(DialError::FleetCap)?),
            None => None,
        };
        loop {
            if let Some(dialed) = self.dial_once(&mut slot).await {
                return dialed;
            }
        }
    }

    /// One endpoint's dial, holding `slot` (the connection takes it);
    /// `None`: its server has the wrong role, and the slot is kept.
    async fn dial_once(
        &self,
        slot: &mut Option<crate::fleet::CapSlot>,
    ) -> Option<Result<Conn, DialError>> {
        let dialing = match self.endpoints.choose() {
            Ok(d) => d,
            Err(no) => {
                let err = match no {
                    NoEndpoint::NoneReady => DialError::NoEndpoints(self.no_endpoint_detail()),
                    NoEndpoint::Backoff { retry_in, last } => DialError::Backoff { retry_in, last },
                };
                self.failures.send_modify(|g| *g += 1);
                return Some(Err(err));
            }
        };
        let endpoint = dialing.endpoint().clone();
        let connected = {
            // A guard, not a pair of calls: deadpool cancels dials mid-way
            // when a checkout's deadline passes.
            let _dialing = InFlight::enter(&self.in_flight);
            self.connect(endpoint.target(), self.endpoints.wanted() != Role::Any)
                .await
        };
        drop(dialing);
        Some(match connected {
            Ok((stream, addr, backend, role)) => {
                endpoint.record_success();
                if let Some(role) = role {
                    self.endpoints.observe_role(&endpoint, role);
                    if !role_fits(self.endpoints.wanted(), role) {
                        // Closed unused: the server answered, so this is no
                        // dial failure; the endpoint is retired until a
                        // role check finds it changed.
                        return None;
                    }
                }
                let was = std::mem::replace(&mut *self.last(), (Some(true), None)).0;
                if was != Some(true) {
                    self.ready_signal.send_replace(());
                }
                self.counters
                    .connections_created
                    .fetch_add(1, Ordering::Relaxed);
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let mut conn = Conn::new(
                    stream,
                    id,
                    addr,
                    self.max_lifetime,
                    EndpointRef::new(endpoint),
                );
                conn.backend = backend.map(Box::new);
                conn.cap_slot = slot.take();
                Ok(conn)
            }
            Err(err) => {
                let message = err.to_string();
                if err.unreachable() {
                    self.endpoints.forget_role(&endpoint);
                }
                if endpoint.record_failure(&message, self.endpoints.outlier(), true) {
                    tracing::warn!(endpoint = %endpoint.target(), error = %message, "endpoint ejected after repeated failures");
                }
                let was = std::mem::replace(&mut *self.last(), (Some(false), Some(message))).0;
                if was != Some(false) {
                    self.ready_signal.send_replace(());
                }
                self.counters.connect_error(err.reason());
                if matches!(err, DialError::Tls { .. }) {
                    // TLS failures are configuration or certificate problems
                    // someone must fix: worth a warning, not a debug line.
                    tracing::warn!(endpoint = %endpoint.target(), reason = err.reason(), error = %err, "TLS dial failed");
                }
                self.failures.send_modify(|g| *g += 1);
                tracing::debug!(endpoint = %endpoint.target(), error = %err, "dial failed");
                Err(err)
            }
        })
    }

    /// Why no endpoint may be dialed: the source's state, and for an
    /// upstream that wants a role, what each endpoint's server last said.
    fn no_endpoint_detail(&self) -> String {
        let detail = self.endpoints.status().detail;
        let wanted = self.endpoints.wanted();
        if wanted == Role::Any {
            return detail;
        }
        let roles: Vec<String> = self
            .endpoints
            .snapshot()
            .into_iter()
            .map(|e| {
                let role = e.role.map_or("role unknown", ServerRole::as_str);
                format!("{} {role}", e.target)
            })
            .collect();
        format!(
            "no endpoint is a {}: {} ({detail})",
            wanted.as_str(),
            roles.join(", ")
        )
    }

    /// Asks `endpoint`'s server for its role over a connection of its own,
    /// closed after: for endpoints the pool holds no connection to (a
    /// replica that may have been promoted). Counted nowhere but the
    /// endpoint's role.
    pub(crate) async fn probe_role(&self, endpoint: &Endpoint) -> Result<ServerRole, DialError> {
        let (_, addr, _, role) = self.connect(endpoint.target(), true).await?;
        role.ok_or_else(|| DialError::Open {
            addr,
            source: OpenError::Io("a tcp upstream has no role".into()),
        })
    }

    /// The session opener, for asking an idle connection's role.
    pub(crate) fn opener(&self) -> &Opener {
        &self.opener
    }

    /// PostgreSQL's SSLRequest where the protocol has one, then the TLS
    /// handshake.
    async fn secure(
        &self,
        tls: &Tls,
        mut tcp: TcpStream,
        addr: SocketAddr,
        name: &str,
    ) -> Result<(Stream, Handshake), DialError> {
        if matches!(self.opener, Opener::Postgres(_)) {
            let accepted = crate::protocol::postgres::handshake::request_tls(&mut tcp)
                .await
                .map_err(|e| DialError::Open {
                    addr,
                    source: OpenError::Io(format!("SSLRequest: {e}")),
                })?;
            if !accepted {
                return Err(DialError::Tls {
                    addr,
                    source: tls.refused(name),
                });
            }
        }
        tls.handshake(tcp, name)
            .await
            .map_err(|source| DialError::Tls { addr, source })
    }

    /// Connects and opens the session; with `ask_role`, learns the
    /// server's role too, inside the same `connect_timeout`.
    async fn connect(
        &self,
        address: &str,
        ask_role: bool,
    ) -> Result<(Stream, SocketAddr, Option<Backend>, Option<ServerRole>), DialError> {
        let attempt = async {
            let addrs = tokio::net::lookup_host(address)
                .await
                .map_err(|e| DialError::Resolve {
                    address: address.to_owned(),
                    source: Arc::new(e),
                })?;
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok((stream, addr)),
                    Err(e) => last = Some((addr, e)),
                }
            }
            Err(match last {
                Some((addr, e)) => DialError::Connect {
                    addr,
                    source: Arc::new(e),
                },
                None => DialError::Resolve {
                    address: address.to_owned(),
                    source: Arc::new(io::Error::new(io::ErrorKind::NotFound, "no addresses")),
                },
            })
        };
        let opened = async {
            let (stream, addr) = attempt.await?;
            self.tune(&stream).map_err(|e| DialError::Tune {
                addr,
                source: Arc::new(e),
            })?;
            let Some(tls) = &self.tls else {
                let mut stream = Stream::Plain(stream);
                let backend = self
                    .opener
                    .open(&mut stream, false)
                    .await
                    .map_err(|source| DialError::Open { addr, source })?;
                return Ok((stream, addr, backend));
            };
            let name = tls.server_name(address, addr.ip());
            let (mut stream, handshake) = self.secure(tls, stream, addr, &name).await?;
            let backend = self
                .opener
                .open(&mut stream, handshake.confirm())
                .await
                .map_err(|source| {
                    let (detail, transport) = match &source {
                        OpenError::Io(detail) => (detail.clone(), true),
                        other => (other.to_string(), false),
                    };
                    match tls.after_handshake(handshake, &name, &detail, transport) {
                        Some(source) => DialError::Tls { addr, source },
                        None => DialError::Open { addr, source },
                    }
                })?;
            Ok((stream, addr, backend))
        };
        let opened = async {
            let (mut stream, addr, backend) = opened.await?;
            let role = if ask_role {
                self.opener
                    .learn_role(&mut stream, backend.as_ref())
                    .await
                    .map_err(|source| DialError::Open { addr, source })?
            } else {
                None
            };
            Ok((stream, addr, backend, role))
        };
        tokio::time::timeout(self.connect_timeout, opened)
            .await
            .map_err(|_| DialError::Timeout {
                address: address.to_owned(),
                after: self.connect_timeout,
            })?
    }
}

/// Counts one dial for as long as it exists.
struct InFlight<'a>(&'a AtomicU32);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Dialer {
    /// TCP_NODELAY (leases carry small request/response messages), keepalive
    /// (a silently vanished upstream is noticed even on an idle socket) and
    /// `TCP_USER_TIMEOUT` (a write into a vanished upstream fails in seconds).
    fn tune(&self, stream: &TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        let k = &self.keepalive;
        let keepalive = TcpKeepalive::new()
            .with_time(k.idle)
            .with_interval(k.interval)
            .with_retries(k.probes);
        let socket = SockRef::from(stream);
        socket.set_tcp_keepalive(&keepalive)?;
        if !self.user_timeout.is_zero() {
            socket.set_tcp_user_timeout(Some(self.user_timeout))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::CONNECT_ERROR_REASONS;
    use crate::net::TlsFailure;

    #[test]
    fn every_tls_failure_has_a_metric_label() {
        for f in TlsFailure::ALL {
            assert!(CONNECT_ERROR_REASONS.contains(&f.reason()), "{f:?}");
        }
    }
}
