//! The live PostgreSQL leases that a `Cancel` call may name: each entry is
//! the session's endpoint and backend key, registered when the lease is
//! granted and removed when it ends (by a drop guard, so no path leaves one
//! behind).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where a session's CancelRequest goes, and its key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CancelTarget {
    /// The endpoint the session is connected to.
    pub endpoint: SocketAddr,
    /// BackendKeyData's process id.
    pub pid: i32,
    /// BackendKeyData's secret key.
    pub secret: i32,
}

/// Why a `Cancel` did nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CancelError {
    /// No live PostgreSQL lease has that id.
    #[error("no live PostgreSQL lease `{0}`")]
    NotFound(String),
    /// The CancelRequest could not be delivered.
    #[error("cannot reach {endpoint} to cancel: {error}")]
    Unreachable {
        /// The session's endpoint.
        endpoint: SocketAddr,
        /// What failed.
        error: String,
    },
}

/// The registry, shared by every lease stream and the `Cancel` RPC.
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    live: Mutex<HashMap<String, CancelTarget>>,
}

impl Cancels {
    /// Registers a lease until the returned guard drops.
    pub(crate) fn register(self: &Arc<Self>, lease_id: &str, target: CancelTarget) -> Registered {
        self.lock().insert(lease_id.to_owned(), target);
        Registered {
            cancels: Arc::clone(self),
            lease_id: lease_id.to_owned(),
        }
    }

    /// Sends the CancelRequest for `lease_id` on a new connection, and waits
    /// (within `timeout`) for the server to close it, which it does once the
    /// request is handled.
    pub(crate) async fn cancel(
        &self,
        lease_id: &str,
        timeout: Duration,
    ) -> Result<SocketAddr, CancelError> {
        let target = self
            .lock()
            .get(lease_id)
            .copied()
            .ok_or_else(|| CancelError::NotFound(crate::pool::printable_name(lease_id)))?;
        let send = async {
            let mut stream = tokio::net::TcpStream::connect(target.endpoint).await?;
            let mut message = bytes::BytesMut::new();
            postgres_protocol::message::frontend::cancel_request(
                target.pid,
                target.secret,
                &mut message,
            );
            stream.write_all(&message).await?;
            let mut sink = [0u8; 64];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(timeout, send).await {
            Ok(Ok(())) => Ok(target.endpoint),
            Ok(Err(e)) => Err(CancelError::Unreachable {
                endpoint: target.endpoint,
                error: e.to_string(),
            }),
            Err(_) => Err(CancelError::Unreachable {
                endpoint: target.endpoint,
                error: format!("no answer within {timeout:?}"),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancelTarget>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps a lease cancellable while it lives.
#[derive(Debug)]
pub(crate) struct Registered {
    cancels: Arc<Cancels>,
    lease_id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.cancels.lock().remove(&self.lease_id);
    }
}
