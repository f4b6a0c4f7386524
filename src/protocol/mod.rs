//! Protocol-aware upstreams. A `tcp` upstream's leases move bytes lessor
//! does not understand; a protocol upstream's are parsed both ways, so that
//! lessor opens the session itself (credentials stay in the sidecar), knows
//! exactly whether a released connection is clean, and can answer a whole
//! request in one `Exchange` call.

pub(crate) mod redis;

use tokio::net::TcpStream;

use crate::config::{Protocol, UpstreamConfig};

pub(crate) use redis::handshake::OpenError;

/// What a new connection needs before it joins the pool: nothing for `tcp`,
/// the session handshake for a protocol upstream.
#[derive(Debug, Clone)]
pub(crate) enum Opener {
    /// Opaque bytes: the connection is ready once connected.
    Tcp,
    /// `AUTH`, `HELLO`, `SELECT`, `CLIENT SETNAME` as configured.
    Redis(crate::config::RedisConfig),
}

impl Opener {
    /// The opener an upstream's config asks for.
    pub(crate) fn for_upstream(config: &UpstreamConfig) -> Self {
        match config.protocol {
            Protocol::Tcp => Self::Tcp,
            Protocol::Redis => Self::Redis(config.redis.clone()),
        }
    }

    /// Opens the session on a connected socket (inside the dial's timeout).
    pub(crate) async fn open(&self, stream: &mut TcpStream) -> Result<(), OpenError> {
        match self {
            Self::Tcp => Ok(()),
            Self::Redis(cfg) => redis::handshake::open(stream, cfg).await,
        }
    }
}
