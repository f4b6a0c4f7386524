//! Compiles the public API (proto/lessor/v1) with tonic-prost-build, using the
//! protoc shipped by `protoc-bin-vendored` so a fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // `bytes` fields become `bytes::Bytes`: lease data moves without copies.
        .bytes(".lessor.v1")
        .file_descriptor_set_path(out_dir.join("lessor_descriptor.bin"))
        .compile_with_config(config, &["proto/lessor/v1/pool.proto"], &["proto"])?;

    // The benchmark's baseline echo service: compiled apart, so it never
    // appears in the public API's descriptor set.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .bytes(".lessor.bench.v1")
        .compile_with_config(config, &["proto/lessor/bench/v1/echo.proto"], &["proto"])?;
    Ok(())
}
