//! Failover: an upstream with `role: primary` lists a primary and its
//! replica (`discovery.static`), learns which is which from the servers
//! themselves, and follows a switch without a restart. Real servers: a
//! PostgreSQL 15 primary with a `pg_basebackup -R` streaming replica, and
//! two redis-servers switched with `REPLICAOF`.
//!
//! "No lease on a read-only session": every lease granted during a test
//! asks its own server (`pg_is_in_recovery()`, `ROLE`). With PostgreSQL,
//! where a primary cannot be demoted while it runs, none may answer
//! replica, before, during or after the switch. A Redis primary is demoted
//! live (`REPLICAOF`): its pooled sessions turn read-only under lessor,
//! which notices at the next role check (or the first `-READONLY`), so
//! only leases granted after lessor has seen the change must all be on the
//! new primary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use lessor::EngineKind;
use lessor_client::pb::{Disposition, UpstreamStats};
use lessor_client::{Client, LeaseOptions};

use crate::pg::{query, query_message};
use crate::support::postgres::Postgres;
use crate::support::redis::Redis;
use crate::support::{Lessor, PATIENCE, eventually, evictions, http};

crate::for_both_engines!(
    failover_pg_primary_moves_to_the_promoted_replica,
    failover_redis_primary_follows_replicaof,
);

/// One upstream `up` over `endpoints`, wanting the primary.
fn config(engine: EngineKind, endpoints: &[String], protocol: &str, interval: &str) -> String {
    let list = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let session = if protocol == "postgres" {
        "\n    postgres: { user: postgres, database: app }"
    } else {
        ""
    };
    format!(
        "upstreams:\n  - name: up\n    discovery: {{ static: [{list}] }}\n    role: primary\n    \
         engine: {}\n    protocol: {protocol}{session}\n    \
         pool: {{ max_size: 4, min_idle: 2, connect_timeout: 5s, checkout_timeout: 2s }}\n    \
         health: {{ interval: {interval} }}\n",
        engine.as_str()
    )
}

fn role_of(s: &UpstreamStats, addr: &str) -> String {
    s.endpoints
        .iter()
        .find(|e| e.address == addr)
        .map(|e| e.role.clone())
        .unwrap_or_default()
}

/// Leases and Exchanges in a loop until stopped, each asking its server
/// whether it is a replica; counts the leases that found one (must stay 0)
/// and the writes that succeeded.
struct Prober {
    stop: Arc<AtomicBool>,
    granted: Arc<AtomicU64>,
    /// When each lease that found a replica was granted.
    on_replica: Arc<std::sync::Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    fn start(client: Client, pg: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let on_replica = Arc::new(std::sync::Mutex::new(Vec::new()));
        let granted = Arc::new(AtomicU64::new(0));
        let (s, r, g) = (stop.clone(), on_replica.clone(), granted.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let Ok(mut lease) = client.lease("up", &LeaseOptions::default()).await else {
                    tokio::task::yield_now().await;
                    continue;
                };
                g.fetch_add(1, Ordering::Relaxed);
                let replica = if pg {
                    lease
                        .send(query_message("SELECT pg_is_in_recovery()"))
                        .await
                        .ok();
                    read_pg_first_value(&mut lease).await.map(|v| v == "t")
                } else {
                    lease.send(&b"ROLE\r\n"[..]).await.ok();
                    read_redis(&mut lease)
                        .await
                        .map(|v| redis_role(&v) == "slave")
                };
                if replica == Some(true) {
                    r.lock().unwrap().push(asked);
                }
                let _ = lease.release(Disposition::Return).await;
            }
        });
        Self {
            stop,
            on_replica,
            granted,
            task,
        }
    }

    /// Stops; the leases granted, and of those asked for after `since`,
    /// how many found a replica.
    async fn finish(self, since: Instant) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the prober stops")
            .unwrap();
        let on_replica = self.on_replica.lock().unwrap();
        (
            self.granted.load(Ordering::Relaxed),
            on_replica.iter().filter(|t| **t > since).count(),
        )
    }
}

/// The first column of the first row of a simple query's reply; `None`
/// when the lease broke or the query failed.
async fn read_pg_first_value(lease: &mut lessor_client::Lease) -> Option<String> {
    let mut buf = BytesMut::new();
    let mut reply = crate::pg::Reply::default();
    loop {
        let data = tokio::time::timeout(PATIENCE, lease.recv())
            .await
            .ok()?
            .ok()??;
        buf.extend_from_slice(&data);
        if crate::pg::parse_reply(&mut buf, &mut reply) {
            return reply.rows.first().cloned().flatten();
        }
    }
}

/// One whole Redis reply from a lease; `None` when the lease broke.
async fn read_redis(lease: &mut lessor_client::Lease) -> Option<redis::Value> {
    let mut buf = Vec::new();
    loop {
        let data = tokio::time::timeout(PATIENCE, lease.recv())
            .await
            .ok()?
            .ok()??;
        buf.extend_from_slice(&data);
        if let Ok(v) = redis::parse_redis_value(&buf) {
            return Some(v);
        }
    }
}

/// `master` or `slave` from a `ROLE` reply.
fn redis_role(v: &redis::Value) -> String {
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        },
        other => format!("{other:?}"),
    }
}

async fn failover_pg_primary_moves_to_the_promoted_replica(engine: EngineKind) {
    let Some(mut primary) = Postgres::start().await else {
        return;
    };
    // Before the base backup: the replica has the table from its start.
    primary
        .admin()
        .await
        .batch_execute("CREATE TABLE w (v int)")
        .await
        .unwrap();
    let replica = primary.start_replica().await;
    // The replica first: a dial in list order would reach it first.
    let lessor = Lessor::start(&config(
        engine,
        &[replica.addr(), primary.addr()],
        "postgres",
        "200ms",
    ))
    .await;
    let s = lessor
        .wait_for("both roles known", |s| {
            role_of(s, &primary.addr()) == "primary" && role_of(s, &replica.addr()) == "replica"
        })
        .await;
    assert_eq!(
        s.endpoints
            .iter()
            .find(|e| e.address == replica.addr())
            .unwrap()
            .connections,
        0,
        "no pooled connection to the replica: {s:#?}"
    );
    let started = Instant::now();
    let prober = Prober::start(lessor.client.clone(), true);
    // Leases and Exchange reach the primary only.
    for _ in 0..4 {
        let mut lease = lessor.lease().await.unwrap();
        assert_eq!(lease.granted().endpoint, primary.addr());
        let reply = query(&mut lease, "INSERT INTO w VALUES (1)").await;
        assert_eq!(reply.error, None, "{reply:?}");
        lease.release(Disposition::Return).await.unwrap();
        let reply = lessor
            .client
            .exchange("up", query_message("INSERT INTO w VALUES (2)"), None)
            .await
            .unwrap();
        assert_eq!(reply.endpoint, primary.addr());
    }
    let metrics = http::fetch(&lessor.admin, "/metrics", None)
        .await
        .unwrap()
        .body;
    let line = format!(
        "lessor_endpoint_role{{upstream=\"up\",endpoint=\"{}\",role=\"replica\"}} 1",
        replica.addr()
    );
    assert!(metrics.contains(&line), "{line} in\n{metrics}");

    // The primary dies; readiness says no primary is left.
    primary.kill();
    eventually("not ready without a primary", || async {
        http::fetch(&lessor.admin, "/readyz", None)
            .await
            .is_ok_and(|r| r.status == 503)
    })
    .await;
    // Promotion: the same lessor, no restart, moves to the new primary.
    replica
        .admin()
        .await
        .batch_execute("SELECT pg_promote()")
        .await
        .unwrap();
    let s = lessor
        .wait_for("the promoted replica is the primary", |s| {
            role_of(s, &replica.addr()) == "primary"
        })
        .await;
    assert!(s.connections_created > 0);
    eventually("a write through lessor on the new primary", || async {
        match lessor
            .client
            .exchange("up", query_message("INSERT INTO w VALUES (3)"), None)
            .await
        {
            Ok(r) => {
                let mut buf = BytesMut::from(&r.reply[..]);
                let mut reply = crate::pg::Reply::default();
                crate::pg::parse_reply(&mut buf, &mut reply) && reply.error.is_none()
            }
            Err(_) => false,
        }
    })
    .await;
    eventually("ready again", || async {
        http::fetch(&lessor.admin, "/readyz", None)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let mut lease = lessor.lease().await.unwrap();
    assert_eq!(lease.granted().endpoint, replica.addr());
    assert_eq!(
        query(&mut lease, "SELECT pg_is_in_recovery()").await.rows,
        [Some("f".to_owned())]
    );
    lease.release(Disposition::Return).await.unwrap();
    let (granted, on_replica) = prober.finish(started).await;
    assert!(granted > 0);
    assert_eq!(on_replica, 0, "a lease was granted on a read-only session");
}

async fn failover_redis_primary_follows_replicaof(engine: EngineKind) {
    let Some(a) = Redis::start().await else {
        return;
    };
    let b = Redis::start().await.unwrap();
    b.command(replicaof(&a).as_bytes()).await.unwrap();
    let lessor = Lessor::start(&config(engine, &[b.addr(), a.addr()], "redis", "200ms")).await;
    lessor
        .wait_for("both roles known", |s| {
            role_of(s, &a.addr()) == "primary" && role_of(s, &b.addr()) == "replica"
        })
        .await;
    let prober = Prober::start(lessor.client.clone(), false);
    for _ in 0..4 {
        let reply = lessor
            .client
            .exchange("up", &b"SET k a\r\n"[..], None)
            .await
            .unwrap();
        assert_eq!(&reply.reply[..], b"+OK\r\n");
        assert_eq!(reply.endpoint, a.addr());
    }
    lessor
        .wait_for("idle connections on the primary", |s| s.idle >= 2)
        .await;

    // The switch: b takes writes, a follows it.
    assert_eq!(
        b.command(b"REPLICAOF NO ONE\r\n").await.unwrap(),
        b"+OK\r\n"
    );
    assert_eq!(
        a.command(replicaof(&b).as_bytes()).await.unwrap(),
        b"+OK\r\n"
    );
    let s = lessor
        .wait_for("the roles swapped", |s| {
            role_of(s, &a.addr()) == "replica" && role_of(s, &b.addr()) == "primary"
        })
        .await;
    let seen = Instant::now();
    let s = if evictions(&s, "role_changed") == 0 {
        lessor
            .wait_for("a's idle connections closed as role_changed", |s| {
                evictions(s, "role_changed") > 0
            })
            .await
    } else {
        s
    };
    assert!(evictions(&s, "role_changed") >= 1, "{s:#?}");
    eventually("a write through lessor on the new primary", || async {
        lessor
            .client
            .exchange("up", &b"SET k b\r\n"[..], None)
            .await
            .is_ok_and(|r| &r.reply[..] == b"+OK\r\n")
    })
    .await;
    let mut lease = lessor.lease().await.unwrap();
    assert_eq!(lease.granted().endpoint, b.addr());
    lease.send(&b"ROLE\r\n"[..]).await.unwrap();
    assert_eq!(redis_role(&read_redis(&mut lease).await.unwrap()), "master");
    lease.release(Disposition::Return).await.unwrap();
    let (granted, on_replica) = prober.finish(seen).await;
    assert!(granted > 0);
    assert_eq!(
        on_replica, 0,
        "a lease asked for after the switch was seen reached a replica"
    );
    lessor.assert_accounted().await;
}

/// With a health interval no test waits for, only the hint can make
/// lessor notice: a `-READONLY` reply has the endpoints asked at once, and
/// the demoted server's connections close (`role_changed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_redis_readonly_reply_triggers_a_role_check() {
    let Some(a) = Redis::start().await else {
        return;
    };
    let b = Redis::start().await.unwrap();
    b.command(replicaof(&a).as_bytes()).await.unwrap();
    let lessor = Lessor::start(&config(
        EngineKind::Bb8,
        &[a.addr(), b.addr()],
        "redis",
        "1h",
    ))
    .await;
    lessor
        .wait_for("a known as the primary", |s| {
            role_of(s, &a.addr()) == "primary"
        })
        .await;
    let mut lease = lessor.lease().await.unwrap();
    assert_eq!(lease.granted().endpoint, a.addr());
    b.command(b"REPLICAOF NO ONE\r\n").await.unwrap();
    a.command(replicaof(&b).as_bytes()).await.unwrap();
    lease.send(&b"SET k v\r\n"[..]).await.unwrap();
    let refused = read_redis(&mut lease).await.unwrap();
    assert!(
        format!("{refused:?}").contains("READONLY"),
        "a replica refuses the write: {refused:?}"
    );
    lease.release(Disposition::Return).await.unwrap();
    let s = lessor
        .wait_for("the hint had both servers asked", |s| {
            role_of(s, &a.addr()) == "replica"
                && role_of(s, &b.addr()) == "primary"
                && evictions(s, "role_changed") >= 1
        })
        .await;
    assert_eq!(
        s.endpoints
            .iter()
            .find(|e| e.address == a.addr())
            .unwrap()
            .connections,
        0,
        "{s:#?}"
    );
    let reply = lessor
        .client
        .exchange("up", &b"SET k w\r\n"[..], None)
        .await
        .unwrap();
    assert_eq!(
        (&reply.reply[..], reply.endpoint.as_str()),
        (&b"+OK\r\n"[..], b.addr().as_str())
    );
}

/// `REPLICAOF host port` for a server.
fn replicaof(of: &Redis) -> String {
    let addr = of.addr();
    let (host, port) = addr.rsplit_once(':').unwrap();
    format!("REPLICAOF {host} {port}\r\n")
}

/// The `lessor_role_checks_total` of `up`.
async fn role_checks(lessor: &Lessor) -> u64 {
    let metrics = http::fetch(&lessor.admin, "/metrics", None)
        .await
        .unwrap()
        .body;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("lessor_role_checks_total{upstream=\"up\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lessor_role_checks_total in\n{metrics}"))
}

/// SQLSTATE 25006 is PostgreSQL's "read-only transaction": on a `primary`
/// upstream it has the server asked at once; a primary that merely ran a
/// `READ ONLY` transaction stays the primary, and nothing is closed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_pg_read_only_refusal_asks_the_server() {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    pg.admin()
        .await
        .batch_execute("CREATE TABLE w (v int)")
        .await
        .unwrap();
    let lessor = Lessor::start(&config(EngineKind::Bb8, &[pg.addr()], "postgres", "1h")).await;
    lessor
        .wait_for("the primary known", |s| role_of(s, &pg.addr()) == "primary")
        .await;
    let before = role_checks(&lessor).await;
    let mut lease = lessor.lease().await.unwrap();
    let reply = query(&mut lease, "BEGIN READ ONLY; INSERT INTO w VALUES (1)").await;
    assert_eq!(reply.error.as_deref(), Some("25006"), "{reply:?}");
    lease.release(Disposition::Return).await.unwrap();
    eventually("the hint had the server asked", || async {
        role_checks(&lessor).await > before
    })
    .await;
    let s = lessor.stats("up").await;
    assert_eq!(role_of(&s, &pg.addr()), "primary");
    assert_eq!(evictions(&s, "role_changed"), 0, "{s:#?}");
    let mut lease = lessor.lease().await.unwrap();
    assert_eq!(
        query(&mut lease, "INSERT INTO w VALUES (2)").await.error,
        None
    );
    lease.release(Disposition::Return).await.unwrap();
}

/// `role` needs a protocol that can ask; a static list is checked entry by
/// entry.
#[test]
fn failover_config_errors_name_the_field() {
    let err = lessor::Config::from_yaml(
        "upstreams:\n  - name: up\n    address: \"127.0.0.1:1\"\n    role: primary\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("upstreams[0].role"), "{err}");
    let err = lessor::Config::from_yaml(
        "upstreams:\n  - name: up\n    protocol: redis\n    discovery: { static: [\"127.0.0.1:1\", \"nope\"] }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("upstreams[0].discovery.static[1]"), "{err}");
    let err = lessor::Config::from_yaml(
        "upstreams:\n  - name: up\n    protocol: redis\n    role: leader\n    address: \"127.0.0.1:1\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("role"), "{err}");
}

/// Two servers that both say they are the primary (a split brain): lessor
/// says so in `/readyz?verbose` and writes go to one of them only, the one
/// that was the primary first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_split_brain_is_shown_and_writes_stay_on_one_primary() {
    let Some(a) = Redis::start().await else {
        return;
    };
    let b = Redis::start().await.unwrap();
    let lessor = Lessor::start(&config(
        EngineKind::Deadpool,
        &[a.addr(), b.addr()],
        "redis",
        "100ms",
    ))
    .await;
    lessor
        .wait_for("both known as primaries", |s| {
            role_of(s, &a.addr()) == "primary" && role_of(s, &b.addr()) == "primary"
        })
        .await;
    let verbose = http::fetch(&lessor.admin, "/readyz?verbose", None)
        .await
        .unwrap()
        .body;
    assert!(verbose.contains("split brain"), "{verbose}");
    let mut served = std::collections::BTreeSet::new();
    // Fresh connections each time: max_size 4 with 8 held at once dials.
    for _ in 0..4 {
        let mut leases = Vec::new();
        for _ in 0..4 {
            let lease = lessor.lease().await.unwrap();
            served.insert(lease.granted().endpoint.clone());
            leases.push(lease);
        }
        for lease in leases {
            lease.release(Disposition::Evict).await.unwrap();
        }
    }
    assert_eq!(served.len(), 1, "writes went to {served:?}");
}

/// PostgreSQL reports a reloaded setting (and a promotion's
/// `in_hot_standby`) to idle sessions with their next answer: the probe
/// reads past the ParameterStatus, records it, and is no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_pg_reports_before_a_probe_answer_are_recorded_not_failures() {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    let lessor = Lessor::start(&config(EngineKind::Bb8, &[pg.addr()], "postgres", "100ms")).await;
    lessor.wait_for("two idle", |s| s.idle >= 2).await;
    let admin = pg.admin().await;
    admin
        .batch_execute("ALTER SYSTEM SET \"DateStyle\" = 'SQL, DMY'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let before = lessor.stats("up").await.health_checks;
    lessor
        .wait_for("idle connections probed after the reload", |s| {
            s.health_checks >= before + 6
        })
        .await;
    let s = lessor.stats("up").await;
    assert_eq!(s.health_check_failures, 0, "{s:#?}");
    assert_eq!(evictions(&s, "health_check"), 0, "{s:#?}");
    let lease = lessor.lease().await.unwrap();
    assert_eq!(
        lease
            .granted()
            .server_parameters
            .get("DateStyle")
            .map(String::as_str),
        Some("SQL, DMY"),
        "the report the probe read is on the session's record"
    );
    lease.release(Disposition::Return).await.unwrap();
}

/// On a `replica` upstream a refused write is the normal answer, not a
/// hint: a client writing in a loop makes lessor dial nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_writes_refused_by_a_replica_upstream_cause_no_dials() {
    let Some(a) = Redis::start().await else {
        return;
    };
    let b = Redis::start().await.unwrap();
    b.command(replicaof(&a).as_bytes()).await.unwrap();
    let yaml = config(EngineKind::Bb8, &[a.addr(), b.addr()], "redis", "1h")
        .replace("role: primary", "role: replica");
    let lessor = Lessor::start(&yaml).await;
    lessor
        .wait_for("b known as the replica", |s| {
            role_of(s, &b.addr()) == "replica" && s.idle >= 2
        })
        .await;
    let (a_before, b_before) = (dials(&a).await, dials(&b).await);
    for _ in 0..100 {
        let reply = lessor
            .client
            .exchange("up", &b"SET k v\r\n"[..], None)
            .await
            .unwrap();
        assert!(reply.reply.starts_with(b"-READONLY"), "{reply:?}");
        assert_eq!(reply.endpoint, b.addr());
    }
    // Our own INFO connections count too: one each per call above.
    assert_eq!(dials(&a).await, a_before + 1, "no dial to the primary");
    // The pool may grow to max_size (4) while Exchanges overlap its refill;
    // a hint per refused write would have dialed a hundred times.
    assert!(
        dials(&b).await <= b_before + 1 + 4,
        "connections churned on the replica"
    );
}

/// Connections the server has accepted so far (`INFO stats`).
async fn dials(r: &Redis) -> u64 {
    r.info_field("stats", "total_connections_received")
        .await
        .unwrap()
}

/// Where the pool's user may not run `ROLE` (here the command is renamed
/// away, as some managed Redis offerings do), the role comes from `INFO
/// replication`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_redis_without_role_reads_info_replication() {
    let Some(a) = Redis::start_with(&["--rename-command", "ROLE", ""]).await else {
        return;
    };
    let b = Redis::start_with(&["--rename-command", "ROLE", ""])
        .await
        .unwrap();
    b.command(replicaof(&a).as_bytes()).await.unwrap();
    assert!(
        String::from_utf8_lossy(&a.command(b"ROLE\r\n").await.unwrap()).starts_with("-ERR"),
        "ROLE is not available"
    );
    let lessor = Lessor::start(&config(
        EngineKind::Bb8,
        &[b.addr(), a.addr()],
        "redis",
        "100ms",
    ))
    .await;
    lessor
        .wait_for("both roles known from INFO", |s| {
            role_of(s, &a.addr()) == "primary" && role_of(s, &b.addr()) == "replica"
        })
        .await;
    let reply = lessor
        .client
        .exchange("up", &b"SET k v\r\n"[..], None)
        .await
        .unwrap();
    assert_eq!(
        (&reply.reply[..], reply.endpoint.as_str()),
        (&b"+OK\r\n"[..], a.addr().as_str())
    );
}
