//! `lessor-bench` as a user runs it: load mode against a running sidecar (an
//! in-process lessor in front of the in-process echo upstream), and clear
//! errors for what it cannot do.

use std::process::Output;
use std::time::Duration;

use lessor::Config;
use lessor::EchoServer;
use lessor::{Listener, Listeners};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

async fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lessor-bench"))
        .args(args)
        .env_remove("LESSOR_ADDR")
        .output()
        .await
        .expect("run lessor-bench")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An echo upstream and a lessor in front of it, both in this process.
async fn sidecar(tracker: &TaskTracker, stop: CancellationToken) -> String {
    let echo = EchoServer::start(Duration::ZERO, tracker, stop.clone())
        .await
        .unwrap();
    let yaml = format!(
        "upstreams:\n  - name: up\n    address: \"{}\"\n    pool: {{ max_size: 8 }}\n",
        echo.addr
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let listeners = Listeners {
        grpc: Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        control: None,
    };
    let addr = listeners.grpc.local_addr();
    tracker.spawn(lessor::run_with(
        config,
        listeners,
        async move { stop.cancelled().await },
        lessor::RunOptions::default(),
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_mode_against_a_running_lessor() {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let addr = sidecar(&tracker, stop.clone()).await;
    for pipeline in [false, true] {
        let mut args = vec![
            "--target",
            &addr,
            "--upstream",
            "up",
            "--concurrency",
            "4",
            "--duration",
            "300ms",
            "--payload",
            "32",
        ];
        if pipeline {
            args.push("--pipeline");
        }
        let out = bench(&args).await;
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
        assert!(
            stdout.contains("leases/s") && stdout.contains(", 0 errors"),
            "{stdout}"
        );
        for row in ["acquire", "request", "cycle"] {
            assert!(
                stdout.lines().any(|l| l.trim_start().starts_with(row)),
                "{stdout}"
            );
        }
    }
    let out = bench(&["--target", &addr]).await;
    assert_eq!(out.status.code(), Some(2), "--upstream is required");
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn a_missing_sidecar_binary_is_named() {
    for mode in [&["--compare", "--quick"][..], &["--soak", "10"][..]] {
        let mut args = mode.to_vec();
        args.extend(["--lessor-bin", "/nonexistent/lessor"]);
        let out = bench(&args).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("no lessor binary at /nonexistent/lessor")
                && stderr.contains("--lessor-bin"),
            "{stderr}"
        );
    }
}
