//! The upstream socket every layer above the dial uses: plain TCP or TLS
//! over TCP, behind one type with the methods callers used on `TcpStream`
//! (`AsyncRead`/`AsyncWrite`, and `split` into borrowed halves that can be
//! raced in one `tokio::select!`).
//!
//! Two TLS facts shape it:
//! - A TLS write may leave ciphertext inside rustls when the socket is full
//!   (`poll_write` reports the plaintext as taken). With TCP, written bytes
//!   are on their way; here they would wait for the next write, which a
//!   request/response caller never makes. So every read first pushes out
//!   what the session still holds: whoever waits for a reply sends its
//!   request.
//! - Bytes on an idle TLS socket are not necessarily data: TLS 1.3 servers
//!   send session tickets after the handshake, and a key update or
//!   close_notify is a record too. The liveness peek hands such records to
//!   rustls (straight `recv` syscalls, no waiting) and judges the plaintext,
//!   not the ciphertext.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// An upstream connection's byte stream.
#[derive(Debug)]
pub(crate) enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the session state is a few KiB, the enum moves).
    Tls(Box<TlsStream<TcpStream>>),
}

/// What a peek saw on an idle connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Nothing to read, no EOF: usable.
    Alive,
    /// The peer closed (FIN, or TLS close_notify) or reset the connection.
    Closed,
    /// Bytes wait that nobody asked for: a late reply or a server notice.
    Unsolicited,
    /// The socket (or the TLS session) reported another error.
    Failed(io::ErrorKind),
}

/// Whether a socket error means the peer closed or reset the connection (as
/// opposed to a local failure): the one list the lease pump and the peek share.
pub(crate) fn closed_by_peer(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// How many reads of TLS records one peek may do before it calls the
/// connection unsolicited: tickets are two or three records, not a stream.
const PEEK_RECORD_READS: usize = 8;

impl Stream {
    /// Borrowed read and write halves, usable concurrently in one task
    /// (`tokio::select!` over a read and a write), like `TcpStream::split`.
    pub(crate) fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Self::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Self::Tls(s) => {
                // tokio's split locks per poll; both halves live in one task,
                // so the lock is never contended.
                let (r, w) = tokio::io::split(Flushing(s));
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    /// Looks at the connection without consuming application bytes or
    /// waiting. Must be a direct `recv(MSG_PEEK)`: tokio's own `try_read`
    /// and `peek` trust cached readiness and report dead sockets as alive.
    pub(crate) fn peek(&mut self) -> Liveness {
        match self {
            Self::Plain(s) => peek_tcp(s),
            Self::Tls(s) => peek_tls(s),
        }
    }
}

fn peek_tcp(stream: &TcpStream) -> Liveness {
    let mut buf = [MaybeUninit::<u8>::uninit(); 1];
    match SockRef::from(stream).peek(&mut buf) {
        Ok(0) => Liveness::Closed,
        Ok(_) => Liveness::Unsolicited,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Liveness::Alive,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Liveness::Alive,
        Err(e) if closed_by_peer(e.kind()) => Liveness::Closed,
        Err(e) => Liveness::Failed(e.kind()),
    }
}

/// Plaintext already decrypted, then records waiting on the socket: fed to
/// rustls until the socket would block, so that tickets and key updates are
/// absorbed and only application data or a close count.
fn peek_tls(stream: &mut TlsStream<TcpStream>) -> Liveness {
    let (tcp, session) = stream.get_mut();
    for _ in 0..PEEK_RECORD_READS {
        match session.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() > 0 => return Liveness::Unsolicited,
            Ok(state) if state.peer_has_closed() => return Liveness::Closed,
            Ok(_) => {}
            Err(_) => return Liveness::Failed(io::ErrorKind::InvalidData),
        }
        match peek_tcp(tcp) {
            Liveness::Unsolicited => {}
            other => return other,
        }
        // Records wait. `&Socket` reads with a plain `recv`: nonblocking
        // (tokio set it so), and tokio's readiness cache is only a hint.
        let socket = SockRef::from(&*tcp);
        let mut reader: &socket2::Socket = &socket;
        match session.read_tls(&mut reader) {
            Ok(0) => return Liveness::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Liveness::Alive,
            Err(e) if closed_by_peer(e.kind()) => return Liveness::Closed,
            Err(e) => return Liveness::Failed(e.kind()),
        }
    }
    Liveness::Unsolicited
}

/// A TLS stream whose reads first push out ciphertext a write left behind
/// (see the module docs).
#[derive(Debug)]
pub(crate) struct Flushing<'a>(&'a mut TlsStream<TcpStream>);

/// Pushes out ciphertext rustls still holds before a read. Pending is not an
/// error: the write interest is registered and the read proceeds.
fn flush_before_read(
    tls: &mut TlsStream<TcpStream>,
    cx: &mut Context<'_>,
) -> Result<(), io::Error> {
    if tls.get_ref().1.wants_write()
        && let Poll::Ready(Err(e)) = Pin::new(tls).poll_flush(cx)
    {
        return Err(e);
    }
    Ok(())
}

impl AsyncRead for Flushing<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        flush_before_read(self.0, cx)?;
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Flushing<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => {
                flush_before_read(s, cx)?;
                Pin::new(&mut **s).poll_read(cx, buf)
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// The read half of [`Stream::split`].
#[derive(Debug)]
pub(crate) enum ReadHalf<'a> {
    /// Plain TCP.
    Plain(tokio::net::tcp::ReadHalf<'a>),
    /// TLS: shares the session with its write half.
    Tls(tokio::io::ReadHalf<Flushing<'a>>),
}

/// The write half of [`Stream::split`].
#[derive(Debug)]
pub(crate) enum WriteHalf<'a> {
    /// Plain TCP.
    Plain(tokio::net::tcp::WriteHalf<'a>),
    /// TLS: shares the session with its read half.
    Tls(tokio::io::WriteHalf<Flushing<'a>>),
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
