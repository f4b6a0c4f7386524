//! The PostgreSQL listener: unmodified clients connect to it as to the
//! database. lessor answers their startup itself, then pools them over the
//! upstream's connections: in `transaction` mode a client holds a server
//! connection from its first message after ReadyForQuery `I` until the next
//! ReadyForQuery `I` with nothing of its own outstanding; in `session` mode
//! until it disconnects. A client that uses what binds it to one session
//! and lessor can see (`LISTEN`, a notification, SQL `PREPARE`, a cursor
//! `WITH HOLD`) keeps its connection from then on. Named prepared
//! statements of the extended protocol follow the client (`prepared`).
//!
//! - `startup`: SSL/GSS refusal, CancelRequest, StartupMessage, parameters;
//! - `client`: one client's life: idle, holding, relaying, ending a hold;
//! - `prepared`: named prepared statements across server connections;
//! - `messages`: the backend messages lessor writes itself.

mod client;
mod inspect;
mod messages;
mod prepared;
mod startup;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use super::{Serve, Shared};
use crate::config::{NativeListen, UpstreamConfig};
use crate::lease::registry::CancelTarget;

/// How long a routed CancelRequest may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// One upstream's listener, shared by its clients.
pub(crate) struct Listener {
    upstream: String,
    listen: NativeListen,
    /// The upstream's config at start (the pool itself is looked up at
    /// each checkout, so a reload's pool is used).
    config: UpstreamConfig,
    /// The password clients present (`scram-sha-256`).
    password: Option<String>,
    /// `max_clients`: a permit per connected client.
    clients: Arc<Semaphore>,
    /// The cancel keys lessor issued, to the client each belongs to.
    keys: Keys,
    /// lessor's names of the prepared statements its clients use.
    names: prepared::Names,
    /// The parameters a server connection last reported, for the startup
    /// of the next client (a checkout when none is known yet).
    parameters: Mutex<Option<BTreeMap<String, String>>>,
    next_client: AtomicU64,
    shared: Shared,
}

impl Listener {
    /// The listener of `upstream`, before it accepts.
    pub(super) fn new(
        upstream: String,
        listen: NativeListen,
        config: UpstreamConfig,
        password: Option<String>,
        shared: Shared,
    ) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            clients: Arc::new(Semaphore::new(listen.max_clients as usize)),
            listen,
            config,
            password,
            keys: Keys::default(),
            names: prepared::Names::default(),
            parameters: Mutex::new(None),
            next_client: AtomicU64::new(1),
            shared,
        })
    }
}

impl Serve for Listener {
    async fn run<S>(self: Arc<Self>, stream: S, peer: String, id: u64)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        client::run(self, stream, peer, id).await;
    }

    fn upstream(&self) -> &str {
        &self.upstream
    }

    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn next_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }
}

/// Where a client's CancelRequest goes: the server connection it holds at
/// that moment, if any. An async lock, held while a cancel is sent and taken
/// before a hold ends, so a cancel can never reach the next client of that
/// connection.
#[derive(Debug, Default)]
pub(crate) struct Slot(tokio::sync::Mutex<Option<CancelTarget>>);

impl Slot {
    async fn set(&self, target: Option<CancelTarget>) {
        *self.0.lock().await = target;
    }
}

/// The keys lessor issued (BackendKeyData), each to one client.
#[derive(Debug, Default)]
struct Keys(Mutex<HashMap<(i32, i32), Arc<Slot>>>);

impl Keys {
    /// A fresh, unguessable key for a client; removed when it leaves.
    fn issue(&self) -> (i32, i32, Arc<Slot>) {
        let slot = Arc::new(Slot::default());
        let mut keys = self.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut raw = [0u8; 8];
            if getrandom::fill(&mut raw).is_err() {
                raw = fastrand::u64(..).to_be_bytes();
            }
            let pid = i32::from_be_bytes([raw[0] & 0x7f, raw[1], raw[2], raw[3]]).max(1);
            let secret = i32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
            if let std::collections::hash_map::Entry::Vacant(e) = keys.entry((pid, secret)) {
                e.insert(slot.clone());
                return (pid, secret, slot);
            }
        }
    }

    fn remove(&self, pid: i32, secret: i32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(pid, secret));
    }

    fn find(&self, pid: i32, secret: i32) -> Option<Arc<Slot>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, secret))
            .cloned()
    }
}

/// A CancelRequest: cancels what the key's client runs on the server
/// connection it holds now, with that server's key; dropped when the key is
/// unknown or its client holds nothing.
async fn cancel(listener: &Listener, pid: i32, secret: i32) {
    let Some(slot) = listener.keys.find(pid, secret) else {
        return;
    };
    let held = slot.0.lock().await;
    let Some(target) = held.clone() else {
        return;
    };
    let endpoint: SocketAddr = target.endpoint;
    if let Err(e) = crate::protocol::postgres::cancel::send(
        endpoint,
        target.pid,
        target.secret,
        CANCEL_TIMEOUT,
        target.tls,
    )
    .await
    {
        tracing::debug!(upstream = %listener.upstream, error = %e, "cancel request failed");
    }
    drop(held);
}
