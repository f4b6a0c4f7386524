//! Hooks for tests that hold lessor's protocol readers to the real servers
//! (differential tests: generated input to both, compared by what each made
//! of it), and for the benchmark's dial timings. Not part of lessor's API: hidden from the docs, and nothing in
//! the sidecar calls it.

mod dial;
mod fleet;
mod kube_leases;
mod postgres;
mod redis;

pub use dial::DialProbe;
pub use fleet::{SimConfig, SimMember, kubeconfig};
pub use kube_leases::{Leases as FakeLeases, Requests as LeaseRequests};
pub use postgres::{PgReport, PgTracker};
pub use redis::RedisTracker;
