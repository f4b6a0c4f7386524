//! The PostgreSQL session tracker held to a real PostgreSQL 15: generated
//! frontend sequences (simple and extended queries, Sync and Flush in
//! every position, COPY in and out with errors mid-copy, CopyFail, a
//! function call, pipelined batches, errors inside transactions) go to the
//! server on a raw connection, split at random points the way a lease's
//! Data messages split them, and whatever the server has answered is fed
//! to the tracker between the pieces. Once the server has answered
//! everything (a sentinel query behind the sequence says so), the
//! ReadyForQuery count and transaction status the tracker holds must be
//! what the server sent, and it must know it is settled.
//!
//! The one case the tracker may give up on, and then evicts, is a COPY
//! that failed with a Sync inside its data: where the error struck decides
//! whether that Sync is answered, and nothing outside the server shows it.
//! `LESSOR_PG_DIFF_SEED` replays a run's sequences.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use bytes::{BufMut, BytesMut};
use lessor::testing::PgTracker;
use postgres_protocol::message::frontend;

use crate::support::PATIENCE;
use crate::support::postgres::Postgres;

/// Sequences per run (each with a sentinel and a reset behind it).
const SEQUENCES: usize = 400;

/// One generated frontend sequence.
#[derive(Debug, Default)]
struct Sequence {
    /// The messages, each whole.
    messages: Vec<Vec<u8>>,
    /// Short names, for a failure's message.
    names: Vec<String>,
    /// A Sync was put inside COPY data.
    sync_in_copy: bool,
}

impl Sequence {
    fn push(&mut self, name: impl Into<String>, message: BytesMut) {
        self.names.push(name.into());
        self.messages.push(message.to_vec());
    }

    fn raw(&mut self, name: &str, tag: u8, body: &[u8]) {
        let mut m = BytesMut::new();
        m.put_u8(tag);
        m.put_i32(4 + body.len() as i32);
        m.put_slice(body);
        self.push(name, m);
    }

    fn query(&mut self, sql: &str) {
        let mut m = BytesMut::new();
        frontend::query(sql, &mut m).unwrap();
        self.push(format!("Q({sql})"), m);
    }

    fn parse(&mut self, name: &str, sql: &str) {
        let mut m = BytesMut::new();
        frontend::parse(name, sql, None, &mut m).unwrap();
        self.push(format!("P({name}:{sql})"), m);
    }

    fn bind(&mut self, portal: &str, statement: &str) {
        let mut body = BytesMut::new();
        body.put_slice(portal.as_bytes());
        body.put_u8(0);
        body.put_slice(statement.as_bytes());
        body.put_slice(&[0, 0, 0, 0, 0, 0, 0]); // no formats, parameters, result formats
        self.raw(&format!("B({portal}:{statement})"), b'B', &body);
    }

    fn execute(&mut self, portal: &str, max_rows: i32) {
        let mut body = BytesMut::new();
        body.put_slice(portal.as_bytes());
        body.put_u8(0);
        body.put_i32(max_rows);
        self.raw(&format!("E({portal}:{max_rows})"), b'E', &body);
    }

    fn close(&mut self, kind: u8, name: &str) {
        let mut body = BytesMut::new();
        body.put_u8(kind);
        body.put_slice(name.as_bytes());
        body.put_u8(0);
        self.raw(&format!("C({}:{name})", char::from(kind)), b'C', &body);
    }

    fn sync(&mut self) {
        self.raw("S", b'S', b"");
    }

    fn flush(&mut self) {
        self.raw("H", b'H', b"");
    }

    fn end(&self) -> Vec<u8> {
        self.messages.concat()
    }
}

const SIMPLE: &[&str] = &[
    "SELECT 1",
    "SELECT 1/0",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SELECT 1; SELECT 2",
    "INSERT INTO d VALUES (1)",
    "SAVEPOINT s",
    "SELECT n FROM d LIMIT 2",
    "BEGIN; SELECT 1/0",
    "SET TimeZone = 'UTC'",
    "SET standard_conforming_strings = off",
    "COPY (SELECT g FROM generate_series(1, 3) g) TO STDOUT",
    "COPY (SELECT 1 / (g - 2) FROM generate_series(1, 4) g) TO STDOUT",
];

const EXTENDED: &[&str] = &[
    "SELECT 1",
    "SELECT 1/0",
    "SELECT g FROM generate_series(1, 3) g",
    "BEGIN",
    "COMMIT",
    "INSERT INTO d VALUES (2)",
    "SELEC 1",
    "COPY (SELECT g FROM generate_series(1, 2) g) TO STDOUT",
];

const COPY_DATA: &[&[u8]] = &[b"1\n", b"2\n3\n", b"x\n", b"4", b"5\n", b"\n"];

struct Generator {
    rng: fastrand::Rng,
}

impl Generator {
    /// Sometimes a Sync or a Flush, anywhere.
    fn sprinkle(&mut self, seq: &mut Sequence, in_copy: bool) {
        match self.rng.u8(0..10) {
            0 => {
                seq.sync();
                seq.sync_in_copy |= in_copy;
            }
            1 => seq.flush(),
            _ => {}
        }
    }

    /// COPY data (rows, bad rows, lines split across messages), then
    /// CopyDone or CopyFail, Syncs and Flushes anywhere.
    fn copy_stream(&mut self, seq: &mut Sequence) {
        for _ in 0..self.rng.usize(0..4) {
            self.sprinkle(seq, true);
            let data = COPY_DATA[self.rng.usize(..COPY_DATA.len())];
            seq.raw(
                &format!("d({})", String::from_utf8_lossy(data).trim()),
                b'd',
                data,
            );
        }
        self.sprinkle(seq, true);
        if self.rng.u8(0..5) == 0 {
            seq.raw("f", b'f', b"boom\0");
        } else {
            seq.raw("c", b'c', b"");
        }
    }

    fn sequence(&mut self) -> Sequence {
        let mut seq = Sequence::default();
        for _ in 0..self.rng.usize(1..8) {
            self.sprinkle(&mut seq, false);
            match self.rng.u8(0..10) {
                0..=2 => seq.query(SIMPLE[self.rng.usize(..SIMPLE.len())]),
                3 => {
                    let sql = if self.rng.bool() {
                        "COPY d FROM STDIN"
                    } else {
                        "COPY d FROM STDIN; SELECT 1"
                    };
                    seq.query(sql);
                    self.copy_stream(&mut seq);
                }
                4..=6 => {
                    let sql = EXTENDED[self.rng.usize(..EXTENDED.len())];
                    let named = self.rng.u8(0..4) == 0;
                    let name = if named { "s1" } else { "" };
                    seq.parse(name, sql);
                    self.sprinkle(&mut seq, false);
                    if self.rng.u8(0..3) == 0 {
                        let mut body = BytesMut::new();
                        body.put_u8(b'S');
                        body.put_slice(name.as_bytes());
                        body.put_u8(0);
                        seq.raw("D(S)", b'D', &body);
                    }
                    // Sometimes a statement that does not exist.
                    let bound = if self.rng.u8(0..8) == 0 { "nope" } else { name };
                    seq.bind("", bound);
                    self.sprinkle(&mut seq, false);
                    seq.execute("", if self.rng.u8(0..4) == 0 { 1 } else { 0 });
                    if named {
                        seq.close(b'S', "s1");
                    }
                }
                7 => {
                    // COPY FROM STDIN through the extended protocol, the
                    // way libpq's PQexecParams sends it: a Sync at once.
                    // Named, so no other Execute can start it (and find
                    // no COPY data behind it).
                    seq.parse("cp", "COPY d FROM STDIN");
                    seq.bind("cp", "cp");
                    seq.execute("cp", 0);
                    if self.rng.bool() {
                        seq.sync();
                        seq.sync_in_copy = true;
                    }
                    self.copy_stream(&mut seq);
                    seq.close(b'P', "cp");
                    seq.close(b'S', "cp");
                }
                8 => {
                    // FunctionCall: pg_backend_pid(), no arguments.
                    let mut body = BytesMut::new();
                    body.put_i32(2026);
                    body.put_slice(&[0, 0, 0, 0, 0, 0]);
                    seq.raw("F", b'F', &body);
                }
                _ => seq.sync(),
            }
        }
        seq.sync();
        seq
    }

    /// `data` cut at random points: a lease's Data messages.
    fn split<'a>(&mut self, data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = (0..self.rng.usize(0..6))
            .map(|_| self.rng.usize(0..=data.len()))
            .collect();
        cuts.push(0);
        cuts.push(data.len());
        cuts.sort_unstable();
        cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect()
    }
}

/// Backend messages in `data`: (tag, body), whole ones only.
fn messages(data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest.len() < 1 + len {
            break;
        }
        out.push((rest[0], &rest[5..1 + len]));
        rest = &rest[1 + len..];
    }
    out
}

/// Backend messages, one letter each, with errors' text.
fn describe(data: &[u8]) -> String {
    messages(data)
        .iter()
        .map(|(t, b)| match t {
            b'E' => format!("E[{}]", String::from_utf8_lossy(b).replace('\0', " ")),
            _ => char::from(*t).to_string(),
        })
        .collect()
}

/// A raw session as `trustuser`, through its first ReadyForQuery.
fn connect(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut startup = BytesMut::new();
    frontend::startup_message([("user", "trustuser"), ("database", "app")], &mut startup).unwrap();
    stream.write_all(&startup).unwrap();
    read_until(
        &mut stream,
        &mut Vec::new(),
        |m| m.last().is_some_and(|(t, _)| *t == b'Z'),
        &|| "startup".into(),
    );
    stream
}

/// Reads into `buf` until `done` says the messages so far are enough.
fn read_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[(u8, &[u8])]) -> bool,
    context: &dyn Fn() -> String,
) {
    let mut chunk = [0u8; 8192];
    while !done(&messages(buf)) {
        let n = stream
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("the server answers in time ({e}): {}", context()));
        assert!(
            n > 0,
            "the server closed the connection: {}\n{:?}",
            context(),
            messages(buf)
                .iter()
                .map(|(t, b)| format!(
                    "{}{}",
                    char::from(*t),
                    if *t == b'E' {
                        String::from_utf8_lossy(b).into_owned()
                    } else {
                        String::new()
                    }
                ))
                .collect::<Vec<_>>()
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whatever the server has sent by now, without waiting.
fn read_ready(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    stream.set_nonblocking(false).unwrap();
    out
}

fn run(addr: &str, seed: u64) -> (usize, usize) {
    let mut generator = Generator {
        rng: fastrand::Rng::with_seed(seed),
    };
    let mut stream = connect(addr);
    let (mut lost, mut copies) = (0, 0);
    for i in 0..SEQUENCES {
        let seq = generator.sequence();
        let context = || format!("seed {seed}, sequence {i}: {}", seq.names.join(" "));
        let mut tracker = PgTracker::new();
        let mut backend = Vec::new();
        let bytes = seq.end();
        for piece in generator.split(&bytes) {
            let forward = tracker
                .client_sent(piece)
                .unwrap_or_else(|e| panic!("{e}: {}", context()));
            assert_eq!(forward, piece, "{}", context());
            if let Err(e) = stream.write_all(piece) {
                let mut rest = backend.clone();
                rest.extend(read_ready(&mut stream));
                panic!("write: {e}: {}\n{}", context(), describe(&rest));
            }
            let arrived = read_ready(&mut stream);
            for part in generator.split(&arrived) {
                tracker
                    .upstream_sent(part)
                    .unwrap_or_else(|e| panic!("{e}: {}", context()));
            }
            backend.extend_from_slice(&arrived);
        }
        // A sentinel behind it, answered whatever state the sequence left:
        // its row marks the end of the sequence's answers, which end with
        // the ReadyForQuery of the sequence's last Sync.
        let mut sentinel = BytesMut::new();
        frontend::query("ROLLBACK; SELECT 'lessor-sentinel'", &mut sentinel).unwrap();
        stream.write_all(&sentinel).unwrap();
        let fed = backend.len();
        let marked = |m: &[(u8, &[u8])]| {
            m.iter()
                .position(|(t, b)| *t == b'D' && b.ends_with(b"lessor-sentinel"))
        };
        read_until(
            &mut stream,
            &mut backend,
            |m| marked(m).is_some_and(|d| m[d..].iter().any(|(t, _)| *t == b'Z')),
            &context,
        );
        let all = messages(&backend);
        let row = marked(&all).unwrap();
        let end = all[..row].iter().rposition(|(t, _)| *t == b'Z').unwrap() + 1;
        let answered: usize = all[..end].iter().map(|(_, body)| 5 + body.len()).sum();
        assert!(
            fed <= answered,
            "the sentinel answered before the sequence: {}\n{}",
            context(),
            describe(&backend)
        );
        for part in generator.split(&backend[fed..answered]) {
            tracker
                .upstream_sent(part)
                .unwrap_or_else(|e| panic!("{e}: {}", context()));
        }
        let sent: Vec<u8> = all[..end]
            .iter()
            .filter(|(t, _)| *t == b'Z')
            .map(|(_, body)| body[0])
            .collect();
        let report = tracker.report();
        let failed = all[..end].iter().any(|(t, _)| *t == b'E');
        copies += usize::from(all[..end].iter().any(|(t, _)| *t == b'G'));
        if let Some(why) = &report.lost {
            assert!(
                seq.sync_in_copy && failed,
                "the tracker lost track ({why}) where the server was plain: {}\n{report:?}",
                context()
            );
            lost += 1;
        } else {
            assert_eq!(
                report.ready_for_query,
                sent.len() as u64,
                "ReadyForQuery count: {}\n{report:?}",
                context()
            );
            assert_eq!(
                report.status,
                *sent.last().unwrap_or(&b'I'),
                "transaction status: {}\n{report:?}",
                context()
            );
            assert!(report.settled, "not settled: {}\n{report:?}", context());
            assert_eq!(report.verdict, Ok(()), "{}", context());
        }
        // Back to a plain session for the next sequence (not tracked).
        let mut reset = BytesMut::new();
        frontend::query("ROLLBACK", &mut reset).unwrap();
        frontend::query("DISCARD ALL", &mut reset).unwrap();
        stream.write_all(&reset).unwrap();
        let mut buf = Vec::new();
        read_until(
            &mut stream,
            &mut buf,
            |m| m.iter().filter(|(t, _)| *t == b'Z').count() == 2,
            &context,
        );
    }
    (lost, copies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_diff_tracker_counts_ready_for_query_as_postgres_sends_them() {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    pg.admin()
        .await
        .batch_execute("CREATE TABLE d (n int); GRANT ALL ON d TO PUBLIC")
        .await
        .unwrap();
    let seed = std::env::var("LESSOR_PG_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        // A fixed default keeps CI's run repeatable; set the variable to
        // explore other seeds (seed 84046604957009883 is open: PostgreSQL
        // closes the connection in its sequence 369, unexplained yet).
        .unwrap_or(1);
    let addr = pg.addr();
    let (lost, copies) = tokio::task::spawn_blocking(move || run(&addr, seed))
        .await
        .unwrap();
    // The sequences must reach COPY often, and the tracker give up rarely.
    assert!(
        copies >= SEQUENCES / 10,
        "seed {seed}: only {copies} COPY sequences"
    );
    assert!(
        lost <= SEQUENCES / 4,
        "seed {seed}: lost track {lost} times"
    );
}

/// libpq's `PQexecParams` with `COPY ... FROM STDIN`, as the review found
/// it: Parse/Bind/Describe/Execute/Sync, the data, CopyDone, a second
/// Sync; PostgreSQL answers one ReadyForQuery, and the tracker expects one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_diff_libpq_copy_with_two_syncs_owes_one_ready_for_query() {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    pg.admin()
        .await
        .batch_execute("CREATE TABLE d (n int); GRANT ALL ON d TO PUBLIC")
        .await
        .unwrap();
    let addr = pg.addr();
    tokio::task::spawn_blocking(move || {
        let mut stream = connect(&addr);
        let mut seq = Sequence::default();
        seq.parse("", "COPY d FROM STDIN");
        seq.bind("", "");
        seq.raw("D(P)", b'D', b"P\0");
        seq.execute("", 0);
        seq.sync();
        let mut tracker = PgTracker::new();
        let first = seq.end();
        tracker.client_sent(&first).unwrap();
        stream.write_all(&first).unwrap();
        let mut backend = Vec::new();
        read_until(
            &mut stream,
            &mut backend,
            |m| m.iter().any(|(t, _)| *t == b'G'),
            &String::new,
        );
        tracker.upstream_sent(&backend).unwrap();
        let mut rest = Sequence::default();
        rest.raw("d", b'd', b"7\n8\n");
        rest.raw("c", b'c', b"");
        rest.sync();
        let rest = rest.end();
        tracker.client_sent(&rest).unwrap();
        stream.write_all(&rest).unwrap();
        let fed = backend.len();
        read_until(
            &mut stream,
            &mut backend,
            |m| m.iter().any(|(t, _)| *t == b'Z'),
            &String::new,
        );
        tracker.upstream_sent(&backend[fed..]).unwrap();
        let report = tracker.report();
        assert_eq!(report.ready_for_query, 1, "{report:?}");
        assert!(report.settled, "{report:?}");
        assert_eq!(report.verdict, Ok(()));
    })
    .await
    .unwrap();
}
