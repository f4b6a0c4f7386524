//! Shared fixtures: real upstream servers, an in-process lessor on a free
//! port, and condition waits (never bare sleeps).

pub mod http;
pub mod kube_api;
pub mod kube_leases;
pub mod netns;
pub mod otlp;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod tls;
pub mod upstream;

/// Generates `bb8::NAME` and `deadpool::NAME` tests from `async fn NAME(EngineKind)`.
#[macro_export]
macro_rules! for_both_engines {
    ($($name:ident),* $(,)?) => {
        mod bb8 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(lessor::EngineKind::Bb8).await
                }
            )*
        }
        mod deadpool {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(lessor::EngineKind::Deadpool).await
                }
            )*
        }
    };
}

use std::future::Future;
use std::time::Duration;

use lessor::{Config, EngineKind};
use lessor::{Listener, Listeners, ServerError};
use lessor_client::pb::UpstreamStats;
use lessor_client::{Client, ClientError, Lease, LeaseOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use upstream::{Mode, TestUpstream};

/// How long a condition may take before a test fails. Generous: a busy
/// two-core CI machine must not flake; a broken build fails anyway.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// One upstream's YAML, with extra keys (`pool: {...}` lines) indented under it.
pub fn upstream_yaml(name: &str, addr: &str, engine: EngineKind, extra: &[&str]) -> String {
    let mut y = format!(
        "  - name: {name}\n    address: \"{addr}\"\n    engine: {}\n",
        engine.as_str()
    );
    for line in extra {
        y.push_str("    ");
        y.push_str(line);
        y.push('\n');
    }
    y
}

/// A whole config with one upstream named `up`.
pub fn config_one(addr: &str, engine: EngineKind, extra: &[&str]) -> String {
    format!("upstreams:\n{}", upstream_yaml("up", addr, engine, extra))
}

/// lessor running in this process on a free loopback port.
pub struct Lessor {
    /// `127.0.0.1:port` (or `unix:///path`).
    pub addr: String,
    /// The admin HTTP server's `127.0.0.1:port`.
    pub admin: String,
    /// A client connected to it.
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    task: AbortOnDrop,
}

/// Stops an in-process lessor when its test ends, however it ends.
struct AbortOnDrop(Option<JoinHandle<Result<(), ServerError>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

impl Lessor {
    /// Starts lessor with this YAML config on a free loopback port.
    pub async fn start(yaml: &str) -> Self {
        Self::start_on(yaml, "127.0.0.1:0").await
    }

    /// Starts lessor with this YAML config, listening on `listen`.
    pub async fn start_on(yaml: &str, listen: &str) -> Self {
        Self::start_with(yaml, listen, lessor::RunOptions::default()).await
    }

    /// Starts lessor with this YAML config and run options.
    pub async fn start_with(yaml: &str, listen: &str, options: lessor::RunOptions) -> Self {
        let config = Config::from_yaml(yaml).unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"));
        let listeners = Listeners {
            grpc: Listener::bind(&listen.parse().unwrap()).await.unwrap(),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            control: None,
        };
        let addr = listeners.grpc.local_addr();
        let admin = listeners.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(lessor::run_with(
            config,
            listeners,
            async {
                let _ = stopped.await;
            },
            options,
        ));
        let client = Client::connect(&addr).await.expect("connect to lessor");
        Self {
            addr,
            admin,
            client,
            stop: Some(stop),
            task: AbortOnDrop(Some(task)),
        }
    }

    /// Stats of one upstream.
    pub async fn stats(&self, name: &str) -> UpstreamStats {
        let mut all = self.client.stats(name).await.expect("stats");
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    /// Polls `Stats` of `up` until `pred` holds; panics with the last stats.
    pub async fn wait_for(
        &self,
        what: &str,
        pred: impl Fn(&UpstreamStats) -> bool,
    ) -> UpstreamStats {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let s = self.stats("up").await;
            if pred(&s) {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; last stats: {s:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every connection lessor opened to `up` is either still
    /// open or counted under an eviction reason: no close goes uncounted.
    pub async fn assert_accounted(&self) {
        self.wait_for("every closed connection counted", |s| {
            u64::from(s.connections) + s.evictions.values().sum::<u64>() == s.connections_created
        })
        .await;
    }

    /// Waits until `up` has accepted every connection lessor holds to it:
    /// a connection still in the kernel's accept queue would miss a
    /// `close_all`, `reset_all` or `inject`.
    pub async fn until_accepted(&self, up: &TestUpstream) {
        self.wait_for("the upstream accepted every connection", |s| {
            s.connections as usize == up.open()
        })
        .await;
    }

    /// A lease on `up` with default options.
    pub async fn lease(&self) -> Result<Lease, ClientError> {
        self.client.lease("up", &LeaseOptions::default()).await
    }

    /// Starts the drain (as a signal would) without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals shutdown, drops this handle's client, and waits for `run` to
    /// return.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.begin_shutdown();
        self.stopped().await
    }

    /// Drops this handle's client and waits for `run` to return (after a
    /// drain begun with [`Lessor::begin_shutdown`]).
    pub async fn stopped(mut self) -> Result<(), ServerError> {
        let task = self.task.0.take().expect("running");
        drop(self.client);
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("lessor stops within the test's patience")
            .expect("server task")
    }
}

/// Waits for `cond` to become true, polling.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `grpc.health.v1` status of `service` (`""` for the whole server).
pub async fn grpc_health(addr: &str, service: &str) -> Result<i32, tonic::Status> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let uri = format!("http://{addr}");
    let channel = tonic::transport::Endpoint::from_shared(uri)
        .expect("a valid uri")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    Ok(HealthClient::new(channel)
        .check(request)
        .await?
        .into_inner()
        .status)
}

/// `grpc.health.v1` SERVING.
pub const SERVING: i32 = 1;
/// `grpc.health.v1` NOT_SERVING.
pub const NOT_SERVING: i32 = 2;

/// Says on the terminal that a test is skipped and why. Written to the
/// process's stderr directly, past the harness's output capture, so the skip
/// shows in every run, not only in a failing test's output.
pub fn skip(why: &str) {
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// Eviction count for one reason.
pub fn evictions(s: &UpstreamStats, reason: &str) -> u64 {
    s.evictions.get(reason).copied().unwrap_or(0)
}

/// One IPv4 TCP socket as the kernel lists it in `/proc/net/tcp`.
#[derive(Debug, Clone, Copy)]
pub struct TcpSocket {
    /// The kernel's state number (`ESTABLISHED` = 1, `CLOSE_WAIT` = 8).
    pub state: u8,
    /// Bytes received and not yet read by the owner.
    pub rx_queue: u64,
}

/// `/proc/net/tcp`'s `CLOSE_WAIT`: the peer's FIN arrived, the owner has not
/// closed yet.
pub const CLOSE_WAIT: u8 = 8;

/// Every socket on this machine connected to remote port `port`: for an
/// upstream's port, lessor's pooled sockets (and a test's own connections).
/// What the kernel knows, so a test can wait for a FIN or stray bytes to
/// arrive instead of sleeping.
pub fn sockets_to(port: u16) -> Vec<TcpSocket> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields.get(2)?.rsplit(':').next()?;
            if u16::from_str_radix(remote_port, 16).ok()? != port {
                return None;
            }
            let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
            let rx_queue = u64::from_str_radix(fields.get(4)?.rsplit(':').next()?, 16).ok()?;
            Some(TcpSocket { state, rx_queue })
        })
        .collect()
}

/// The port of a `host:port` address.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// Waits until `n` sockets to remote port `port` (lessor's, to an upstream)
/// have the peer's FIN: what a checkout's liveness peek then sees.
pub async fn wait_close_wait(port: u16, n: usize) {
    eventually("the upstream's FINs reached lessor's sockets", || async {
        sockets_to(port)
            .iter()
            .filter(|s| s.state == CLOSE_WAIT)
            .count()
            >= n
    })
    .await;
}
