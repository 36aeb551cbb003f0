//! The default plugins.
//!
//! | plugin | points | what it does |
//! |---|---|---|
//! | [`PrioritySort`] | queue sort | higher priority first, then first come |
//! | [`NodeName`] | filter | `spec.nodeName` pins a workload to a node |
//! | [`NodeUnschedulable`] | filter | cordoned nodes take nothing new |
//! | [`TaintToleration`] | filter, score | `NoSchedule`/`NoExecute` taints need a toleration; `PreferNoSchedule` lowers the score |
//! | [`NodeAffinity`] | filter, score | node selector, required and preferred node affinity |
//! | [`ResourcesFit`] | filter, score, reserve | cpu, memory, extended resources, GPUs device by device, host ports, workloads per node; least/most-allocated scoring |
//! | [`BalancedAllocation`] | score | prefers nodes whose resources stay evenly used |
//! | [`TopologySpread`] | filter, score | max skew across topology domains, hard or soft |
//! | [`WorkloadAffinity`] | filter, score | workload affinity and anti-affinity by topology key, required and preferred, both directions |
//! | [`Gang`] | pre-filter, permit | all-or-nothing placement of a scheduling group, with a timeout |
//! | [`Preemption`] | post-filter | evicts the fewest, lowest-priority workloads that make room |

mod affinity;
mod fit;
mod gang;
mod node;
mod preemption;
mod spread;

pub use affinity::WorkloadAffinity;
pub use fit::{BalancedAllocation, ResourcesFit, ScoringStrategy};
pub use gang::Gang;
pub use node::{NodeAffinity, NodeName, NodeUnschedulable, PrioritySort, TaintToleration, UNSCHEDULABLE_TAINT};
pub use preemption::Preemption;
pub use spread::TopologySpread;

use super::framework::Profile;
use super::DEFAULT_SCHEDULER;

/// Every default plugin with kube-scheduler's default weights, scoring with `strategy`.
pub fn default_profile(strategy: ScoringStrategy) -> Profile {
    Profile::new(DEFAULT_SCHEDULER)
        .with(PrioritySort, 0)
        .with(NodeName, 0)
        .with(NodeUnschedulable, 0)
        .with(TaintToleration, 3)
        .with(NodeAffinity, 2)
        .with(ResourcesFit::new(strategy), 1)
        .with(BalancedAllocation::default(), 1)
        .with(TopologySpread, 2)
        .with(WorkloadAffinity, 2)
        .with(Gang::default(), 0)
        .with(Preemption::default(), 0)
}
