//! The rollback and reset that make a used session idle-ready before its
//! connection goes back to the pool, and the reading of their answer. The
//! answer's ParameterStatus reports are kept whatever its outcome: a
//! connection's record of its parameters is what the server last said.

use std::time::Duration;

use crate::net::Stream;
use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::frame::{Event, FrameError, Framer, parse};
use crate::config::PostgresConfig;

/// Backend messages whose body the answer's reader needs.
const KEPT: &[u8] = b"ZSE";

/// How long the rollback and reset may take before the connection is
/// closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// The queries that make a session idle-ready, sent before its connection
/// goes back to the pool.
#[derive(Debug, Clone)]
pub(crate) struct Reset {
    request: BytesMut,
    /// ReadyForQuery messages to read.
    replies: u32,
    /// Whether it rolls back a transaction (counted).
    pub(crate) rollback: bool,
    max_frame: u64,
}

/// What the server answered to a [`Reset`].
#[derive(Debug)]
pub(crate) struct Settled {
    /// Its ParameterStatus reports, in order, whether or not it succeeded.
    pub(crate) reported: Vec<(String, String)>,
    /// `Ok`: every query succeeded and the session is idle; `Err(why)`.
    pub(crate) outcome: Result<(), String>,
}

impl Reset {
    /// The queries for a session left with a transaction open (`rollback`)
    /// and/or used (`used`: the configured reset is due). `None`: nothing.
    pub(crate) fn new(cfg: &PostgresConfig, rollback: bool, used: bool) -> Option<Self> {
        let mut request = BytesMut::new();
        let mut replies = 0;
        // Separate queries: DISCARD ALL refuses to run inside the implicit
        // transaction of a multi-statement query.
        if rollback {
            frontend::query("ROLLBACK", &mut request).ok()?;
            replies += 1;
        }
        if used && !cfg.reset.is_empty() {
            frontend::query(&cfg.reset, &mut request).ok()?;
            replies += 1;
        }
        (replies > 0).then(|| Self {
            request,
            replies,
            rollback,
            max_frame: cfg.max_frame.as_u64(),
        })
    }

    /// Sends the queries and reads through their ReadyForQuery, within
    /// `RESET_TIMEOUT`.
    pub(crate) async fn apply(&self, stream: &mut Stream) -> Settled {
        self.apply_with(stream, BytesMut::new(), true).await
    }

    /// The request bytes, for a caller that pipelines them behind its own.
    pub(crate) fn request(&self) -> &[u8] {
        &self.request
    }

    /// [`Reset::apply`], where `read` holds bytes of the answer already read
    /// and `send` is false when the request went out already (pipelined).
    pub(crate) async fn apply_with(
        &self,
        stream: &mut Stream,
        read: BytesMut,
        send: bool,
    ) -> Settled {
        let mut answer = Answer::new(self);
        let run = async {
            if send {
                stream
                    .write_all(&self.request)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let mut buf = read;
            answer.feed(&buf)?;
            while answer.replies < self.replies {
                buf.clear();
                if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                    return Err("the server closed the connection".to_owned());
                }
                answer.feed(&buf)?;
            }
            Ok(())
        };
        let read = tokio::time::timeout(RESET_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {RESET_TIMEOUT:?}")));
        match read {
            Ok(()) => answer.settled(),
            Err(why) => Settled {
                reported: answer.reported,
                outcome: Err(why),
            },
        }
    }

    /// The answer when `read` already holds all of it (a pipelined reset
    /// often arrives with the reply before it); `None` when more is due,
    /// and [`Reset::apply_with`] must read it.
    pub(crate) fn answered_by(&self, read: &[u8]) -> Option<Settled> {
        let mut answer = Answer::new(self);
        if let Err(why) = answer.feed(read) {
            return Some(Settled {
                reported: answer.reported,
                outcome: Err(why),
            });
        }
        (answer.replies >= self.replies).then(|| answer.settled())
    }
}

/// The server's answer to a [`Reset`], as read so far.
struct Answer {
    framer: Framer,
    replies: u32,
    status: u8,
    failed: Option<String>,
    reported: Vec<(String, String)>,
}

impl Answer {
    fn new(reset: &Reset) -> Self {
        Self {
            framer: Framer::new(reset.max_frame, KEPT),
            replies: 0,
            status: b'I',
            failed: None,
            reported: Vec::new(),
        }
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        let Self {
            framer,
            replies,
            status,
            failed,
            reported,
        } = self;
        framer
            .feed(data, |event| {
                if let Event::End { whole, .. } = event {
                    match whole.and_then(parse) {
                        Some(Message::ReadyForQuery(body)) => {
                            *replies += 1;
                            *status = body.status();
                        }
                        Some(Message::ErrorResponse(body)) => {
                            let error = super::handshake::ServerError::from_body(&body);
                            failed.get_or_insert(error.to_string());
                        }
                        Some(Message::ParameterStatus(body)) => {
                            if let (Ok(n), Ok(v)) = (body.name(), body.value()) {
                                reported.push((n.to_owned(), v.to_owned()));
                            }
                        }
                        _ => {}
                    }
                }
                Ok::<(), FrameError>(())
            })
            .map_err(|e| e.to_string())
    }

    /// The whole answer: its reports, and whether every query succeeded
    /// and left the session idle.
    fn settled(self) -> Settled {
        let outcome = match self.failed {
            Some(error) => Err(error),
            None if self.status != b'I' || !self.framer.at_boundary() => {
                Err("the session is not idle after the reset".into())
            }
            None => Ok(()),
        };
        Settled {
            reported: self.reported,
            outcome,
        }
    }
}
