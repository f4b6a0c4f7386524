//! `grpc.health.v1` on the gRPC port, for clients inside the pod. Service `""`
//! and `lessor.v1.Pool` follow `/readyz`; each upstream has its own entry,
//! `lessor.v1.Pool/NAME`, ready when that upstream is (and not draining).
//!
//! tonic-health's Watch streams never end on their own, and tonic waits for
//! open streams at shutdown; the wrapper here ends them when leases are
//! revoked, so a watcher cannot hold the drain open past its grace.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::admin::readiness::{self, Readiness};

/// The name `lessor.v1.Pool` registers under.
pub(crate) const POOL_SERVICE: &str = "lessor.v1.Pool";

/// The health service: tonic-health's, with Watch streams that end on revoke.
pub(crate) struct LessorHealth {
    inner: HealthService,
    revoke: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for LessorHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let stream = self.inner.watch(request).await?.into_inner();
        let bounded = stream.take_until(self.revoke.clone().cancelled_owned());
        Ok(Response::new(Box::pin(bounded)))
    }
}

/// Builds the service with every entry NOT_SERVING (nothing is warm yet), and
/// the reporter that [`keep_updated`] drives.
pub(crate) async fn service(
    readiness: &Readiness,
    revoke: CancellationToken,
) -> (HealthServer<LessorHealth>, HealthReporter) {
    let reporter = HealthReporter::new();
    for name in entries(&readiness.report())
        .into_iter()
        .map(|(name, _)| name)
    {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let inner = HealthService::from_health_reporter(reporter.clone());
    (HealthServer::new(LessorHealth { inner, revoke }), reporter)
}

/// Every health entry and whether it is serving.
fn entries(report: &readiness::Report) -> Vec<(String, bool)> {
    let mut out = vec![
        (String::new(), report.ready),
        (POOL_SERVICE.to_owned(), report.ready),
    ];
    for u in &report.upstreams {
        out.push((
            format!("{POOL_SERVICE}/{}", u.name),
            u.ready && !report.draining,
        ));
    }
    out
}

/// Mirrors readiness into the health reporter until `cancel`, sending only
/// changes (each send wakes every Watch stream). Driven by readiness's change
/// signal, not a poll: nothing runs while nothing changes.
pub(crate) async fn keep_updated(
    reporter: HealthReporter,
    readiness: Arc<Readiness>,
    cancel: CancellationToken,
) {
    let mut changes = readiness.changes();
    let mut last: Vec<(String, bool)> = Vec::new();
    loop {
        changes.mark_unchanged();
        let now = entries(&readiness.report());
        for (name, serving) in &now {
            if last.iter().any(|(n, s)| n == name && s == serving) {
                continue;
            }
            let status = if *serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(name, status).await;
        }
        last = now;
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = changes.changed() => if changed.is_err() {
                return;
            },
        }
    }
}
