//! The gRPC face of lessor: the generated API types (`pb`), the `Pool`
//! service, and the one place where errors become `tonic::Status`.

pub mod service;
pub mod status;

/// Generated from `proto/lessor/v1/pool.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("lessor.v1");

    /// The encoded descriptor set of the API, served by gRPC reflection and
    /// pinned by the golden-descriptor test.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/lessor_descriptor.bin"));
}

pub use service::PoolService;
