//! The client side of a Redis connection, read the way redis-server reads
//! it, so that lessor and the server never disagree about where a command
//! ends or what it is. A request that starts with `*` is an array of bulk
//! strings; anything else is an inline command, split by Redis's rules
//! (quotes, `\xHH` and backslash escapes, and the blanks C's `isspace`
//! knows, which are more than the ones that end an unquoted word).
//!
//! The rules, as redis-server 7.0 applies them:
//! - an inline line ends at `\n` (one `\r` before it is dropped); a NUL
//!   before the `\n` means Redis never finds the line's end, and a line
//!   longer than 64 KiB is a protocol error;
//! - an array's count and each bulk length end at the first `\r`, and the
//!   byte after that `\r` is skipped whatever it is; the two bytes after a
//!   bulk payload are skipped whatever they are;
//! - numbers are Redis's `string2ll`: an optional `-`, no `+`, no leading
//!   zeros, at most 20 characters; a count over `i32::MAX` is an error and
//!   a count of zero or less is an empty request (no reply at all);
//! - a bulk length must be 0..=512 MiB, and an array element anything but
//!   `$` is an error.
//!
//! Where Redis would wait forever (a NUL in a line) lessor says protocol
//! error at once, and it refuses inline lines over 64 KiB where Redis,
//! depending on how its reads fall, may accept a few KiB more: in both
//! cases lessor is the stricter, and nothing of the request was sent.
//!
//! Memory is bounded: one line of at most 64 KiB (an inline command, which
//! is held whole until it ends anyway), and a few short captured
//! arguments. Bulk payloads are skipped by length, not scanned.

use std::fmt;

/// Redis's `PROTO_INLINE_MAX_SIZE`: the longest inline line, and the
/// longest count or length line.
pub(crate) const INLINE_MAX: usize = 64 * 1024;
/// Redis's default `proto-max-bulk-len`.
const BULK_MAX: u64 = 512 * 1024 * 1024;
/// Longer names are none lessor acts on before a command is whole: a
/// command whose first bulk string is longer is forwarded as it arrives.
pub(crate) const NAME_MAX: u64 = 32;
/// Arguments captured per command (its name and the first ones after it),
/// each cut to `CAPTURE_BYTES`.
const CAPTURE_ARGS: usize = 4;
const CAPTURE_BYTES: usize = 64;

/// What Redis calls a protocol error (it answers `-ERR Protocol error: ...`
/// and closes the connection), and lessor's own limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    /// An inline line over 64 KiB.
    #[error("Protocol error: too big inline request")]
    InlineTooBig,
    /// An inline line whose quotes do not close (or a closing quote not
    /// followed by a blank).
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    /// An array count line over 64 KiB.
    #[error("Protocol error: too big mbulk count string")]
    CountTooBig,
    /// An array count that is not a number, or over `i32::MAX`.
    #[error("Protocol error: invalid multibulk length")]
    BadCount,
    /// A bulk length line over 64 KiB.
    #[error("Protocol error: too big bulk count string")]
    LengthTooBig,
    /// An array element that is not a bulk string.
    #[error("Protocol error: expected '$', got '{}'", char::from(*.0).escape_debug())]
    ExpectedBulk(u8),
    /// A bulk length that is not a number, negative, or over 512 MiB.
    #[error("Protocol error: invalid bulk length")]
    BadLength,
    /// Before authentication, an array of more than 10 elements (Redis's
    /// own limit for unauthenticated clients).
    #[error("Protocol error: unauthenticated multibulk length")]
    UnauthenticatedCount,
    /// Before authentication, a request that grows past what an
    /// unauthenticated client may send (Redis: a bulk string over 16 KiB).
    #[error("Protocol error: unauthenticated bulk length")]
    UnauthenticatedLength,
    /// A NUL byte inside a line: Redis would never find the line's end.
    #[error("Protocol error: a NUL byte inside a request line")]
    Nul,
    /// A bulk string over lessor's `redis.max_frame`.
    #[error("bulk string of {len} bytes exceeds redis.max_frame ({max} bytes)")]
    TooLarge {
        /// The declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
}

/// One request Redis will read as a unit: a command, or an empty request
/// (`argc == 0`: a blank line or an array of count zero or less), which
/// Redis skips without a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Command {
    /// Offset just past its last byte in the chunk that ended it.
    pub end: usize,
    /// How many arguments, the name included.
    pub argc: u64,
    /// The first arguments, each cut to 64 bytes.
    pub args: Vec<Vec<u8>>,
}

impl Command {
    /// The command's name, upper-cased (empty for an empty request).
    pub(crate) fn name(&self) -> String {
        self.arg_upper(0).unwrap_or_default()
    }

    /// Argument `i` after the name, upper-cased, if captured.
    pub(crate) fn arg(&self, i: usize) -> Option<String> {
        self.arg_upper(i + 1)
    }

    /// Argument `i` after the name as Redis compares an option (`ON`,
    /// `OFF`, `SKIP`) with `strcasecmp`: up to its first NUL, upper-cased.
    pub(crate) fn option(&self, i: usize) -> Option<String> {
        self.args.get(i + 1).map(|a| {
            let end = a.iter().position(|&b| b == 0).unwrap_or(a.len());
            String::from_utf8_lossy(&a[..end]).to_ascii_uppercase()
        })
    }

    fn arg_upper(&self, i: usize) -> Option<String> {
        self.args
            .get(i)
            .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
    }
}

/// What is known of the command being read, before it is whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Head {
    /// Between requests.
    Between,
    /// Its name is not known yet.
    Unknown,
    /// Its name is longer than any name lessor acts on early.
    Long,
    /// Its name, upper-cased.
    Named(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a request's first byte.
    Start,
    /// Reading an inline line up to `\n`.
    Inline,
    /// Reading an array's count up to `\r`.
    Count,
    /// Reading a bulk length line up to `\r`.
    Length,
    /// Skipping bytes Redis skips unread, then going on.
    Skip(u8, After),
    /// Inside a bulk payload: this many bytes left.
    Payload(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// The count line ended: this many elements (0 or less: none).
    Count(i64),
    /// A length line ended: a payload of this many bytes.
    Length(u64),
    /// A bulk string ended.
    Element,
}

/// Reads one client's byte stream into commands, incrementally.
#[derive(Clone)]
pub(crate) struct CommandReader {
    state: State,
    /// The current line (inline command, count or length), without its end.
    line: Vec<u8>,
    /// Elements of the current array still to come.
    left: u64,
    argc: u64,
    args: Vec<Vec<u8>>,
    /// The current element is captured into `args`.
    capturing: bool,
    /// The current element is the name.
    in_name: bool,
    /// The declared length of the current element.
    element_len: u64,
    max_frame: u64,
}

impl fmt::Debug for CommandReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandReader")
            .field("state", &self.state)
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

impl CommandReader {
    /// A reader refusing bulk strings over `max_frame` bytes.
    pub(crate) fn new(max_frame: u64) -> Self {
        Self {
            state: State::Start,
            line: Vec::new(),
            left: 0,
            argc: 0,
            args: Vec::new(),
            capturing: false,
            in_name: false,
            element_len: 0,
            max_frame,
        }
    }

    /// Whether the bytes so far end exactly between requests.
    pub(crate) fn at_boundary(&self) -> bool {
        self.state == State::Start
    }

    /// What is known of the request being read.
    pub(crate) fn head(&self) -> Head {
        let name = || {
            Head::Named(
                self.args
                    .first()
                    .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
                    .unwrap_or_default(),
            )
        };
        let long = |len: u64| {
            if len > NAME_MAX {
                Head::Long
            } else {
                Head::Unknown
            }
        };
        match self.state {
            State::Start => Head::Between,
            State::Inline | State::Count | State::Skip(_, After::Count(_)) => Head::Unknown,
            _ if !self.in_name => name(),
            State::Length => Head::Unknown,
            State::Skip(_, After::Length(len)) => long(len),
            State::Payload(_) => long(self.element_len),
            State::Skip(_, After::Element) => name(),
        }
    }

    /// Consumes `buf`, calling `on_command` for each request that ends in
    /// it. After an error the reader's state is unspecified: Redis closes
    /// the connection there, and so does lessor.
    pub(crate) fn feed(
        &mut self,
        buf: &[u8],
        mut on_command: impl FnMut(Command),
    ) -> Result<(), ProtocolError> {
        let mut i = 0;
        while i < buf.len() {
            match self.state {
                State::Start => {
                    self.line.clear();
                    self.args.clear();
                    self.argc = 0;
                    if buf[i] == b'*' {
                        i += 1;
                        self.state = State::Count;
                    } else {
                        self.state = State::Inline;
                    }
                }
                State::Inline => {
                    let rest = &buf[i..];
                    let found = rest.iter().position(|&b| b == b'\n' || b == 0);
                    let take = found.unwrap_or(rest.len());
                    if self.line.len() + take > INLINE_MAX {
                        return Err(ProtocolError::InlineTooBig);
                    }
                    self.line.extend_from_slice(&rest[..take]);
                    i += take;
                    match found {
                        None => {}
                        Some(n) if rest[n] == 0 => return Err(ProtocolError::Nul),
                        Some(_) => {
                            i += 1;
                            let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
                            let argv = split_args(line).ok_or(ProtocolError::UnbalancedQuotes)?;
                            self.argc = argv.len() as u64;
                            self.args = argv
                                .into_iter()
                                .take(CAPTURE_ARGS)
                                .map(|mut a| {
                                    a.truncate(CAPTURE_BYTES);
                                    a
                                })
                                .collect();
                            self.finish(i, &mut on_command);
                        }
                    }
                }
                State::Count | State::Length => {
                    let rest = &buf[i..];
                    let found = rest.iter().position(|&b| b == b'\r' || b == 0);
                    let take = found.unwrap_or(rest.len());
                    // Redis measures from the request's (or element's)
                    // first byte: the `*` is not in `line`.
                    let first = usize::from(self.state == State::Count);
                    if first + self.line.len() + take > INLINE_MAX {
                        return Err(if self.state == State::Count {
                            ProtocolError::CountTooBig
                        } else {
                            ProtocolError::LengthTooBig
                        });
                    }
                    self.line.extend_from_slice(&rest[..take]);
                    i += take;
                    match found {
                        None => {}
                        Some(n) if rest[n] == 0 => return Err(ProtocolError::Nul),
                        Some(_) => {
                            i += 1;
                            let after = self.line_done()?;
                            self.state = State::Skip(1, after);
                        }
                    }
                }
                State::Skip(left, after) => {
                    let take = usize::from(left).min(buf.len() - i);
                    i += take;
                    let left = left - take as u8;
                    if left > 0 {
                        self.state = State::Skip(left, after);
                    } else {
                        self.skipped(after, i, &mut on_command);
                    }
                }
                State::Payload(left) => {
                    let take = left.min((buf.len() - i) as u64) as usize;
                    if self.capturing
                        && let Some(arg) = self.args.last_mut()
                    {
                        let room = CAPTURE_BYTES.saturating_sub(arg.len());
                        arg.extend_from_slice(&buf[i..i + take.min(room)]);
                    }
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::Skip(2, After::Element)
                    } else {
                        State::Payload(left)
                    };
                }
            }
        }
        Ok(())
    }

    /// A count or length line ended (at its `\r`).
    fn line_done(&mut self) -> Result<After, ProtocolError> {
        let line = std::mem::take(&mut self.line);
        let after = if self.state == State::Count {
            match string2ll(&line) {
                Some(n) if n <= i64::from(i32::MAX) => After::Count(n),
                _ => return Err(ProtocolError::BadCount),
            }
        } else {
            match line.split_first() {
                Some((b'$', digits)) => match string2ll(digits) {
                    Some(n) if (0..=BULK_MAX as i64).contains(&n) => {
                        if n as u64 > self.max_frame {
                            return Err(ProtocolError::TooLarge {
                                len: n as u64,
                                max: self.max_frame,
                            });
                        }
                        After::Length(n as u64)
                    }
                    _ => return Err(ProtocolError::BadLength),
                },
                Some((&b, _)) => return Err(ProtocolError::ExpectedBulk(b)),
                None => return Err(ProtocolError::ExpectedBulk(b'\r')),
            }
        };
        self.line = line;
        self.line.clear();
        Ok(after)
    }

    /// Skipped bytes are behind: go on with what the line said.
    fn skipped(&mut self, after: After, i: usize, on_command: &mut impl FnMut(Command)) {
        match after {
            After::Count(n) if n <= 0 => self.finish(i, on_command),
            After::Count(n) => {
                self.left = n as u64;
                self.argc = n as u64;
                self.in_name = true;
                self.state = State::Length;
            }
            After::Length(len) => {
                self.element_len = len;
                self.capturing = self.args.len() < CAPTURE_ARGS
                    && (self.argc - self.left) as usize == self.args.len();
                if self.capturing {
                    self.args.push(Vec::new());
                }
                self.state = if len == 0 {
                    State::Skip(2, After::Element)
                } else {
                    State::Payload(len)
                };
            }
            After::Element => {
                self.in_name = false;
                self.capturing = false;
                self.left -= 1;
                if self.left == 0 {
                    self.finish(i, on_command);
                } else {
                    self.state = State::Length;
                }
            }
        }
    }

    fn finish(&mut self, end: usize, on_command: &mut impl FnMut(Command)) {
        self.state = State::Start;
        self.in_name = false;
        on_command(Command {
            end,
            argc: self.argc,
            args: std::mem::take(&mut self.args),
        });
        self.line.clear();
        if self.line.capacity() > 4096 {
            self.line.shrink_to(4096);
        }
    }
}

/// Every argument of one whole request as [`CommandReader`] accepted it
/// (its bytes from its first to its `end`), uncut: for the few commands
/// lessor answers itself. `None` when it is not one well-formed request.
pub(crate) fn full_args(request: &[u8]) -> Option<Vec<Vec<u8>>> {
    if request.first() != Some(&b'*') {
        let line = request.strip_suffix(b"\n").unwrap_or(request);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        return split_args(line);
    }
    // A number up to the first `\r`; the byte after it is skipped.
    let number = |at: usize| -> Option<(i64, usize)> {
        let cr = at + request.get(at..)?.iter().position(|&b| b == b'\r')?;
        Some((string2ll(&request[at..cr])?, cr + 2))
    };
    let (count, mut at) = number(1)?;
    let mut args = Vec::with_capacity(usize::try_from(count).ok()?.min(64));
    for _ in 0..count {
        if request.get(at) != Some(&b'$') {
            return None;
        }
        let (len, start) = number(at + 1)?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        args.push(request.get(start..end)?.to_vec());
        at = end + 2;
    }
    Some(args)
}

/// C's `isspace` in the C locale.
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Splits an inline line into arguments as Redis's `sdssplitargs` does.
/// `None`: unbalanced quotes. The line holds no NUL (a NUL ends Redis's
/// view of the line before this is reached); past its end reads as NUL,
/// as C's terminator does.
pub(crate) fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let mut argv = Vec::new();
    let mut i = 0;
    loop {
        while at(i) != 0 && is_blank(at(i)) {
            i += 1;
        }
        if at(i) == 0 {
            return Some(argv);
        }
        let mut word = Vec::new();
        let (mut double, mut single, mut done) = (false, false, false);
        while !done {
            let c = at(i);
            if double {
                if c == b'\\'
                    && at(i + 1) == b'x'
                    && at(i + 2).is_ascii_hexdigit()
                    && at(i + 3).is_ascii_hexdigit()
                {
                    word.push(hex(at(i + 2)) * 16 + hex(at(i + 3)));
                    i += 3;
                } else if c == b'\\' && at(i + 1) != 0 {
                    i += 1;
                    word.push(match at(i) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    // A closing quote is followed by a blank or the end.
                    if at(i + 1) != 0 && !is_blank(at(i + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    word.push(c);
                }
            } else if single {
                if c == b'\\' && at(i + 1) == b'\'' {
                    i += 1;
                    word.push(b'\'');
                } else if c == b'\'' {
                    if at(i + 1) != 0 && !is_blank(at(i + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    word.push(c);
                }
            } else {
                // Fewer bytes end an unquoted word than are skipped before
                // one: `\v` and `\f` are part of it.
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => double = true,
                    b'\'' => single = true,
                    _ => word.push(c),
                }
            }
            if at(i) != 0 {
                i += 1;
            }
        }
        argv.push(word);
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// Redis's `string2ll`: an optional `-`, then `0` alone or digits without
/// a leading zero, at most 20 characters in all, within `i64`.
pub(crate) fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        (v <= i64::MAX as u64 + 1).then(|| (v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

#[cfg(test)]
mod tests;
