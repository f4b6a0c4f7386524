//! `coordination.k8s.io/v1` Leases as the real Kubernetes API serves them to
//! the fleet budget's sidecars, for the integration tests' fake API and the
//! fleet simulation of `lessor-bench`: create (409 AlreadyExists), get, update with optimistic
//! concurrency (409 Conflict on a stale `metadata.resourceVersion`), delete,
//! and list / `watch=true` by label selector. Every request is counted, so a
//! test or a benchmark can tell how hard the sidecars lean on the API.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Notify;

const BASE: &str = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases";

#[derive(Default)]
struct Inner {
    resource_version: u64,
    /// namespace/name -> Lease
    leases: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, namespace, the object, event JSON
    /// line), in resourceVersion order.
    history: Vec<(u64, String, Value, String)>,
}

/// Counts of the requests the Lease API answered.
#[derive(Default, Debug)]
pub struct Requests {
    /// Lists (no `watch`).
    pub list: AtomicU64,
    /// Watch streams opened.
    pub watch: AtomicU64,
    /// Single-object reads.
    pub get: AtomicU64,
    /// Creations (including refused ones).
    pub create: AtomicU64,
    /// Updates (including conflicts).
    pub update: AtomicU64,
    /// Updates refused with 409 Conflict.
    pub conflicts: AtomicU64,
    /// Deletions.
    pub delete: AtomicU64,
}

impl Requests {
    /// Every request but watches (long-lived streams).
    pub fn total(&self) -> u64 {
        [
            &self.list,
            &self.get,
            &self.create,
            &self.update,
            &self.delete,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// The Leases of the fake API. Cloned handles share the same objects.
#[derive(Clone, Default)]
pub struct Leases {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
    down: Arc<AtomicBool>,
    /// What the API answered so far.
    pub requests: Arc<Requests>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn selected(selector: &str, object: &Value) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => object["metadata"]["labels"][k].as_str() == Some(v),
            None => true,
        })
}

impl Leases {
    /// Serves these Leases alone on a free loopback port until `stop`;
    /// returns `http://127.0.0.1:port`.
    pub async fn serve(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = self.routes();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(url)
    }

    /// The routes, to merge into a fake API's router.
    pub fn routes(&self) -> axum::Router {
        axum::Router::new()
            .route(BASE, axum::routing::get(collection).post(create))
            .route(
                &format!("{BASE}/{{name}}"),
                axum::routing::get(get).put(update).delete(delete),
            )
            .with_state(self.clone())
    }

    /// Every Lease now, as the API would list them.
    pub fn all(&self, namespace: &str) -> Vec<Value> {
        let inner = self.inner.lock().unwrap();
        inner
            .leases
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Another writer updates a Lease (an annotation of its own), as a
    /// controller might: the holder's next update carries a stale
    /// `resourceVersion` and gets 409 Conflict.
    pub fn touch(&self, namespace: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.resource_version += 1;
        let rv = inner.resource_version;
        let key = (namespace.to_owned(), name.to_owned());
        let lease = inner.leases.get_mut(&key).expect("the Lease exists");
        lease["metadata"]["annotations"]["example.com/touched"] = json!(rv.to_string());
        lease["metadata"]["resourceVersion"] = json!(rv.to_string());
        let lease = lease.clone();
        self.record(&mut inner, namespace, "MODIFIED", &lease);
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Takes the Lease API down (500 to everything, watches end) or back up.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn record(&self, inner: &mut Inner, namespace: &str, kind: &str, object: &Value) {
        let line = json!({ "type": kind, "object": object }).to_string();
        let rv = inner.resource_version;
        inner
            .history
            .push((rv, namespace.to_owned(), object.clone(), line));
    }

    fn is_down(&self) -> Option<Response> {
        self.down.load(Ordering::SeqCst).then(|| {
            status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "the fake API is down",
            )
        })
    }
}

type Params = Query<HashMap<String, String>>;

async fn create(
    State(leases): State<Leases>,
    Path(namespace): Path<String>,
    Json(mut lease): Json<Value>,
) -> Response {
    leases.requests.create.fetch_add(1, Ordering::Relaxed);
    if let Some(down) = leases.is_down() {
        return down;
    }
    let Some(name) = lease["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "name required");
    };
    let mut inner = leases.inner.lock().unwrap();
    let key = (namespace.clone(), name.clone());
    if inner.leases.contains_key(&key) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("leases.coordination.k8s.io \"{name}\" already exists"),
        );
    }
    inner.resource_version += 1;
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    lease["kind"] = json!("Lease");
    lease["metadata"]["namespace"] = json!(namespace);
    lease["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
    lease["metadata"]["uid"] = json!(format!("uid-{}", inner.resource_version));
    inner.leases.insert(key, lease.clone());
    leases.record(&mut inner, &namespace, "ADDED", &lease);
    drop(inner);
    leases.changed.notify_waiters();
    (StatusCode::CREATED, Json(lease)).into_response()
}

async fn get(
    State(leases): State<Leases>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    leases.requests.get.fetch_add(1, Ordering::Relaxed);
    if let Some(down) = leases.is_down() {
        return down;
    }
    let inner = leases.inner.lock().unwrap();
    match inner.leases.get(&(namespace, name.clone())) {
        Some(lease) => Json(lease.clone()).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("lease {name} not found"),
        ),
    }
}

async fn update(
    State(leases): State<Leases>,
    Path((namespace, name)): Path<(String, String)>,
    Json(mut lease): Json<Value>,
) -> Response {
    leases.requests.update.fetch_add(1, Ordering::Relaxed);
    if let Some(down) = leases.is_down() {
        return down;
    }
    let mut inner = leases.inner.lock().unwrap();
    let key = (namespace.clone(), name.clone());
    let Some(current) = inner.leases.get(&key) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("lease {name} not found"),
        );
    };
    let uid = current["metadata"]["uid"].clone();
    let sent = lease["metadata"]["resourceVersion"].as_str().unwrap_or("");
    if !sent.is_empty()
        && sent
            != current["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
    {
        leases.requests.conflicts.fetch_add(1, Ordering::Relaxed);
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        );
    }
    inner.resource_version += 1;
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    lease["kind"] = json!("Lease");
    lease["metadata"]["namespace"] = json!(namespace);
    lease["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
    lease["metadata"]["uid"] = uid;
    inner.leases.insert(key, lease.clone());
    leases.record(&mut inner, &namespace, "MODIFIED", &lease);
    drop(inner);
    leases.changed.notify_waiters();
    Json(lease).into_response()
}

async fn delete(
    State(leases): State<Leases>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    leases.requests.delete.fetch_add(1, Ordering::Relaxed);
    if let Some(down) = leases.is_down() {
        return down;
    }
    let mut inner = leases.inner.lock().unwrap();
    let Some(mut lease) = inner.leases.remove(&(namespace.clone(), name.clone())) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("lease {name} not found"),
        );
    };
    inner.resource_version += 1;
    lease["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
    leases.record(&mut inner, &namespace, "DELETED", &lease);
    drop(inner);
    leases.changed.notify_waiters();
    let ok = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
    Json(ok).into_response()
}

async fn collection(
    State(leases): State<Leases>,
    Path(namespace): Path<String>,
    Query(query): Params,
) -> Response {
    if let Some(down) = leases.is_down() {
        return down;
    }
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    if query.get("watch").map(String::as_str) != Some("true") {
        leases.requests.list.fetch_add(1, Ordering::Relaxed);
        let inner = leases.inner.lock().unwrap();
        let items: Vec<Value> = inner
            .leases
            .iter()
            .filter(|((ns, _), l)| *ns == namespace && selected(&selector, l))
            .map(|(_, l)| l.clone())
            .collect();
        let list = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "LeaseList",
            "metadata": { "resourceVersion": inner.resource_version.to_string() },
            "items": items,
        });
        return Json(list).into_response();
    }
    leases.requests.watch.fetch_add(1, Ordering::Relaxed);
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stream = futures::stream::unfold(from, move |cursor| {
        let leases = leases.clone();
        let selector = selector.clone();
        let namespace = namespace.clone();
        async move {
            loop {
                let notified = leases.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if leases.down.load(Ordering::SeqCst) {
                    return None;
                }
                {
                    let inner = leases.inner.lock().unwrap();
                    let start = inner.history.partition_point(|(rv, ..)| *rv <= cursor);
                    let next = inner.history[start..]
                        .iter()
                        .find(|(_, ns, object, _)| *ns == namespace && selected(&selector, object));
                    if let Some((rv, _, _, line)) = next {
                        return Some((
                            Ok::<_, std::convert::Infallible>(Bytes::from(format!("{line}\n"))),
                            *rv,
                        ));
                    }
                    if inner.resource_version > cursor {
                        let rv = inner.resource_version;
                        let bookmark = json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                "metadata": { "resourceVersion": rv.to_string() },
                            },
                        });
                        return Some((Ok(Bytes::from(format!("{bookmark}\n"))), rv));
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
