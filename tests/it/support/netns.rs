//! A second network namespace joined to this one by a veth pair: a host
//! whose packets can be made to vanish, which loopback cannot do (it
//! acknowledges everything, so a loopback peer never "silently disappears").
//! Needs root and iproute2; where either is missing the test is skipped,
//! saying so, unless `LESSOR_REQUIRE_NETNS=1`.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use super::process::command;

/// A namespace with one address, `peer_ip`, reachable from this one over a
/// veth pair; deleted (with its end of the pair) on drop.
pub struct Netns {
    name: String,
    host_if: String,
    peer_if: String,
    /// The namespace's address; this namespace's end is the `.1` beside it.
    pub peer_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Creates the namespace and its link, or returns `None` (skip) when
    /// this machine does not allow it and `LESSOR_REQUIRE_NETNS` is not `1`.
    pub fn create() -> Option<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 10_000) * 10 + n % 10;
        let net = id % 250;
        let ns = Self {
            name: format!("lessor-test-{id}"),
            host_if: format!("lt{id}h"),
            peer_if: format!("lt{id}p"),
            peer_ip: format!("10.213.{net}.2"),
        };
        match ns.set_up(net) {
            Ok(()) => Some(ns),
            Err(e) if std::env::var("LESSOR_REQUIRE_NETNS").is_ok_and(|v| v == "1") => {
                panic!("LESSOR_REQUIRE_NETNS=1 but a network namespace cannot be made: {e}")
            }
            Err(e) => {
                super::skip(&format!(
                    "no network namespace ({e}); run as root with iproute2, or set LESSOR_REQUIRE_NETNS=1 to fail instead"
                ));
                None
            }
        }
    }

    fn set_up(&self, net: u32) -> Result<(), String> {
        let (ns, host, peer) = (&self.name, &self.host_if, &self.peer_if);
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns,
        ])?;
        ip(&["addr", "add", &format!("10.213.{net}.1/30"), "dev", host])?;
        ip(&["link", "set", host, "up"])?;
        let peer_addr = format!("{}/30", self.peer_ip);
        ip(&["-n", ns, "addr", "add", &peer_addr, "dev", peer])?;
        ip(&["-n", ns, "link", "set", peer, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Starts `program` inside the namespace; it dies with the test.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Child {
        command("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} in {}: {e}", self.name))
    }

    /// Takes the namespace's end of the link down: from here on, packets to
    /// `peer_ip` vanish without an answer, not even a reset.
    pub fn blackhole(&self) {
        ip(&["-n", &self.name, "link", "set", &self.peer_if, "down"]).expect("link down");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
