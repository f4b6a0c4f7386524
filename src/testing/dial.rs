//! One dial of an upstream exactly as its pool makes it (TCP, SSLRequest
//! and TLS where configured, the session handshake), for the benchmark's
//! figure of what a pool saves per request.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::config::Config;
use crate::pool::Pool;

/// Dials one upstream of a config, without a pool around the connection.
pub struct DialProbe {
    pool: Arc<Pool>,
}

impl DialProbe {
    /// The upstream `name` of `config`; `None` when there is none by that name.
    pub fn new(config: &Config, name: &str) -> Option<Self> {
        let upstream = config.upstreams.iter().find(|u| u.name == name)?;
        let pool = Pool::new(
            upstream.clone(),
            Arc::new(AtomicU64::new(1)),
            Arc::new(tokio::sync::watch::Sender::new(())),
        );
        Some(Self { pool })
    }

    /// Dials once and closes the connection; the error is the dial error's
    /// text, as a log line would show it.
    pub async fn dial(&self) -> Result<(), String> {
        self.pool.dial_once().await.map_err(|e| e.to_string())
    }
}
