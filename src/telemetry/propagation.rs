//! W3C trace context from gRPC metadata: the caller's `traceparent` (and
//! `tracestate`) becomes the parent of the lease span, so a lease appears
//! inside the application's own trace.

use opentelemetry::Context;
use opentelemetry::propagation::Extractor;
use tonic::metadata::MetadataMap;

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The remote parent context carried by `metadata`, through the global
/// propagator (W3C trace context once telemetry is on; a no-op otherwise).
pub(crate) fn extract(metadata: &MetadataMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)))
}

/// The caller's W3C trace id (32 hex digits), when `metadata` carries a
/// valid `traceparent`; empty otherwise. Read whether or not traces are
/// exported: `/debug/leases` shows it either way.
pub(crate) fn trace_id(metadata: &MetadataMap) -> String {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .extract(&MetadataExtractor(metadata));
    let span = context.span();
    let span_context = span.span_context();
    if span_context.is_valid() {
        span_context.trace_id().to_string()
    } else {
        String::new()
    }
}
