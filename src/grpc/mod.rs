//! The gRPC face of lessor: the `Pool` service, its per-method message
//! limits (`limits`), and the one place where
//! errors become `tonic::Status`. The generated API types come from
//! `lessor_client::pb`, which both this layer and the lease layer import.

pub(crate) mod health;
pub(crate) mod limits;
pub(crate) mod service;
pub(crate) mod status;

pub(crate) use service::PoolService;
