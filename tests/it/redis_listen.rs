//! The native Redis listener, with real clients against a real redis-server
//! with `requirepass`: `redis-cli`, `redis-benchmark`, redis-rs and raw
//! sockets connect to lessor as to Redis. Every pooling rule is checked by
//! what the next client on the same server connection sees, and by what
//! the server itself reports (`CLIENT INFO`, the keys in each db).

use std::time::Duration;

use lessor::EngineKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::for_both_engines;
use crate::support::redis::Redis;
use crate::support::{Lessor, PATIENCE, config_one, eventually, http, ports};

for_both_engines!(redis_listen_state_follows_each_client_over_one_connection);

pub(crate) const PASSWORD: &str = "upstream-pw";

/// A redis-server with a password, and lessor in front of it with a
/// listener (`listen_extra` inside its block) and a pool of `max_size`.
pub(crate) struct Fixture {
    pub(crate) redis: Redis,
    pub(crate) lessor: Lessor,
    pub(crate) port: u16,
    _dir: tempfile::TempDir,
}

async fn fixture(
    engine: EngineKind,
    max_size: u32,
    listen_extra: &str,
    redis_extra: &str,
) -> Option<Fixture> {
    fixture_with(engine, max_size, listen_extra, redis_extra, &[]).await
}

/// [`fixture`] with more lines of the upstream's config (`lease: ...`).
pub(crate) async fn fixture_with(
    engine: EngineKind,
    max_size: u32,
    listen_extra: &str,
    redis_extra: &str,
    more: &[&str],
) -> Option<Fixture> {
    let redis = Redis::start_with(&["--requirepass", PASSWORD]).await?;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upstream-password");
    std::fs::write(&file, PASSWORD).unwrap();
    let port = ports::reserve();
    let lessor = Lessor::start(&format!(
        "shutdown: {{ grace: 3s }}\n{}",
        config_one(
        &redis.addr(),
        engine,
        &[
            more,
            &[
            "protocol: redis",
            &format!(
                "redis: {{ password_file: \"{}\"{redis_extra} }}",
                file.display()
            ),
            &format!(
                "pool: {{ max_size: {max_size}, min_idle: 1, connect_timeout: 5s, checkout_timeout: 10s }}"
            ),
            &format!("listen: {{ address: \"127.0.0.1:{port}\"{listen_extra} }}"),
            ],
        ]
        .concat(),
    )))
    .await;
    eventually("the listener accepts", || async move {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    Some(Fixture {
        redis,
        lessor,
        port,
        _dir: dir,
    })
}

/// A client speaking RESP by hand: what it sends and reads is exact.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(port: u16) -> Self {
        Self {
            stream: TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// A client whose socket takes in little (no receive-window growth):
    /// one that does not read stalls its sender soon.
    async fn connect_narrow(port: u16) -> Self {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        socket.connect(&addr.into()).unwrap();
        socket.set_nonblocking(true).unwrap();
        let std: std::net::TcpStream = socket.into();
        Self {
            stream: TcpStream::from_std(std).unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads until `expected` has arrived, and checks it is exactly that.
    async fn expect(&mut self, expected: &[u8]) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.buf.len() < expected.len() {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "waiting for {:?}, got {:?}",
                        String::from_utf8_lossy(expected),
                        String::from_utf8_lossy(&self.buf)
                    )
                })
                .unwrap();
            assert!(
                n > 0,
                "closed while waiting for {:?}, got {:?}",
                String::from_utf8_lossy(expected),
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let got: Vec<u8> = self.buf.drain(..expected.len()).collect();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected)
        );
    }

    /// Sends `command` and checks its reply.
    async fn call(&mut self, command: &str, reply: &str) {
        self.send(format!("{command}\r\n").as_bytes()).await;
        self.expect(reply.as_bytes()).await;
    }

    /// Reads one line (a simple reply, or a bulk's header).
    async fn line(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..at + 2).collect();
                return String::from_utf8_lossy(&line[..at]).into_owned();
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .expect("a line in time")
                .unwrap();
            assert!(
                n > 0,
                "closed before a line: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A bulk string reply's text.
    async fn bulk(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes()).await;
        let head = self.line().await;
        let len: usize = head
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{command}: not a bulk string: {head}"));
        let body = self.line().await;
        assert_eq!(body.len(), len);
        body
    }

    /// Whether the listener closes the connection (within patience),
    /// whatever it sends before.
    async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}

/// A connection straight to redis-server, authenticated.
async fn direct(redis: &Redis) -> Raw {
    let port: u16 = redis.addr().rsplit(':').next().unwrap().parse().unwrap();
    let mut raw = Raw::connect(port).await;
    raw.call(&format!("AUTH {PASSWORD}"), "+OK\r\n").await;
    raw
}

/// Two clients on a pool of one connection: each keeps its own db and
/// name, and neither ever sees the other's (the server's own `CLIENT
/// INFO` shows the connection back at db 0 without a name between them).
async fn redis_listen_state_follows_each_client_over_one_connection(engine: EngineKind) {
    let Some(f) = fixture(engine, 1, "", "").await else {
        return;
    };
    let mut a = Raw::connect(f.port).await;
    let mut b = Raw::connect(f.port).await;
    a.call("SELECT 2", "+OK\r\n").await;
    a.call("CLIENT SETNAME alpha", "+OK\r\n").await;
    a.call("SET k from-a", "+OK\r\n").await;
    b.call("GET k", "$-1\r\n").await;
    b.call("CLIENT GETNAME", "$-1\r\n").await;
    let info = b.bulk("CLIENT INFO").await;
    assert!(info.contains(" db=0 "), "{info}");
    b.call("SET k from-b", "+OK\r\n").await;
    a.call("GET k", "$6\r\nfrom-a\r\n").await;
    a.call("CLIENT GETNAME", "$5\r\nalpha\r\n").await;
    let info = a.bulk("CLIENT INFO").await;
    assert!(
        info.contains(" db=2 ") && info.contains(" name=alpha "),
        "{info}"
    );
    // A pipeline in one write: replies in command order.
    a.send(b"SET n 1\r\nINCR n\r\nINCR n\r\nGET n\r\n").await;
    a.expect(b"+OK\r\n:2\r\n:3\r\n$1\r\n3\r\n").await;
    // A db Redis refuses is not remembered.
    a.call("SELECT 99", "-ERR DB index is out of range\r\n")
        .await;
    a.call("GET n", "$1\r\n3\r\n").await;
    // The server's own account: each key in its client's db.
    let mut d = direct(&f.redis).await;
    d.call("GET k", "$6\r\nfrom-b\r\n").await;
    d.call("SELECT 2", "+OK\r\n").await;
    d.call("GET k", "$6\r\nfrom-a\r\n").await;
    // One server connection served both.
    let stats = f.lessor.stats("up").await;
    assert_eq!(stats.connections, 1, "{stats:?}");
}

/// redis-cli (its `--pipe` mass insertion checked key by key, and the Unix
/// socket), redis-benchmark's default tests with and without pipelining,
/// and redis-rs (plain and multiplexed) run unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_real_clients_run_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cache.sock");
    let Some(f) = fixture(
        EngineKind::Bb8,
        4,
        &format!(", unix_socket: \"{}\"", socket.display()),
        "",
    )
    .await
    else {
        return;
    };
    let port = f.port.to_string();
    // Mass insertion: 20,000 SETs as one stream.
    let mut input = Vec::new();
    for i in 0..20_000 {
        let (k, v) = (format!("key:{i}"), format!("value:{i}"));
        input.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .as_bytes(),
        );
    }
    let (ok, out, err) = run("redis-cli", &["-p", &port, "--pipe"], Some(input)).await;
    assert!(ok, "redis-cli --pipe: {out} {err}");
    assert!(out.contains("errors: 0, replies: 20000"), "{out}");
    let mut d = direct(&f.redis).await;
    for chunk in (0..20_000).collect::<Vec<_>>().chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("key:{i}")).collect();
        d.send(format!("MGET {}\r\n", keys.join(" ")).as_bytes())
            .await;
        d.expect(format!("*{}\r\n", chunk.len()).as_bytes()).await;
        for i in chunk {
            let v = format!("value:{i}");
            d.expect(format!("${}\r\n{v}\r\n", v.len()).as_bytes())
                .await;
        }
    }
    // The Unix socket.
    let (ok, out, err) = run(
        "redis-cli",
        &["-s", &socket.display().to_string(), "GET", "key:7"],
        None,
    )
    .await;
    assert!(ok && out.trim() == "value:7", "{out} {err}");
    // redis-benchmark: every default test, then pipelined.
    for pipeline in ["1", "16"] {
        let (ok, out, err) = run(
            "redis-benchmark",
            &[
                "-p", &port, "-c", "20", "-n", "2000", "-P", pipeline, "-q", "--csv",
            ],
            None,
        )
        .await;
        assert!(ok, "redis-benchmark -P {pipeline}: {out} {err}");
        assert!(
            !out.contains("ERR") && !err.contains("ERR"),
            "redis-benchmark -P {pipeline}: {out} {err}"
        );
        for test in [
            "PING_INLINE",
            "SET",
            "GET",
            "INCR",
            "LPUSH",
            "LRANGE_100",
            "MSET",
        ] {
            assert!(
                out.contains(&format!("\"{test}")),
                "redis-benchmark -P {pipeline} did not run {test}: {out} {err}"
            );
        }
    }
    // redis-rs, a plain connection and a multiplexed one.
    let url = format!("redis://127.0.0.1:{}/", f.port);
    let client = redis::Client::open(url.as_str()).unwrap();
    let plain = tokio::task::spawn_blocking(move || {
        let mut conn = client.get_connection().unwrap();
        redis::cmd("SET").arg("rs").arg(41).exec(&mut conn).unwrap();
        redis::cmd("INCR")
            .arg("rs")
            .query::<i64>(&mut conn)
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(plain, 42);
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/3", f.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            redis::cmd("INCRBY")
                .arg("multi")
                .arg(i)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total: i64 = redis::cmd("GET")
        .arg("multi")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(total, (0..50).sum::<i64>());
    // The multiplexed client's db 3 (from its URL's SELECT) held.
    d.call("SELECT 3", "+OK\r\n").await;
    d.call("GET multi", &format!("$4\r\n{total}\r\n")).await;
}

/// MULTI/EXEC from concurrent clients stays atomic and whole; WATCH sees a
/// conflicting write made by another client through the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_transactions_keep_their_connection() {
    let Some(f) = fixture(EngineKind::Bb8, 2, "", "").await else {
        return;
    };
    let mut a = Raw::connect(f.port).await;
    let mut b = Raw::connect(f.port).await;
    a.call("WATCH w", "+OK\r\n").await;
    a.call("GET w", "$-1\r\n").await;
    b.call("SET w theirs", "+OK\r\n").await;
    a.call("MULTI", "+OK\r\n").await;
    a.call("SET w mine", "+QUEUED\r\n").await;
    a.call("EXEC", "*-1\r\n").await;
    a.call("GET w", "$6\r\ntheirs\r\n").await;
    // Eight clients, fifty transactions each, on two connections: each
    // EXEC's two increments are consecutive.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let port = f.port;
        tasks.push(tokio::spawn(async move {
            let mut c = Raw::connect(port).await;
            for _ in 0..50 {
                c.call("MULTI", "+OK\r\n").await;
                c.call("INCR counter", "+QUEUED\r\n").await;
                c.call("INCR counter", "+QUEUED\r\n").await;
                c.send(b"EXEC\r\n").await;
                c.expect(b"*2\r\n").await;
                let first: i64 = c.line().await[1..].parse().unwrap();
                let second: i64 = c.line().await[1..].parse().unwrap();
                assert_eq!(second, first + 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    a.call("GET counter", "$3\r\n800\r\n").await;
    // A transaction left open by a client that leaves is discarded: the
    // next client on that connection is not inside it.
    let mut c = Raw::connect(f.port).await;
    c.call("MULTI", "+OK\r\n").await;
    c.call("SET abandoned 1", "+QUEUED\r\n").await;
    drop(c);
    for _ in 0..4 {
        b.call("GET abandoned", "$-1\r\n").await;
    }
    let stats = f.lessor.stats("up").await;
    assert_eq!(evictions(&stats), 0, "{stats:?}");
}

/// SUBSCRIBE keeps its client on its connection until it has unsubscribed
/// from everything (RESP2 arrays, RESP3 pushes); then the connection goes
/// back to the pool, out of pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_pubsub_in_resp2_and_resp3() {
    for resp in [2, 3] {
        let Some(f) = fixture(EngineKind::Bb8, 2, "", &format!(", resp: {resp}")).await else {
            return;
        };
        let mut sub = Raw::connect(f.port).await;
        let mut publisher = Raw::connect(f.port).await;
        let (arr, null) = if resp == 3 { (">", "_") } else { ("*", "$-1") };
        if resp == 3 {
            sub.send(b"HELLO 3\r\n").await;
            sub.expect(b"%7\r\n").await;
            for _ in 0..14 {
                let line = sub.line().await;
                if line.starts_with('$') {
                    sub.line().await;
                } else if line == "*0" {
                    // modules
                }
            }
        } else {
            sub.call("HELLO 3", "-NOPROTO unsupported protocol version\r\n")
                .await;
        }
        sub.send(b"SUBSCRIBE ch1 ch2\r\n").await;
        sub.expect(format!("{arr}3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n").as_bytes())
            .await;
        sub.expect(format!("{arr}3\r\n$9\r\nsubscribe\r\n$3\r\nch2\r\n:2\r\n").as_bytes())
            .await;
        publisher.call("PUBLISH ch1 hello", ":1\r\n").await;
        sub.expect(format!("{arr}3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n$5\r\nhello\r\n").as_bytes())
            .await;
        // Listed while pinned.
        let leases = http::fetch(&f.lessor.admin, "/debug/leases?format=json", None)
            .await
            .unwrap();
        assert!(leases.body.contains("redis-"), "{}", leases.body);
        // An argument-less UNSUBSCRIBE: one reply per channel.
        sub.send(b"UNSUBSCRIBE\r\n").await;
        for _ in 0..2 {
            let head = sub.line().await;
            assert_eq!(head, format!("{arr}3"));
            assert_eq!(sub.line().await, "$11");
            assert_eq!(sub.line().await, "unsubscribe");
            sub.line().await;
            sub.line().await;
            sub.line().await;
        }
        // Out of pub/sub: a plain reply, and the connection went back.
        sub.call("PING", "+PONG\r\n").await;
        sub.call("GET nothing", &format!("{null}\r\n")).await;
        eventually("the subscriber's connection is back", || async {
            f.lessor.stats("up").await.leased == 0
        })
        .await;
        let stats = f.lessor.stats("up").await;
        assert_eq!(evictions(&stats), 0, "RESP{resp}: {stats:?}");
    }
}

/// A blocking pop holds its client's batch until another client pushes;
/// while it waits it is listed in `/debug/leases`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_blocking_pop_is_woken_by_another_client() {
    let Some(f) = fixture(EngineKind::Bb8, 2, "", "").await else {
        return;
    };
    let mut waiter = Raw::connect(f.port).await;
    let mut pusher = Raw::connect(f.port).await;
    waiter.call("CLIENT SETNAME waiter", "+OK\r\n").await;
    waiter.send(b"BLPOP queue 0\r\n").await;
    eventually("the blocked client is listed", || async {
        http::fetch(&f.lessor.admin, "/debug/leases?format=json", None)
            .await
            .is_ok_and(|l| l.body.contains("waiter@"))
    })
    .await;
    pusher.call("LPUSH queue job", ":1\r\n").await;
    waiter.expect(b"*2\r\n$5\r\nqueue\r\n$3\r\njob\r\n").await;
    waiter.call("PING", "+PONG\r\n").await;
    // A client that leaves while blocked loses nothing for the others: the
    // connection it held (its reply still owed) is closed, not reused.
    let mut gone = Raw::connect(f.port).await;
    gone.send(b"BLPOP other 0\r\n").await;
    eventually("the second waiter is listed", || async {
        http::fetch(&f.lessor.admin, "/debug/leases?format=json", None)
            .await
            .is_ok_and(|l| l.body.contains("redis-"))
    })
    .await;
    drop(gone);
    eventually("its connection is evicted", || async {
        evictions(&f.lessor.stats("up").await) >= 1
    })
    .await;
    pusher.call("LPUSH other x", ":1\r\n").await;
    pusher.call("LLEN other", ":1\r\n").await;
}

/// CLIENT REPLY, CLIENT TRACKING and MONITOR keep their client on its
/// connection until they end (the server's `CLIENT LIST` shows the state
/// only while it lasts); a MONITOR that never ends costs its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_reply_tracking_and_monitor_pin_until_they_end() {
    let Some(f) = fixture(EngineKind::Bb8, 2, "", "").await else {
        return;
    };
    let mut a = Raw::connect(f.port).await;
    let mut b = Raw::connect(f.port).await;
    let mut d = direct(&f.redis).await;
    // Replies off: nothing comes back until ON, and the SET ran.
    a.send(b"CLIENT REPLY OFF\r\nSET quiet 1\r\n").await;
    a.call("CLIENT REPLY ON", "+OK\r\n").await;
    a.call("GET quiet", "$1\r\n1\r\n").await;
    // Tracking: on one server connection while it lasts.
    a.call("CLIENT TRACKING on", "+OK\r\n").await;
    let tracking = |list: &str| list.lines().filter(|l| l.contains(" flags=t ")).count();
    let list = d.bulk("CLIENT LIST").await;
    assert_eq!(tracking(&list), 1, "{list}");
    b.call("SET other 1", "+OK\r\n").await;
    a.call("CLIENT TRACKING off", "+OK\r\n").await;
    let list = d.bulk("CLIENT LIST").await;
    assert_eq!(tracking(&list), 0, "{list}");
    for _ in 0..4 {
        let info = b.bulk("CLIENT INFO").await;
        assert!(info.contains(" flags=N "), "{info}");
    }
    // MONITOR: the client sees what another runs, then leaves; its
    // connection cannot be made clean and is closed.
    let mut m = Raw::connect(f.port).await;
    m.call("MONITOR", "+OK\r\n").await;
    b.call("SET watched 1", "+OK\r\n").await;
    let seen = m.line().await;
    assert!(seen.contains("\"SET\" \"watched\" \"1\""), "{seen}");
    drop(m);
    eventually("the MONITOR connection is closed", || async {
        evictions(&f.lessor.stats("up").await) >= 1
    })
    .await;
    b.call("GET watched", "$1\r\n1\r\n").await;
}

/// Client authentication, HELLO, and what a hostile client gets: Redis's
/// own errors, and a closed connection after a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_authenticates_and_refuses_as_redis_does() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client-password");
    std::fs::write(&file, "client-pw\n").unwrap();
    let Some(f) = fixture(
        EngineKind::Bb8,
        1,
        &format!(
            ", auth: password, username: app, password_file: \"{}\", max_clients: 3, startup_timeout: 3s",
            file.display()
        ),
        ", max_frame: 64KiB",
    )
    .await
    else {
        return;
    };
    let mut c = Raw::connect(f.port).await;
    c.call("GET k", "-NOAUTH Authentication required.\r\n")
        .await;
    c.call("HELLO 2", "-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n").await;
    c.call(
        &format!("AUTH {PASSWORD}"),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
    )
    .await;
    c.call("AUTH app client-pw", "+OK\r\n").await;
    c.call("HELLO 3", "-NOPROTO unsupported protocol version\r\n")
        .await;
    c.send(b"HELLO 2 SETNAME hello-name\r\n").await;
    c.expect(b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n")
        .await;
    c.buf.clear();
    c.call("PING", "+PONG\r\n").await;
    c.call("CLIENT GETNAME", "$10\r\nhello-name\r\n").await;
    // Nothing reaches the server before authentication.
    let mut d = Raw::connect(f.port).await;
    d.call("SET stolen 1", "-NOAUTH Authentication required.\r\n")
        .await;
    d.call("AUTH client-pw", "+OK\r\n").await;
    d.call("GET stolen", "$-1\r\n").await;
    // max_clients: the fourth is refused as Redis refuses it.
    let mut e = Raw::connect(f.port).await;
    e.send(b"PING\r\n").await;
    e.expect(b"-NOAUTH Authentication required.\r\n").await;
    let mut fourth = Raw::connect(f.port).await;
    fourth
        .expect(b"-ERR max number of clients reached\r\n")
        .await;
    assert!(fourth.closed().await);
    drop(e);
    // A frame over redis.max_frame, and malformed RESP: an error, then
    // closed; the commands before the error were answered.
    c.send(b"PING\r\n*2\r\n$3\r\nGET\r\n$100000\r\n").await;
    c.expect(
        b"+PONG\r\n-ERR bulk string of 100000 bytes exceeds redis.max_frame (65536 bytes)\r\n",
    )
    .await;
    assert!(c.closed().await);
    d.send(b"*1\r\n$x\r\n").await;
    d.expect(b"-ERR Protocol error: invalid bulk length\r\n")
        .await;
    assert!(d.closed().await);
    // The pooled connection is as good as before.
    let mut g = Raw::connect(f.port).await;
    g.call("AUTH client-pw", "+OK\r\n").await;
    g.call("SET ok 1", "+OK\r\n").await;
    // Before authentication a client may send little, and not for long.
    let mut h = Raw::connect(f.port).await;
    h.send(format!("*11\r\n{}", "$1\r\nx\r\n".repeat(11)).as_bytes())
        .await;
    h.expect(b"-ERR Protocol error: unauthenticated multibulk length\r\n")
        .await;
    assert!(h.closed().await);
    let mut h = Raw::connect(f.port).await;
    h.send(b"*2\r\n$3\r\nGET\r\n$50000\r\n").await;
    h.send(&vec![b'x'; 30_000]).await;
    h.expect(b"-ERR Protocol error: unauthenticated bulk length\r\n")
        .await;
    assert!(h.closed().await);
    let mut silent = Raw::connect(f.port).await;
    assert!(silent.closed().await, "closed after startup_timeout");
    let stats = f.lessor.stats("up").await;
    assert_eq!(evictions(&stats), 0, "{stats:?}");
}

/// What a hostile review found, on a pool of one connection: a client
/// that stops reading, or piles commands behind a blocked one and leaves,
/// cannot keep the connection past `lease.idle_timeout`; RESET, AUTH and a
/// refused REDIRECT while pinned do not keep it either; a reply over
/// `redis.max_frame` still delivers the whole ones before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_hostile_clients_cannot_keep_the_connection() {
    let Some(f) = fixture_with(
        EngineKind::Bb8,
        1,
        "",
        ", max_frame: 64KiB",
        &["lease: { idle_timeout: 1s }"],
    )
    .await
    else {
        return;
    };
    let mut d = direct(&f.redis).await;
    let mut other = Raw::connect(f.port).await;
    // A reader that never reads 16 MiB of replies.
    let value = "v".repeat(16 * 1024);
    d.call(&format!("SET mid {value}"), "+OK\r\n").await;
    let mut slow = Raw::connect_narrow(f.port).await;
    slow.send("GET mid\r\n".repeat(1024).as_bytes()).await;
    eventually("the stalled reader is listed", || async {
        http::fetch(&f.lessor.admin, "/debug/leases?format=json", None)
            .await
            .is_ok_and(|l| l.body.contains("redis-"))
    })
    .await;
    other.call("PING", "+PONG\r\n").await;
    assert!(slow.closed().await, "the stalled reader is closed");
    // A blocked pop with 512 KiB piled behind it, then gone.
    let mut gone = Raw::connect(f.port).await;
    let mut pile = b"BLPOP nothing 0\r\n".to_vec();
    pile.extend("PING\r\n".repeat(90_000).as_bytes());
    gone.send(&pile).await;
    drop(gone);
    other.call("PING", "+PONG\r\n").await;
    // RESET inside MULTI: discarded, answered, and the client is free.
    let mut a = Raw::connect(f.port).await;
    a.send(b"MULTI\r\nSET r 1\r\nRESET\r\nGET r\r\n").await;
    a.expect(b"+OK\r\n+QUEUED\r\n+RESET\r\n$-1\r\n").await;
    other.call("PING", "+PONG\r\n").await;
    // AUTH and a refused REDIRECT while watching: answered in place.
    a.send(b"WATCH w\r\nAUTH whatever\r\nCLIENT TRACKING on REDIRECT 5\r\nUNWATCH\r\n")
        .await;
    a.expect(b"+OK\r\n+OK\r\n-ERR lessor: CLIENT TRACKING REDIRECT would name a pooled connection; use RESP3 tracking (redis.resp: 3) without REDIRECT\r\n+OK\r\n").await;
    other.call("PING", "+PONG\r\n").await;
    // A reply over max_frame: the whole replies first, then why.
    let huge = "h".repeat(100_000);
    d.send(format!("*3\r\n$3\r\nSET\r\n$4\r\nhuge\r\n$100000\r\n{huge}\r\n").as_bytes())
        .await;
    d.expect(b"+OK\r\n").await;
    let mut b = Raw::connect(f.port).await;
    b.send(b"STRLEN huge\r\nGET huge\r\n").await;
    b.expect(b":100000\r\n-ERR lessor: a reply of 100000 bytes exceeds redis.max_frame (65536 bytes); connection closed\r\n").await;
    assert!(b.closed().await);
    other.call("PING", "+PONG\r\n").await;
}

/// The drain: idle clients are closed at once; a pinned subscriber keeps
/// its connection through the grace, then is closed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_drain_closes_idle_clients_then_pinned_ones() {
    let Some(mut f) = fixture(EngineKind::Bb8, 2, "", "").await else {
        return;
    };
    let mut idle = Raw::connect(f.port).await;
    idle.call("PING", "+PONG\r\n").await;
    let mut sub = Raw::connect(f.port).await;
    sub.send(b"SUBSCRIBE news\r\n").await;
    sub.expect(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
        .await;
    f.lessor.begin_shutdown();
    assert!(idle.closed().await, "the idle client is closed");
    assert!(
        sub.closed().await,
        "the subscriber is closed at the grace's end"
    );
    tokio::time::timeout(PATIENCE + Duration::from_secs(30), f.lessor.stopped())
        .await
        .expect("lessor stops")
        .unwrap();
}

/// Connections the pool closed, for whatever reason.
fn evictions(stats: &lessor_client::pb::UpstreamStats) -> u64 {
    // `surplus`: the pool trimming itself to max_size, not a client's doing.
    stats
        .evictions
        .iter()
        .filter(|(reason, _)| *reason != "surplus")
        .map(|(_, n)| n)
        .sum()
}

/// A program's exit status, stdout and stderr, fed `input` on stdin.
async fn run(program: &str, args: &[&str], input: Option<Vec<u8>>) -> (bool, String, String) {
    use std::process::Stdio;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
        });
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
