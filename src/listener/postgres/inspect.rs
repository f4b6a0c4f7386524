//! What the listener reads of a client's messages without parsing them
//! fully: where one ends, and whether its SQL binds the client to its
//! server session or may drop prepared statements.

use super::startup;

/// The length of the complete message at the front of `buf`, if there is
/// one; an error for a malformed or oversized one.
pub(super) fn next_message(buf: &[u8], max: usize) -> Result<Option<usize>, String> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if !matches!(
        buf[0],
        b'B' | b'C'
            | b'd'
            | b'c'
            | b'f'
            | b'D'
            | b'E'
            | b'H'
            | b'F'
            | b'P'
            | b'p'
            | b'Q'
            | b'S'
            | b'X'
    ) {
        return Err(format!(
            "unexpected message type {:?} (a StartupMessage after startup?)",
            char::from(buf[0])
        ));
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(format!("invalid message length {len}"));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(format!(
            "a message of {total} bytes exceeds postgres.max_frame ({max} bytes)"
        ));
    }
    Ok((buf.len() >= total).then_some(total))
}

/// The text of a simple Query, or of a Parse's statement.
pub(super) fn statement_text(message: &[u8]) -> &[u8] {
    let body = &message[5..];
    let body = match message[0] {
        b'P' => match body.iter().position(|&b| b == 0) {
            Some(n) => &body[n + 1..],
            None => return &[],
        },
        _ => body,
    };
    body.split(|&b| b == 0).next().unwrap_or_default()
}

/// Whether a message binds its client to one server session for good:
/// SQL (in a simple Query or a Parse) that lessor sees creating session
/// state no transaction ends: `LISTEN`, `PREPARE`, a cursor `WITH HOLD`, a
/// temporary table, a session advisory lock, `set_config` or a session
/// `SET` of a parameter lessor does not carry. Read as words, comments and
/// all: a false alarm only costs pooling for that client. Named prepared
/// statements of the extended protocol do not bind: lessor carries them.
pub(super) fn binds_session(message: &[u8]) -> bool {
    if !matches!(message[0], b'Q' | b'P') {
        return false;
    }
    let text = String::from_utf8_lossy(statement_text(message)).to_ascii_lowercase();
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let words: Vec<&str> = text
        .split(|c: char| !is_word(c))
        .filter(|w| !w.is_empty())
        .collect();
    if words.iter().any(|w| {
        matches!(
            *w,
            "listen" | "prepare" | "temp" | "temporary" | "set_config"
        ) || w.starts_with("pg_advisory_lock")
            || w.starts_with("pg_try_advisory_lock")
    }) || words.windows(2).any(|p| p == ["with", "hold"])
    {
        return true;
    }
    // A session-level SET at the start of a statement.
    text.split(';').any(|statement| {
        let mut words = statement
            .split(|c: char| !is_word(c))
            .filter(|w| !w.is_empty());
        if words.next() != Some("set") {
            return false;
        }
        let mut name = words.next().unwrap_or_default();
        if matches!(name, "local" | "transaction" | "constraints") {
            return false;
        }
        if name == "session" {
            name = words.next().unwrap_or_default();
            if matches!(name, "characteristics" | "authorization") {
                return true;
            }
        }
        // `SET TIME ZONE` and the reported parameters follow the client.
        !(name == "time" || startup::settable(&startup::canonical(name)))
    })
}

/// Whether a Query or Parse may drop prepared statements (`DISCARD`,
/// `DEALLOCATE`).
pub(super) fn drops_statements(message: &[u8]) -> bool {
    let text = String::from_utf8_lossy(statement_text(message)).to_ascii_lowercase();
    text.contains("discard") || text.contains("deallocate")
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    #[test]
    fn messages_are_framed_and_bounded() {
        assert_eq!(next_message(b"Q\0\0\0\x05", 100), Ok(None));
        assert_eq!(next_message(b"Q\0\0\0\x05\0", 100), Ok(Some(6)));
        assert!(next_message(b"Q\0\0\0\x03", 100).is_err());
        assert!(next_message(b"Q\0\0\x10\0", 100).is_err());
    }

    #[test]
    fn what_binds_a_client_to_its_session() {
        let query = |sql: &str| {
            let mut m = BytesMut::new();
            postgres_protocol::message::frontend::query(sql, &mut m).unwrap();
            m.to_vec()
        };
        assert!(binds_session(&query("  LISTEN ch")));
        assert!(binds_session(&query("prepare p as select 1")));
        assert!(binds_session(&query(
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1"
        )));
        assert!(binds_session(&query("/* c */ prepare p as select 1")));
        assert!(binds_session(&query("SELECT 1; LISTEN ch")));
        assert!(binds_session(&query("CREATE TEMP TABLE t (x int)")));
        assert!(binds_session(&query("SELECT pg_advisory_lock(1)")));
        assert!(binds_session(&query("SET statement_timeout = '1s'")));
        assert!(!binds_session(&query("SET TimeZone = 'UTC'")), "carried");
        assert!(!binds_session(&query("SET LOCAL statement_timeout = '1s'")));
        assert!(!binds_session(&query("UPDATE t SET x = 1")));
        assert!(!binds_session(&query("SELECT 1")));
        let mut parse = BytesMut::new();
        postgres_protocol::message::frontend::parse("s1", "SELECT 1", None, &mut parse).unwrap();
        assert!(!binds_session(&parse), "carried, not pinned");
        parse.clear();
        postgres_protocol::message::frontend::parse("", "SELECT 1", None, &mut parse).unwrap();
        assert!(!binds_session(&parse));
    }
}
