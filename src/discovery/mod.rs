//! Where an upstream's endpoints come from: a static `address` (one
//! endpoint, resolved at dial time) or list (`discovery.static`), DNS
//! (every A/AAAA record of a name, re-resolved every `refresh`), or
//! Kubernetes EndpointSlices (watched). Each source feeds the upstream's
//! [`EndpointSet`], which the pool dials from.
//!
//! A source that fails keeps the last known endpoints, retries with backoff,
//! and says so in `/readyz?verbose`; an upstream is not ready before its
//! source's first successful sync.

mod balance;
mod dns;
pub(crate) mod kubernetes;

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use balance::{
    Discovered, Endpoint, EndpointRef, EndpointSet, EndpointSnapshot, NoEndpoint, Retirement,
    SourceStatus, role_fits,
};

use crate::config::{Source, UpstreamConfig};

/// Name resolution for DNS discovery, behind a trait so tests can change the
/// answers between refreshes.
pub trait Resolver: Send + Sync + 'static {
    /// Every address of `name`, with `port`.
    fn resolve(
        &self,
        name: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo`, through tokio).
#[derive(Debug, Default)]
pub(crate) struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(
        &self,
        name: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let host = format!("{name}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(host).await?.collect()) })
    }
}

/// The endpoint set an upstream starts with: its one endpoint for a static
/// address, an empty set waiting for its source otherwise.
pub(crate) fn endpoint_set(config: &UpstreamConfig) -> Arc<EndpointSet> {
    match &config.source {
        Source::Address(address) => EndpointSet::listed(
            std::slice::from_ref(address),
            config.outlier.clone(),
            config.role,
            "static address",
        ),
        Source::Static(list) => {
            EndpointSet::listed(list, config.outlier.clone(), config.role, "static list")
        }
        Source::Dns(_) | Source::Kubernetes(_) => EndpointSet::with_role(
            config.outlier.clone(),
            &format!("{}: waiting for the first sync", config.source),
            config.role,
        ),
    }
}

/// Starts the upstream's discovery source (nothing for a static address) on
/// `tracker`, until `cancel`.
pub(crate) fn start(
    config: &UpstreamConfig,
    set: Arc<EndpointSet>,
    resolver: Arc<dyn Resolver>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let upstream = config.name.clone();
    match &config.source {
        Source::Address(_) | Source::Static(_) => {}
        Source::Dns(dns) => {
            tracker.spawn(dns::run(
                upstream,
                dns.clone(),
                set,
                resolver,
                cancel.clone(),
            ));
        }
        Source::Kubernetes(kube) => {
            tracker.spawn(kubernetes::run(upstream, kube.clone(), set, cancel.clone()));
        }
    }
}
