//! The arithmetic of a rollout, apart from any store: how many workloads each revision of a
//! deployment should have next, given how many it has and how many of them are available.
//! Everything here is pure, so the bounds are checked by property tests.

/// What one revision has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// The replicas it is asked for (its spec).
    pub spec: u32,
    /// Its workloads that exist (not being deleted); above `spec` while a scale-down is under way.
    pub actual: u32,
    /// Those of them that are available (ready for `minReadySeconds`).
    pub available: u32,
}

impl Counts {
    /// The workloads it has or is about to have: the larger of spec and actual.
    pub fn size(&self) -> u32 {
        self.spec.max(self.actual)
    }
}

/// The next step of a rolling update: the new revision's replicas, and each old one's (in the
/// order given, oldest first).
///
/// Bounds it keeps, with `surge` and `unavailable` already resolved against `replicas`:
/// - the workloads of every revision together never exceed `replicas + surge` because of it
///   (nor grow when they already do);
/// - available workloads never drop below `replicas - unavailable` because of it (nor drop at
///   all when they already are below): an old revision gives up unavailable workloads first,
///   available ones only while more than `replicas - unavailable` are available.
pub fn rolling(replicas: u32, surge: u32, unavailable: u32, new: Counts, old: &[Counts]) -> (u32, Vec<u32>) {
    let total: u32 = new.size() + old.iter().map(Counts::size).sum::<u32>();
    let max_total = replicas.saturating_add(surge);
    let new_target = if new.spec < replicas {
        new.spec + max_total.saturating_sub(total).min(replicas - new.spec)
    } else {
        replicas
    };
    let min_available = replicas.saturating_sub(unavailable);
    let all = new_target.max(new.actual) + old.iter().map(Counts::size).sum::<u32>();
    let new_unavailable = new_target.saturating_sub(new.available);
    // How far the old revisions may shrink in all this step.
    let mut budget = all.saturating_sub(min_available).saturating_sub(new_unavailable);
    let mut targets: Vec<u32> = old.iter().map(|o| o.spec).collect();
    // First the workloads that are not available anyway: removing them costs nothing.
    for (t, o) in targets.iter_mut().zip(old) {
        let cut = t.saturating_sub(o.available).min(budget);
        *t -= cut;
        budget -= cut;
    }
    // Then available ones, while more than the minimum are available.
    let available: u32 = new.available + targets.iter().zip(old).map(|(t, o)| o.available.min(*t)).sum::<u32>();
    let mut spare = available.saturating_sub(min_available);
    for t in targets.iter_mut() {
        let cut = (*t).min(spare);
        *t -= cut;
        spare -= cut;
    }
    (new_target, targets)
}

/// The next step of a recreate: old revisions go to zero; the new one scales up only once no
/// old workload is left.
pub fn recreate(replicas: u32, new: Counts, old: &[Counts]) -> (u32, Vec<u32>) {
    if old.iter().any(|o| o.size() > 0) { (new.spec, vec![0; old.len()]) } else { (replicas, vec![0; old.len()]) }
}

/// Spreads a change of the desired replicas over revisions that all still have workloads (a
/// scale in the middle of a rollout), in proportion to their sizes, so the rollout goes on from
/// the same mix. `specs` lists their replicas, newest first; the answer keeps that order and
/// sums to `replicas + surge` (never below zero for any).
pub fn proportional(replicas: u32, surge: u32, specs: &[u32]) -> Vec<u32> {
    let total: u64 = specs.iter().map(|s| u64::from(*s)).sum();
    let allowed = u64::from(replicas.saturating_add(surge));
    if total == 0 || total == allowed {
        return specs.to_vec();
    }
    let mut out = specs.to_vec();
    if allowed > total {
        let delta = allowed - total;
        let mut given = 0;
        for (o, s) in out.iter_mut().zip(specs) {
            let share = u64::from(*s) * delta / total;
            *o += share as u32;
            given += share;
        }
        // The rounding remainder goes to the newest revision.
        out[0] += (delta - given) as u32;
    } else {
        let delta = total - allowed;
        let mut taken = 0;
        for (o, s) in out.iter_mut().zip(specs) {
            let share = (u64::from(*s) * delta / total).min(u64::from(*o));
            *o -= share as u32;
            taken += share;
        }
        // The remainder comes off the largest revisions.
        let mut rest = delta - taken;
        let mut order: Vec<usize> = (0..out.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(out[i]));
        for i in order {
            let cut = rest.min(u64::from(out[i]));
            out[i] -= cut as u32;
            rest -= cut;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn counts() -> impl Strategy<Value = Counts> {
        (0u32..30, 0u32..30, 0u32..30).prop_map(|(spec, actual, available)| Counts {
            spec,
            actual,
            available: available.min(actual),
        })
    }

    proptest! {
        #[test]
        fn a_rolling_step_keeps_surge_and_availability(
            replicas in 0u32..40,
            surge in 0u32..10,
            unavailable in 0u32..10,
            new in counts(),
            old in proptest::collection::vec(counts(), 0..4),
        ) {
            let unavailable = if surge == 0 && unavailable == 0 { 1 } else { unavailable.min(replicas) };
            let (new_t, old_t) = rolling(replicas, surge, unavailable, new, &old);
            let before: u32 = new.size() + old.iter().map(Counts::size).sum::<u32>();
            let after: u32 = new_t.max(new.actual) + old.iter().zip(&old_t).map(|(o, t)| o.actual.max(*t)).sum::<u32>();
            prop_assert!(after <= before.max(replicas + surge), "surge: {after} > max({before}, {})", replicas + surge);
            // What the revisions were already headed for: each keeps at most its spec.
            let avail_before: u32 = new.available + old.iter().map(|o| o.available.min(o.spec)).sum::<u32>();
            // An old revision deletes unavailable workloads first.
            let avail_after: u32 = new.available + old.iter().zip(&old_t).map(|(o, t)| o.available.min(*t)).sum::<u32>();
            let min_available = replicas.saturating_sub(unavailable);
            prop_assert!(avail_after >= min_available.min(avail_before), "availability {avail_after} < {min_available}");
            prop_assert!(new_t <= replicas.max(new.spec) && old.iter().zip(&old_t).all(|(o, t)| *t <= o.spec));
        }

        #[test]
        fn a_rolling_update_converges_when_workloads_become_available(
            replicas in 0u32..40,
            surge in 0u32..10,
            unavailable in 0u32..10,
            old in proptest::collection::vec(0u32..30, 0..4),
        ) {
            let unavailable = if surge == 0 && unavailable == 0 { 1 } else { unavailable.min(replicas) };
            let mut new = Counts::default();
            let mut old: Vec<Counts> = old.into_iter().map(|n| Counts { spec: n, actual: n, available: n }).collect();
            for _ in 0..200 {
                let (n, o) = rolling(replicas, surge, unavailable, new, &old);
                // The world catches up: every asked-for workload exists and is available.
                new = Counts { spec: n, actual: n, available: n };
                for (c, t) in old.iter_mut().zip(o) {
                    *c = Counts { spec: t, actual: t, available: t };
                }
                if new.spec == replicas && old.iter().all(|o| o.spec == 0) {
                    return Ok(());
                }
            }
            prop_assert!(false, "no convergence: new {new:?}, old {old:?}");
        }

        #[test]
        fn proportional_scaling_sums_to_the_allowance(
            replicas in 0u32..100,
            surge in 0u32..20,
            specs in proptest::collection::vec(0u32..50, 1..5),
        ) {
            let out = proportional(replicas, surge, &specs);
            prop_assert_eq!(out.len(), specs.len());
            let total: u32 = specs.iter().sum();
            if total > 0 {
                prop_assert_eq!(out.iter().sum::<u32>(), replicas + surge);
                let grow = replicas + surge > total;
                for (o, s) in out.iter().zip(&specs) {
                    prop_assert!(if grow { o >= s } else { o <= s }, "{specs:?} -> {out:?}");
                }
            } else {
                prop_assert_eq!(out, specs);
            }
        }
    }

    #[test]
    fn a_rolling_update_by_hand() {
        // 10 replicas, surge 3, unavailable 2, all on the old revision: 3 new at once, 2 old go.
        let old = [Counts { spec: 10, actual: 10, available: 10 }];
        assert_eq!(rolling(10, 3, 2, Counts::default(), &old), (3, vec![8]));
        let new = Counts { spec: 3, actual: 3, available: 0 };
        let old = [Counts { spec: 8, actual: 8, available: 8 }];
        // Room for two more new ones (13 in all), none of them available yet: no old one goes.
        assert_eq!(rolling(10, 3, 2, new, &old), (5, vec![8]));
        // An unavailable old workload goes first; available ones only beyond the minimum (7).
        let new = Counts { spec: 5, actual: 5, available: 0 };
        let old = [Counts { spec: 8, actual: 8, available: 7 }];
        assert_eq!(rolling(10, 3, 3, new, &old), (5, vec![7]));
        // Proportional: 10 -> 20 over a 6/6 split with surge 5.
        assert_eq!(proportional(20, 5, &[6, 6]), vec![13, 12]);
        assert_eq!(recreate(4, Counts::default(), &[Counts { spec: 0, actual: 2, available: 2 }]), (0, vec![0]));
        assert_eq!(recreate(4, Counts::default(), &[Counts::default()]), (4, vec![0]));
    }
}
