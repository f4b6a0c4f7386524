//! Health checks: a one-syscall liveness peek, then a send/expect probe when
//! the connection has been quiet long enough to deserve one.
//!
//! The peek must be a direct `recv(MSG_PEEK)`: tokio's own `try_read`/`peek`
//! trust cached readiness and report dead sockets as alive (observed with
//! tokio 1.x). It lives with the socket type, in `net::Stream::peek`.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::Stream;

use super::conn::Conn;
use crate::config::ProbeConfig;

pub(crate) use crate::net::{Liveness, closed_by_peer};

/// Looks at the connection without consuming or waiting (TLS records that
/// carry no data, such as session tickets, are absorbed; see `net::Stream::peek`).
pub(crate) fn peek(stream: &mut Stream) -> Liveness {
    stream.peek()
}

/// Why a connection failed its check.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HealthError {
    /// The peer closed the connection while it sat idle.
    #[error("peer closed the connection")]
    Closed,
    /// Bytes arrived that no lease asked for.
    #[error("unsolicited bytes on an idle connection")]
    Unsolicited,
    /// The socket reported an error.
    #[error("socket error: {0}")]
    Socket(io::ErrorKind),
    /// The probe got no full answer in time.
    #[error("probe timed out after {0:?}")]
    ProbeTimeout(Duration),
    /// The probe's write or read failed.
    #[error("probe I/O failed: {0}")]
    ProbeIo(#[source] io::Error),
    /// The probe's answer differed from `expect`.
    #[error("probe answered {got:?}, expected {expected:?}")]
    ProbeMismatch {
        /// What came back (lossy UTF-8).
        got: String,
        /// The configured answer.
        expected: String,
    },
}

/// Peek, then the probe (when configured), then peek again: bytes beyond the
/// expected answer are a reply nobody will read.
pub(crate) async fn check(conn: &mut Conn, probe: Option<&ProbeConfig>) -> Result<(), HealthError> {
    liveness(conn)?;
    if let Some(probe) = probe {
        let backend = conn.backend.as_deref_mut();
        run_probe(&mut conn.stream, probe, backend).await?;
        liveness(conn)?;
    }
    conn.mark_validated(Instant::now());
    Ok(())
}

/// The peek alone, as an error.
pub(crate) fn liveness(conn: &mut Conn) -> Result<(), HealthError> {
    match peek(&mut conn.stream) {
        Liveness::Alive => Ok(()),
        Liveness::Closed => Err(HealthError::Closed),
        Liveness::Unsolicited => Err(HealthError::Unsolicited),
        Liveness::Failed(kind) => Err(HealthError::Socket(kind)),
    }
}

/// The largest message a probe of a PostgreSQL session reads.
const ASYNC_MAX: usize = 64 * 1024;

/// Sends the probe and compares the answer. On a PostgreSQL session
/// (`backend`), whole ParameterStatus and NoticeResponse messages before
/// the answer are asynchronous (a promotion reports `in_hot_standby`, a
/// reload reports changed settings), not a wrong answer: they are read past,
/// and the reports recorded on the session, where a change of role is
/// noticed.
async fn run_probe(
    stream: &mut Stream,
    probe: &ProbeConfig,
    mut backend: Option<&mut crate::protocol::postgres::Backend>,
) -> Result<(), HealthError> {
    let expect = probe.expect.as_bytes();
    let round_trip = async {
        stream.write_all(probe.send.as_bytes()).await?;
        if backend.is_none() || expect.len() < 5 {
            let mut got = vec![0u8; expect.len()];
            stream.read_exact(&mut got).await?;
            return Ok::<_, io::Error>(got);
        }
        // Message by message: reports come anywhere in the answer
        // (ParameterStatus just before ReadyForQuery, for one).
        let mut got = Vec::with_capacity(expect.len());
        while got.len() < expect.len() {
            let mut head = [0u8; 5];
            stream.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if !(4..=ASYNC_MAX).contains(&len) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a message of an impossible length",
                ));
            }
            let mut body = vec![0u8; len - 4];
            stream.read_exact(&mut body).await?;
            let asynchronous =
                matches!(head[0], b'S' | b'N') && expect.get(got.len()) != Some(&head[0]);
            if !asynchronous {
                got.extend_from_slice(&head);
                got.extend_from_slice(&body);
                continue;
            }
            if head[0] == b'S'
                && let Some(backend) = backend.as_deref_mut()
                && let [name, value, ..] = body.split(|b| *b == 0).collect::<Vec<_>>()[..]
            {
                backend.parameters.insert(
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                );
            }
        }
        Ok(got)
    };
    let got = tokio::time::timeout(probe.timeout, round_trip)
        .await
        .map_err(|_| HealthError::ProbeTimeout(probe.timeout))?
        .map_err(HealthError::ProbeIo)?;
    if got != expect {
        return Err(HealthError::ProbeMismatch {
            got: String::from_utf8_lossy(&got).into_owned(),
            expected: probe.expect.clone(),
        });
    }
    Ok(())
}
