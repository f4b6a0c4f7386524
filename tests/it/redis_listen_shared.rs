//! The Redis listener's lane: plain batches of many clients pipelined on
//! one pooled connection. Many clients at once get exactly their own
//! replies, fewer leases are taken than batches sent, and a server restart
//! under that load costs the batches then in flight an error each, never
//! a client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use lessor::EngineKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::redis_listen::fixture_with;
use crate::support::http::fetch;
use crate::support::{PATIENCE, eventually};

const CLIENTS: usize = 20;
const ROUNDS: usize = 150;

/// One request, one reply line (`:n` or an error).
async fn call(stream: &mut BufReader<TcpStream>, request: &[u8]) -> String {
    stream.get_mut().write_all(request).await.unwrap();
    let mut line = String::new();
    let n = tokio::time::timeout(PATIENCE, stream.read_line(&mut line))
        .await
        .expect("a reply in time")
        .unwrap();
    assert!(n > 0, "lessor closed a client of the lane");
    line
}

/// One sample of `/metrics` (`name{labels}` exactly), or 0.
async fn sample(admin: &str, key: &str) -> f64 {
    let got = fetch(admin, "/metrics", None).await.unwrap();
    got.body
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// `lessor_leases_total` over every upstream.
async fn leases(admin: &str) -> f64 {
    let got = fetch(admin, "/metrics", None).await.unwrap();
    got.body
        .lines()
        .filter(|l| l.starts_with("lessor_leases_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_shared_lane_carries_many_clients_and_survives_a_restart() {
    let Some(mut fx) = fixture_with(EngineKind::Bb8, 4, "", "", &[]).await else {
        return;
    };
    let port = fx.port;
    let before = leases(&fx.lessor.admin).await;
    // Each client counts its own key up, with pipelines of one and of
    // three: every reply is exactly the next number.
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut s = BufReader::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
            let mut n = 0;
            let mut batches = 0;
            while n < ROUNDS {
                if c % 2 == 0 {
                    let got = call(&mut s, format!("INCR c{c}\r\n").as_bytes()).await;
                    n += 1;
                    assert_eq!(got, format!(":{n}\r\n"), "client {c}");
                } else {
                    let request = format!("INCR c{c}\r\nINCR c{c}\r\nGET c{c}\r\n");
                    let got = call(&mut s, request.as_bytes()).await;
                    n += 1;
                    assert_eq!(got, format!(":{n}\r\n"), "client {c}");
                    let mut line = String::new();
                    s.read_line(&mut line).await.unwrap();
                    n += 1;
                    assert_eq!(line, format!(":{n}\r\n"), "client {c}");
                    let mut len = String::new();
                    s.read_line(&mut len).await.unwrap();
                    let mut value = String::new();
                    s.read_line(&mut value).await.unwrap();
                    assert_eq!(value, format!("{n}\r\n"), "client {c}");
                }
                batches += 1;
            }
            batches
        }));
    }
    let mut batches = 0;
    for t in tasks {
        batches += t.await.unwrap();
    }
    let taken = leases(&fx.lessor.admin).await - before;
    // Each batch on a hold of its own would be a lease each; the lane
    // carries many batches per lease.
    assert!(
        taken < f64::from(batches),
        "{taken} leases for {batches} batches: the lane carried none"
    );
    // The listener's own counts say so too: every batch counted once, on
    // its route (a client's write may arrive in two reads: two batches).
    let admin = fx.lessor.admin.clone();
    let shared = sample(
        &admin,
        r#"lessor_listener_batches_total{route="shared",upstream="up"}"#,
    )
    .await;
    let held = sample(
        &admin,
        r#"lessor_listener_batches_total{route="held",upstream="up"}"#,
    )
    .await;
    assert!(
        shared > 0.0,
        "no batch on the lane: {shared} shared, {held} held"
    );
    assert!(
        shared + held >= f64::from(batches),
        "{shared} + {held} < {batches}"
    );

    // A restart under load: each client keeps going; a batch in flight
    // gets an error in place of its reply, and no client is closed.
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let after = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (stop, restarted, after) = (stop.clone(), restarted.clone(), after.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = BufReader::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
            let mut ok_after = 0;
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let was_restarted = restarted.load(Ordering::SeqCst);
                let got = call(&mut s, format!("INCR r{c}\r\n").as_bytes()).await;
                if got.starts_with(':') {
                    if was_restarted {
                        ok_after += 1;
                        if ok_after == 5 {
                            after.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                } else {
                    errors.push(got);
                }
            }
            errors
        }));
    }
    eventually("the clients are running", || async {
        leases(&fx.lessor.admin).await > before + taken
    })
    .await;
    eventually("the listener counts its twenty clients", || {
        let admin = admin.clone();
        async move {
            sample(&admin, r#"lessor_listener_clients{upstream="up"}"#).await == CLIENTS as f64
        }
    })
    .await;
    fx.redis.restart().await;
    restarted.store(true, Ordering::SeqCst);
    eventually("every client is answered again after the restart", || {
        let after = after.clone();
        async move { after.load(Ordering::SeqCst) == CLIENTS }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        for e in t.await.unwrap() {
            assert!(
                e.starts_with("-ERR lessor: "),
                "an error that is not lessor's own: {e:?}"
            );
        }
    }
    eventually("the clients are counted out", || {
        let admin = admin.clone();
        async move { sample(&admin, r#"lessor_listener_clients{upstream="up"}"#).await == 0.0 }
    })
    .await;
    let accepted = sample(
        &admin,
        r#"lessor_listener_connections_total{upstream="up"}"#,
    )
    .await;
    assert!(accepted >= 2.0 * CLIENTS as f64, "{accepted} accepted");
}
