//! Ports for servers a test starts by port number (redis-server, `lessor
//! serve`, rotel) or stops and restarts on the same port.
//!
//! Binding port 0 and handing the number to another process races: between
//! the probe's close and the server's bind, any socket in any test can be
//! given that port. These ports come from below the kernel's ephemeral range,
//! which neither `bind(0)` nor an outgoing connection ever picks, and each is
//! handed out once per test process, so a port stays ours across restarts.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU16, Ordering};

/// How many ports below the ephemeral range the suite may use.
const SPAN: u16 = 8000;

/// A port no other test in this process will be given, currently free on
/// 127.0.0.1 (and on 127.0.0.2-3, for tests that put several servers on one
/// port).
pub fn reserve() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let (low, high) = range();
    let span = high - low;
    // A random start, so suites run at once on one machine rarely meet.
    let _ = NEXT.compare_exchange(
        0,
        fastrand::u16(0..span),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = low + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let free = [1, 2, 3]
            .iter()
            .all(|last| TcpListener::bind((Ipv4Addr::new(127, 0, 0, *last), port)).is_ok());
        if free {
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// `[low, high)`: the `SPAN` ports just below the ephemeral range.
fn range() -> (u16, u16) {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = first_ephemeral.max(SPAN + 1024);
    (high - SPAN, high)
}

/// Binds a listener on `ip` at a reserved port, trying another when one is
/// taken after all (another program on the machine may use the range).
pub async fn bind(ip: &str) -> tokio::net::TcpListener {
    let mut last = None;
    for _ in 0..20 {
        match tokio::net::TcpListener::bind((ip, reserve())).await {
            Ok(listener) => return listener,
            Err(e) => last = Some(e),
        }
    }
    panic!("no reserved port could be bound on {ip}: {last:?}");
}
