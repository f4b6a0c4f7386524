//! A sidecar's fleet Lease (`coordination.k8s.io/v1`): how it is named,
//! labelled and annotated, and how a peer's Lease is read.
//!
//! - name `lessor-<group>-<pod>`; `spec.holderIdentity` the pod name;
//! - label `lessor.dev/group: <group>` (what the group's watch selects);
//! - annotation `lessor.dev/claim`: the connections the sidecar may hold;
//! - `spec.renewTime` + `spec.leaseDurationSeconds`: while that lies in the
//!   future the Lease is live and its claim counts.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

use super::rules::PeerClaim;

/// The label that selects a group's Leases.
pub(crate) const GROUP_LABEL: &str = "lessor.dev/group";
/// The annotation holding a sidecar's claim (a whole number of connections).
pub(crate) const CLAIM_ANNOTATION: &str = "lessor.dev/claim";

/// The Lease name of `pod` in `group`.
pub(crate) fn name(group: &str, pod: &str) -> String {
    format!("lessor-{group}-{pod}")
}

/// `now` as the API's MicroTime.
pub(crate) fn micro_time(now: SystemTime) -> MicroTime {
    let millis = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let ts = k8s_openapi::jiff::Timestamp::from_millisecond(i64::try_from(millis).unwrap_or(0))
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    MicroTime(ts)
}

/// A new Lease object for this sidecar, claiming `claim`, renewed `now`.
pub(crate) fn build(
    group: &str,
    pod: &str,
    lease_duration: Duration,
    claim: u32,
    now: SystemTime,
) -> Lease {
    let mut lease = Lease {
        metadata: ObjectMeta {
            name: Some(name(group, pod)),
            labels: Some(BTreeMap::from([(GROUP_LABEL.to_owned(), group.to_owned())])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(pod.to_owned()),
            lease_duration_seconds: Some(
                i32::try_from(lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(micro_time(now)),
            ..Default::default()
        }),
    };
    stamp(&mut lease, claim, now);
    lease
}

/// Sets the claim annotation and renews the Lease at `now`.
pub(crate) fn stamp(lease: &mut Lease, claim: u32, now: SystemTime) {
    lease
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(CLAIM_ANNOTATION.to_owned(), claim.to_string());
    lease.spec.get_or_insert_default().renew_time = Some(micro_time(now));
}

/// When a Lease stops counting: `renewTime + leaseDurationSeconds`; `None`
/// when it has no renewal (never live).
pub(crate) fn expires(lease: &Lease) -> Option<SystemTime> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0.as_millisecond();
    let secs = u64::try_from(spec.lease_duration_seconds?).ok()?;
    let renewed = UNIX_EPOCH + Duration::from_millis(u64::try_from(renewed).ok()?);
    Some(renewed + Duration::from_secs(secs))
}

/// A Lease's claim; an unreadable annotation counts as nothing claimed
/// (only lessor writes it).
pub(crate) fn claim(lease: &Lease) -> u32 {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CLAIM_ANNOTATION))
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0)
}

/// The live peers among `leases` at `now`, without the Lease named `own`.
pub(crate) fn live_peers<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    own: &str,
    now: SystemTime,
) -> Vec<PeerClaim> {
    let mut peers: Vec<PeerClaim> = leases
        .into_iter()
        .filter(|l| l.metadata.name.as_deref() != Some(own))
        .filter(|l| l.metadata.deletion_timestamp.is_none())
        .filter(|l| expires(l).is_some_and(|at| at > now))
        .map(|l| PeerClaim {
            pod: l
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.clone())
                .or_else(|| l.metadata.name.clone())
                .unwrap_or_default(),
            claim: claim(l),
        })
        .collect();
    peers.sort_by(|a, b| a.pod.cmp(&b.pod));
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_counts_until_its_duration_after_renewal() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mine = build("orders", "pod-a", Duration::from_secs(15), 3, t0);
        assert_eq!(mine.metadata.name.as_deref(), Some("lessor-orders-pod-a"));
        assert_eq!(claim(&mine), 3);
        assert_eq!(expires(&mine), Some(t0 + Duration::from_secs(15)));
        let other = build("orders", "pod-b", Duration::from_secs(15), 7, t0);
        let live = live_peers(
            [&mine, &other],
            "lessor-orders-pod-a",
            t0 + Duration::from_secs(14),
        );
        assert_eq!(
            live,
            [PeerClaim {
                pod: "pod-b".into(),
                claim: 7
            }]
        );
        assert!(live_peers([&other], "x", t0 + Duration::from_secs(15)).is_empty());
        let json = serde_json::to_value(&other).unwrap();
        assert_eq!(json["metadata"]["labels"][GROUP_LABEL], "orders");
        assert_eq!(json["metadata"]["annotations"][CLAIM_ANNOTATION], "7");
        assert_eq!(json["spec"]["holderIdentity"], "pod-b");
        assert_eq!(json["spec"]["leaseDurationSeconds"], 15);
        let renew = json["spec"]["renewTime"].as_str().unwrap();
        assert!(
            renew.ends_with(".000000Z"),
            "MicroTime has 6 digits: {renew}"
        );
    }
}
