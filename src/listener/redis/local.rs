//! The commands the Redis listener answers itself, never forwarded: `AUTH`
//! and `HELLO` (lessor authenticates its clients, and its connections speak
//! the upstream's protocol version), `QUIT` and `RESET` (they concern the
//! client, not the pooled connection), with redis-server 7.0's replies.

use crate::config::ClientAuth;

/// Redis's reply to a command before authentication.
pub(super) const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const HELLO_NOAUTH: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
const NOPROTO: &[u8] = b"-NOPROTO unsupported protocol version\r\n";

/// What a client has set for itself, applied to whichever connection
/// serves its next batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ClientState {
    /// Authenticated to lessor (always, under `trust`).
    pub authed: bool,
    /// Its `SELECT`ed db.
    pub db: u32,
    /// Its `CLIENT SETNAME` (or `HELLO ... SETNAME`) name.
    pub name: Option<Vec<u8>>,
    /// `READONLY` (cluster replicas).
    pub readonly: bool,
}

/// Who may connect, and how the listener answers `HELLO`.
pub(super) struct Door<'a> {
    pub auth: ClientAuth,
    pub password: Option<&'a str>,
    /// An ACL username accepted besides `default`.
    pub username: Option<&'a str>,
    /// The upstream connections' RESP version.
    pub resp: u8,
    /// The db a fresh client starts on (the upstream's `redis.db`).
    pub db: u32,
}

/// What a local command did.
pub(super) enum Answer {
    /// Reply with these bytes.
    Reply(Vec<u8>),
    /// `HELLO` accepted: the reply needs the upstream's version.
    Hello { id: u64 },
    /// `QUIT`: `+OK`, then the client is closed.
    Quit,
}

impl Door<'_> {
    /// Whether `name` is answered here; `args` are its whole arguments.
    pub(super) fn answers(name: &str) -> bool {
        matches!(name, "AUTH" | "HELLO" | "QUIT" | "RESET")
    }

    /// Answers a local command (`args[0]` is its name, upper-cased by the
    /// caller's test), changing `state` as Redis would change the client.
    pub(super) fn answer(&self, args: &[Vec<u8>], state: &mut ClientState, id: u64) -> Answer {
        let name = args
            .first()
            .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
            .unwrap_or_default();
        match name.as_str() {
            "QUIT" => Answer::Quit,
            "RESET" if args.len() == 1 => {
                *state = ClientState {
                    authed: self.auth == ClientAuth::Trust,
                    db: self.db,
                    name: None,
                    readonly: false,
                };
                Answer::Reply(b"+RESET\r\n".to_vec())
            }
            "RESET" => Answer::Reply(arity("reset")),
            "AUTH" => {
                let (user, pass) = match args {
                    [_, pass] => (&b"default"[..], pass),
                    [_, user, pass] => (&user[..], pass),
                    [_] => return Answer::Reply(arity("auth")),
                    _ => return Answer::Reply(b"-ERR syntax error\r\n".to_vec()),
                };
                if self.check(user, pass) {
                    state.authed = true;
                    Answer::Reply(b"+OK\r\n".to_vec())
                } else {
                    Answer::Reply(WRONGPASS.to_vec())
                }
            }
            _ => self.hello(args, state, id),
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`, checked in
    /// Redis's order.
    fn hello(&self, args: &[Vec<u8>], state: &mut ClientState, id: u64) -> Answer {
        if let Some(version) = args.get(1) {
            let version = crate::protocol::redis::command::string2ll(version);
            match version {
                None => {
                    return Answer::Reply(
                        b"-ERR Protocol version is not an integer or out of range\r\n".to_vec(),
                    );
                }
                // Only the version lessor's connections speak.
                Some(v) if v != i64::from(self.resp) => return Answer::Reply(NOPROTO.to_vec()),
                Some(_) => {}
            }
        }
        let mut credentials = None;
        let mut name = None;
        let mut j = 2;
        while j < args.len() {
            let option = String::from_utf8_lossy(&args[j]).to_ascii_uppercase();
            let more = args.len() - 1 - j;
            if option == "AUTH" && more >= 2 {
                credentials = Some((&args[j + 1], &args[j + 2]));
                j += 3;
            } else if option == "SETNAME" && more >= 1 {
                let candidate = &args[j + 1];
                if !valid_name(candidate) {
                    return Answer::Reply(
                        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
                            .to_vec(),
                    );
                }
                name = Some(candidate.clone());
                j += 2;
            } else {
                let mut reply = b"-ERR Syntax error in HELLO option '".to_vec();
                reply.extend(args[j].iter().filter(|b| !b.is_ascii_control()));
                reply.extend_from_slice(b"'\r\n");
                return Answer::Reply(reply);
            }
        }
        if let Some((user, pass)) = credentials {
            if !self.check(user, pass) {
                return Answer::Reply(WRONGPASS.to_vec());
            }
            state.authed = true;
        }
        if !state.authed {
            return Answer::Reply(HELLO_NOAUTH.to_vec());
        }
        if let Some(name) = name {
            // An empty name clears it, as in Redis.
            state.name = (!name.is_empty()).then_some(name);
        }
        Answer::Hello { id }
    }

    /// Whether `user` and `pass` open this door (anything does under
    /// `trust`: a client keeps the password it was configured with).
    fn check(&self, user: &[u8], pass: &[u8]) -> bool {
        if self.auth == ClientAuth::Trust {
            return true;
        }
        let user_ok = user == b"default" || self.username.is_some_and(|u| u.as_bytes() == user);
        let expected = self.password.unwrap_or_default().as_bytes();
        // Compared in full whatever the first difference.
        let same = expected.len() == pass.len()
            && expected
                .iter()
                .zip(pass)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        user_ok && same
    }

    /// `HELLO`'s reply: the connection's properties, as a map in RESP3 and
    /// a flat array in RESP2.
    pub(super) fn hello_reply(&self, id: u64, version: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        let head = if self.resp == 3 { b'%' } else { b'*' };
        let pairs = 7;
        let count = if self.resp == 3 { pairs } else { pairs * 2 };
        out.push(head);
        out.extend_from_slice(format!("{count}\r\n").as_bytes());
        let bulk = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(format!("${}\r\n{s}\r\n", s.len()).as_bytes());
        };
        for (key, value) in [("server", "redis"), ("version", version)] {
            bulk(&mut out, key);
            bulk(&mut out, value);
        }
        bulk(&mut out, "proto");
        out.extend_from_slice(format!(":{}\r\n", self.resp).as_bytes());
        bulk(&mut out, "id");
        out.extend_from_slice(format!(":{id}\r\n").as_bytes());
        for (key, value) in [("mode", "standalone"), ("role", "master")] {
            bulk(&mut out, key);
            bulk(&mut out, value);
        }
        bulk(&mut out, "modules");
        out.extend_from_slice(b"*0\r\n");
        out
    }
}

/// Redis's arity error for `command`.
fn arity(command: &str) -> Vec<u8> {
    format!("-ERR wrong number of arguments for '{command}' command\r\n").into_bytes()
}

/// A client name Redis accepts: printable ASCII without spaces.
pub(super) fn valid_name(name: &[u8]) -> bool {
    name.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn door(auth: ClientAuth) -> Door<'static> {
        Door {
            auth,
            password: Some("s3cret"),
            username: Some("app"),
            resp: 2,
            db: 0,
        }
    }

    fn args(words: &[&str]) -> Vec<Vec<u8>> {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    fn reply(answer: Answer) -> String {
        match answer {
            Answer::Reply(bytes) => String::from_utf8(bytes).unwrap(),
            Answer::Hello { .. } => "HELLO".into(),
            Answer::Quit => "QUIT".into(),
        }
    }

    #[test]
    fn auth_is_answered_as_redis_answers_it() {
        let d = door(ClientAuth::Password);
        let mut state = ClientState::default();
        assert!(reply(d.answer(&args(&["AUTH"]), &mut state, 1)).starts_with("-ERR wrong number"));
        assert_eq!(
            reply(d.answer(&args(&["AUTH", "a", "b", "c"]), &mut state, 1)),
            "-ERR syntax error\r\n"
        );
        assert!(reply(d.answer(&args(&["auth", "nope"]), &mut state, 1)).starts_with("-WRONGPASS"));
        assert!(!state.authed);
        assert!(
            reply(d.answer(&args(&["AUTH", "other", "s3cret"]), &mut state, 1))
                .starts_with("-WRONGPASS")
        );
        assert_eq!(
            reply(d.answer(&args(&["AUTH", "app", "s3cret"]), &mut state, 1)),
            "+OK\r\n"
        );
        assert!(state.authed);
    }

    #[test]
    fn hello_checks_version_then_credentials_then_names() {
        let d = door(ClientAuth::Password);
        let mut state = ClientState::default();
        assert!(reply(d.answer(&args(&["HELLO", "3"]), &mut state, 1)).starts_with("-NOPROTO"));
        assert!(
            reply(d.answer(&args(&["HELLO", "x"]), &mut state, 1))
                .starts_with("-ERR Protocol version")
        );
        assert!(
            reply(d.answer(&args(&["HELLO", "2"]), &mut state, 1)).starts_with("-NOAUTH HELLO")
        );
        assert!(
            reply(d.answer(&args(&["HELLO", "2", "SETNAME"]), &mut state, 1))
                .starts_with("-ERR Syntax error in HELLO option 'SETNAME'")
        );
        assert_eq!(
            reply(d.answer(
                &args(&[
                    "HELLO", "2", "AUTH", "default", "s3cret", "SETNAME", "worker"
                ]),
                &mut state,
                1
            )),
            "HELLO"
        );
        assert!(state.authed);
        assert_eq!(state.name.as_deref(), Some(&b"worker"[..]));
        let hello = String::from_utf8(d.hello_reply(7, "7.0.15")).unwrap();
        assert!(hello.starts_with("*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n"));
        assert!(hello.contains("$5\r\nproto\r\n:2\r\n$2\r\nid\r\n:7\r\n"));
    }

    #[test]
    fn reset_forgets_what_the_client_set() {
        let d = door(ClientAuth::Password);
        let mut state = ClientState {
            authed: true,
            db: 3,
            name: Some(b"x".to_vec()),
            readonly: true,
        };
        assert_eq!(
            reply(d.answer(&args(&["RESET"]), &mut state, 1)),
            "+RESET\r\n"
        );
        assert_eq!(state, ClientState::default());
    }
}
