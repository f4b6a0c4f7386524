//! Opening a Redis session on a fresh connection, inside `connect_timeout`:
//! `AUTH` (password, or ACL user and password), `HELLO 3`, `SELECT`,
//! `CLIENT SETNAME`, sent in one write and their replies read back. The
//! password is read from its file or variable at each dial (a rotated Secret
//! applies to new connections) and appears in no error.

use crate::net::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::resp::{Scanner, encode_command as command};
use crate::config::RedisConfig;
use crate::protocol::OpenError;

/// Opens the configured session on `stream`. `confirm`: make at least one
/// round trip (a `PING` when nothing else is configured), so that a server
/// that ends the session (a TLS client certificate it wanted) fails the dial.
pub(crate) async fn open(
    stream: &mut Stream,
    cfg: &RedisConfig,
    confirm: bool,
) -> Result<(), OpenError> {
    let password = cfg
        .password()
        .map_err(|e| OpenError::Credentials(e.to_string()))?;
    let mut request = Vec::new();
    let mut steps = Vec::new();
    if let Some(password) = &password {
        match &cfg.username {
            Some(user) => command(
                &mut request,
                &[b"AUTH", user.as_bytes(), password.as_bytes()],
            ),
            None => command(&mut request, &[b"AUTH", password.as_bytes()]),
        }
        steps.push("AUTH");
    }
    if cfg.resp == 3 {
        command(&mut request, &[b"HELLO", b"3"]);
        steps.push("HELLO 3");
    }
    if cfg.db != 0 {
        command(&mut request, &[b"SELECT", cfg.db.to_string().as_bytes()]);
        steps.push("SELECT");
    }
    if let Some(name) = &cfg.client_name {
        command(&mut request, &[b"CLIENT", b"SETNAME", name.as_bytes()]);
        steps.push("CLIENT SETNAME");
    }
    if steps.is_empty() && confirm {
        command(&mut request, &[b"PING"]);
        steps.push("PING");
    }
    if steps.is_empty() {
        return Ok(());
    }
    let io = |e: std::io::Error| OpenError::Io(e.to_string());
    stream.write_all(&request).await.map_err(io)?;
    drop(request);
    let mut scanner = Scanner::new(1 << 20);
    let mut replies = Vec::new();
    let mut buf = vec![0u8; 4096];
    while replies.len() < steps.len() {
        let n = stream.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            return Err(OpenError::Io("the server closed the connection".into()));
        }
        scanner
            .feed(&buf[..n], |f| replies.push(f))
            .map_err(|e| OpenError::Io(e.to_string()))?;
    }
    for (step, reply) in steps.iter().zip(&replies) {
        if reply.is_error() {
            let reason = reply
                .args
                .first()
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .unwrap_or_else(|| "an error reply".into());
            return Err(if *step == "AUTH" {
                OpenError::Auth(format!("authentication failed: {reason}"))
            } else {
                OpenError::Refused { step, reason }
            });
        }
    }
    Ok(())
}

/// Asks a Redis server whether it is a replica: `ROLE` (`master`, `slave`;
/// a sentinel is neither), or, where the session's ACL user may not run
/// `ROLE`, the `role:` line of `INFO replication`. The session must be
/// idle (no reply owed); it is idle again after.
pub(crate) async fn ask_role(stream: &mut Stream) -> Result<bool, OpenError> {
    let mut request = Vec::new();
    command(&mut request, &[b"ROLE"]);
    let (frame, _) = one_reply(stream, &request).await?;
    if !frame.is_error() {
        return match frame.first().as_str() {
            "master" => Ok(false),
            "slave" => Ok(true),
            other => Err(OpenError::Refused {
                step: "ROLE",
                reason: format!("the server's role is `{other}`, neither master nor replica"),
            }),
        };
    }
    let mut request = Vec::new();
    command(&mut request, &[b"INFO", b"replication"]);
    let (frame, raw) = one_reply(stream, &request).await?;
    let text = String::from_utf8_lossy(&raw);
    if frame.is_error() {
        return Err(OpenError::Refused {
            step: "ROLE and INFO replication",
            reason: text.trim().to_owned(),
        });
    }
    match text.lines().find_map(|l| l.trim().strip_prefix("role:")) {
        Some("master") => Ok(false),
        Some("slave") => Ok(true),
        other => Err(OpenError::Refused {
            step: "INFO replication",
            reason: format!("no role master or slave in the reply ({other:?})"),
        }),
    }
}

/// Writes `request` and reads its one reply frame (at most 64 KiB): the
/// frame and its bytes.
async fn one_reply(
    stream: &mut Stream,
    request: &[u8],
) -> Result<(super::resp::Frame, Vec<u8>), OpenError> {
    const MAX: usize = 64 * 1024;
    let io = |e: std::io::Error| OpenError::Io(e.to_string());
    stream.write_all(request).await.map_err(io)?;
    let mut scanner = Scanner::new(MAX as u64);
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        // Nothing else is owed: a read cannot run past the reply.
        let n = stream.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            return Err(OpenError::Io("the server closed the connection".into()));
        }
        raw.extend_from_slice(&buf[..n]);
        let mut frame = None;
        scanner
            .feed(&buf[..n], |f| {
                frame.get_or_insert(f);
            })
            .map_err(|e| OpenError::Io(e.to_string()))?;
        if let Some(frame) = frame {
            return Ok((frame, raw));
        }
        if raw.len() > MAX {
            return Err(OpenError::Io("an oversized reply".into()));
        }
    }
}
