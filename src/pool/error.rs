//! Why a checkout fails. Mapped to gRPC statuses in `grpc/`.

use std::time::Duration;

/// Why a checkout produced no connection. Mapped to gRPC statuses in `grpc/`.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// Every slot stayed leased until the deadline.
    #[error(
        "pool exhausted: no connection came free within {waited:?} ({leased} of {max_size} leased)"
    )]
    Exhausted {
        /// How long the checkout waited.
        waited: Duration,
        /// Leased connections at the deadline.
        leased: u32,
        /// The pool's `max_size`.
        max_size: u32,
    },
    /// The fleet budget's cap stayed full (or 0) until the deadline: the
    /// pool had room, the group's budget did not.
    #[error(
        "fleet budget: no connection came free within {waited:?} ({leased} leased under this sidecar's fleet cap of {cap}; its share of the group's budget is {share})"
    )]
    FleetCap {
        /// How long the checkout waited.
        waited: Duration,
        /// Leased connections at the deadline.
        leased: u32,
        /// This sidecar's cap under the fleet budget.
        cap: u32,
        /// Its fair share of the budget, as it last saw the group.
        share: u32,
    },
    /// `max_waiters` checkouts were already waiting.
    #[error("pool exhausted: {0} checkouts already waiting (pool.max_waiters)")]
    TooManyWaiters(u32),
    /// Dials failed, or did not finish before the deadline.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// The pool is shutting down.
    #[error("pool is shutting down")]
    Closed,
    /// The upstream stayed paused (`lessor pause`) until the deadline.
    #[error("upstream paused (lessor pause): no connection granted within {waited:?}")]
    Paused {
        /// How long the checkout waited.
        waited: Duration,
    },
    /// The deadline passed while a health check ran; the check finishes in
    /// the background, and a healthy connection goes back to the pool.
    #[error("checkout deadline of {waited:?} passed during a health check")]
    DeadlineExceeded {
        /// How long the checkout took.
        waited: Duration,
    },
}
