//! The `lessor.v1.Pool` service: `Lease` hands its stream to the lease pump
//! at once (the checkout happens inside the stream, after the response
//! headers, so a client that gives up while waiting cancels an open stream,
//! which h2 tolerates, where a cancel before them counts against its reset-flood limit), and `Stats` reads the pools' counters.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use lessor_client::pb::{
    self, LeaseRequest, LeaseResponse, StatsRequest, StatsResponse, UpstreamStats,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::exchange::ExchangeError;
use crate::lease::{LeaseContext, lease_span, lease_stream};
use crate::pool::PoolSnapshot;

/// The service implementation; cheap to clone into tonic.
#[derive(Clone)]
pub(crate) struct PoolService {
    ctx: Arc<LeaseContext>,
}

impl PoolService {
    /// A service over the context's pools.
    pub(crate) fn new(ctx: Arc<LeaseContext>) -> Self {
        Self { ctx }
    }

    /// The pools it serves (for [`super::limits::PoolRoutes`]'s Exchange
    /// limit).
    pub(crate) fn pools(&self) -> &crate::pool::PoolSet {
        &self.ctx.pools
    }
}

type LeaseStream = Pin<Box<dyn Stream<Item = Result<LeaseResponse, Status>> + Send>>;

/// How long delivering a CancelRequest may take.
const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[tonic::async_trait]
impl super::server::pool_server::Pool for PoolService {
    type LeaseStream = LeaseStream;

    async fn lease(
        &self,
        request: Request<Streaming<LeaseRequest>>,
    ) -> Result<Response<Self::LeaseStream>, Status> {
        let span = lease_span();
        let trace_id = crate::telemetry::propagation::trace_id(request.metadata());
        if !span.is_disabled() {
            let parent = crate::telemetry::propagation::extract(request.metadata());
            let _ = span.set_parent(parent);
        }
        let failed = span.clone();
        let stream =
            lease_stream(request.into_inner(), self.ctx.clone(), span, trace_id).map(move |item| {
                item.map_err(|e| {
                    let status = Status::from(e);
                    failed.record("rpc.grpc.status_code", status.code() as i64);
                    status
                })
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn exchange(
        &self,
        request: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        let r = request.into_inner();
        let request = crate::exchange::ExchangeRequest {
            upstream: r.upstream,
            request: r.request,
            checkout_timeout_ms: r.checkout_timeout_ms,
            timeout_ms: r.timeout_ms,
        };
        // Revocation first: at the end of grace nothing new starts.
        let done = tokio::select! {
            biased;
            _ = self.ctx.revoke.cancelled() => Err(ExchangeError::ShuttingDown),
            done = crate::exchange::exchange(&self.ctx.pools, request) => done,
        };
        let done = done.map_err(Status::from)?;
        Ok(Response::new(pb::ExchangeResponse {
            reply: done.reply,
            connection_id: done.connection_id,
            reused: done.reused,
            wait_us: done.waited.as_micros().try_into().unwrap_or(u64::MAX),
            endpoint: done.endpoint,
        }))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let lease_id = request.into_inner().lease_id;
        let endpoint = self
            .ctx
            .leases
            .cancel(&lease_id, CANCEL_TIMEOUT)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::CancelResponse {
            endpoint: endpoint.to_string(),
        }))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let want = request.into_inner().upstream;
        let pools = &self.ctx.pools;
        let upstreams = if want.is_empty() {
            pools.all().iter().map(|p| to_pb(p.snapshot())).collect()
        } else {
            let pool = pools.get(&want).ok_or_else(|| {
                Status::not_found(format!(
                    "unknown upstream `{}` (configured: {})",
                    crate::pool::printable_name(&want),
                    pools.names().join(", ")
                ))
            })?;
            vec![to_pb(pool.snapshot())]
        };
        Ok(Response::new(StatsResponse { upstreams }))
    }
}

fn to_pb(s: PoolSnapshot) -> UpstreamStats {
    UpstreamStats {
        name: s.name,
        engine: s.engine.to_owned(),
        max_size: s.max_size,
        connections: s.connections,
        idle: s.idle,
        leased: s.leased,
        waiting: s.waiting,
        leases_granted: s.leases_granted,
        connections_created: s.connections_created,
        evictions: s
            .evictions
            .into_iter()
            .map(|(reason, n)| (reason.as_str().to_owned(), n))
            .collect(),
        health_checks: s.health_checks,
        health_check_failures: s.health_check_failures,
        checkout_timeouts: s.checkout_timeouts,
        ready: s.ready,
        connect_errors: s.connect_errors,
        protocol: s.protocol.to_owned(),
        paused: s.paused,
        exchanges: s
            .exchanges
            .into_iter()
            .map(|(outcome, n)| (outcome.to_owned(), n))
            .collect(),
        endpoints: s
            .endpoints
            .into_iter()
            .map(|e| pb::EndpointStats {
                address: e.target,
                ready: e.ready,
                ejected: e.ejected,
                connections: e.connections,
                idle: e.idle,
                terminating: e.terminating,
                role: e.role.map(|r| r.as_str().to_owned()).unwrap_or_default(),
            })
            .collect(),
        tls: s.tls.map(|t| pb::UpstreamTls {
            mode: t.mode.to_owned(),
            server_name: t.server_name,
            client_cert_not_after_unix: t.client_cert_not_after.unwrap_or(0),
            reloads: t.reloads,
            reload_failures: t.reload_failures,
            last_reload_error: t.last_reload_error.unwrap_or_default(),
        }),
        fleet: s.fleet.map(fleet_to_pb),
    }
}

fn fleet_to_pb(f: crate::fleet::FleetSnapshot) -> pb::UpstreamFleet {
    pb::UpstreamFleet {
        budget: f.view.budget,
        effective_cap: f.cap,
        claim: f.view.claim,
        claimed_total: f.view.claimed_total,
        live_peers: f.view.live_peers,
        group: f.view.group,
        mode: f.view.mode.as_str().to_owned(),
        share: f.view.share,
        held: f.held,
        waiting: f.waiting,
        waits: f.waits,
        timeouts: f.timeouts,
        last_error: f.view.last_error.unwrap_or_default(),
    }
}
