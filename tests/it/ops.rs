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
