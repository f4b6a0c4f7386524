//! Generates the server side of lessor's API (the `Pool` service trait and
//! its tonic server) from `proto/lessor/v1/pool.proto`. The messages and the
//! client stub are `lessor-client`'s, generated there from the same file:
//! `extern_path` points the server code at them, so one set of message types
//! exists and an application's client crate carries no server code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = "proto/lessor/v1/pool.proto";
    println!("cargo:rerun-if-changed={api}");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(".lessor.v1", "::lessor_client::pb")
        .compile_with_config(config, &[api], &["proto"])?;
    Ok(())
}
