//! `protocol: postgres` against a real PostgreSQL 15, on both engines. The
//! pool holds one connection, so every rule is observed the way it
//! matters: on the *next* lease of the same connection id. lessor runs the
//! startup (trust, cleartext, md5, SCRAM); a session is never returned
//! inside a transaction, and `DISCARD ALL` runs before it is idle again;
//! COPY or an unsynced batch evicts; Terminate is a RETURN; a client's own
//! startup is refused; Cancel stops a running query; Exchange answers whole
//! queries and cleans up after them.

use bytes::{BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use lessor::EngineKind;
use lessor_client::pb::{Disposition, EndReason};
use lessor_client::{Client, ClientError, Lease};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tonic::Code;

use crate::for_both_engines;
use crate::support::postgres::Postgres;
use crate::support::{Lessor, PATIENCE, config_one, evictions};

for_both_engines!(
    pg_session_is_opened_by_the_sidecar,
    pg_startup_failures_are_clear_unavailable_errors,
    pg_open_transaction_is_rolled_back_before_the_next_lease,
    pg_open_transaction_evicts_when_configured,
    pg_reset_discards_session_state_unless_disabled,
    pg_half_sent_copy_and_unsynced_batch_evict,
    pg_terminate_is_a_return_and_a_client_startup_is_refused,
    pg_cancel_stops_a_running_query,
    pg_exchange_answers_whole_queries_and_cleans_up,
    pg_default_probe_passes_and_a_pending_reply_drains,
    pg_password_file_is_reread_on_each_dial,
    pg_libpq_copy_with_two_syncs_is_a_clean_return,
    pg_evicted_lease_cancels_its_running_query,
    pg_granted_parameters_are_what_the_server_last_reported,
);

/// A lessor in front of `pg` with one pooled connection, as `user` with
/// `password` (in a file) and extra `postgres:` keys.
async fn lessor(
    pg: &Postgres,
    engine: EngineKind,
    dir: &tempfile::TempDir,
    user: &str,
    password: Option<&str>,
    extra: &str,
) -> Lessor {
    lessor_with(pg, engine, dir, user, password, extra, &[]).await
}

/// [`lessor`], with extra upstream keys (`health: ...`).
async fn lessor_with(
    pg: &Postgres,
    engine: EngineKind,
    dir: &tempfile::TempDir,
    user: &str,
    password: Option<&str>,
    extra: &str,
    keys: &[&str],
) -> Lessor {
    let database = if extra.contains("database:") {
        ""
    } else {
        ", database: app"
    };
    let mut block = format!("user: {user}{database}{extra}");
    if let Some(password) = password {
        let file = dir.path().join(format!("{user}.password"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        block.push_str(&format!(", password_file: \"{}\"", file.display()));
    }
    let block = format!("postgres: {{ {block} }}");
    let mut lines = vec![
        "protocol: postgres",
        &block,
        "pool: { max_size: 1, min_idle: 1, connect_timeout: 10s, checkout_timeout: 10s }",
    ];
    lines.extend_from_slice(keys);
    Lessor::start(&config_one(&pg.addr(), engine, &lines)).await
}

async fn fixture(engine: EngineKind, extra: &str) -> Option<(Postgres, tempfile::TempDir, Lessor)> {
    let pg = Postgres::start().await?;
    let dir = tempfile::tempdir().unwrap();
    let lessor = lessor(&pg, engine, &dir, "scramuser", Some("scrampw"), extra).await;
    Some((pg, dir, lessor))
}

/// What came back for one query: the first column of each row, the
/// SQLSTATE of an error, and the ReadyForQuery status.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub(crate) rows: Vec<Option<String>>,
    pub(crate) error: Option<String>,
    pub(crate) status: u8,
}

pub(crate) fn query_message(sql: &str) -> Bytes {
    let mut buf = BytesMut::new();
    frontend::query(sql, &mut buf).unwrap();
    buf.freeze()
}

/// Parses backend messages from `buf` until a ReadyForQuery.
pub(crate) fn parse_reply(buf: &mut BytesMut, reply: &mut Reply) -> bool {
    while let Some(message) = Message::parse(buf).unwrap() {
        match message {
            Message::DataRow(row) => {
                let first = row.ranges().next().unwrap().unwrap();
                reply
                    .rows
                    .push(first.map(|r| String::from_utf8_lossy(&row.buffer()[r]).into_owned()));
            }
            Message::ErrorResponse(body) => {
                let mut fields = body.fields();
                while let Some(f) = fields.next().unwrap() {
                    if f.type_() == b'C' {
                        reply.error = Some(String::from_utf8_lossy(f.value_bytes()).into_owned());
                    }
                }
            }
            Message::ReadyForQuery(body) => {
                reply.status = body.status();
                return true;
            }
            _ => {}
        }
    }
    false
}

/// Reads one reply (through its ReadyForQuery) from a lease.
pub(crate) async fn read_reply(lease: &mut Lease) -> Reply {
    let mut buf = BytesMut::new();
    let mut reply = Reply::default();
    loop {
        let data = tokio::time::timeout(PATIENCE, lease.recv())
            .await
            .expect("a reply in time")
            .unwrap()
            .expect("the lease ended before ReadyForQuery");
        buf.extend_from_slice(&data);
        if parse_reply(&mut buf, &mut reply) {
            assert!(buf.is_empty(), "nothing after ReadyForQuery");
            return reply;
        }
    }
}

/// One simple query on a lease.
pub(crate) async fn query(lease: &mut Lease, sql: &str) -> Reply {
    lease.send(query_message(sql)).await.unwrap();
    read_reply(lease).await
}

async fn lease(client: &Client) -> Lease {
    client.lease("up", &Default::default()).await.unwrap()
}

/// The next lease, which must be on connection `id`.
async fn next_lease_on(client: &Client, id: u64) -> Lease {
    let lease = lease(client).await;
    assert_eq!(
        lease.granted().connection_id,
        id,
        "the same pooled connection"
    );
    lease
}

async fn pg_session_is_opened_by_the_sidecar(engine: EngineKind) {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (user, password) in [
        ("trustuser", None),
        ("passuser", Some("passpw")),
        ("md5user", Some("md5pw")),
        ("scramuser", Some("scrampw")),
    ] {
        let extra = ", parameters: { search_path: \"lessor_test,public\" }";
        let lessor = lessor(&pg, engine, &dir, user, password, extra).await;
        let mut lease = lease(&lessor.client).await;
        let granted = lease.granted().clone();
        assert_eq!(granted.protocol, "postgres");
        assert_eq!(granted.server_parameters["application_name"], "lessor");
        assert!(
            granted.server_parameters["server_version"].starts_with("15"),
            "{:?}",
            granted.server_parameters
        );
        assert_eq!(granted.backend_secret.len(), 4);
        let reply = query(&mut lease, "SELECT current_user").await;
        assert_eq!(reply.rows, [Some(user.to_owned())]);
        let reply = query(&mut lease, "SHOW search_path").await;
        assert_eq!(reply.rows, [Some("lessor_test,public".to_owned())]);
        let reply = query(&mut lease, "SELECT pg_backend_pid()").await;
        assert_eq!(reply.rows, [Some(granted.backend_pid.to_string())]);
        assert_eq!(reply.status, b'I');
        let ended = lease.release(Disposition::Return).await.unwrap();
        assert_eq!(ended.disposition(), Disposition::Return, "{ended:?}");
    }
}

async fn pg_startup_failures_are_clear_unavailable_errors(engine: EngineKind) {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let failure = |lessor: Lessor| async move {
        let err = lessor
            .client
            .lease("up", &Default::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        let stats = lessor.stats("up").await;
        assert!(stats.connect_errors >= 1, "{stats:#?}");
        assert!(!stats.ready);
        err.to_string()
    };
    for (user, wrong) in [
        ("md5user", "wrong-md5-secret"),
        ("scramuser", "wrong-scram-secret"),
    ] {
        let message = failure(lessor(&pg, engine, &dir, user, Some(wrong), "").await).await;
        assert!(
            message.contains(&format!("authentication failed for user \"{user}\"")),
            "{message}"
        );
        assert!(!message.contains(wrong), "the password leaked: {message}");
    }
    let message = failure(lessor(&pg, engine, &dir, "md5user", None, "").await).await;
    assert!(message.contains("none is configured"), "{message}");
    let unknown = ", database: no_such_db";
    let message = failure(lessor(&pg, engine, &dir, "trustuser", None, unknown).await).await;
    assert!(message.contains("3D000"), "{message}");
    assert!(message.contains("no_such_db"), "{message}");
    // Every slot of a server no one else dials taken by the tests' own
    // sessions: too many connections.
    let full = Postgres::start_with(&["max_connections = 2", "superuser_reserved_connections = 0"])
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(full.connect_retrying("trustuser").await);
    }
    let message = failure(lessor(&full, engine, &dir, "trustuser", None, "").await).await;
    assert!(message.contains("53300"), "{message}");
}

/// The table the transaction tests write to.
async fn table(pg: &Postgres) {
    pg.admin()
        .await
        .batch_execute("CREATE TABLE IF NOT EXISTS t (n int); GRANT ALL ON t TO PUBLIC")
        .await
        .unwrap();
}

async fn pg_open_transaction_is_rolled_back_before_the_next_lease(engine: EngineKind) {
    let Some((pg, _dir, lessor)) = fixture(engine, "").await else {
        return;
    };
    table(&pg).await;
    let client = &lessor.client;
    let mut first = lease(client).await;
    let id = first.granted().connection_id;
    assert_eq!(
        query(&mut first, "BEGIN; INSERT INTO t VALUES (1)")
            .await
            .status,
        b'T'
    );
    let ended = first.release(Disposition::Return).await.unwrap();
    assert_eq!(
        (ended.disposition(), ended.reason()),
        (Disposition::Return, EndReason::ClientRelease),
        "{ended:?}"
    );
    let mut next = next_lease_on(client, id).await;
    let reply = query(&mut next, "SELECT count(*) FROM t").await;
    assert_eq!(
        reply.rows,
        [Some("0".to_owned())],
        "the insert was rolled back"
    );
    assert_eq!(reply.status, b'I', "not in a transaction");
    // A failed transaction (`E`) too.
    let reply = query(&mut next, "BEGIN; SELECT 1/0").await;
    assert_eq!(
        (reply.error.as_deref(), reply.status),
        (Some("22012"), b'E')
    );
    next.release(Disposition::Return).await.unwrap();
    let mut third = next_lease_on(client, id).await;
    assert_eq!(query(&mut third, "SELECT 1").await.status, b'I');
    third.release(Disposition::Return).await.unwrap();
    let metrics = crate::support::http::fetch(&lessor.admin, "/metrics", None)
        .await
        .unwrap()
        .body;
    assert!(
        metrics.contains("lessor_rollbacks_total{upstream=\"up\"} 2"),
        "{metrics}"
    );
}

async fn pg_open_transaction_evicts_when_configured(engine: EngineKind) {
    let Some((_pg, _dir, lessor)) = fixture(engine, ", on_open_transaction: evict").await else {
        return;
    };
    let mut first = lease(&lessor.client).await;
    let id = first.granted().connection_id;
    query(&mut first, "BEGIN").await;
    let ended = first.release(Disposition::Return).await.unwrap();
    assert_eq!(
        (ended.disposition(), ended.reason()),
        (Disposition::Evict, EndReason::Dirty)
    );
    assert_eq!(ended.detail, "transaction open, on_open_transaction: evict");
    let next = lease(&lessor.client).await;
    assert_ne!(next.granted().connection_id, id);
    assert_eq!(evictions(&lessor.stats("up").await, "dirty"), 1);
}

async fn pg_reset_discards_session_state_unless_disabled(engine: EngineKind) {
    for (extra, kept) in [("", false), (", reset: \"\"", true)] {
        let Some((_pg, _dir, lessor)) = fixture(engine, extra).await else {
            return;
        };
        let client = &lessor.client;
        let mut first = lease(client).await;
        let id = first.granted().connection_id;
        for sql in [
            "SET search_path = pg_catalog",
            "PREPARE p AS SELECT 42",
            "CREATE TEMP TABLE scratch (n int)",
        ] {
            assert_eq!(query(&mut first, sql).await.error, None, "{sql}");
        }
        first.release(Disposition::Return).await.unwrap();
        let mut next = next_lease_on(client, id).await;
        let search_path = query(&mut next, "SHOW search_path").await.rows;
        let prepared = query(&mut next, "EXECUTE p").await;
        let temp = query(&mut next, "SELECT count(*) FROM scratch").await;
        if kept {
            // The documented trade-off of `reset: ""`: the next lease
            // inherits the session as it was left.
            assert_eq!(search_path, [Some("pg_catalog".to_owned())]);
            assert_eq!(prepared.rows, [Some("42".to_owned())]);
            assert_eq!(temp.error, None);
        } else {
            assert_eq!(search_path, [Some("\"$user\", public".to_owned())]);
            assert_eq!(
                prepared.error.as_deref(),
                Some("26000"),
                "no such prepared statement"
            );
            assert_eq!(temp.error.as_deref(), Some("42P01"), "no such table");
        }
        next.release(Disposition::Return).await.unwrap();
        // Granted reports the session as it is: what an Exchange's SET
        // reported, or what the reset put back.
        client
            .exchange(
                "up",
                query_message("SET application_name = 'renamed'"),
                None,
            )
            .await
            .unwrap();
        let last = next_lease_on(client, id).await;
        let want = if kept { "renamed" } else { "lessor" };
        assert_eq!(last.granted().server_parameters["application_name"], want);
        last.release(Disposition::Return).await.unwrap();
    }
}

async fn pg_half_sent_copy_and_unsynced_batch_evict(engine: EngineKind) {
    let Some((pg, _dir, lessor)) = fixture(engine, "").await else {
        return;
    };
    table(&pg).await;
    let client = &lessor.client;
    let mut first = lease(client).await;
    let id = first.granted().connection_id;
    first
        .send(query_message("COPY t FROM STDIN"))
        .await
        .unwrap();
    // CopyInResponse, then half the data.
    let copy_in = first.recv_at_least(1).await.unwrap();
    assert_eq!(copy_in[0], b'G');
    first.send(&b"d\0\0\0\x061\n"[..]).await.unwrap();
    let ended = first.release(Disposition::Return).await.unwrap();
    assert_eq!(
        (ended.disposition(), ended.reason(), ended.detail.as_str()),
        (Disposition::Evict, EndReason::Dirty, "COPY in progress")
    );
    let mut second = lease(client).await;
    assert_ne!(second.granted().connection_id, id);
    let id = second.granted().connection_id;
    let mut parse = BytesMut::new();
    frontend::parse("", "SELECT 1", None, &mut parse).unwrap();
    second.send(parse.freeze()).await.unwrap();
    let ended = second.release(Disposition::Return).await.unwrap();
    assert_eq!(ended.reason(), EndReason::Dirty);
    assert_eq!(ended.detail, "an extended-protocol batch without its Sync");
    let third = lease(client).await;
    assert_ne!(third.granted().connection_id, id);
    assert_eq!(evictions(&lessor.stats("up").await, "dirty"), 2);
}

async fn pg_terminate_is_a_return_and_a_client_startup_is_refused(engine: EngineKind) {
    let Some((_pg, _dir, lessor)) = fixture(engine, "").await else {
        return;
    };
    let client = &lessor.client;
    let mut first = lease(client).await;
    let id = first.granted().connection_id;
    query(&mut first, "SELECT 1").await;
    first.send(&b"X\0\0\0\x04"[..]).await.unwrap();
    let ended = first.finish().await.unwrap().expect("Ended");
    assert_eq!(
        (ended.disposition(), ended.reason()),
        (Disposition::Return, EndReason::ClientRelease),
        "{ended:?}"
    );
    let mut refused = Vec::new();
    let mut startup = BytesMut::new();
    frontend::startup_message([("user", "postgres"), ("database", "app")], &mut startup).unwrap();
    refused.push(startup.freeze());
    let mut ssl = BytesMut::new();
    frontend::ssl_request(&mut ssl);
    refused.push(ssl.freeze());
    let mut password = BytesMut::new();
    frontend::password_message(b"guess", &mut password).unwrap();
    refused.push(password.freeze());
    for bytes in refused {
        let mut lease = next_lease_on(client, id).await;
        lease.send(bytes).await.unwrap();
        let err = lease.finish().await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains("by the sidecar"), "{err}");
    }
    // Still the same, clean session.
    let mut last = next_lease_on(client, id).await;
    assert_eq!(
        query(&mut last, "SELECT current_user").await.rows,
        [Some("scramuser".into())]
    );
    last.release(Disposition::Return).await.unwrap();
    let stats = lessor.stats("up").await;
    assert_eq!(evictions(&stats, "client_abort"), 0, "{stats:#?}");
    assert_eq!(evictions(&stats, "dirty"), 0, "{stats:#?}");
}

async fn pg_cancel_stops_a_running_query(engine: EngineKind) {
    let Some((_pg, _dir, lessor)) = fixture(engine, "").await else {
        return;
    };
    let client = &lessor.client;
    let mut lease = lease(client).await;
    let id = lease.granted().connection_id;
    let lease_id = lease.granted().lease_id.clone();
    lease
        .send(query_message("SELECT pg_sleep(10)"))
        .await
        .unwrap();
    // The query must be running before the cancel can stop it: the
    // CancelRequest of an idle session is ignored. Cancel until it lands.
    let reply = loop {
        assert!(!client.cancel(&lease_id).await.unwrap().is_empty());
        let mut buf = BytesMut::new();
        let mut reply = Reply::default();
        let got = tokio::time::timeout(std::time::Duration::from_millis(500), async {
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
    assert_eq!(
        reply.error.as_deref(),
        Some("57014"),
        "query_canceled: {reply:?}"
    );
    lease.release(Disposition::Return).await.unwrap();
    let mut next = next_lease_on(client, id).await;
    assert_eq!(query(&mut next, "SELECT 1").await.status, b'I');
    let status = match client.cancel(&next.granted().lease_id.clone()).await {
        Ok(_) => None,
        Err(ClientError::Status(s)) => Some(s.code()),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(status, None, "a live lease may be cancelled at any time");
    next.release(Disposition::Return).await.unwrap();
    let err = client.cancel("no-such-lease").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
}

/// An Exchange's reply, parsed.
async fn exchange(client: &Client, request: impl Into<Bytes>) -> Result<Reply, tonic::Status> {
    match client.exchange("up", request, None).await {
        Ok(r) => {
            let mut buf = BytesMut::from(&r.reply[..]);
            let mut reply = Reply::default();
            assert!(parse_reply(&mut buf, &mut reply), "ends with ReadyForQuery");
            assert!(buf.is_empty(), "exactly one reply");
            Ok(reply)
        }
        Err(ClientError::Status(s)) => Err(s),
        Err(e) => panic!("{e}"),
    }
}

async fn pg_exchange_answers_whole_queries_and_cleans_up(engine: EngineKind) {
    let Some((pg, _dir, lessor)) = fixture(engine, "").await else {
        return;
    };
    table(&pg).await;
    let client = &lessor.client;
    let reply = exchange(client, query_message("SELECT 1")).await.unwrap();
    assert_eq!(
        (reply.rows, reply.status),
        (vec![Some("1".to_owned())], b'I')
    );
    // An ErrorResponse is the server's answer: a successful Exchange.
    let reply = exchange(client, query_message("SELECT 1/0")).await.unwrap();
    assert_eq!(reply.error.as_deref(), Some("22012"));
    // A transaction left open is rolled back before anyone sees it.
    let reply = exchange(client, query_message("BEGIN; INSERT INTO t VALUES (7)"))
        .await
        .unwrap();
    assert_eq!(reply.status, b'T');
    let reply = exchange(client, query_message("SELECT count(*) FROM t"))
        .await
        .unwrap();
    assert_eq!(
        (reply.rows, reply.status),
        (vec![Some("0".to_owned())], b'I')
    );
    let metrics = crate::support::http::fetch(&lessor.admin, "/metrics", None)
        .await
        .unwrap()
        .body;
    assert!(
        metrics.contains("lessor_rollbacks_total{upstream=\"up\"} 1"),
        "{metrics}"
    );
    // Session state does not outlive its Exchange.
    exchange(client, query_message("SET search_path = pg_catalog"))
        .await
        .unwrap();
    let reply = exchange(client, query_message("SHOW search_path"))
        .await
        .unwrap();
    assert_eq!(reply.rows, [Some("\"$user\", public".to_owned())]);
    // An extended batch ending with Sync.
    let mut batch = BytesMut::new();
    frontend::parse("", "SELECT $1::int + 1", None, &mut batch).unwrap();
    frontend::bind(
        "",
        "",
        None,
        Some(41),
        |v: i32, buf: &mut BytesMut| {
            buf.put_slice(v.to_string().as_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        Some(0),
        &mut batch,
    )
    .map_err(|_| ())
    .unwrap();
    frontend::execute("", 0, &mut batch).unwrap();
    frontend::sync(&mut batch);
    let reply = exchange(client, batch.freeze()).await.unwrap();
    assert_eq!(reply.rows, [Some("42".to_owned())]);
    // A reply past its deadline: DEADLINE_EXCEEDED, the connection closed.
    let slow = client
        .exchange(
            "up",
            query_message("SELECT pg_sleep(5)"),
            Some(std::time::Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    assert_eq!(slow.code(), Some(Code::DeadlineExceeded), "{slow}");
    let reply = exchange(client, query_message("SELECT 2")).await.unwrap();
    assert_eq!(
        reply.rows,
        [Some("2".to_owned())],
        "a new connection serves"
    );
    // Refused before anything is sent.
    let mut startup = BytesMut::new();
    frontend::startup_message([("user", "postgres")], &mut startup).unwrap();
    for bad in [
        query_message("COPY t FROM STDIN"),
        startup.freeze(),
        Bytes::from_static(b"X\0\0\0\x04"),
        query_message("SELECT 1").slice(..6),
    ] {
        let status = exchange(client, bad.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }
    // Refused requests never cost the connection: one was used throughout
    // (a refill may dial a spare while it is out for its reset; the spare
    // is closed as surplus).
    let stats = lessor.stats("up").await;
    assert_eq!(evictions(&stats, "dirty"), 0, "{stats:#?}");
    assert_eq!(evictions(&stats, "upstream_closed"), 0, "{stats:#?}");
    assert_eq!(
        evictions(&stats, "lease_expired"),
        1,
        "the slow one: {stats:#?}"
    );
    lessor.assert_accounted().await;
}

/// `lessor serve` with the password in an environment variable: a wrong
/// one is never in the log (even at debug); then `lessor exchange` prints
/// query results aligned like psql.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_served_credentials_stay_out_of_logs_and_the_cli_prints_results() {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    let yaml = |name: &str| {
        format!(
            "upstreams:\n  - name: {name}\n    address: \"{}\"\n    protocol: postgres\n    postgres: {{ user: md5user, database: app, password_env: LESSOR_TEST_PG_PASSWORD }}\n    pool: {{ min_idle: 1, checkout_timeout: 5s }}\n",
            pg.addr()
        )
    };
    let wrong = "wrong-password-51c0de";
    let served = crate::support::process::Served::start_with(
        &yaml("db"),
        &[("LESSOR_TEST_PG_PASSWORD", wrong), ("RUST_LOG", "debug")],
    )
    .await;
    let client = served.client().await;
    let err = client.lease("db", &Default::default()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("authentication failed for user \"md5user\""),
        "{err}"
    );
    assert!(
        !served.stdout().contains(wrong),
        "the password is in the log"
    );
    drop(served);

    let served = crate::support::process::Served::start_with(
        &yaml("db"),
        &[("LESSOR_TEST_PG_PASSWORD", "md5pw")],
    )
    .await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(["exchange", "db", "--target", &served.grpc])
        .arg("SELECT 1 AS one, 'lessor' AS name")
        .arg("SELECT 1/0")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        " one | name\n-----+--------\n 1   | lessor\n(1 row)\nERROR:  division by zero (SQLSTATE 22012)\n"
    );
}

async fn pg_default_probe_passes_and_a_pending_reply_drains(engine: EngineKind) {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        "health: { skip_if_used_within: 0s }",
        "lease: { drain_timeout: 10s }",
    ];
    let lessor = lessor_with(&pg, engine, &dir, "trustuser", None, "", &keys).await;
    let client = &lessor.client;
    let mut first = lease(client).await;
    let id = first.granted().connection_id;
    // Released while its reply is still coming: drained, then returned.
    first
        .send(query_message("SELECT pg_sleep(0.2)"))
        .await
        .unwrap();
    let ended = first.release(Disposition::Return).await.unwrap();
    assert_eq!(
        (ended.disposition(), ended.reason()),
        (Disposition::Return, EndReason::ClientRelease),
        "{ended:?}"
    );
    for _ in 0..3 {
        let mut next = next_lease_on(client, id).await;
        assert_eq!(query(&mut next, "SELECT 1").await.status, b'I');
        next.release(Disposition::Return).await.unwrap();
    }
    // Every checkout ran the empty-query probe, and every one passed.
    let stats = lessor.stats("up").await;
    assert!(stats.health_checks >= 3, "{stats:#?}");
    assert_eq!(stats.health_check_failures, 0, "{stats:#?}");
}

async fn pg_password_file_is_reread_on_each_dial(engine: EngineKind) {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lessor = lessor(&pg, engine, &dir, "md5user", Some("md5pw"), "").await;
    let client = &lessor.client;
    let idle = || async { lessor.stats("up").await.idle > 0 };
    crate::support::eventually("the first dial", idle).await;
    // The Secret rotates: the server's password and the mounted file. The
    // session opened before keeps working.
    pg.admin()
        .await
        .batch_execute("SET password_encryption = 'md5'; ALTER ROLE md5user PASSWORD 'rotated'")
        .await
        .unwrap();
    std::fs::write(dir.path().join("md5user.password"), "rotated\n").unwrap();
    let before = lease(client).await;
    let old = before.granted().connection_id;
    before.release(Disposition::Evict).await.unwrap();
    // The refill dials after the rotation: only the file's new content
    // opens the session.
    crate::support::eventually("a dial with the rotated password", idle).await;
    let mut next = lease(client).await;
    assert_ne!(next.granted().connection_id, old, "a new dial");
    assert_eq!(
        query(&mut next, "SELECT current_user").await.rows,
        [Some("md5user".into())]
    );
    next.release(Disposition::Return).await.unwrap();
}

/// libpq's `PQexecParams("COPY ... FROM STDIN")`: Parse, Bind, Describe,
/// Execute and Sync at once, then the data, CopyDone and a second Sync.
/// PostgreSQL ignores the Sync that arrives in COPY and answers one
/// ReadyForQuery: the session is clean, returned at once.
async fn pg_libpq_copy_with_two_syncs_is_a_clean_return(engine: EngineKind) {
    let Some((pg, _dir, lessor)) = fixture(engine, "").await else {
        return;
    };
    table(&pg).await;
    let client = &lessor.client;
    let mut lease = lease(client).await;
    let id = lease.granted().connection_id;
    let mut batch = BytesMut::new();
    frontend::parse("", "COPY t FROM STDIN", None, &mut batch).unwrap();
    batch.put_slice(b"B\0\0\0\x0c\0\0\0\0\0\0\0\0"); // unnamed portal and statement, nothing bound
    batch.put_slice(b"D\0\0\0\x06P\0");
    batch.put_slice(b"E\0\0\0\x09\0\0\0\0\0");
    frontend::sync(&mut batch);
    lease.send(batch.freeze()).await.unwrap();
    let mut buf = BytesMut::new();
    while !buf.contains(&b'G') {
        let data = tokio::time::timeout(PATIENCE, lease.recv())
            .await
            .expect("CopyInResponse in time")
            .unwrap()
            .expect("lease alive");
        buf.extend_from_slice(&data);
    }
    let mut rest = BytesMut::new();
    rest.put_slice(b"d\0\0\0\x0a41\n42\n");
    rest.put_slice(b"c\0\0\0\x04");
    frontend::sync(&mut rest);
    lease.send(rest.freeze()).await.unwrap();
    let reply = read_reply(&mut lease).await;
    assert_eq!((reply.error, reply.status), (None, b'I'));
    let ended = lease.release(Disposition::Return).await.unwrap();
    assert_eq!(
        (ended.disposition(), ended.reason(), ended.detail.as_str()),
        (Disposition::Return, EndReason::ClientRelease, "")
    );
    let mut next = next_lease_on(client, id).await;
    let reply = query(&mut next, "SELECT count(*) FROM t WHERE n IN (41, 42)").await;
    assert_eq!(reply.rows, [Some("2".to_owned())]);
    next.release(Disposition::Return).await.unwrap();
    assert_eq!(evictions(&lessor.stats("up").await, "dirty"), 0);
}

/// Whether a backend is running `sql` (as `pg_stat_activity` shows it).
async fn running(admin: &tokio_postgres::Client, sql: &str) -> bool {
    let rows = admin
        .query(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query = $1",
            &[&sql],
        )
        .await
        .unwrap();
    !rows.is_empty()
}

/// A lease evicted while its query runs: the connection closes and the
/// query is cancelled, instead of running on in a backend nobody reads.
async fn pg_evicted_lease_cancels_its_running_query(engine: EngineKind) {
    let Some((pg, _dir, lessor)) = fixture(engine, "").await else {
        return;
    };
    let admin = pg.admin().await;
    let sql = "SELECT pg_sleep(600) -- lessor evict test";
    let mut lease = lease(&lessor.client).await;
    lease.send(query_message(sql)).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !running(&admin, sql).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the query never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let ended = lease.release(Disposition::Evict).await.unwrap();
    assert_eq!(ended.disposition(), Disposition::Evict);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while running(&admin, sql).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the evicted lease's query still runs"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// After an Exchange that leaves a transaction open with changed reported
/// parameters (rolled back, then reset), the next Granted carries what the
/// server last reported: the values it had before.
async fn pg_granted_parameters_are_what_the_server_last_reported(engine: EngineKind) {
    let Some((_pg, _dir, lessor)) = fixture(engine, "").await else {
        return;
    };
    let client = &lessor.client;
    let first = lease(client).await;
    let id = first.granted().connection_id;
    let before = first.granted().server_parameters.clone();
    first.release(Disposition::Return).await.unwrap();
    assert_eq!(before["standard_conforming_strings"], "on");
    let reply = exchange(
        client,
        query_message(
            "BEGIN; SET standard_conforming_strings = off; SET TimeZone = 'Pacific/Chatham'",
        ),
    )
    .await
    .unwrap();
    assert_eq!((reply.error, reply.status), (None, b'T'));
    // The Exchange's settle runs in a task of the pool's: the connection is
    // leased until it is done, and the next lease waits for it.
    let next = next_lease_on(client, id).await;
    let after = &next.granted().server_parameters;
    for name in ["standard_conforming_strings", "TimeZone"] {
        assert_eq!(after[name], before[name], "{name}: {after:?}");
    }
    next.release(Disposition::Return).await.unwrap();
}
