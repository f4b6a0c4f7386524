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
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use super::Shared;
use crate::config::{ClientAuth, NativeListen, UpstreamConfig};
use crate::lease::registry::CancelTarget;

/// How long a routed CancelRequest may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    /// The address or socket could not be bound.
    #[error("upstreams `{upstream}` listen {addr}: {source}")]
    Bind {
        /// The upstream.
        upstream: String,
        /// What was bound.
        addr: String,
        /// Why not.
        #[source]
        source: io::Error,
    },
    /// The client password could not be read.
    #[error("upstreams `{upstream}` listen.password_file: {source}")]
    Password {
        /// The upstream.
        upstream: String,
        /// Why not.
        #[source]
        source: io::Error,
    },
}

/// A listener's sockets, bound before the sidecar serves.
pub(crate) struct Bound {
    upstream: String,
    listen: NativeListen,
    config: UpstreamConfig,
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    password: Option<String>,
}

impl BindError {
    /// What could not be bound, and why, for the server's error.
    pub(crate) fn into_parts(self) -> (String, io::Error) {
        match self {
            Self::Bind {
                upstream,
                addr,
                source,
            } => (format!("{addr} (upstreams `{upstream}` listen)"), source),
            Self::Password { upstream, source } => (
                format!("upstreams `{upstream}` listen.password_file"),
                source,
            ),
        }
    }
}

impl Bound {
    /// Binds the listener of `upstream`, if it has one.
    pub(crate) async fn bind(upstream: &UpstreamConfig) -> Result<Option<Self>, BindError> {
        let Some(listen) = upstream.listen.clone() else {
            return Ok(None);
        };
        let name = upstream.name.clone();
        let bind_err = |addr: String| {
            let name = name.clone();
            move |source| BindError::Bind {
                upstream: name,
                addr,
                source,
            }
        };
        let tcp = match listen.address {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(bind_err(addr.to_string()))?,
            ),
            None => None,
        };
        let port = tcp
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(listen.unix_port(), |a| a.port());
        let unix = match &listen.unix_socket_dir {
            Some(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                if std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    // A socket left by an earlier run.
                    let _ = std::fs::remove_file(&path);
                }
                let listener =
                    UnixListener::bind(&path).map_err(bind_err(path.display().to_string()))?;
                Some((listener, path))
            }
            None => None,
        };
        let password = match (listen.auth, &listen.password_file) {
            (ClientAuth::ScramSha256, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map(|p| p.trim_end_matches(['\r', '\n']).to_owned())
                    .map_err(|source| BindError::Password {
                        upstream: name.clone(),
                        source,
                    })?,
            ),
            _ => None,
        };
        Ok(Some(Self {
            upstream: upstream.name.clone(),
            listen,
            config: upstream.clone(),
            tcp,
            unix,
            password,
        }))
    }

    /// Where it listens, for the log.
    pub(crate) fn describe(&self) -> String {
        let mut at = Vec::new();
        if let Some(addr) = self.tcp.as_ref().and_then(|l| l.local_addr().ok()) {
            at.push(addr.to_string());
        }
        if let Some((_, path)) = &self.unix {
            at.push(path.display().to_string());
        }
        format!("{} ({})", self.upstream, at.join(", "))
    }

    /// Starts accepting; every task belongs to `shared.tracker`.
    pub(crate) fn spawn(self, shared: Shared) {
        let listener = Arc::new(Listener {
            upstream: self.upstream,
            clients: Arc::new(Semaphore::new(self.listen.max_clients as usize)),
            listen: self.listen,
            config: self.config,
            password: self.password,
            keys: Keys::default(),
            names: prepared::Names::default(),
            parameters: Mutex::new(None),
            next_client: AtomicU64::new(1),
            shared,
        });
        if let Some(tcp) = self.tcp {
            let l = listener.clone();
            listener.shared.tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        () = l.shared.stop_accepting.cancelled() => return,
                        accepted = tcp.accept() => accepted,
                    };
                    match accepted {
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            l.clone().serve(stream, peer.to_string());
                        }
                        Err(e) => accept_failed(&l.upstream, &e).await,
                    }
                }
            });
        }
        if let Some((unix, path)) = self.unix {
            let l = listener.clone();
            listener.shared.tracker.spawn(async move {
                // Removed when the listener stops, so a restart can bind.
                struct Unlink(PathBuf);
                impl Drop for Unlink {
                    fn drop(&mut self) {
                        let _ = std::fs::remove_file(&self.0);
                    }
                }
                let _unlink = Unlink(path);
                loop {
                    let accepted = tokio::select! {
                        () = l.shared.stop_accepting.cancelled() => return,
                        accepted = unix.accept() => accepted,
                    };
                    match accepted {
                        Ok((stream, _)) => l.clone().serve(stream, "unix".to_owned()),
                        Err(e) => accept_failed(&l.upstream, &e).await,
                    }
                }
            });
        }
    }
}

/// Too many open files and the like: logged, and a short pause so a
/// persistent failure does not spin.
async fn accept_failed(upstream: &str, error: &io::Error) {
    tracing::warn!(upstream, %error, "listener accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

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
    /// Serves one accepted connection in a task of its own.
    fn serve<S>(self: Arc<Self>, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Held while the client is connected: the drain waits for it.
        let open = self.shared.open.subscribe();
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let tracker = self.shared.tracker.clone();
        tracker.spawn(async move {
            client::run(self, stream, peer, id).await;
            drop(open);
        });
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
