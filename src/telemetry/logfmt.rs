//! Log lines that carry the trace id of the span they happen in, so a log
//! line and a trace find each other. Text lines start with `trace_id=...`;
//! JSON objects get a `"trace_id"` field.

use std::fmt;

use opentelemetry::trace::TraceContextExt;
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::{Format, Full, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Wraps the standard text or JSON event format.
pub(super) enum WithTraceId {
    /// `trace_id=... ` then the standard line.
    Text(Format<Full>),
    /// The standard JSON object with `"trace_id"` first.
    Json(Format<Json>),
}

impl WithTraceId {
    /// The text format, without targets.
    pub(super) fn text() -> Self {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        Self::Text(Format::default().with_target(false).with_ansi(ansi))
    }

    /// The JSON format, with the current span list left out (spans never
    /// reach the log layer).
    pub(super) fn json() -> Self {
        Self::Json(
            Format::default()
                .json()
                .with_current_span(false)
                .with_span_list(false),
        )
    }
}

/// The trace id of the current span, when it has a valid one.
fn current_trace_id() -> Option<String> {
    let span = tracing::Span::current();
    if span.is_none() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

impl<S, N> FormatEvent<S, N> for WithTraceId
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let trace_id = current_trace_id();
        match self {
            Self::Text(inner) => {
                if let Some(id) = trace_id {
                    write!(writer, "trace_id={id} ")?;
                }
                inner.format_event(ctx, writer, event)
            }
            Self::Json(inner) => {
                let Some(id) = trace_id else {
                    return inner.format_event(ctx, writer, event);
                };
                let mut line = String::new();
                inner.format_event(ctx, Writer::new(&mut line), event)?;
                match line.strip_prefix('{') {
                    Some(rest) => write!(writer, "{{\"trace_id\":\"{id}\",{rest}"),
                    None => writer.write_str(&line),
                }
            }
        }
    }
}
