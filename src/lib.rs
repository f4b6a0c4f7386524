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
//! Modules (private; the public API is the re-export list below): `config`
//! (schema, defaults, validation), `pool` (one upstream's pool over bb8 or
//! deadpool), `net` (the upstream socket, plain or TLS, and the TLS client),
//! `discovery` (endpoint sources and balancing), `lease` (lease
//! protocol, byte pump, end rules), `grpc` (tonic service, health, status
//! mapping), `admin` (readiness, metrics, the admin server), `server`
//! (listeners, drain). The Rust client and the generated API types are the
//! `lessor-client` crate. `docs/architecture.md` walks through all of it.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod admin;
pub mod cli;
mod config;
mod demo;
mod discovery;
mod echo;
mod exchange;
mod fleet;
mod grpc;
mod lease;
mod listener;
mod net;
mod pool;
mod protocol;
mod reload;
mod server;
mod shutdown;
mod telemetry;
#[doc(hidden)]
pub mod testing;

// The public API: what the `lessor` and `lessor-bench` binaries, the tests and
// an embedder use. Everything else is `pub(crate)`; `unreachable_pub` keeps it
// that way.
pub use config::{Config, ConfigError, EngineKind, ListenAddr, UnixMode};
pub use demo::{DemoError, run as run_demo};
pub use discovery::Resolver;
pub use echo::EchoServer;
pub use server::{Listener, Listeners, RunOptions, ServerError, run, run_with};
pub use shutdown::first_signal;
pub use telemetry::{LogFormat, SpanCounters, Telemetry, TelemetryError, init as init_telemetry};
