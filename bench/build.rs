//! Compiles the baseline's echo service (`proto/lessor/bench/v1`): a bare
//! unary gRPC call, the floor a lease is measured against. It is not part of
//! lessor's API, so it lives here and not in the API's descriptor set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/lessor/bench/v1/echo.proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .bytes(".lessor.bench.v1")
        .compile_with_config(config, &["proto/lessor/bench/v1/echo.proto"], &["proto"])?;
    Ok(())
}
