//! The client's side of startup, answered by lessor: SSLRequest and
//! GSSENCRequest get `N`, a CancelRequest is routed by the key lessor
//! issued, and a StartupMessage must name the user and database the
//! upstream logs in with. Then authentication (trust or SCRAM-SHA-256
//! against the listener's own password), the server's parameters with the
//! client's reported ones applied, a BackendKeyData of lessor's, and
//! ReadyForQuery.

use std::collections::BTreeMap;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::messages::{self, Severity};

/// The longest startup packet accepted (PostgreSQL's own limit).
const STARTUP_MAX: usize = 10_000;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

/// What a new connection asked for.
#[derive(Debug)]
pub(crate) enum Hello {
    /// A session: the StartupMessage's parameters.
    Startup(BTreeMap<String, String>),
    /// A CancelRequest with a key lessor issued (or not).
    Cancel {
        /// The process id of the key.
        pid: i32,
        /// The secret of the key.
        secret: i32,
    },
}

/// Why a startup ended without a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartupError {
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The client broke the startup protocol (answered with FATAL 08P01).
    #[error("{0}")]
    Protocol(String),
}

/// Reads the first real packet, answering SSL and GSS encryption requests
/// with `N` (lessor listens on loopback or a Unix socket; TLS to clients is
/// not offered).
pub(crate) async fn hello<S>(stream: &mut S) -> Result<Hello, StartupError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let len = stream.read_i32().await?;
        if !(8..=STARTUP_MAX as i32).contains(&len) {
            return Err(StartupError::Protocol(format!(
                "invalid length of startup packet: {len}"
            )));
        }
        let mut body = vec![0u8; len as usize - 4];
        stream.read_exact(&mut body).await?;
        let mut body = &body[..];
        let code = body.get_i32();
        match code {
            SSL_REQUEST | GSSENC_REQUEST => stream.write_all(b"N").await?,
            CANCEL_REQUEST if body.len() >= 8 => {
                return Ok(Hello::Cancel {
                    pid: body.get_i32(),
                    secret: body.get_i32(),
                });
            }
            code if code >> 16 == 3 => return parameters(body, code & 0xffff, stream).await,
            code => {
                return Err(StartupError::Protocol(format!(
                    "unsupported frontend protocol {}.{}: lessor supports 3.0",
                    code >> 16,
                    code & 0xffff
                )));
            }
        }
    }
}

/// A StartupMessage's key/value pairs; a newer minor version is answered
/// with NegotiateProtocolVersion (3.0), as PostgreSQL does.
async fn parameters<S>(body: &[u8], minor: i32, stream: &mut S) -> Result<Hello, StartupError>
where
    S: AsyncWrite + Unpin,
{
    let bad = || StartupError::Protocol("malformed startup packet".into());
    let mut fields = body.split(|&b| b == 0);
    let mut params = BTreeMap::new();
    let mut unrecognized = Vec::new();
    loop {
        let key = fields.next().ok_or_else(bad)?;
        if key.is_empty() {
            break;
        }
        let value = fields.next().ok_or_else(bad)?;
        let key = String::from_utf8_lossy(key).into_owned();
        let value = String::from_utf8_lossy(value).into_owned();
        if key.starts_with("_pq_.") {
            unrecognized.push(key);
        } else {
            params.insert(key, value);
        }
    }
    if minor > 0 || !unrecognized.is_empty() {
        let mut out = BytesMut::new();
        messages::negotiate(&mut out, &unrecognized);
        stream.write_all(&out).await?;
    }
    Ok(Hello::Startup(params))
}

/// Writes a FATAL error and flushes it: the connection ends after it.
pub(crate) async fn fatal<S>(stream: &mut S, code: &str, text: &str)
where
    S: AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    messages::error(&mut out, Severity::Fatal, code, text);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}

/// The parameters a client may set and lessor carries along (the reported
/// ones a session can change).
pub(crate) fn settable(name: &str) -> bool {
    matches!(
        name,
        "application_name"
            | "client_encoding"
            | "DateStyle"
            | "IntervalStyle"
            | "TimeZone"
            | "standard_conforming_strings"
    )
}

/// The same name as PostgreSQL spells it (GUC names are case-insensitive).
pub(crate) fn canonical(name: &str) -> String {
    for known in [
        "application_name",
        "client_encoding",
        "DateStyle",
        "IntervalStyle",
        "TimeZone",
        "standard_conforming_strings",
    ] {
        if known.eq_ignore_ascii_case(name) {
            return known.to_owned();
        }
    }
    name.to_owned()
}
