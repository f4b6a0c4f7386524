//! The transport under every upstream connection: a socket that is plain
//! TCP or TLS over TCP ([`Stream`]), and the TLS client that makes the
//! second kind ([`Tls`]). TLS is a property of the dial: the pool, leases,
//! Exchange, health checks, session restores and the native listeners read
//! and write a [`Stream`] and never ask which it is.
//!
//! - `stream`: the socket type, its borrowed halves, the liveness peek.
//! - `tls`: handshake, server name, failure classification, reloads.
//! - `material`: the CA, certificate and key files, parsed for rustls.
//! - `verify`: the `require` and `verify-ca` certificate checks.
//! - `x509`: a certificate's expiry, for `Stats` and metrics.

mod material;
mod stream;
mod tls;
mod verify;
mod x509;

pub(crate) use stream::{Liveness, Stream, WriteHalf, closed_by_peer};
#[cfg(test)]
pub(crate) use tls::TlsFailure;
pub(crate) use tls::{Handshake, Refreshed, Tls, TlsError, TlsStatus};
