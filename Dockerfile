# lessor's container image: the one charts/lessor references.
#   docker build -t ghcr.io/lessor-dev/lessor:0.1.0 .
# Build stage: the Rust toolchain; protoc comes from the protoc-bin-vendored
# crate, so nothing else is installed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace: Cargo loads every member's manifest.
COPY Cargo.toml Cargo.lock build.rs ./
# tokio_unstable for the task dump (/debug/runtime?tasks=1).
COPY .cargo .cargo
COPY proto proto
COPY src src
COPY client client
COPY bench bench
# Not stripped: CPU profiles, task dumps and heap profiles name lessor's
# functions from its symbols.
RUN cargo build --release --locked --bin lessor

# Runtime stage: distroless (glibc, CA certificates, no shell), non-root.
# lessor writes nothing to its filesystem, so it runs with a read-only root.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/lessor /usr/local/bin/lessor
USER 65532:65532
EXPOSE 7070 9090
ENTRYPOINT ["/usr/local/bin/lessor"]
CMD ["serve", "--config", "/etc/lessor/lessor.yaml"]
