//! An incremental scanner of Redis replies: it finds where each frame ends
//! in a byte stream that arrives in arbitrary pieces, without buffering or
//! copying payloads. RESP2 and RESP3 (every type, nested aggregates,
//! attributes, push frames, streamed strings and aggregates). Commands, the
//! other direction, are read by [`super::command`], which follows Redis's
//! own request parser rather than RESP's grammar.
//!
//! Hand-written because the job is narrower than what RESP crates do: they
//! decode a frame once it is whole in memory (redis-protocol, redis-rs),
//! which for a 64 MiB reply means holding it all and re-parsing from the
//! start as each read arrives. The pump needs only boundaries and a few
//! small fields (a reply's first element, an error's text), in bounded
//! memory: a stack of open aggregates at most `MAX_DEPTH` deep, one header
//! line, and the small captured element.

use std::fmt;

/// The longest header line accepted.
pub(crate) const MAX_LINE: usize = 64 * 1024;
/// The deepest nesting of aggregates accepted: far beyond what Redis sends
/// (a script's nested tables stop near Lua's own limit of 200), and it
/// bounds the scanner's stack at a few KiB.
pub(crate) const MAX_DEPTH: usize = 512;
/// The first element of a top-level array or push is captured (the kind of
/// a pub/sub reply), at most `CAPTURE_BYTES`.
const CAPTURE_BYTES: usize = 64;

/// Why a byte stream is not RESP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RespError {
    /// A type byte RESP does not have.
    #[error("not RESP: unexpected byte {0:#04x}")]
    BadType(u8),
    /// A length or count that is not a number.
    #[error("not RESP: bad length `{0}`")]
    BadLength(String),
    /// A header or inline line longer than `MAX_LINE`.
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A bulk payload larger than the configured frame limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The declared size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A bulk payload not followed by CRLF.
    #[error("not RESP: bulk payload without its CRLF")]
    MissingCrlf,
    /// Aggregates nested deeper than `MAX_DEPTH`.
    #[error("not RESP: aggregates nested deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// One complete top-level frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Offset just past the frame's last byte in the chunk that ended it.
    pub end: usize,
    /// Its first byte (`*`, `$`, `+`, `-`, `>`, ...).
    pub kind: u8,
    /// The first element of a top-level array or push, when it is a bulk
    /// string (`subscribe`, `message`...); for a simple string or error, its
    /// text. Cut to 64 bytes.
    pub args: Vec<Vec<u8>>,
    /// The third element of a top-level array or push, when it is an
    /// integer: the subscription count a pub/sub reply carries.
    pub count: Option<i64>,
}

impl Frame {
    /// A RESP3 push (out-of-band data, not a reply to a command).
    pub(crate) fn is_push(&self) -> bool {
        self.kind == b'>'
    }

    /// An error reply (`-` or RESP3 `!`).
    pub(crate) fn is_error(&self) -> bool {
        matches!(self.kind, b'-' | b'!')
    }

    /// The captured first element, lower-cased (empty when not captured).
    pub(crate) fn first(&self) -> String {
        self.args
            .first()
            .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a type byte.
    Type,
    /// Reading a header line of this type.
    Line(u8),
    /// Inside a bulk payload: this many payload bytes, then CRLF.
    Bulk { left: u64, crlf: u8 },
}

/// An aggregate being read.
#[derive(Debug, Clone, Copy)]
struct Open {
    /// Elements still expected; `None` for a streamed aggregate or string,
    /// which a terminator ends.
    left: Option<u64>,
    /// An attribute: when it completes it is not an element of anything,
    /// the frame after it is.
    attribute: bool,
}

/// Scans one direction of a RESP connection.
#[derive(Clone)]
pub(crate) struct Scanner {
    state: State,
    /// Open aggregates, innermost last.
    stack: Vec<Open>,
    /// The current header line.
    line: Vec<u8>,
    /// The top-level frame's type byte.
    top: u8,
    /// Captured arguments of the top-level frame.
    args: Vec<Vec<u8>>,
    /// The top-level frame's third element, when an integer.
    count: Option<i64>,
    /// Capturing the current bulk payload as an argument.
    capturing: bool,
    /// Elements of the top-level aggregate completed so far.
    top_seen: u64,
    max_frame: u64,
    /// Bytes consumed since the current top-level frame began (0: between
    /// frames).
    in_frame: u64,
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner")
            .field("state", &self.state)
            .field("depth", &self.stack.len())
            .field("in_frame", &self.in_frame)
            .finish_non_exhaustive()
    }
}

impl Scanner {
    /// A scanner of replies; bulk payloads over `max_frame` bytes are
    /// refused.
    pub(crate) fn new(max_frame: u64) -> Self {
        Self {
            state: State::Type,
            stack: Vec::new(),
            line: Vec::new(),
            top: 0,
            args: Vec::new(),
            count: None,
            capturing: false,
            top_seen: 0,
            max_frame,
            in_frame: 0,
        }
    }

    /// Whether the bytes so far end exactly at a frame boundary.
    pub(crate) fn at_boundary(&self) -> bool {
        self.in_frame == 0
    }

    /// Consumes `buf`, calling `on_frame` for each top-level frame that ends
    /// in it. After an error the scanner's state is unspecified.
    pub(crate) fn feed(
        &mut self,
        buf: &[u8],
        mut on_frame: impl FnMut(Frame),
    ) -> Result<(), RespError> {
        let mut i = 0;
        while i < buf.len() {
            match self.state {
                State::Type => {
                    let b = buf[i];
                    i += 1;
                    self.in_frame += 1;
                    if self.stack.is_empty() {
                        self.top = b;
                        self.args.clear();
                        self.count = None;
                        self.top_seen = 0;
                    }
                    match b {
                        b'+' | b'-' | b':' | b'$' | b'*' | b'_' | b',' | b'#' | b'(' | b'!'
                        | b'=' | b'%' | b'~' | b'>' | b'|' | b';' | b'.' => {
                            self.line.clear();
                            self.state = State::Line(b);
                        }
                        _ => return Err(RespError::BadType(b)),
                    }
                }
                State::Line(kind) => {
                    let (take, done) = line_part(&buf[i..]);
                    self.push_line(&buf[i..i + take])?;
                    i += take;
                    if done {
                        let line = std::mem::take(&mut self.line);
                        self.header(kind, trim_crlf(&line), i, &mut on_frame)?;
                        self.line = line;
                    }
                }
                State::Bulk { left, crlf } => {
                    if left > 0 {
                        let take = left.min((buf.len() - i) as u64) as usize;
                        if self.capturing
                            && let Some(arg) = self.args.last_mut()
                        {
                            let room = CAPTURE_BYTES.saturating_sub(arg.len());
                            arg.extend_from_slice(&buf[i..i + take.min(room)]);
                        }
                        i += take;
                        self.in_frame += take as u64;
                        self.state = State::Bulk {
                            left: left - take as u64,
                            crlf,
                        };
                        continue;
                    }
                    let want = if crlf == 0 { b'\r' } else { b'\n' };
                    if buf[i] != want {
                        return Err(RespError::MissingCrlf);
                    }
                    i += 1;
                    self.in_frame += 1;
                    if crlf == 0 {
                        self.state = State::Bulk { left: 0, crlf: 1 };
                    } else {
                        self.capturing = false;
                        self.state = State::Type;
                        self.element_done(i, &mut on_frame);
                    }
                }
            }
        }
        Ok(())
    }

    fn push_line(&mut self, part: &[u8]) -> Result<(), RespError> {
        if self.line.len() + part.len() > MAX_LINE + 2 {
            return Err(RespError::LineTooLong);
        }
        self.line.extend_from_slice(part);
        self.in_frame += part.len() as u64;
        Ok(())
    }

    /// A header line of type `kind` ended at `i`.
    fn header(
        &mut self,
        kind: u8,
        text: &[u8],
        i: usize,
        on_frame: &mut impl FnMut(Frame),
    ) -> Result<(), RespError> {
        self.state = State::Type;
        match kind {
            b'$' | b'=' | b'!' if text == b"?" => self.open(None, false)?,
            b'$' | b'=' | b'!' => match length(text)? {
                None => self.element_done(i, on_frame),
                Some(len) => self.bulk(len)?,
            },
            // A chunk of a streamed string (not an element of anything), or
            // its `;0` end.
            b';' => match length(text)?.unwrap_or(0) {
                0 => self.close(i, on_frame),
                len => self.bulk(len)?,
            },
            b'*' | b'~' | b'>' | b'%' | b'|' if text == b"?" => self.open(None, false)?,
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let pairs = matches!(kind, b'%' | b'|');
                match length(text)? {
                    None | Some(0) if kind == b'|' => {}
                    None | Some(0) => self.element_done(i, on_frame),
                    Some(n) => self.open(Some(if pairs { n * 2 } else { n }), kind == b'|')?,
                }
            }
            // The end of a streamed aggregate.
            b'.' => self.close(i, on_frame),
            b'+' | b'-' if self.stack.is_empty() => {
                self.args = vec![text[..text.len().min(CAPTURE_BYTES)].to_vec()];
                self.element_done(i, on_frame);
            }
            b':' if matches!(self.top, b'*' | b'>')
                && self.stack.len() == 1
                && self.top_seen == 2 =>
            {
                self.count = std::str::from_utf8(text).ok().and_then(|t| t.parse().ok());
                self.element_done(i, on_frame);
            }
            _ => self.element_done(i, on_frame),
        }
        Ok(())
    }

    fn open(&mut self, left: Option<u64>, attribute: bool) -> Result<(), RespError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(RespError::TooDeep);
        }
        self.stack.push(Open { left, attribute });
        Ok(())
    }

    /// A streamed aggregate or string ended: it is one element of its parent.
    fn close(&mut self, i: usize, on_frame: &mut impl FnMut(Frame)) {
        self.stack.pop();
        self.element_done(i, on_frame);
    }

    fn bulk(&mut self, len: u64) -> Result<(), RespError> {
        if len > self.max_frame {
            return Err(RespError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        // The first element of a top-level array or push: what kind of
        // pub/sub reply it is.
        self.capturing = matches!(self.top, b'*' | b'>')
            && self.stack.len() == 1
            && self.stack[0].left.is_some()
            && self.top_seen == 0;
        if self.capturing {
            self.args.push(Vec::new());
        }
        self.state = State::Bulk { left: len, crlf: 0 };
        Ok(())
    }

    /// An element (a leaf, or a whole aggregate) ended at `i`: count it in
    /// its parent, and report the top-level frame when that was the last.
    fn element_done(&mut self, i: usize, on_frame: &mut impl FnMut(Frame)) {
        loop {
            match self.stack.last_mut() {
                None => {
                    self.in_frame = 0;
                    on_frame(Frame {
                        end: i,
                        kind: self.top,
                        args: std::mem::take(&mut self.args),
                        count: self.count.take(),
                    });
                    return;
                }
                Some(Open { left: None, .. }) => return,
                Some(open) => {
                    let attribute = open.attribute;
                    let left = open.left.as_mut().map_or(0, |n| {
                        *n -= 1;
                        *n
                    });
                    if self.stack.len() == 1 {
                        self.top_seen += 1;
                    }
                    if left > 0 {
                        return;
                    }
                    self.stack.pop();
                    if attribute {
                        // The annotated frame follows; it is the element.
                        return;
                    }
                }
            }
        }
    }
}

/// How much of `rest` belongs to the current line, and whether it ends it.
fn line_part(rest: &[u8]) -> (usize, bool) {
    match rest.iter().position(|&b| b == b'\n') {
        Some(n) => (n + 1, true),
        None => (rest.len(), false),
    }
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Appends one command as a RESP array of bulk strings.
pub(crate) fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// A RESP length: a decimal number, or -1 (null).
fn length(text: &[u8]) -> Result<Option<u64>, RespError> {
    let bad = || RespError::BadLength(String::from_utf8_lossy(text).into_owned());
    let s = std::str::from_utf8(text).map_err(|_| bad())?;
    let n: i64 = s.parse().map_err(|_| bad())?;
    match n {
        -1 => Ok(None),
        n if n < 0 => Err(bad()),
        n => Ok(Some(n as u64)),
    }
}

#[cfg(test)]
mod tests;
