//! Workload affinity and anti-affinity across topology domains.

use crate::framework::{Ctx, Locality, MAX_SCORE, Plugin, Points, Prepare, Unfit};
use crate::queue::Events;
use crate::snapshot::{NO_DOMAIN, NodeInfo, Snapshot, WorkloadInfo, WorkloadMatch, workload_affinity};

/// Workload affinity and anti-affinity.
///
/// - Required affinity: the node's domain (by the term's topology key) must already hold a
///   matching workload; a workload that matches its own term may start the first domain.
/// - Required anti-affinity: the node's domain must hold no matching workload.
/// - Symmetry: a placed workload's required anti-affinity also keeps matching newcomers out of
///   its domain.
/// - Preferred terms add (affinity) or subtract (anti-affinity) their weight per matching
///   workload in the domain; scores are normalized to 0..=100.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkloadAffinity;

enum Kind {
    Affinity { self_match: bool },
    Anti,
    Existing,
    Prefer(i64),
}

struct Term {
    kind: Kind,
    /// Matching workloads in each node slot's domain; `u32::MAX` when the node lacks the label.
    per_slot: Vec<u32>,
    total: u32,
}

struct AffinityState {
    terms: Vec<Term>,
}

/// Per node slot: matching workloads in its domain (`u32::MAX` without the label).
fn slot_counts(snapshot: &Snapshot, key: &str, per_node: &[u32]) -> Vec<u32> {
    let Some(topo) = snapshot.topology(key) else { return Vec::new() };
    let mut counts = vec![0u32; topo.len()];
    for (slot, n) in per_node.iter().enumerate() {
        if *n > 0 {
            let d = topo.domain(slot as u32);
            if d != NO_DOMAIN {
                counts[d as usize] += n;
            }
        }
    }
    (0..snapshot.slots() as u32)
        .map(|slot| match topo.domain(slot) {
            NO_DOMAIN => u32::MAX,
            d => counts[d as usize],
        })
        .collect()
}

impl Plugin for WorkloadAffinity {
    fn name(&self) -> &str {
        "WorkloadAffinity"
    }
    fn points(&self) -> Points {
        Points::FILTER | Points::SCORE | Points::NORMALIZE
    }
    fn locality(&self) -> Locality {
        Locality::Cluster
    }
    fn wake_on(&self) -> Events {
        Events::NODE_ADDED | Events::NODE_UPDATED | Events::WORKLOAD_ADDED | Events::WORKLOAD_DELETED
    }
    fn pre_filter(&self, snapshot: &Snapshot, w: &WorkloadInfo) -> Result<Prepare, Unfit> {
        let (aff, anti) = workload_affinity(w.spec());
        let mut terms = Vec::new();
        let mut add = |what: &WorkloadMatch, key: &str, kind: Kind| {
            let (per_slot, total) = snapshot.with_counts(what, |m| (slot_counts(snapshot, key, &m.per_node), m.total));
            terms.push(Term { kind, per_slot, total });
        };
        if let Some(a) = aff {
            for t in &a.required {
                let what = WorkloadMatch::of_term(t, w.namespace());
                let self_match = what.matches(w);
                add(&what, &t.topology_key, Kind::Affinity { self_match });
            }
            for p in &a.preferred {
                add(
                    &WorkloadMatch::of_term(&p.term, w.namespace()),
                    &p.term.topology_key,
                    Kind::Prefer(p.weight as i64),
                );
            }
        }
        if let Some(a) = anti {
            for t in &a.required {
                add(&WorkloadMatch::of_term(t, w.namespace()), &t.topology_key, Kind::Anti);
            }
            for p in &a.preferred {
                add(
                    &WorkloadMatch::of_term(&p.term, w.namespace()),
                    &p.term.topology_key,
                    Kind::Prefer(-(p.weight as i64)),
                );
            }
        }
        for e in snapshot.existing_anti_affinity() {
            if e.what.matches(w) {
                let per_slot = slot_counts(snapshot, &e.topology_key, &e.per_node);
                terms.push(Term { kind: Kind::Existing, per_slot, total: e.total });
            }
        }
        if terms.is_empty() {
            return Ok(Prepare::Skip);
        }
        Ok(Prepare::Run(Some(Box::new(AffinityState { terms }))))
    }
    fn filter(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        let Some(st) = cx.state::<AffinityState>() else { return Ok(()) };
        for t in &st.terms {
            let raw = t.per_slot.get(node.id as usize).copied().unwrap_or(u32::MAX);
            let labelled = raw != u32::MAX;
            let here = if labelled { raw } else { 0 };
            match t.kind {
                Kind::Affinity { self_match } => {
                    if !labelled {
                        return Err(Unfit::new("node lacks the affinity topology label"));
                    }
                    if here == 0 && !(t.total == 0 && self_match) {
                        return Err(Unfit::new("workload affinity not satisfied"));
                    }
                }
                Kind::Anti if here > 0 => return Err(Unfit::new("workload anti-affinity not satisfied")),
                Kind::Existing if here > 0 => {
                    return Err(Unfit::new("a placed workload's anti-affinity keeps it out"));
                }
                _ => {}
            }
        }
        Ok(())
    }
    fn filter_slots(&self, cx: &Ctx<'_>, slots: &mut Vec<u32>) {
        let Some(st) = cx.state::<AffinityState>() else { return };
        for t in &st.terms {
            let at = |s: &u32| t.per_slot.get(*s as usize).copied().unwrap_or(u32::MAX);
            match t.kind {
                Kind::Affinity { self_match } => {
                    let first = t.total == 0 && self_match;
                    slots.retain(|s| {
                        let v = at(s);
                        v != u32::MAX && (v > 0 || first)
                    });
                }
                Kind::Anti | Kind::Existing => slots.retain(|s| {
                    let v = at(s);
                    v == u32::MAX || v == 0
                }),
                Kind::Prefer(_) => {}
            }
        }
    }
    fn pre_score(&self, _: &Snapshot, w: &WorkloadInfo, _: &[u32]) -> Prepare {
        let (aff, anti) = workload_affinity(w.spec());
        let any = aff.is_some_and(|a| !a.preferred.is_empty()) || anti.is_some_and(|a| !a.preferred.is_empty());
        if any { Prepare::Run(None) } else { Prepare::Skip }
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let Some(st) = cx.state::<AffinityState>() else { return 0 };
        let mut s = 0;
        for t in &st.terms {
            if let Kind::Prefer(weight) = t.kind {
                let raw = t.per_slot.get(node.id as usize).copied().unwrap_or(u32::MAX);
                if raw != u32::MAX {
                    s += weight * raw as i64;
                }
            }
        }
        s
    }
    fn normalize(&self, _: &Ctx<'_>, scores: &mut [i64]) {
        let max = scores.iter().copied().max().unwrap_or(0);
        let min = scores.iter().copied().min().unwrap_or(0);
        for s in scores.iter_mut() {
            *s = if max == min { 0 } else { (*s - min) * MAX_SCORE / (max - min) };
        }
    }
}
