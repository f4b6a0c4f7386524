//! `lessor_fleet_*`: each fleet-budgeted upstream's share of its group's
//! budget, read from the pool's cap gate at scrape time. Waits at the fleet
//! cap are their own figures (`lessor_fleet_waiters`,
//! `lessor_fleet_cap_waits_total`), apart from the pool's `lessor_pool_waiters`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::metrics::family;
use crate::fleet::{FleetMode, FleetSnapshot};
use crate::pool::PoolSet;

/// A gauge: its name, its help, and how it is read from a snapshot.
type Gauge = (&'static str, &'static str, fn(&FleetSnapshot) -> u32);

/// The fleet figures of every upstream with a `fleet:` block.
pub(super) struct FleetCollector {
    pub(super) pools: Arc<PoolSet>,
}

impl std::fmt::Debug for FleetCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCollector").finish_non_exhaustive()
    }
}

impl Collector for FleetCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let fleets: Vec<(String, FleetSnapshot)> = self
            .pools
            .all()
            .iter()
            .filter_map(|p| Some((p.name().to_owned(), p.fleet_cap()?.snapshot())))
            .collect();
        if fleets.is_empty() {
            return Ok(());
        }
        let up = |name: &str| [("upstream", name.to_owned())];
        let gauges: [Gauge; 7] = [
            (
                "lessor_fleet_budget",
                "The connections the whole group may hold to the upstream.",
                |f| f.view.budget,
            ),
            (
                "lessor_fleet_effective_cap",
                "The connections this sidecar may hold now: its accepted claim, at most pool.max_size.",
                |f| f.cap,
            ),
            (
                "lessor_fleet_claim",
                "This sidecar's published claim (its Lease's lessor.dev/claim).",
                |f| f.view.claim,
            ),
            (
                "lessor_fleet_claimed_total",
                "The sum of the live claims of the group, this sidecar's included.",
                |f| f.view.claimed_total,
            ),
            (
                "lessor_fleet_live_peers",
                "Live sidecars of the group (unexpired Leases), this one included.",
                |f| f.view.live_peers,
            ),
            (
                "lessor_fleet_connections",
                "Connections open or being dialed under the fleet cap.",
                |f| f.held,
            ),
            (
                "lessor_fleet_waiters",
                "Checkouts waiting now because of the fleet cap (not the pool's max_size).",
                |f| f.waiting,
            ),
        ];
        for (name, help, of) in gauges {
            family(
                &mut e,
                name,
                help,
                fleets
                    .iter()
                    .map(|(n, f)| (up(n), ConstGauge::new(i64::from(of(f))))),
            )?;
        }
        family(
            &mut e,
            "lessor_fleet_cap_waits",
            "Checkouts that had to wait because of the fleet cap.",
            fleets
                .iter()
                .map(|(n, f)| (up(n), ConstCounter::new(f.waits))),
        )?;
        family(
            &mut e,
            "lessor_fleet_cap_timeouts",
            "Checkouts whose deadline passed while waiting at the fleet cap.",
            fleets
                .iter()
                .map(|(n, f)| (up(n), ConstCounter::new(f.timeouts))),
        )?;
        let modes = [
            FleetMode::Starting,
            FleetMode::Coordinated,
            FleetMode::Local,
            FleetMode::Fenced,
        ];
        family(
            &mut e,
            "lessor_fleet_mode",
            "1 for how the cap is decided now: coordinated, local (no Kubernetes API), starting, fenced.",
            fleets.iter().flat_map(|(n, f)| {
                modes.iter().map(move |m| {
                    (
                        vec![("upstream", n.clone()), ("mode", m.as_str().to_owned())],
                        ConstGauge::new(i64::from(f.view.mode == *m)),
                    )
                })
            }),
        )?;
        Ok(())
    }
}
