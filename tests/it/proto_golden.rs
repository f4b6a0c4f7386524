//! Pins the public API: the compiled descriptor, rendered as one line per
//! name and number, must equal `proto/golden/lessor.v1.txt`. Clients in every
//! language depend on these names and numbers. To accept a deliberate,
//! additive change: `LESSOR_BLESS=1 cargo test --test it proto_golden`, and
//! review the diff of the golden file.

use std::fmt::Write as _;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/golden/lessor.v1.txt");

fn render() -> String {
    let set =
        FileDescriptorSet::decode(lessor_client::pb::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut out = String::new();
    for file in &set.file {
        let package = file.package();
        let _ = writeln!(out, "file {} package {package}", file.name());
        let opts = file.options.clone().unwrap_or_default();
        let _ = writeln!(out, "option go_package = {}", opts.go_package());
        let _ = writeln!(out, "option java_package = {}", opts.java_package());
        let _ = writeln!(
            out,
            "option java_multiple_files = {}",
            opts.java_multiple_files()
        );
        for service in &file.service {
            let _ = writeln!(out, "service {package}.{}", service.name());
            for m in &service.method {
                let stream = |s: bool| if s { "stream " } else { "" };
                let _ = writeln!(
                    out,
                    "  rpc {}({}{}) returns ({}{})",
                    m.name(),
                    stream(m.client_streaming()),
                    m.input_type(),
                    stream(m.server_streaming()),
                    m.output_type()
                );
            }
        }
        for message in &file.message_type {
            render_message(&mut out, package, message);
        }
        for e in &file.enum_type {
            let _ = writeln!(out, "enum {package}.{}", e.name());
            for v in &e.value {
                let _ = writeln!(out, "  {} = {}", v.name(), v.number());
            }
        }
    }
    out
}

fn render_message(out: &mut String, scope: &str, message: &DescriptorProto) {
    let name = format!("{scope}.{}", message.name());
    let _ = writeln!(out, "message {name}");
    for f in &message.field {
        let label = match f.label() {
            Label::Repeated => "repeated ",
            _ => "",
        };
        let ty = match f.r#type() {
            Type::Message | Type::Enum => f.type_name().to_owned(),
            other => format!("{other:?}").to_lowercase(),
        };
        let oneof = f
            .oneof_index
            .map(|i| format!(" (oneof {})", message.oneof_decl[i as usize].name()))
            .unwrap_or_default();
        let _ = writeln!(out, "  {label}{ty} {} = {}{oneof}", f.name(), f.number());
    }
    for nested in &message.nested_type {
        render_message(out, &name, nested);
    }
}

#[test]
fn proto_golden_descriptor_is_unchanged() {
    let now = render();
    if std::env::var("LESSOR_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(GOLDEN, &now).expect("write golden file");
        return;
    }
    let golden = std::fs::read_to_string(GOLDEN).expect("proto/golden/lessor.v1.txt is checked in");
    if now != golden {
        let diff: Vec<String> = golden
            .lines()
            .filter(|l| !now.lines().any(|n| n == *l))
            .map(|l| format!("- {l}"))
            .chain(
                now.lines()
                    .filter(|l| !golden.lines().any(|g| g == *l))
                    .map(|l| format!("+ {l}")),
            )
            .collect();
        panic!(
            "the public API changed (names or numbers). Removed or renamed lines break clients:\n{}\n\
             If the change is additive and deliberate: LESSOR_BLESS=1 cargo test --test it proto_golden",
            diff.join("\n")
        );
    }
}

#[test]
fn proto_golden_contract_names_match_the_design() {
    let now = render();
    for line in [
        "service lessor.v1.Pool",
        "  rpc Lease(stream .lessor.v1.LeaseRequest) returns (stream .lessor.v1.LeaseResponse)",
        "  rpc Stats(.lessor.v1.StatsRequest) returns (.lessor.v1.StatsResponse)",
        "  .lessor.v1.Acquire acquire = 1 (oneof msg)",
        "  bytes data = 2 (oneof msg)",
        "  .lessor.v1.Release release = 3 (oneof msg)",
        "  uint32 max_lease_ms = 3",
        "  uint64 connection_uses = 7",
        "  bool ready = 14",
        "  DIRTY = 7",
        "  EVICT = 2",
        "option java_multiple_files = true",
    ] {
        assert!(
            now.lines().any(|l| l == line),
            "missing `{line}` in:\n{now}"
        );
    }
}
