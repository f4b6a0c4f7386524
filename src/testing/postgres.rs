//! The PostgreSQL session tracker of one lease, driven by hand.

use bytes::Bytes;

use crate::config::{OnOpenTransaction, PostgresConfig};
use crate::protocol::postgres::session::PgSession;

/// One lease's PostgreSQL tracker: frontend bytes in (what would be
/// forwarded comes out), backend bytes in, and the tracker's account of
/// what the server owes.
#[derive(Debug)]
pub struct PgTracker(PgSession);

/// What the tracker makes of the session so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgReport {
    /// ReadyForQuery messages received, each one expected.
    pub ready_for_query: u64,
    /// The status byte of the last one (`I` before any).
    pub status: u8,
    /// Everything sent was answered, and no batch waits for its Sync.
    pub settled: bool,
    /// Why the tracker cannot follow the server any more, if it cannot
    /// (the session is then evicted).
    pub lost: Option<String>,
    /// The lease's verdict under `on_open_transaction: rollback`: `Ok`
    /// when the connection may go back (after rollback and reset).
    pub verdict: Result<(), String>,
}

impl Default for PgTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl PgTracker {
    /// A tracker for a fresh lease with the default configuration.
    pub fn new() -> Self {
        let cfg = PostgresConfig {
            user: "lessor".into(),
            ..PostgresConfig::default()
        };
        Self(PgSession::new(&cfg))
    }

    /// Frontend bytes; what goes to the server, or why the lease ends.
    pub fn client_sent(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        self.0
            .client_sent(&Bytes::copy_from_slice(data))
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    }

    /// Backend bytes, as they arrive.
    pub fn upstream_sent(&mut self, data: &[u8]) -> Result<(), String> {
        self.0.upstream_sent(data).map_err(|e| e.to_string())
    }

    /// The tracker's account now.
    pub fn report(&self) -> PgReport {
        PgReport {
            ready_for_query: self.0.ready_for_query(),
            status: self.0.status(),
            settled: self.0.settled(),
            lost: self.0.lost().map(str::to_owned),
            verdict: self.0.verdict(OnOpenTransaction::Rollback),
        }
    }
}
