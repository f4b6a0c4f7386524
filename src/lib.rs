//! lessor: a connection-pool sidecar. It keeps warm, health-checked sockets
//! to upstreams (Redis, PostgreSQL, any TCP service) and leases them to the
//! application over gRPC; when a lease ends, its connection is returned or
//! evicted by rules the sidecar enforces, so no application bug can leak one.
//!
//! How data moves:
//!
//! ```text
//! client ──gRPC Lease stream──► grpc::service ──► lease::pump
//!                                                   │ Acquire: pool::Pool::checkout
//!                                                   │   (engine get, peek, probe, deadline)
//!                                                   │ Data ⇄ upstream socket (bounded)
//!                                                   └ end: lease::guard → return | evict
//! pool::maintain: min_idle refill, idle/lifetime sweep, background checks
//! ```
//!
//! Modules: [`config`] (schema, defaults, validation), [`pool`] (one
//! upstream's pool over bb8 or deadpool), [`lease`] (lease protocol, byte
//! pump, end rules), [`grpc`] (tonic service, status mapping, generated
//! types), [`server`] (listener, drain), [`client`] (Rust client), [`demo`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod echo;
pub mod grpc;
pub mod lease;
pub mod pool;
pub mod server;
pub mod shutdown;
pub mod telemetry;

pub use grpc::pb;
