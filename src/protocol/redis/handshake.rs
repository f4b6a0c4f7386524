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
