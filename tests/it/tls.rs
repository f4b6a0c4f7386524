//! Upstream TLS against real servers: a redis-server on `--tls-port` only
//! (with and without `--tls-auth-clients yes`) and PostgreSQL 15 with
//! `ssl=on` and `hostssl`-only rules (`clientcert=verify-full` for mutual
//! TLS), with certificates made per test. Leases, Exchange, probes and
//! CancelRequests work over TLS; each failure (untrusted, wrong name,
//! expired, client certificate demanded, TLS refused) is a dial error that
//! says which; `require` accepts what `verify-full` refuses; the CA and the
//! client certificate rotate under running leases.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use lessor::EngineKind;
use lessor_client::pb::{Disposition, UpstreamStats};
use lessor_client::{Client, ClientError};
use tonic::Code;

use crate::for_both_engines;
use crate::pg::{Reply, parse_reply, query, query_message};
use crate::support::http::fetch;
use crate::support::postgres::{Postgres, write_private};
use crate::support::tls::{Ca, Pair, RedisFiles, TlsRedis, client_config, unix, write};
use crate::support::{Lessor, PATIENCE, config_one, eventually, upstream_yaml};

for_both_engines!(
    tls_redis_leases_exchange_and_probes_over_mutual_tls,
    tls_postgres_leases_exchange_probes_and_cancel_over_tls,
);

/// When the tests' client certificates expire.
const CLIENT_UNTIL: (i32, u8, u8) = (2031, 6, 1);
/// Probes run often, so a few pass within a test.
const HEALTH: &str = "health: { interval: 200ms, skip_if_used_within: 0s }";
const POOL: &str = "pool: { max_size: 4, min_idle: 1, connect_timeout: 5s, checkout_timeout: 5s }";

/// A `tls:` block: the CA file and, optionally, a client pair, written to
/// `dir`.
fn tls_block(dir: &std::path::Path, ca: &str, client: Option<&Pair>, extra: &str) -> String {
    let ca = write(dir, &format!("ca-{}.crt", fastrand::u64(..)), ca);
    let mut block = format!("tls: {{ ca_file: \"{}\"", ca.display());
    if let Some(pair) = client {
        let n = fastrand::u64(..);
        let cert = write(dir, &format!("client-{n}.crt"), &pair.cert);
        let key = write(dir, &format!("client-{n}.key"), &pair.key);
        block.push_str(&format!(
            ", cert_file: \"{}\", key_file: \"{}\"",
            cert.display(),
            key.display()
        ));
    }
    block.push_str(extra);
    block.push_str(" }");
    block
}

/// The value of one sample of `/metrics` whose labels include `labels`.
fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn metrics(lessor: &Lessor) -> String {
    fetch(&lessor.admin, "/metrics", None).await.unwrap().body
}

async fn readyz(lessor: &Lessor) -> String {
    fetch(&lessor.admin, "/readyz?verbose", None)
        .await
        .unwrap()
        .body
}

async fn stats_of(lessor: &Lessor, name: &str) -> UpstreamStats {
    let mut all = lessor.client.stats(name).await.expect("stats");
    all.remove(0)
}

/// Waits until `name` has run `n` more checks than now, none failing.
async fn probes_pass(lessor: &Lessor, name: &str, n: u64) {
    let before = stats_of(lessor, name).await.health_checks;
    eventually("probes over TLS", || async {
        let s = stats_of(lessor, name).await;
        assert_eq!(s.health_check_failures, 0, "{s:#?}");
        s.health_checks >= before + n
    })
    .await;
}

async fn redis_exchange(client: &Client, upstream: &str, request: &str) -> String {
    let reply = client
        .exchange(upstream, request.to_owned(), None)
        .await
        .unwrap_or_else(|e| panic!("exchange on {upstream}: {e}"));
    String::from_utf8_lossy(&reply.reply).into_owned()
}

async fn tls_redis_leases_exchange_and_probes_over_mutual_tls(engine: EngineKind) {
    let ca = Ca::new("lessor test CA");
    let client = ca.client("lessor", CLIENT_UNTIL);
    let files = RedisFiles {
        server: ca.server(&["127.0.0.1", "localhost"]),
        client_cas: ca.pem(),
        auth_clients: true,
    };
    let admin = client_config(&ca.pem(), Some(&client));
    let Some(redis) = TlsRedis::start(&files, admin).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_block(dir.path(), &ca.pem(), Some(&client), "");
    let lessor = Lessor::start(&config_one(
        &redis.addr(),
        engine,
        &["protocol: redis", &tls, POOL, HEALTH],
    ))
    .await;

    let mut lease = lessor.lease().await.unwrap();
    lease.send("PING\r\n").await.unwrap();
    assert_eq!(&lease.recv_at_least(7).await.unwrap()[..], b"+PONG\r\n");
    lease.release(Disposition::Return).await.unwrap();
    assert_eq!(
        redis_exchange(&lessor.client, "up", "SET k v\r\nGET k\r\n").await,
        "+OK\r\n$1\r\nv\r\n"
    );
    probes_pass(&lessor, "up", 4).await;

    let s = lessor.stats("up").await;
    let tls = s.tls.as_ref().expect("Stats shows TLS");
    assert_eq!(tls.mode, "verify-full");
    assert_eq!(tls.server_name, "127.0.0.1");
    assert_eq!(tls.client_cert_not_after_unix, unix(CLIENT_UNTIL));
    assert_eq!(s.connect_errors, 0, "{s:#?}");
    let verbose = readyz(&lessor).await;
    assert!(
        verbose.contains("tls verify-full, client certificate expires 2031-06-01T00:00:00Z"),
        "{verbose}"
    );
    let body = metrics(&lessor).await;
    assert_eq!(
        metric(
            &body,
            "lessor_tls_cert_expiry_timestamp_seconds",
            &[("upstream", "up")]
        ),
        Some(unix(CLIENT_UNTIL) as f64),
        "{body}"
    );
    lessor.assert_accounted().await;
}

/// PostgreSQL with TLS on: `scramuser` may log in over TLS only,
/// `trustuser` over TLS with a client certificate for its name only; the
/// superuser (the tests' own checks) in plain TCP.
async fn tls_postgres(ca: &Ca) -> Option<Postgres> {
    let server = ca.server(&["127.0.0.1", "localhost"]);
    let ca_pem = ca.pem();
    Postgres::start_prepared(
        &[
            "ssl = on",
            "ssl_cert_file = 'server.crt'",
            "ssl_key_file = 'server.key'",
            "ssl_ca_file = 'ca.crt'",
        ],
        move |data| {
            write_private(data, "server.crt", server.cert.as_bytes());
            write_private(data, "server.key", server.key.as_bytes());
            write_private(data, "ca.crt", ca_pem.as_bytes());
            std::fs::write(
                data.join("pg_hba.conf"),
                "host all postgres 127.0.0.1/32 trust\n\
                 hostssl all scramuser 127.0.0.1/32 scram-sha-256\n\
                 hostssl all trustuser 127.0.0.1/32 trust clientcert=verify-full\n",
            )
            .unwrap();
        },
    )
    .await
}

fn pg_block(dir: &std::path::Path, user: &str, password: Option<&str>) -> String {
    let mut block = format!("postgres: {{ user: {user}, database: app");
    if let Some(password) = password {
        let file = write(dir, &format!("{user}.password"), password);
        block.push_str(&format!(", password_file: \"{}\"", file.display()));
    }
    block.push_str(" }");
    block
}

async fn pg_exchange(client: &Client, upstream: &str, sql: &str) -> Reply {
    let r = client
        .exchange(upstream, query_message(sql), None)
        .await
        .unwrap_or_else(|e| panic!("exchange on {upstream}: {e}"));
    let mut buf = BytesMut::from(&r.reply[..]);
    let mut reply = Reply::default();
    assert!(parse_reply(&mut buf, &mut reply), "ends with ReadyForQuery");
    reply
}

const SSL_IN_USE: &str = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

async fn tls_postgres_leases_exchange_probes_and_cancel_over_tls(engine: EngineKind) {
    let ca = Ca::new("lessor test CA");
    let Some(pg) = tls_postgres(&ca).await else {
        return;
    };
    // In plain TCP the server refuses the user: only TLS gets in.
    let mut plain = tokio_postgres::Config::new();
    plain
        .host("127.0.0.1")
        .port(crate::support::port_of(&pg.addr()))
        .user("scramuser")
        .password("scrampw")
        .dbname("app");
    assert!(plain.connect(tokio_postgres::NoTls).await.is_err());

    let dir = tempfile::tempdir().unwrap();
    let tls = tls_block(dir.path(), &ca.pem(), None, "");
    let user = pg_block(dir.path(), "scramuser", Some("scrampw"));
    let lessor = Lessor::start(&config_one(
        &pg.addr(),
        engine,
        &["protocol: postgres", &user, &tls, POOL, HEALTH],
    ))
    .await;
    let reply = pg_exchange(&lessor.client, "up", SSL_IN_USE).await;
    assert_eq!(reply.rows, [Some("true".to_owned())]);

    let mut lease = lessor.lease().await.unwrap();
    let reply = query(&mut lease, "SELECT current_user").await;
    assert_eq!(reply.rows, [Some("scramuser".to_owned())]);
    // A CancelRequest over TLS stops a running query.
    let lease_id = lease.granted().lease_id.clone();
    lease
        .send(query_message("SELECT pg_sleep(30)"))
        .await
        .unwrap();
    let reply = loop {
        assert!(!lessor.client.cancel(&lease_id).await.unwrap().is_empty());
        let mut buf = BytesMut::new();
        let mut reply = Reply::default();
        let got = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                let data = lease.recv().await.unwrap().expect("lease alive");
                buf.extend_from_slice(&data);
                if parse_reply(&mut buf, &mut reply) {
                    return;
                }
            }
        })
        .await;
        if got.is_ok() {
            break reply;
        }
    };
    assert_eq!(reply.error.as_deref(), Some("57014"), "{reply:?}");
    lease.release(Disposition::Return).await.unwrap();

    probes_pass(&lessor, "up", 4).await;
    let s = lessor.stats("up").await;
    assert_eq!(s.tls.as_ref().map(|t| t.mode.as_str()), Some("verify-full"));
    assert_eq!(
        s.tls.as_ref().map(|t| t.client_cert_not_after_unix),
        Some(0)
    );
    lessor.assert_accounted().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_postgres_client_certificate_demanded_refused_and_given() {
    let ca = Ca::new("lessor test CA");
    let Some(pg) = tls_postgres(&ca).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let user = pg_block(dir.path(), "trustuser", None);
    let without = tls_block(dir.path(), &ca.pem(), None, "");
    let client = ca.client("trustuser", CLIENT_UNTIL);
    let with = tls_block(dir.path(), &ca.pem(), Some(&client), "");
    let yaml = format!(
        "upstreams:\n{}{}",
        upstream_yaml(
            "nocert",
            &pg.addr(),
            EngineKind::Bb8,
            &[
                "protocol: postgres",
                &user,
                &without,
                POOL,
                "readiness: optional"
            ]
        ),
        upstream_yaml(
            "cert",
            &pg.addr(),
            EngineKind::Bb8,
            &["protocol: postgres", &user, &with, POOL]
        ),
    );
    let lessor = Lessor::start(&yaml).await;
    let reply = pg_exchange(
        &lessor.client,
        "cert",
        "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await;
    assert_eq!(reply.rows, [Some("/CN=trustuser".to_owned())]);

    let err = lease_error(&lessor.client, "nocert").await;
    assert!(
        err.contains("the server demands a client certificate"),
        "{err}"
    );
    assert_reason(&lessor, "nocert", "tls_client_cert_required").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_postgres_server_without_ssl_refuses_tls_by_name() {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let user = pg_block(dir.path(), "trustuser", None);
    let lessor = Lessor::start(&config_one(
        &pg.addr(),
        EngineKind::Bb8,
        &["protocol: postgres", &user, "tls: { mode: require }", POOL],
    ))
    .await;
    let err = lease_error(&lessor.client, "up").await;
    assert!(err.contains("the server refused TLS"), "{err}");
    assert_reason(&lessor, "up", "tls_refused").await;
}

/// The error text of a failed lease on `upstream` (UNAVAILABLE).
async fn lease_error(client: &Client, upstream: &str) -> String {
    let options = lessor_client::LeaseOptions {
        checkout_timeout: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    match client.lease(upstream, &options).await {
        Ok(_) => panic!("a lease on {upstream} was granted"),
        Err(ClientError::Status(s)) => {
            assert_eq!(s.code(), Code::Unavailable, "{upstream}: {s:?}");
            s.message().to_owned()
        }
        Err(e) => panic!("{upstream}: {e}"),
    }
}

/// `upstream`'s dial failures are counted under `reason`, and
/// `/readyz?verbose` shows it failing with the same words.
async fn assert_reason(lessor: &Lessor, upstream: &str, reason: &str) {
    let body = metrics(lessor).await;
    let n = metric(
        &body,
        "lessor_connect_errors_total",
        &[("upstream", upstream), ("reason", reason)],
    )
    .unwrap_or(0.0);
    assert!(n >= 1.0, "{upstream}: no {reason} counted:\n{body}");
    let verbose = readyz(lessor).await;
    let line = verbose
        .lines()
        .find(|l| l.contains(&format!("upstream {upstream} ")))
        .unwrap_or_default()
        .to_owned();
    assert!(line.starts_with("[-]"), "{verbose}");
    assert!(line.contains("TLS to 127.0.0.1:"), "{verbose}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_dial_failures_name_their_cause_and_require_skips_the_name() {
    let ca = Ca::new("lessor test CA");
    let stranger = Ca::new("some other CA");
    // A certificate for another name, one that expired, and a server that
    // demands client certificates.
    let other_name = TlsRedis::start(
        &RedisFiles {
            server: ca.server(&["db.other.example"]),
            client_cas: ca.pem(),
            auth_clients: false,
        },
        Arc::new(insecure_admin()),
    )
    .await;
    let Some(other_name) = other_name else { return };
    let Some(expired) = TlsRedis::start(
        &RedisFiles {
            server: ca.expired_server(&["127.0.0.1"]),
            client_cas: ca.pem(),
            auth_clients: false,
        },
        Arc::new(insecure_admin()),
    )
    .await
    else {
        return;
    };
    let admin_cert = ca.client("admin", CLIENT_UNTIL);
    let Some(mtls) = TlsRedis::start(
        &RedisFiles {
            server: ca.server(&["127.0.0.1"]),
            client_cas: ca.pem(),
            auth_clients: true,
        },
        client_config(&ca.pem(), Some(&admin_cert)),
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let trusted = tls_block(d, &ca.pem(), None, "");
    let untrusted = tls_block(d, &stranger.pem(), None, "");
    let verify_ca = tls_block(d, &ca.pem(), None, ", mode: verify-ca");
    let named = tls_block(d, &ca.pem(), None, ", server_name: db.other.example");
    let require = "tls: { mode: require }";
    // A client certificate the server does not trust (another CA's).
    let rejected = tls_block(
        d,
        &ca.pem(),
        Some(&stranger.client("lessor", CLIENT_UNTIL)),
        "",
    );
    let upstreams = [
        (
            "untrusted",
            &other_name,
            "protocol: redis",
            untrusted.as_str(),
        ),
        ("mismatch", &other_name, "protocol: redis", trusted.as_str()),
        ("named", &other_name, "protocol: redis", named.as_str()),
        ("require", &other_name, "protocol: redis", require),
        (
            "verifyca",
            &other_name,
            "protocol: redis",
            verify_ca.as_str(),
        ),
        ("tcp", &other_name, "protocol: tcp", require),
        ("expired", &expired, "protocol: redis", trusted.as_str()),
        ("nocert", &mtls, "protocol: redis", trusted.as_str()),
        ("rejected", &mtls, "protocol: redis", rejected.as_str()),
    ];
    let mut yaml = "upstreams:\n".to_owned();
    for (name, server, protocol, tls) in upstreams {
        yaml.push_str(&upstream_yaml(
            name,
            &server.addr(),
            EngineKind::Bb8,
            &[protocol, tls, POOL, HEALTH, "readiness: optional"],
        ));
    }
    let lessor = Lessor::start(&yaml).await;

    // `require` and `verify-ca` accept a certificate for another name;
    // `verify-full` accepts it under that name.
    for name in ["require", "verifyca", "named"] {
        assert_eq!(
            redis_exchange(&lessor.client, name, "PING\r\n").await,
            "+PONG\r\n"
        );
        // Session tickets and other TLS records on an idle connection are
        // not mistaken for unsolicited data.
        probes_pass(&lessor, name, 3).await;
    }
    let mut lease = lessor
        .client
        .lease("tcp", &Default::default())
        .await
        .unwrap();
    lease.send("PING\r\n").await.unwrap();
    assert_eq!(&lease.recv_at_least(7).await.unwrap()[..], b"+PONG\r\n");
    lease.release(Disposition::Return).await.unwrap();

    for (name, words, reason) in [
        (
            "untrusted",
            "the server's certificate is not trusted",
            "tls_untrusted",
        ),
        (
            "mismatch",
            "not valid for the name lessor verifies",
            "tls_name_mismatch",
        ),
        ("expired", "has expired or is not valid yet", "tls_expired"),
        (
            "nocert",
            "the server demands a client certificate",
            "tls_client_cert_required",
        ),
        (
            "rejected",
            "the server rejected lessor's client certificate",
            "tls_client_cert_rejected",
        ),
    ] {
        let err = lease_error(&lessor.client, name).await;
        assert!(err.contains(words), "{name}: {err}");
        assert!(err.contains("(server name 127.0.0.1)"), "{name}: {err}");
        assert!(!err.contains("handshake failed"), "{name}: {err}");
        assert_reason(&lessor, name, reason).await;
        let s = stats_of(&lessor, name).await;
        assert!(!s.ready && s.connect_errors >= 1, "{s:#?}");
    }
}

/// A test client for servers whose certificate it need not check (the
/// servers of the failure cases: the test only needs their PING).
fn insecure_admin() -> rustls::ClientConfig {
    #[derive(Debug)]
    struct Any;
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any))
        .with_no_client_auth()
}

/// A Kubernetes Secret volume: files are symlinks through `..data`, which
/// an update swaps atomically to a new timestamped directory.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretVolume {
    fn new(files: &[(&str, &str)]) -> Self {
        let mut volume = Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        volume.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), volume.dir.path().join(name))
                .unwrap();
        }
        volume
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Writes a new version and swaps `..data` to it in one rename.
    fn update(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let target = self.dir.path().join(&version);
        std::fs::create_dir(&target).unwrap();
        for (name, contents) in files {
            std::fs::write(target.join(name), contents).unwrap();
        }
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_rotation_of_ca_and_client_certificate_under_running_leases() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let both = format!("{}{}", old_ca.pem(), new_ca.pem());
    let old_client = old_ca.client("lessor", (2030, 1, 1));
    let new_client = new_ca.client("lessor", (2032, 1, 1));
    let admin = client_config(&both, Some(&old_client));
    let Some(redis) = TlsRedis::start(
        &RedisFiles {
            server: old_ca.server(&["127.0.0.1"]),
            client_cas: both.clone(),
            auth_clients: true,
        },
        admin,
    )
    .await
    else {
        return;
    };
    let mut secret = SecretVolume::new(&[
        ("ca.crt", &old_ca.pem()),
        ("tls.crt", &old_client.cert),
        ("tls.key", &old_client.key),
    ]);
    let tls = format!(
        "tls: {{ ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\" }}",
        secret.path("ca.crt"),
        secret.path("tls.crt"),
        secret.path("tls.key")
    );
    let lessor = Arc::new(
        Lessor::start(&config_one(
            &redis.addr(),
            EngineKind::Bb8,
            &["protocol: redis", &tls, POOL, HEALTH],
        ))
        .await,
    );

    // Leases run throughout; each evicts its connection, so the next one
    // dials with whatever material is current.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (lessor, stop, ok) = (lessor.clone(), stop.clone(), ok.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let round = async {
                    let mut lease = lessor.lease().await.map_err(|e| e.to_string())?;
                    lease.send("PING\r\n").await.map_err(|e| e.to_string())?;
                    let reply = lease.recv_at_least(7).await.map_err(|e| e.to_string())?;
                    if &reply[..] != b"+PONG\r\n" {
                        return Err(format!("{reply:?}"));
                    }
                    lease
                        .release(Disposition::Evict)
                        .await
                        .map_err(|e| e.to_string())
                };
                match round.await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e),
                }
            }
            failures
        }));
    }
    let leases_past = |n: u64| {
        let ok = ok.clone();
        let start = ok.load(Ordering::Relaxed);
        async move {
            eventually("leases to go on", || async {
                ok.load(Ordering::Relaxed) >= start + n
            })
            .await
        }
    };
    leases_past(10).await;

    // The Secret is updated: a CA bundle with the new CA, and a client
    // certificate from the new CA.
    secret.update(&[
        ("ca.crt", &both),
        ("tls.crt", &new_client.cert),
        ("tls.key", &new_client.key),
    ]);
    lessor
        .wait_for("the new client certificate in use", |s| {
            s.tls.as_ref().is_some_and(|t| {
                t.client_cert_not_after_unix == unix((2032, 1, 1)) && t.last_reload_error.is_empty()
            })
        })
        .await;
    leases_past(10).await;
    // The server moves to a certificate of the new CA: dials from now on
    // succeed only because lessor trusts it.
    let new_server = new_ca.server(&["127.0.0.1"]);
    let cert_path = redis.write_file("new-server.crt", &new_server.cert);
    let key_path = redis.write_file("new-server.key", &new_server.key);
    let set = format!(
        "CONFIG SET tls-cert-file {} tls-key-file {}\r\n",
        cert_path.display(),
        key_path.display()
    );
    assert_eq!(redis.command(set.as_bytes()).await.unwrap(), b"+OK\r\n");
    let only_new = TlsRedisProbe::new(&new_ca.pem(), &new_client);
    eventually("the server presents the new certificate", || async {
        only_new.ping(&redis.addr()).await
    })
    .await;
    leases_past(10).await;

    // A broken update keeps the working material and says why.
    secret.update(&[
        ("ca.crt", &both),
        ("tls.crt", "not a certificate"),
        ("tls.key", &new_client.key),
    ]);
    let s = lessor
        .wait_for("the failed reload counted", |s| {
            s.tls.as_ref().is_some_and(|t| t.reload_failures >= 1)
        })
        .await;
    let t = s.tls.as_ref().unwrap();
    assert!(t.last_reload_error.contains("tls.cert_file"), "{t:?}");
    assert_eq!(t.client_cert_not_after_unix, unix((2032, 1, 1)));
    leases_past(10).await;
    let body = metrics(&lessor).await;
    assert!(
        metric(
            &body,
            "lessor_tls_reloads_total",
            &[("upstream", "up"), ("result", "failed")]
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    // Rolled back to the files in force: the failure is over.
    secret.update(&[
        ("ca.crt", &both),
        ("tls.crt", &new_client.cert),
        ("tls.key", &new_client.key),
    ]);
    lessor
        .wait_for("the reload failure cleared", |s| {
            s.tls
                .as_ref()
                .is_some_and(|t| t.last_reload_error.is_empty())
        })
        .await;

    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let failures = tokio::time::timeout(PATIENCE, worker)
            .await
            .expect("workers stop")
            .unwrap();
        assert!(failures.is_empty(), "failed leases: {failures:?}");
    }
}

/// A client of the tests' own that trusts one CA only.
struct TlsRedisProbe {
    config: Arc<rustls::ClientConfig>,
}

impl TlsRedisProbe {
    fn new(ca: &str, client: &Pair) -> Self {
        Self {
            config: client_config(ca, Some(client)),
        }
    }

    /// Whether a TLS PING succeeds against `addr`.
    async fn ping(&self, addr: &str) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").ok()?;
            let mut s = tokio_rustls::TlsConnector::from(self.config.clone())
                .connect(name, tcp)
                .await
                .ok()?;
            s.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf).await.ok()?;
            Some(&buf == b"+PONG\r\n")
        };
        tokio::time::timeout(PATIENCE, attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_postgres_listener_serves_plain_clients_over_a_tls_upstream() {
    let ca = Ca::new("lessor test CA");
    let Some(pg) = tls_postgres(&ca).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_block(dir.path(), &ca.pem(), None, "");
    let user = pg_block(dir.path(), "scramuser", Some("scrampw"));
    let port = crate::support::ports::reserve();
    let listen = format!("listen: {{ address: \"127.0.0.1:{port}\", pool_mode: transaction }}");
    let _lessor = Lessor::start(&config_one(
        &pg.addr(),
        EngineKind::Bb8,
        &["protocol: postgres", &user, &tls, POOL, &listen],
    ))
    .await;
    eventually("the listener accepts", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("scramuser")
        .dbname("app")
        .connect_timeout(PATIENCE);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client.query_one(SSL_IN_USE, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "true");
    // The client's CancelRequest reaches the server over TLS too.
    let token = client.cancel_token();
    let running = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    let err = loop {
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(500), async {
            while !running.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        {
            let () = done;
            break running.await.unwrap().unwrap_err();
        }
    };
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
}
