//! PostgreSQL: the streaming message framer, the startup and
//! authentication lessor runs on each new connection, the session tracker
//! behind a lease's end rules, and the rollback-and-reset that makes a used
//! session idle-ready.

pub(crate) mod cancel;
pub(crate) mod frame;
pub(crate) mod handshake;
pub(crate) mod reset;
// The PostgreSQL listener (src/listener/) is its user; until it lands, unused.
#[allow(dead_code)]
pub(crate) mod scram_server;
pub(crate) mod server;
pub(crate) mod session;

use std::collections::BTreeMap;

/// What the server told lessor when the session opened: what a driver
/// adopting the session (pgx's `pgconn.Construct`, say) needs instead of
/// its own startup, and what a CancelRequest needs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Backend {
    /// Every ParameterStatus: `server_version`, `client_encoding`,
    /// `TimeZone`... kept current from the reports leases and resets see.
    pub parameters: BTreeMap<String, String>,
    /// BackendKeyData's process id.
    pub pid: i32,
    /// BackendKeyData's secret key, as sent (4 bytes in protocol 3.0).
    pub secret: bytes::Bytes,
    /// The last lease left something running (a query unanswered): an
    /// eviction sends the session's CancelRequest.
    pub busy: bool,
    /// The parameters as the server reported them at startup, before any
    /// lease changed one: what a native listener tells a new client.
    pub initial: BTreeMap<String, String>,
    /// The statements a native listener prepared on this session under its
    /// own names (`lessor_N`); cleared by anything that may drop them (a
    /// reset), so it errs only towards "absent".
    pub prepared: std::collections::HashSet<String>,
}

impl Backend {
    /// The secret key as the CancelRequest of protocol 3.0 carries it.
    pub(crate) fn secret_i32(&self) -> Option<i32> {
        <[u8; 4]>::try_from(&self.secret[..])
            .ok()
            .map(i32::from_be_bytes)
    }
}
