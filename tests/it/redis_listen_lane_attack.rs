//! Hostile cases for the Redis listener's lane (`src/listener/redis/shared.rs`),
//! against a scripted upstream so the server's misbehaviour is exact.

use std::time::Duration;

use lessor::EngineKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Lessor, PATIENCE, config_one, eventually, ports};

/// Parses one RESP array command off the front of `buf`: its upper-cased
/// name and its first argument.
fn take_command(buf: &mut Vec<u8>) -> Option<(String, String)> {
    fn line(b: &[u8], at: usize) -> Option<(usize, usize)> {
        let p = b[at..].windows(2).position(|w| w == b"\r\n")?;
        let n: usize = std::str::from_utf8(&b[at + 1..at + p]).ok()?.parse().ok()?;
        Some((n, at + p + 2))
    }
    let (argc, mut at) = line(buf, 0)?;
    let mut args = Vec::new();
    for _ in 0..argc {
        let (len, start) = line(buf, at)?;
        if buf.len() < start + len + 2 {
            return None;
        }
        args.push(String::from_utf8_lossy(&buf[start..start + len]).to_string());
        at = start + len + 2;
    }
    buf.drain(..at);
    Some((
        args.first()
            .map(|a| a.to_ascii_uppercase())
            .unwrap_or_default(),
        args.get(1).cloned().unwrap_or_default(),
    ))
}

/// A scripted upstream: `GET cut` is answered with the start of a bulk
/// string and the connection is closed; `GET x` with `$1 x`; PING with
/// PONG; anything else with `+OK`.
async fn scripted() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let mut out = Vec::new();
                    let mut cut = false;
                    while let Some((name, arg)) = take_command(&mut buf) {
                        match (name.as_str(), arg.as_str()) {
                            ("PING", _) => out.extend_from_slice(b"+PONG\r\n"),
                            ("GET", "cut") => {
                                out.extend_from_slice(b"$10\r\nabc");
                                cut = true;
                                break;
                            }
                            ("GET", "x") => out.extend_from_slice(b"$1\r\nx\r\n"),
                            _ => out.extend_from_slice(b"+OK\r\n"),
                        }
                    }
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                    if cut {
                        let _ = s.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads what lessor sends until `want` bytes came or it closes.
async fn read_some(s: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(PATIENCE, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
            if done(&got) {
                return;
            }
        }
    })
    .await;
    got
}

/// The server closes the lane's connection in the middle of a reply: the
/// client whose batch was on it must get whole RESP frames (lessor's error
/// in place of each reply it waited for), never the start of the server's
/// reply with lessor's error glued into it, or, having been told nothing
/// it can parse, its next reply is read as the rest of the broken one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listen_lane_cut_reply_keeps_framing() {
    let upstream = scripted().await;
    let port = ports::reserve();
    let _lessor = Lessor::start(&config_one(
        &upstream,
        EngineKind::Bb8,
        &[
            "protocol: redis",
            "pool: { max_size: 2, min_idle: 0, connect_timeout: 5s, checkout_timeout: 5s }",
            &format!("listen: {{ address: \"127.0.0.1:{port}\" }}"),
        ],
    ))
    .await;
    eventually("the listener accepts", || async move {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // Two plain commands: a lane batch. The first reply is whole, the
    // second is cut by the server's close.
    c.write_all(b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n*2\r\n$3\r\nGET\r\n$3\r\ncut\r\n")
        .await
        .unwrap();
    let got = read_some(&mut c, |g| g.ends_with(b"connection\r\n")).await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("$1\r\nx\r\n"), "first reply: {text:?}");
    assert!(
        !text.contains("abc"),
        "a cut server reply reached the client with lessor's error glued in: {text:?}"
    );
    let _ = Duration::ZERO;
}
