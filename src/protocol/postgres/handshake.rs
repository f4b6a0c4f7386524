//! Opening a PostgreSQL session on a fresh connection, inside
//! `connect_timeout`: the StartupMessage (user, database,
//! `application_name`, parameters), then whichever authentication the
//! server asks for (trust, cleartext, md5, SCRAM-SHA-256, with
//! `postgres-protocol`'s message and SCRAM code), up to the first
//! ReadyForQuery. Every ParameterStatus and the BackendKeyData are kept:
//! they are what a driver adopting the session needs. The password is read
//! at each dial and appears in no error.

use crate::net::Stream;
use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Backend;
use crate::config::PostgresConfig;
use crate::protocol::OpenError;

/// Startup messages are small; a server that sends more is not one.
const STARTUP_MAX: usize = 1 << 20;

/// Asks the server to switch to TLS (SSLRequest): `true` when it answers
/// `S` (the TLS handshake follows at once), `false` on `N`.
pub(crate) async fn request_tls(stream: &mut tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    stream.write_all(&out).await?;
    match stream.read_u8().await? {
        b'S' => Ok(true),
        b'N' => Ok(false),
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the server answered the SSLRequest with {other:#04x}, not S or N"),
        )),
    }
}

/// Opens the configured session on `stream`.
pub(crate) async fn open(stream: &mut Stream, cfg: &PostgresConfig) -> Result<Backend, OpenError> {
    let password = cfg
        .password()
        .map_err(|e| OpenError::Credentials(e.to_string()))?;
    let user = cfg.user.as_str();
    let mut params = vec![
        ("user", user),
        ("database", cfg.database()),
        ("application_name", cfg.application_name.as_str()),
    ];
    params.extend(cfg.parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut out = BytesMut::new();
    frontend::startup_message(params, &mut out).map_err(io)?;
    let mut conn = Wire {
        stream,
        buf: BytesMut::with_capacity(1024),
    };
    conn.send(&mut out).await?;
    let mut backend = Backend::default();
    let mut scram: Option<ScramSha256> = None;
    let no_password = || {
        OpenError::Auth(format!(
            "authentication failed for user \"{user}\": the server asks for a password and \
             none is configured (postgres.password_file or postgres.password_env)"
        ))
    };
    loop {
        match conn.next().await? {
            Message::AuthenticationOk | Message::NoticeResponse(_) => {}
            Message::AuthenticationCleartextPassword => {
                let password = password.as_deref().ok_or_else(no_password)?;
                frontend::password_message(password.as_bytes(), &mut out).map_err(io)?;
                conn.send(&mut out).await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let password = password.as_deref().ok_or_else(no_password)?;
                let hash = md5_hash(user.as_bytes(), password.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut out).map_err(io)?;
                conn.send(&mut out).await?;
            }
            Message::AuthenticationSasl(body) => {
                let password = password.as_deref().ok_or_else(no_password)?;
                let mut mechanisms = body.mechanisms();
                let mut offered = false;
                while let Some(m) = fallible(mechanisms.next())? {
                    offered |= m == SCRAM_SHA_256;
                }
                if !offered {
                    return Err(OpenError::Refused {
                        step: "authentication",
                        reason: "the server offers no SASL mechanism lessor supports \
                                 (SCRAM-SHA-256 without channel binding)"
                            .into(),
                    });
                }
                let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                    .map_err(io)?;
                conn.send(&mut out).await?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().ok_or_else(|| unexpected("SASLContinue"))?;
                s.update(body.data()).map_err(|e| sasl(user, &e))?;
                frontend::sasl_response(s.message(), &mut out).map_err(io)?;
                conn.send(&mut out).await?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = scram.as_mut().ok_or_else(|| unexpected("SASLFinal"))?;
                s.finish(body.data()).map_err(|e| sasl(user, &e))?;
            }
            Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGss
            | Message::AuthenticationGssContinue(_)
            | Message::AuthenticationSspi => {
                return Err(OpenError::Refused {
                    step: "authentication",
                    reason: "the server asks for a method lessor does not support \
                             (trust, password, md5 and scram-sha-256 are)"
                        .into(),
                });
            }
            Message::ParameterStatus(body) => {
                let (name, value) = (fallible(body.name())?, fallible(body.value())?);
                backend.parameters.insert(name.to_owned(), value.to_owned());
            }
            Message::BackendKeyData(body) => {
                backend.pid = body.process_id();
                backend.secret = bytes::Bytes::copy_from_slice(&body.secret_key().to_be_bytes());
            }
            Message::ErrorResponse(body) => return Err(refusal(&body, user)),
            Message::ReadyForQuery(_) => {
                backend.initial = backend.parameters.clone();
                return Ok(backend);
            }
            _ => return Err(unexpected("a message outside the startup")),
        }
    }
}

/// The server's refusal, by SQLSTATE: class 28 is the credentials', the
/// rest (no such database, too many connections) is the session's.
pub(crate) fn refusal(body: &ErrorResponseBody, user: &str) -> OpenError {
    let error = ServerError::from_body(body);
    if error.code.starts_with("28") {
        OpenError::Auth(format!(
            "authentication failed for user \"{user}\" (SQLSTATE {}: {})",
            error.code, error.message
        ))
    } else {
        OpenError::Refused {
            step: "startup",
            reason: error.to_string(),
        }
    }
}

/// The fields of an ErrorResponse (or NoticeResponse) worth showing.
#[derive(Debug, Default)]
pub(crate) struct ServerError {
    /// `S`: ERROR, FATAL...
    pub severity: String,
    /// `C`: the SQLSTATE.
    pub code: String,
    /// `M`: the primary message.
    pub message: String,
}

impl ServerError {
    /// Reads an ErrorResponse's fields; malformed ones are left empty.
    pub(crate) fn from_body(body: &ErrorResponseBody) -> Self {
        Self::from_fields(body.fields())
    }

    /// Reads the fields of an ErrorResponse or a NoticeResponse.
    pub(crate) fn from_fields(mut fields: ErrorFields<'_>) -> Self {
        let mut error = Self::default();
        while let Ok(Some(field)) = fields.next() {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'S' => error.severity = value,
                b'C' => error.code = value,
                b'M' => error.message = value,
                _ => {}
            }
        }
        error
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)
    }
}

/// The stream and what has been read of it but not parsed yet.
struct Wire<'a> {
    stream: &'a mut Stream,
    buf: BytesMut,
}

impl Wire<'_> {
    /// Writes and empties `out`.
    async fn send(&mut self, out: &mut BytesMut) -> Result<(), OpenError> {
        self.stream.write_all(out).await.map_err(io)?;
        out.clear();
        Ok(())
    }

    /// The next whole backend message.
    async fn next(&mut self) -> Result<Message, OpenError> {
        loop {
            if let Some(message) = Message::parse(&mut self.buf).map_err(io)? {
                return Ok(message);
            }
            if self.buf.len() > STARTUP_MAX {
                return Err(unexpected("an oversized message"));
            }
            self.buf.reserve(1024);
            if self.stream.read_buf(&mut self.buf).await.map_err(io)? == 0 {
                return Err(OpenError::Io(
                    "the server closed the connection during startup".into(),
                ));
            }
        }
    }
}

fn io(e: std::io::Error) -> OpenError {
    OpenError::Io(e.to_string())
}

fn unexpected(what: &str) -> OpenError {
    OpenError::Io(format!("PostgreSQL startup failed: unexpected {what}"))
}

fn sasl(user: &str, e: &std::io::Error) -> OpenError {
    OpenError::Auth(format!(
        "authentication failed for user \"{user}\" (SCRAM-SHA-256: {e})"
    ))
}

fn fallible<T>(r: std::io::Result<T>) -> Result<T, OpenError> {
    r.map_err(io)
}

/// What a session says about its server's role: in recovery (a hot
/// standby), and read-only by default. For servers that report neither
/// `in_hot_standby` (before PostgreSQL 14) nor anything since, and for
/// re-checking an idle pooled session, whose reports arrive only with a
/// query: `SELECT pg_is_in_recovery()` and the read-only default, as one
/// simple query. The default is the setting's `reset_val` (the server's,
/// database's or role's), not the session's: a client's own `SET` that a
/// reset did not undo must not make the primary look like a replica. The
/// session must be idle; it is idle again after.
pub(crate) async fn ask_role(stream: &mut Stream) -> Result<(bool, bool), OpenError> {
    let mut out = BytesMut::new();
    frontend::query(
        "SELECT pg_is_in_recovery(), (SELECT reset_val FROM pg_settings \
         WHERE name = 'default_transaction_read_only')",
        &mut out,
    )
    .map_err(io)?;
    let mut conn = Wire {
        stream,
        buf: BytesMut::with_capacity(256),
    };
    conn.send(&mut out).await?;
    let mut answer = None;
    let mut refused = None;
    loop {
        match conn.next().await? {
            Message::DataRow(row) => {
                let mut values = Vec::new();
                let mut ranges = row.ranges();
                while let Some(range) = fallible(ranges.next())? {
                    values.push(range.map(|r| row.buffer()[r].to_vec()));
                }
                if let [Some(recovery), Some(read_only)] = values.as_slice() {
                    answer = Some((recovery == b"t", read_only == b"on"));
                }
            }
            Message::ErrorResponse(body) => {
                refused = Some(ServerError::from_body(&body).to_string());
            }
            Message::ReadyForQuery(_) => break,
            // RowDescription, CommandComplete, notices and reports.
            _ => {}
        }
    }
    match (answer, refused) {
        (Some(answer), _) => Ok(answer),
        (None, Some(reason)) => Err(OpenError::Refused {
            step: "role check",
            reason,
        }),
        (None, None) => Err(unexpected("a role check without its row")),
    }
}
