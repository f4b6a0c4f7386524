//! The rules of the fleet budget, as pure functions of what a sidecar sees:
//! the budget, its own claim and connections, and its live peers' claims.
//! The coordination loop (`member.rs`) applies them; the API calls are its
//! business, the arithmetic is here.

/// A live peer's published claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerClaim {
    /// The peer's pod name (its Lease's `holderIdentity`).
    pub pod: String,
    /// Its `lessor.dev/claim`.
    pub claim: u32,
}

/// What a sidecar should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Claim is at the target: the cap is the claim.
    Hold,
    /// Publish a higher claim (then verify it with a fresh read before
    /// dialing past the old one).
    Grow(u32),
    /// Above the fair share: the cap drops to the target now; the claim
    /// follows as connections close.
    Shrink(u32),
}

/// The outcome of [`decide`], with the numbers behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    /// This sidecar's fair share of the budget.
    pub share: u32,
    /// `min(share, max_size)`: what it aims to claim.
    pub target: u32,
    /// The sum of the live claims, this sidecar's included.
    pub claimed_total: u32,
    /// Live sidecars, this one included.
    pub live: u32,
    /// What to do.
    pub step: Step,
}

/// The fair share of `me` among the live pods: `budget / live`, the
/// remainder going one each to the first pods by name, so every pod computes
/// the same split from the same view and the shares sum to the budget. While
/// the budget allows (`budget >= live`), each pod gets at least one.
pub(crate) fn fair_share(budget: u32, me: &str, peers: &[PeerClaim]) -> u32 {
    let live = peers.len() as u32 + 1;
    let base = budget / live;
    let extra = budget % live;
    let rank = peers.iter().filter(|p| p.pod.as_str() < me).count() as u32;
    base + u32::from(rank < extra)
}

/// Decides the next step. `claim` is this sidecar's accepted claim, `peers`
/// the other live sidecars of the group.
///
/// - A sidecar grows only into room: the sum of the live claims stays within
///   the budget.
/// - Above its share it shrinks: the cap drops at once; the published claim
///   follows when the connections have closed (the caller's business).
pub(crate) fn decide(
    budget: u32,
    max_size: u32,
    me: &str,
    claim: u32,
    peers: &[PeerClaim],
) -> Decision {
    let share = fair_share(budget, me, peers);
    let target = share.min(max_size);
    let others: u64 = peers.iter().map(|p| u64::from(p.claim)).sum();
    let claimed_total = u32::try_from(others + u64::from(claim)).unwrap_or(u32::MAX);
    let step = if claim > target {
        Step::Shrink(target)
    } else if claim < target {
        let room = u64::from(budget).saturating_sub(others + u64::from(claim));
        let grow = u64::from(target - claim).min(room) as u32;
        if grow > 0 {
            Step::Grow(claim + grow)
        } else {
            Step::Hold
        }
    } else {
        Step::Hold
    };
    Decision {
        share,
        target,
        claimed_total,
        live: peers.len() as u32 + 1,
        step,
    }
}

/// Whether a claim just published is safe to dial under: the sum of the
/// live claims read back after the write stays within the budget.
pub(crate) fn accepted(budget: u32, mine: u32, peers: &[PeerClaim]) -> bool {
    let others: u64 = peers.iter().map(|p| u64::from(p.claim)).sum();
    others + u64::from(mine) <= u64::from(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(claims: &[(&str, u32)]) -> Vec<PeerClaim> {
        claims
            .iter()
            .map(|(pod, claim)| PeerClaim {
                pod: (*pod).into(),
                claim: *claim,
            })
            .collect()
    }

    #[test]
    fn shares_sum_to_the_budget_and_give_everyone_one_while_they_can() {
        let pods = ["a", "b", "c", "d", "e", "f"];
        for budget in [1, 3, 6, 7, 20, 101] {
            let total: u32 = pods
                .iter()
                .map(|me| {
                    let others: Vec<_> =
                        pods.iter().filter(|p| *p != me).map(|p| (*p, 0)).collect();
                    fair_share(budget, me, &peers(&others))
                })
                .sum();
            assert_eq!(total, budget, "budget {budget}");
            if budget >= pods.len() as u32 {
                for me in pods {
                    let others: Vec<_> =
                        pods.iter().filter(|p| **p != me).map(|p| (*p, 0)).collect();
                    assert!(fair_share(budget, me, &peers(&others)) >= 1);
                }
            }
        }
        assert_eq!(fair_share(20, "a", &peers(&[("b", 0), ("c", 0)])), 7);
        assert_eq!(fair_share(20, "c", &peers(&[("a", 0), ("b", 0)])), 6);
    }

    #[test]
    fn a_new_pod_grows_only_into_what_others_free() {
        // Four pods held 5 each; a fifth arrives at 0.
        let full = peers(&[("a", 5), ("b", 5), ("c", 5), ("d", 5)]);
        let d = decide(20, 32, "e", 0, &full);
        assert_eq!(
            (d.share, d.step, d.claimed_total, d.live),
            (4, Step::Hold, 20, 5)
        );
        // The others shrink to 4.
        assert_eq!(
            decide(
                20,
                32,
                "a",
                5,
                &peers(&[("b", 5), ("c", 5), ("d", 5), ("e", 0)])
            )
            .step,
            Step::Shrink(4)
        );
        // Once one has published 4, the new pod can take that one.
        let d = decide(
            20,
            32,
            "e",
            0,
            &peers(&[("a", 4), ("b", 5), ("c", 5), ("d", 5)]),
        );
        assert_eq!(d.step, Step::Grow(1));
        let d = decide(
            20,
            32,
            "e",
            1,
            &peers(&[("a", 4), ("b", 4), ("c", 4), ("d", 4)]),
        );
        assert_eq!(d.step, Step::Grow(4));
    }

    #[test]
    fn max_size_caps_the_target_and_shrinking_waits_for_held() {
        assert_eq!(decide(100, 8, "a", 0, &[]).step, Step::Grow(8));
        assert_eq!(decide(100, 8, "a", 8, &[]).step, Step::Hold);
        assert!(accepted(20, 5, &peers(&[("a", 15)])));
        assert!(!accepted(20, 6, &peers(&[("a", 15)])));
    }

    #[test]
    fn more_pods_than_budget_leaves_some_at_zero() {
        let others = peers(&[("a", 1), ("b", 1)]);
        assert_eq!(fair_share(2, "c", &others), 0);
        assert_eq!(decide(2, 32, "c", 0, &others).step, Step::Hold);
    }
}
