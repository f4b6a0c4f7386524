//! Leases: the protocol of one `Pool.Lease` stream, the byte pump between the
//! stream and the upstream socket, and the rules for how a lease ends.
//!
//! - `state`: the lease-end table as a pure function;
//! - `guard`: the RAII guard that finishes each checkout exactly once;
//! - `stream`: the stream as a protocol: Acquire, checkout, Granted, then
//!   the pump until Release or revocation, Ended;
//! - `pump`: a granted lease's bytes both ways, its limits and its end;
//! - `registry`: every live lease (holder, trace, age, bytes, state), for
//!   `/debug/leases`, `lease.warn_after` and `Cancel`;
//! - `watchdog`: ends leases whose client stopped reading (hyper does not
//!   poll a stream that waits for flow-control window), on time.
//!
//! A lease needs no task of its own: its stream is polled by the HTTP/2
//! stream task hyper already runs, and dropping the stream (client reset,
//! connection lost) drops the guard, which finishes the lease. One watchdog
//! task per server covers the moments hyper does not poll.

pub(crate) mod error;
pub(crate) mod guard;
pub(crate) mod pump;
pub(crate) mod registry;
pub(crate) mod state;
pub(crate) mod stream;
pub(crate) mod watchdog;

pub(crate) use error::{InboundError, LeaseError};
pub(crate) use state::Fate;
pub(crate) use stream::{LeaseContext, clamp_ms, lease_span, lease_stream};
