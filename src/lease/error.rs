//! Why a lease stream ends with an error status, and the one question the
//! lease layer asks of a transport's errors.

use std::time::Duration;

use crate::pool::CheckoutError;

/// Why a lease stream ends with an error status instead of `Ended`.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The first message was not `Acquire`.
    #[error("the first message of a lease must be Acquire")]
    FirstNotAcquire,
    /// No `Acquire` arrived within `grpc.acquire_timeout`.
    #[error("no Acquire within {0:?} (grpc.acquire_timeout)")]
    AcquireTimeout(Duration),
    /// `Acquire.upstream` names no configured upstream.
    #[error("unknown upstream `{name}` (configured: {known})")]
    UnknownUpstream {
        /// The name asked for.
        name: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// No connection could be checked out.
    #[error(transparent)]
    Checkout(#[from] CheckoutError),
    /// A second `Acquire` on a granted lease.
    #[error("a lease takes exactly one Acquire")]
    SecondAcquire,
    /// A `LeaseRequest` with no message set.
    #[error("empty LeaseRequest")]
    EmptyRequest,
    /// A `Data` message larger than `grpc.max_frame`.
    #[error("Data of {len} bytes exceeds grpc.max_frame ({max} bytes)")]
    FrameTooLarge {
        /// The message's size.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A message after `Release`.
    #[error("no message may follow Release")]
    AfterRelease,
    /// `Acquire.holder` is longer than 256 bytes.
    #[error("Acquire.holder is {0} bytes; at most 256")]
    HolderTooLong(usize),
    /// The sidecar is shutting down.
    #[error("lessor is shutting down")]
    ShuttingDown,
    /// A protocol upstream's lease carried bytes that are not its protocol.
    #[error("{0}")]
    NotProtocol(String),
    /// A protocol upstream's lease tried to do the sidecar's part (a
    /// PostgreSQL StartupMessage or password message); nothing of it was
    /// forwarded, so the connection stays as clean as it was.
    #[error("{0}")]
    Refused(String),
    /// The transport refused a client message (e.g. one over its size
    /// limit). Kept whole, so the transport can answer with its own error.
    #[error(transparent)]
    Inbound(Box<dyn std::error::Error + Send + Sync>),
}

/// An error the transport yields instead of a client message. The lease
/// layer needs to know one thing about it: whether the client broke the
/// protocol (the lease ends as a violation and the error is returned), or
/// the stream broke under it (the lease ends as an abort).
pub(crate) trait InboundError: std::error::Error + Send + Sync + 'static {
    /// The client sent something the transport refused.
    fn is_violation(&self) -> bool;
}
