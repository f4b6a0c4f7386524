//! The `lessor` binary as a user runs it: `check-config` exit codes and
//! messages, `serve` refusing a bad config, `lease` and `stats` against a
//! running lessor, `demo`, `--version`.

use std::process::Output;

use lessor::EngineKind;
use tokio::process::Command;

use crate::support::{Lessor, TestUpstream, config_one};

async fn lessor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(args)
        .env_remove("LESSOR_CONFIG")
        .env_remove("LESSOR_ADDR")
        .output()
        .await
        .expect("run lessor")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_config(dir: &tempfile::TempDir, yaml: &str) -> String {
    let path = dir.path().join("lessor.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn cli_check_config_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "upstreams:\n  - { name: redis, address: 'redis:6379' }\n",
    );
    let out = lessor(&["check-config", "--config", &path]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("valid (1 upstreams)"));
}

#[tokio::test]
async fn cli_check_config_names_the_bad_field_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "upstreams:\n  - name: redis\n    address: 'redis:6379'\n    pool: { max_size: 0 }\n",
            "upstreams[0].pool.max_size: must be at least 1",
        ),
        (
            "upstreams:\n  - name: redis\n    address: 'redis:6379'\n    pool: { max_szie: 3 }\n",
            "unknown field `max_szie`",
        ),
        (
            "upstreams: []\n",
            "upstreams: at least one upstream is required",
        ),
        (
            "admin: { control_listen: '0.0.0.0:9091' }\nupstreams:\n  - { name: redis, address: 'redis:6379' }\n",
            "admin.control_listen: `0.0.0.0:9091` is not a loopback address",
        ),
    ];
    for (yaml, want) in cases {
        let path = write_config(&dir, yaml);
        for command in ["check-config", "serve"] {
            let out = lessor(&[command, "--config", &path]).await;
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command}: {}",
                text(&out.stderr)
            );
            assert!(
                text(&out.stderr).contains(want),
                "{command}: {}",
                text(&out.stderr)
            );
        }
    }
    // Off loopback on purpose: allowed, said so.
    let path = write_config(
        &dir,
        "admin: { control_listen: '0.0.0.0:9091', control_allow_remote: true }\nupstreams:\n  - { name: redis, address: 'redis:6379' }\n",
    );
    let out = lessor(&["check-config", "--config", &path]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = lessor(&["check-config", "--config", "/nonexistent/lessor.yaml"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/lessor.yaml"));
}

#[tokio::test]
async fn cli_version() {
    let out = lessor(&["--version"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("lessor {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lease_and_stats_against_a_running_lessor() {
    let up = TestUpstream::start().await;
    let server = Lessor::start(&config_one(&up.addr(), EngineKind::Bb8, &[])).await;
    let out = lessor(&[
        "lease",
        "up",
        "--target",
        &server.addr,
        "--send",
        "PING\\r\\n",
        "--send",
        "second",
    ])
    .await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("granted lease "), "{stdout}");
    assert!(stdout.contains("> PING\\r\\n\n< PING\\r\\n\n"), "{stdout}");
    assert!(stdout.contains("> second\n< second\n"), "{stdout}");
    assert!(
        stdout.ends_with("ended: RETURN (CLIENT_RELEASE)\n"),
        "{stdout}"
    );

    let out = lessor(&["lease", "up", "--target", &server.addr, "--evict"]).await;
    assert!(
        text(&out.stdout).ends_with("ended: EVICT (CLIENT_RELEASE)\n"),
        "{}",
        text(&out.stdout)
    );

    let out = lessor(&["lease", "nope", "--target", &server.addr]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("NotFound") || text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );

    let out = lessor(&["stats", "--target", &server.addr]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<_> = stdout.lines().collect();
    assert!(lines[0].starts_with("UPSTREAM  ENGINE  READY"), "{stdout}");
    assert!(lines[1].starts_with("up        bb8     yes"), "{stdout}");
    assert!(lines[1].contains(" client_evict=1 "), "{stdout}");
    // PROTOCOL, EXCHANGES, TLS.
    let cells: Vec<_> = lines[1].split_whitespace().collect();
    assert_eq!(cells[cells.len() - 3..], ["tcp", "-", "-"], "{stdout}");
}

#[tokio::test]
async fn cli_lease_rejects_a_bad_escape() {
    let out = lessor(&["lease", "up", "--send", "bad\\q"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown escape"));
}

#[tokio::test]
async fn cli_demo_runs_without_any_external_service() {
    let out = lessor(&["demo", "--leases", "60"]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for want in [
        "RETURN / CLIENT_RELEASE",
        "EVICT / CLIENT_RELEASE",
        "EVICT / DIRTY",
        "EVICT / LEASE_EXPIRED",
        "(no Ended)",
        "acquire latency",
        "echo-dp   deadpool",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[tokio::test]
async fn cli_example_configs_are_valid() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        let out = lessor(&["check-config", "--config", &path.display().to_string()]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
    }
}
