//! Error-to-`Status` mapping, in one place, as the README's status table lists it: unknown
//! upstream NOT_FOUND; pool exhausted RESOURCE_EXHAUSTED; upstream unreachable
//! or sidecar shutting down UNAVAILABLE; protocol misuse INVALID_ARGUMENT.

use tonic::{Code, Status};

use crate::exchange::ExchangeError;
use crate::lease::{InboundError, LeaseError};
use crate::pool::CheckoutError;

/// The status code a checkout error ends a lease with.
pub(crate) fn checkout_code(e: &CheckoutError) -> Code {
    match e {
        CheckoutError::Exhausted { .. }
        | CheckoutError::FleetCap { .. }
        | CheckoutError::TooManyWaiters(_) => Code::ResourceExhausted,
        CheckoutError::Unavailable(_) | CheckoutError::Closed => Code::Unavailable,
        CheckoutError::DeadlineExceeded { .. } | CheckoutError::Paused { .. } => {
            Code::DeadlineExceeded
        }
    }
}

/// The status code a lease error ends its stream with (also recorded on the
/// lease's trace span).
pub(crate) fn code(e: &LeaseError) -> Code {
    match e {
        LeaseError::Checkout(e) => checkout_code(e),
        LeaseError::Inbound(e) => e
            .downcast_ref::<Status>()
            .map_or(Code::Internal, Status::code),
        LeaseError::UnknownUpstream { .. } => Code::NotFound,
        LeaseError::ShuttingDown => Code::Unavailable,
        LeaseError::AcquireTimeout(_) => Code::DeadlineExceeded,
        LeaseError::FirstNotAcquire
        | LeaseError::SecondAcquire
        | LeaseError::EmptyRequest
        | LeaseError::FrameTooLarge { .. }
        | LeaseError::AfterRelease
        | LeaseError::NotProtocol(_)
        | LeaseError::HolderTooLong(_)
        | LeaseError::Refused(_) => Code::InvalidArgument,
    }
}

impl From<CheckoutError> for Status {
    fn from(e: CheckoutError) -> Self {
        Status::new(checkout_code(&e), e.to_string())
    }
}

impl From<ExchangeError> for Status {
    fn from(e: ExchangeError) -> Self {
        let code = match &e {
            ExchangeError::UnknownUpstream { .. } => Code::NotFound,
            ExchangeError::NotAProtocolUpstream(_) => Code::FailedPrecondition,
            ExchangeError::Invalid(_) => Code::InvalidArgument,
            ExchangeError::Checkout(c) => checkout_code(c),
            ExchangeError::Timeout(_) => Code::DeadlineExceeded,
            ExchangeError::Upstream(_) | ExchangeError::ShuttingDown => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

impl From<LeaseError> for Status {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Inbound(e) => match e.downcast::<Status>() {
                Ok(status) => *status,
                Err(e) => Status::internal(e.to_string()),
            },
            other => Status::new(code(&other), other.to_string()),
        }
    }
}

/// tonic reports a message over the decoding limit as OUT_OF_RANGE: the
/// client's fault. Anything else (a reset, a lost connection) broke the
/// stream under the lease.
impl InboundError for Status {
    fn is_violation(&self) -> bool {
        self.code() == Code::OutOfRange
    }
}

impl From<crate::lease::registry::CancelError> for Status {
    fn from(e: crate::lease::registry::CancelError) -> Self {
        use crate::lease::registry::CancelError;
        let code = match e {
            CancelError::NotFound(_) => Code::NotFound,
            CancelError::Unreachable { .. } => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}
