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
        run_probe(&mut conn.stream, probe).await?;
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

async fn run_probe(stream: &mut Stream, probe: &ProbeConfig) -> Result<(), HealthError> {
    let round_trip = async {
        stream.write_all(probe.send.as_bytes()).await?;
        let mut got = vec![0u8; probe.expect.len()];
        stream.read_exact(&mut got).await?;
        Ok::<_, io::Error>(got)
    };
    let got = tokio::time::timeout(probe.timeout, round_trip)
        .await
        .map_err(|_| HealthError::ProbeTimeout(probe.timeout))?
        .map_err(HealthError::ProbeIo)?;
    if got != probe.expect.as_bytes() {
        return Err(HealthError::ProbeMismatch {
            got: String::from_utf8_lossy(&got).into_owned(),
            expected: probe.expect.clone(),
        });
    }
    Ok(())
}
