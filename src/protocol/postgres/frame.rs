//! Message boundaries of the PostgreSQL wire protocol, found in a byte
//! stream that arrives in pieces of any size: a lease forwards bytes as
//! they come, so a 10 MB `DataRow` streams through while only its 5-byte
//! header is ever held. The bodies of the few messages the session tracker
//! reads (`ReadyForQuery`, `ParameterStatus`, `CopyInResponse`) are kept,
//! and parsed with `postgres-protocol`.

use bytes::BytesMut;
use postgres_protocol::message::backend;

/// A tag byte plus the 4-byte length that counts itself.
const HEADER: usize = 5;

/// Why a stream is not the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// The length field is below its own 4 bytes.
    #[error("malformed message (tag {tag:?}): length {len}")]
    Malformed {
        /// The message's tag, printable.
        tag: char,
        /// The length field.
        len: i32,
    },
    /// A message longer than the configured bound.
    #[error("a message of {len} bytes exceeds postgres.max_frame ({max} bytes)")]
    TooLarge {
        /// The message's length.
        len: u64,
        /// The configured bound.
        max: u64,
    },
}

/// A boundary found in the bytes just fed.
#[derive(Debug)]
pub(crate) enum Event<'a> {
    /// A message begins at `at` (an offset into the bytes fed); its tag is
    /// all that is known of it yet.
    Begin {
        /// The message type.
        tag: u8,
        /// Offset of the tag byte.
        at: usize,
    },
    /// A message ends just before `end`.
    End {
        /// The message type.
        tag: u8,
        /// Offset just past its last byte.
        end: usize,
        /// The whole message (header included) when its tag is one of the
        /// kept ones, for `postgres-protocol`'s parser.
        whole: Option<&'a mut BytesMut>,
    },
}

/// The framer of one direction of one connection.
#[derive(Debug)]
pub(crate) struct Framer {
    max: u64,
    /// Tags whose whole message is kept for the tracker.
    keep: &'static [u8],
    /// Header bytes of the current message seen so far (0: at a boundary).
    head: [u8; HEADER],
    have: usize,
    /// Body bytes of the current message still to come.
    left: u64,
    kept: Option<BytesMut>,
}

impl Framer {
    /// A framer that keeps the messages tagged with one of `keep`, and
    /// refuses messages longer than `max`.
    pub(crate) fn new(max: u64, keep: &'static [u8]) -> Self {
        Self {
            max,
            keep,
            head: [0; HEADER],
            have: 0,
            left: 0,
            kept: None,
        }
    }

    /// Whether the bytes so far end exactly at a message boundary.
    pub(crate) fn at_boundary(&self) -> bool {
        self.have == 0
    }

    /// Scans `data`, reporting every message start and end in it.
    pub(crate) fn feed<E: From<FrameError>>(
        &mut self,
        data: &[u8],
        mut on: impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut pos = 0;
        while pos < data.len() {
            if self.have < HEADER {
                if self.have == 0 {
                    on(Event::Begin {
                        tag: data[pos],
                        at: pos,
                    })?;
                }
                let take = (HEADER - self.have).min(data.len() - pos);
                self.head[self.have..self.have + take].copy_from_slice(&data[pos..pos + take]);
                self.have += take;
                pos += take;
                if self.have < HEADER {
                    break;
                }
                let len =
                    i32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                if len < 4 {
                    return Err(FrameError::Malformed {
                        tag: char::from(self.head[0]),
                        len,
                    }
                    .into());
                }
                let len = len as u64;
                if len > self.max {
                    return Err(FrameError::TooLarge { len, max: self.max }.into());
                }
                self.left = len - 4;
                if self.keep.contains(&self.head[0]) {
                    let mut kept = BytesMut::with_capacity(HEADER + self.left as usize);
                    kept.extend_from_slice(&self.head);
                    self.kept = Some(kept);
                }
            }
            let take = self.left.min((data.len() - pos) as u64) as usize;
            if let Some(kept) = &mut self.kept {
                kept.extend_from_slice(&data[pos..pos + take]);
            }
            pos += take;
            self.left -= take as u64;
            if self.left == 0 {
                self.have = 0;
                let mut kept = self.kept.take();
                on(Event::End {
                    tag: self.head[0],
                    end: pos,
                    whole: kept.as_mut(),
                })?;
            }
        }
        Ok(())
    }
}

/// Parses a kept message with `postgres-protocol`.
pub(crate) fn parse(whole: &mut BytesMut) -> Option<backend::Message> {
    backend::Message::parse(whole).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `data` in pieces of `step` bytes; returns (tag, end) of every
    /// message, with ends as offsets into the whole input.
    fn ends(data: &[u8], step: usize) -> Vec<(u8, usize)> {
        let mut framer = Framer::new(1 << 20, b"Z");
        let mut out = Vec::new();
        let mut base = 0;
        for piece in data.chunks(step) {
            framer
                .feed(piece, |e| {
                    if let Event::End { tag, end, whole } = e {
                        if tag == b'Z' {
                            assert_eq!(whole.map(|w| w.len()), Some(6));
                        }
                        out.push((tag, base + end));
                    }
                    Ok::<(), FrameError>(())
                })
                .unwrap();
            base += piece.len();
        }
        assert!(framer.at_boundary());
        out
    }

    #[test]
    fn boundaries_survive_any_split() {
        let stream = b"I\0\0\0\x04D\0\0\0\x08abcdZ\0\0\0\x05I";
        let expect = vec![(b'I', 5), (b'D', 14), (b'Z', 20)];
        for step in 1..=stream.len() {
            assert_eq!(ends(stream, step), expect, "step {step}");
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut framer = Framer::new(100, b"");
        assert!(matches!(
            framer.feed(b"Q\0\0\0\x02", |_| Ok::<(), FrameError>(())),
            Err(FrameError::Malformed { .. })
        ));
        let mut framer = Framer::new(100, b"");
        assert!(matches!(
            framer.feed(b"Q\0\0\x01\0", |_| Ok::<(), FrameError>(())),
            Err(FrameError::TooLarge { len: 256, .. })
        ));
    }
}
