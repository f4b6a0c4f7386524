//! The Redis listener against a hostile client, held to redis-server
//! itself. Each scenario is a schedule of raw bytes from a few clients; it
//! runs once against a redis-server directly and once through lessor's
//! listener (a pool of two, so connections change hands), and the two
//! transcripts (every reply, parsed by redis-rs, and every close) must be
//! equal. After each run the upstream's `CLIENT LIST` must show lessor's
//! connections as fresh ones (db 0, unnamed, no transaction, no
//! subscription, flags `N`), and nothing may have panicked.
//!
//! Scenarios: RESP2 pub/sub (with and without arguments, PING while
//! subscribed, PUBLISH from another client, leaving every subscription),
//! blocking commands (timeouts, woken by another client, a client that
//! hangs up while blocked), `CLIENT REPLY OFF/ON/SKIP`, `CLIENT TRACKING`,
//! pipelines split at random byte boundaries (seeded), inline edge cases,
//! a pipeline of thousands of commands in one write, `QUIT` in the middle
//! of a pipeline, `RESET`, transactions that abort or are discarded after
//! `SELECT`/`SETNAME`, clients that vanish mid-pipeline or while
//! subscribed.
//!
//! Four scenarios (`half_close`, `hello_setname_while_pinned`,
//! `auth_while_replies_off`, `auth_while_subscribed`) are divergences a
//! review found, kept as tests of their fixes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use lessor::EngineKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::redis_listen::{PASSWORD, fixture_with};
use crate::support::redis::Redis;
use crate::support::{PATIENCE, eventually};

/// How long a reply the direct server gives may take through lessor.
const REPLY_WAIT: Duration = Duration::from_secs(5);

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics of lessor (it runs in this process): a task that panics
/// only closes its client, which a transcript could miss. A failed
/// assertion of another test (raised in `tests/`) is not one.
fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// One client connection that reads replies whole (redis-rs's parser).
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    closed: bool,
}

impl Conn {
    async fn open(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut conn = Self {
            stream,
            buf: BytesMut::new(),
            closed: false,
        };
        conn.send(format!("AUTH {PASSWORD}\r\n").as_bytes()).await;
        let ok = conn.value().await;
        assert_eq!(ok, Some(redis::Value::Okay), "AUTH on {addr}");
        conn
    }

    async fn send(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).await.is_err() {
            self.closed = true;
        }
    }

    /// Reads `n` replies (or up to the close, noted as `closed`; or a
    /// reply that never comes, noted as `timeout`).
    async fn read(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next().await {
                Some(v) => out.push(v),
                None => {
                    out.push(if self.closed { "closed" } else { "timeout" }.to_owned());
                    break;
                }
            }
        }
        out
    }

    async fn next(&mut self) -> Option<String> {
        self.value().await.map(|v| format!("{v:?}"))
    }

    async fn value(&mut self) -> Option<redis::Value> {
        use tokio_util::codec::Decoder;
        let mut codec = redis::ValueCodec::default();
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        loop {
            match codec.decode(&mut self.buf) {
                Ok(Some(v)) => return Some(v),
                Ok(None) => {}
                Err(e) => panic!("unparsable reply: {e}"),
            }
            if self.closed {
                return None;
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => self.closed = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// One world: clients connected to `entry` (a redis-server, or lessor in
/// front of one), `server` the redis-server itself (for conditions).
struct World {
    entry: String,
    server: String,
    clients: Vec<Option<Conn>>,
    log: Vec<String>,
    marks: u32,
}

impl World {
    async fn new(entry: String, server: String, n: usize) -> Self {
        let mut w = Self {
            entry,
            server,
            clients: Vec::new(),
            log: Vec::new(),
            marks: 0,
        };
        for _ in 0..n {
            let conn = Conn::open(&w.entry).await;
            w.clients.push(Some(conn));
        }
        w
    }

    fn conn(&mut self, c: usize) -> &mut Conn {
        self.clients[c].as_mut().expect("a connected client")
    }

    /// Sends `bytes` as client `c` and reads `n` replies.
    async fn step(&mut self, c: usize, bytes: &[u8], n: usize) {
        self.send(c, bytes).await;
        self.read(c, n).await;
    }

    async fn send(&mut self, c: usize, bytes: &[u8]) {
        self.conn(c).send(bytes).await;
    }

    async fn read(&mut self, c: usize, n: usize) {
        let replies = self.conn(c).read(n).await;
        for r in replies {
            self.log.push(format!("c{c}: {r}"));
        }
    }

    /// Reads client `c`'s replies up to a `PING` it sends now: every
    /// reply before it is in the transcript, whatever their number.
    async fn sync(&mut self, c: usize) {
        self.marks += 1;
        let mark = format!("mark{}", self.marks);
        self.send(c, format!("PING {mark}\r\n").as_bytes()).await;
        let plain = redis::Value::BulkString(mark.clone().into_bytes());
        loop {
            let Some(r) = self.conn(c).value().await else {
                let what = if self.conn(c).closed {
                    "closed"
                } else {
                    "timeout"
                };
                self.log.push(format!("c{c}: {what} before {mark}"));
                return;
            };
            let done =
                r == plain || matches!(&r, redis::Value::Array(items) if items.contains(&plain));
            self.log.push(format!("c{c}: {r:?}"));
            if done {
                return;
            }
        }
    }

    /// Reads until client `c` is closed (noting every reply before).
    async fn until_closed(&mut self, c: usize) {
        loop {
            match self.conn(c).next().await {
                Some(r) => self.log.push(format!("c{c}: {r}")),
                None => {
                    let what = if self.conn(c).closed {
                        "closed"
                    } else {
                        "timeout"
                    };
                    self.log.push(format!("c{c}: {what}"));
                    return;
                }
            }
        }
    }

    /// Half-closes client `c` (no more bytes from it).
    async fn shutdown_write(&mut self, c: usize) {
        let _ = self.conn(c).stream.shutdown().await;
    }

    /// Hangs up client `c`.
    fn hang_up(&mut self, c: usize) {
        self.clients[c] = None;
    }

    async fn reconnect(&mut self, c: usize) {
        let conn = Conn::open(&self.entry).await;
        self.clients[c] = Some(conn);
    }

    /// Waits until the server counts `n` blocked clients.
    async fn blocked(&self, n: u64) {
        let server = self.server.clone();
        eventually(&format!("{n} blocked clients"), || {
            let server = server.clone();
            async move { info_field(&server, "blocked_clients").await == Some(n) }
        })
        .await;
    }

    /// Waits until the server counts `n` subscribers of `channel`.
    async fn subscribers(&self, channel: &str, n: u64) {
        let server = self.server.clone();
        let command = format!("PUBSUB NUMSUB {channel}\r\n");
        eventually(&format!("{n} subscribers of {channel}"), || {
            let (server, command) = (server.clone(), command.clone());
            async move {
                let mut control = Conn::open(&server).await;
                control.send(command.as_bytes()).await;
                let reply = control.value().await;
                matches!(reply, Some(redis::Value::Array(items)) if items.get(1) == Some(&redis::Value::Int(n as i64)))
            }
        })
        .await;
    }
}

/// `INFO clients`'s `field`, from the server itself.
async fn info_field(server: &str, field: &str) -> Option<u64> {
    let mut control = Conn::open(server).await;
    control.send(b"INFO clients\r\n").await;
    let Some(redis::Value::BulkString(info)) = control.value().await else {
        return None;
    };
    let text = String::from_utf8_lossy(&info).into_owned();
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// The upstream's `CLIENT LIST`, lessor's connections only.
async fn lessor_connections(server: &str) -> Vec<String> {
    let mut control = Conn::open(server).await;
    control.send(b"CLIENT LIST\r\n").await;
    let Some(redis::Value::BulkString(list)) = control.value().await else {
        panic!("CLIENT LIST");
    };
    String::from_utf8_lossy(&list)
        .lines()
        .filter(|l| !l.contains(" cmd=client|list") && !l.contains(" cmd=info"))
        .map(str::to_owned)
        .collect()
}

/// Runs `$scenario` (an `async fn(&mut World)`) directly and through the
/// listener, compares the transcripts, then checks lessor's connections
/// are clean and nothing panicked.
macro_rules! differential {
    ($($test:ident => $scenario:path, $clients:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                count_panics();
                let Some(fx) = fixture_with(EngineKind::Bb8, 2, "", "", &[]).await else {
                    return;
                };
                let direct = Redis::start_with(&["--requirepass", PASSWORD])
                    .await
                    .expect("a second redis-server");
                let panics = PANICS.load(Ordering::SeqCst);
                let mut theirs = World::new(direct.addr(), direct.addr(), $clients).await;
                $scenario(&mut theirs).await;
                let mut ours =
                    World::new(format!("127.0.0.1:{}", fx.port), fx.redis.addr(), $clients).await;
                $scenario(&mut ours).await;
                compare(stringify!($test), &theirs.log, &ours.log);
                drop(ours);
                assert_clean(&fx.redis.addr()).await;
                assert_eq!(PANICS.load(Ordering::SeqCst), panics, "something panicked");
            }
        )*
    };
}

fn compare(test: &str, want: &[String], got: &[String]) {
    if std::env::var_os("LESSOR_HOSTILE_SHOW").is_some() {
        eprintln!("{test}\n direct:   {want:#?}\n listener: {got:#?}");
    }
    let first = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    if first == want.len() && first == got.len() {
        return;
    }
    let from = first.saturating_sub(4);
    panic!(
        "{test}: the listener diverges at reply {first}\n direct:   {:#?}\n listener: {:#?}",
        &want[from..want.len().min(first + 6)],
        &got[from..got.len().min(first + 6)],
    );
}

/// Every connection lessor holds is what a fresh one is.
async fn assert_clean(server: &str) {
    let server = server.to_owned();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let list = lessor_connections(&server).await;
        let clean = !list.is_empty()
            && list.iter().all(|l| {
                let l = format!("{l} ");
                l.contains(" db=0 ")
                    && l.contains(" name= ")
                    && l.contains(" multi=-1 ")
                    && l.contains(" sub=0 ")
                    && l.contains(" psub=0 ")
                    && l.contains(" flags=N ")
                    && l.contains(" resp=2 ")
            });
        if clean {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lessor's connections are not clean: {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- scenarios

differential! {
    redis_hostile_pubsub_resp2 => pubsub_resp2, 2;
    redis_hostile_blocking => blocking, 3;
    redis_hostile_client_reply => client_reply, 2;
    redis_hostile_tracking => tracking, 2;
    redis_hostile_split_writes => split_writes, 2;
    redis_hostile_inline_edges => inline_edges, 1;
    redis_hostile_long_pipeline => long_pipeline, 2;
    redis_hostile_quit_mid_pipeline => quit_mid_pipeline, 3;
    redis_hostile_reset => reset, 2;
    redis_hostile_transactions => transactions, 2;
    redis_hostile_vanishing_clients => vanishing_clients, 3;
    redis_hostile_half_close => half_close, 1;
    redis_hostile_hello_setname_while_pinned => hello_setname_while_pinned, 1;
    redis_hostile_auth_while_replies_off => auth_while_replies_off, 1;
    redis_hostile_auth_while_subscribed => auth_while_subscribed, 1;
}

async fn pubsub_resp2(w: &mut World) {
    // One channel and one pattern: an argument-less unsubscribe lists
    // several in the server's hash order, which differs between servers.
    w.step(0, b"SUBSCRIBE a\r\nSUBSCRIBE b\r\nUNSUBSCRIBE b\r\n", 3)
        .await;
    w.step(0, b"PING\r\nPING x\r\n", 2).await;
    w.step(1, b"PUBLISH a hi\r\n", 1).await;
    w.read(0, 1).await;
    w.step(0, b"PSUBSCRIBE p*\r\n", 1).await;
    w.step(1, b"PUBLISH pz m\r\nPUBLISH a m2\r\n", 2).await;
    w.read(0, 2).await;
    // Refused in the RESP2 pub/sub context.
    w.step(0, b"GET k\r\nSELECT 1\r\n", 2).await;
    // Every channel, then every pattern: still subscribed in between.
    w.step(0, b"UNSUBSCRIBE\r\n", 1).await;
    w.step(0, b"GET k\r\n", 1).await;
    w.step(0, b"PUNSUBSCRIBE\r\n", 1).await;
    // Out of pub/sub: commands run again, and may move to another
    // connection.
    w.step(0, b"SET k v\r\nGET k\r\n", 2).await;
    w.step(0, b"UNSUBSCRIBE\r\nPUNSUBSCRIBE nope\r\n", 2).await;
    // Subscribe and leave in one pipeline, with a command after.
    w.step(0, b"SUBSCRIBE c\r\nUNSUBSCRIBE c\r\nGET k\r\n", 3)
        .await;
    w.step(0, b"SUBSCRIBE\r\nUNSUBSCRIBE x y\r\n", 3).await;
    w.sync(0).await;
    // Subscribed, another client publishes a burst.
    w.step(0, b"SUBSCRIBE burst\r\n", 1).await;
    let mut publish = Vec::new();
    for i in 0..200 {
        publish.extend_from_slice(format!("PUBLISH burst m{i}\r\n").as_bytes());
    }
    w.step(1, &publish, 200).await;
    w.read(0, 200).await;
    w.step(0, b"UNSUBSCRIBE burst\r\nPING\r\n", 2).await;
    w.sync(0).await;
    w.sync(1).await;
}

async fn blocking(w: &mut World) {
    w.step(0, b"DEL q q2\r\nBLPOP q 0.05\r\n", 2).await;
    w.step(0, b"SELECT 1\r\nCLIENT SETNAME blocker\r\n", 2)
        .await;
    // Blocks; another client wakes it.
    w.send(0, b"BLPOP q 0\r\n").await;
    w.blocked(1).await;
    w.step(1, b"SELECT 1\r\nLPUSH q x\r\n", 2).await;
    w.read(0, 1).await;
    w.step(0, b"CLIENT GETNAME\r\n", 1).await;
    // Blocked behind a pipeline, more commands behind it.
    w.send(0, b"SET s 1\r\nBRPOP q 0\r\nGET s\r\nCLIENT GETNAME\r\n")
        .await;
    w.read(0, 1).await;
    w.blocked(1).await;
    w.step(1, b"RPUSH q y\r\n", 1).await;
    w.read(0, 3).await;
    // Hangs up while blocked: nothing it asked for is served afterwards.
    w.send(2, b"SELECT 1\r\nBLPOP q2 0\r\n").await;
    w.read(2, 1).await;
    w.blocked(1).await;
    w.hang_up(2);
    w.blocked(0).await;
    w.step(1, b"LPUSH q2 z\r\nLLEN q2\r\n", 2).await;
    // Timeouts that expire.
    w.step(
        0,
        b"BLPOP nothing 0.05\r\nBZPOPMIN nz 0.05\r\nXREAD BLOCK 50 STREAMS xs 0\r\n",
        3,
    )
    .await;
    w.sync(0).await;
    w.sync(1).await;
}

async fn client_reply(w: &mut World) {
    w.step(
        0,
        b"CLIENT REPLY OFF\r\nSET a 1\r\nGET a\r\nCLIENT REPLY ON\r\nGET a\r\n",
        2,
    )
    .await;
    w.step(0, b"CLIENT REPLY SKIP\r\nINCR a\r\nGET a\r\n", 1)
        .await;
    // OFF across pipelines: the client stays on its connection.
    w.send(0, b"CLIENT REPLY OFF\r\n").await;
    w.send(0, b"SELECT 1\r\nSET b 1\r\n").await;
    w.step(1, b"SELECT 1\r\nGET b\r\n", 2).await;
    w.step(0, b"CLIENT REPLY ON\r\nGET b\r\n", 2).await;
    w.step(
        0,
        b"SELECT 0\r\nCLIENT REPLY SKIP\r\nCLIENT REPLY SKIP\r\nPING x\r\n",
        2,
    )
    .await;
    w.step(0, b"CLIENT REPLY SKIP\r\n\r\nPING y\r\n", 1).await;
    // Leaves with replies off.
    w.send(0, b"CLIENT REPLY OFF\r\nSET c 1\r\n").await;
    w.hang_up(0);
    w.reconnect(0).await;
    w.sync(0).await;
    w.step(1, b"GET c\r\n", 1).await;
    w.sync(1).await;
}

async fn tracking(w: &mut World) {
    w.step(0, b"CLIENT TRACKING on\r\nGET t\r\nSET t 1\r\n", 3)
        .await;
    w.step(1, b"SET t 2\r\n", 1).await;
    w.step(0, b"CLIENT TRACKING off\r\nGET t\r\n", 2).await;
    w.step(
        0,
        b"CLIENT TRACKING on BCAST PREFIX t\r\nCLIENT TRACKING off\r\n",
        2,
    )
    .await;
    w.step(0, b"CLIENT TRACKING on\r\n", 1).await;
    w.hang_up(0);
    w.reconnect(0).await;
    w.step(0, b"CLIENT TRACKINGINFO\r\n", 1).await;
    w.sync(0).await;
}

/// Seeded pipelines written in pieces at random byte boundaries.
async fn split_writes(w: &mut World) {
    let mut rng = fastrand::Rng::with_seed(seed());
    let pieces: &[&[u8]] = &[
        b"SET k0 v\r\n",
        b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$10\r\nwith space\r\n",
        b"GET k1\r\n",
        b"*2\r\n$3\r\nGET\r\n$2\r\nk0\r\n",
        b"SELECT 1\r\n",
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n",
        b"MULTI\r\n",
        b"INCR n\r\n",
        b"EXEC\r\n",
        b"WATCH k0\r\n",
        b"UNWATCH\r\n",
        b"CLIENT SETNAME split\r\n",
        b"CLIENT GETNAME\r\n",
        b"DBSIZE\r\n",
        b"ECHO \"a b\\x41\"\r\n",
        b"\r\n",
        b"PING\r\n",
    ];
    for _ in 0..60 {
        let c = rng.usize(..2);
        let mut bytes = Vec::new();
        for _ in 0..rng.usize(1..8) {
            bytes.extend_from_slice(pieces[rng.usize(..pieces.len())]);
        }
        // Closes any MULTI, so that the PING mark is answered.
        bytes.extend_from_slice(b"DISCARD\r\n");
        let mut at = 0;
        while at < bytes.len() {
            let n = rng.usize(1..=(bytes.len() - at).min(12));
            w.send(c, &bytes[at..at + n]).await;
            at += n;
            if rng.bool() {
                // A pause, so that the pieces arrive as separate reads.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        w.sync(c).await;
    }
    w.sync(0).await;
    w.sync(1).await;
}

fn seed() -> u64 {
    std::env::var("LESSOR_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261207)
}

async fn inline_edges(w: &mut World) {
    w.step(0, b"SET q \"a b\\x41\\n\\t\\\\\"\r\nGET q\r\n", 2)
        .await;
    w.step(0, b"SET q 'it\\'s'\r\nGET q\r\n", 2).await;
    w.step(0, b"  \r\n\r\n\t\r\nECHO  x   \r\n", 1).await;
    w.step(0, b"ECHO x\nECHO y\n", 2).await;
    w.step(0, b"ECHO \"\"\r\nECHO ''\r\n", 2).await;
    w.step(0, b"\"SELECT\" 1\r\nSET q 1\r\n'select' 0\r\nGET q\r\n", 4)
        .await;
    w.step(0, b"$11\r\nBLPOP q 10\r\n", 2).await;
    w.step(0, b"*1\r\n$4\r\nPING\r\n*0\r\n*-1\r\nPING\r\n", 2)
        .await;
    // Unbalanced quotes: a protocol error after the reply before it.
    w.send(0, b"PING\r\nECHO \"a\"b\r\nPING\r\n").await;
    w.until_closed(0).await;
}

async fn long_pipeline(w: &mut World) {
    let mut bytes = Vec::new();
    for i in 0..5000 {
        bytes.extend_from_slice(b"INCR n\r\n");
        if i % 1000 == 0 {
            bytes.extend_from_slice(b"SELECT 1\r\nINCR n\r\nSELECT 0\r\n");
        }
    }
    bytes.extend_from_slice(b"GET n\r\n");
    w.send(0, &bytes).await;
    // Meanwhile another client gets its turn.
    w.step(1, b"INCR m\r\n", 1).await;
    w.read(0, 5000 + 15 + 1).await;
    let mut big = b"SET big ".to_vec();
    big.extend(std::iter::repeat_n(b'x', 300_000));
    big.extend_from_slice(b"\r\nSTRLEN big\r\n");
    w.step(0, &big, 2).await;
    w.sync(0).await;
}

async fn quit_mid_pipeline(w: &mut World) {
    w.send(0, b"SET a 1\r\nQUIT\r\nSET a 2\r\n").await;
    w.until_closed(0).await;
    w.step(1, b"GET a\r\n", 1).await;
    w.send(1, b"MULTI\r\nSET a 3\r\nQUIT\r\nEXEC\r\n").await;
    w.until_closed(1).await;
    w.send(2, b"SUBSCRIBE ch\r\nQUIT\r\nPING\r\n").await;
    w.until_closed(2).await;
    w.reconnect(0).await;
    w.step(0, b"GET a\r\nCLIENT REPLY SKIP\r\nGET a\r\nQUIT x\r\n", 1)
        .await;
    w.until_closed(0).await;
    w.reconnect(0).await;
    w.sync(0).await;
}

async fn reset(w: &mut World) {
    // RESET signs the client out of redis-server (requirepass), not out of
    // a `trust` listener: every RESET is followed by an AUTH, which both
    // accept, and its reply is compared like any other.
    let auth = format!("AUTH {PASSWORD}\r\n");
    let after = |s: &str| format!("{s}{auth}").into_bytes();
    w.step(
        0,
        &after("SELECT 1\r\nCLIENT SETNAME r\r\nSET k 1\r\nRESET\r\n"),
        5,
    )
    .await;
    w.step(0, b"GET k\r\nCLIENT GETNAME\r\n", 2).await;
    w.step(0, &after("MULTI\r\nSET k 2\r\nRESET\r\n"), 4).await;
    w.step(0, b"EXEC\r\nGET k\r\n", 2).await;
    w.step(0, &after("WATCH k\r\nRESET\r\n"), 3).await;
    w.step(1, b"SET k 3\r\n", 1).await;
    w.step(0, b"MULTI\r\nSET k 4\r\nEXEC\r\nGET k\r\n", 4).await;
    w.step(0, &after("SUBSCRIBE c\r\nRESET\r\n"), 3).await;
    w.step(0, b"GET k\r\n", 1).await;
    w.step(0, &after("CLIENT REPLY OFF\r\nSET k 5\r\nRESET\r\n"), 2)
        .await;
    w.step(0, b"GET k\r\n", 1).await;
    w.step(0, &after("SELECT 2\r\nMULTI\r\nSELECT 1\r\nRESET\r\n"), 5)
        .await;
    w.step(0, b"SET k 6\r\nRESET x\r\n", 2).await;
    w.sync(0).await;
    w.step(1, b"SELECT 1\r\nGET k\r\nSELECT 0\r\nGET k\r\n", 4)
        .await;
}

async fn transactions(w: &mut World) {
    // EXECABORT: an unknown command and a wrong arity queue nothing.
    w.step(
        0,
        b"MULTI\r\nNOSUCH\r\nSET k 1\r\nGET\r\nEXEC\r\nGET k\r\n",
        6,
    )
    .await;
    // SELECT and SETNAME queued, then discarded or run.
    w.step(
        0,
        b"MULTI\r\nSELECT 1\r\nCLIENT SETNAME tx\r\nDISCARD\r\n",
        4,
    )
    .await;
    w.step(0, b"SET k d0\r\nCLIENT GETNAME\r\n", 2).await;
    w.step(0, b"MULTI\r\nSELECT 1\r\nCLIENT SETNAME tx\r\nEXEC\r\n", 4)
        .await;
    w.step(0, b"SET k d1\r\nCLIENT GETNAME\r\n", 2).await;
    w.step(1, b"GET k\r\nSELECT 1\r\nGET k\r\nCLIENT GETNAME\r\n", 4)
        .await;
    // SELECT inside MULTI refused at EXEC (an out-of-range db).
    w.step(0, b"MULTI\r\nSELECT 99\r\nSET k d2\r\nEXEC\r\nGET k\r\n", 5)
        .await;
    // Nested MULTI, EXEC with arguments, WATCH inside MULTI.
    w.step(0, b"MULTI\r\nMULTI\r\nEXEC x\r\nWATCH k\r\nEXEC\r\n", 5)
        .await;
    w.step(0, b"WATCH k\r\nDISCARD\r\nEXEC\r\nUNWATCH\r\n", 4)
        .await;
    // READONLY (refused without cluster mode) and READWRITE.
    w.step(
        0,
        b"READONLY\r\nREADWRITE\r\nMULTI\r\nREADONLY\r\nEXEC\r\n",
        5,
    )
    .await;
    // A MULTI left open by a client that hangs up.
    w.send(0, b"MULTI\r\nSET k left\r\n").await;
    w.read(0, 2).await;
    w.hang_up(0);
    w.reconnect(0).await;
    w.step(0, b"GET k\r\nSELECT 1\r\nGET k\r\n", 3).await;
    w.sync(0).await;
    w.sync(1).await;
}

async fn vanishing_clients(w: &mut World) {
    // Hangs up with half a command sent, inside MULTI, subscribed.
    w.send(0, b"SET v 1\r\n*3\r\n$3\r\nSET\r\n$1\r\nv\r\n$5\r\nab")
        .await;
    w.read(0, 1).await;
    w.hang_up(0);
    w.send(1, b"SUBSCRIBE gone\r\n").await;
    w.read(1, 1).await;
    w.hang_up(1);
    w.subscribers("gone", 0).await;
    w.send(2, b"SELECT 1\r\nCLIENT SETNAME v\r\nMULTI\r\nSET v 2\r\n")
        .await;
    w.read(2, 4).await;
    w.hang_up(2);
    w.reconnect(0).await;
    w.reconnect(1).await;
    w.step(
        0,
        b"GET v\r\nSELECT 1\r\nGET v\r\nCLIENT GETNAME\r\nPUBLISH gone x\r\n",
        5,
    )
    .await;
    // A pipeline of many commands, and gone before reading a reply.
    let mut bytes = Vec::new();
    for _ in 0..3000 {
        bytes.extend_from_slice(b"INCR many\r\n");
    }
    w.send(1, &bytes).await;
    w.hang_up(1);
    w.reconnect(1).await;
    w.step(1, b"SET other 1\r\nCLIENT GETNAME\r\n", 2).await;
    w.sync(0).await;
    w.sync(1).await;
}

/// A client that half-closes after its pipeline (`printf 'PING\r\n' | nc
/// -N`) gets every reply, then is closed, as from Redis. (The listener used
/// to take the EOF for a client gone and drop its replies.)
async fn half_close(w: &mut World) {
    w.send(0, b"SET h 1\r\nINCR h\r\nGET h\r\n").await;
    w.shutdown_write(0).await;
    w.until_closed(0).await;
}

/// `HELLO 2 SETNAME` while pinned (here by WATCH) names the connection the
/// client is on at once, as on Redis. (The listener used to record the name
/// only for the client's next connection.)
async fn hello_setname_while_pinned(w: &mut World) {
    w.step(0, b"WATCH k\r\n", 1).await;
    // The HELLO reply itself differs by design (id, version): not logged.
    w.send(0, b"HELLO 2 SETNAME zed\r\n").await;
    let _ = w.conn(0).read(1).await;
    w.step(0, b"CLIENT GETNAME\r\nUNWATCH\r\nCLIENT GETNAME\r\n", 3)
        .await;
    w.sync(0).await;
}

/// Under `CLIENT REPLY OFF` (or after `SKIP`) Redis answers nothing, `AUTH`
/// included, and the SKIP is spent on it (the `PING` after it is
/// answered). The listener used to answer the `AUTH` and leave the SKIP to
/// silence the `PING`.
async fn auth_while_replies_off(w: &mut World) {
    w.send(
        0,
        format!("CLIENT REPLY OFF\r\nAUTH {PASSWORD}\r\nCLIENT REPLY ON\r\n").as_bytes(),
    )
    .await;
    w.read(0, 1).await;
    w.send(
        0,
        format!("CLIENT REPLY SKIP\r\nAUTH {PASSWORD}\r\nPING\r\n").as_bytes(),
    )
    .await;
    w.read(0, 1).await;
    w.sync(0).await;
}

/// A RESP2 subscriber's `AUTH` is refused by Redis (only (P|S)SUBSCRIBE /
/// (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed); the listener used
/// to answer it `+OK`.
async fn auth_while_subscribed(w: &mut World) {
    w.step(0, b"SUBSCRIBE s\r\n", 1).await;
    w.step(0, format!("AUTH {PASSWORD}\r\n").as_bytes(), 1)
        .await;
    w.step(0, b"UNSUBSCRIBE\r\n", 1).await;
    w.sync(0).await;
}
