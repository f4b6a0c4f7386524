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
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
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
