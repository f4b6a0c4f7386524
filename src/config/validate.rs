//! Validation beyond what the types express: ranges, consistency, and the
//! path of every field in its error.

use std::net::SocketAddr;
use std::time::Duration;

use super::{
    ClientAuth, Config, ConfigError, PortRef, Protocol, Role, Source, TlsMode, UpstreamConfig,
    invalid,
};

impl Config {
    /// Checks ranges and consistency that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let frame = self.grpc.max_frame.as_u64();
        if !(1024..=64 * 1024 * 1024).contains(&frame) {
            return Err(invalid("grpc.max_frame", "must be between 1KiB and 64MiB"));
        }
        positive("grpc.acquire_timeout".into(), self.grpc.acquire_timeout)?;
        if self.grpc.max_concurrent_streams < 16 {
            return Err(invalid(
                "grpc.max_concurrent_streams",
                "must be at least 16",
            ));
        }
        if let Some(addr) = self.admin.control_listen
            && !addr.ip().to_canonical().is_loopback()
            && !self.admin.control_allow_remote
        {
            return Err(invalid(
                "admin.control_listen",
                format!(
                    "`{addr}` is not a loopback address: whoever reaches it can pause, reconnect and shut down lessor; set admin.control_allow_remote: true to allow it"
                ),
            ));
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
            // Two budgets of one group would write the same Lease, each
            // unaware of the other's connections.
            if let Some(fleet) = &up.fleet {
                let group = fleet.group_for(&up.name);
                if let Some(j) = self.upstreams[..i].iter().position(|u| {
                    u.fleet
                        .as_ref()
                        .is_some_and(|f| f.group_for(&u.name) == group)
                }) {
                    return Err(invalid(
                        format!("upstreams[{i}].fleet.group"),
                        format!(
                            "`{group}` is already the fleet group of upstreams[{j}]; give each budget a group of its own"
                        ),
                    ));
                }
            }
            let address = |u: &UpstreamConfig| u.listen.as_ref().and_then(|l| l.address);
            if let Some(addr) = address(up)
                && addr.port() != 0
                && let Some(j) = self.upstreams[..i]
                    .iter()
                    .position(|u| address(u) == Some(addr))
            {
                return Err(invalid(
                    format!("upstreams[{i}].listen.address"),
                    format!("`{addr}` is already the listener of upstreams[{j}]"),
                ));
            }
        }
        Ok(())
    }
}

impl UpstreamConfig {
    /// The `listen:` block: a protocol upstream, somewhere to listen, the
    /// protocol's own sockets and authentication, no password-less door
    /// off loopback, a readable client password.
    fn validate_listen(&self, at: &str) -> Result<(), ConfigError> {
        let Some(listen) = &self.listen else {
            return Ok(());
        };
        let at = format!("{at}.listen");
        let (engine, auth_needed) = match self.protocol {
            Protocol::Postgres => ("postgres", ClientAuth::ScramSha256),
            Protocol::Redis => ("redis", ClientAuth::Password),
            Protocol::Tcp => {
                return Err(invalid(
                    at,
                    "a native listener needs `protocol: postgres` or `protocol: redis`",
                ));
            }
        };
        // Each protocol's Unix socket is named its own way: PostgreSQL's
        // by a directory (clients find `.s.PGSQL.<port>` in it), Redis's
        // by its path.
        let (own, other, other_key, use_instead) = match self.protocol {
            Protocol::Redis => (
                listen.unix_socket.is_some(),
                listen.unix_socket_dir.is_some(),
                "unix_socket_dir",
                "unix_socket: a path",
            ),
            _ => (
                listen.unix_socket_dir.is_some(),
                listen.unix_socket.is_some(),
                "unix_socket",
                "unix_socket_dir: a directory",
            ),
        };
        if other {
            return Err(invalid(
                format!("{at}.{other_key}"),
                format!("not for `protocol: {engine}` (use {use_instead})"),
            ));
        }
        if listen.address.is_none() && !own {
            let socket = if self.protocol == Protocol::Redis {
                "unix_socket"
            } else {
                "unix_socket_dir"
            };
            return Err(invalid(
                format!("{at}.address"),
                format!("set address, {socket} or both"),
            ));
        }
        if listen.auth != ClientAuth::Trust && listen.auth != auth_needed {
            return Err(invalid(
                format!("{at}.auth"),
                format!(
                    "`protocol: {engine}` clients authenticate with trust or {}",
                    auth_name(auth_needed)
                ),
            ));
        }
        if listen.username.is_some() && self.protocol != Protocol::Redis {
            return Err(invalid(
                format!("{at}.username"),
                "only for `protocol: redis` (PostgreSQL clients connect as postgres.user)",
            ));
        }
        if listen.auth == ClientAuth::Trust
            && let Some(addr) = listen.address
            && !addr.ip().to_canonical().is_loopback()
        {
            let who = match self.protocol {
                Protocol::Postgres => format!("the database as `{}`", self.postgres.user),
                _ => "the upstream with lessor's credentials".to_owned(),
            };
            return Err(invalid(
                format!("{at}.auth"),
                format!(
                    "`trust` on `{addr}`, which is not a loopback address, would let anyone who reaches it use {who}; use {}",
                    auth_name(auth_needed)
                ),
            ));
        }
        match (listen.auth, &listen.password_file) {
            (ClientAuth::Trust, _) => {}
            (auth, None) => {
                return Err(invalid(
                    format!("{at}.password_file"),
                    format!("{} needs the password clients present", auth_name(auth)),
                ));
            }
            (_, Some(path)) => {
                password_source(&at, Some(path), None)?;
            }
        }
        if listen.max_clients == 0 {
            return Err(invalid(format!("{at}.max_clients"), "must be at least 1"));
        }
        positive(format!("{at}.startup_timeout"), listen.startup_timeout)?;
        Ok(())
    }
}

/// How `auth` is written in the config.
fn auth_name(auth: ClientAuth) -> &'static str {
    match auth {
        ClientAuth::Trust => "trust",
        ClientAuth::ScramSha256 => "scram-sha-256",
        ClientAuth::Password => "password",
    }
}

impl UpstreamConfig {
    /// The `tls:` block: consistent keys, and files that parse now (a
    /// wrong Secret mount fails at startup, not at the first dial).
    fn validate_tls(&self, at: &str) -> Result<(), ConfigError> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        let at = format!("{at}.tls");
        if !tls.enabled() {
            return Ok(());
        }
        if tls.mode == TlsMode::Require && tls.ca_file.is_some() {
            return Err(invalid(
                format!("{at}.ca_file"),
                "`mode: require` verifies nothing, so a CA would be ignored; use verify-ca or verify-full to check the server against it",
            ));
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    format!("{at}.key_file"),
                    "cert_file needs key_file",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    format!("{at}.cert_file"),
                    "key_file needs cert_file",
                ));
            }
            _ => {}
        }
        if let Some(name) = &tls.server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err(invalid(
                format!("{at}.server_name"),
                format!("`{name}` is neither a DNS name nor an IP address"),
            ));
        }
        crate::net::Tls::check(tls).map_err(|e| invalid(format!("{at}.{}", e.field), e.problem))
    }
}

/// One of `password_file` and `password_env` at most; the file must be
/// readable now (a typo in a Secret's mount path fails at startup, not at
/// the first dial).
fn password_source(
    block: &str,
    file: Option<&std::path::Path>,
    env: Option<&str>,
) -> Result<(), ConfigError> {
    if file.is_some() && env.is_some() {
        return Err(invalid(
            format!("{block}.password_file"),
            "set one of password_file and password_env",
        ));
    }
    if let Some(path) = file
        && let Err(e) = std::fs::read(path)
    {
        return Err(invalid(
            format!("{block}.password_file"),
            format!("cannot read {}: {e}", path.display()),
        ));
    }
    Ok(())
}

fn positive(field: String, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(field, "must be greater than zero"));
    }
    Ok(())
}

impl UpstreamConfig {
    /// The `redis:` block; the password file must be readable now (a typo in
    /// a Secret's mount path fails at startup, not at the first dial).
    fn validate_redis(&self, at: &str) -> Result<(), ConfigError> {
        let r = &self.redis;
        password_source(
            &format!("{at}.redis"),
            r.password_file.as_deref(),
            r.password_env.as_deref(),
        )?;
        if !(2..=3).contains(&r.resp) {
            return Err(invalid(format!("{at}.redis.resp"), "must be 2 or 3"));
        }
        if r.username.is_some() && r.password_file.is_none() && r.password_env.is_none() {
            return Err(invalid(
                format!("{at}.redis.username"),
                "needs password_file or password_env",
            ));
        }
        if let Some(name) = &r.client_name
            && (name.is_empty()
                || name.contains(|c: char| c.is_ascii_whitespace() || c.is_control()))
        {
            return Err(invalid(
                format!("{at}.redis.client_name"),
                "must be non-empty, without spaces",
            ));
        }
        if r.max_frame.as_u64() < 1024 {
            return Err(invalid(
                format!("{at}.redis.max_frame"),
                "must be at least 1KiB",
            ));
        }
        Ok(())
    }

    /// The `postgres:` block: a user, startup parameters the protocol can
    /// carry, and a readable password file.
    fn validate_postgres(&self, at: &str) -> Result<(), ConfigError> {
        let p = &self.postgres;
        let at = format!("{at}.postgres");
        password_source(&at, p.password_file.as_deref(), p.password_env.as_deref())?;
        if p.user.is_empty() {
            return Err(invalid(format!("{at}.user"), "is required"));
        }
        let no_nul = |field: String, value: &str| {
            if value.contains('\0') {
                Err(invalid(field, "must not contain NUL"))
            } else {
                Ok(())
            }
        };
        no_nul(format!("{at}.user"), &p.user)?;
        no_nul(format!("{at}.database"), p.database())?;
        no_nul(format!("{at}.application_name"), &p.application_name)?;
        no_nul(format!("{at}.reset"), &p.reset)?;
        for (name, value) in &p.parameters {
            let field = format!("{at}.parameters.{name}");
            if name.is_empty() {
                return Err(invalid(field, "a parameter needs a name"));
            }
            if matches!(
                name.as_str(),
                "user" | "database" | "application_name" | "replication"
            ) {
                return Err(invalid(
                    field,
                    "is set by its own key (user, database, application_name) or not at all (replication)",
                ));
            }
            no_nul(field.clone(), name)?;
            no_nul(field, value)?;
        }
        if p.max_frame.as_u64() < 1024 {
            return Err(invalid(format!("{at}.max_frame"), "must be at least 1KiB"));
        }
        Ok(())
    }

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
        let (dns, kube) = match &self.source {
            Source::Address(address) => {
                validate_host_port(address).map_err(|p| invalid(format!("{at}.address"), p))?;
                (None, None)
            }
            Source::Static(list) => {
                if list.is_empty() {
                    return Err(invalid(
                        format!("{at}.discovery.static"),
                        "must list at least one host:port",
                    ));
                }
                for (i, address) in list.iter().enumerate() {
                    validate_host_port(address)
                        .map_err(|p| invalid(format!("{at}.discovery.static[{i}]"), p))?;
                    if list[..i].contains(address) {
                        return Err(invalid(
                            format!("{at}.discovery.static[{i}]"),
                            format!("`{address}` is listed twice"),
                        ));
                    }
                }
                (None, None)
            }
            Source::Dns(dns) => (Some(dns), None),
            Source::Kubernetes(kube) => (None, Some(kube)),
        };
        if let Some(dns) = dns {
            if dns.name.is_empty() || dns.name.contains(':') {
                return Err(invalid(
                    format!("{at}.discovery.dns.name"),
                    "must be a host name, without a port",
                ));
            }
            if dns.port == 0 {
                return Err(invalid(
                    format!("{at}.discovery.dns.port"),
                    "must be between 1 and 65535",
                ));
            }
            positive(format!("{at}.discovery.dns.refresh"), dns.refresh)?;
        }
        if let Some(kube) = kube {
            if kube.service.is_empty() {
                return Err(invalid(
                    format!("{at}.discovery.kubernetes.service"),
                    "must not be empty",
                ));
            }
            if matches!(kube.port, PortRef::Number(0))
                || matches!(&kube.port, PortRef::Name(n) if n.is_empty())
            {
                return Err(invalid(
                    format!("{at}.discovery.kubernetes.port"),
                    "must be a port name or a number 1-65535",
                ));
            }
        }
        if self.role != Role::Any && self.protocol == Protocol::Tcp {
            return Err(invalid(
                format!("{at}.role"),
                format!(
                    "`{}` needs `protocol: redis` or `postgres`: lessor cannot ask a tcp upstream whether it is a primary",
                    self.role.as_str()
                ),
            ));
        }
        match self.protocol {
            Protocol::Tcp => {}
            Protocol::Redis => self.validate_redis(at)?,
            Protocol::Postgres => self.validate_postgres(at)?,
        }
        self.validate_listen(at)?;
        self.validate_tls(at)?;
        if self.outlier.consecutive_failures == 0 {
            return Err(invalid(
                format!("{at}.outlier.consecutive_failures"),
                "must be at least 1",
            ));
        }
        positive(
            format!("{at}.outlier.base_ejection"),
            self.outlier.base_ejection,
        )?;
        if self.outlier.max_ejection < self.outlier.base_ejection {
            return Err(invalid(
                format!("{at}.outlier.max_ejection"),
                "must not be shorter than outlier.base_ejection",
            ));
        }

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
        let keepalive = &pool.tcp_keepalive;
        positive(format!("{at}.pool.tcp_keepalive.idle"), keepalive.idle)?;
        positive(
            format!("{at}.pool.tcp_keepalive.interval"),
            keepalive.interval,
        )?;
        if !(1..=127).contains(&keepalive.probes) {
            return Err(invalid(
                format!("{at}.pool.tcp_keepalive.probes"),
                "must be between 1 and 127",
            ));
        }
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
        if self.lease.drain_timeout > Duration::from_secs(60) {
            return Err(invalid(
                format!("{at}.lease.drain_timeout"),
                "must be at most 60s (a released lease holds its connection that long)",
            ));
        }
        if let Some(fleet) = &self.fleet {
            fleet.validate(at, &self.name)?;
        }
        Ok(())
    }
}

/// Accepts `host:port` and `[v6]:port`, where host may be a DNS name.
pub(super) fn validate_host_port(s: &str) -> Result<(), String> {
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
