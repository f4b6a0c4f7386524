//! Compiles lessor's public API (`proto/lessor/v1`, at the workspace root, so
//! other languages' clients generate from the same file) with
//! tonic-prost-build, using the protoc shipped by `protoc-bin-vendored` so a
//! fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let api = proto_root.join("lessor/v1/pool.proto");
    println!("cargo:rerun-if-changed={}", api.display());
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // `bytes` fields become `bytes::Bytes`: lease data moves without copies.
        .bytes(".lessor.v1")
        .file_descriptor_set_path(out_dir.join("lessor_descriptor.bin"))
        .compile_with_config(config, &[api], &[proto_root])?;
    Ok(())
}
