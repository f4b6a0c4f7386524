//! Real OTLP receivers for the telemetry tests: a tonic `TraceService`
//! (OTLP/gRPC) and an HTTP endpoint decoding `POST /v1/traces`
//! (OTLP/HTTP protobuf). Both keep every span they receive, with its
//! resource attributes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use tokio_util::sync::CancellationToken;

/// A received span, flattened.
#[derive(Debug, Clone)]
pub struct Got {
    /// Span name.
    pub name: String,
    /// Hex trace id.
    pub trace_id: String,
    /// Hex span id.
    pub span_id: String,
    /// Hex parent span id ("" for a root).
    pub parent: String,
    /// `SpanKind` number (2 = server).
    pub kind: i32,
    /// Status code number (2 = error).
    pub status: i32,
    /// Span attributes, as strings.
    pub attrs: HashMap<String, String>,
    /// Resource attributes, as strings.
    pub resource: HashMap<String, String>,
    /// Event names.
    pub events: Vec<String>,
}

fn text(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn flatten(req: ExportTraceServiceRequest) -> Vec<Got> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = text(&rs.resource.map(|r| r.attributes).unwrap_or_default());
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Got {
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    kind: s.kind,
                    status: s.status.map_or(0, |st| st.code),
                    attrs: text(&s.attributes),
                    resource: resource.clone(),
                    events: s.events.into_iter().map(|e| e.name).collect(),
                });
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Spans received so far.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<Got>>>);

impl Received {
    /// A copy of every span so far.
    pub fn all(&self) -> Vec<Got> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the spans received; returns them.
    pub async fn wait(&self, what: &str, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + super::PATIENCE;
        loop {
            let spans = self.all();
            if pred(&spans) {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; received: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn push(&self, req: ExportTraceServiceRequest) {
        self.0.lock().unwrap().extend(flatten(req));
    }
}

struct Grpc(Received);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A receiver; stops when dropped.
pub struct Receiver {
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// What arrived.
    pub spans: Received,
    stop: CancellationToken,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Receiver {
    /// An OTLP/gRPC receiver on a free port.
    pub async fn grpc() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = Received::default();
        let stop = CancellationToken::new();
        let service = TraceServiceServer::new(Grpc(spans.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        let done = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, done)
                .await;
        });
        Self { url, spans, stop }
    }

    /// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on a free port.
    pub async fn http() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = Received::default();
        let stop = CancellationToken::new();
        let sink = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(req) => {
                            sink.push(req);
                            (
                                axum::http::StatusCode::OK,
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )
                        }
                        Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                    }
                }
            }),
        );
        let done = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(done)
                .await;
        });
        Self { url, spans, stop }
    }
}
