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
    w3c_trace_id(&MetadataExtractor(metadata))
}

/// The W3C trace id a carrier's `traceparent` names, read with the W3C
/// propagator whatever the configured one; empty when there is none.
fn w3c_trace_id(carrier: &dyn opentelemetry::propagation::Extractor) -> String {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(carrier);
    let span = context.span();
    let span_context = span.span_context();
    if span_context.is_valid() {
        span_context.trace_id().to_string()
    } else {
        String::new()
    }
}

/// The `traceparent` of a sqlcommenter comment in a query's text
/// (`/*traceparent='00-...-...-01'*/`, values URL-encoded), which ORMs and
/// drivers add to the SQL they send: how a PostgreSQL client that knows
/// nothing of lessor joins lessor's spans to its trace.
pub(crate) fn sqlcommenter_traceparent(sql: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"traceparent='";
    let at = sql.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = sql[at..].iter().take(256).position(|&b| b == b'\'')?;
    let raw = std::str::from_utf8(&sql[at..at + len]).ok()?;
    // Percent-decoding: a traceparent is hex digits and dashes.
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let hex: String = chars.by_ref().take(2).collect();
            out.push(char::from(u8::from_str_radix(&hex, 16).ok()?));
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// The context and W3C trace id of a `traceparent` value; the id is empty
/// when it is not valid.
pub(crate) fn from_traceparent(traceparent: &str) -> (Context, String) {
    let carrier: std::collections::HashMap<String, String> =
        [("traceparent".to_owned(), traceparent.to_owned())].into();
    let id = w3c_trace_id(&carrier);
    let context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    (context, id)
}

#[cfg(test)]
mod sqlcommenter_tests {
    use super::*;

    #[test]
    fn a_sqlcommenter_traceparent_is_found_and_decoded() {
        let sql = b"SELECT 1 /*controller='x',traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/";
        let tp = sqlcommenter_traceparent(sql).unwrap();
        assert_eq!(
            tp,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(from_traceparent(&tp).1, "0af7651916cd43dd8448eb211c80319c");
        let encoded = b"SELECT 1 /*traceparent='00%2D0af7651916cd43dd8448eb211c80319c%2Db7ad6b7169203331%2D01'*/";
        assert_eq!(sqlcommenter_traceparent(encoded).unwrap(), tp);
        assert_eq!(sqlcommenter_traceparent(b"SELECT 1"), None);
        assert_eq!(from_traceparent("junk").1, "");
    }
}
