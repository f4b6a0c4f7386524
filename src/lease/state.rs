//! The lease-end rules as a pure function: how a lease ended, what its byte
//! traffic looked like and what the socket shows decide the `Ended` message
//! and the connection's fate. The README's lease-end table, row by row.

use crate::config::OnAbort;
use crate::pool::EvictReason;
use crate::pool::health::Liveness;
use lessor_client::pb::{Disposition, EndReason};

/// Which way the most recent bytes of a lease went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Client to upstream: a request may still be unanswered.
    ToUpstream,
    /// Upstream to client: the last request was (at least partly) answered.
    ToClient,
}

/// How a lease came to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client sent `Release` with this disposition.
    Release(Disposition),
    /// The stream went away or half-closed without `Release`.
    Abort,
    /// The client broke the protocol after `Granted`.
    Violation,
    /// The client sent what the sidecar refuses to forward (a PostgreSQL
    /// StartupMessage); nothing of it reached the upstream.
    Refused,
    /// The upstream closed the connection (EOF, reset, broken pipe).
    UpstreamClosed,
    /// Another I/O error on the upstream socket.
    UpstreamError,
    /// `lease.max_duration` (or the client's shorter `max_lease_ms`) passed.
    Expired,
    /// No bytes either way for `lease.idle_timeout`.
    Idle,
    /// The sidecar's shutdown grace ran out.
    Shutdown,
}

/// What happens to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Back to the idle list.
    Return,
    /// Closed, counted under this reason.
    Evict(EvictReason),
}

/// The decision for one lease end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// The `Ended` message to send, if the row sends one.
    pub ended: Option<(Disposition, EndReason)>,
    /// The connection's fate.
    pub fate: Fate,
}

/// Whether a connection may go back to the pool: the socket is alive with
/// nothing unread, and no request may still be unanswered.
pub(crate) fn clean(last: Option<Direction>, socket: Liveness) -> bool {
    socket == Liveness::Alive && last != Some(Direction::ToUpstream)
}

/// Decides how a lease ends. `socket` is a peek taken at the moment of the
/// decision; `last` is the direction of the most recent bytes.
pub(crate) fn conclude(
    end: End,
    last: Option<Direction>,
    socket: Liveness,
    on_abort: OnAbort,
) -> Outcome {
    let evict = |reason: EndReason, why: EvictReason| Outcome {
        ended: Some((Disposition::Evict, reason)),
        fate: Fate::Evict(why),
    };
    match end {
        End::Release(Disposition::Evict) => {
            evict(EndReason::ClientRelease, EvictReason::ClientEvict)
        }
        End::Release(Disposition::Return | Disposition::Unspecified) => {
            if clean(last, socket) {
                Outcome {
                    ended: Some((Disposition::Return, EndReason::ClientRelease)),
                    fate: Fate::Return,
                }
            } else {
                evict(EndReason::Dirty, EvictReason::Dirty)
            }
        }
        End::Abort => Outcome {
            ended: None,
            fate: match on_abort {
                OnAbort::Return if clean(last, socket) => Fate::Return,
                OnAbort::Return | OnAbort::Evict => Fate::Evict(EvictReason::ClientAbort),
            },
        },
        End::Violation => Outcome {
            ended: None,
            fate: Fate::Evict(EvictReason::ClientAbort),
        },
        End::Refused => Outcome {
            ended: None,
            fate: if clean(last, socket) {
                Fate::Return
            } else {
                Fate::Evict(EvictReason::ClientAbort)
            },
        },
        End::UpstreamClosed => evict(EndReason::UpstreamClosed, EvictReason::UpstreamClosed),
        End::UpstreamError => evict(EndReason::UpstreamError, EvictReason::UpstreamClosed),
        End::Expired => evict(EndReason::LeaseExpired, EvictReason::LeaseExpired),
        End::Idle => evict(EndReason::LeaseIdle, EvictReason::LeaseIdle),
        End::Shutdown => evict(EndReason::Shutdown, EvictReason::Shutdown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILED: Liveness = Liveness::Failed(std::io::ErrorKind::Other);
    const UP: Option<Direction> = Some(Direction::ToUpstream);
    const DOWN: Option<Direction> = Some(Direction::ToClient);

    /// `clean`'s whole domain, written out rather than computed: only a live
    /// socket whose last bytes were not a request is clean.
    const CLEAN: [(Option<Direction>, Liveness, bool); 12] = [
        (None, Liveness::Alive, true),
        (None, Liveness::Closed, false),
        (None, Liveness::Unsolicited, false),
        (None, FAILED, false),
        (UP, Liveness::Alive, false),
        (UP, Liveness::Closed, false),
        (UP, Liveness::Unsolicited, false),
        (UP, FAILED, false),
        (DOWN, Liveness::Alive, true),
        (DOWN, Liveness::Closed, false),
        (DOWN, Liveness::Unsolicited, false),
        (DOWN, FAILED, false),
    ];

    /// Every way a lease ends, each once.
    const ENDS: [End; 11] = [
        End::Release(Disposition::Unspecified),
        End::Release(Disposition::Return),
        End::Release(Disposition::Evict),
        End::Abort,
        End::Violation,
        End::Refused,
        End::UpstreamClosed,
        End::UpstreamError,
        End::Expired,
        End::Idle,
        End::Shutdown,
    ];

    /// The lease-end table: the outcome each end must have, given whether
    /// the connection is clean. Spelled out row by row, independent of
    /// `conclude`'s own structure.
    fn expected(end: End, is_clean: bool, on_abort: OnAbort) -> Outcome {
        use Disposition::{Evict, Return};
        let evicted = |reason, why| Outcome {
            ended: Some((Evict, reason)),
            fate: Fate::Evict(why),
        };
        match (end, is_clean, on_abort) {
            (End::Release(Return | Disposition::Unspecified), true, _) => Outcome {
                ended: Some((Return, EndReason::ClientRelease)),
                fate: Fate::Return,
            },
            (End::Release(Return | Disposition::Unspecified), false, _) => {
                evicted(EndReason::Dirty, EvictReason::Dirty)
            }
            (End::Release(Evict), _, _) => {
                evicted(EndReason::ClientRelease, EvictReason::ClientEvict)
            }
            (End::Abort, true, OnAbort::Return) | (End::Refused, true, _) => Outcome {
                ended: None,
                fate: Fate::Return,
            },
            (End::Abort | End::Violation | End::Refused, _, _) => Outcome {
                ended: None,
                fate: Fate::Evict(EvictReason::ClientAbort),
            },
            (End::UpstreamClosed, _, _) => {
                evicted(EndReason::UpstreamClosed, EvictReason::UpstreamClosed)
            }
            (End::UpstreamError, _, _) => {
                evicted(EndReason::UpstreamError, EvictReason::UpstreamClosed)
            }
            (End::Expired, _, _) => evicted(EndReason::LeaseExpired, EvictReason::LeaseExpired),
            (End::Idle, _, _) => evicted(EndReason::LeaseIdle, EvictReason::LeaseIdle),
            (End::Shutdown, _, _) => evicted(EndReason::Shutdown, EvictReason::Shutdown),
        }
    }

    /// Every combination of end, traffic, socket and `on_abort` against the
    /// table above.
    #[test]
    fn every_combination_matches_the_lease_end_table() {
        for end in ENDS {
            for (last, socket, is_clean) in CLEAN {
                assert_eq!(clean(last, socket), is_clean, "{last:?} {socket:?}");
                for on_abort in [OnAbort::Evict, OnAbort::Return] {
                    assert_eq!(
                        conclude(end, last, socket, on_abort),
                        expected(end, is_clean, on_abort),
                        "{end:?} {last:?} {socket:?} {on_abort:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn clean_needs_a_live_socket_and_an_answered_request() {
        assert!(clean(None, Liveness::Alive));
        assert!(clean(Some(Direction::ToClient), Liveness::Alive));
        assert!(!clean(Some(Direction::ToUpstream), Liveness::Alive));
        assert!(!clean(None, Liveness::Unsolicited));
        assert!(!clean(Some(Direction::ToClient), Liveness::Closed));
        assert!(!clean(None, Liveness::Failed(std::io::ErrorKind::Other)));
    }

    #[test]
    fn release_rows() {
        let alive = Liveness::Alive;
        let answered = Some(Direction::ToClient);
        let pending = Some(Direction::ToUpstream);
        let r = |d, last, socket| conclude(End::Release(d), last, socket, OnAbort::Evict);
        assert_eq!(
            r(Disposition::Return, answered, alive).ended,
            Some((Disposition::Return, EndReason::ClientRelease))
        );
        assert_eq!(r(Disposition::Unspecified, None, alive).fate, Fate::Return);
        assert_eq!(
            r(Disposition::Return, pending, alive),
            Outcome {
                ended: Some((Disposition::Evict, EndReason::Dirty)),
                fate: Fate::Evict(EvictReason::Dirty)
            }
        );
        assert_eq!(
            r(Disposition::Return, answered, Liveness::Unsolicited).fate,
            Fate::Evict(EvictReason::Dirty)
        );
        assert_eq!(
            r(Disposition::Evict, answered, alive),
            Outcome {
                ended: Some((Disposition::Evict, EndReason::ClientRelease)),
                fate: Fate::Evict(EvictReason::ClientEvict)
            }
        );
    }

    #[test]
    fn revocation_rows() {
        let cases = [
            (
                End::UpstreamClosed,
                EndReason::UpstreamClosed,
                EvictReason::UpstreamClosed,
            ),
            (
                End::UpstreamError,
                EndReason::UpstreamError,
                EvictReason::UpstreamClosed,
            ),
            (
                End::Expired,
                EndReason::LeaseExpired,
                EvictReason::LeaseExpired,
            ),
            (End::Idle, EndReason::LeaseIdle, EvictReason::LeaseIdle),
            (End::Shutdown, EndReason::Shutdown, EvictReason::Shutdown),
        ];
        for (end, reason, evict) in cases {
            let out = conclude(
                end,
                Some(Direction::ToClient),
                Liveness::Alive,
                OnAbort::Return,
            );
            assert_eq!(out.ended, Some((Disposition::Evict, reason)));
            assert_eq!(out.fate, Fate::Evict(evict));
        }
    }

    #[test]
    fn aborts_follow_on_abort() {
        let answered = Some(Direction::ToClient);
        assert_eq!(
            conclude(End::Abort, answered, Liveness::Alive, OnAbort::Evict).fate,
            Fate::Evict(EvictReason::ClientAbort)
        );
        assert_eq!(
            conclude(End::Abort, answered, Liveness::Alive, OnAbort::Return).fate,
            Fate::Return
        );
        assert_eq!(
            conclude(
                End::Abort,
                Some(Direction::ToUpstream),
                Liveness::Alive,
                OnAbort::Return
            )
            .fate,
            Fate::Evict(EvictReason::ClientAbort)
        );
        assert_eq!(
            conclude(End::Violation, answered, Liveness::Alive, OnAbort::Return).fate,
            Fate::Evict(EvictReason::ClientAbort)
        );
    }
}
