//! The native PostgreSQL listener, with real clients against a real
//! PostgreSQL 15: tokio-postgres, `psql` and `pgbench` connect to lessor as
//! to the database. Every pooling rule is checked by what the next client
//! on the same server connection sees, and by `pg_stat_activity`.

use lessor::EngineKind;

use crate::for_both_engines;
use crate::support::postgres::Postgres;
use crate::support::{Lessor, PATIENCE, config_one, eventually, ports};

for_both_engines!(
    pg_listen_serves_tokio_postgres_and_pools_transactions,
    pg_listen_rolls_back_what_a_vanished_client_left_open,
    pg_listen_psql_and_pgbench_run_unchanged,
    pg_listen_refuses_what_it_must,
    pg_listen_cancel_reaches_the_query_of_its_client,
    pg_listen_scram_checks_the_listener_password,
    pg_listen_drain_tells_idle_clients_to_go,
    pg_listen_keeps_each_clients_session_its_own,
);

/// PostgreSQL, and lessor with a listener of `mode` in front of it with
/// `max_size` server connections; the listener's port.
async fn fixture(
    engine: EngineKind,
    mode: &str,
    max_size: u32,
    listen_extra: &str,
) -> Option<(Postgres, Lessor, u16)> {
    let pg = Postgres::start().await?;
    let port = ports::reserve();
    let listen =
        format!("listen: {{ address: \"127.0.0.1:{port}\", pool_mode: {mode}{listen_extra} }}");
    let pool = format!(
        "pool: {{ max_size: {max_size}, min_idle: 1, connect_timeout: 10s, checkout_timeout: 10s }}"
    );
    let lessor = Lessor::start(&config_one(
        &pg.addr(),
        engine,
        &[
            "protocol: postgres",
            "postgres: { user: trustuser, database: app }",
            &pool,
            &listen,
        ],
    ))
    .await;
    // The listener binds as the server starts: wait until it accepts.
    eventually("the listener accepts", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    Some((pg, lessor, port))
}

/// A tokio-postgres client of lessor's listener.
async fn client(port: u16, app: &str) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("trustuser")
        .dbname("app")
        .application_name(app)
        .connect_timeout(PATIENCE);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to the listener: {e}"));
    tokio::spawn(connection);
    client
}

/// The first column of the first row of a simple query.
async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

/// Backends of `app` as PostgreSQL sees them: (state, count).
async fn backends(pg: &Postgres) -> Vec<(String, i64)> {
    let admin = pg.admin().await;
    let rows = admin
        .query(
            "SELECT coalesce(state, ''), count(*) FROM pg_stat_activity \
             WHERE datname = 'app' AND usename = 'trustuser' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

async fn pg_listen_serves_tokio_postgres_and_pools_transactions(engine: EngineKind) {
    let Some((pg, lessor, port)) = fixture(engine, "transaction", 2, "").await else {
        return;
    };
    let a = client(port, "alpha").await;
    assert_eq!(one(&a, "SELECT 1").await, "1");
    a.batch_execute("CREATE TABLE IF NOT EXISTS t (v int)")
        .await
        .unwrap();
    // Twelve clients, two server connections: each transaction holds one.
    let mut clients = Vec::new();
    for i in 0..12 {
        clients.push(client(port, &format!("c{i}")).await);
    }
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for j in 0..5 {
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO t VALUES ({}); COMMIT",
                    i * 10 + j
                ))
                .await
                .unwrap();
            }
            // The extended protocol with the unnamed statement.
            let rows = c
                .query_typed(
                    "SELECT $1::int + 1",
                    &[(&41i32, tokio_postgres::types::Type::INT4)],
                )
                .await
                .unwrap();
            let v: i32 = rows[0].get(0);
            assert_eq!(v, 42);
            // Named prepared statements (tokio-postgres names each one),
            // used across transactions that land on either connection,
            // and pipelined.
            let stmt = c.prepare("SELECT $1::int * 2").await.unwrap();
            for k in 0..5i32 {
                let k1 = k + 1;
                let (a1, a2): (
                    &[&(dyn tokio_postgres::types::ToSql + Sync)],
                    &[&(dyn tokio_postgres::types::ToSql + Sync)],
                ) = (&[&k], &[&k1]);
                let (x, y) = futures::join!(c.query_one(&stmt, a1), c.query_one(&stmt, a2));
                assert_eq!(x.unwrap().get::<_, i32>(0), k * 2);
                assert_eq!(y.unwrap().get::<_, i32>(0), k1 * 2);
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    assert_eq!(one(&a, "SELECT count(*) FROM t").await, "60");
    let stats = lessor.stats("up").await;
    assert!(stats.connections <= 2, "{stats:?}");
    // Nothing is left inside a transaction on the server.
    eventually("no backend idle in transaction", || async {
        backends(&pg)
            .await
            .iter()
            .all(|(state, _)| state != "idle in transaction")
    })
    .await;
    // A parameter set outside a transaction follows its client, not the
    // connection.
    let b = &clients[0];
    let zone = one(b, "SHOW TimeZone").await;
    assert_ne!(zone, "Asia/Tokyo");
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    for _ in 0..4 {
        assert_eq!(one(b, "SHOW TimeZone").await, zone, "b's own zone");
        assert_eq!(one(&a, "SHOW TimeZone").await, "Asia/Tokyo", "a's zone");
        assert_eq!(one(b, "SHOW application_name").await, "c0");
    }
    drop(clients);
    drop(a);
    drop(lessor);
}

async fn pg_listen_rolls_back_what_a_vanished_client_left_open(engine: EngineKind) {
    let Some((pg, _lessor, port)) = fixture(engine, "transaction", 1, "").await else {
        return;
    };
    let a = client(port, "a").await;
    a.batch_execute("CREATE TABLE IF NOT EXISTS v (x int)")
        .await
        .unwrap();
    a.batch_execute("BEGIN; INSERT INTO v VALUES (1)")
        .await
        .unwrap();
    drop(a);
    // The only server connection is the one `a` left mid-transaction: the
    // next client gets it rolled back.
    let b = client(port, "b").await;
    assert_eq!(one(&b, "SELECT count(*) FROM v").await, "0");
    assert_eq!(one(&b, "SELECT 1").await, "1");
    eventually("no backend idle in transaction", || async {
        backends(&pg)
            .await
            .iter()
            .all(|(state, _)| state != "idle in transaction")
    })
    .await;
}

/// A PostgreSQL 15 client program (`psql`, `pgbench`) with `args`, run to
/// its end off the runtime; (success, stdout, stderr).
async fn program(name: &str, args: Vec<String>) -> (bool, String, String) {
    let path = format!("/usr/lib/postgresql/15/bin/{name}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(path)
            .args(&args)
            .env("PGCONNECT_TIMEOUT", "15")
            .env_remove("PGPASSWORD")
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn conn_args(host: &str, port: u16) -> Vec<String> {
    ["-h", host, "-p", &port.to_string(), "-U", "trustuser"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

async fn pg_listen_psql_and_pgbench_run_unchanged(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(", unix_socket_dir: \"{}\"", dir.path().display());
    let Some((pg, _lessor, port)) = fixture(engine, "transaction", 2, &extra).await else {
        return;
    };
    // psql: several statements in one string, an error inside a
    // transaction, a large result; over TCP and over the Unix socket.
    let mut args = conn_args("127.0.0.1", port);
    args.extend([
        "-d".into(),
        "app".into(),
        "-At".into(),
        "-c".into(),
        "SELECT 1; SELECT 2".into(),
        "-c".into(),
        "SELECT count(*) FROM generate_series(1, 100000)".into(),
    ]);
    let (ok, out, err) = program("psql", args).await;
    assert!(ok, "psql: {err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1", "2", "100000"]);
    let mut args = conn_args(&dir.path().display().to_string(), port);
    args.extend([
        "-d".into(),
        "app".into(),
        "-At".into(),
        "-v".into(),
        "ON_ERROR_STOP=0".into(),
        "-c".into(),
        "BEGIN".into(),
        "-c".into(),
        "SELECT 1/0".into(),
        "-c".into(),
        "ROLLBACK".into(),
        "-c".into(),
        "SELECT 'after'".into(),
    ]);
    let (_, out, err) = program("psql", args).await;
    assert!(err.contains("division by zero"), "{err}");
    assert!(out.contains("after"), "{out} {err}");
    // pgbench: COPY through `-i`, then each query mode.
    let mut args = conn_args("127.0.0.1", port);
    args.extend([
        "-i".into(),
        "-s".into(),
        "1".into(),
        "-q".into(),
        "app".into(),
    ]);
    let (ok, _, err) = program("pgbench", args).await;
    assert!(ok, "pgbench -i: {err}");
    for mode in ["simple", "extended", "prepared"] {
        let mut args = conn_args("127.0.0.1", port);
        args.extend(
            // One thread per client: pgbench -M prepared prepares with a
            // blocking call, and a thread blocked there while another of
            // its clients holds a connection mid-transaction waits on
            // itself under any transaction pooler.
            ["-S", "-c", "6", "-j", "6", "-t", "50", "-M", mode, "app"]
                .iter()
                .map(|s| (*s).to_owned()),
        );
        let (ok, out, err) = program("pgbench", args).await;
        assert!(ok, "pgbench -M {mode}: {err}");
        assert!(out.contains("number of failed transactions: 0"), "{out}");
        // The TPC-B-like script: transactions with updates.
        let mut args = conn_args("127.0.0.1", port);
        args.extend(
            ["-c", "4", "-j", "4", "-t", "20", "-M", mode, "app"]
                .iter()
                .map(|s| (*s).to_owned()),
        );
        let (ok, out, err) = program("pgbench", args).await;
        assert!(ok, "pgbench -M {mode} (tpcb): {err}");
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
    eventually("no backend idle in transaction", || async {
        backends(&pg)
            .await
            .iter()
            .all(|(state, _)| state != "idle in transaction")
    })
    .await;
}

async fn pg_listen_refuses_what_it_must(engine: EngineKind) {
    let Some((_pg, _lessor, port)) = fixture(
        engine,
        "transaction",
        1,
        ", max_clients: 2, startup_timeout: 1s",
    )
    .await
    else {
        return;
    };
    let connect = |user: &'static str, db: &'static str| async move {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user(user)
            .dbname(db)
            .connect_timeout(PATIENCE);
        config
            .connect(tokio_postgres::NoTls)
            .await
            .map(|(c, conn)| {
                tokio::spawn(conn);
                c
            })
    };
    let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_owned());
    let err = connect("someone", "app").await.err().unwrap();
    assert_eq!(code(err), Some("28000".into()));
    let err = connect("trustuser", "other").await.err().unwrap();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "3D000");
    assert!(db.message().contains("serves database \"app\""), "{db:?}");
    // max_clients: 2.
    let a = connect("trustuser", "app").await.unwrap();
    let b = connect("trustuser", "app").await.unwrap();
    let err = connect("trustuser", "app").await.err().unwrap();
    assert_eq!(code(err), Some("53300".into()));
    drop((a, b));
    // A client that never sends its startup packet is closed.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut silent, &mut sink),
    )
    .await;
    assert!(read.is_ok(), "closed after startup_timeout");
    assert!(String::from_utf8_lossy(&sink).contains("startup timed out"));
    // A client that breaks the protocol after startup gets FATAL 08P01.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut startup = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "trustuser"), ("database", "app")],
        &mut startup,
    )
    .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(&startup).await.unwrap();
    // A Query whose length field says 2: below its own four bytes.
    raw.write_all(b"Q\0\0\0\x02").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, raw.read_to_end(&mut answer))
        .await
        .expect("closed after the violation")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("08P01"), "{text}");
    // A slot is free again once the rejected clients are gone.
    eventually("a slot is free again", || async {
        connect("trustuser", "app").await.is_ok()
    })
    .await;
}

async fn pg_listen_cancel_reaches_the_query_of_its_client(engine: EngineKind) {
    let Some((_pg, _lessor, port)) = fixture(engine, "transaction", 2, "").await else {
        return;
    };
    let a = client(port, "a").await;
    let b = client(port, "b").await;
    let token = a.cancel_token();
    let sleeping = tokio::spawn(async move {
        let result = a.simple_query("SELECT pg_sleep(30)").await;
        (a, result)
    });
    // b's query runs beside a's and is not cancelled.
    let b_task = tokio::spawn(async move {
        let result = b.simple_query("SELECT pg_sleep(0.5)").await;
        (b, result)
    });
    eventually("a's query is running", || async {
        let probe = client(port, "probe").await;
        one(&probe, "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'").await == "1"
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (_a, result) = tokio::time::timeout(PATIENCE, sleeping)
        .await
        .unwrap()
        .unwrap();
    let err = result.expect_err("cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"));
    let (_b, result) = b_task.await.unwrap();
    assert!(result.is_ok(), "b's query is not cancelled: {result:?}");
}

async fn pg_listen_scram_checks_the_listener_password(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clients.password");
    std::fs::write(&file, "client-secret\n").unwrap();
    let extra = format!(
        ", auth: scram-sha-256, password_file: \"{}\"",
        file.display()
    );
    let Some((_pg, _lessor, port)) = fixture(engine, "transaction", 1, &extra).await else {
        return;
    };
    let connect = |password: &'static str| async move {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("trustuser")
            .dbname("app")
            .password(password)
            .connect_timeout(PATIENCE);
        config
            .connect(tokio_postgres::NoTls)
            .await
            .map(|(c, conn)| {
                tokio::spawn(conn);
                c
            })
    };
    let c = connect("client-secret").await.unwrap();
    assert_eq!(one(&c, "SELECT 7").await, "7");
    let err = connect("wrong").await.err().unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    assert!(!format!("{err}").contains("client-secret"));
}

async fn pg_listen_drain_tells_idle_clients_to_go(engine: EngineKind) {
    let Some((_pg, mut lessor, port)) = fixture(engine, "transaction", 1, "").await else {
        return;
    };
    let idle = client(port, "idle").await;
    assert_eq!(one(&idle, "SELECT 1").await, "1");
    lessor.begin_shutdown();
    eventually("the idle client is told to go", || async {
        idle.is_closed() || idle.simple_query("SELECT 1").await.is_err()
    })
    .await;
    lessor.stopped().await.unwrap();
}

/// What a hostile review found, each on two server connections shared by
/// several clients: none of one client's session reaches another.
async fn pg_listen_keeps_each_clients_session_its_own(engine: EngineKind) {
    let Some((_pg, _lessor, port)) = fixture(engine, "transaction", 2, "").await else {
        return;
    };
    let a = client(port, "a").await;
    let default_zone = one(&a, "SHOW TimeZone").await;
    // Session state lessor cannot carry pins its client: B never sees it.
    a.batch_execute("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    a.batch_execute("CREATE TEMP TABLE mine (x int)")
        .await
        .unwrap();
    let b = client(port, "b").await;
    for _ in 0..4 {
        assert_eq!(one(&b, "SHOW statement_timeout").await, "0");
        assert!(b.simple_query("SELECT * FROM mine").await.is_err());
    }
    assert_eq!(one(&a, "SHOW statement_timeout").await, "1234ms");
    // Reported parameters a client set are not the next client's defaults.
    b.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let c = client(port, "c").await;
    assert_eq!(one(&c, "SHOW TimeZone").await, default_zone);
    // DEALLOCATE ALL through the extended protocol does not break another
    // client's statement.
    let stmt = c.prepare("SELECT $1::int + 100").await.unwrap();
    b.query("DEALLOCATE ALL", &[]).await.unwrap();
    for k in 0..4i32 {
        let row = c.query_one(&stmt, &[&k]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), k + 100);
    }
    // Half a message does not hold a connection.
    use tokio::io::AsyncWriteExt;
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut startup = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "trustuser"), ("database", "app")],
        &mut startup,
    )
    .unwrap();
    let mut query = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT 1", &mut query).unwrap();
    raw.write_all(&startup).await.unwrap();
    raw.write_all(&query).await.unwrap();
    raw.write_all(b"Q\0\0").await.unwrap();
    let d = client(port, "d").await;
    let e = client(port, "e").await;
    assert_eq!(one(&d, "SELECT 2").await, "2");
    assert_eq!(one(&e, "SELECT 3").await, "3");
    // A startup value the server refuses ends that client, not the pool.
    let bogus = {
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut startup = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [
                ("user", "trustuser"),
                ("database", "app"),
                ("TimeZone", "Bogus/Zone"),
            ],
            &mut startup,
        )
        .unwrap();
        raw.write_all(&startup).await.unwrap();
        raw.write_all(&query).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(
            PATIENCE,
            tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut answer),
        )
        .await
        .expect("closed")
        .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    assert!(bogus.contains("22023"), "{bogus}");
    assert_eq!(one(&d, "SELECT 4").await, "4");
    drop(raw);
}
