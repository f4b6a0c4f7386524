//! Each RPC's inbound message limit, matched to what it carries. tonic sets
//! one decoding limit per service, so [`PoolRoutes`] keeps one `PoolServer`
//! per limit and routes by method:
//!
//! - `Exchange` carries a whole protocol request: its limit is the largest
//!   `redis.max_frame` / `postgres.max_frame` among the protocol upstreams
//!   running now (read at each call, so a reload applies), plus
//!   [`OVERHEAD`];
//! - `Lease` carries `Data` of at most `grpc.max_frame`: its limit is that
//!   plus [`OVERHEAD`], so a `Data` just over `grpc.max_frame` still reaches
//!   the pump (which ends the lease with `INVALID_ARGUMENT`, evicting) and a
//!   far larger one is refused by tonic (`OUT_OF_RANGE`) before it is
//!   buffered. `Stats` and `Cancel` get the same.

use std::convert::Infallible;
use std::task::{Context, Poll};

use super::server::pool_server::PoolServer;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};

use super::PoolService;
use crate::config::Protocol;

/// What a message may add to the payload it carries: field tags and
/// lengths, the upstream's name (at most 63 bytes), the timeouts. Well
/// above the few dozen bytes they take.
pub(crate) const OVERHEAD: usize = 1024;

/// The `Pool` service with a decoding limit per method.
#[derive(Clone)]
pub(crate) struct PoolRoutes {
    service: PoolService,
    /// For `Lease`, `Stats` and `Cancel`: `grpc.max_frame` + [`OVERHEAD`].
    streams: PoolServer<PoolService>,
}

impl PoolRoutes {
    /// Routes over `service`; `max_frame` is `grpc.max_frame` in bytes.
    pub(crate) fn new(service: PoolService, max_frame: usize) -> Self {
        let streams = PoolServer::new(service.clone())
            .max_decoding_message_size(max_frame.saturating_add(OVERHEAD));
        Self { service, streams }
    }

    /// `Exchange`'s limit now: the largest `max_frame` of the protocol
    /// upstreams plus [`OVERHEAD`] (just the overhead when there is none:
    /// an Exchange then only gets `FAILED_PRECONDITION`).
    pub(crate) fn exchange_limit(&self) -> usize {
        let largest = self
            .service
            .pools()
            .all()
            .iter()
            .filter_map(|p| {
                let c = p.config();
                match c.protocol {
                    Protocol::Redis => Some(c.redis.max_frame.as_u64()),
                    Protocol::Postgres => Some(c.postgres.max_frame.as_u64()),
                    Protocol::Tcp => None,
                }
            })
            .max()
            .unwrap_or(0);
        usize::try_from(largest)
            .unwrap_or(usize::MAX)
            .saturating_add(OVERHEAD)
    }
}

impl tonic::server::NamedService for PoolRoutes {
    const NAME: &'static str = super::server::pool_server::SERVICE_NAME;
}

impl Service<http::Request<Body>> for PoolRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() == "/lessor.v1.Pool/Exchange" {
            // Cheap: an Arc and a few settings. Built per call so the limit
            // follows the upstreams a reload installs.
            let mut server = PoolServer::new(self.service.clone())
                .max_decoding_message_size(self.exchange_limit());
            server.call(request)
        } else {
            self.streams.call(request)
        }
    }
}
