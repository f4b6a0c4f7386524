//! The Redis tracker held to redis-server itself: thousands of generated
//! client byte streams (inline commands with quotes, escapes and odd blanks,
//! arrays with Redis's quirks, empty requests, mixtures, invalid input),
//! each split at random points as a lease's Data messages would be, go
//! through lessor's tracker; what it forwards goes to a real redis-server.
//! For each stream:
//! - every command Redis executed (from `MONITOR`) is one the tracker read,
//!   with the same arguments, in order;
//! - the replies Redis sent (counted by redis-rs's parser, not ours) are
//!   exactly as many as the tracker expected, and feeding them back
//!   leaves nothing owed;
//! - a protocol error on one side is a protocol error on the other;
//! - when the tracker calls the session clean, the server's own account of
//!   the connection (`CLIENT LIST`) shows nothing changed;
//! - `AUTH` and `HELLO`, which lessor answers itself, never reach Redis.

use lessor::testing::RedisTracker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::PATIENCE;
use crate::support::redis::Redis;

/// Streams per protocol version per run.
const CASES: usize = 1500;
const SENTINEL: &str = "lessor-diff-sentinel";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_diff_tracker_reads_what_redis_executes() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let seed = std::env::var("LESSOR_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        // A fixed default keeps CI's run repeatable; set the variable to
        // explore other seeds.
        .unwrap_or(20261207);
    eprintln!("redis_diff seed {seed} (LESSOR_DIFF_SEED={seed} repeats this run)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut monitor = Monitor::start(&redis.addr()).await;
    let mut control = TcpStream::connect(redis.addr()).await.unwrap();
    let mut stats = Stats::default();
    for case in 0..CASES * 2 {
        let resp = if case % 2 == 0 { 2 } else { 3 };
        let valid = rng.u8(..10) < 7;
        // A third of the streams keep to commands that change no session
        // state, so that "clean" is often claimed and checked.
        let plain = valid && case % 3 == 0;
        let requests: Vec<Vec<u8>> = (0..rng.usize(1..8))
            .map(|_| request(&mut rng, valid, plain))
            .collect();
        let stream = requests.concat();
        run_case(
            &redis,
            &mut monitor,
            &mut control,
            &mut rng,
            resp,
            &stream,
            case,
            &mut stats,
        )
        .await;
    }
    eprintln!("redis_diff: {stats:?}");
    // Enough of every outcome that the comparison meant something.
    assert!(stats.clean > CASES / 4, "{stats:?}");
    assert!(stats.protocol_errors > CASES / 10, "{stats:?}");
    assert!(stats.restorable > CASES / 10, "{stats:?}");
    // The harness's own HELLO 3 opens each RESP3 case; no other reached
    // Redis.
    assert_eq!(
        redis.calls("auth").await,
        0,
        "AUTH reached Redis (seed {seed})"
    );
    assert_eq!(
        redis.calls("hello").await,
        CASES as u64,
        "HELLO reached Redis (seed {seed})"
    );
}

#[derive(Debug, Default)]
struct Stats {
    clean: usize,
    restorable: usize,
    evicted: usize,
    uncountable: usize,
    protocol_errors: usize,
    skipped: usize,
    commands: usize,
}

#[allow(clippy::too_many_arguments)]
async fn run_case(
    redis: &Redis,
    monitor: &mut Monitor,
    control: &mut TcpStream,
    rng: &mut fastrand::Rng,
    resp: u8,
    stream: &[u8],
    case: usize,
    stats: &mut Stats,
) {
    let show = || String::from_utf8_lossy(stream).escape_debug().to_string();
    let mut conn = TcpStream::connect(redis.addr()).await.unwrap();
    let addr = conn.local_addr().unwrap().to_string();
    let id = {
        let mut hello = Vec::new();
        if resp == 3 {
            hello.extend_from_slice(b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n");
        }
        hello.extend_from_slice(b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n");
        conn.write_all(&hello).await.unwrap();
        let values = read_values(&mut conn, if resp == 3 { 2 } else { 1 }).await;
        match values.last() {
            Some(redis::Value::Int(id)) => *id,
            other => panic!("CLIENT ID answered {other:?}"),
        }
    };
    // The setup's own commands are not the tracker's.
    monitor.commands_of(control, &addr, case).await;
    let mut tracker = RedisTracker::new(resp);
    let mut forwarded = Vec::new();
    let mut error = None;
    let mut at = 0;
    while at < stream.len() {
        let end = (at + rng.usize(1..=stream.len() - at + 8)).min(stream.len());
        match tracker.client_sent(&stream[at..end]) {
            Ok(out) => forwarded.extend_from_slice(&out),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
        at = end;
    }
    let mut ran_sentinel = false;
    let answers_locally = tracker.commands().iter().any(|(args, _)| {
        args.first().is_some_and(|n| {
            [&b"AUTH"[..], b"HELLO", b"QUIT"]
                .iter()
                .any(|l| n.eq_ignore_ascii_case(l))
        })
    });
    if error.is_some() && answers_locally {
        // Redis would get bytes lessor never sends: nothing to compare.
        stats.skipped += 1;
        return;
    }
    if let Some(error) = error {
        stats.protocol_errors += 1;
        // Redis gets the stream as the client sent it (these hold nothing
        // lessor answers itself), and must close on a protocol error too.
        // Where Redis would wait for a line's end forever (a NUL), a long
        // line without one makes it give up.
        conn.write_all(stream).await.unwrap();
        if error.contains("NUL") {
            let _ = conn.write_all(&vec![b'a'; 70_000]).await;
        }
        // Redis gives up on the connection: it closes it, or, when its
        // error reply is silenced by CLIENT REPLY OFF, marks it to close
        // after a reply that never comes (flag `c`) and reads nothing more.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let info = client_list(control, id).await;
            let flags = info
                .split(' ')
                .find_map(|f| f.strip_prefix("flags="))
                .unwrap_or("");
            if info.trim().is_empty() || flags.contains('c') {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "case {case}: lessor said `{error}`, Redis did not give up on the connection: {info}\nstream: {}",
                show()
            );
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    } else {
        assert!(
            tracker.at_boundary(),
            "case {case}: generated stream ends inside a request: {}",
            show()
        );
        let clean = tracker.unchanged();
        // Evicted at the lease's end whatever the replies (before the
        // harness's own RESET below).
        let evicting = tracker.verdict().is_err_and(|why| !why.contains("pending"));
        // Redis must get to the end: RESET (replies on, out of MULTI and
        // pub/sub), then a PING whose answer carries the sentinel.
        let mut tail = Vec::new();
        if !clean {
            tail.extend_from_slice(b"RESET\r\n");
        }
        tail.extend_from_slice(format!("PING {SENTINEL}\r\n").as_bytes());
        forwarded.extend_from_slice(&tracker.client_sent(&tail).unwrap());
        let expected = tracker.replies_due();
        let uncountable = tracker
            .verdict()
            .is_err_and(|why| why.contains("not countable"));
        conn.write_all(&forwarded).await.unwrap();
        let replies = read_until_sentinel(&mut conn).await;
        // Replies: every value but out-of-band pushes (invalidations).
        let values: Vec<_> = parse_all(&replies)
            .into_iter()
            .filter(|v| {
                use redis::PushKind::*;
                !matches!(v, redis::Value::Push { kind, .. }
                    if !matches!(kind, Subscribe | PSubscribe | SSubscribe | Unsubscribe | PUnsubscribe | SUnsubscribe))
            })
            .collect();
        if uncountable {
            stats.uncountable += 1;
        } else {
            assert_eq!(
                values.len() as u64,
                expected,
                "case {case} (RESP{resp}): replies sent != replies the tracker expected\nstream: {}\nreplies: {:?}",
                show(),
                String::from_utf8_lossy(&replies)
            );
            let back = tracker.upstream_sent(&replies).unwrap();
            assert_eq!(tracker.replies_due(), 0, "case {case}: {}", show());
            assert!(back.len() >= replies.len());
            if clean {
                stats.clean += 1;
                let info = client_list(control, id).await;
                for want in [
                    "db=0 ",
                    "multi=-1 ",
                    "sub=0 ",
                    "psub=0 ",
                    "ssub=0 ",
                    "name= ",
                    "flags=N ",
                ] {
                    assert!(
                        info.contains(want),
                        "case {case}: the tracker called the session clean, Redis says {info}\nstream: {}",
                        show()
                    );
                }
                assert!(
                    info.contains(&format!("resp={resp}")),
                    "case {case}: {info}"
                );
            } else if !evicting {
                stats.restorable += 1;
            } else {
                stats.evicted += 1;
            }
        }
        // The tail is the tracker's too, and Redis ran its PING.
        ran_sentinel = true;
    }
    // Every command Redis executed is one the tracker read (Redis shows a
    // transaction's commands when EXEC runs them, so not always in order).
    let executed = monitor.commands_of(control, &addr, case).await;
    let read = tracker.commands();
    stats.commands += read.len();
    let mut unused = vec![true; read.len()];
    for (args, argc) in &executed {
        let found = read.iter().zip(&unused).position(|((r, n), free)| {
            *free
                && n == argc
                && r.len() == args.len().min(4)
                && r.iter()
                    .zip(args)
                    .all(|(a, b)| a[..] == b[..b.len().min(64)])
        });
        match found {
            Some(n) => unused[n] = false,
            None => panic!(
                "case {case}: Redis executed {:?} (argc {argc}), which the tracker did not read\ntracker read: {:?}\nstream: {}",
                args.iter()
                    .map(|a| String::from_utf8_lossy(a))
                    .collect::<Vec<_>>(),
                read.iter()
                    .map(|(r, n)| (
                        r.iter()
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect::<Vec<_>>(),
                        *n
                    ))
                    .collect::<Vec<_>>(),
                show()
            ),
        }
    }
    if ran_sentinel {
        assert!(
            executed
                .last()
                .is_some_and(|(a, _)| a.first().is_some_and(|n| n.eq_ignore_ascii_case(b"PING"))),
            "case {case}: the sentinel PING was not the last command Redis ran: {executed:?}"
        );
    }
}

/// One generated request: a command from a vocabulary that touches every
/// rule the tracker keeps, written inline or as an array, with the quirks
/// Redis accepts; `valid: false` mixes in what Redis calls protocol errors
/// (and no command lessor answers itself, whose bytes Redis never gets).
fn request(rng: &mut fastrand::Rng, valid: bool, plain: bool) -> Vec<u8> {
    if !valid && rng.u8(..4) == 0 {
        let bad: &[&[u8]] = &[
            b"ECHO \"unbalanced\r\n",
            b"ECHO \"a\"b\r\n",
            b"ECHO 'x\r\n",
            b"*1\r\n*1\r\n$4\r\nPING\r\n",
            b"*x\r\n",
            b"*+1\r\n$4\r\nPING\r\n",
            b"*01\r\n$4\r\nPING\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$04\r\nPING\r\n",
            b"*2\r\n$4\r\nECHO\r\n:1\r\n",
            b"PI\0NG\r\n",
            b"*1\r\n$4\0\r\nPING\r\n",
        ];
        return bad[rng.usize(..bad.len())].to_vec();
    }
    let argv = command(rng, valid, plain);
    if argv.is_empty() {
        return [&b"\r\n"[..], b"\n", b"*0\r\n", b"*-1\r\n", b"  \t\r\n"][rng.usize(..5)].to_vec();
    }
    if rng.bool() {
        array(rng, &argv)
    } else {
        inline(rng, &argv)
    }
}

fn command(rng: &mut fastrand::Rng, valid: bool, plain: bool) -> Vec<Vec<u8>> {
    let w = |s: &str| s.as_bytes().to_vec();
    let word = |rng: &mut fastrand::Rng| -> Vec<u8> {
        let alphabet: &[u8] = b"ab \t\"'\\xQ\x0b\x0c\r\n$*:01-";
        (0..rng.usize(0..8))
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect()
    };
    // One of `choices`, in a random mix of cases.
    let case = |rng: &mut fastrand::Rng, choices: &[&str]| -> Vec<u8> {
        choices[rng.usize(..choices.len())]
            .bytes()
            .map(|b| {
                if rng.bool() {
                    b.to_ascii_lowercase()
                } else {
                    b
                }
            })
            .collect()
    };
    let channels = |rng: &mut fastrand::Rng, names: &[&str]| {
        let mut argv = vec![case(rng, names)];
        for i in 0..rng.usize(0..4) {
            argv.push(format!("ch{i}").into_bytes());
        }
        argv
    };
    let pick = if plain {
        [0, 5, 6, 7, 13, 18, 19, 20, 21, 22, 23][rng.usize(..11)]
    } else {
        rng.u8(..24)
    };
    match pick {
        0..=4 => vec![case(rng, &["ECHO"]), word(rng)],
        5 => vec![case(rng, &["PING"])],
        6 => vec![case(rng, &["SET"]), w("k"), word(rng)],
        7 => vec![case(rng, &["GET"]), w("k")],
        8 => vec![
            case(rng, &["SELECT"]),
            w(["0", "1", "5", "x"][rng.usize(..4)]),
        ],
        9 => vec![case(rng, &["MULTI"])],
        10 => vec![case(rng, &["EXEC", "DISCARD"])],
        11 => vec![case(rng, &["WATCH"]), w("k")],
        12 => vec![case(rng, &["UNWATCH"])],
        13 => channels(rng, &["UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"]),
        14 if rng.u8(..4) == 0 => channels(rng, &["SUBSCRIBE"]),
        15 => vec![
            case(rng, &["CLIENT"]),
            case(rng, &["REPLY"]),
            case(rng, &["ON", "OFF", "SKIP", "NO", "SKIP\0", "off\0"]),
        ],
        16 => vec![
            case(rng, &["CLIENT"]),
            case(rng, &["SETNAME"]),
            w("someone"),
        ],
        17 => vec![
            case(rng, &["CLIENT"]),
            case(rng, &["NO-EVICT", "TRACKING"]),
            // Redis reads options up to a NUL.
            case(rng, &["ON", "OFF", "ON\0", "off\0x"]),
        ],
        // Rare: Redis times blocked clients out on its 100 ms clock.
        14 if rng.u8(..8) == 0 => vec![case(rng, &["BLPOP"]), w("nothing"), w("0.01")],
        18 => vec![w("$11")],
        19 => vec![case(rng, &["NOSUCHCOMMAND"]), word(rng)],
        20 if valid => vec![case(rng, &["AUTH"]), w("pw")],
        21 if valid => vec![case(rng, &["HELLO"]), w("3")],
        22 => Vec::new(),
        _ => vec![case(rng, &["INCR"]), w("counter")],
    }
}

/// An array of bulk strings, sometimes with the bytes Redis skips unread
/// not being CRLF.
fn array(rng: &mut fastrand::Rng, argv: &[Vec<u8>]) -> Vec<u8> {
    let end = |rng: &mut fastrand::Rng| -> &'static [u8] {
        if rng.u8(..8) == 0 { b"\rX" } else { b"\r\n" }
    };
    let mut out = format!("*{}", argv.len()).into_bytes();
    out.extend_from_slice(end(rng));
    for a in argv {
        out.extend_from_slice(format!("${}", a.len()).as_bytes());
        out.extend_from_slice(end(rng));
        out.extend_from_slice(a);
        out.extend_from_slice(if rng.u8(..8) == 0 { b"??" } else { b"\r\n" });
    }
    out
}

/// An inline command: each word bare where it can be, else quoted and
/// escaped; blanks of every kind Redis skips between words.
fn inline(rng: &mut fastrand::Rng, argv: &[Vec<u8>]) -> Vec<u8> {
    let blanks: &[&[u8]] = &[b" ", b"  ", b"\t", b" \x0b", b"\x0c "];
    let mut out = Vec::new();
    if rng.u8(..4) == 0 {
        out.extend_from_slice(blanks[rng.usize(..blanks.len())]);
    }
    for (i, a) in argv.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(blanks[rng.usize(..blanks.len())]);
        }
        let bare = !a.is_empty()
            && a.iter().all(|b| !b" \t\r\n\"'\x0b\x0c\\".contains(b))
            && a[0] != b'*'
            && rng.u8(..3) > 0;
        if bare {
            out.extend_from_slice(a);
        } else if rng.bool() && !a.contains(&b'\'') && !a.iter().any(|b| b"\r\n".contains(b)) {
            out.push(b'\'');
            out.extend_from_slice(a);
            out.push(b'\'');
        } else {
            out.push(b'"');
            for &b in a {
                match b {
                    b'"' => out.extend_from_slice(b"\\\""),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' if rng.bool() => out.extend_from_slice(b"\\t"),
                    b if rng.u8(..6) == 0 => {
                        out.extend_from_slice(format!("\\x{b:02x}").as_bytes())
                    }
                    b => out.push(b),
                }
            }
            out.push(b'"');
        }
    }
    out.extend_from_slice(if rng.bool() { b"\r\n" } else { b"\n" });
    out
}

/// Reads `n` replies.
async fn read_values(conn: &mut TcpStream, n: usize) -> Vec<redis::Value> {
    let mut buf = Vec::new();
    loop {
        let values = parse_all(&buf);
        if values.len() >= n {
            return values;
        }
        let mut chunk = [0u8; 4096];
        let got = tokio::time::timeout(PATIENCE, conn.read(&mut chunk))
            .await
            .expect("a reply")
            .unwrap();
        assert!(got > 0, "redis closed the connection");
        buf.extend_from_slice(&chunk[..got]);
    }
}

async fn read_until_sentinel(conn: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let end = format!("{SENTINEL}\r\n");
    while !buf.ends_with(end.as_bytes()) {
        let mut chunk = [0u8; 8192];
        let got = tokio::time::timeout(PATIENCE, conn.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no sentinel from redis; so far: {:?}",
                    String::from_utf8_lossy(&buf)
                )
            })
            .unwrap();
        assert!(got > 0, "redis closed: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..got]);
    }
    buf
}

/// Every complete reply in `buf`, by redis-rs's parser.
fn parse_all(buf: &[u8]) -> Vec<redis::Value> {
    use tokio_util::codec::Decoder;
    let mut codec = redis::ValueCodec::default();
    let mut bytes = bytes::BytesMut::from(buf);
    let mut out = Vec::new();
    while let Ok(Some(v)) = codec.decode(&mut bytes) {
        out.push(v);
    }
    out
}

async fn client_list(control: &mut TcpStream, id: i64) -> String {
    let cmd = format!("CLIENT LIST ID {id}\r\n");
    control.write_all(cmd.as_bytes()).await.unwrap();
    match read_values(control, 1).await.pop() {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned() + " ",
        Some(redis::Value::VerbatimString { text, .. }) => text + " ",
        other => panic!("CLIENT LIST answered {other:?}"),
    }
}

/// A `MONITOR` connection: every command Redis executes, with its client.
struct Monitor {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl Monitor {
    async fn start(addr: &str) -> Self {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"MONITOR\r\n").await.unwrap();
        let mut monitor = Self {
            conn,
            buf: Vec::new(),
        };
        assert_eq!(monitor.line().await, "OK");
        monitor
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(n) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..n + 2).collect();
                return String::from_utf8_lossy(&line[1..n]).into_owned();
            }
            let mut chunk = [0u8; 16384];
            let got = tokio::time::timeout(PATIENCE, self.conn.read(&mut chunk))
                .await
                .expect("monitor output")
                .unwrap();
            assert!(got > 0, "monitor connection closed");
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }

    /// The commands `addr` ran, up to a marker the control connection runs
    /// after them (the monitor stream is in execution order).
    async fn commands_of(
        &mut self,
        control: &mut TcpStream,
        addr: &str,
        case: usize,
    ) -> Vec<(Vec<Vec<u8>>, u64)> {
        let marker = format!("lessor-diff-marker-{case}");
        control
            .write_all(format!("ECHO {marker}\r\n").as_bytes())
            .await
            .unwrap();
        read_values(control, 1).await;
        let tag = format!(" {addr}] ");
        let mut out = Vec::new();
        loop {
            let line = self.line().await;
            if line.contains(&marker) && !line.contains(&tag) {
                return out;
            }
            if let Some(at) = line.find(&tag) {
                let args = unrepr(&line[at + tag.len()..]);
                let argc = args.len() as u64;
                out.push((args.into_iter().take(4).collect(), argc));
            }
        }
    }
}

/// The arguments of a `MONITOR` line: each quoted, with Redis's escapes.
fn unrepr(s: &str) -> Vec<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        i += 1;
        let mut arg = Vec::new();
        while i < b.len() && b[i] != b'"' {
            if b[i] == b'\\' {
                i += 1;
                match b[i] {
                    b'n' => arg.push(b'\n'),
                    b'r' => arg.push(b'\r'),
                    b't' => arg.push(b'\t'),
                    b'a' => arg.push(0x07),
                    b'b' => arg.push(0x08),
                    b'x' => {
                        let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                        arg.push(u8::from_str_radix(hex, 16).unwrap());
                        i += 2;
                    }
                    other => arg.push(other),
                }
            } else {
                arg.push(b[i]);
            }
            i += 1;
        }
        i += 1;
        out.push(arg);
    }
    out
}
