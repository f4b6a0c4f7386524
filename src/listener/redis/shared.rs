//! Plain batches of many clients, pipelined on one pooled connection.
//!
//! Most of what clients send through the listener are short batches of
//! commands that change nothing on the connection, never block and get one
//! reply each (`GET`, `SET`, `INCR`, `LPUSH`...). Holding a pooled
//! connection per such batch costs a checkout and a round trip of its own
//! for every batch; a proxy that pipelines the batches of all its clients on
//! one connection (twemproxy) pays one server write and read for many. This
//! module does that for exactly those batches: a lane holds one pooled
//! connection (a lease of the pool like any other), writes the batches it is
//! given in the order they came, counts the replies as Redis frames them,
//! and hands each batch its replies whole. Everything else (state, blocking,
//! subscriptions, anything not on the list) keeps the per-batch hold of
//! `client.rs`, so a connection a lane uses never carries state.
//!
//! Bounds: a lane queues at most [`QUEUE`] batches (a client whose batch
//! finds it full holds a connection of its own instead), each at most
//! [`MAX_COMMANDS`] commands and [`MAX_BYTES`] bytes; a batch's replies are
//! held until its client has taken them, and each client has one batch on a
//! lane at a time. A lane gives its connection back once nothing is queued
//! or in flight, and at least every [`HOLD_FOR`], so the pool's lifetime,
//! health and role rules still reach it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::Listener;
use crate::lease::guard::LeaseGuard;
use crate::lease::state::{Direction, End};
use crate::listener::{NoConnection, checkout};
use crate::protocol::redis::resp::{RespError, Scanner};
use crate::telemetry::TARGET;
use lessor_client::pb::Disposition;

/// Batches waiting for or on a lane.
pub(super) const QUEUE: usize = 256;
/// The most commands a batch on a lane may have.
pub(super) const MAX_COMMANDS: usize = 16;
/// The most bytes a batch on a lane may have.
pub(super) const MAX_BYTES: usize = 64 * 1024;
/// A lane gives its connection back at least this often.
const HOLD_FOR: Duration = Duration::from_secs(1);
/// How long an idle lane keeps its connection for the next batch.
const LINGER: Duration = Duration::from_millis(2);
/// The first read buffer of a lane.
const READ_SIZE: usize = 16 * 1024;

/// Commands a lane may carry: they change nothing on the connection, never
/// block, and get exactly one reply in RESP2 and RESP3. Commands whose one
/// reply is a collection (`LRANGE`, `HGETALL`...) are left out: their
/// replies can be large, and a batch's replies are held whole.
pub(super) fn shareable(name: &str) -> bool {
    matches!(
        name,
        "GET"
            | "SET"
            | "SETNX"
            | "SETEX"
            | "PSETEX"
            | "GETSET"
            | "GETDEL"
            | "GETEX"
            | "MSET"
            | "APPEND"
            | "STRLEN"
            | "INCR"
            | "DECR"
            | "INCRBY"
            | "DECRBY"
            | "INCRBYFLOAT"
            | "EXISTS"
            | "DEL"
            | "UNLINK"
            | "TYPE"
            | "EXPIRE"
            | "PEXPIRE"
            | "EXPIREAT"
            | "TTL"
            | "PTTL"
            | "PERSIST"
            | "LPUSH"
            | "RPUSH"
            | "LPUSHX"
            | "RPUSHX"
            | "LLEN"
            | "LINDEX"
            | "SADD"
            | "SREM"
            | "SCARD"
            | "SISMEMBER"
            | "HSET"
            | "HSETNX"
            | "HGET"
            | "HDEL"
            | "HLEN"
            | "HEXISTS"
            | "HINCRBY"
            | "ZADD"
            | "ZREM"
            | "ZCARD"
            | "ZSCORE"
            | "ZINCRBY"
            | "PFADD"
            | "PING"
            | "ECHO"
    )
}

/// One client's batch for a lane.
pub(super) struct Job {
    /// The commands, as the client sent them (whole commands only).
    pub(super) bytes: Bytes,
    /// How many replies they get (one per command).
    pub(super) replies: usize,
    /// Where the replies go, whole and in order.
    pub(super) done: oneshot::Sender<Answer>,
}

/// A batch's replies, and whether its client is to be closed after them
/// (the server sent it what lessor cannot relay).
pub(super) struct Answer {
    pub(super) replies: Bytes,
    pub(super) close: bool,
}

impl Answer {
    fn open(replies: Bytes) -> Self {
        Self {
            replies,
            close: false,
        }
    }
}

/// The listener's lane, when one runs.
#[derive(Default)]
pub(super) struct Lanes {
    lane: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Lanes {
    /// Queues `job` on the running lane, or starts one. Gives the job back
    /// when the lane's queue is full: its client holds a connection of its
    /// own instead.
    pub(super) fn submit(&self, listener: &Arc<Listener>, job: Job) -> Result<(), Job> {
        use mpsc::error::TrySendError;
        let mut lane = self.lane.lock().unwrap_or_else(|e| e.into_inner());
        let mut job = job;
        if let Some(tx) = lane.as_ref() {
            match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(j)) => return Err(j),
                // The lane ended: a new one starts with this job.
                Err(TrySendError::Closed(j)) => job = j,
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        if let Err(TrySendError::Full(j) | TrySendError::Closed(j)) = tx.try_send(job) {
            return Err(j);
        }
        *lane = Some(tx);
        listener.shared.tracker.spawn(run(listener.clone(), rx));
        Ok(())
    }
}

/// A batch on the lane's connection, and the replies it still waits for.
struct InFlight {
    left: usize,
    replies: BytesMut,
    /// How much of `replies` is whole frames (the rest is the start of
    /// one not yet read whole).
    whole: usize,
    done: oneshot::Sender<Answer>,
}

/// A lane: one hold after another while batches come; it ends (and its
/// queue closes, so the next batch starts a new lane) once a hold ends with
/// nothing queued.
async fn run(listener: Arc<Listener>, mut rx: mpsc::Receiver<Job>) {
    loop {
        let first = match rx.try_recv() {
            Ok(job) => job,
            Err(_) => {
                rx.close();
                match rx.recv().await {
                    Some(job) => job,
                    None => return,
                }
            }
        };
        serve(&listener, &mut rx, first).await;
    }
}

/// Answers `first` and every batch queued now with the same error: no
/// connection could be had for them.
fn refuse(first: Job, rx: &mut mpsc::Receiver<Job>, why: &str) {
    let line = format!("-ERR lessor: {}\r\n", why.replace(['\r', '\n'], " "));
    let answer = |job: Job| {
        let _ = job
            .done
            .send(Answer::open(Bytes::from(line.repeat(job.replies))));
    };
    answer(first);
    while let Ok(job) = rx.try_recv() {
        answer(job);
    }
}

/// What a lane's wait saw.
enum Event {
    Revoked,
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Job(Option<Job>),
}

/// One hold of the lane: checks out, writes batches as they come, hands
/// each its replies, and gives the connection back when idle, after
/// [`HOLD_FOR`], or (evicted) when the server fails.
async fn serve(listener: &Arc<Listener>, rx: &mut mpsc::Receiver<Job>, first: Job) {
    let Some(pool) = listener.shared.pools.get(&listener.upstream) else {
        refuse(first, rx, "the upstream is no longer configured");
        return;
    };
    let config = pool.config();
    let span = tracing::info_span!(
        target: TARGET,
        "shared pipeline",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        db.system = "redis",
        lessor.upstream = %listener.upstream,
        lessor.batches = tracing::field::Empty,
        lessor.connection.id = tracing::field::Empty,
    );
    let revoke = listener.shared.revoke.clone();
    let mut guard = match checkout(&pool, &listener.upstream, &revoke, &span).await {
        Ok(guard) => guard,
        // The grace is over: the clients waiting are closed.
        Err(NoConnection::Revoked) => return,
        Err(NoConnection::Refused(why)) => {
            refuse(first, rx, &why);
            return;
        }
    };
    let mut lane = Lane {
        scanner: Scanner::new(config.redis.max_frame.as_u64()),
        out: BytesMut::new(),
        input: BytesMut::with_capacity(READ_SIZE),
        inflight: VecDeque::new(),
        frames: Vec::new(),
        batches: 0,
    };
    lane.add(first);
    let started = tokio::time::Instant::now();
    let mut taking = true;
    let mut gathered = false;
    // The error of the batch whose reply broke the connection.
    let mut broken: Option<String> = None;
    let end = async {
        loop {
            while taking && lane.inflight.len() < QUEUE {
                match rx.try_recv() {
                    Ok(job) => lane.add(job),
                    Err(_) => break,
                }
            }
            if !lane.out.is_empty() && !gathered {
                // Other clients' batches are usually ready too (their
                // tasks run once this one yields): one write carries them
                // all, which is the point of sharing.
                gathered = true;
                tokio::task::yield_now().await;
                continue;
            }
            gathered = false;
            // Written at once where the socket takes it.
            if !lane.out.is_empty()
                && let Some(w) = guard.conn_mut().stream.write(&lane.out).now_or_never()
            {
                match w {
                    Ok(n) => lane.wrote(&mut guard, n),
                    Err(_) => return End::UpstreamError,
                }
            }
            if lane.inflight.is_empty() {
                if !taking {
                    return End::Release(Disposition::Return);
                }
                // Idle: the next batch is usually a moment away (the
                // clients just answered are writing their next one).
                match tokio::time::timeout(LINGER, rx.recv()).await {
                    Ok(Some(job)) => {
                        lane.add(job);
                        continue;
                    }
                    _ => return End::Release(Disposition::Return),
                }
            }
            if taking && started.elapsed() >= HOLD_FOR {
                // What is queued waits for the next hold.
                taking = false;
            }
            if lane.input.capacity() - lane.input.len() < 1024 {
                lane.input.reserve(READ_SIZE);
            }
            let event = {
                let (mut srd, mut swr) = guard.conn_mut().stream.split();
                tokio::select! {
                    biased;
                    () = revoke.cancelled() => Event::Revoked,
                    r = srd.read_buf(&mut lane.input) => Event::Read(r),
                    w = swr.write(&lane.out), if !lane.out.is_empty() => Event::Wrote(w),
                    job = rx.recv(), if taking && lane.inflight.len() < QUEUE => Event::Job(job),
                }
            };
            match event {
                Event::Revoked => return End::Shutdown,
                Event::Read(Ok(0) | Err(_)) => return End::UpstreamClosed,
                Event::Read(Ok(n)) => {
                    guard.record(Direction::ToClient, n);
                    if let Err(e) = lane.deliver() {
                        tracing::debug!(upstream = %listener.upstream, "server sent what a shared pipeline cannot relay");
                        broken = Some(match e {
                            Broken::Resp(RespError::TooLarge { len, max }) => format!(
                                "-ERR lessor: a reply of {len} bytes exceeds redis.max_frame ({max} bytes); connection closed\r\n"
                            ),
                            _ => "-ERR lessor: the server broke the protocol\r\n".to_owned(),
                        });
                        return End::UpstreamError;
                    }
                }
                Event::Wrote(Ok(n)) => lane.wrote(&mut guard, n),
                Event::Wrote(Err(_)) => return End::UpstreamError,
                Event::Job(Some(job)) => lane.add(job),
                // Closed and drained: nothing more comes to this lane.
                Event::Job(None) => taking = false,
            }
        }
    }
    .instrument(span.clone())
    .await;
    span.record("lessor.batches", lane.batches);
    match end {
        End::Release(_) => guard.set_verdict(Ok(())),
        End::Shutdown => {}
        _ => {
            span.record("otel.status_code", "ERROR");
            let others: &[u8] = if matches!(end, End::UpstreamClosed) {
                b"-ERR lessor: the server closed the connection\r\n"
            } else {
                b"-ERR lessor: the server connection failed\r\n"
            };
            lane.fail(broken, others);
        }
    }
    guard.finish(end);
}

/// A hold's buffers.
struct Lane {
    scanner: Scanner,
    /// Batches not yet written.
    out: BytesMut,
    /// What Redis sent, not yet handed out.
    input: BytesMut,
    /// Every batch taken in this hold and not yet answered, in order.
    inflight: VecDeque<InFlight>,
    /// (end, type) of the frames of the last read (kept: no allocation per
    /// read).
    frames: Vec<(usize, u8)>,
    batches: u64,
}

impl Lane {
    fn add(&mut self, job: Job) {
        self.batches += 1;
        self.out.extend_from_slice(&job.bytes);
        self.inflight.push_back(InFlight {
            left: job.replies,
            replies: BytesMut::new(),
            whole: 0,
            done: job.done,
        });
    }

    fn wrote(&mut self, guard: &mut LeaseGuard, n: usize) {
        guard.record(Direction::ToUpstream, n);
        bytes::Buf::advance(&mut self.out, n);
    }

    /// Hands out the replies just read. An error when Redis sent what no
    /// batch asked for (a push, a reply too many) or what lessor cannot
    /// relay; the replies whole before it are handed out first.
    fn deliver(&mut self) -> Result<(), Broken> {
        let frames = &mut self.frames;
        frames.clear();
        let scanned = self
            .scanner
            .feed(&self.input, |f| frames.push((f.end, f.kind)));
        let mut taken = 0;
        for &(end, kind) in self.frames.iter() {
            let Some(front) = self.inflight.front_mut() else {
                return Err(Broken::Unasked);
            };
            if kind == b'>' {
                return Err(Broken::Unasked);
            }
            let piece = self.input.split_to(end - taken);
            taken = end;
            front.left -= 1;
            if front.left == 0 {
                let f = self.inflight.pop_front().expect("a front batch");
                let whole = if f.replies.is_empty() {
                    piece.freeze()
                } else {
                    let mut all = f.replies;
                    all.extend_from_slice(&piece);
                    all.freeze()
                };
                // A client gone meanwhile: its replies go nowhere.
                let _ = f.done.send(Answer::open(whole));
            } else {
                front.replies.extend_from_slice(&piece);
                front.whole = front.replies.len();
            }
        }
        if let Err(e) = scanned {
            return Err(Broken::Resp(e));
        }
        if !self.input.is_empty() {
            let Some(front) = self.inflight.front_mut() else {
                return Err(Broken::Unasked);
            };
            front.replies.extend_from_slice(&self.input);
            self.input.clear();
        }
        Ok(())
    }

    /// The hold failed: the batch whose reply broke gets `front` (and its
    /// client is closed), the others an error in place of each reply
    /// they still wait for, since whether Redis ran them is unknown.
    fn fail(&mut self, front: Option<String>, others: &[u8]) {
        let mut first = front;
        for mut f in self.inflight.drain(..) {
            // A reply cut short is dropped: the client gets whole frames.
            f.replies.truncate(f.whole);
            let close = match first.take() {
                Some(line) => {
                    f.replies.extend_from_slice(line.as_bytes());
                    true
                }
                None => {
                    for _ in 0..f.left {
                        f.replies.extend_from_slice(others);
                    }
                    false
                }
            };
            let _ = f.done.send(Answer {
                replies: f.replies.freeze(),
                close,
            });
        }
    }
}

/// What broke a lane's connection.
enum Broken {
    /// Bytes no batch asked for.
    Unasked,
    /// Not RESP, or a reply over `redis.max_frame`.
    Resp(RespError),
}
