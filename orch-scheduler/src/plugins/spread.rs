//! Topology spread: keep matching workloads evenly spread over the domains of a node label.

use crate::framework::{Ctx, MAX_SCORE, Plugin, Points, Prepare, Unfit};
use crate::queue::Events;
use crate::snapshot::{NO_DOMAIN, NodeInfo, Snapshot, WorkloadInfo, WorkloadMatch};
use orch_core::kinds::WhenUnsatisfiable;

/// Topology spread constraints. A hard constraint (`DoNotSchedule`) filters out nodes where
/// placing the workload would make its domain exceed the emptiest eligible domain by more than
/// `maxSkew`; soft ones (`ScheduleAnyway`) score emptier domains higher. Eligible domains are
/// those with a node that passes the workload's node selector and required node affinity.
#[derive(Debug, Clone, Copy, Default)]
pub struct TopologySpread;

struct Constraint {
    hard: bool,
    max_skew: i64,
    self_match: i64,
    /// Matching workloads in each node slot's domain; -1 when the node lacks the label.
    per_slot: Vec<i64>,
    min: i64,
    max: i64,
}

struct SpreadState {
    constraints: Vec<Constraint>,
}

fn node_eligible(w: &WorkloadInfo, node: &NodeInfo) -> bool {
    let spec = w.spec();
    if !node.labels.contains_all(&spec.node_selector) {
        return false;
    }
    match spec.affinity.as_ref().and_then(|a| a.node_affinity.as_ref()) {
        Some(na) if !na.required.is_empty() => na.required.iter().any(|t| t.matches(&node.labels)),
        _ => true,
    }
}

impl Plugin for TopologySpread {
    fn name(&self) -> &str {
        "TopologySpread"
    }
    fn points(&self) -> Points {
        Points::FILTER | Points::SCORE | Points::NORMALIZE
    }
    fn locality(&self) -> crate::framework::Locality {
        crate::framework::Locality::Cluster
    }
    fn wake_on(&self) -> Events {
        Events::NODE_ADDED | Events::NODE_UPDATED | Events::WORKLOAD_ADDED | Events::WORKLOAD_DELETED
    }
    fn pre_filter(&self, snapshot: &Snapshot, w: &WorkloadInfo) -> Result<Prepare, Unfit> {
        let spec = w.spec();
        if spec.topology_spread_constraints.is_empty() {
            return Ok(Prepare::Skip);
        }
        let restricted = !spec.node_selector.is_empty()
            || spec.affinity.as_ref().and_then(|a| a.node_affinity.as_ref()).is_some_and(|a| !a.required.is_empty());
        let mut constraints = Vec::new();
        for c in &spec.topology_spread_constraints {
            let what =
                WorkloadMatch { selector: c.label_selector.clone(), namespaces: vec![w.namespace().to_string()] };
            let self_match = what.matches(w) as i64;
            let Some(topo) = snapshot.topology(&c.topology_key) else {
                constraints.push(Constraint {
                    hard: c.when_unsatisfiable == WhenUnsatisfiable::DoNotSchedule,
                    max_skew: c.max_skew as i64,
                    self_match,
                    per_slot: Vec::new(),
                    min: 0,
                    max: 0,
                });
                continue;
            };
            let mut counts = vec![0i64; topo.len()];
            let eligible: Vec<bool> = if restricted {
                let mut e = vec![false; topo.len()];
                for node in snapshot.nodes() {
                    let d = topo.domain(node.id);
                    if d != NO_DOMAIN && node_eligible(w, node) {
                        e[d as usize] = true;
                    }
                }
                e
            } else {
                topo.nodes.iter().map(|n| *n > 0).collect()
            };
            snapshot.with_counts(&what, |m| {
                for (slot, n) in m.per_node.iter().enumerate() {
                    if *n > 0 {
                        let d = topo.domain(slot as u32);
                        if d != NO_DOMAIN {
                            counts[d as usize] += *n as i64;
                        }
                    }
                }
            });
            let min = counts.iter().zip(&eligible).filter(|(_, e)| **e).map(|(c, _)| *c).min().unwrap_or(0);
            let max = counts.iter().copied().max().unwrap_or(0);
            let per_slot = (0..snapshot.slots() as u32)
                .map(|slot| match topo.domain(slot) {
                    NO_DOMAIN => -1,
                    d => counts[d as usize],
                })
                .collect();
            constraints.push(Constraint {
                hard: c.when_unsatisfiable == WhenUnsatisfiable::DoNotSchedule,
                max_skew: c.max_skew as i64,
                self_match,
                per_slot,
                min,
                max,
            });
        }
        Ok(Prepare::Run(Some(Box::new(SpreadState { constraints }))))
    }
    fn filter(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        let Some(st) = cx.state::<SpreadState>() else { return Ok(()) };
        for c in st.constraints.iter().filter(|c| c.hard) {
            let here = c.per_slot.get(node.id as usize).copied().unwrap_or(-1);
            if here < 0 {
                return Err(Unfit::new("node lacks a topology spread label"));
            }
            if here + c.self_match - c.min > c.max_skew {
                return Err(Unfit::new("topology spread constraint would be violated"));
            }
        }
        Ok(())
    }
    fn filter_slots(&self, cx: &Ctx<'_>, slots: &mut Vec<u32>) {
        let Some(st) = cx.state::<SpreadState>() else { return };
        for c in st.constraints.iter().filter(|c| c.hard) {
            let limit = c.max_skew + c.min - c.self_match;
            slots.retain(|s| {
                let here = c.per_slot.get(*s as usize).copied().unwrap_or(-1);
                here >= 0 && here <= limit
            });
        }
    }
    fn pre_score(&self, _: &Snapshot, w: &WorkloadInfo, _: &[u32]) -> Prepare {
        let soft = w
            .spec()
            .topology_spread_constraints
            .iter()
            .any(|c| c.when_unsatisfiable == WhenUnsatisfiable::ScheduleAnyway);
        if soft { Prepare::Run(None) } else { Prepare::Skip }
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let Some(st) = cx.state::<SpreadState>() else { return 0 };
        let mut raw = 0;
        for c in st.constraints.iter().filter(|c| !c.hard) {
            let here = c.per_slot.get(node.id as usize).copied().unwrap_or(-1);
            // A node outside every domain counts as the fullest.
            raw += if here < 0 { c.max + 1 } else { here };
        }
        raw
    }
    fn normalize(&self, _: &Ctx<'_>, scores: &mut [i64]) {
        // Fewer matching workloads in the domain is better.
        let max = scores.iter().copied().max().unwrap_or(0);
        let min = scores.iter().copied().min().unwrap_or(0);
        for s in scores.iter_mut() {
            *s = if max == min { MAX_SCORE } else { (max - *s) * MAX_SCORE / (max - min) };
        }
    }
}
