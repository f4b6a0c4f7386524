//! Named prepared statements in transaction mode. Consecutive transactions
//! of a client land on different server connections, so a statement a
//! client prepared may not exist where its next Bind goes. lessor keeps
//! each client's statements, prepares them on the server under names of its
//! own (one per distinct statement text and parameter types, shared by
//! every client), and prepares them again, just before use, on a server
//! connection that lacks them. The answers to what lessor injected
//! (ParseComplete, CloseComplete) are taken out of the reply stream, so the
//! client sees exactly the replies to what it sent.
//!
//! Every injected Parse is preceded by a Close of the same name (closing a
//! statement that does not exist is no error), so a connection's record of
//! what it holds may err towards "absent" without harm; it is cleared
//! whenever a reset (`DISCARD ALL`) may have dropped statements.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use bytes::{BufMut, BytesMut};

/// Distinct statements a listener names; past it, a client that prepares
/// a new one keeps its server connection instead. Each costs a 32-byte
/// digest and a number, not its text: about 5 MiB at the bound.
const STATEMENTS_MAX: usize = 100_000;

/// The names lessor gives statements, one per distinct text and types,
/// shared by the listener's clients (keyed by a SHA-256 of the Parse body:
/// the text is the clients' to keep).
#[derive(Debug, Default)]
pub(super) struct Names(Mutex<HashMap<[u8; 32], u64>>);

impl Names {
    /// The server name of a statement (its Parse body after the name), or
    /// `None` when the listener already names too many.
    fn name(&self, key: &[u8]) -> Option<String> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(key).into();
        let mut names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let next = names.len() as u64 + 1;
        if let Some(id) = names.get(&digest) {
            return Some(format!("lessor_{id}"));
        }
        if names.len() >= STATEMENTS_MAX {
            return None;
        }
        names.insert(digest, next);
        Some(format!("lessor_{next}"))
    }
}

/// One statement of a client: its server name and the Parse that creates
/// it there.
#[derive(Debug, Clone)]
struct Statement {
    server: String,
    parse: BytesMut,
}

/// What a reply the server will send means to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// A ParseComplete (`1`) or CloseComplete (`3`): forwarded, or taken
    /// out when lessor sent what it answers; a confirmed Parse records its
    /// name on the connection.
    Reply {
        tag: u8,
        swallow: bool,
        prepared: Option<String>,
    },
    /// A Sync or Query: its ReadyForQuery ends the batch; replies still
    /// pending before it were skipped by an error.
    Ready,
}

/// A client's statements, and the rewriting of what it sends and of what
/// the server answers.
#[derive(Debug, Default)]
pub(super) struct Prepared {
    statements: HashMap<String, Statement>,
    pending: VecDeque<Pending>,
    /// Names sent to the server connection of this hold, not yet
    /// confirmed: a Bind right after its Parse needs no second Parse.
    sent: HashSet<String>,
    /// The filter's place in the server stream: header bytes seen, body
    /// bytes left, and whether the current message is dropped.
    head: Vec<u8>,
    left: usize,
    dropping: bool,
}

/// Why a client message could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub(super) enum RewriteError {
    /// The listener names too many statements: pin the client instead.
    #[error("too many distinct prepared statements")]
    TooMany,
    /// A malformed message.
    #[error("malformed {0} message")]
    Malformed(char),
    /// The server's replies did not match what was sent.
    #[error("the server's replies do not match the requests")]
    Lost,
}

fn cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = body.iter().position(|&b| b == 0)?;
    Some((&body[..n], &body[n + 1..]))
}

fn message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.extend_from_slice(body);
}

fn close_statement(out: &mut BytesMut, name: &str) {
    let mut body = vec![b'S'];
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    message(out, b'C', &body);
}

impl Prepared {
    /// A new hold begins on another connection: nothing is pending there.
    pub(super) fn begin_hold(&mut self) {
        self.pending.clear();
        self.sent.clear();
        self.head.clear();
        self.left = 0;
        self.dropping = false;
    }

    /// Appends what the server must get for one client `message`,
    /// rewritten to lessor's names, with what the connection lacks
    /// prepared first. `held`: what the connection is known to hold.
    pub(super) fn rewrite(
        &mut self,
        names: &Names,
        held: &mut HashSet<String>,
        message_bytes: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), RewriteError> {
        let tag = message_bytes[0];
        let body = &message_bytes[5..];
        match tag {
            b'P' => {
                let (name, rest) = cstr(body).ok_or(RewriteError::Malformed('P'))?;
                if name.is_empty() {
                    self.pending.push_back(Pending::Reply {
                        tag: b'1',
                        swallow: false,
                        prepared: None,
                    });
                    out.extend_from_slice(message_bytes);
                    return Ok(());
                }
                let client = String::from_utf8_lossy(name).into_owned();
                if self.statements.contains_key(&client) {
                    // PostgreSQL refuses a second Parse of a name (42P05):
                    // the server says so, about the statement it holds.
                    let server = self.ensure(held, name, out).unwrap_or_default();
                    let mut b = server.into_bytes();
                    b.push(0);
                    b.extend_from_slice(rest);
                    message(out, b'P', &b);
                    self.pending.push_back(Pending::Reply {
                        tag: b'1',
                        swallow: false,
                        prepared: None,
                    });
                    return Ok(());
                }
                let Some(server) = names.name(rest) else {
                    // Past the bound: sent as it is (the client keeps this
                    // connection from now on).
                    self.pending.push_back(Pending::Reply {
                        tag: b'1',
                        swallow: false,
                        prepared: None,
                    });
                    out.extend_from_slice(message_bytes);
                    return Err(RewriteError::TooMany);
                };
                let mut parse_body = server.as_bytes().to_vec();
                parse_body.push(0);
                parse_body.extend_from_slice(rest);
                let mut parse = BytesMut::new();
                message(&mut parse, b'P', &parse_body);
                self.statements.insert(
                    client,
                    Statement {
                        server: server.clone(),
                        parse: parse.clone(),
                    },
                );
                // Close first: the name may exist there already.
                self.inject_close(held, &server, out);
                out.extend_from_slice(&parse);
                self.pending.push_back(Pending::Reply {
                    tag: b'1',
                    swallow: false,
                    prepared: Some(server.clone()),
                });
                self.sent.insert(server);
            }
            b'B' => {
                let (portal, rest) = cstr(body).ok_or(RewriteError::Malformed('B'))?;
                let (name, rest) = cstr(rest).ok_or(RewriteError::Malformed('B'))?;
                match self.ensure(held, name, out) {
                    None => out.extend_from_slice(message_bytes),
                    Some(server) => {
                        let mut b = portal.to_vec();
                        b.push(0);
                        b.extend_from_slice(server.as_bytes());
                        b.push(0);
                        b.extend_from_slice(rest);
                        message(out, b'B', &b);
                    }
                }
            }
            b'D' | b'C' if body.first() == Some(&b'S') => {
                let (name, _) = cstr(&body[1..]).ok_or(RewriteError::Malformed(tag as char))?;
                let server = if tag == b'C' {
                    // Closed for this client; closed on the server too (it
                    // is prepared again wherever another client needs it).
                    let client = String::from_utf8_lossy(name).into_owned();
                    self.statements.remove(&client).map(|s| {
                        held.remove(&s.server);
                        self.sent.remove(&s.server);
                        s.server
                    })
                } else {
                    self.ensure(held, name, out)
                };
                match server {
                    None => out.extend_from_slice(message_bytes),
                    Some(server) => {
                        let mut b = vec![b'S'];
                        b.extend_from_slice(server.as_bytes());
                        b.push(0);
                        message(out, tag, &b);
                    }
                }
                if tag == b'C' {
                    self.pending.push_back(Pending::Reply {
                        tag: b'3',
                        swallow: false,
                        prepared: None,
                    });
                }
            }
            b'C' => {
                out.extend_from_slice(message_bytes);
                self.pending.push_back(Pending::Reply {
                    tag: b'3',
                    swallow: false,
                    prepared: None,
                });
            }
            b'S' | b'Q' => {
                out.extend_from_slice(message_bytes);
                self.pending.push_back(Pending::Ready);
            }
            _ => out.extend_from_slice(message_bytes),
        }
        Ok(())
    }

    /// The server name of the client's statement `name`, prepared on this
    /// connection first when it lacks it; `None` for the unnamed statement
    /// or one the client never prepared (sent as it is, for the server's
    /// own error).
    fn ensure(
        &mut self,
        held: &mut HashSet<String>,
        name: &[u8],
        out: &mut BytesMut,
    ) -> Option<String> {
        if name.is_empty() {
            return None;
        }
        let client = String::from_utf8_lossy(name);
        let statement = self.statements.get(client.as_ref())?.clone();
        if !held.contains(&statement.server) && !self.sent.contains(&statement.server) {
            self.inject_close(held, &statement.server, out);
            out.extend_from_slice(&statement.parse);
            self.pending.push_back(Pending::Reply {
                tag: b'1',
                swallow: true,
                prepared: Some(statement.server.clone()),
            });
            self.sent.insert(statement.server.clone());
        }
        Some(statement.server)
    }

    fn inject_close(&mut self, held: &mut HashSet<String>, server: &str, out: &mut BytesMut) {
        // Gone from the server once this runs, whatever follows.
        held.remove(server);
        close_statement(out, server);
        self.pending.push_back(Pending::Reply {
            tag: b'3',
            swallow: true,
            prepared: None,
        });
    }

    /// Takes the replies to what lessor injected out of a chunk of the
    /// server's stream; what is left goes to the client. A confirmed
    /// Parse is recorded in `held`. Whether a NotificationResponse began
    /// in the chunk (the one pass that reads every header says so).
    pub(super) fn filter(
        &mut self,
        data: &[u8],
        held: &mut HashSet<String>,
        out: &mut BytesMut,
    ) -> Result<bool, RewriteError> {
        let mut notified = false;
        let mut i = 0;
        while i < data.len() {
            if self.left > 0 {
                let take = self.left.min(data.len() - i);
                if !self.dropping {
                    out.extend_from_slice(&data[i..i + take]);
                }
                self.left -= take;
                i += take;
                continue;
            }
            let want = 5 - self.head.len();
            let take = want.min(data.len() - i);
            self.head.extend_from_slice(&data[i..i + take]);
            i += take;
            if self.head.len() < 5 {
                continue;
            }
            let tag = self.head[0];
            let len = i32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
            let body = usize::try_from(len).unwrap_or(0).saturating_sub(4);
            notified |= tag == b'A';
            self.dropping = self.answer(tag, held)?;
            if !self.dropping {
                out.extend_from_slice(&self.head);
            }
            self.head.clear();
            self.left = body;
        }
        Ok(notified)
    }

    /// Matches one server message against what is pending; whether it is
    /// lessor's to take out.
    fn answer(&mut self, tag: u8, held: &mut HashSet<String>) -> Result<bool, RewriteError> {
        match tag {
            b'1' | b'3' => {
                // Replies skipped by an error come before the next Ready.
                match self.pending.pop_front() {
                    Some(Pending::Reply {
                        tag: want,
                        swallow,
                        prepared,
                    }) if want == tag => {
                        if let Some(name) = prepared {
                            self.sent.remove(&name);
                            held.insert(name);
                        }
                        Ok(swallow)
                    }
                    _ => Err(RewriteError::Lost),
                }
            }
            b'Z' => {
                // Whatever is pending before the batch's end was skipped
                // by an error: those statements are not there.
                while let Some(p) = self.pending.pop_front() {
                    match p {
                        Pending::Ready => break,
                        Pending::Reply {
                            prepared: Some(name),
                            ..
                        } => {
                            self.sent.remove(&name);
                        }
                        Pending::Reply { .. } => {}
                    }
                }
                Ok(false)
            }
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    fn parse(name: &str, sql: &str) -> BytesMut {
        let mut b = BytesMut::new();
        frontend::parse(name, sql, None, &mut b).unwrap();
        b
    }

    fn bind(name: &str) -> BytesMut {
        let mut b = BytesMut::new();
        frontend::bind(
            "",
            name,
            None::<i16>,
            None::<Option<&[u8]>>,
            |_: Option<&[u8]>, _: &mut BytesMut| -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
                Ok(postgres_protocol::IsNull::No)
            },
            None::<i16>,
            &mut b,
        )
        .map_err(|_| ())
        .unwrap();
        b
    }

    fn tags(bytes: &[u8]) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let len = i32::from_be_bytes(bytes[i + 1..i + 5].try_into().unwrap()) as usize;
            let name = match bytes[i] {
                b'P' | b'B' => {
                    let body = &bytes[i + 5..];
                    let body = if bytes[i] == b'B' {
                        cstr(body).unwrap().1
                    } else {
                        body
                    };
                    String::from_utf8_lossy(cstr(body).unwrap().0).into_owned()
                }
                b'C' => String::from_utf8_lossy(cstr(&bytes[i + 6..]).unwrap().0).into_owned(),
                _ => String::new(),
            };
            out.push((bytes[i], name));
            i += 1 + len;
        }
        out
    }

    #[test]
    fn statements_follow_the_client_to_another_connection() {
        let names = Names::default();
        let mut client = Prepared::default();
        let mut first = HashSet::new();
        let mut out = BytesMut::new();
        client
            .rewrite(&names, &mut first, &parse("s1", "SELECT 1"), &mut out)
            .unwrap();
        client
            .rewrite(&names, &mut first, &bind("s1"), &mut out)
            .unwrap();
        client
            .rewrite(&names, &mut first, &b"S\0\0\0\x04"[..], &mut out)
            .unwrap();
        assert_eq!(
            tags(&out),
            [
                (b'C', "lessor_1".into()),
                (b'P', "lessor_1".into()),
                (b'B', "lessor_1".into()),
                (b'S', String::new())
            ]
        );
        // The server answers CloseComplete (taken out), ParseComplete,
        // BindComplete, ReadyForQuery.
        let mut to_client = BytesMut::new();
        client
            .filter(
                b"3\0\0\0\x041\0\0\0\x042\0\0\0\x04Z\0\0\0\x05I",
                &mut first,
                &mut to_client,
            )
            .unwrap();
        assert_eq!(&to_client[..], b"1\0\0\0\x042\0\0\0\x04Z\0\0\0\x05I");
        assert!(first.contains("lessor_1"));
        // The next transaction lands on a connection without it.
        client.begin_hold();
        let mut second = HashSet::new();
        out.clear();
        client
            .rewrite(&names, &mut second, &bind("s1"), &mut out)
            .unwrap();
        assert_eq!(
            tags(&out),
            [
                (b'C', "lessor_1".into()),
                (b'P', "lessor_1".into()),
                (b'B', "lessor_1".into())
            ]
        );
        to_client.clear();
        client
            .filter(
                b"3\0\0\0\x041\0\0\0\x042\0\0\0\x04",
                &mut second,
                &mut to_client,
            )
            .unwrap();
        assert_eq!(
            &to_client[..],
            b"2\0\0\0\x04",
            "only the client's own reply"
        );
        // And a connection that has it gets the Bind alone.
        out.clear();
        client
            .rewrite(&names, &mut first, &bind("s1"), &mut out)
            .unwrap();
        assert_eq!(tags(&out), [(b'B', "lessor_1".into())]);
    }

    #[test]
    fn an_error_skips_to_the_sync_and_leaves_nothing_recorded() {
        let names = Names::default();
        let mut client = Prepared::default();
        let mut held = HashSet::new();
        let mut out = BytesMut::new();
        client
            .rewrite(&names, &mut held, &parse("s1", "SELEC oops"), &mut out)
            .unwrap();
        client
            .rewrite(&names, &mut held, &b"S\0\0\0\x04"[..], &mut out)
            .unwrap();
        let mut to_client = BytesMut::new();
        let error = b"E\0\0\0\x05\0";
        let mut reply = b"3\0\0\0\x04".to_vec();
        reply.extend_from_slice(error);
        reply.extend_from_slice(b"Z\0\0\0\x05I");
        client.filter(&reply, &mut held, &mut to_client).unwrap();
        assert!(held.is_empty());
        assert_eq!(&to_client[..6], error);
    }

    #[test]
    fn a_reply_nothing_asked_for_is_lost() {
        let mut client = Prepared::default();
        let mut held = HashSet::new();
        let mut out = BytesMut::new();
        assert!(client.filter(b"1\0\0\0\x04", &mut held, &mut out).is_err());
    }
}
