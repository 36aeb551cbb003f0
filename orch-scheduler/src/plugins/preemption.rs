//! Preemption: make room for a workload by evicting lower-priority ones.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::framework::{Ctx, Diagnosis, Filters, Plugin, Points};
use crate::snapshot::{NodeId, NodeInfo, Placement, Snapshot, WorkloadInfo, WorkloadMatch};
use orch_core::cache::ObjectRef;

/// When nothing fits, finds the node where evicting lower-priority workloads makes room at the
/// least cost, and names the victims. Never evicts a workload of equal or higher priority.
///
/// Per node: take out every lower-priority workload; if the workload then passes the
/// node-local filters, put back as many as possible, highest priority first; the rest are the
/// victims. Among nodes, the best has the lowest highest-victim priority, then the fewest
/// victims, then the lowest sum of victim priorities. Results are cached per workload class and
/// recomputed only for nodes that changed, so a wave of preemptors costs little per preemptor.
#[derive(Debug, Default)]
pub struct Preemption {
    cache: Mutex<HashMap<(u64, u64), ClassCandidates>>,
}

type Cost = (i32, usize, i64, NodeId);

#[derive(Debug)]
struct ClassCandidates {
    seen_seq: u64,
    epoch: u64,
    candidates: Vec<Option<(Cost, Vec<ObjectRef>)>>,
    /// A min tree over the candidates' costs: the best node in O(1), updates in O(log n).
    tree: Vec<Option<Cost>>,
    size: usize,
}

impl ClassCandidates {
    fn rebuild(&mut self) {
        self.size = self.candidates.len().next_power_of_two().max(1);
        self.tree = vec![None; 2 * self.size];
        for s in 0..self.candidates.len() {
            self.tree[self.size + s] = self.candidates[s].as_ref().map(|(c, _)| *c);
        }
        for i in (1..self.size).rev() {
            self.tree[i] = Self::better(self.tree[2 * i], self.tree[2 * i + 1]);
        }
    }

    fn better(a: Option<Cost>, b: Option<Cost>) -> Option<Cost> {
        match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, None) => x,
            (None, y) => y,
        }
    }

    fn set(&mut self, slot: usize, value: Option<(Cost, Vec<ObjectRef>)>) {
        let mut i = self.size + slot;
        self.tree[i] = value.as_ref().map(|(c, _)| *c);
        self.candidates[slot] = value;
        while i > 1 {
            i /= 2;
            self.tree[i] = Self::better(self.tree[2 * i], self.tree[2 * i + 1]);
        }
    }
}

const MAX_CACHED_CLASSES: usize = 32;

fn evaluate(cx: &Ctx<'_>, filters: &Filters<'_>, node: &NodeInfo) -> Option<(Cost, Vec<ObjectRef>)> {
    let w = cx.workload;
    let p = w.priority();
    // Workloads the preemptor requires (its required affinity) are not evicted for it.
    let needed: Vec<WorkloadMatch> = w
        .spec()
        .affinity
        .as_ref()
        .and_then(|a| a.workload_affinity.as_ref())
        .map(|a| a.required.iter().map(|t| WorkloadMatch::of_term(t, w.namespace())).collect())
        .unwrap_or_default();
    let mut lower: Vec<&Arc<WorkloadInfo>> = node
        .workloads
        .iter()
        .filter(|v| v.priority() < p)
        // Only bound workloads are evicted: an assumed one (bind in flight, or held for its
        // gang) is a decision of this scheduler, not yet a running workload.
        .filter(|v| cx.snapshot.placed(&v.key).is_some_and(|pl| !pl.assumed))
        .filter(|v| !needed.iter().any(|m| m.matches(v)))
        .collect();
    if lower.is_empty() {
        return None;
    }
    let shares =
        |v: &WorkloadInfo| cx.snapshot.placed(&v.key).map(|pl| pl.placement.devices.clone()).unwrap_or_default();
    let mut n = node.clone();
    for v in &lower {
        n.release(v, &shares(v));
    }
    filters.check(cx, &n).ok()?;
    // Put back the most important first; whoever no longer fits is a victim.
    lower.sort_by_key(|v| (Reverse(v.priority()), v.seq));
    let mut victims = Vec::new();
    let (mut top, mut sum) = (i32::MIN, 0i64);
    for v in lower {
        let s = shares(v);
        n.take(v, &s);
        if filters.check(cx, &n).is_err() {
            n.release(v, &s);
            top = top.max(v.priority());
            sum += v.priority() as i64;
            victims.push(v.key.clone());
        }
    }
    if victims.is_empty() {
        // It fits without evicting anyone: a filter outside node-local ones is the blocker.
        return None;
    }
    Some(((top, victims.len(), sum, node.id), victims))
}

impl Plugin for Preemption {
    fn name(&self) -> &str {
        "Preemption"
    }
    fn points(&self) -> Points {
        Points::POST_FILTER
    }
    fn post_filter(
        &self,
        cx: &Ctx<'_>,
        filters: &Filters<'_>,
        diagnosis: &Diagnosis,
    ) -> Option<(Placement, Vec<ObjectRef>)> {
        if diagnosis.rejected.is_some() || !diagnosis.reasons.iter().any(|_| true) {
            return None;
        }
        let snapshot: &Snapshot = cx.snapshot;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let class = filters.class();
        if cache.len() >= MAX_CACHED_CLASSES && !cache.contains_key(&class) {
            cache.clear();
        }
        let slots = snapshot.slots();
        let entry = cache.entry(class).or_insert_with(|| ClassCandidates {
            seen_seq: u64::MAX,
            epoch: u64::MAX,
            candidates: Vec::new(),
            tree: Vec::new(),
            size: 0,
        });
        let dirty: Option<Vec<NodeId>> = if entry.epoch != snapshot.slots_epoch() || entry.candidates.len() != slots {
            None
        } else {
            snapshot.changes_since(entry.seen_seq).map(|it| it.collect())
        };
        match dirty {
            Some(mut d) => {
                d.sort_unstable();
                d.dedup();
                for slot in d {
                    let v = snapshot.node(slot).and_then(|n| evaluate(cx, filters, n));
                    entry.set(slot as usize, v);
                }
            }
            None => {
                entry.candidates =
                    (0..slots as NodeId).map(|s| snapshot.node(s).and_then(|n| evaluate(cx, filters, n))).collect();
                entry.epoch = snapshot.slots_epoch();
                entry.rebuild();
            }
        }
        entry.seen_seq = snapshot.change_seq();
        // Best first; a candidate the cluster-wide filters (affinity, spread) refuse is skipped.
        let mut refused: Vec<NodeId> = Vec::new();
        for attempt in 0..entry.candidates.len() {
            let best = if attempt == 0 {
                entry.tree.get(1).copied().flatten()
            } else {
                entry.candidates.iter().flatten().map(|(c, _)| *c).filter(|c| !refused.contains(&c.3)).min()
            }?;
            let (cost, victims) = entry.candidates[best.3 as usize].as_ref()?;
            let node = snapshot.node(cost.3)?;
            let mut what_if = node.clone();
            for v in victims {
                if let Some(p) = snapshot.placed(v) {
                    what_if.release(&p.info, &p.placement.devices);
                }
            }
            if filters.check_cluster(cx, &what_if).is_ok() {
                return Some((
                    Placement { node: node.id, node_name: node.name.clone(), devices: Vec::new() },
                    victims.clone(),
                ));
            }
            refused.push(cost.3);
        }
        None
    }
}
