//! Node-level plugins: queue order, node name, cordon, taints, node affinity.

use crate::framework::{Ctx, MAX_SCORE, Plugin, Points, Prepare, Unfit};
use crate::queue::Events;
use crate::snapshot::{NodeInfo, Snapshot, WorkloadInfo, taint_blocks_scheduling};
use orch_core::kinds::TaintEffect;

/// Queue order: higher priority first, then first come.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrioritySort;

impl Plugin for PrioritySort {
    fn name(&self) -> &str {
        "PrioritySort"
    }
    fn points(&self) -> Points {
        Points::QUEUE_SORT
    }
}

/// `spec.nodeName` set by the user: only that node.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeName;

impl Plugin for NodeName {
    fn name(&self) -> &str {
        "NodeName"
    }
    fn points(&self) -> Points {
        Points::FILTER
    }
    fn wake_on(&self) -> Events {
        Events::NODE_ADDED
    }
    fn pre_filter(&self, _: &Snapshot, w: &WorkloadInfo) -> Result<Prepare, Unfit> {
        Ok(if w.spec().node_name.is_some() { Prepare::Run(None) } else { Prepare::Skip })
    }
    fn filter(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        match &cx.workload.spec().node_name {
            Some(n) if n.as_str() != &*node.name => Err(Unfit::new("not the requested node")),
            _ => Ok(()),
        }
    }
}

/// Cordoned nodes (`spec.unschedulable`) take nothing new, unless the workload tolerates the
/// `node.orch.dev/unschedulable` taint.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeUnschedulable;

/// The taint key a toleration names to ignore cordons.
pub const UNSCHEDULABLE_TAINT: &str = "node.orch.dev/unschedulable";

impl Plugin for NodeUnschedulable {
    fn name(&self) -> &str {
        "NodeUnschedulable"
    }
    fn points(&self) -> Points {
        Points::FILTER
    }
    fn wake_on(&self) -> Events {
        Events::NODE_ADDED | Events::NODE_UPDATED
    }
    fn filter(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        if node.unschedulable
            && !cx.workload.spec().tolerations.iter().any(|t| t.key == UNSCHEDULABLE_TAINT || t.key.is_empty())
        {
            return Err(Unfit::new("node is cordoned"));
        }
        Ok(())
    }
}

/// Taints and tolerations: `NoSchedule` and `NoExecute` taints keep out workloads that do not
/// tolerate them; each untolerated `PreferNoSchedule` taint lowers the score.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaintToleration;

impl Plugin for TaintToleration {
    fn name(&self) -> &str {
        "TaintToleration"
    }
    fn points(&self) -> Points {
        Points::FILTER | Points::SCORE
    }
    fn wake_on(&self) -> Events {
        Events::NODE_ADDED | Events::NODE_UPDATED
    }
    fn filter(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        let tolerations = &cx.workload.spec().tolerations;
        for taint in &node.taints {
            if taint_blocks_scheduling(taint) && !tolerations.iter().any(|t| t.tolerates(taint)) {
                let text = if taint.value.is_empty() {
                    format!("taint {{{}}}", taint.key)
                } else {
                    format!("taint {{{}={}}}", taint.key, taint.value)
                };
                return Err(Unfit::new(text));
            }
        }
        Ok(())
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let tolerations = &cx.workload.spec().tolerations;
        let bad = node
            .taints
            .iter()
            .filter(|t| t.effect == TaintEffect::PreferNoSchedule && !tolerations.iter().any(|x| x.tolerates(t)))
            .count() as i64;
        (MAX_SCORE - bad * MAX_SCORE / 4).max(0)
    }
}

/// Node selector and node affinity: required terms filter (any term may match; all
/// expressions of a term must), preferred terms score by the sum of matching weights,
/// normalized to the best node.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeAffinity;

impl Plugin for NodeAffinity {
    fn name(&self) -> &str {
        "NodeAffinity"
    }
    fn points(&self) -> Points {
        Points::FILTER | Points::SCORE | Points::NORMALIZE
    }
    fn wake_on(&self) -> Events {
        Events::NODE_ADDED | Events::NODE_UPDATED
    }
    fn pre_filter(&self, _: &Snapshot, w: &WorkloadInfo) -> Result<Prepare, Unfit> {
        let spec = w.spec();
        let na = spec.affinity.as_ref().and_then(|a| a.node_affinity.as_ref());
        let any =
            !spec.node_selector.is_empty() || na.is_some_and(|a| !a.required.is_empty() || !a.preferred.is_empty());
        Ok(if any { Prepare::Run(None) } else { Prepare::Skip })
    }
    fn filter(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        let spec = cx.workload.spec();
        if !node.labels.contains_all(&spec.node_selector) {
            return Err(Unfit::new("node selector does not match"));
        }
        if let Some(na) = spec.affinity.as_ref().and_then(|a| a.node_affinity.as_ref())
            && !na.required.is_empty()
            && !na.required.iter().any(|t| t.matches(&node.labels))
        {
            return Err(Unfit::new("node affinity does not match"));
        }
        Ok(())
    }
    fn pre_score(&self, _: &Snapshot, w: &WorkloadInfo, _: &[u32]) -> Prepare {
        let has =
            w.spec().affinity.as_ref().and_then(|a| a.node_affinity.as_ref()).is_some_and(|a| !a.preferred.is_empty());
        if has { Prepare::Run(None) } else { Prepare::Skip }
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let Some(na) = cx.workload.spec().affinity.as_ref().and_then(|a| a.node_affinity.as_ref()) else { return 0 };
        na.preferred.iter().filter(|w| w.term.matches(&node.labels)).map(|w| w.weight as i64).sum()
    }
    fn normalize(&self, _: &Ctx<'_>, scores: &mut [i64]) {
        let max = scores.iter().copied().max().unwrap_or(0);
        if max > 0 {
            for s in scores.iter_mut() {
                *s = *s * MAX_SCORE / max;
            }
        }
    }
}
