//! `/metrics`: Prometheus text 0.0.4 or OpenMetrics 1.0, by the scraper's
//! `Accept` header, encoded by `prometheus-client`.
//!
//! Pool figures are read from the pools' own counters at scrape time (a
//! collector), so there is one count of everything and the exposition can
//! never drift from `Stats`. Labels are bounded: `upstream`, and small fixed
//! sets (`state`, `reason`, `result`, `direction`, `disposition`); never a
//! lease or connection id.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::pool::{
    CONNECT_ERROR_REASONS, Counters, EXCHANGE_OUTCOMES, EvictReason, Histogram, HistogramSnapshot,
    PoolSet,
};
use crate::telemetry::SpanCounters;

/// Exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `text/plain; version=0.0.4`.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the scraper asks for it, Prometheus text otherwise.
    pub(crate) fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    /// The matching `Content-Type`.
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The registry behind `/metrics`.
pub(crate) fn registry(
    pools: Arc<PoolSet>,
    spans: Arc<SpanCounters>,
    reloads: Arc<crate::reload::Reloads>,
    listeners: Arc<crate::listener::stats::ListenerStats>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ListenerCollector { listeners }));
    registry.register_collector(Box::new(ReloadCollector { reloads }));
    registry.register_collector(Box::new(super::fleet_metrics::FleetCollector {
        pools: pools.clone(),
    }));
    registry.register_collector(Box::new(PoolCollector { pools }));
    // The data plane's runtime, captured here: the admin server that encodes
    // the metrics runs on a runtime of its own.
    let data_plane = tokio::runtime::Handle::try_current().ok();
    registry.register_collector(Box::new(ProcessCollector { data_plane }));
    registry.register_collector(Box::new(SpanCollector { spans }));
    registry
}

/// Config reloads by result, and the hash of the config running now.
#[derive(Debug)]
struct ReloadCollector {
    reloads: Arc<crate::reload::Reloads>,
}

impl Collector for ReloadCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = &self.reloads;
        let samples = crate::reload::RESULTS
            .map(|result| ([("result", result)], ConstCounter::new(r.count(result))));
        family(
            &mut e,
            "lessor_config_reloads",
            "Config reloads (SIGHUP or a change of the file), by result.",
            samples,
        )?;
        family(
            &mut e,
            "lessor_config_info",
            "1, labelled with the hash of the config running now.",
            [([("hash", r.hash())], ConstGauge::new(1i64))],
        )
    }
}

/// The native listeners: clients connected and accepted, and (Redis) how
/// batches went, on the shared lane or on a connection of their own.
#[derive(Debug)]
struct ListenerCollector {
    listeners: Arc<crate::listener::stats::ListenerStats>,
}

impl Collector for ListenerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.listeners.snapshot();
        if all.is_empty() {
            return Ok(());
        }
        let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        family(
            &mut e,
            "lessor_listener_clients",
            "Clients connected to a native listener now.",
            all.iter().map(|(upstream, c)| {
                (
                    [("upstream", upstream.as_str())],
                    ConstGauge::new(i64::try_from(load(&c.clients)).unwrap_or(i64::MAX)),
                )
            }),
        )?;
        family(
            &mut e,
            "lessor_listener_connections",
            "Clients a native listener accepted.",
            all.iter().map(|(upstream, c)| {
                (
                    [("upstream", upstream.as_str())],
                    ConstCounter::new(load(&c.connections)),
                )
            }),
        )?;
        let redis: Vec<_> = all
            .iter()
            .filter(|(_, c)| c.redis.load(Ordering::Relaxed))
            .collect();
        if redis.is_empty() {
            return Ok(());
        }
        family(
            &mut e,
            "lessor_listener_batches",
            "Redis listener batches, by route: shared (pipelined on the lane's connection with other clients' batches) or held (a connection of their own).",
            redis.iter().flat_map(|(upstream, c)| {
                [
                    (
                        [("route", "shared"), ("upstream", upstream.as_str())],
                        ConstCounter::new(load(&c.shared_batches)),
                    ),
                    (
                        [("route", "held"), ("upstream", upstream.as_str())],
                        ConstCounter::new(load(&c.held_batches)),
                    ),
                ]
            }),
        )
    }
}

/// Trace export accounting: a collector that is slow or down shows here as
/// `failed` and `dropped`, never as slower leases.
#[derive(Debug)]
struct SpanCollector {
    spans: Arc<SpanCounters>,
}

impl Collector for SpanCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.spans;
        let samples = [
            ("queued", &s.queued),
            ("exported", &s.exported),
            ("failed", &s.failed),
            ("dropped", &s.dropped),
        ]
        .map(|(outcome, v)| {
            (
                [("outcome", outcome)],
                ConstCounter::new(v.load(Ordering::Relaxed)),
            )
        });
        family(
            &mut e,
            "lessor_trace_spans",
            "Trace spans by outcome (dropped: the export queue was full).",
            samples,
        )
    }
}

/// Renders the registry in `format`.
pub(crate) fn render(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
    }
    Ok(out)
}

struct PoolCollector {
    pools: Arc<PoolSet>,
}

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCollector")
            .field("upstreams", &self.pools.names())
            .finish()
    }
}

/// Writes one metric family, one sample per label set.
pub(super) fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    M: EncodeMetric,
{
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn histogram(
    metric: &mut MetricEncoder,
    labels: &[(&str, &str)],
    h: &HistogramSnapshot,
) -> Result<(), std::fmt::Error> {
    metric
        .encode_family(&labels)?
        .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
}

impl Collector for PoolCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pools = self.pools.all();
        let up = |name: &str| [("upstream", name.to_owned())];
        let counter = |v: u64| ConstCounter::new(v);
        let gauge = |v: i64| ConstGauge::new(v);
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

        let mut states = Vec::new();
        for p in &pools {
            let c = p.counters();
            let leased = c.leased.load(Ordering::Relaxed);
            let checking = c.out.load(Ordering::Relaxed).saturating_sub(leased);
            for (state, v) in [
                ("idle", p.idle()),
                ("leased", leased),
                ("checking", checking),
                ("connecting", p.connecting()),
            ] {
                let labels = vec![
                    ("upstream", p.name().to_owned()),
                    ("state", state.to_owned()),
                ];
                states.push((labels, gauge(i64::from(v))));
            }
        }
        family(
            &mut e,
            "lessor_pool_connections",
            "Connections the pool owns, by state (connecting: dials under way).",
            states,
        )?;
        family(
            &mut e,
            "lessor_pool_max_connections",
            "The pool's max_size.",
            pools
                .iter()
                .map(|p| (up(p.name()), gauge(i64::from(p.config().pool.max_size)))),
        )?;
        family(
            &mut e,
            "lessor_pool_waiters",
            "Checkouts in progress.",
            pools.iter().map(|p| {
                (
                    up(p.name()),
                    gauge(i64::from(p.counters().waiting.load(Ordering::Relaxed))),
                )
            }),
        )?;
        family(
            &mut e,
            "lessor_upstream_ready",
            "1 when the upstream can serve a lease.",
            pools
                .iter()
                .map(|p| (up(p.name()), gauge(i64::from(p.ready())))),
        )?;
        family(
            &mut e,
            "lessor_upstream_paused",
            "1 while an operator has paused the upstream (checkouts wait).",
            pools
                .iter()
                .map(|p| (up(p.name()), gauge(i64::from(p.is_paused())))),
        )?;
        family(
            &mut e,
            "lessor_leases",
            "Leases granted.",
            pools
                .iter()
                .map(|p| (up(p.name()), counter(load(&p.counters().leases_granted)))),
        )?;
        family(
            &mut e,
            "lessor_connections_created",
            "Dials that produced a connection.",
            pools.iter().map(|p| {
                (
                    up(p.name()),
                    counter(load(&p.counters().connections_created)),
                )
            }),
        )?;
        let connect_errors = pools.iter().flat_map(|p| {
            CONNECT_ERROR_REASONS.iter().map(move |reason| {
                let labels = vec![
                    ("upstream", p.name().to_owned()),
                    ("reason", (*reason).to_owned()),
                ];
                (labels, counter(p.counters().connect_errors_for(reason)))
            })
        });
        family(
            &mut e,
            "lessor_connect_errors",
            "Dials that failed, by reason (resolve, connect, socket, timeout, open, and tls_refused, tls_untrusted, tls_name_mismatch, tls_expired, tls_client_cert_required, tls_client_cert_rejected, tls_handshake).",
            connect_errors,
        )?;
        let tls: Vec<_> = pools
            .iter()
            .filter_map(|p| p.dialer_tls().map(|t| (p.name().to_owned(), t.status())))
            .collect();
        family(
            &mut e,
            "lessor_tls_cert_expiry_timestamp_seconds",
            "When the client certificate an upstream's TLS uses expires (the earliest notAfter of its chain), Unix seconds.",
            tls.iter().filter_map(|(name, t)| {
                t.client_cert_not_after
                    .map(|at| (up(name), ConstGauge::new(at)))
            }),
        )?;
        family(
            &mut e,
            "lessor_tls_reloads",
            "TLS certificate, key and CA files that changed on disk, by result (failed: the previous files stay in force).",
            tls.iter().flat_map(|(name, t)| {
                [("ok", t.reloads), ("failed", t.reload_failures)].map(|(result, n)| {
                    (
                        vec![("upstream", name.clone()), ("result", result.to_owned())],
                        counter(n),
                    )
                })
            }),
        )?;
        family(
            &mut e,
            "lessor_rollbacks",
            "Transactions a lease or Exchange left open, rolled back before the connection was idle again.",
            pools
                .iter()
                .map(|p| (up(p.name()), counter(load(&p.counters().rollbacks)))),
        )?;
        family(
            &mut e,
            "lessor_checkout_timeouts",
            "Checkouts that reached their deadline.",
            pools
                .iter()
                .map(|p| (up(p.name()), counter(load(&p.counters().checkout_timeouts)))),
        )?;

        let evictions = pools.iter().flat_map(|p| {
            EvictReason::ALL.iter().map(move |r| {
                let labels = vec![
                    ("upstream", p.name().to_owned()),
                    ("reason", r.as_str().to_owned()),
                ];
                (labels, ConstCounter::new(p.counters().evictions(*r)))
            })
        });
        family(
            &mut e,
            "lessor_evictions",
            "Connections closed, by reason.",
            evictions,
        )?;

        let exchanges = pools.iter().flat_map(|p| {
            EXCHANGE_OUTCOMES
                .iter()
                .enumerate()
                .map(move |(i, outcome)| {
                    let labels = vec![
                        ("upstream", p.name().to_owned()),
                        ("outcome", (*outcome).to_owned()),
                    ];
                    (labels, ConstCounter::new(load(&p.counters().exchanges[i])))
                })
        });
        family(
            &mut e,
            "lessor_exchanges",
            "Exchange calls, by outcome (an error reply from the upstream is ok).",
            exchanges,
        )?;

        let checks = pools.iter().flat_map(|p| {
            let c = p.counters();
            let total = load(&c.health_checks);
            let failed = load(&c.health_check_failures);
            [("ok", total.saturating_sub(failed)), ("failed", failed)].map(|(result, v)| {
                let labels = vec![
                    ("upstream", p.name().to_owned()),
                    ("result", result.to_owned()),
                ];
                (labels, ConstCounter::new(v))
            })
        });
        family(
            &mut e,
            "lessor_health_checks",
            "Health checks run (peek, and probe when due).",
            checks,
        )?;

        let role_checks = pools
            .iter()
            .filter(|p| p.config().role != crate::config::Role::Any)
            .map(|p| {
                (
                    vec![("upstream", p.name().to_owned())],
                    ConstCounter::new(load(&p.counters().role_checks)),
                )
            });
        family(
            &mut e,
            "lessor_role_checks",
            "Passes asking the endpoints' servers their role (each health interval, during an outage, and after a hint).",
            role_checks,
        )?;

        let bytes = pools.iter().flat_map(|p| {
            let c = p.counters();
            [
                ("to_upstream", load(&c.bytes_to_upstream)),
                ("to_client", load(&c.bytes_to_client)),
            ]
            .map(|(direction, v)| {
                let labels = vec![
                    ("upstream", p.name().to_owned()),
                    ("direction", direction.to_owned()),
                ];
                (labels, ConstCounter::new(v))
            })
        });
        family(
            &mut e,
            "lessor_lease_bytes",
            "Bytes moved by leases.",
            bytes,
        )?;

        // Per endpoint: bounded by the endpoints discovery reports.
        let mut endpoint_conns = Vec::new();
        let mut endpoint_ready = Vec::new();
        let mut endpoint_ejected = Vec::new();
        let mut endpoint_role = Vec::new();
        for p in &pools {
            for ep in p.endpoints().snapshot() {
                let labels = vec![
                    ("upstream", p.name().to_owned()),
                    ("endpoint", ep.target.clone()),
                ];
                let mut with_state = |state: &str, v: u32| {
                    let mut l = labels.clone();
                    l.push(("state", state.to_owned()));
                    endpoint_conns.push((l, gauge(i64::from(v))));
                };
                with_state("idle", ep.idle);
                with_state("in_use", ep.connections.saturating_sub(ep.idle));
                endpoint_ready.push((labels.clone(), gauge(i64::from(ep.ready))));
                endpoint_ejected.push((labels.clone(), gauge(i64::from(ep.ejected))));
                if p.config().role != crate::config::Role::Any {
                    let now = ep.role.map_or("unknown", |r| r.as_str());
                    for role in ["primary", "replica", "unknown"] {
                        let mut l = labels.clone();
                        l.push(("role", role.to_owned()));
                        endpoint_role.push((l, gauge(i64::from(role == now))));
                    }
                }
            }
        }
        family(
            &mut e,
            "lessor_endpoint_connections",
            "Open connections per endpoint (in_use: leased or being checked).",
            endpoint_conns,
        )?;
        family(
            &mut e,
            "lessor_endpoint_ready",
            "1 when the endpoint may get new connections.",
            endpoint_ready,
        )?;
        family(
            &mut e,
            "lessor_endpoint_ejected",
            "1 while the endpoint is ejected for failing.",
            endpoint_ejected,
        )?;
        family(
            &mut e,
            "lessor_endpoint_role",
            "1 for the role the endpoint's server last reported (upstreams with role primary or replica).",
            endpoint_role,
        )?;

        if !pools.is_empty() {
            let mut m = e.encode_descriptor(
                "lessor_lease_duration_seconds",
                "How long leases lasted, by what happened to their connection.",
                None,
                MetricType::Histogram,
            )?;
            for p in &pools {
                let c = p.counters();
                histogram(
                    &mut m,
                    &[("upstream", p.name()), ("disposition", "return")],
                    &c.lease_returned.snapshot(),
                )?;
                histogram(
                    &mut m,
                    &[("upstream", p.name()), ("disposition", "evict")],
                    &c.lease_evicted.snapshot(),
                )?;
            }
            for (name, help, of) in [
                (
                    "lessor_exchange_duration_seconds",
                    "How long Exchange calls took, checkout included.",
                    (|c: &Counters| &c.exchange_duration) as fn(&Counters) -> &Histogram,
                ),
                (
                    "lessor_checkout_wait_seconds",
                    "How long checkouts took, successful or not.",
                    |c: &Counters| &c.checkout_wait,
                ),
                (
                    "lessor_session_restore_seconds",
                    "How long making a used session idle-ready took (Redis undo; PostgreSQL rollback and reset).",
                    |c: &Counters| &c.session_restore,
                ),
            ] {
                let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
                for p in &pools {
                    histogram(
                        &mut m,
                        &[("upstream", p.name())],
                        &of(p.counters()).snapshot(),
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// The figures that expose a leak early: tasks, descriptors, memory.
#[derive(Debug)]
struct ProcessCollector {
    /// The runtime whose tasks are counted (leases, pools, connections).
    data_plane: Option<tokio::runtime::Handle>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let none: [(&str, &str); 0] = [];
        if let Some(handle) = &self.data_plane {
            let tasks = i64::try_from(handle.metrics().num_alive_tasks()).unwrap_or(i64::MAX);
            family(
                &mut e,
                "lessor_runtime_alive_tasks",
                "Tokio tasks alive now.",
                [(none, ConstGauge::new(tasks))],
            )?;
            let figures = super::profile::RuntimeFigures::of(handle);
            family(
                &mut e,
                "lessor_runtime_workers",
                "Worker threads of the runtime that serves leases.",
                [(none, ConstGauge::new(figures.workers as i64))],
            )?;
            family(
                &mut e,
                "lessor_runtime_global_queue_depth",
                "Tasks waiting in the runtime's shared queue.",
                [(none, ConstGauge::new(figures.global_queue_depth as i64))],
            )?;
            if let Some(threads) = figures.blocking_threads {
                family(
                    &mut e,
                    "lessor_runtime_blocking_threads",
                    "Threads of the runtime's blocking pool.",
                    [(none, ConstGauge::new(threads as i64))],
                )?;
            }
            let workers: Vec<String> = (0..figures.workers).map(|w| w.to_string()).collect();
            family(
                &mut e,
                "lessor_runtime_worker_busy_seconds",
                "Time each worker spent polling tasks since start.",
                figures
                    .per_worker
                    .iter()
                    .zip(&workers)
                    .map(|(f, w)| ([("worker", w.as_str())], ConstCounter::new(f.busy_seconds))),
            )?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let fds = i64::try_from(dir.count()).unwrap_or(i64::MAX);
            family(
                &mut e,
                "lessor_process_open_fds",
                "Open file descriptors.",
                [(none, ConstGauge::new(fds))],
            )?;
        }
        if let Some(rss) = resident_bytes() {
            family(
                &mut e,
                "lessor_process_resident_memory_bytes",
                "Resident set size.",
                [(none, ConstGauge::new(rss))],
            )?;
        }
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        family(
            &mut e,
            "lessor_build_info",
            "Always 1; the labels describe the build.",
            [(version, ConstGauge::new(1i64))],
        )?;
        Ok(())
    }
}

/// VmRSS from /proc/self/status (Linux only; absent elsewhere).
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}
