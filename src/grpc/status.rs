//! Error-to-`Status` mapping, in one place, as DESIGN.md lists it: unknown
//! upstream NOT_FOUND; pool exhausted RESOURCE_EXHAUSTED; upstream unreachable
//! or sidecar shutting down UNAVAILABLE; protocol misuse INVALID_ARGUMENT.

use tonic::{Code, Status};

use crate::lease::pump::LeaseError;
use crate::pool::CheckoutError;

impl From<CheckoutError> for Status {
    fn from(e: CheckoutError) -> Self {
        let code = match e {
            CheckoutError::Exhausted { .. } | CheckoutError::TooManyWaiters(_) => {
                Code::ResourceExhausted
            }
            CheckoutError::Unavailable(_) | CheckoutError::Closed => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

impl From<LeaseError> for Status {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Checkout(e) => e.into(),
            LeaseError::Transport(status) => status,
            LeaseError::UnknownUpstream { .. } => Status::not_found(e.to_string()),
            LeaseError::ShuttingDown => Status::unavailable(e.to_string()),
            LeaseError::FirstNotAcquire
            | LeaseError::SecondAcquire
            | LeaseError::EmptyRequest
            | LeaseError::FrameTooLarge { .. }
            | LeaseError::AfterRelease => Status::invalid_argument(e.to_string()),
        }
    }
}
