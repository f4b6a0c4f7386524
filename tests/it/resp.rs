//! `protocol: redis` against a real redis-server with `requirepass` and an
//! ACL user, on both engines: lessor opens the session (the client never
//! authenticates), a wrong password is a dial failure that names
//! authentication and never the password, and `Exchange` answers whole
//! commands with exactly their replies, refusing what it cannot put back.

use std::time::Duration;

use lessor::EngineKind;
use lessor_client::Client;
use lessor_client::pb::Disposition;
use tonic::Code;

use crate::for_both_engines;
use crate::support::redis::Redis;
use crate::support::{Lessor, config_one, evictions};

for_both_engines!(
    resp_session_is_opened_by_the_sidecar,
    resp_wrong_password_is_a_dial_failure_naming_authentication,
    resp_exchange_answers_pipelined_commands_exactly,
    resp_exchange_refuses_what_it_cannot_put_back,
    resp_exchange_restores_the_db_after_select,
    resp_exchange_timeout_evicts,
    resp_lease_released_with_replies_pending_evicts_and_leaks_nothing,
    resp_lease_select_multi_subscribe_never_reach_the_next_lease,
    resp_lease_quit_is_a_return_and_auth_never_reaches_redis,
    resp_lease_drain_timeout_waits_for_a_blocked_reply,
);

const PASSWORD: &str = "s3cret-for-tests";

/// redis-server with a default-user password and an ACL user `app`.
async fn server() -> Option<Redis> {
    Redis::start_with(&[
        "--requirepass",
        PASSWORD,
        "--user",
        "app",
        "on",
        ">app-pass",
        "~*",
        "&*",
        "+@all",
    ])
    .await
}

/// A lessor in front of `redis` as `protocol: redis`, the password in a file.
async fn lessor(
    redis: &Redis,
    engine: EngineKind,
    dir: &tempfile::TempDir,
    redis_yaml: &str,
    password: &str,
) -> Lessor {
    let file = dir.path().join("password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    Lessor::start(&config_one(
        &redis.addr(),
        engine,
        &[
            "protocol: redis",
            &format!(
                "redis: {{ password_file: \"{}\"{redis_yaml} }}",
                file.display()
            ),
            "pool: { max_size: 4, min_idle: 1, connect_timeout: 5s, checkout_timeout: 5s }",
        ],
    ))
    .await
}

/// redis-server as [`server`] makes it, and a lessor in front of it with
/// the default user's password in a file.
async fn fixture(engine: EngineKind) -> Option<(Redis, tempfile::TempDir, Lessor)> {
    let redis = server().await?;
    let dir = tempfile::tempdir().unwrap();
    let lessor = lessor(&redis, engine, &dir, "", PASSWORD).await;
    Some((redis, dir, lessor))
}

async fn exchange(client: &Client, request: &str) -> Result<String, tonic::Status> {
    match client.exchange("up", request.to_owned(), None).await {
        Ok(r) => Ok(String::from_utf8_lossy(&r.reply).into_owned()),
        Err(lessor_client::ClientError::Status(s)) => Err(s),
        Err(e) => panic!("{e}"),
    }
}

async fn resp_session_is_opened_by_the_sidecar(engine: EngineKind) {
    let Some(redis) = server().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let lessor = lessor(
        &redis,
        engine,
        &dir,
        ", username: app, db: 3, client_name: lessor-test",
        "app-pass",
    )
    .await;
    let mut lease = lessor
        .client
        .lease("up", &Default::default())
        .await
        .unwrap();
    assert_eq!(lease.granted().protocol, "redis");
    lease.send("CLIENT INFO\r\n").await.unwrap();
    let info = String::from_utf8_lossy(&lease.recv_at_least(20).await.unwrap()).into_owned();
    assert!(info.contains(" db=3 "), "{info}");
    assert!(info.contains(" name=lessor-test "), "{info}");
    assert!(info.contains(" user=app "), "{info}");
    lease.release(Disposition::Return).await.unwrap();
}

async fn resp_wrong_password_is_a_dial_failure_naming_authentication(engine: EngineKind) {
    let Some(redis) = server().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let wrong = "not-the-password-123";
    let lessor = lessor(&redis, engine, &dir, "", wrong).await;
    let err = lessor
        .client
        .lease("up", &Default::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    let message = err.to_string();
    assert!(message.contains("authentication failed"), "{message}");
    assert!(!message.contains(wrong), "the password leaked: {message}");
    let stats = lessor.stats("up").await;
    assert!(stats.connect_errors >= 1, "{stats:#?}");
    assert!(!stats.ready);
}

async fn resp_exchange_answers_pipelined_commands_exactly(engine: EngineKind) {
    let Some((_redis, _dir, lessor)) = fixture(engine).await else {
        return;
    };
    let client = &lessor.client;
    assert_eq!(
        exchange(client, "SET k v\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n")
            .await
            .unwrap(),
        "+OK\r\n$1\r\nv\r\n+PONG\r\n"
    );
    // An error reply is the upstream's answer: a successful Exchange.
    let err = exchange(client, "INCR k\r\n").await.unwrap();
    assert!(err.starts_with("-ERR"), "{err}");
    // 16 MiB each way.
    let big = vec![b'x'; 16 << 20];
    let mut set = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", big.len()).into_bytes();
    set.extend_from_slice(&big);
    set.extend_from_slice(b"\r\n");
    let ok = client.exchange("up", set, None).await.unwrap();
    assert_eq!(&ok.reply[..], b"+OK\r\n");
    let got = client
        .exchange("up", &b"GET big\r\n"[..], None)
        .await
        .unwrap();
    assert_eq!(
        got.reply.len(),
        big.len() + format!("${}\r\n\r\n", big.len()).len()
    );
    // Every Exchange returned its connection.
    let stats = lessor.stats("up").await;
    assert_eq!(stats.leased, 0);
    assert_eq!(evictions(&stats, "dirty"), 0, "{stats:#?}");
    lessor.assert_accounted().await;
}

async fn resp_exchange_refuses_what_it_cannot_put_back(engine: EngineKind) {
    let Some((redis, _dir, lessor)) = fixture(engine).await else {
        return;
    };
    let client = &lessor.client;
    for bad in [
        "*2\r\n$3\r\nGET\r\n$1\r\n",
        "SUBSCRIBE news\r\n",
        "MONITOR\r\n",
        "CLIENT REPLY OFF\r\n",
        "AUTH x\r\n",
        "QUIT\r\n",
        "PING\r\nAUTH default x\r\n",
    ] {
        let status = exchange(client, bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }
    let granted = lessor.stats("up").await.leases_granted;
    assert_eq!(granted, 0, "nothing was sent");
    let tcp = Lessor::start(&config_one(&redis.addr(), engine, &[])).await;
    let status = exchange(&tcp.client, "PING\r\n").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = tcp
        .client
        .exchange("nope", &b"PING\r\n"[..], None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Some(Code::NotFound));
}

async fn resp_exchange_restores_the_db_after_select(engine: EngineKind) {
    let Some((_redis, _dir, lessor)) = fixture(engine).await else {
        return;
    };
    let client = &lessor.client;
    let reply = exchange(client, "SELECT 5\r\nCLIENT INFO\r\n")
        .await
        .unwrap();
    assert!(reply.contains(" db=5 "), "{reply}");
    let reply = exchange(client, "CLIENT INFO\r\n").await.unwrap();
    assert!(reply.contains(" db=0 "), "{reply}");
    // Put back, not closed.
    let stats = lessor.stats("up").await;
    assert_eq!(stats.evictions.values().sum::<u64>(), 0, "{stats:#?}");
    // A MULTI left open is discarded, like a lease's: the queued SET never
    // runs, and the connection goes back.
    let reply = exchange(client, "MULTI\r\nSET a 1\r\n").await.unwrap();
    assert_eq!(reply, "+OK\r\n+QUEUED\r\n");
    let stats = lessor.stats("up").await;
    assert_eq!(stats.evictions.values().sum::<u64>(), 0, "{stats:#?}");
    assert_eq!(exchange(client, "GET a\r\n").await.unwrap(), "$-1\r\n");
    let info = exchange(client, "CLIENT INFO\r\n").await.unwrap();
    assert!(info.contains(" multi=-1 "), "{info}");
    lessor.assert_accounted().await;
}

async fn resp_exchange_timeout_evicts(engine: EngineKind) {
    let Some((_redis, _dir, lessor)) = fixture(engine).await else {
        return;
    };
    let err = lessor
        .client
        .exchange(
            "up",
            &b"BLPOP nothing 10\r\n"[..],
            Some(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    let stats = lessor.stats("up").await;
    assert_eq!(evictions(&stats, "lease_expired"), 1, "{stats:#?}");
    // The late reply died with its connection.
    assert_eq!(
        exchange(&lessor.client, "PING\r\n").await.unwrap(),
        "+PONG\r\n"
    );
    lessor.assert_accounted().await;
}

async fn resp_lease_released_with_replies_pending_evicts_and_leaks_nothing(engine: EngineKind) {
    let Some((_redis, _dir, lessor)) = fixture(engine).await else {
        return;
    };
    let mut lease = lessor
        .client
        .lease("up", &Default::default())
        .await
        .unwrap();
    let id = lease.granted().connection_id;
    // 50 replies come at once; a blocking command holds the other 50 back.
    let request = format!(
        "{}BLPOP nothing 30\r\n{}",
        "INCR n\r\n".repeat(50),
        "INCR n\r\n".repeat(49)
    );
    lease.send(request).await.unwrap();
    let mut got = Vec::new();
    while got.iter().filter(|&&b| b == b'\n').count() < 50 {
        got.extend_from_slice(&lease.recv().await.unwrap().unwrap());
    }
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict, "{ended:?}");
    assert_eq!(ended.detail, "50 replies pending", "{ended:?}");
    let mut next = lessor
        .client
        .lease("up", &Default::default())
        .await
        .unwrap();
    assert_ne!(next.granted().connection_id, id);
    next.send("PING\r\n").await.unwrap();
    assert_eq!(&next.recv_at_least(7).await.unwrap()[..], b"+PONG\r\n");
    next.release(Disposition::Return).await.unwrap();
    lessor.assert_accounted().await;
}

async fn resp_lease_select_multi_subscribe_never_reach_the_next_lease(engine: EngineKind) {
    let Some((_redis, _dir, lessor)) = fixture(engine).await else {
        return;
    };
    // Restorable: lessor undoes it (SELECT 0, DISCARD, UNWATCH, the name) before the
    // connection goes back. Not restorable: the connection is closed.
    for (commands, reply_len, disposition, detail) in [
        ("SELECT 5\r\n", 5, Disposition::Return, ""),
        ("MULTI\r\nSET m 1\r\n", 14, Disposition::Return, ""),
        ("WATCH m\r\n", 5, Disposition::Return, ""),
        ("CLIENT SETNAME evil\r\n", 5, Disposition::Return, ""),
        ("SUBSCRIBE news\r\n", 30, Disposition::Evict, "subscribed"),
    ] {
        let mut lease = lessor
            .client
            .lease("up", &Default::default())
            .await
            .unwrap();
        lease.send(commands).await.unwrap();
        lease.recv_at_least(reply_len).await.unwrap();
        let ended = lease.release(Disposition::Return).await.unwrap();
        assert_eq!(ended.disposition(), disposition, "{commands:?}: {ended:?}");
        assert!(ended.detail.contains(detail), "{commands:?}: {ended:?}");
    }
    // Every connection, whichever the next lease gets, is on db 0, outside
    // a transaction, subscribed to nothing.
    let stats = lessor
        .wait_for("restored connections back", |s| s.leased == 0)
        .await;
    // Held together, so each is a different connection.
    let mut held = Vec::new();
    for _ in 0..stats.connections {
        held.push(
            lessor
                .client
                .lease("up", &Default::default())
                .await
                .unwrap(),
        );
    }
    for mut next in held {
        next.send("CLIENT INFO\r\nSET m 2\r\nGET m\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        let read = async {
            while !reply.ends_with("$1\r\n2\r\n") {
                reply.push_str(&String::from_utf8_lossy(
                    &next.recv().await.unwrap().unwrap(),
                ));
            }
        };
        let done = tokio::time::timeout(crate::support::PATIENCE, read).await;
        assert!(done.is_ok(), "no plain reply to GET: {reply}");
        assert!(
            reply.contains(" db=0 ") && reply.contains(" multi=-1 "),
            "{reply}"
        );
        assert!(reply.contains(" sub=0 "), "{reply}");
        assert!(reply.contains(" name= "), "{reply}");
        next.release(Disposition::Return).await.unwrap();
    }
    let stats = lessor.stats("up").await;
    assert_eq!(evictions(&stats, "dirty"), 1, "{stats:#?}");
    lessor.assert_accounted().await;
}

async fn resp_lease_quit_is_a_return_and_auth_never_reaches_redis(engine: EngineKind) {
    let Some((_redis, _dir, lessor)) = fixture(engine).await else {
        return;
    };
    let mut lease = lessor
        .client
        .lease("up", &Default::default())
        .await
        .unwrap();
    let id = lease.granted().connection_id;
    lease
        .send("PING\r\nAUTH default wrong\r\nPING\r\n")
        .await
        .unwrap();
    let refused = b"+PONG\r\n-ERR lessor: authentication is done by the sidecar\r\n+PONG\r\n";
    let got = lease.recv_at_least(refused.len()).await.unwrap();
    assert_eq!(&got[..], &refused[..]);
    // min_idle's refill done first: the connection QUIT returns is then the
    // most recently returned, the one the next checkout takes.
    lessor
        .wait_for("the refill beside the lease", |s| {
            s.idle >= 1 && s.leased == 1
        })
        .await;
    lease.send("QUIT\r\n").await.unwrap();
    assert_eq!(&lease.recv_at_least(5).await.unwrap()[..], b"+OK\r\n");
    let ended = lease.finish().await.unwrap().expect("Ended after QUIT");
    assert_eq!(ended.disposition(), Disposition::Return, "{ended:?}");
    // The connection was not closed: the next lease gets it back.
    let next = lessor
        .client
        .lease("up", &Default::default())
        .await
        .unwrap();
    assert_eq!(next.granted().connection_id, id);
    next.release(Disposition::Return).await.unwrap();
    let stats = lessor.stats("up").await;
    assert_eq!(stats.evictions.values().sum::<u64>(), 0, "{stats:#?}");
    // Redis never saw AUTH from a client: only lessor's own, one per dial.
    let info = exchange(&lessor.client, "INFO commandstats\r\n")
        .await
        .unwrap();
    let auths: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_auth:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0);
    // A refill may dial around the INFO: count the dials on both sides.
    let after = lessor.stats("up").await.connections_created;
    assert!(
        (stats.connections_created..=after).contains(&auths),
        "{auths} AUTH calls, {} to {after} dials: {info}",
        stats.connections_created
    );
}

/// `lessor exchange` as a user runs it: commands split like redis-cli, the
/// replies shown like redis-cli shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_cli_exchange_prints_replies_readably() {
    let Some(redis) = server().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let lessor = lessor(&redis, EngineKind::Bb8, &dir, "", PASSWORD).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args([
            "exchange",
            "up",
            "--target",
            &lessor.addr,
            "SET greeting \"hello world\"",
            "GET greeting",
            "INCR greeting",
            "RPUSH l a b",
            "LRANGE l 0 -1",
            "GET nothing",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "OK\n\"hello world\"\n(error) ERR value is not an integer or out of range\n(integer) 2\n1) \"a\"\n2) \"b\"\n(nil)\n"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(["exchange", "up", "--target", &lessor.addr, "SUBSCRIBE x"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InvalidArgument")
            || String::from_utf8_lossy(&out.stderr).contains("invalid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A password file that cannot be read fails at startup, naming the field;
/// a wrong password never reaches lessor's logs, even at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_credentials_are_checked_at_start_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lessor.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  - name: c\n    address: \"127.0.0.1:6379\"\n    protocol: redis\n    redis: { password_file: /nonexistent/redis-password }\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("upstreams[0].redis.password_file"),
        "{stderr}"
    );

    let Some(redis) = server().await else { return };
    let wrong = "wrong-password-7f3a9c";
    let served = crate::support::process::Served::start_with(
        &format!(
            "upstreams:\n  - name: c\n    address: \"{}\"\n    protocol: redis\n    redis: {{ password_env: LESSOR_TEST_REDIS_PASSWORD }}\n    pool: {{ min_idle: 1, checkout_timeout: 2s }}\n",
            redis.addr()
        ),
        &[("LESSOR_TEST_REDIS_PASSWORD", wrong), ("RUST_LOG", "debug")],
    )
    .await;
    let client = served.client().await;
    let err = client.lease("c", &Default::default()).await.unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    let stdout = served.stdout();
    assert!(stdout.contains("authentication failed"), "{stdout}");
    assert!(!stdout.contains(wrong), "the password is in the log");
}

/// redis-rs, unchanged, over a lease (its connection is the lease) and over
/// Exchange, as `client/examples/redis_rs.rs` shows; with
/// `lease.on_abort: return`, dropping redis-rs's connection returns the
/// lessor connection, since every command had its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_redis_rs_runs_over_a_lease_and_over_exchange() {
    let Some(redis) = server().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, PASSWORD).unwrap();
    let lessor = Lessor::start(&config_one(
        &redis.addr(),
        EngineKind::Bb8,
        &[
            "protocol: redis",
            &format!("redis: {{ password_file: \"{}\" }}", file.display()),
            "pool: { max_size: 2, min_idle: 1 }",
            "lease: { on_abort: return }",
        ],
    ))
    .await;
    let lease = lessor
        .client
        .lease("up", &Default::default())
        .await
        .unwrap();
    let id = lease.granted().connection_id;
    let info = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
    let (mut conn, driver) = redis::aio::MultiplexedConnection::new_with_config(
        &info,
        lease,
        redis::AsyncConnectionConfig::new(),
    )
    .await
    .unwrap();
    let driving = tokio::spawn(driver);
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (v, n): (String, i64) = redis::pipe()
        .cmd("GET")
        .arg("k")
        .cmd("INCR")
        .arg("n")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((v.as_str(), n), ("v", 1));
    // min_idle's refill done first, so the connection returned below is the
    // most recently returned one, which the Exchange then takes.
    lessor
        .wait_for("the refill beside the lease", |s| {
            s.idle >= 1 && s.leased == 1
        })
        .await;
    drop(conn);
    driving.await.unwrap();
    let stats = lessor
        .wait_for("the dropped lease to return", |s| s.leased == 0)
        .await;
    assert_eq!(stats.evictions.values().sum::<u64>(), 0, "{stats:#?}");

    let get = redis::cmd("GET").arg("k").get_packed_command();
    let reply = lessor.client.exchange("up", get, None).await.unwrap();
    let value: String =
        redis::from_redis_value(redis::parse_redis_value(&reply.reply).unwrap()).unwrap();
    assert_eq!(value, "v");
    assert_eq!(reply.connection_id, id, "the lease's connection, returned");
}

/// `resp: 3` opens the session with `HELLO 3`; the password is read again at
/// every dial, so a rotated Secret applies to new connections without a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_hello_3_and_a_rotated_password() {
    let Some(redis) = server().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let lessor = lessor(&redis, EngineKind::Bb8, &dir, ", resp: 3", PASSWORD).await;
    let info = exchange(&lessor.client, "CLIENT INFO\r\n").await.unwrap();
    assert!(info.contains(" resp=3"), "{info}");
    // Rotate: the server's password, then the mounted file.
    let rotated = "rotated-password-42";
    let reply = exchange(
        &lessor.client,
        &format!("CONFIG SET requirepass {rotated}\r\n"),
    )
    .await
    .unwrap();
    assert_eq!(reply, "+OK\r\n");
    std::fs::write(dir.path().join("password"), rotated).unwrap();
    // Every pooled connection goes; the next dial reads the new file.
    let killed = exchange(&lessor.client, "CLIENT KILL TYPE normal SKIPME no\r\n")
        .await
        .unwrap_or_default();
    assert!(killed.starts_with(':'), "{killed}");
    crate::support::eventually("a connection dialed with the rotated password", || async {
        matches!(
            lessor.client.exchange("up", &b"PING\r\n"[..], None).await,
            Ok(r) if &r.reply[..] == b"+PONG\r\n"
        )
    })
    .await;
}

/// With `lease.drain_timeout`, a RETURN while a blocking command's reply is
/// still due waits for it (and drops it) instead of closing the connection;
/// the next lease never sees it.
async fn resp_lease_drain_timeout_waits_for_a_blocked_reply(engine: EngineKind) {
    let Some(redis) = server().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, PASSWORD).unwrap();
    let lessor = Lessor::start(&config_one(
        &redis.addr(),
        engine,
        &[
            "protocol: redis",
            &format!("redis: {{ password_file: \"{}\" }}", file.display()),
            "pool: { max_size: 2, min_idle: 1 }",
            "lease: { drain_timeout: 10s }",
        ],
    ))
    .await;
    let mut lease = lessor
        .client
        .lease("up", &Default::default())
        .await
        .unwrap();
    let id = lease.granted().connection_id;
    lessor
        .wait_for("the refill beside the lease", |s| {
            s.idle >= 1 && s.leased == 1
        })
        .await;
    lease.send("BLPOP nothing 1\r\n").await.unwrap();
    // Released at once: the reply (a nil, after a second) is still due.
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Return, "{ended:?}");
    let mut next = lessor
        .client
        .lease("up", &Default::default())
        .await
        .unwrap();
    assert_eq!(next.granted().connection_id, id, "drained and returned");
    next.send("PING\r\n").await.unwrap();
    assert_eq!(&next.recv_at_least(7).await.unwrap()[..], b"+PONG\r\n");
    next.release(Disposition::Return).await.unwrap();
    let stats = lessor.stats("up").await;
    assert_eq!(stats.evictions.values().sum::<u64>(), 0, "{stats:#?}");
}
