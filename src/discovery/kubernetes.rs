//! Kubernetes discovery: a `kube` reflector on the `discovery.k8s.io/v1`
//! EndpointSlices labelled `kubernetes.io/service-name=SERVICE`, listed then
//! watched (the initial-list strategy is pinned to list-then-watch, which
//! every API server supports). Each change rebuilds the endpoint set from
//! every slice in the store.
//!
//! The port is the EndpointSlice port, by name (the Service port's name) or
//! number (the target port), so no access to Services is needed: the RBAC is
//! `get/list/watch` on `endpointslices` only. When the API is unreachable the
//! watcher retries with kube's default backoff and the last endpoints stay.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::runtime::watcher::{self, Event, InitialListStrategy};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::{Discovered, EndpointSet};
use crate::config::{KubernetesDiscovery, PortRef};

const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The namespace to watch: the configured one, else the pod's own.
pub(crate) fn namespace(config: &KubernetesDiscovery) -> Option<String> {
    config
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok())
        .map(|ns| ns.trim().to_owned())
        .filter(|ns| !ns.is_empty())
}

/// The endpoints that `slices` describe for `port`. An address in several
/// slices counts once, ready if any slice says so. Per the API, a missing
/// `ready` condition means ready and a missing `terminating` means not.
pub(crate) fn endpoints_from_slices(
    slices: &[Arc<EndpointSlice>],
    port: &PortRef,
) -> Vec<Discovered> {
    let mut found: BTreeMap<String, Discovered> = BTreeMap::new();
    for slice in slices {
        let Some(number) = slice.ports.iter().flatten().find_map(|p| {
            let matches = match port {
                PortRef::Name(name) => p.name.as_deref() == Some(name.as_str()),
                PortRef::Number(n) => p.port == Some(i32::from(*n)),
            };
            if matches { p.port } else { None }
        }) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            let terminating = conditions.terminating.unwrap_or(false);
            let ready = conditions.ready.unwrap_or(true) && !terminating;
            for address in &endpoint.addresses {
                let target = if address.contains(':') {
                    format!("[{address}]:{number}")
                } else {
                    format!("{address}:{number}")
                };
                found
                    .entry(target.clone())
                    .and_modify(|d| {
                        d.ready |= ready;
                        d.terminating &= terminating;
                    })
                    .or_insert(Discovered {
                        target,
                        ready,
                        terminating,
                    });
            }
        }
    }
    found.into_values().collect()
}

/// Watches until `cancel`.
pub(crate) async fn run(
    upstream: String,
    config: KubernetesDiscovery,
    set: Arc<EndpointSet>,
    cancel: CancellationToken,
) {
    let Some(namespace) = namespace(&config) else {
        set.set_status(
            true,
            "kubernetes: cannot tell the pod's namespace (no POD_NAMESPACE, no service account): set discovery.kubernetes.namespace".into(),
        );
        return;
    };
    let what = format!(
        "kubernetes {namespace}/{} port {}",
        config.service, config.port
    );
    let mut retry = Duration::from_millis(200);
    let client = loop {
        match Client::try_default().await {
            Ok(client) => break client,
            Err(e) => {
                tracing::warn!(upstream = %upstream, error = %e, "no Kubernetes client; retrying");
                set.set_status(true, format!("{what}: no Kubernetes client ({e})"));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    };
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let selector = format!("kubernetes.io/service-name={}", config.service);
    let mut watch_config = watcher::Config::default().labels(&selector);
    watch_config.initial_list_strategy = InitialListStrategy::ListWatch;
    let (store, writer) = reflector::store();
    let stream = reflector(writer, watcher::watcher(api.clone(), watch_config)).default_backoff();
    tokio::pin!(stream);
    // After an error, a resumed watch says nothing until something changes;
    // a small list (one item) now and then tells when the API is back.
    let probe = ListParams::default().labels(&selector).limit(1);
    let mut recheck: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let healthy = |set: &EndpointSet| {
        let found = set.snapshot();
        let ready = found.iter().filter(|e| e.ready).count();
        format!("{what}: {} endpoints, {ready} ready", found.len())
    };
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            event = stream.next() => event,
            () = async { recheck.as_mut().expect("guarded").await }, if recheck.is_some() => {
                recheck = match api.list_metadata(&probe).await {
                    Ok(_) if set.status().synced => {
                        set.set_status(false, healthy(&set));
                        None
                    }
                    _ => Some(Box::pin(tokio::time::sleep(Duration::from_secs(2)))),
                };
                continue;
            }
        };
        match event {
            None => return,
            Some(Ok(Event::Init | Event::InitApply(_))) => {}
            Some(Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_))) => {
                set.update(endpoints_from_slices(&store.state(), &config.port));
                set.set_status(false, healthy(&set));
                recheck = None;
            }
            Some(Err(e)) => {
                let kept = set.snapshot().len();
                tracing::warn!(upstream = %upstream, error = %e, kept, "Kubernetes API unreachable; keeping the last endpoints");
                let synced = set.status().synced;
                let detail = if synced {
                    format!("{what}: API unreachable ({e}); keeping the last {kept} endpoints")
                } else {
                    format!("{what}: API unreachable ({e}); no endpoints yet")
                };
                set.set_status(true, detail);
                if recheck.is_none() {
                    recheck = Some(Box::pin(tokio::time::sleep(Duration::from_secs(1))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    fn slice(
        port: (&str, i32),
        endpoints: Vec<(&str, Option<bool>, Option<bool>)>,
    ) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some(port.0.into()),
                port: Some(port.1),
                ..Default::default()
            }]),
            endpoints: endpoints
                .into_iter()
                .map(|(addr, ready, terminating)| Endpoint {
                    addresses: vec![addr.into()],
                    conditions: Some(EndpointConditions {
                        ready,
                        terminating,
                        serving: None,
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    #[test]
    fn ports_by_name_or_number_and_conditions() {
        let slices = vec![
            slice(
                ("redis", 6379),
                vec![("10.0.0.1", Some(true), None), ("10.0.0.2", None, None)],
            ),
            slice(
                ("redis", 6379),
                vec![
                    ("10.0.0.3", Some(false), None),
                    ("10.0.0.4", Some(true), Some(true)),
                ],
            ),
            slice(("metrics", 9121), vec![("10.0.0.9", Some(true), None)]),
        ];
        let by_name = endpoints_from_slices(&slices, &PortRef::Name("redis".into()));
        let summary: Vec<_> = by_name
            .iter()
            .map(|d| (d.target.as_str(), d.ready, d.terminating))
            .collect();
        assert_eq!(
            summary,
            [
                ("10.0.0.1:6379", true, false),
                ("10.0.0.2:6379", true, false),
                ("10.0.0.3:6379", false, false),
                ("10.0.0.4:6379", false, true),
            ]
        );
        let by_number = endpoints_from_slices(&slices, &PortRef::Number(9121));
        assert_eq!(by_number.len(), 1);
        assert_eq!(by_number[0].target, "10.0.0.9:9121");
        assert!(endpoints_from_slices(&slices, &PortRef::Name("nope".into())).is_empty());
    }

    #[test]
    fn ipv6_addresses_are_bracketed_and_duplicates_merge() {
        let slices = vec![
            slice(("p", 5432), vec![("fd00::1", Some(false), None)]),
            slice(("p", 5432), vec![("fd00::1", Some(true), None)]),
        ];
        let found = endpoints_from_slices(&slices, &PortRef::Name("p".into()));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].target, "[fd00::1]:5432");
        assert!(found[0].ready, "ready in any slice");
    }
}
