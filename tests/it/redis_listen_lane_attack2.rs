//! Hostile clients of the Redis listener's lane (`src/listener/redis/shared.rs`)
//! against a real redis-server: a reply over `redis.max_frame`, a pool held
//! by pinned clients, a RESP3 upstream, a stalled server, a thousand
//! clients, a drain with batches in flight, and odd pipelines.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lessor::EngineKind;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::redis_listen::{PASSWORD, fixture_with};
use crate::support::{PATIENCE, eventually};

type Conn = BufReader<TcpStream>;

async fn connect(port: u16) -> Conn {
    BufReader::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap())
}

/// Reads one whole RESP2/RESP3 frame, raw. `None`: closed (or timed out)
/// before a whole frame.
async fn frame(s: &mut Conn) -> Option<Vec<u8>> {
    tokio::time::timeout(PATIENCE, frame_inner(s))
        .await
        .ok()
        .flatten()
}

fn frame_inner(s: &mut Conn) -> futures::future::BoxFuture<'_, Option<Vec<u8>>> {
    Box::pin(async move {
        let mut line = Vec::new();
        let n = s.read_until(b'\n', &mut line).await.ok()?;
        if n == 0 || !line.ends_with(b"\r\n") {
            return None;
        }
        let kind = line[0];
        let num = || -> i64 {
            std::str::from_utf8(&line[1..line.len() - 2])
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1)
        };
        match kind {
            b'$' | b'!' | b'=' => {
                let len = num();
                if len >= 0 {
                    let mut body = vec![0u8; len as usize + 2];
                    s.read_exact(&mut body).await.ok()?;
                    line.extend_from_slice(&body);
                }
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let mut len = num();
                if kind == b'%' || kind == b'|' {
                    len *= 2;
                }
                for _ in 0..len.max(0) {
                    line.extend(frame_inner(s).await?);
                }
            }
            _ => {}
        }
        Some(line)
    })
}

/// A direct connection to the redis-server, authenticated.
async fn direct(addr: &str) -> Conn {
    let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
    s.get_mut()
        .write_all(format!("AUTH {PASSWORD}\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(frame(&mut s).await.unwrap(), b"+OK\r\n");
    s
}

async fn call(s: &mut Conn, request: &[u8], replies: usize) -> Vec<Option<Vec<u8>>> {
    s.get_mut().write_all(request).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..replies {
        out.push(frame(s).await);
    }
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether the peer closes (within patience), whatever it sends before.
async fn closes(s: &mut Conn) -> bool {
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Clients counting their own keys up on the lane until `stop`: each
/// reply must be the next number, or lessor's error in its place (then
/// whether the INCR ran is unknown, so the next may skip one). Returns,
/// per client, (good replies, errors).
fn counters(
    port: u16,
    clients: usize,
    tag: &'static str,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(usize, usize)>> {
    (0..clients)
        .map(|c| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut s = connect(port).await;
                let (mut last, mut unknown, mut good, mut errs) = (0i64, 0i64, 0, 0);
                while !stop.load(Ordering::Relaxed) {
                    let got = call(&mut s, format!("INCR {tag}{c}\r\n").as_bytes(), 1).await;
                    let got = got[0]
                        .clone()
                        .unwrap_or_else(|| panic!("client {c}: closed or no reply"));
                    let t = text(&got);
                    if t.starts_with("-ERR lessor: ") {
                        errs += 1;
                        unknown += 1;
                        continue;
                    }
                    let v: i64 = t
                        .strip_prefix(':')
                        .and_then(|v| v.trim_end().parse().ok())
                        .unwrap_or_else(|| panic!("client {c}: wrong reply {t:?}"));
                    assert!(
                        v > last && v <= last + 1 + unknown,
                        "client {c}: {v} after {last} ({unknown} unknown)"
                    );
                    last = v;
                    unknown = 0;
                    good += 1;
                }
                (good, errs)
            })
        })
        .collect()
}

/// Item 1: a reply over `redis.max_frame` on the lane. The asking client
/// gets its earlier whole replies, lessor's error, and is closed; the other
/// clients get right replies or lessor's errors and stay; lessor recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lane2_reply_over_max_frame() {
    let Some(fx) = fixture_with(EngineKind::Bb8, 4, "", ", max_frame: 64KiB", &[]).await else {
        return;
    };
    let port = fx.port;
    let mut d = direct(&fx.redis.addr()).await;
    let big = "b".repeat(100 * 1024);
    let set = format!(
        "*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n{big}\r\n",
        big.len()
    );
    assert_eq!(
        call(&mut d, set.as_bytes(), 1).await[0].as_deref(),
        Some(&b"+OK\r\n"[..])
    );
    let stop = Arc::new(AtomicBool::new(false));
    let others = counters(port, 6, "mf", stop.clone());
    // The others are running on the lane.
    let mut probe = connect(port).await;
    eventually("the counters run", || async {
        let mut d = direct(&fx.redis.addr()).await;
        let got = call(&mut d, b"GET mf5\r\n", 1).await;
        got[0].as_ref().is_some_and(|g| g.starts_with(b"$"))
    })
    .await;
    for _ in 0..5 {
        let mut asker = connect(port).await;
        let got = call(&mut asker, b"PING\r\nECHO hi\r\nGET big\r\nPING\r\n", 3).await;
        assert_eq!(got[0].as_deref(), Some(&b"+PONG\r\n"[..]));
        assert_eq!(got[1].as_deref(), Some(&b"$2\r\nhi\r\n"[..]));
        let err = text(got[2].as_deref().expect("an error for the big reply"));
        assert!(
            err.starts_with("-ERR lessor: a reply of ") && err.contains("exceeds redis.max_frame"),
            "{err:?}"
        );
        assert!(closes(&mut asker).await, "the asking client stays open");
    }
    // lessor recovers: lane traffic works.
    let got = call(&mut probe, b"SET after 1\r\nGET after\r\n", 2).await;
    assert_eq!(got[0].as_deref(), Some(&b"+OK\r\n"[..]));
    assert_eq!(got[1].as_deref(), Some(&b"$1\r\n1\r\n"[..]));
    stop.store(true, Ordering::Relaxed);
    for t in others {
        let (good, errs) = t.await.unwrap();
        eprintln!("counter: {good} good, {errs} errors");
        assert!(good > 0);
    }
}

/// Item 2: every pooled connection pinned by MULTI/WATCH; lane clients get
/// the checkout error after checkout_timeout (not a hang), then work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lane2_pool_pinned_lane_gets_checkout_error() {
    let Some(fx) = fixture_with(EngineKind::Bb8, 2, "", "", &[]).await else {
        return;
    };
    let port = fx.port;
    let mut p1 = connect(port).await;
    let mut p2 = connect(port).await;
    assert_eq!(
        call(&mut p1, b"MULTI\r\n", 1).await[0].as_deref(),
        Some(&b"+OK\r\n"[..])
    );
    assert_eq!(
        call(&mut p2, b"WATCH w\r\n", 1).await[0].as_deref(),
        Some(&b"+OK\r\n"[..])
    );
    let started = std::time::Instant::now();
    let lane: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = connect(port).await;
                let got = call(&mut s, format!("GET k{i}\r\nINCR n{i}\r\n").as_bytes(), 2).await;
                let got: Vec<String> = got
                    .into_iter()
                    .map(|g| text(&g.expect("a reply, not a hang or a close")))
                    .collect();
                (s, got)
            })
        })
        .collect();
    let mut clients = Vec::new();
    for t in lane {
        let (s, got) = t.await.unwrap();
        for g in &got {
            assert!(g.starts_with("-ERR lessor: no server connection"), "{g:?}");
        }
        clients.push(s);
    }
    eprintln!("refused after {:?}", started.elapsed());
    // The pinned clients leave: the lane works again, for the same clients.
    assert_eq!(
        call(&mut p1, b"DISCARD\r\n", 1).await[0].as_deref(),
        Some(&b"+OK\r\n"[..])
    );
    drop(p1);
    drop(p2);
    for (i, s) in clients.iter_mut().enumerate() {
        let got = call(s, format!("INCR n{i}\r\nGET n{i}\r\n").as_bytes(), 2).await;
        assert_eq!(got[0].as_deref(), Some(&b":1\r\n"[..]), "client {i}");
        assert_eq!(got[1].as_deref(), Some(&b"$1\r\n1\r\n"[..]), "client {i}");
    }
}

/// Item 3: a RESP3 upstream. The lane's replies must be what a direct
/// `HELLO 3` connection gets, and what the per-batch hold gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lane2_resp3_upstream_matches_direct() {
    let Some(fx) = fixture_with(EngineKind::Bb8, 4, "", ", resp: 3", &[]).await else {
        return;
    };
    let mut d = direct(&fx.redis.addr()).await;
    let hello = call(&mut d, b"HELLO 3\r\n", 1).await;
    assert!(hello[0].as_ref().unwrap().starts_with(b"%"));
    let cmds = "PING\r\nGET missing\r\nINCR r3\r\nECHO e\r\nHGET nokey f\r\nZSCORE nokey m\r\n";
    let direct_got = call(&mut d, cmds.as_bytes(), 6).await;
    let mut l = connect(fx.port).await;
    let lane_got = call(&mut l, cmds.replace("r3", "r3b").as_bytes(), 6).await;
    // The same commands held (LRANGE is not for the lane).
    let held = format!("{}LRANGE nokey 0 -1\r\n", cmds.replace("r3", "r3c"));
    let held_got = call(&mut l, held.as_bytes(), 7).await;
    let show = |v: &[Option<Vec<u8>>]| -> Vec<String> {
        v.iter()
            .map(|g| text(g.as_deref().unwrap_or(b"<none>")))
            .collect()
    };
    eprintln!(
        "direct: {:?}\nlane:   {:?}\nheld:   {:?}",
        show(&direct_got),
        show(&lane_got),
        show(&held_got)
    );
    assert_eq!(
        show(&lane_got),
        show(&held_got[..6]),
        "lane differs from hold"
    );
    assert_eq!(
        show(&lane_got),
        show(&direct_got),
        "lane differs from direct RESP3"
    );
}

/// Item 4: the server stalls (`CLIENT PAUSE 700 ALL`) under lane load:
/// every reply right and in order afterwards, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lane2_stalled_server_keeps_order() {
    let Some(fx) = fixture_with(EngineKind::Bb8, 4, "", "", &[]).await else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = counters(fx.port, 8, "st", stop.clone());
    let mut d = direct(&fx.redis.addr()).await;
    eventually("the counters run", || async {
        let mut d = direct(&fx.redis.addr()).await;
        let got = call(&mut d, b"GET st7\r\n", 1).await;
        got[0].as_ref().is_some_and(|g| g.starts_with(b"$"))
    })
    .await;
    for _ in 0..3 {
        let got = call(&mut d, b"CLIENT PAUSE 700 ALL\r\n", 1).await;
        assert_eq!(got[0].as_deref(), Some(&b"+OK\r\n"[..]));
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let (good, errs) = t.await.unwrap();
        assert_eq!(errs, 0, "errors across a pause");
        assert!(good > 0);
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Item 5: 1,000 clients each send one lane batch, then idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lane2_a_thousand_clients() {
    const N: usize = 1000;
    let Some(fx) = fixture_with(EngineKind::Bb8, 8, ", max_clients: 1500", "", &[]).await else {
        return;
    };
    let port = fx.port;
    let before = rss_kib();
    let mut conns = Vec::with_capacity(N);
    for chunk in 0..(N / 200) {
        let batch: Vec<_> = (0..200)
            .map(|j| {
                let i = chunk * 200 + j;
                tokio::spawn(async move {
                    let mut s = connect(port).await;
                    s.get_mut()
                        .write_all(format!("SET k{i} v{i}\r\nGET k{i}\r\nECHO e{i}\r\n").as_bytes())
                        .await
                        .unwrap();
                    (i, s)
                })
            })
            .collect();
        for t in batch {
            conns.push(t.await.unwrap());
        }
    }
    let during = rss_kib();
    for (i, s) in conns.iter_mut() {
        let a = frame(s).await.map(|g| text(&g));
        let b = frame(s).await.map(|g| text(&g));
        let c = frame(s).await.map(|g| text(&g));
        let v = format!("v{i}");
        let e = format!("e{i}");
        assert_eq!(a.as_deref(), Some("+OK\r\n"), "client {i}");
        assert_eq!(b, Some(format!("${}\r\n{v}\r\n", v.len())), "client {i}");
        assert_eq!(c, Some(format!("${}\r\n{e}\r\n", e.len())), "client {i}");
    }
    let after = rss_kib();
    eprintln!(
        "VmRSS (test process = lessor + clients): before {before} KiB, connected {during} KiB, answered {after} KiB"
    );
    // Still serving.
    let mut s = connect(port).await;
    assert_eq!(
        call(&mut s, b"PING\r\n", 1).await[0].as_deref(),
        Some(&b"+PONG\r\n"[..])
    );
}

/// Item 6: a drain with lane batches in flight: every reply a client gets
/// is whole and right, then it is closed; lessor stops without a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lane2_drain_answers_in_flight_then_closes() {
    let Some(mut fx) = fixture_with(EngineKind::Bb8, 4, "", "", &[]).await else {
        return;
    };
    let port = fx.port;
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(connect(port).await);
    }
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, mut s)| {
            tokio::spawn(async move {
                let mut last = 0i64;
                loop {
                    let req = format!("INCR dr{c}\r\nINCR dr{c}\r\nINCR dr{c}\r\n");
                    if s.get_mut().write_all(req.as_bytes()).await.is_err() {
                        return last;
                    }
                    for _ in 0..3 {
                        let Some(g) = frame(&mut s).await else {
                            // Closed: nothing more, not a cut frame.
                            assert!(s.buffer().is_empty(), "client {c}: a cut reply");
                            return last;
                        };
                        let t = text(&g);
                        let v: i64 = t
                            .strip_prefix(':')
                            .and_then(|v| v.trim_end().parse().ok())
                            .unwrap_or_else(|| panic!("client {c}: {t:?}"));
                        assert_eq!(v, last + 1, "client {c}");
                        last = v;
                    }
                }
            })
        })
        .collect();
    let addr = fx.redis.addr();
    eventually("the clients run", || {
        let addr = addr.clone();
        async move {
            let mut d = direct(&addr).await;
            let got = call(&mut d, b"GET dr9\r\n", 1).await;
            got[0].as_ref().is_some_and(|g| g.starts_with(b"$"))
        }
    })
    .await;
    fx.lessor.begin_shutdown();
    let mut lasts = Vec::new();
    for t in tasks {
        lasts.push(
            tokio::time::timeout(PATIENCE, t)
                .await
                .expect("a client closed in time")
                .unwrap(),
        );
    }
    eprintln!("told before the drain closed them: {lasts:?}");
    // What each client was told is what the server holds: no batch ran
    // without its replies reaching the client, except one unanswered.
    let mut d = direct(&addr).await;
    for (c, last) in lasts.iter().enumerate() {
        let got = call(&mut d, format!("GET dr{c}\r\n").as_bytes(), 1).await;
        let t = text(got[0].as_deref().unwrap());
        let on_server: i64 = t.lines().nth(1).unwrap().parse().unwrap();
        assert!(
            on_server == *last,
            "client {c}: told {last}, server has {on_server} (a batch ran whose replies were dropped)"
        );
    }
    fx.lessor.stopped().await.expect("lessor stops cleanly");
}

/// Item 7: odd pipelines around the lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lane2_odd_pipelines() {
    let Some(fx) = fixture_with(EngineKind::Bb8, 4, "", "", &[]).await else {
        return;
    };
    let port = fx.port;
    // A lane batch, then state, then a held batch, in one write.
    let mut s = connect(port).await;
    let got = call(
        &mut s,
        b"SET o 1\r\nGET o\r\nSELECT 1\r\nGET o\r\nLRANGE o 0 -1\r\nSELECT 0\r\nGET o\r\nRPUSH l a b\r\nLRANGE l 0 -1\r\n",
        9,
    )
    .await;
    let got: Vec<String> = got.into_iter().map(|g| text(&g.unwrap())).collect();
    assert_eq!(
        got,
        vec![
            "+OK\r\n",
            "$1\r\n1\r\n",
            "+OK\r\n",
            "$-1\r\n",
            "*0\r\n",
            "+OK\r\n",
            "$1\r\n1\r\n",
            ":2\r\n",
            "*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        ]
    );
    // Lane commands then QUIT then more, in one write.
    let mut s = connect(port).await;
    let got = call(&mut s, b"SET q 1\r\nINCR q\r\nQUIT\r\nINCR q\r\n", 3).await;
    let got: Vec<String> = got.into_iter().map(|g| text(&g.unwrap())).collect();
    assert_eq!(got, vec!["+OK\r\n", ":2\r\n", "+OK\r\n"]);
    assert!(closes(&mut s).await);
    let mut s = connect(port).await;
    assert_eq!(
        call(&mut s, b"GET q\r\n", 1).await[0].as_deref(),
        Some(&b"$1\r\n2\r\n"[..])
    );
    // Inline PING with no args, empty inline lines, among lane commands.
    let got = call(
        &mut s,
        b"PING\r\n\r\nGET q\r\nPING\r\n*1\r\n$4\r\nPING\r\n",
        4,
    )
    .await;
    let got: Vec<String> = got.into_iter().map(|g| text(&g.unwrap())).collect();
    assert_eq!(
        got,
        vec!["+PONG\r\n", "$1\r\n2\r\n", "+PONG\r\n", "+PONG\r\n"]
    );
    // ECHO with a 60 KiB argument (on the lane), and with 63.9 KiB plus a
    // PING over 64 KiB (held).
    for size in [60 * 1024, 64 * 1024 - 40, 70 * 1024] {
        let arg = "x".repeat(size);
        let cmd = format!("*2\r\n$4\r\nECHO\r\n${size}\r\n{arg}\r\nPING\r\n");
        let got = call(&mut s, cmd.as_bytes(), 2).await;
        assert_eq!(
            got[0].as_deref().map(text),
            Some(format!("${size}\r\n{arg}\r\n")),
            "ECHO of {size}"
        );
        assert_eq!(got[1].as_deref(), Some(&b"+PONG\r\n"[..]));
    }
    // A lane batch of exactly 16 and one of 17 commands.
    for n in [16, 17] {
        let req: String = (0..n).map(|i| format!("ECHO m{i}\r\n")).collect();
        let got = call(&mut s, req.as_bytes(), n).await;
        for (i, g) in got.iter().enumerate() {
            let want = format!("m{i}");
            assert_eq!(
                g.as_deref().map(text),
                Some(format!("${}\r\n{want}\r\n", want.len()))
            );
        }
    }
    // A lane batch whose client goes away before its replies; the next
    // client on the lane is unaffected.
    for i in 0..20 {
        let mut gone = connect(port).await;
        gone.get_mut()
            .write_all(format!("SET g{i} 1\r\nGET g{i}\r\n").as_bytes())
            .await
            .unwrap();
        drop(gone);
        let got = call(&mut s, format!("GET h{i}\r\nECHO z{i}\r\n").as_bytes(), 2).await;
        assert_eq!(got[0].as_deref(), Some(&b"$-1\r\n"[..]));
        let z = format!("z{i}");
        assert_eq!(
            got[1].as_deref().map(text),
            Some(format!("${}\r\n{z}\r\n", z.len()))
        );
    }
}
