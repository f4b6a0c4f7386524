//! The Redis session tracker of one lease, driven by hand.

use bytes::Bytes;

use crate::protocol::redis::session::RedisSession;

/// One lease's Redis tracker: client bytes in (what would be forwarded
/// comes out), server bytes in (what the client would get comes out), and
/// the tracker's account of what it saw.
#[derive(Debug)]
pub struct RedisTracker(RedisSession);

impl RedisTracker {
    /// A tracker for a connection speaking RESP `resp` (2 or 3).
    pub fn new(resp: u8) -> Self {
        let mut session = RedisSession::new(512 << 20, resp);
        session.keep_log();
        Self(session)
    }

    /// Client bytes; what goes to Redis, or the protocol error that ends
    /// the lease.
    pub fn client_sent(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        self.0
            .client_sent(&Bytes::copy_from_slice(data))
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    }

    /// Server bytes; what goes to the client (local replies put in place).
    pub fn upstream_sent(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        self.0
            .upstream_sent(Bytes::copy_from_slice(data))
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    }

    /// Local replies due now (`QUIT`, `AUTH`, `HELLO`).
    pub fn take_local(&mut self) -> Option<Vec<u8>> {
        self.0.take_local().map(|b| b.to_vec())
    }

    /// Every non-empty request read so far, as its first arguments (at
    /// most 4, each cut to 64 bytes) and its argument count.
    pub fn commands(&self) -> Vec<(Vec<Vec<u8>>, u64)> {
        self.0
            .log()
            .iter()
            .filter(|c| c.argc > 0)
            .map(|c| (c.args.clone(), c.argc))
            .collect()
    }

    /// Replies Redis still owes.
    pub fn replies_due(&self) -> u64 {
        self.0.replies_due()
    }

    /// Whether the client bytes end between requests.
    pub fn at_boundary(&self) -> bool {
        self.0.at_boundary()
    }

    /// The end-of-lease verdict: `Ok` when the connection could go back
    /// (after any restore), or why it is evicted.
    pub fn verdict(&self) -> Result<(), String> {
        self.0.verdict()
    }

    /// Whether the connection could go back as it is once its replies are
    /// read: nothing changed its session.
    pub fn unchanged(&self) -> bool {
        self.0.unchanged()
    }
}
