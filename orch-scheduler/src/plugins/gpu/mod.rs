//! GPU placement policies from the literature, as ordinary score plugins: the six policies the
//! FGD paper compares ("Beware of Fragmentation: Scheduling GPU-Sharing Workloads with
//! Fragmentation Gradient Descent", USENIX ATC '23) and the fragmentation measure they are judged
//! by.
//!
//! | plugin | points | prefers |
//! |---|---|---|
//! | [`RandomFit`] | score (cluster-wide), devices | a uniformly random feasible node, a random device |
//! | [`DotProduct`] | score | the smallest dot product of the node's free (cpu, GPU) and the request |
//! | [`GpuClustering`] | score | nodes already running GPU tasks of the same kind (share, 1 GPU, 2 GPUs…) |
//! | [`GpuPacking`] | score | a partly used GPU, then a free GPU on a used node, then an untouched node |
//! | [`BestFit`] | score, normalize | the node with the least cpu and GPU left after placing |
//! | [`Fgd`] | score, devices | the node and device where the cluster's fragmentation grows least |
//!
//! Each replaces the score of a profile: use it with [`ResourcesFit`](super::ResourcesFit) (the
//! filter, and the device shares of policies without a choice of their own) and
//! [`NodeAffinity`](super::NodeAffinity) (GPU models, through the [`GPU_MODEL_LABEL`] node
//! label), as [`gpu_profile`] does.
//!
//! Scores follow the FGD authors' simulator (`hkust-adsl/kubernetes-scheduler-simulator`),
//! including its integer truncations, because they decide ties and so the published figures.
//! Normalising constants (the biggest node: 128 cores, 8 GPUs in the openb trace) are a
//! [`NodeScale`] here rather than constants.

mod best_fit;
mod clustering;
mod dot_product;
mod fgd;
mod frag;
mod packing;
mod random;

pub use best_fit::BestFit;
pub use clustering::GpuClustering;
pub use dot_product::DotProduct;
pub use fgd::Fgd;
pub use frag::{Shape, TargetWorkload};
pub use packing::GpuPacking;
pub use random::RandomFit;

use crate::framework::{Plugin, Profile};
use crate::snapshot::{CPU, GPU, NodeInfo, WHOLE_DEVICE, WorkloadInfo};

/// Node label naming a node's GPU model (e.g. `V100M32`); workloads that accept only some
/// models ask for them with a required node affinity on it.
pub const GPU_MODEL_LABEL: &str = "orch.dev/gpu-model";

/// The biggest node a policy normalises by: its cpu and its GPUs, in milli-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeScale {
    /// Milli-cores of the biggest node.
    pub cpu_milli: i64,
    /// Milli-GPUs of the biggest node (1000 per GPU).
    pub gpu_milli: i64,
}

impl Default for NodeScale {
    /// The simulator's constants: the biggest openb node has 128 cores and 8 GPUs.
    fn default() -> Self {
        NodeScale { cpu_milli: 128_000, gpu_milli: 8 * WHOLE_DEVICE }
    }
}

/// What a workload asks of a GPU node: cpu, and a share of `count` devices each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GpuAsk {
    /// Milli-cores.
    pub cpu: i64,
    /// Milli-GPU on each device it takes (below 1000: a share of one device).
    pub milli: i64,
    /// Devices it takes (0 for a cpu-only workload).
    pub count: u32,
}

impl GpuAsk {
    /// Reads the workload's `cpu` and `gpu` requests: a `gpu` request below 1000 is a share of
    /// one device, otherwise whole devices.
    pub fn of(w: &WorkloadInfo) -> Self {
        let cpu = w.request(CPU);
        let gpu = w.request(GPU);
        if gpu <= 0 {
            GpuAsk { cpu, milli: 0, count: 0 }
        } else if gpu < WHOLE_DEVICE {
            GpuAsk { cpu, milli: gpu, count: 1 }
        } else {
            GpuAsk { cpu, milli: WHOLE_DEVICE, count: (gpu / WHOLE_DEVICE) as u32 }
        }
    }

    /// Milli-GPUs in all.
    pub fn total(&self) -> i64 {
        self.milli * self.count as i64
    }

    /// A share of one device (not whole devices, not cpu only).
    pub fn is_share(&self) -> bool {
        self.count == 1 && self.milli < WHOLE_DEVICE
    }
}

/// A hash of the workload's namespace and name that stays the same across runs, builds and
/// platforms (FNV-1a), mixed with `seed`: the random policies draw from it, so a workload gets
/// the same draw in a replay and in the scheduler service.
pub(crate) fn draw(seed: u64, w: &WorkloadInfo, stream: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in w.key.namespace.bytes().chain([0u8]).chain(w.key.name.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix(splitmix(seed ^ h) ^ stream)
}

/// SplitMix64's output function.
pub(crate) fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform index below `n` from a 64-bit draw (multiply-shift: no modulo bias to speak of).
pub(crate) fn below(r: u64, n: usize) -> usize {
    ((r as u128 * n as u128) >> 64) as usize
}

/// Free milli-GPU of each device of a node.
pub(crate) fn device_free(node: &NodeInfo) -> impl Iterator<Item = i64> + '_ {
    node.devices.iter().map(|d| d.free)
}

/// Free milli-GPU of the node in all.
pub(crate) fn total_free(node: &NodeInfo) -> i64 {
    device_free(node).sum()
}

/// A profile that places GPU workloads by `policy` alone: the filters (resources and devices,
/// node affinity for GPU models, cordons, taints, `nodeName`) plus `policy` as the only score,
/// as in the FGD paper's experiments (one score plugin, every other score off).
pub fn gpu_profile(name: impl Into<String>, policy: impl Plugin) -> Profile {
    use super::{NodeAffinity, NodeName, NodeUnschedulable, ResourcesFit, ScoringStrategy, TaintToleration};
    Profile::new(name)
        .with(NodeName, 0)
        .with(NodeUnschedulable, 0)
        .with(TaintToleration, 0)
        .with(NodeAffinity, 0)
        .with(ResourcesFit::new(ScoringStrategy::LeastAllocated), 0)
        .with(policy, 1)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Small nodes and workloads for the policies' hand-worked cases.
    use std::sync::Arc;

    use orch_core::kinds::{Device, Node, Workload};
    use orch_core::{Object, ObjectMeta, Quantity};

    use crate::framework::{Ctx, Plugin};
    use crate::snapshot::{DeviceShare, NodeInfo, Placement, Snapshot, WorkloadInfo};

    /// A node with `cpu` cores and `gpus` devices of `model`.
    pub(crate) fn node(name: &str, cpu: i64, gpus: usize, model: &str) -> Object<Node> {
        let mut n = Object::new(ObjectMeta::named(name), Node::default());
        n.status.allocatable.insert("cpu".into(), Quantity::from_units(cpu));
        n.status.allocatable.insert("memory".into(), Quantity::from_bytes(1 << 40));
        if gpus > 0 {
            n.status.allocatable.insert("gpu".into(), Quantity::from_units(gpus as i64));
            n.metadata.labels.insert(super::GPU_MODEL_LABEL, model);
            for i in 0..gpus {
                n.status.devices.push(Device { id: format!("gpu{i}"), resource: "gpu".into(), model: model.into() });
            }
        }
        n
    }

    /// A workload asking for `cpu_milli` and `gpu_milli` (below 1000: a share of one device).
    pub(crate) fn task(name: &str, cpu_milli: i64, gpu_milli: i64) -> Arc<WorkloadInfo> {
        let mut w = Workload::command("main", &["x"]);
        w.containers[0].resources.requests.insert("cpu".into(), Quantity::from_milli(cpu_milli));
        if gpu_milli > 0 {
            w.containers[0].resources.requests.insert("gpu".into(), Quantity::from_milli(gpu_milli));
        }
        Arc::new(WorkloadInfo::new(Arc::new(Object::new(ObjectMeta::namespaced("default", name), w)), 0))
    }

    /// A workload already running: the workload, its node's index, its (device, milli) shares.
    pub(crate) type Running = (Arc<WorkloadInfo>, usize, Vec<(u16, i64)>);

    /// A cluster of `nodes` where `placed` already run.
    pub(crate) fn cluster(nodes: &[Object<Node>], placed: &[Running]) -> Snapshot {
        let mut s = Snapshot::new();
        let ids: Vec<_> = nodes.iter().map(|n| s.upsert_node(n)).collect();
        for (w, i, shares) in placed {
            let id = ids[*i];
            let devices = shares.iter().map(|&(device, milli)| DeviceShare { device, milli }).collect();
            let name = s.node(id).map(|n| n.name.clone()).unwrap_or_else(|| Arc::from(""));
            s.place(w.clone(), Placement { node: id, node_name: name, devices }, false);
        }
        s
    }

    /// The node of slot `i`.
    pub(crate) fn at(s: &Snapshot, i: u32) -> &NodeInfo {
        s.node(i).expect("node")
    }

    /// The plugin's score of node `i` for `w` (pre-score state included).
    pub(crate) fn score(p: &impl Plugin, s: &Snapshot, w: &WorkloadInfo, i: u32) -> i64 {
        let state = match p.pre_score(s, w, &[]) {
            crate::framework::Prepare::Run(state) => state,
            crate::framework::Prepare::Skip => None,
        };
        p.score(&Ctx { snapshot: s, workload: w, state: state.as_ref() }, at(s, i))
    }

    /// The plugin's device choice on node `i` for `w`.
    pub(crate) fn devices(p: &impl Plugin, s: &Snapshot, w: &WorkloadInfo, i: u32) -> Option<Vec<(u16, i64)>> {
        p.devices(&Ctx { snapshot: s, workload: w, state: None }, at(s, i))
            .map(|d| d.iter().map(|x| (x.device, x.milli)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::node;
    use super::*;
    use crate::core::{OutcomeKind, SchedulingCore};
    use crate::framework::Framework;
    use orch_core::kinds::Workload;
    use orch_core::{Object, ObjectMeta, Quantity};

    fn object(name: &str, cpu_milli: i64, gpu_milli: i64) -> std::sync::Arc<Object<Workload>> {
        let mut w = Workload::command("main", &["x"]);
        w.containers[0].resources.requests.insert("cpu".into(), Quantity::from_milli(cpu_milli));
        w.containers[0].resources.requests.insert("gpu".into(), Quantity::from_milli(gpu_milli));
        std::sync::Arc::new(Object::new(ObjectMeta::namespaced("default", name), w))
    }

    #[test]
    fn a_device_policy_decides_the_devices_through_the_framework() {
        // Every expected task wants 0.6 GPU. Device 0 has 700 free, device 1 is whole. The
        // tightest fit would put 0.3 on device 0 (leaving 400 nobody can use); FGD puts it on
        // device 1, where both devices can still take a 0.6 task.
        let target =
            TargetWorkload::new(vec![(Shape { cpu_milli: 1000, gpu_milli: 600, gpus: 1, models: vec![] }, 1.0)]);
        for (policy, want) in [(None, 0u16), (Some(Fgd::new(target)), 1u16)] {
            let profile = match policy {
                Some(p) => gpu_profile("gpu", p),
                None => gpu_profile("gpu", GpuPacking),
            };
            let mut core = SchedulingCore::new(Framework::new(profile));
            core.upsert_node(&node("a", 16, 2, "T4"));
            let first = object("first", 1000, 300);
            core.upsert_workload(first.clone());
            let out = core.run_until_idle();
            assert!(matches!(&out[0].kind, OutcomeKind::Bound(p) if p.devices[0].device == 0), "{out:?}");
            core.upsert_workload(object("second", 1000, 300));
            let out = core.run_until_idle();
            match &out[0].kind {
                OutcomeKind::Bound(p) => assert_eq!(p.devices[0].device, want, "{p:?}"),
                other => panic!("not bound: {other:?}"),
            }
        }
    }
}
