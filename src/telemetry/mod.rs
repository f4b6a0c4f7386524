//! Telemetry: logs as `tracing` events on stdout (text, or JSON with
//! `--log-format json` / `LESSOR_LOG_FORMAT=json`; level from `RUST_LOG`;
//! the trace id in every event that has one), and lease traces exported over
//! OTLP (gRPC or HTTP/protobuf) through `tracing-opentelemetry`.
//!
//! Never in the way of a lease: with no endpoint configured there is no
//! exporter and the trace spans are disabled at their callsites (one cheap
//! check each). With one, spans go to the SDK's batch processor, which
//! exports on its own thread; its queue is bounded, and spans that would
//! overflow it are dropped here and counted (`export.rs`), so a slow or dead
//! collector costs the data path nothing but the enqueue.
//!
//! Every span and span event lessor makes for traces uses the target
//! [`TARGET`], which only the OpenTelemetry layer listens to.

mod export;
mod logfmt;
pub(crate) mod propagation;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;

pub use export::SpanCounters;

use crate::config::{OtlpProtocol, TelemetryConfig};

/// The `tracing` target of every span and span event meant for traces.
pub(crate) const TARGET: &str = "lessor::otel";

/// How log events are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// `json` or `text` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Some(Self::Json),
            "text" => Some(Self::Text),
            _ => None,
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An OTLP protocol lessor does not speak.
    #[error("unsupported OTLP protocol `{0}` (lessor speaks grpc and http/protobuf)")]
    Protocol(String),
    /// The exporter could not be built (bad endpoint, bad headers).
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Where and how traces go, after the environment has had its say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExportTarget {
    /// The transport.
    pub protocol: OtlpProtocol,
    /// The endpoint from the config file, or `None` when an `OTEL_*`
    /// endpoint variable is set (the exporter reads it then, with the
    /// standard rules for appending `/v1/traces`).
    pub endpoint: Option<String>,
}

/// Resolves the export target: `OTEL_*` variables win over the file; no
/// endpoint anywhere (or `OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`)
/// means no export.
pub(crate) fn resolve(
    config: &TelemetryConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<ExportTarget>, TelemetryError> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return Ok(None);
    }
    let protocol = match set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"))
    {
        Some(p) => match p.trim() {
            "grpc" => OtlpProtocol::Grpc,
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            other => return Err(TelemetryError::Protocol(other.to_owned())),
        },
        None => config.protocol,
    };
    if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
    {
        return Ok(Some(ExportTarget {
            protocol,
            endpoint: None,
        }));
    }
    let endpoint = config.endpoint.trim();
    if endpoint.is_empty() {
        return Ok(None);
    }
    // The file's endpoint is a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT:
    // HTTP gets the signal path appended unless a path is given.
    let endpoint = match protocol {
        OtlpProtocol::HttpProtobuf if !has_path(endpoint) => {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_owned(),
    };
    Ok(Some(ExportTarget {
        protocol,
        endpoint: Some(endpoint),
    }))
}

fn has_path(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split_once('/')
        .is_some_and(|(_, path)| !path.is_empty())
}

/// The installed telemetry; keep it until shutdown, then call
/// [`Telemetry::shutdown`] to flush.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Span export accounting, for `/metrics`.
    pub spans: Arc<SpanCounters>,
}

impl Telemetry {
    /// Flushes and stops the exporter, waiting at most `within`. The SDK's
    /// flush blocks (and deadlocks on a current-thread runtime), so
    /// it runs on the blocking pool; past `within` it is abandoned.
    pub async fn shutdown(self, within: Duration) {
        let Some(provider) = self.provider else {
            return;
        };
        let flush = tokio::task::spawn_blocking(move || {
            let _ = provider.force_flush();
            let _ = provider.shutdown_with_timeout(within);
        });
        if tokio::time::timeout(within, flush).await.is_err() {
            tracing::warn!(within = ?within, "trace flush did not finish in time; unsent spans are lost");
        }
    }
}

/// The resource every span carries: `service.name` (default `lessor`),
/// `service.version`, the pod's identity from the downward API, then
/// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME` on top.
pub(crate) fn resource(env: impl Fn(&str) -> Option<String>) -> Resource {
    let mut defaults = vec![
        KeyValue::new("service.name", "lessor"),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    ];
    for (var, key) in [
        ("POD_NAME", "k8s.pod.name"),
        ("POD_NAMESPACE", "k8s.namespace.name"),
        ("NODE_NAME", "k8s.node.name"),
    ] {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            defaults.push(KeyValue::new(key, v));
        }
    }
    let mut builder = Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attributes(defaults)
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Some(name) = env("OTEL_SERVICE_NAME").filter(|v| !v.is_empty()) {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

/// Installs the global subscriber (and, when an endpoint is configured, the
/// OTLP exporter and the W3C trace-context propagator). Call once, inside the
/// tokio runtime (the gRPC exporter's channel lives on it).
pub fn init(config: &TelemetryConfig, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let env = |name: &str| std::env::var(name).ok();
    let spans = Arc::new(SpanCounters::default());
    let provider = match resolve(config, env)? {
        Some(target) => Some(provider(&target, spans.clone())?),
        None => None,
    };

    let _ = tracing::dispatcher::set_global_default(dispatch(format, provider.as_ref()));
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    Ok(Telemetry { provider, spans })
}

/// The subscriber stack: logs (filtered by `RUST_LOG`, never spans), plus
/// the OpenTelemetry layer (only lessor's trace target) when exporting.
fn dispatch(format: LogFormat, provider: Option<&SdkTracerProvider>) -> tracing::Dispatch {
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs never see spans (a span per lease would cost an allocation per
    // lease even with no exporter) nor trace-only events.
    let logs_only = filter_fn(|meta| !meta.is_span() && meta.target() != TARGET)
        // Without a hint the combined filter's hint is unknown, and every
        // `trace!` callsite of every dependency would be checked at runtime.
        .with_max_level_hint(tracing::level_filters::LevelFilter::TRACE);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(ansi)
            .event_format(logfmt::WithTraceId::text())
            .with_filter(log_filter.and(logs_only))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(logfmt::WithTraceId::json())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_filter(log_filter.and(logs_only))
            .boxed(),
    };
    // Two stacks, not an `Option` layer: a `None` layer reports interest in
    // every callsite, which would make the registry build every span of
    // every dependency (h2's included) and double a lease's CPU cost.
    match provider {
        Some(p) => {
            let otel = tracing_opentelemetry::layer()
                .with_tracer(p.tracer("lessor"))
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_filter(Targets::new().with_target(TARGET, tracing::Level::TRACE));
            tracing::Dispatch::new(tracing_subscriber::registry().with(fmt).with(otel))
        }
        None => tracing::Dispatch::new(tracing_subscriber::registry().with(fmt)),
    }
}

fn provider(
    target: &ExportTarget,
    spans: Arc<SpanCounters>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = match target.protocol {
        OtlpProtocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(e) = &target.endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.build()?
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            if let Some(e) = &target.endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.build()?
        }
    };
    // BatchConfigBuilder::default() reads OTEL_BSP_*; its queue size is not
    // readable back, so read the variable the same way it does.
    let batch = BatchConfigBuilder::default().build();
    let queue = std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(opentelemetry_sdk::trace::OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT);
    let processor =
        BatchSpanProcessor::builder(export::CountingExporter::new(exporter, spans.clone()))
            .with_batch_config(batch)
            .build();
    let env = |name: &str| std::env::var(name).ok();
    // The SDK's default config reads OTEL_TRACES_SAMPLER(_ARG); its default
    // is ParentBased(AlwaysOn): a sampled caller's trace is always joined.
    Ok(SdkTracerProvider::builder()
        .with_span_processor(export::Bounded::new(processor, queue, spans))
        .with_resource(resource(env))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file(endpoint: &str, protocol: OtlpProtocol) -> TelemetryConfig {
        TelemetryConfig {
            endpoint: endpoint.into(),
            protocol,
        }
    }

    #[test]
    fn no_endpoint_no_export() {
        assert_eq!(
            resolve(&TelemetryConfig::default(), with(&[])).unwrap(),
            None
        );
    }

    #[test]
    fn file_endpoint_is_a_base_url() {
        let grpc = resolve(
            &file("http://collector:4317", OtlpProtocol::Grpc),
            with(&[]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(grpc.endpoint.as_deref(), Some("http://collector:4317"));
        let http = resolve(
            &file("http://collector:4318/", OtlpProtocol::HttpProtobuf),
            with(&[]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            http.endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        let custom = resolve(
            &file("http://c:4318/otlp/traces", OtlpProtocol::HttpProtobuf),
            with(&[]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            custom.endpoint.as_deref(),
            Some("http://c:4318/otlp/traces")
        );
    }

    #[test]
    fn environment_wins_over_the_file() {
        let config = file("http://file:4317", OtlpProtocol::Grpc);
        let t = resolve(
            &config,
            with(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            t,
            ExportTarget {
                protocol: OtlpProtocol::HttpProtobuf,
                endpoint: None
            }
        );
        let t = resolve(
            &TelemetryConfig::default(),
            with(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://env:4317")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            t.protocol,
            OtlpProtocol::Grpc,
            "grpc is the default protocol"
        );
        let t = resolve(
            &config,
            with(&[
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            t.protocol,
            OtlpProtocol::HttpProtobuf,
            "the per-signal variable wins"
        );
    }

    #[test]
    fn disabled_and_unsupported() {
        let config = file("http://file:4317", OtlpProtocol::Grpc);
        assert_eq!(
            resolve(&config, with(&[("OTEL_SDK_DISABLED", "true")])).unwrap(),
            None
        );
        assert_eq!(
            resolve(&config, with(&[("OTEL_TRACES_EXPORTER", "none")])).unwrap(),
            None
        );
        let err = resolve(
            &config,
            with(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("http/json"));
    }

    #[test]
    fn without_an_exporter_no_span_is_built() {
        let dispatch = dispatch(LogFormat::Text, None);
        tracing::dispatcher::with_default(&dispatch, || {
            // Lease spans, and any dependency's spans at any level, are
            // disabled at their callsite: no registry work per lease.
            assert!(tracing::info_span!(target: TARGET, "lease").is_disabled());
            assert!(tracing::info_span!("a dependency's span").is_disabled());
            assert!(tracing::trace_span!("a dependency's trace span").is_disabled());
        });
    }

    #[test]
    fn resource_defaults_and_overrides() {
        let get = |r: &Resource, k: &str| {
            r.get(&opentelemetry::Key::from(k.to_owned()))
                .map(|v| v.to_string())
        };
        let r = resource(with(&[
            ("POD_NAME", "app-7d9f"),
            ("POD_NAMESPACE", "shop"),
            ("NODE_NAME", "node-3"),
        ]));
        assert_eq!(get(&r, "service.name").as_deref(), Some("lessor"));
        assert_eq!(
            get(&r, "service.version").as_deref(),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(get(&r, "k8s.pod.name").as_deref(), Some("app-7d9f"));
        assert_eq!(get(&r, "k8s.namespace.name").as_deref(), Some("shop"));
        assert_eq!(get(&r, "k8s.node.name").as_deref(), Some("node-3"));
        let r = resource(with(&[("OTEL_SERVICE_NAME", "cart-lessor")]));
        assert_eq!(get(&r, "service.name").as_deref(), Some("cart-lessor"));
    }
}
