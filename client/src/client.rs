//! The Rust client: open a lease (optionally pipelining its first bytes),
//! exchange bytes, release it, read `Stats`. A [`Lease`] is also an
//! `AsyncRead + AsyncWrite`, so code written for a socket runs over a lease.
//!
//! Used by applications, by the sidecar's CLI (`lease`, `stats`, `demo`), the
//! tests and the benchmarks.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{SinkExt, Stream};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pb::{
    Acquire, Disposition, Ended, ExchangeRequest, ExchangeResponse, Granted, LeaseRequest,
    LeaseResponse, Release, StatsRequest, UpstreamStats, lease_request, lease_response,
    pool_client::PoolClient,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The target address could not be parsed.
    #[error("bad target `{target}`: {reason}")]
    Target {
        /// What was given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection to lessor could be made.
    #[error("cannot connect to lessor at {target}: {source}")]
    Connect {
        /// What was dialed.
        target: String,
        /// tonic's error.
        source: tonic::transport::Error,
    },
    /// lessor answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// lessor broke the lease protocol (a bug, or not lessor).
    #[error("unexpected message from lessor: {0}")]
    Protocol(&'static str),
    /// The lease stream is over; nothing more can be sent.
    #[error("the lease has ended")]
    Closed,
    /// A metadata key or value is not valid ASCII gRPC metadata.
    #[error("invalid metadata `{0}`")]
    Metadata(String),
}

impl ClientError {
    /// The gRPC status code, when lessor sent one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// A connection to one lessor sidecar. Cheap to clone; clones share the
/// HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: PoolClient<Channel>,
}

/// What to ask for in `Acquire`.
#[derive(Clone, Debug, Default)]
pub struct LeaseOptions {
    /// Shortens the upstream's checkout timeout (never extends it).
    pub checkout_timeout: Option<Duration>,
    /// Shortens the upstream's maximum lease duration (never extends it).
    pub max_lease: Option<Duration>,
    /// gRPC metadata to send with the call, e.g. a W3C `traceparent` so the
    /// lease joins the caller's trace.
    pub metadata: Vec<(String, String)>,
    /// What holds the lease (a route, a job), at most 256 bytes: shown in
    /// lessor's `/debug/leases` and its overdue-lease warning.
    pub holder: String,
}

impl Client {
    /// Connects to `target`: `host:port`, `http://host:port`, or
    /// `unix:///path`.
    pub async fn connect(target: &str) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            target: target.to_owned(),
            source,
        };
        let channel = if let Some(path) = target.strip_prefix("unix://") {
            let path = path.to_owned();
            // The URI is a placeholder: the connector ignores it.
            endpoint(target, "http://lessor.local")?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(connect_err)?
        } else {
            let uri = if target.contains("://") {
                target.to_owned()
            } else {
                format!("http://{target}")
            };
            endpoint(target, &uri)?
                .connect()
                .await
                .map_err(connect_err)?
        };
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel (custom TLS, interceptors, load balancing).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: PoolClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
        }
    }

    /// Opens a lease and waits for `Granted`.
    pub async fn lease(
        &self,
        upstream: &str,
        options: &LeaseOptions,
    ) -> Result<Lease, ClientError> {
        self.lease_pipelined(upstream, options, None).await
    }

    /// Opens a lease, sending `first` right behind `Acquire` without waiting
    /// for `Granted`: a request costs one round trip to the sidecar plus one
    /// to the upstream.
    pub async fn lease_pipelined(
        &self,
        upstream: &str,
        options: &LeaseOptions,
        first: Option<Bytes>,
    ) -> Result<Lease, ClientError> {
        let (tx, rx) = mpsc::channel(8);
        let acquire = Acquire {
            upstream: upstream.to_owned(),
            checkout_timeout_ms: millis(options.checkout_timeout),
            max_lease_ms: millis(options.max_lease),
            holder: options.holder.clone(),
        };
        // The channel has room for both; the receiver is alive: cannot fail.
        let _ = tx.try_send(request(lease_request::Msg::Acquire(acquire)));
        if let Some(first) = first {
            let _ = tx.try_send(request(lease_request::Msg::Data(first)));
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        for (key, value) in &options.metadata {
            let bad = || ClientError::Metadata(format!("{key}: {value}"));
            let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> =
                key.parse().map_err(|_| bad())?;
            let value = value.parse().map_err(|_| bad())?;
            request.metadata_mut().insert(key, value);
        }
        let mut inbound = self.inner.clone().lease(request).await?.into_inner();
        let granted = match inbound.message().await? {
            Some(LeaseResponse {
                msg: Some(lease_response::Msg::Granted(granted)),
            }) => granted,
            Some(_) => return Err(ClientError::Protocol("expected Granted first")),
            None => return Err(ClientError::Protocol("stream ended before Granted")),
        };
        Ok(Lease {
            tx: PollSender::new(tx),
            inbound,
            granted,
            ended: None,
            finished: false,
            unread: Bytes::new(),
        })
    }

    /// One request and exactly its reply, on a pooled connection of a
    /// protocol upstream (`protocol: redis` or `postgres`): whole commands
    /// (or frontend messages ending with a Query or Sync) in, their
    /// replies out, the connection returned clean. `timeout` bounds the
    /// reply (default: the upstream's `lease.idle_timeout`). An error reply
    /// from the upstream is a successful Exchange.
    pub async fn exchange(
        &self,
        upstream: &str,
        request: impl Into<Bytes>,
        timeout: Option<Duration>,
    ) -> Result<ExchangeResponse, ClientError> {
        let request = ExchangeRequest {
            upstream: upstream.to_owned(),
            request: request.into(),
            checkout_timeout_ms: 0,
            timeout_ms: millis(timeout),
        };
        Ok(self.inner.clone().exchange(request).await?.into_inner())
    }

    /// Asks the upstream to cancel what a live PostgreSQL lease is running
    /// (lessor sends the session's CancelRequest). Best effort: the lease's
    /// own reply says whether the query was cancelled. Returns the endpoint
    /// the request went to.
    pub async fn cancel(&self, lease_id: &str) -> Result<String, ClientError> {
        let request = crate::pb::CancelRequest {
            lease_id: lease_id.to_owned(),
        };
        Ok(self
            .inner
            .clone()
            .cancel(request)
            .await?
            .into_inner()
            .endpoint)
    }

    /// `Stats` of one upstream, or of all when `upstream` is empty.
    pub async fn stats(&self, upstream: &str) -> Result<Vec<UpstreamStats>, ClientError> {
        let request = StatsRequest {
            upstream: upstream.to_owned(),
        };
        Ok(self
            .inner
            .clone()
            .stats(request)
            .await?
            .into_inner()
            .upstreams)
    }
}

impl Client {
    /// Waits until every upstream's pool holds at least `idle` idle
    /// connections, polling `Stats`, for at most `within`. Returns whether
    /// they did: a tool that measures or demonstrates lessor starts from warm
    /// pools.
    pub async fn wait_idle(&self, idle: u32, within: Duration) -> Result<bool, ClientError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.stats("").await?.iter().all(|s| s.idle >= idle) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// HTTP/2 receive window of one lease: plenty for loopback throughput.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 receive window of the whole channel: 32 stalled leases' worth.
const CONNECTION_WINDOW: u32 = 32 * STREAM_WINDOW;

fn endpoint(target: &str, uri: &str) -> Result<Endpoint, ClientError> {
    Endpoint::from_shared(uri.to_owned())
        .map_err(|e| ClientError::Target {
            target: target.to_owned(),
            reason: e.to_string(),
        })
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                // A lease whose reader stalls keeps at most its stream
                // window unread, and the connection window (released only
                // as data is read) is many of those: a few stalled leases
                // cannot freeze the others on this channel.
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
        })
}

/// A duration as the API's milliseconds: 0 means "the configured value", so
/// a set duration is at least 1 ms.
fn millis(d: Option<Duration>) -> u32 {
    d.map_or(0, |d| {
        u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
    })
}

fn request(msg: lease_request::Msg) -> LeaseRequest {
    LeaseRequest { msg: Some(msg) }
}

/// A granted lease. Dropping it without [`Lease::release`] cancels the
/// stream; lessor then applies the upstream's `lease.on_abort`.
pub struct Lease {
    tx: PollSender<LeaseRequest>,
    inbound: Streaming<LeaseResponse>,
    granted: Granted,
    ended: Option<Ended>,
    /// The response stream has ended (after Ended, or without it).
    finished: bool,
    /// Bytes received but not yet read through `AsyncRead`.
    unread: Bytes,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("granted", &self.granted)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// What lessor granted: lease and connection ids, reuse, wait.
    pub fn granted(&self) -> &Granted {
        &self.granted
    }

    /// The `Ended` lessor sent, once it has been read.
    pub fn ended(&self) -> Option<&Ended> {
        self.ended.as_ref()
    }

    /// Sends bytes to the upstream.
    pub async fn send(&mut self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        let msg = request(lease_request::Msg::Data(data.into()));
        self.tx.send(msg).await.map_err(|_| ClientError::Closed)
    }

    /// The next bytes from the upstream; `None` once the lease has ended (see
    /// [`Lease::ended`]).
    pub async fn recv(&mut self) -> Result<Option<Bytes>, ClientError> {
        if !self.unread.is_empty() {
            return Ok(Some(std::mem::take(&mut self.unread)));
        }
        loop {
            if self.finished {
                return Ok(None);
            }
            match self.inbound.message().await {
                Ok(Some(msg)) => {
                    if let Some(data) = self.on_message(msg)? {
                        return Ok(Some(data));
                    }
                }
                Ok(None) => self.finished = true,
                Err(status) => {
                    self.finished = true;
                    return Err(status.into());
                }
            }
        }
    }

    /// Reads until `n` bytes have arrived (more may be returned when the
    /// upstream sent more in the same message).
    pub async fn recv_at_least(&mut self, n: usize) -> Result<Bytes, ClientError> {
        let mut got = BytesMut::new();
        while got.len() < n {
            match self.recv().await? {
                Some(data) => got.extend_from_slice(&data),
                None => return Err(ClientError::Closed),
            }
        }
        Ok(got.freeze())
    }

    /// Releases the lease and reads to the end of the stream. Upstream bytes
    /// still arriving are discarded. Returns lessor's `Ended`.
    pub async fn release(mut self, disposition: Disposition) -> Result<Ended, ClientError> {
        let msg = request(lease_request::Msg::Release(Release {
            disposition: disposition.into(),
        }));
        // A closed sender means lessor already ended the lease; its Ended is
        // still in the stream.
        let _ = self.tx.send(msg).await;
        self.tx.close();
        self.unread.clear();
        while self.recv().await?.is_some() {}
        self.ended
            .take()
            .ok_or(ClientError::Protocol("stream ended without Ended"))
    }

    /// Reads to the end of the stream without releasing (after lessor ended
    /// the lease itself: expiry, upstream close, shutdown).
    pub async fn finish(mut self) -> Result<Option<Ended>, ClientError> {
        // Not a half-close: lessor reads that as an abort.
        while self.recv().await?.is_some() {}
        Ok(self.ended.take())
    }

    fn on_message(&mut self, msg: LeaseResponse) -> Result<Option<Bytes>, ClientError> {
        match msg.msg {
            Some(lease_response::Msg::Data(data)) => Ok(Some(data)),
            Some(lease_response::Msg::Ended(ended)) => {
                self.ended = Some(ended);
                Ok(None)
            }
            Some(lease_response::Msg::Granted(_)) => Err(ClientError::Protocol("second Granted")),
            None => Err(ClientError::Protocol("empty LeaseResponse")),
        }
    }
}

impl AsyncRead for Lease {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread[..n]);
                this.unread.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.finished || this.ended.is_some() {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inbound).poll_next(cx)) {
                Some(Ok(msg)) => match this.on_message(msg) {
                    Ok(Some(data)) => this.unread = data,
                    Ok(None) => {}
                    Err(e) => {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                    }
                },
                Some(Err(status)) => {
                    this.finished = true;
                    return Poll::Ready(Err(io::Error::other(ClientError::Status(status))));
                }
                None => this.finished = true,
            }
        }
    }
}

impl AsyncWrite for Lease {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, ClientError::Closed);
        ready!(this.tx.poll_reserve(cx)).map_err(|_| closed())?;
        let msg = request(lease_request::Msg::Data(Bytes::copy_from_slice(buf)));
        this.tx.send_item(msg).map_err(|_| closed())?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Messages are handed to the HTTP/2 stream as they are written.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Ending a lease is a decision (`release`), not a side effect of a
        // half-close, which lessor would treat as an abort.
        Poll::Ready(Ok(()))
    }
}
