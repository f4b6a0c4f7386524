//! A fake Kubernetes API server for the discovery tests: it answers the
//! EndpointSlice list and `watch=true` requests the way the real API does
//! (a JSON list with `metadata.resourceVersion`; then newline-delimited watch
//! events ADDED, MODIFIED, DELETED, BOOKMARK, and an ERROR 410 Gone that
//! forces a relist), so the real `kube` client and watcher run against it.
//! Tests drive it: apply or delete slices, expire watches, take it down.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Inner {
    resource_version: u64,
    /// namespace/name -> slice
    slices: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, namespace, event JSON line).
    history: Vec<(u64, String, String)>,
    /// Watches from below this resourceVersion get 410 Gone.
    expired_below: u64,
    down: bool,
    /// Bumped to end every open watch stream.
    generation: u64,
}

/// The fake API server; stops when dropped.
pub struct FakeApi {
    /// `http://127.0.0.1:port`.
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
    stop: CancellationToken,
    /// `coordination.k8s.io/v1` Leases (the fleet budget's).
    pub leases: super::kube_leases::Leases,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

/// An endpoint of a slice: address, ready, terminating.
pub type SliceEndpoint<'a> = (&'a str, bool, bool);

/// An EndpointSlice of `service` with one port and these endpoints.
pub fn slice(name: &str, service: &str, port: (&str, u16), endpoints: &[SliceEndpoint]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(addr, ready, terminating)| json!({
            "addresses": [addr],
            "conditions": { "ready": ready, "serving": ready, "terminating": terminating },
        })).collect::<Vec<_>>(),
        "ports": [{ "name": port.0, "port": port.1, "protocol": "TCP" }],
    })
}

impl FakeApi {
    /// Serves on a free loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Shared {
            inner: Arc::default(),
            changed: Arc::new(Notify::new()),
        };
        let leases = super::kube_leases::Leases::default();
        let app = axum::Router::new()
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                axum::routing::get(endpointslices),
            )
            .with_state(shared.clone())
            .merge(leases.routes());
        let stop = CancellationToken::new();
        let done = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(done)
                .await;
        });
        Self {
            url,
            inner: shared.inner,
            changed: shared.changed,
            stop,
            leases,
        }
    }

    /// A kubeconfig file pointing at this server, in `dir`.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> String {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context: {{ cluster: fake, user: fake, namespace: shop }}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{ token: test-token }}\n",
            self.url
        );
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn change(&self, namespace: &str, kind: &str, mut object: Value) {
        let mut inner = self.inner.lock().unwrap();
        inner.resource_version += 1;
        let rv = inner.resource_version;
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let key = (namespace.to_owned(), name);
        if kind == "DELETED" {
            inner.slices.remove(&key);
        } else {
            inner.slices.insert(key, object.clone());
        }
        let line = json!({ "type": kind, "object": object }).to_string();
        inner.history.push((rv, namespace.to_owned(), line));
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Creates or replaces a slice (ADDED or MODIFIED).
    pub fn apply(&self, namespace: &str, slice: Value) {
        let name = slice["metadata"]["name"].as_str().unwrap().to_owned();
        let exists = self
            .inner
            .lock()
            .unwrap()
            .slices
            .contains_key(&(namespace.to_owned(), name));
        self.change(namespace, if exists { "MODIFIED" } else { "ADDED" }, slice);
    }

    /// Deletes a slice (DELETED).
    pub fn delete(&self, namespace: &str, name: &str) {
        let slice = self
            .inner
            .lock()
            .unwrap()
            .slices
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned();
        if let Some(slice) = slice {
            self.change(namespace, "DELETED", slice);
        }
    }

    /// Ends every watch; their resumption gets 410 Gone, forcing a relist.
    pub fn expire_watches(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.expired_below = inner.resource_version + 1;
        inner.generation += 1;
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Takes the API down (every request 500, watches end) or brings it back.
    pub fn set_down(&self, down: bool) {
        let mut inner = self.inner.lock().unwrap();
        inner.down = down;
        inner.generation += 1;
        drop(inner);
        self.changed.notify_waiters();
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

async fn endpointslices(
    State(shared): State<Shared>,
    Path(namespace): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let inner = shared.inner.lock().unwrap();
    if inner.down {
        // 500, not 503: kube's client retries 503 itself for minutes, which
        // would hide the outage from lessor (and from the test).
        let body = status(500, "InternalError", "the fake API is down").to_string();
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            body,
        )
            .into_response();
    }
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let wanted = |slice: &Value| {
        selector
            .split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some((k, v)) => slice["metadata"]["labels"][k].as_str() == Some(v),
                None => true,
            })
    };
    if query.get("watch").map(String::as_str) != Some("true") {
        let items: Vec<Value> = inner
            .slices
            .iter()
            .filter(|((ns, _), s)| *ns == namespace && wanted(s))
            .map(|(_, s)| s.clone())
            .collect();
        let list = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSliceList",
            "metadata": { "resourceVersion": inner.resource_version.to_string() },
            "items": items,
        });
        return ([("content-type", "application/json")], list.to_string()).into_response();
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let generation = inner.generation;
    let gone = from < inner.expired_below;
    drop(inner);
    let shared2 = shared.clone();
    let stream = futures::stream::unfold((from, gone, false), move |(cursor, gone, done)| {
        let shared = shared2.clone();
        let selector = selector.clone();
        let namespace = namespace.clone();
        async move {
            if done {
                return None;
            }
            if gone {
                let line = json!({ "type": "ERROR", "object": status(410, "Expired", "too old resource version") });
                return Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(format!("{line}\n"))),
                    (cursor, false, true),
                ));
            }
            loop {
                let notified = shared.changed.notified();
                {
                    let inner = shared.inner.lock().unwrap();
                    if inner.down || inner.generation != generation {
                        return None;
                    }
                    let next = inner.history.iter().find(|(rv, ns, line)| {
                        *rv > cursor && *ns == namespace && {
                            let event: Value = serde_json::from_str(line).unwrap();
                            selector.split(',').filter(|s| !s.is_empty()).all(|term| {
                                match term.split_once('=') {
                                    Some((k, v)) => {
                                        event["object"]["metadata"]["labels"][k].as_str() == Some(v)
                                    }
                                    None => true,
                                }
                            })
                        }
                    });
                    if let Some((rv, _, line)) = next {
                        return Some((Ok(Bytes::from(format!("{line}\n"))), (*rv, false, false)));
                    }
                    // Nothing new: a bookmark now and then keeps the
                    // watcher's resourceVersion current, as the API does.
                    if inner.resource_version > cursor {
                        let rv = inner.resource_version;
                        let bookmark = json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                                "metadata": { "resourceVersion": rv.to_string() },
                            },
                        });
                        return Some((
                            Ok(Bytes::from(format!("{bookmark}\n"))),
                            (rv, false, false),
                        ));
                    }
                }
                notified.await;
            }
        }
    });
    (
        [("content-type", "application/json")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}
