//! DNS discovery: every address of a (headless Service) name, re-resolved
//! every `refresh`. A failed lookup keeps the last answer and retries at the
//! next refresh, sooner while no answer was ever had.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Discovered, EndpointSet, Resolver};
use crate::config::DnsDiscovery;

/// Resolves until `cancel`.
pub(super) async fn run(
    upstream: String,
    config: DnsDiscovery,
    set: Arc<EndpointSet>,
    resolver: Arc<dyn Resolver>,
    cancel: CancellationToken,
) {
    let what = format!("dns {}:{}", config.name, config.port);
    let mut retry = Duration::from_millis(100);
    loop {
        let wait = match resolver.resolve(&config.name, config.port).await {
            Ok(mut addrs) => {
                addrs.sort();
                addrs.dedup();
                let found: Vec<Discovered> = addrs
                    .iter()
                    .map(|a| Discovered {
                        target: a.to_string(),
                        ready: true,
                        terminating: false,
                    })
                    .collect();
                let n = found.len();
                set.update(found);
                set.set_status(false, format!("{what}: {n} addresses"));
                retry = Duration::from_millis(100);
                config.refresh
            }
            Err(e) => {
                let kept = set.snapshot().len();
                tracing::warn!(upstream = %upstream, name = %config.name, error = %e, kept, "DNS lookup failed; keeping the last answer");
                set.set_status(
                    true,
                    format!("{what}: lookup failed ({e}); keeping {kept} endpoints"),
                );
                if set.status().synced {
                    config.refresh
                } else {
                    retry = (retry * 2).min(config.refresh);
                    retry
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
