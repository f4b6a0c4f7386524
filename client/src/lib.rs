//! The Rust client of lessor, and the API's generated messages and stubs.
//!
//! An application that leases connections from a lessor sidecar depends on
//! this crate alone: it carries tonic's client side and nothing of the
//! sidecar (no Kubernetes client, no HTTP server, no pool engines). The
//! sidecar imports its generated types from here too, so the messages exist
//! in one place.
//!
//! ```no_run
//! # async fn run() -> Result<(), lessor_client::ClientError> {
//! use lessor_client::{Client, LeaseOptions, pb::Disposition};
//! let client = Client::connect("127.0.0.1:7070").await?;
//! let mut lease = client.lease("redis", &LeaseOptions::default()).await?;
//! lease.send(&b"PING\r\n"[..]).await?;
//! let reply = lease.recv_at_least(7).await?;
//! assert_eq!(&reply[..], b"+PONG\r\n");
//! lease.release(Disposition::Return).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod client;

pub use client::{Client, ClientError, Lease, LeaseOptions};

/// Generated from `proto/lessor/v1/pool.proto`: the messages and the
/// client stub (the sidecar generates the server trait it implements).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("lessor.v1");

    /// The encoded descriptor set of the API, served by gRPC reflection and
    /// pinned by the golden-descriptor test.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/lessor_descriptor.bin"));
}
