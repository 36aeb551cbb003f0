//! Resources: fit (with GPUs device by device and host ports) and allocation-based scoring.

use std::borrow::Cow;

use crate::framework::{Ctx, MAX_SCORE, Plugin, Points, Unfit};
use crate::queue::Events;
use crate::snapshot::{
    CPU, DeviceShare, Dim, GPU, MEMORY, NodeInfo, Placement, Snapshot, WHOLE_DEVICE, WorkloadInfo, resource_name,
};

/// How [`ResourcesFit`] scores a node that fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoringStrategy {
    /// Prefer the emptiest nodes (spreads load; kube-scheduler's default).
    #[default]
    LeastAllocated,
    /// Prefer the fullest nodes (bin-packing: keeps whole nodes free for big workloads).
    MostAllocated,
}

/// Filters nodes without room for the workload's requests (every resource, GPU shares on one
/// device or whole devices, host ports, workloads per node) and scores by allocation.
#[derive(Debug, Clone)]
pub struct ResourcesFit {
    strategy: ScoringStrategy,
    /// Resources that count in the score, with weights.
    weights: Vec<(Dim, i64)>,
}

impl ResourcesFit {
    /// Scores `cpu` and `memory` with equal weights.
    pub fn new(strategy: ScoringStrategy) -> Self {
        ResourcesFit { strategy, weights: vec![(CPU, 1), (MEMORY, 1)] }
    }

    /// Scores these resources with these weights (`gpu` included, for instance).
    pub fn with_weights(strategy: ScoringStrategy, weights: &[(&str, i64)]) -> Self {
        let weights = weights.iter().map(|(n, w)| (crate::snapshot::resource_dim(n), *w)).collect();
        ResourcesFit { strategy, weights }
    }
}

fn insufficient(dim: Dim) -> Unfit {
    Unfit::preemptible(match dim {
        CPU => Cow::Borrowed("insufficient cpu"),
        MEMORY => Cow::Borrowed("insufficient memory"),
        GPU => Cow::Borrowed("insufficient gpu"),
        d => Cow::Owned(format!("insufficient {}", resource_name(d))),
    })
}

/// The fit check shared by the filter and by preemption's what-ifs.
pub(crate) fn fits(w: &WorkloadInfo, node: &NodeInfo) -> Result<(), Unfit> {
    if node.workloads.len() as u32 >= node.max_workloads {
        return Err(Unfit::preemptible("too many workloads"));
    }
    for &(d, m) in &w.requests {
        if node.free(d) < m {
            return Err(insufficient(d));
        }
    }
    let gpu = w.request(GPU);
    if gpu > WHOLE_DEVICE && gpu % WHOLE_DEVICE != 0 {
        // Admission refuses this; a workload that reached the store another way is not placed.
        return Err(Unfit::new("gpu request neither a share of one GPU nor whole GPUs"));
    }
    if gpu > 0 && !node.devices.is_empty() && node.pick_devices(gpu).is_none() {
        return Err(Unfit::preemptible("no GPU device with enough free share"));
    }
    for p in &w.host_ports {
        if node.port_in_use(*p) {
            return Err(Unfit::preemptible("host port in use"));
        }
    }
    Ok(())
}

impl Plugin for ResourcesFit {
    fn name(&self) -> &str {
        "ResourcesFit"
    }
    fn points(&self) -> Points {
        Points::FILTER | Points::SCORE | Points::RESERVE
    }
    fn wake_on(&self) -> Events {
        Events::NODE_ADDED | Events::NODE_UPDATED | Events::WORKLOAD_DELETED
    }
    fn filter(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        fits(cx.workload, node)
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let (mut sum, mut weights) = (0i64, 0i64);
        for &(d, wt) in &self.weights {
            let alloc = node.allocatable(d);
            if alloc <= 0 {
                continue;
            }
            let used = (node.requested(d) + cx.workload.request(d)).min(alloc);
            let s = match self.strategy {
                ScoringStrategy::LeastAllocated => (alloc - used) as i128 * MAX_SCORE as i128 / alloc as i128,
                ScoringStrategy::MostAllocated => used as i128 * MAX_SCORE as i128 / alloc as i128,
            };
            sum += s as i64 * wt;
            weights += wt;
        }
        if weights == 0 { 0 } else { sum / weights }
    }
    fn reserve(&self, snapshot: &Snapshot, w: &WorkloadInfo, placement: &mut Placement) -> Result<(), Unfit> {
        let node = snapshot.node(placement.node).ok_or_else(|| Unfit::new("node removed"))?;
        if !placement.devices.is_empty() && shares_fit(node, &placement.devices, w.request(GPU)) {
            // A device policy chose them (Points::DEVICES).
            return Ok(());
        }
        placement.devices = node
            .pick_devices(w.request(GPU))
            .ok_or_else(|| Unfit::preemptible("no GPU device with enough free share"))?;
        Ok(())
    }
}

/// Whether `shares` name devices of `node` that have the room, adding up to `gpu`.
fn shares_fit(node: &NodeInfo, shares: &[DeviceShare], gpu: i64) -> bool {
    let mut free: Vec<i64> = node.devices.iter().map(|d| d.free).collect();
    let mut total = 0;
    for s in shares {
        match free.get_mut(s.device as usize) {
            Some(f) if s.milli > 0 && *f >= s.milli => *f -= s.milli,
            _ => return false,
        }
        total += s.milli;
    }
    total == gpu
}

/// Prefers nodes where cpu and memory stay evenly used (one minus the spread of the used
/// fractions), so neither runs out while the other idles.
#[derive(Debug, Clone, Copy, Default)]
pub struct BalancedAllocation;

impl Plugin for BalancedAllocation {
    fn name(&self) -> &str {
        "BalancedAllocation"
    }
    fn points(&self) -> Points {
        Points::SCORE
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let frac = |d: Dim| {
            let alloc = node.allocatable(d);
            if alloc <= 0 {
                return 1.0;
            }
            ((node.requested(d) + cx.workload.request(d)) as f64 / alloc as f64).min(1.0)
        };
        let (c, m) = (frac(CPU), frac(MEMORY));
        // Standard deviation of two values is half their distance.
        let std = (c - m).abs() / 2.0;
        ((1.0 - std) * MAX_SCORE as f64) as i64
    }
}
