//! Config parsing and validation: defaults, the documented sample, and
//! error messages that name the field.

use bytesize::ByteSize;

use super::validate::validate_host_port;
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
    assert_eq!(c.grpc.acquire_timeout, Duration::from_secs(10));
    assert_eq!(c.grpc.max_concurrent_streams, 4096);
    assert_eq!(c.grpc.unix_socket_mode.0, 0o660);
    assert_eq!(c.admin.listen.to_string(), "0.0.0.0:9090");
    assert_eq!(up.engine, EngineKind::Bb8);
    assert_eq!(up.pool.max_size, 32);
    assert_eq!(up.pool.min_idle(), 4);
    assert_eq!(up.pool.checkout_timeout, Duration::from_secs(2));
    assert_eq!(up.pool.max_waiters, 1024);
    assert_eq!(up.pool.tcp_keepalive.idle, Duration::from_secs(15));
    assert_eq!(up.pool.tcp_keepalive.interval, Duration::from_secs(5));
    assert_eq!(up.pool.tcp_keepalive.probes, 3);
    assert_eq!(up.pool.tcp_user_timeout, Duration::from_secs(30));
    assert_eq!(up.health.interval, Duration::from_secs(5));
    assert!(up.health.probe.is_none());
    assert_eq!(up.lease.on_abort, OnAbort::Evict);
    assert_eq!(up.readiness, ReadinessRole::Required);
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
        ("grpc: { acquire_timeout: 0s }\n", "grpc.acquire_timeout"),
        (
            "grpc: { max_concurrent_streams: 1 }\n",
            "grpc.max_concurrent_streams: must be at least 16",
        ),
        (
            "grpc: { unix_socket_mode: \"0999\" }\n",
            "grpc.unix_socket_mode: `0999` is not a file mode",
        ),
        ("admin: { listen: 9090 }\n", "admin.listen"),
        (
            "admin: { control_listen: \"0.0.0.0:9091\" }\n",
            "admin.control_listen: `0.0.0.0:9091` is not a loopback address",
        ),
        (
            "admin: { control_listen: \"10.0.0.7:9091\" }\n",
            "set admin.control_allow_remote: true",
        ),
        (
            "admin: { control_listen: \"[::ffff:10.0.0.7]:9091\" }\n",
            "admin.control_listen",
        ),
        ("runtime: { worker_threads: 0 }\n", "runtime.worker_threads"),
        ("telemetry: { protocol: thrift }\n", "telemetry.protocol"),
        ("bogus: 1\n", "unknown field `bogus`"),
        (
            "upstreams:\n  - name: a\n",
            "upstreams[0]: set exactly one of address, discovery.static, discovery.dns and discovery.kubernetes",
        ),
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

#[test]
fn discovery_sources() {
    let c = Config::from_yaml(
        "upstreams:\n  - name: a\n    discovery: { dns: { name: redis-headless, port: 6379 } }\n  - name: b\n    discovery: { kubernetes: { service: redis, port: redis } }\n  - name: c\n    discovery: { kubernetes: { service: pg, namespace: data, port: 5432 } }\n    outlier: { consecutive_failures: 5, base_ejection: 1s, max_ejection: 1m }\n",
    )
    .unwrap();
    let Source::Dns(dns) = &c.upstreams[0].source else {
        panic!("{:?}", c.upstreams[0].source)
    };
    assert_eq!(dns.refresh, Duration::from_secs(10));
    let Source::Kubernetes(k) = &c.upstreams[1].source else {
        panic!("{:?}", c.upstreams[1].source)
    };
    assert_eq!(k.port, PortRef::Name("redis".into()));
    assert_eq!(k.namespace, None);
    let Source::Kubernetes(k) = &c.upstreams[2].source else {
        panic!("{:?}", c.upstreams[2].source)
    };
    assert_eq!(k.port, PortRef::Number(5432));
    assert_eq!(c.upstreams[2].outlier.consecutive_failures, 5);
    assert_eq!(
        c.upstreams[1].outlier.base_ejection,
        Duration::from_secs(10)
    );
    assert_eq!(
        c.upstreams[2].source.to_string(),
        "kubernetes service data/pg port 5432"
    );
    let bad = [
        (
            "  - name: a\n    address: h:1\n    discovery: { dns: { name: x, port: 1 } }\n",
            "upstreams[0]: set exactly one",
        ),
        (
            "  - name: a\n    discovery: {}\n",
            "upstreams[0]: set exactly one",
        ),
        (
            "  - name: a\n    discovery: { dns: { name: \"x:1\", port: 1 } }\n",
            "discovery.dns.name",
        ),
        (
            "  - name: a\n    discovery: { dns: { name: x, port: 0 } }\n",
            "discovery.dns.port",
        ),
        (
            "  - name: a\n    discovery: { kubernetes: { service: s, port: 0 } }\n",
            "discovery.kubernetes.port",
        ),
        (
            "  - name: a\n    discovery: { consul: {} }\n",
            "unknown field `consul`",
        ),
        (
            "  - name: a\n    address: h:1\n    outlier: { consecutive_failures: 0 }\n",
            "outlier.consecutive_failures",
        ),
        (
            "  - name: a\n    address: h:1\n    outlier: { base_ejection: 1m, max_ejection: 1s }\n",
            "outlier.max_ejection",
        ),
    ];
    for (yaml, want) in bad {
        let got = err(&format!("upstreams:\n{yaml}"));
        assert!(
            got.contains(want),
            "for {yaml:?}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn postgres_upstreams() {
    let yaml = "upstreams:\n  - name: db\n    address: pg:5432\n    protocol: postgres\n    postgres: { user: app, parameters: { search_path: \"app,public\" }, on_open_transaction: evict }\n";
    let c = Config::from_yaml(yaml).unwrap();
    let up = &c.upstreams[0];
    let pg = &up.postgres;
    assert_eq!(
        (pg.user.as_str(), pg.database()),
        ("app", "app"),
        "database defaults to the user"
    );
    assert_eq!(pg.reset, "DISCARD ALL");
    assert_eq!(pg.application_name, "lessor");
    assert_eq!(pg.on_open_transaction, OnOpenTransaction::Evict);
    assert_eq!(pg.parameters["search_path"], "app,public");
    let probe = up
        .health
        .probe
        .as_ref()
        .expect("the empty query by default");
    assert_eq!(probe.send.as_bytes(), b"Q\0\0\0\x05\0");
    assert_eq!(probe.expect.as_bytes(), b"I\0\0\0\x04Z\0\0\0\x05I");
    let cases = [
        ("    protocol: postgres\n", "needs a `postgres:` block"),
        (
            "    postgres: { user: app }\n",
            "a `postgres:` block needs `protocol: postgres`",
        ),
        (
            "    protocol: postgres\n    postgres: { database: app }\n",
            "upstreams[0].postgres.user: is required",
        ),
        (
            "    protocol: postgres\n    postgres: { user: app, parameters: { replication: \"true\" } }\n",
            "upstreams[0].postgres.parameters.replication",
        ),
        (
            "    protocol: postgres\n    postgres: { user: app, password_file: /nonexistent/pg-password }\n",
            "upstreams[0].postgres.password_file: cannot read",
        ),
        (
            "    protocol: postgres\n    postgres: { user: app, password_file: /x, password_env: X }\n",
            "set one of password_file and password_env",
        ),
        (
            "    protocol: postgres\n    postgres: { user: app, on_open_transaction: commit }\n",
            "upstreams[0].postgres.on_open_transaction",
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
fn control_listen_off_loopback_needs_an_explicit_allow() {
    let with = |admin: &str| {
        format!("admin: {{ {admin} }}\nupstreams:\n  - {{ name: a, address: 'h:1' }}\n")
    };
    for loopback in [
        "127.0.0.1:9091",
        "127.8.0.1:1",
        "[::1]:9091",
        "[::ffff:127.0.0.1]:9091",
    ] {
        let c = Config::from_yaml(&with(&format!("control_listen: \"{loopback}\""))).unwrap();
        assert!(!c.admin.control_allow_remote);
        assert!(c.admin.control_listen.is_some(), "{loopback}");
    }
    let off = Config::from_yaml(&with("control_listen: \"\"")).unwrap();
    assert_eq!(off.admin.control_listen, None);
    let allowed = Config::from_yaml(&with(
        "control_listen: \"0.0.0.0:9091\", control_allow_remote: true",
    ))
    .unwrap();
    assert!(allowed.admin.control_allow_remote);
    assert_eq!(
        allowed.admin.control_listen,
        Some("0.0.0.0:9091".parse().unwrap())
    );
}

#[test]
fn native_listeners_are_checked_per_protocol() {
    let with = |protocol: &str, listen: &str| {
        let postgres = if protocol == "postgres" {
            ", postgres: { user: u }"
        } else {
            ""
        };
        format!(
            "upstreams:\n  - {{ name: c, address: 'h:1', protocol: {protocol}{postgres}, listen: {{ {listen} }} }}\n"
        )
    };
    let redis = Config::from_yaml(&with(
        "redis",
        "address: \"127.0.0.1:6380\", unix_socket: /run/c.sock, username: app",
    ))
    .unwrap();
    let listen = redis.upstreams[0].listen.as_ref().unwrap();
    assert_eq!(
        listen.unix_socket.as_deref(),
        Some(std::path::Path::new("/run/c.sock"))
    );
    assert_eq!(listen.unix_socket_mode.0, 0o660);
    let file = tempfile::NamedTempFile::new().unwrap();
    let password = format!(
        "auth: password, password_file: \"{}\"",
        file.path().display()
    );
    assert!(
        Config::from_yaml(&with(
            "redis",
            &format!("address: \"0.0.0.0:6380\", {password}")
        ))
        .is_ok()
    );
    for (protocol, listen, wanted) in [
        (
            "tcp",
            "address: \"127.0.0.1:1\"",
            "needs `protocol: postgres` or `protocol: redis`",
        ),
        (
            "redis",
            "address: \"0.0.0.0:6380\"",
            "`trust` on `0.0.0.0:6380`, which is not a loopback address",
        ),
        (
            "redis",
            "address: \"127.0.0.1:6380\", auth: scram-sha-256",
            "trust or password",
        ),
        (
            "postgres",
            "address: \"127.0.0.1:6432\", auth: password",
            "trust or scram-sha-256",
        ),
        (
            "redis",
            "address: \"127.0.0.1:6380\", auth: password",
            "password needs the password clients present",
        ),
        (
            "redis",
            "unix_socket_dir: /run",
            "listen.unix_socket_dir: not for `protocol: redis`",
        ),
        (
            "postgres",
            "unix_socket: /run/x.sock",
            "listen.unix_socket: not for `protocol: postgres`",
        ),
        ("redis", "address: \"\"", "set address, unix_socket or both"),
        (
            "postgres",
            "address: \"127.0.0.1:6432\", username: x",
            "only for `protocol: redis`",
        ),
        (
            "redis",
            "address: \"127.0.0.1:6380\", unix_socket_mode: \"999\"",
            "not a file mode",
        ),
    ] {
        let err = Config::from_yaml(&with(protocol, listen))
            .unwrap_err()
            .to_string();
        assert!(err.contains(wanted), "{protocol} {listen}: {err}");
    }
}

/// A CA certificate and two certificate/key pairs it signed, as PEM.
fn pki() -> (String, (String, String), (String, String)) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let pair = || {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["client".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    (ca.pem(), pair(), pair())
}

#[test]
fn tls_block_defaults_to_verify_full_and_checks_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, (cert, key), (_, other_key)) = pki();
    let file = |name: &str, contents: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path.display().to_string()
    };
    let (ca, cert, key, other_key) = (
        file("ca.crt", &ca),
        file("tls.crt", &cert),
        file("tls.key", &key),
        file("other.key", &other_key),
    );
    let junk = file("junk.pem", "hello");
    let with = |tls: &str| format!("{MINIMAL}    tls: {{ {tls} }}\n");
    let c = Config::from_yaml(&with(&format!(
        "ca_file: {ca}, cert_file: {cert}, key_file: {key}, server_name: db.internal, min_version: \"1.3\""
    )))
    .unwrap();
    let tls = c.upstreams[0].tls_enabled().expect("TLS on");
    assert_eq!(tls.mode, TlsMode::VerifyFull);
    assert_eq!(tls.min_version, TlsVersion::V1_3);
    let off = Config::from_yaml(&with("mode: disable")).unwrap();
    assert!(off.upstreams[0].tls_enabled().is_none());
    assert!(
        Config::from_yaml(MINIMAL).unwrap().upstreams[0]
            .tls
            .is_none()
    );
    Config::from_yaml(&with("mode: require")).unwrap();
    Config::from_yaml(&with(&format!("mode: verify-ca, ca_file: {ca}"))).unwrap();

    for (tls, field, words) in [
        (
            format!("mode: require, ca_file: {ca}"),
            "tls.ca_file",
            "verifies nothing",
        ),
        (
            format!("ca_file: {ca}, cert_file: {cert}"),
            "tls.key_file",
            "cert_file needs key_file",
        ),
        (
            format!("ca_file: {ca}, server_name: \"not a name!\""),
            "tls.server_name",
            "neither a DNS name nor an IP address",
        ),
        (
            "ca_file: /nonexistent/ca.crt".to_owned(),
            "tls.ca_file",
            "/nonexistent/ca.crt",
        ),
        (
            format!("ca_file: {junk}"),
            "tls.ca_file",
            "no PEM certificate",
        ),
        (
            format!("ca_file: {ca}, cert_file: {cert}, key_file: {other_key}"),
            "tls.key_file",
            "is not the key of",
        ),
        (
            format!("ca_file: {ca}, cert_file: {junk}, key_file: {key}"),
            "tls.cert_file",
            "no PEM certificate",
        ),
    ] {
        let e = err(&with(&tls));
        assert!(
            e.starts_with(&format!("upstreams[0].{field}: ")) && e.contains(words),
            "{tls}: {e}"
        );
    }
    for tls in ["mode: verify", "min_version: \"1.1\"", "ca: x"] {
        let e = err(&with(tls));
        assert!(e.contains("tls"), "{tls}: {e}");
    }
}

#[test]
fn fleet_block_defaults_and_errors_name_the_field() {
    let yaml =
        "upstreams:\n  - name: Orders_DB\n    address: 127.0.0.1:5432\n    fleet: { budget: 20 }\n";
    let c = Config::from_yaml(yaml).unwrap();
    let fleet = c.upstreams[0].fleet.as_ref().unwrap();
    assert_eq!(fleet.budget, 20);
    assert_eq!(fleet.group_for("Orders_DB"), "orders-db");
    assert_eq!(fleet.renew_interval, Duration::from_secs(5));
    assert_eq!(fleet.lease_duration, Duration::from_secs(15));
    assert!(
        Config::from_yaml(MINIMAL).unwrap().upstreams[0]
            .fleet
            .is_none()
    );

    let with = |fleet: &str| {
        err(&format!(
            "upstreams:\n  - name: redis\n    address: 127.0.0.1:6379\n    fleet: {fleet}\n"
        ))
    };
    assert_eq!(
        with("{ budget: 0 }"),
        "upstreams[0].fleet.budget: must be at least 1"
    );
    assert!(
        with("{ budget: 5, group: Orders }")
            .starts_with("upstreams[0].fleet.group: `Orders`: must be"),
        "{}",
        with("{ budget: 5, group: Orders }")
    );
    assert!(with("{ budget: 5, group: -x }").contains("start and end with a letter or digit"));
    assert!(
        with("{ budget: 5, renew_interval: 10s, lease_duration: 15s }").starts_with(
            "upstreams[0].fleet.lease_duration: must be at least twice renew_interval"
        )
    );
    assert!(
        with("{ budget: 5, lease_duration: 1500ms, renew_interval: 500ms }")
            .starts_with("upstreams[0].fleet.lease_duration: must be a whole number of seconds")
    );
    assert!(
        with("{ budget: 5, renew_interval: 10ms }")
            .starts_with("upstreams[0].fleet.renew_interval: must be at least 100ms")
    );
    assert!(
        with("{ budget: 5, size: 3 }").contains("fleet.size: unknown field `size`"),
        "{}",
        with("{ budget: 5, size: 3 }")
    );
    assert!(with("{ group: x }").contains("missing field `budget`"));
    assert!(with("{ budget: 5, group: a..b }").contains("DNS subdomain"));
    let twice = err(
        "upstreams:\n  - name: cache\n    address: 127.0.0.1:6379\n    fleet: { budget: 10 }\n  \
         - name: Cache_\n    address: 127.0.0.1:6379\n    fleet: { budget: 10, group: cache }\n",
    );
    assert!(
        twice.starts_with(
            "upstreams[1].fleet.group: `cache` is already the fleet group of upstreams[0]"
        ),
        "{twice}"
    );
}
