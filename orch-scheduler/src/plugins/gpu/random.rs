//! Random-fit: a uniformly random feasible node.

use crate::framework::{Ctx, Locality, MAX_SCORE, Plugin, Points, Prepare};
use crate::snapshot::{DeviceShare, NodeId, NodeInfo, Snapshot, WorkloadInfo};

use super::{GpuAsk, below, draw};

/// Places each workload on a node drawn uniformly from the feasible ones, and a GPU share on a
/// device drawn uniformly from those with room (whole devices: the lowest-numbered free ones).
///
/// The draws come from the seed and the workload's name, so the same workload meets the same
/// draw in a replay and in the scheduler service. Pre-score draws among the feasible nodes, so
/// the plugin is cluster-wide (it reruns every cycle).
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomFit {
    seed: u64,
}

impl RandomFit {
    /// Draws from `seed`.
    pub fn new(seed: u64) -> Self {
        RandomFit { seed }
    }
}

/// The node drawn in pre-score.
struct Drawn(NodeId);

impl Plugin for RandomFit {
    fn name(&self) -> &str {
        "RandomFit"
    }
    fn points(&self) -> Points {
        Points::SCORE | Points::DEVICES
    }
    fn locality(&self) -> Locality {
        Locality::Cluster
    }
    fn pre_score(&self, _: &Snapshot, w: &WorkloadInfo, feasible: &[NodeId]) -> Prepare {
        if feasible.is_empty() {
            return Prepare::Run(None);
        }
        let i = below(draw(self.seed, w, 0), feasible.len());
        Prepare::Run(Some(Box::new(Drawn(feasible[i]))))
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        match cx.state::<Drawn>() {
            Some(Drawn(id)) if *id == node.id => MAX_SCORE,
            _ => 0,
        }
    }
    fn devices(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Option<Vec<DeviceShare>> {
        let ask = GpuAsk::of(cx.workload);
        if !ask.is_share() {
            return None;
        }
        let fitting: Vec<usize> = (0..node.devices.len()).filter(|&i| node.devices[i].free >= ask.milli).collect();
        if fitting.is_empty() {
            return None;
        }
        let i = fitting[below(draw(self.seed, cx.workload, 1), fitting.len())];
        Some(vec![DeviceShare { device: i as u16, milli: ask.milli }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::gpu::testing::{cluster, devices, node, task};

    #[test]
    fn draws_are_uniform_and_fixed_by_seed_and_name() {
        let nodes: Vec<_> = (0..4).map(|i| node(&format!("n{i}"), 8, 4, "T4")).collect();
        let s = cluster(&nodes, &[]);
        let p = RandomFit::new(7);
        let feasible = [0, 1, 2, 3];
        let mut hits = [0usize; 4];
        let mut dev_hits = [0usize; 4];
        for k in 0..4000 {
            let w = task(&format!("t{k}"), 1000, 500);
            let Prepare::Run(Some(state)) = p.pre_score(&s, &w, &feasible) else { panic!("no draw") };
            let chosen = (0..4u32)
                .filter(|&i| {
                    p.score(&Ctx { snapshot: &s, workload: &w, state: Some(&state) }, s.node(i).unwrap()) == 100
                })
                .collect::<Vec<_>>();
            assert_eq!(chosen.len(), 1, "exactly one node scores 100");
            hits[chosen[0] as usize] += 1;
            dev_hits[devices(&p, &s, &w, 0).unwrap()[0].0 as usize] += 1;
        }
        for h in hits.iter().chain(dev_hits.iter()) {
            assert!((850..1150).contains(h), "uniform: {hits:?} {dev_hits:?}");
        }
        // Same name and seed: same draw; another seed: another sequence.
        let w = task("same", 1000, 500);
        let a = devices(&p, &s, &w, 0);
        assert_eq!(a, devices(&p, &s, &w, 0));
        let other: Vec<_> = (0..20).map(|k| devices(&RandomFit::new(k), &s, &w, 0)).collect();
        assert!(other.iter().any(|d| *d != a), "seeds change the draw");
    }

    #[test]
    fn whole_devices_are_left_to_the_tightest_fit() {
        let s = cluster(&[node("n", 8, 4, "T4")], &[]);
        assert_eq!(devices(&RandomFit::new(1), &s, &task("w", 1000, 2000), 0), None);
        assert_eq!(devices(&RandomFit::new(1), &s, &task("c", 1000, 0), 0), None);
    }
}
