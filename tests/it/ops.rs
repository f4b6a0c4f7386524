//! Operating lessor: who holds the connections. `/debug/leases` and
//! `lessor leases` list every live lease with its holder and the caller's
//! trace id, and `lease.warn_after` names an overdue lease in the log,
//! against a real `lessor serve` and redis-server.

use std::time::Duration;

use lessor_client::{ClientError, LeaseOptions};
use tonic::Code;

use crate::support::process::Served;
use crate::support::redis::Redis;
use crate::support::{PATIENCE, eventually, http};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn yaml(redis: &Redis) -> String {
    format!(
        "upstreams:\n  - name: cache\n    address: \"{}\"\n    protocol: redis\n    pool: {{ min_idle: 1 }}\n    lease: {{ warn_after: 300ms }}\n  - name: other\n    address: \"{}\"\n",
        redis.addr(),
        redis.addr()
    )
}

async fn leases_json(admin: &str, query: &str) -> Vec<serde_json::Value> {
    let got = http::fetch(admin, &format!("/debug/leases?format=json{query}"), None)
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{}", got.body);
    serde_json::from_str(&got.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_live_leases_name_their_holder_and_trace() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let served = Served::start(&yaml(&redis)).await;
    let client = served.client().await;
    // A value larger than the stream's flow-control window (1 MiB).
    let big = vec![b'x'; 4 << 20];
    let mut set = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", big.len()).into_bytes();
    set.extend_from_slice(&big);
    set.extend_from_slice(b"\r\n");
    client.exchange("cache", set, None).await.unwrap();

    let options = LeaseOptions {
        holder: "GET /checkout".into(),
        metadata: vec![(
            "traceparent".into(),
            format!("00-{TRACE_ID}-00f067aa0ba902b7-01"),
        )],
        ..LeaseOptions::default()
    };
    let mut lease = client.lease("cache", &options).await.unwrap();
    let granted = lease.granted().clone();
    // The client asks for the value and stops reading: the lease waits on it.
    lease.send(&b"GET big\r\n"[..]).await.unwrap();
    let admin = served.admin.clone();
    eventually("the lease to show as stalled", || async {
        let rows = leases_json(&admin, "").await;
        rows.len() == 1 && rows[0]["state"] == "stalled"
    })
    .await;
    let row = leases_json(&admin, "&upstream=cache&older_than=100ms").await[0].clone();
    assert_eq!(row["lease_id"], granted.lease_id.as_str());
    assert_eq!(row["holder"], "GET /checkout");
    assert_eq!(row["trace_id"], TRACE_ID);
    assert_eq!(row["connection_id"], granted.connection_id);
    assert_eq!(row["endpoint"], granted.endpoint.as_str());
    assert_eq!(row["bytes_to_upstream"], 9);
    assert!(row["bytes_to_client"].as_u64().unwrap() > 0, "{row}");
    assert!(row["age_ms"].as_u64().unwrap() >= 1000, "{row}");
    assert!(leases_json(&admin, "&upstream=other").await.is_empty());
    assert!(leases_json(&admin, "&older_than=1h").await.is_empty());
    let bad = http::fetch(&admin, "/debug/leases?older_than=soon", None)
        .await
        .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);

    // The table, through the CLI.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(["leases", "--admin", &admin, "--older-than", "500ms"])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.starts_with("LEASE"), "{table}");
    assert!(
        table.contains("GET /checkout") && table.contains(TRACE_ID),
        "{table}"
    );
    assert!(
        table.contains("stalled") && table.ends_with("(1 live lease)\n"),
        "{table}"
    );

    // lease.warn_after: one warning, naming the holder and the trace.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let warning = loop {
        let log = served.stdout();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("lease held longer than lease.warn_after"))
        {
            break line.to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "no warning:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        warning.contains("GET /checkout") && warning.contains(TRACE_ID),
        "{warning}"
    );
    assert!(warning.contains(&granted.lease_id), "{warning}");

    // Gone from the list once it ends.
    drop(lease);
    eventually("the ended lease to leave the list", || async {
        leases_json(&admin, "").await.is_empty()
    })
    .await;
    let log = served.stdout();
    assert_eq!(
        log.matches("lease held longer than lease.warn_after")
            .count(),
        1,
        "one warning per lease:\n{log}"
    );

    // A holder is a name, not a payload.
    let long = LeaseOptions {
        holder: "x".repeat(300),
        ..LeaseOptions::default()
    };
    match client.lease("cache", &long).await {
        Err(ClientError::Status(s)) => assert_eq!(s.code(), Code::InvalidArgument, "{s:?}"),
        other => panic!("{other:?}"),
    }
}

/// Runs `lessor ARGS...`; its exit code and stdout (stderr appended).
async fn lessor_cli(args: &[&str]) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(args)
        .output()
        .await
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

async fn post(addr: &str, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// PgBouncer's PAUSE / RESUME / RECONNECT: a paused upstream makes new
/// checkouts wait (a live lease carries on, readiness does not change),
/// resume lets them through, and reconnect replaces every connection: idle
/// ones at once, a leased one at its return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_pause_resume_and_reconnect() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let served = Served::start(&format!(
        "upstreams:\n  - name: cache\n    address: \"{}\"\n    pool: {{ max_size: 4, min_idle: 2, checkout_timeout: 10s }}\n  - name: other\n    address: \"{}\"\n",
        redis.addr(),
        redis.addr()
    ))
    .await;
    let client = served.client().await;
    let control = served.control.clone();
    let mut live = client
        .lease("cache", &LeaseOptions::default())
        .await
        .unwrap();
    let live_id = live.granted().connection_id;

    let (code, out) = lessor_cli(&["pause", "cache", "--control", &control]).await;
    assert_eq!((code, out.as_str()), (Some(0), "paused: cache\n"));
    let stats = served
        .client()
        .await
        .stats("cache")
        .await
        .unwrap()
        .remove(0);
    assert!(stats.paused && stats.ready, "{stats:#?}");
    let metrics = http::fetch(&served.admin, "/metrics", None)
        .await
        .unwrap()
        .body;
    assert!(
        metrics.contains("lessor_upstream_paused{upstream=\"cache\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lessor_upstream_paused{upstream=\"other\"} 0"),
        "{metrics}"
    );
    let readyz = http::fetch(&served.admin, "/readyz?verbose", None)
        .await
        .unwrap();
    assert_eq!(readyz.status, 200, "paused is not unready: {}", readyz.body);
    assert!(readyz.body.contains("paused"), "{}", readyz.body);

    // A checkout waits; a short one gives up saying why.
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.lease("cache", &LeaseOptions::default()).await })
    };
    eventually("the checkout to wait", || async {
        client.stats("cache").await.unwrap()[0].waiting == 1
    })
    .await;
    let short = LeaseOptions {
        checkout_timeout: Some(Duration::from_millis(200)),
        ..LeaseOptions::default()
    };
    match client.lease("cache", &short).await {
        Err(ClientError::Status(s)) => {
            assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
            assert!(s.message().contains("paused"), "{s:?}");
        }
        other => panic!("{other:?}"),
    }
    // The live lease carries on; another upstream is not paused.
    live.send(&b"PING\r\n"[..]).await.unwrap();
    assert_eq!(&live.recv_at_least(7).await.unwrap()[..], b"+PONG\r\n");
    let other = client
        .lease("other", &LeaseOptions::default())
        .await
        .unwrap();
    other
        .release(lessor_client::pb::Disposition::Return)
        .await
        .unwrap();

    let (code, out) = lessor_cli(&["resume", "--control", &control]).await;
    assert_eq!((code, out.as_str()), (Some(0), "resumed: cache, other\n"));
    let granted = waiter.await.unwrap().unwrap();
    granted
        .release(lessor_client::pb::Disposition::Return)
        .await
        .unwrap();

    // Reconnect: the idle connections close now, the leased one at its
    // return, and every later lease is on a connection dialed after it.
    let before = client.stats("cache").await.unwrap().remove(0);
    let (code, out) = lessor_cli(&["reconnect", "cache", "--control", &control]).await;
    assert_eq!((code, out.as_str()), (Some(0), "reconnecting: cache\n"));
    let evicted = |s: &lessor_client::pb::UpstreamStats| crate::support::evictions(s, "reconnect");
    let stats = client.stats("cache").await.unwrap().remove(0);
    assert!(evicted(&stats) >= 1, "idle ones closed at once: {stats:#?}");
    let ended = live
        .release(lessor_client::pb::Disposition::Return)
        .await
        .unwrap();
    assert_eq!(
        ended.disposition(),
        lessor_client::pb::Disposition::Evict,
        "{ended:?}"
    );
    // Every connection open at the reconnect was closed for it.
    eventually("every old connection to be replaced", || async {
        evicted(&client.stats("cache").await.unwrap()[0]) >= u64::from(before.connections)
    })
    .await;
    let next = client
        .lease("cache", &LeaseOptions::default())
        .await
        .unwrap();
    assert_ne!(next.granted().connection_id, live_id);
    let after = client.stats("cache").await.unwrap().remove(0);
    assert!(
        after.connections_created > before.connections_created,
        "{after:#?}"
    );
    next.release(lessor_client::pb::Disposition::Return)
        .await
        .unwrap();

    // Bad requests, and the control endpoints are not on the admin port.
    assert_eq!(post(&control, "/admin/pause?upstream=nope").await.0, 404);
    assert_eq!(post(&control, "/admin/pause?colour=red").await.0, 400);
    let get = http::fetch(&control, "/admin/pause", None).await.unwrap();
    assert_eq!(get.status, 405);
    assert_eq!(post(&served.admin, "/admin/pause").await.0, 404);
    let (code, out) = lessor_cli(&["pause", "nope", "--control", &control]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("unknown upstream `nope`"), "{out}");
}

/// `lessor wait` returns once ready (and fails at its timeout when not);
/// `lessor shutdown` drains like SIGTERM; during `shutdown.min_delay` the
/// sidecar is unready but still takes new clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_wait_shutdown_and_min_delay() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let mut served = Served::start(&format!(
        "shutdown: {{ grace: 5s, min_delay: 6s }}\nupstreams:\n  - name: cache\n    address: \"{}\"\n    pool: {{ min_idle: 1 }}\n",
        redis.addr()
    ))
    .await;
    let (code, out) = lessor_cli(&["wait", "--admin", &served.admin, "--timeout", "30s"]).await;
    assert_eq!(code, Some(0), "{out}");

    let (code, out) = lessor_cli(&["shutdown", "--control", &served.control]).await;
    assert_eq!((code, out.as_str()), (Some(0), "draining\n"));
    eventually("readiness to drop", || async {
        http::fetch(&served.admin, "/readyz", None)
            .await
            .is_ok_and(|r| r.status == 503)
    })
    .await;
    // Within min_delay: a new client still gets in.
    let late = served.client().await;
    assert_eq!(late.stats("cache").await.unwrap()[0].name, "cache");
    drop(late);
    assert_eq!(
        served.exit_code(PATIENCE + Duration::from_secs(6)).await,
        Some(0)
    );

    // An upstream that never answers: not ready, and `wait` says so.
    let unready = Served::start(
        "upstreams:\n  - name: gone\n    address: \"127.0.0.1:1\"\n    pool: { connect_timeout: 100ms }\n",
    )
    .await;
    let (code, out) = lessor_cli(&["wait", "--admin", &unready.admin, "--timeout", "300ms"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not ready within"), "{out}");
}

fn reload_yaml(redis: &Redis, max_size: u32, extra: bool) -> String {
    let mut yaml = format!(
        "upstreams:\n  - name: cache\n    address: \"{}\"\n    pool: {{ max_size: {max_size}, min_idle: 1, checkout_timeout: 10s }}\n",
        redis.addr()
    );
    if extra {
        yaml.push_str(&format!(
            "  - name: extra\n    address: \"{}\"\n    protocol: redis\n    pool: {{ min_idle: 1 }}\n",
            redis.addr()
        ));
    }
    yaml
}

/// The value of the first sample line starting with `line_start`.
async fn metric_value(admin: &str, line_start: &str) -> u64 {
    metric(admin, line_start)
        .await
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

async fn metric(admin: &str, line_start: &str) -> Option<String> {
    let body = http::fetch(admin, "/metrics", None).await.ok()?.body;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .map(str::to_owned)
}

/// Hot reload against a real `lessor serve`: `max_size` grows and shrinks
/// under load without a failed lease; an upstream is added (warm before it
/// counts) and removed with a live lease (which finishes, its connection
/// closed); an invalid file and a setting that needs a restart are refused
/// and reported, and the file is watched without SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_hot_reload() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let served = Served::start(&reload_yaml(&redis, 2, false)).await;
    let client = served.client().await;
    let admin = served.admin.clone();

    // Load: two loops of lease cycles through every reload below.
    let stop = tokio_util::sync::CancellationToken::new();
    let load: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while !stop.is_cancelled() {
                    let mut lease = client.lease("cache", &LeaseOptions::default()).await?;
                    lease.send(&b"PING\r\n"[..]).await?;
                    lease.recv_at_least(7).await?;
                    lease
                        .release(lessor_client::pb::Disposition::Return)
                        .await?;
                    done += 1;
                }
                Ok::<u64, ClientError>(done)
            })
        })
        .collect();

    // Grow, by SIGHUP.
    served.rewrite(&reload_yaml(&redis, 6, false));
    served.signal("HUP");
    eventually("max_size 6", || async {
        client.stats("cache").await.unwrap()[0].max_size == 6
    })
    .await;
    // Room for more than the old size at once.
    let options = LeaseOptions::default();
    let held: Vec<_> = futures::future::join_all((0..4).map(|_| client.lease("cache", &options)))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(held);
    // Shrink, by rewriting the file only: the watch sees it.
    served.rewrite(&reload_yaml(&redis, 1, false));
    eventually("max_size 1", || async {
        client.stats("cache").await.unwrap()[0].max_size == 1
    })
    .await;
    stop.cancel();
    for task in load {
        let done = task
            .await
            .unwrap()
            .expect("no lease failed across the reloads");
        assert!(done > 0);
    }
    // At least one per change (a poll and a SIGHUP may both see one).
    eventually("reloads counted", || async {
        metric_value(&admin, "lessor_config_reloads_total{result=\"ok\"}").await >= 2
    })
    .await;

    // Add an upstream; it is ready when it takes its name.
    served.rewrite(&reload_yaml(&redis, 1, true));
    served.signal("HUP");
    eventually("the new upstream", || async {
        client
            .stats("")
            .await
            .unwrap()
            .iter()
            .any(|s| s.name == "extra")
    })
    .await;
    let readyz = http::fetch(&admin, "/readyz", None).await.unwrap();
    assert_eq!(readyz.status, 200, "{}", readyz.body);
    let mut live = client
        .lease("extra", &LeaseOptions::default())
        .await
        .unwrap();
    // Remove it while the lease lives: new leases are refused, the live one
    // finishes, and its connection is closed.
    served.rewrite(&reload_yaml(&redis, 1, false));
    served.signal("HUP");
    eventually("the upstream to be gone", || async {
        !client
            .stats("")
            .await
            .unwrap()
            .iter()
            .any(|s| s.name == "extra")
    })
    .await;
    match client.lease("extra", &LeaseOptions::default()).await {
        Err(ClientError::Status(s)) => assert_eq!(s.code(), Code::NotFound, "{s:?}"),
        other => panic!("{other:?}"),
    }
    live.send(&b"PING\r\n"[..]).await.unwrap();
    assert_eq!(&live.recv_at_least(7).await.unwrap()[..], b"+PONG\r\n");
    let ended = live
        .release(lessor_client::pb::Disposition::Return)
        .await
        .unwrap();
    assert_eq!(
        ended.disposition(),
        lessor_client::pb::Disposition::Evict,
        "{ended:?}"
    );

    // An invalid file: refused with its field, nothing changes.
    let hash = metric(&admin, "lessor_config_info").await.unwrap();
    served.rewrite(&reload_yaml(&redis, 0, false));
    served.signal("HUP");
    eventually("the invalid reload to be reported", || async {
        served
            .stdout()
            .contains("upstreams[0].pool.max_size: must be at least 1")
    })
    .await;
    assert!(metric_value(&admin, "lessor_config_reloads_total{result=\"invalid\"}").await >= 1);
    assert_eq!(client.stats("cache").await.unwrap()[0].max_size, 1);
    // The hash is the config in force, not the refused file's.
    assert_eq!(metric(&admin, "lessor_config_info").await.unwrap(), hash);

    // A setting that needs a restart: reported, the rest applied.
    served.rewrite(&format!(
        "runtime: {{ worker_threads: 3 }}\n{}",
        reload_yaml(&redis, 3, false)
    ));
    served.signal("HUP");
    eventually("max_size 3", || async {
        client.stats("cache").await.unwrap()[0].max_size == 3
    })
    .await;
    assert!(
        served.stdout().contains("these settings need a restart"),
        "{}",
        served.stdout()
    );
    let restart = "lessor_config_reloads_total{result=\"restart_required\"}";
    assert!(metric_value(&admin, restart).await >= 1);
}

fn password_yaml(redis: &Redis, password_file: &std::path::Path, max_size: u32) -> String {
    format!(
        "upstreams:\n  - name: cache\n    address: \"{}\"\n    protocol: redis\n    redis: {{ password_file: \"{}\" }}\n    pool: {{ max_size: {max_size}, min_idle: 1, connect_timeout: 500ms, checkout_timeout: 1s }}\n",
        redis.addr(),
        password_file.display()
    )
}

/// A reload that points a serving upstream at a wrong password cannot open
/// a session: it is refused as a whole (counted `failed`, logged with why),
/// the old pool keeps serving and readiness never drops, and the config
/// hash stays the one in force. A good file afterwards applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_reload_that_cannot_open_a_session_is_refused() {
    let Some(redis) = Redis::start_with(&["--requirepass", "right-pw"]).await else {
        return;
    };
    let secrets = tempfile::tempdir().unwrap();
    let right = secrets.path().join("right");
    let wrong = secrets.path().join("wrong");
    std::fs::write(&right, "right-pw").unwrap();
    std::fs::write(&wrong, "wrong-pw").unwrap();
    let served = Served::start(&password_yaml(&redis, &right, 2)).await;
    let client = served.client().await;
    let admin = served.admin.clone();
    eventually("ready", || async {
        http::fetch(&admin, "/readyz", None)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let hash = metric(&admin, "lessor_config_info").await.unwrap();

    served.rewrite(&password_yaml(&redis, &wrong, 2));
    served.signal("HUP");
    eventually("the failed reload to be counted", || async {
        metric_value(&admin, "lessor_config_reloads_total{result=\"failed\"}").await >= 1
    })
    .await;
    let out = served.stdout();
    assert!(out.contains("the new pool cannot open a session"), "{out}");
    assert!(out.contains("authentication failed"), "{out}");
    assert!(!out.contains("wrong-pw"), "{out}");
    assert_eq!(
        metric_value(&admin, "lessor_config_reloads_total{result=\"ok\"}").await,
        0
    );
    assert_eq!(metric(&admin, "lessor_config_info").await.unwrap(), hash);
    // The old pool serves: ready, and a lease works.
    let readyz = http::fetch(&admin, "/readyz", None).await.unwrap();
    assert_eq!(readyz.status, 200, "{}", readyz.body);
    let mut lease = client
        .lease("cache", &LeaseOptions::default())
        .await
        .unwrap();
    lease.send(&b"PING\r\n"[..]).await.unwrap();
    assert_eq!(&lease.recv_at_least(7).await.unwrap()[..], b"+PONG\r\n");
    lease
        .release(lessor_client::pb::Disposition::Return)
        .await
        .unwrap();
    assert_eq!(client.stats("cache").await.unwrap()[0].max_size, 2);

    // A file that works applies, and its hash is the one shown.
    served.rewrite(&password_yaml(&redis, &right, 3));
    served.signal("HUP");
    eventually("max_size 3", || async {
        client.stats("cache").await.unwrap()[0].max_size == 3
    })
    .await;
    eventually("the new hash", || async {
        metric(&admin, "lessor_config_info").await.unwrap() != hash
    })
    .await;
    let readyz = http::fetch(&admin, "/readyz", None).await.unwrap();
    assert_eq!(readyz.status, 200, "{}", readyz.body);
}

/// A holder is client-chosen text: a newline, an ANSI escape and a fake log
/// line in it come out escaped in the text log, in the `/debug/leases`
/// table and through `lessor leases`, and as themselves (JSON-escaped) in
/// JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_holder_is_escaped_wherever_printed() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let served = Served::start(&yaml(&redis)).await;
    let client = served.client().await;
    let admin = served.admin.clone();
    let forged = "2099-01-01T00:00:00.000000Z  WARN lessor: forged line";
    let holder = format!("job\n{forged}\x1b[31mred\r");
    let options = LeaseOptions {
        holder: holder.clone(),
        ..LeaseOptions::default()
    };
    let lease = client.lease("cache", &options).await.unwrap();
    let escaped = format!("job\\n{forged}\\u{{1b}}[31mred\\r");

    // JSON: the text itself.
    let rows = leases_json(&admin, "").await;
    assert_eq!(rows[0]["holder"], holder.as_str());
    // The table: one line per lease, escaped.
    let table = http::fetch(&admin, "/debug/leases", None)
        .await
        .unwrap()
        .body;
    let clean = |text: &str| {
        !text.contains('\x1b')
            && !text.contains('\r')
            && !text.lines().any(|l| l.starts_with("2099-01-01"))
    };
    assert!(clean(&table) && table.contains(&escaped), "{table:?}");
    assert_eq!(table.lines().count(), 3, "{table:?}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(["leases", "--admin", &admin])
        .output()
        .await
        .unwrap();
    let cli = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{cli}");
    assert!(clean(&cli) && cli.contains(&escaped), "{cli:?}");

    // The lease.warn_after warning: one line, the holder escaped in it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let log = loop {
        let log = served.stdout();
        if log.contains("lease held longer than lease.warn_after") {
            break log;
        }
        assert!(tokio::time::Instant::now() < deadline, "no warning:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(clean(&log), "{log:?}");
    let warning = log
        .lines()
        .find(|l| l.contains("lease held longer than lease.warn_after"))
        .unwrap();
    assert!(warning.contains(&escaped), "{warning:?}");
    drop(lease);
}

/// `lessor profile` takes a CPU profile of a running sidecar that `go tool
/// pprof` reads; one at a time (429); `lessor runtime` prints the runtime's
/// figures, which `/metrics` carries too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_profile_and_runtime_of_the_sidecar_itself() {
    let up = crate::support::TestUpstream::start().await;
    let served = Served::start(&crate::support::config_one(
        &up.addr(),
        lessor::EngineKind::Bb8,
        &[],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cpu.pb.gz");
    let bin = env!("CARGO_BIN_EXE_lessor");
    let control = served.control.clone();
    let args = [
        "profile".to_owned(),
        "--seconds".into(),
        // Long enough that the second request below surely meets it.
        "6".into(),
        "-o".into(),
        out.display().to_string(),
        "--control".into(),
        control.clone(),
    ];
    let profiling = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin).args(args).output().unwrap()
    });
    // A lease load while it samples, so lessor's own code is on the CPU.
    let client = served.client().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let mut lease = client.lease("up", &LeaseOptions::default()).await.unwrap();
                lease.send("ping").await.unwrap();
                lease.recv_at_least(4).await.unwrap();
                lease
                    .release(lessor_client::pb::Disposition::Return)
                    .await
                    .unwrap();
            }
        })
    };
    // While it runs, a second profile is refused.
    eventually("the profile is running", || async {
        let got = crate::support::http::fetch(&control, "/debug/runtime", None).await;
        got.is_ok_and(|g| g.body.contains("\"profiling\": true"))
    })
    .await;
    let second =
        crate::support::http::fetch(&served.control, "/debug/pprof/profile?seconds=1", None)
            .await
            .unwrap();
    assert_eq!(second.status, 429, "{}", second.body);
    let done = profiling.await.unwrap();
    stop.cancel();
    load.await.unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip");
    // Go's own reader accepts it, where Go is installed (CI installs it).
    if let Ok(go) = std::process::Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(&out)
        .output()
    {
        assert!(
            go.status.success(),
            "go tool pprof: {}",
            String::from_utf8_lossy(&go.stderr)
        );
        // Symbolized: lessor's own functions are named in it.
        let raw = String::from_utf8_lossy(&go.stdout);
        assert!(raw.contains("lessor::"), "no lessor frame in the profile");
    }
    // The profiling endpoints are on the control address only.
    let on_admin =
        crate::support::http::fetch(&served.admin, "/debug/pprof/profile?seconds=1", None)
            .await
            .unwrap();
    assert_eq!(on_admin.status, 404);
    let runtime = std::process::Command::new(bin)
        .args(["runtime", "--control", &served.control])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&runtime.stdout).unwrap();
    assert!(json["workers"].as_u64().unwrap() >= 1, "{json}");
    assert!(json["per_worker"].as_array().is_some_and(|w| !w.is_empty()));
    // The heap profile: jemalloc's, in the same format.
    let heap_file = dir.path().join("heap.pb.gz");
    let curl = tokio::task::spawn_blocking({
        let url = format!("http://{}/debug/pprof/heap", served.control);
        let heap_file = heap_file.clone();
        move || fetch_to(&url, &heap_file)
    })
    .await
    .unwrap();
    assert_eq!(curl, 200);
    let bytes = std::fs::read(&heap_file).unwrap();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip");
    if let Ok(go) = std::process::Command::new("go")
        // Parsed, not symbolized (addr2line over a debug binary takes
        // minutes; the runbook passes the binary).
        .args(["tool", "pprof", "-raw", "-symbolize=none"])
        .arg(&heap_file)
        .output()
    {
        assert!(
            go.status.success(),
            "go tool pprof (heap): {}",
            String::from_utf8_lossy(&go.stderr)
        );
        let raw = String::from_utf8_lossy(&go.stdout);
        assert!(raw.contains("inuse_space"), "{raw}");
    }
    let metrics = crate::support::http::fetch(&served.admin, "/metrics", None)
        .await
        .unwrap();
    for name in [
        "lessor_runtime_workers",
        "lessor_runtime_global_queue_depth",
        "lessor_runtime_worker_busy_seconds_total",
    ] {
        assert!(metrics.body.contains(name), "{name}");
    }
}

/// `lessor runtime --tasks` dumps every task's stack: a held lease's task
/// waits in the lease pump, a waiting checkout's in the pool's checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_runtime_dump_shows_a_held_lease_and_a_waiting_checkout() {
    let up = crate::support::TestUpstream::start().await;
    let served = Served::start(&crate::support::config_one(
        &up.addr(),
        lessor::EngineKind::Bb8,
        &["pool: { max_size: 1, min_idle: 1, checkout_timeout: 60s }"],
    ))
    .await;
    let client = served.client().await;
    let held = client.lease("up", &LeaseOptions::default()).await.unwrap();
    // A second lease waits for the only connection.
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.lease("up", &LeaseOptions::default()).await })
    };
    eventually("a checkout waits", || async {
        crate::support::http::fetch(&served.admin, "/metrics", None)
            .await
            .is_ok_and(|m| {
                m.body
                    .lines()
                    .any(|l| l.starts_with("lessor_pool_waiters{") && l.ends_with(" 1"))
            })
    })
    .await;
    let bin = env!("CARGO_BIN_EXE_lessor");
    let control = served.control.clone();
    let dumped = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["runtime", "--tasks", "--control", &control])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&dumped.stdout).unwrap();
    assert_eq!(json["task_dump_available"], true, "{json}");
    let traces: Vec<&str> = json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["trace"].as_str().unwrap())
        .collect();
    assert!(
        traces.iter().any(|t| t.contains("lessor::lease::pump")),
        "no task in the lease pump: {traces:#?}"
    );
    assert!(
        traces.iter().any(|t| t.contains("checkout")),
        "no task in a checkout: {traces:#?}"
    );
    drop(held);
    assert!(waiting.await.unwrap().is_ok());
}

/// GETs `url` into `file` over a plain blocking socket (the profile is
/// binary); the status.
fn fetch_to(url: &str, file: &std::path::Path) -> u16 {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    std::fs::write(file, &all[split + 4..]).unwrap();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}
