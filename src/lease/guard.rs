//! The RAII guard that makes "every lease finishes its checkout exactly once"
//! hold by construction: [`LeaseGuard::finish`] consumes the guard, and a guard
//! dropped unfinished (client gone, task cancelled, panic) finishes as an abort.

use crate::protocol::Restore;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::state::{self, Direction, End, Fate, Outcome};
use crate::config::OnAbort;
use crate::pool::{Conn, Leased, health};
use lessor_client::pb::Disposition;

/// A live lease's connection and the traffic facts its end depends on.
pub(crate) struct LeaseGuard {
    /// `Some` until the lease finishes; taken exactly once.
    leased: Option<Leased>,
    last: Option<Direction>,
    on_abort: OnAbort,
    started: Instant,
    bytes_to_upstream: u64,
    bytes_to_client: u64,
    /// A protocol upstream's verdict on the session (`None` for `tcp`): it
    /// stands in for the direction of the last bytes.
    verdict: Option<Result<(), String>>,
    /// What puts a changed but clean session back before the connection
    /// returns.
    restore: Option<Restore>,
}

/// What a finished lease did, for logs and (later) spans and metrics.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    /// The decision taken.
    pub outcome: Outcome,
    /// Bytes written to the upstream.
    pub bytes_to_upstream: u64,
    /// Bytes delivered toward the client.
    pub bytes_to_client: u64,
    /// Why a tracked session was not clean, for `Ended.detail`.
    pub unclean: Option<String>,
}

impl LeaseGuard {
    /// Takes charge of a checked-out connection.
    pub(crate) fn new(leased: Leased, on_abort: OnAbort) -> Self {
        Self {
            leased: Some(leased),
            last: None,
            on_abort,
            started: Instant::now(),
            bytes_to_upstream: 0,
            bytes_to_client: 0,
            verdict: None,
            restore: None,
        }
    }

    /// Asks for the session to be restored before its connection returns.
    pub(crate) fn set_restore(&mut self, restore: Restore) {
        self.restore = Some(restore);
    }

    /// Records whether a protocol session is clean now: what decides a lease
    /// that ends without [`LeaseGuard::set_verdict`] (its stream dropped).
    pub(crate) fn set_clean(&mut self, clean: bool) {
        self.verdict = Some(if clean { Ok(()) } else { Err(String::new()) });
    }

    /// Records a protocol session's verdict (clean, or why not) for the
    /// end decision.
    pub(crate) fn set_verdict(&mut self, verdict: Result<(), String>) {
        self.verdict = Some(verdict);
    }

    /// The checked-out connection.
    pub(crate) fn leased(&self) -> &Leased {
        self.leased
            .as_ref()
            .expect("a guard holds its lease until finished")
    }

    /// The socket, for the byte pump.
    pub(crate) fn conn_mut(&mut self) -> &mut Conn {
        self.leased
            .as_mut()
            .expect("a guard holds its lease until finished")
            .conn_mut()
    }

    /// Records bytes that went one way.
    pub(crate) fn record(&mut self, direction: Direction, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.last = Some(direction);
        let n = bytes as u64;
        let Some(leased) = &self.leased else {
            return;
        };
        let counters = leased.pool().counters();
        match direction {
            Direction::ToUpstream => {
                self.bytes_to_upstream += n;
                counters.bytes_to_upstream.fetch_add(n, Ordering::Relaxed);
            }
            Direction::ToClient => {
                self.bytes_to_client += n;
                counters.bytes_to_client.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Ends the lease: decides, then returns or evicts the connection.
    pub(crate) fn finish(mut self, end: End) -> Finished {
        self.finish_once(end)
            .expect("finish consumes the guard, so it runs once")
    }

    fn finish_once(&mut self, end: End) -> Option<Finished> {
        let mut leased = self.leased.take()?;
        let socket = health::peek(&mut leased.conn_mut().stream);
        // A tracked session's verdict replaces the direction heuristic: clean
        // reads as "the last bytes were a reply", unclean as "a request".
        let last = match &self.verdict {
            None => self.last,
            Some(Ok(())) => Some(Direction::ToClient),
            Some(Err(_)) => Some(Direction::ToUpstream),
        };
        let mut outcome = state::conclude(end, last, socket, self.on_abort);
        if let (Fate::Return, Some(reason)) = (&outcome.fate, leased.conn().retirement()) {
            // Its endpoint retired during the lease (gone, of the wrong
            // role, or the server refused a write as read-only): closed,
            // not restored, and Ended says so.
            self.restore = None;
            outcome.fate = Fate::Evict(reason);
            if let Some((disposition, _)) = outcome.ended.as_mut() {
                *disposition = Disposition::Evict;
            }
        }
        let counters = leased.pool().counters();
        let held = self.started.elapsed();
        match outcome.fate {
            Fate::Return if self.restore.is_some() => {
                counters.lease_returned.observe(held);
                if let Some(restore) = self.restore.take() {
                    leased.restore_then_return(restore);
                }
            }
            Fate::Return => {
                counters.lease_returned.observe(held);
                if let Some(reason) = leased.give_back() {
                    // Its endpoint retired during the lease (gone, or of
                    // the wrong role): it was closed, and Ended must say so.
                    outcome.fate = Fate::Evict(reason);
                    if let Some((disposition, _)) = outcome.ended.as_mut() {
                        *disposition = Disposition::Evict;
                    }
                }
            }
            Fate::Evict(reason) => {
                counters.lease_evicted.observe(held);
                leased.evict(reason);
            }
        }
        Some(Finished {
            outcome,
            bytes_to_upstream: self.bytes_to_upstream,
            bytes_to_client: self.bytes_to_client,
            unclean: self.verdict.take().and_then(Result::err),
        })
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(done) = self.finish_once(End::Abort) {
            tracing::debug!(fate = ?done.outcome.fate, "lease aborted");
        }
    }
}
