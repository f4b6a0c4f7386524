//! The backend messages a PostgreSQL listener writes itself: startup
//! answers, errors, and ReadyForQuery.

use bytes::{BufMut, BytesMut};

/// One message: tag, length, body.
fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(out: &mut BytesMut, s: &str) {
    // A NUL would end the string early: drop it rather than forge a field.
    out.extend(s.bytes().filter(|&b| b != 0));
    out.put_u8(0);
}

/// AuthenticationOk.
pub(crate) fn auth_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

/// ParameterStatus.
pub(crate) fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    message(out, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

/// BackendKeyData.
pub(crate) fn backend_key(out: &mut BytesMut, pid: i32, secret: i32) {
    message(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

/// ReadyForQuery with a transaction status (`I`, `T`, `E`).
pub(crate) fn ready(out: &mut BytesMut, status: u8) {
    message(out, b'Z', |b| b.put_u8(status));
}

/// NegotiateProtocolVersion: protocol 3.0, and the `_pq_` options not
/// recognized.
pub(crate) fn negotiate(out: &mut BytesMut, unrecognized: &[String]) {
    message(out, b'v', |b| {
        b.put_i32(0);
        b.put_i32(unrecognized.len() as i32);
        for name in unrecognized {
            cstr(b, name);
        }
    });
}

/// How bad an error is: `ERROR` ends the request, `FATAL` the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Severity {
    /// The request failed; the session goes on.
    Error,
    /// The connection ends after it.
    Fatal,
}

/// ErrorResponse with severity, SQLSTATE and message.
pub(crate) fn error(out: &mut BytesMut, severity: Severity, code: &str, text: &str) {
    let severity = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    message(out, b'E', |b| {
        b.put_u8(b'S');
        cstr(b, severity);
        b.put_u8(b'V');
        cstr(b, severity);
        b.put_u8(b'C');
        cstr(b, code);
        b.put_u8(b'M');
        cstr(b, text);
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn messages_parse_with_postgres_protocol() {
        let mut out = BytesMut::new();
        auth_ok(&mut out);
        parameter_status(&mut out, "TimeZone", "UTC");
        backend_key(&mut out, 7, 9);
        error(&mut out, Severity::Fatal, "57P01", "bye\0now");
        ready(&mut out, b'I');
        let mut kinds = Vec::new();
        while let Some(m) = Message::parse(&mut out).unwrap() {
            kinds.push(match m {
                Message::AuthenticationOk => "ok".to_owned(),
                Message::ParameterStatus(p) => {
                    format!("{}={}", p.name().unwrap(), p.value().unwrap())
                }
                Message::BackendKeyData(k) => format!("{}/{}", k.process_id(), k.secret_key()),
                Message::ErrorResponse(e) => {
                    let fields: Vec<_> = e
                        .fields()
                        .map(|f| Ok(String::from_utf8_lossy(f.value_bytes()).into_owned()))
                        .collect()
                        .unwrap();
                    fields.join("|")
                }
                Message::ReadyForQuery(r) => format!("Z{}", r.status() as char),
                _ => "?".to_owned(),
            });
        }
        assert_eq!(
            kinds,
            [
                "ok",
                "TimeZone=UTC",
                "7/9",
                "FATAL|FATAL|57P01|byenow",
                "ZI"
            ]
        );
    }
}
