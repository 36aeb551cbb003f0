//! The plugin framework: the [`Framework`] engine that runs a [`Profile`] of plugins as a
//! [`Scheduler`], and the contract each [`Plugin`] implements.
//!
//! A scheduling cycle for one workload runs, in order: pre-filter, filter (every node),
//! post-filter (only when no node fits: preemption), pre-score, score, normalize-score, the
//! weighted sum and the pick, reserve, permit. Bind is the [`SchedulerService`]'s job
//! (asynchronous, after the decision counts in the snapshot). Queue sort is the first plugin
//! with [`Points::QUEUE_SORT`].
//!
//! Plugins declare their [`Locality`]: a node-local plugin's filter and score depend only on the
//! workload and the one node, so its results are cached per equivalence class and recomputed
//! only for nodes that changed. Cluster-wide plugins (topology spread, workload affinity) run in
//! every cycle; their pre-filter gathers what they need in one pass.
//!
//! [`SchedulerService`]: crate::SchedulerService

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use crate::queue::Events;
use crate::snapshot::{NodeId, Placement, Snapshot, WorkloadInfo};
use crate::{DEFAULT_SCHEDULER, Decision, Scheduler};

mod plugin;

use plugin::Entry;
pub use plugin::{
    Configured, Ctx, Diagnosis, Filters, Locality, MAX_SCORE, Permit, Plugin, Points, Prepare, Profile, State, Unfit,
};

/// A max tree over node slots: the best (score, tie-break) and its slot in O(1), updates in
/// O(log n).
struct MaxTree {
    size: usize,
    tree: Vec<(i64, u32, u32)>,
}

const INFEASIBLE: (i64, u32, u32) = (i64::MIN, 0, u32::MAX);

impl MaxTree {
    fn new(n: usize) -> Self {
        let size = n.next_power_of_two().max(1);
        MaxTree { size, tree: vec![INFEASIBLE; 2 * size] }
    }

    fn set(&mut self, slot: usize, v: (i64, u32, u32)) {
        let mut i = slot + self.size;
        self.tree[i] = v;
        while i > 1 {
            i /= 2;
            let (a, b) = (self.tree[2 * i], self.tree[2 * i + 1]);
            self.tree[i] = if (a.0, a.1) >= (b.0, b.1) { a } else { b };
        }
    }

    fn best(&self) -> Option<(i64, NodeId)> {
        let t = self.tree[1];
        (t.2 != u32::MAX).then_some((t.0, t.2))
    }
}

/// Node-local results for one equivalence class.
struct ClassCache {
    /// The class key and the snapshot it was computed on.
    key: u64,
    snapshot: u64,
    seen_seq: u64,
    epoch: u64,
    last_used: u64,
    /// Node-local plugins that apply, with their pre-filter state.
    states: Vec<Option<State>>,
    /// Their pre-score state, when they keep one apart.
    score_states: Vec<Option<State>>,
    active: Vec<usize>,
    /// Per plugin: scores for this class (pre-score did not skip).
    scored: Vec<bool>,
    rejected: Option<(usize, Unfit)>,
    /// Per slot: why it does not fit (plugin index, reason), or `None`.
    unfit: Vec<Option<(usize, Unfit)>>,
    /// Per slot: passes every node-local filter (dense copy of `unfit.is_none()`).
    ok: Vec<bool>,
    /// How many slots give each (plugin, reason): kept with `unfit`, so explaining costs
    /// nothing per node.
    reasons: HashMap<(usize, Cow<'static, str>), usize>,
    /// Reused buffers of the full pick.
    scratch: (Vec<NodeId>, Vec<i64>, Vec<i64>),
    /// Per slot: weighted sum of the node-local scores that need no normalizing.
    local_total: Vec<i64>,
    /// Per node-local normalizing plugin: raw scores per slot.
    raw: Vec<(usize, Vec<i64>)>,
    tree: MaxTree,
}

/// The default scheduler: runs a [`Profile`]'s plugins through the extension points.
pub struct Framework {
    name: String,
    plugins: Vec<Entry>,
    seed: u64,
    classes: HashMap<u64, ClassCache>,
    uses: u64,
    max_classes: usize,
}

impl fmt::Debug for Framework {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Framework")
            .field("name", &self.name)
            .field("plugins", &self.plugins.iter().map(|p| p.plugin.name().to_string()).collect::<Vec<_>>())
            .field("classes", &self.classes.len())
            .finish()
    }
}

fn mix(seed: u64, slot: u32) -> u32 {
    // SplitMix64 finalizer: a fixed, seedable permutation of slots for tie-breaks.
    let mut z = seed ^ (slot as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

impl Framework {
    /// A scheduler running `profile`.
    pub fn new(profile: Profile) -> Self {
        let name = if profile.name.is_empty() { DEFAULT_SCHEDULER.to_string() } else { profile.name.clone() };
        let plugins = profile
            .plugins
            .into_iter()
            .map(|c| Entry {
                points: c.plugin.points(),
                locality: c.plugin.locality(),
                plugin: c.plugin,
                weight: c.weight,
            })
            .collect();
        Framework { name, plugins, seed: profile.seed, classes: HashMap::new(), uses: 0, max_classes: 64 }
    }

    /// Keeps the node-local results of up to `n` equivalence classes (default 64; the least
    /// recently used goes first). A class evicted and met again is evaluated on every node anew,
    /// so a workload mix with more distinct classes than this (a trace replay with hundreds of
    /// task shapes) runs faster with more; each class costs a few bytes per node slot.
    pub fn with_class_capacity(mut self, n: usize) -> Self {
        self.max_classes = n.max(1);
        self
    }

    /// Names of the plugins, in order.
    pub fn plugin_names(&self) -> Vec<String> {
        self.plugins.iter().map(|p| p.plugin.name().to_string()).collect()
    }

    fn set_unfit(c: &mut ClassCache, s: usize, unfit: Option<(usize, Unfit)>) {
        if let Some((i, u)) = c.unfit[s].take()
            && i != usize::MAX
        {
            let key = (i, u.reason);
            if let Some(n) = c.reasons.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    c.reasons.remove(&key);
                }
            }
        }
        if let Some((i, u)) = &unfit
            && *i != usize::MAX
        {
            *c.reasons.entry((*i, u.reason.clone())).or_default() += 1;
        }
        c.ok[s] = unfit.is_none();
        c.unfit[s] = unfit;
    }

    fn eval_node(&self, snapshot: &Snapshot, w: &WorkloadInfo, c: &mut ClassCache, slot: NodeId) {
        let s = slot as usize;
        let Some(node) = snapshot.node(slot) else {
            Self::set_unfit(c, s, Some((usize::MAX, Unfit::new("node removed"))));
            c.tree.set(s, INFEASIBLE);
            return;
        };
        for &i in &c.active {
            let p = &self.plugins[i];
            if !p.points.contains(Points::FILTER) {
                continue;
            }
            let cx = Ctx { snapshot, workload: w, state: c.states[i].as_ref() };
            if let Err(u) = p.plugin.filter(&cx, node) {
                Self::set_unfit(c, s, Some((i, u)));
                c.tree.set(s, INFEASIBLE);
                return;
            }
        }
        Self::set_unfit(c, s, None);
        let mut total = 0;
        for &i in &c.active {
            let p = &self.plugins[i];
            if !c.scored[i] || p.points.contains(Points::NORMALIZE) {
                continue;
            }
            let state = c.score_states[i].as_ref().or(c.states[i].as_ref());
            let cx = Ctx { snapshot, workload: w, state };
            total += p.weight * p.plugin.score(&cx, node);
        }
        c.local_total[s] = total;
        for (i, raw) in &mut c.raw {
            let state = c.score_states[*i].as_ref().or(c.states[*i].as_ref());
            let cx = Ctx { snapshot, workload: w, state };
            raw[s] = self.plugins[*i].plugin.score(&cx, node);
        }
        c.tree.set(s, (total, mix(self.seed, slot), slot));
    }

    /// Brings the class cache of `w` up to date with the snapshot and returns it.
    /// The class key of `w`: its own class plus what node-local plugins add.
    fn class_key(&self, w: &WorkloadInfo) -> u64 {
        let mut key = w.class;
        for p in &self.plugins {
            if p.locality == Locality::Node {
                let k = p.plugin.class_key(w);
                if k != 0 {
                    key = (key ^ k).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
                }
            }
        }
        key
    }

    fn class(&mut self, snapshot: &Snapshot, w: &WorkloadInfo, key: u64) -> ClassCache {
        self.uses += 1;
        let slots = snapshot.slots();
        let mut c = match self.classes.remove(&key) {
            Some(c) if c.snapshot == snapshot.id() && c.epoch == snapshot.slots_epoch() && c.unfit.len() == slots => c,
            _ => self.new_class(snapshot, w),
        };
        c.key = key;
        c.last_used = self.uses;
        if c.rejected.is_some() {
            c.seen_seq = snapshot.change_seq();
            return c;
        }
        let dirty: Option<Vec<NodeId>> = snapshot.changes_since(c.seen_seq).map(|it| it.collect());
        match dirty {
            Some(mut d) if d.len() < slots => {
                d.sort_unstable();
                d.dedup();
                for slot in d {
                    self.eval_node(snapshot, w, &mut c, slot);
                }
            }
            _ => {
                for slot in 0..slots as NodeId {
                    self.eval_node(snapshot, w, &mut c, slot);
                }
            }
        }
        c.seen_seq = snapshot.change_seq();
        c
    }

    fn new_class(&self, snapshot: &Snapshot, w: &WorkloadInfo) -> ClassCache {
        let slots = snapshot.slots();
        let mut c = ClassCache {
            key: 0,
            snapshot: snapshot.id(),
            seen_seq: 0,
            epoch: snapshot.slots_epoch(),
            last_used: 0,
            states: (0..self.plugins.len()).map(|_| None).collect(),
            score_states: (0..self.plugins.len()).map(|_| None).collect(),
            active: Vec::new(),
            scored: vec![false; self.plugins.len()],
            rejected: None,
            unfit: vec![None; slots],
            ok: vec![false; slots],
            reasons: HashMap::new(),
            scratch: (Vec::new(), Vec::new(), Vec::new()),
            local_total: vec![0; slots],
            raw: Vec::new(),
            tree: MaxTree::new(slots),
        };
        for (i, p) in self.plugins.iter().enumerate() {
            if p.locality != Locality::Node || !(p.points.contains(Points::FILTER) || p.points.contains(Points::SCORE))
            {
                continue;
            }
            match p.plugin.pre_filter(snapshot, w) {
                Err(u) => {
                    c.rejected = Some((i, u));
                    return c;
                }
                Ok(Prepare::Skip) => continue,
                Ok(Prepare::Run(state)) => {
                    c.states[i] = state;
                    if p.points.contains(Points::SCORE)
                        && let Prepare::Run(s) = p.plugin.pre_score(snapshot, w, &[])
                    {
                        c.score_states[i] = s;
                        c.scored[i] = true;
                        if p.points.contains(Points::NORMALIZE) {
                            c.raw.push((i, vec![0; slots]));
                        }
                    }
                    c.active.push(i);
                }
            }
        }
        // Force a full evaluation on first use.
        c.seen_seq = 0;
        c
    }

    fn evict_classes(&mut self) {
        while self.classes.len() >= self.max_classes {
            let Some((&k, _)) = self.classes.iter().min_by_key(|(_, c)| c.last_used) else { break };
            self.classes.remove(&k);
        }
    }

    fn diagnose(&self, snapshot: &Snapshot, c: &ClassCache, extra: &[(usize, Unfit)]) -> Diagnosis {
        let mut counts: HashMap<&Cow<'static, str>, usize> = HashMap::new();
        let mut mask = Events::NONE;
        for ((plugin, reason), n) in &c.reasons {
            *counts.entry(reason).or_default() += n;
            mask = mask | self.plugins[*plugin].plugin.wake_on();
        }
        for (plugin, u) in extra {
            *counts.entry(&u.reason).or_default() += 1;
            mask = mask | self.plugins[*plugin].plugin.wake_on();
        }
        let mut reasons: Vec<(Cow<'static, str>, usize)> = counts.into_iter().map(|(r, n)| (r.clone(), n)).collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Diagnosis { nodes: snapshot.node_count(), reasons, wake_on: mask | Events::NODE_ADDED, rejected: None }
    }

    /// Runs the whole cycle; returns the decision and keeps the class cache.
    fn cycle(&mut self, snapshot: &Snapshot, w: &WorkloadInfo) -> Decision {
        let key = self.class_key(w);
        let mut c = self.class(snapshot, w, key);
        let decision = self.cycle_with(snapshot, w, &mut c);
        self.evict_classes();
        self.classes.insert(key, c);
        decision
    }

    fn cycle_with(&self, snapshot: &Snapshot, w: &WorkloadInfo, c: &mut ClassCache) -> Decision {
        if let Some((i, u)) = &c.rejected {
            return Decision::Unschedulable(Diagnosis {
                nodes: snapshot.node_count(),
                reasons: Vec::new(),
                wake_on: self.plugins[*i].plugin.wake_on(),
                rejected: Some(u.reason.clone()),
            });
        }
        // Cluster-wide plugins: pre-filter each cycle.
        let mut states: Vec<Option<State>> = (0..self.plugins.len()).map(|_| None).collect();
        let mut cluster_filters = Vec::new();
        let mut cluster_scores = Vec::new();
        for (i, p) in self.plugins.iter().enumerate() {
            if p.locality != Locality::Cluster {
                continue;
            }
            if p.points.contains(Points::FILTER) || p.points.contains(Points::SCORE) {
                match p.plugin.pre_filter(snapshot, w) {
                    Err(u) => {
                        return Decision::Unschedulable(Diagnosis {
                            nodes: snapshot.node_count(),
                            reasons: Vec::new(),
                            wake_on: p.plugin.wake_on(),
                            rejected: Some(u.reason),
                        });
                    }
                    Ok(Prepare::Skip) => continue,
                    Ok(Prepare::Run(s)) => {
                        states[i] = s;
                        if p.points.contains(Points::FILTER) {
                            cluster_filters.push(i);
                        }
                        if p.points.contains(Points::SCORE) {
                            cluster_scores.push(i);
                        }
                    }
                }
            }
        }
        let fast = cluster_filters.is_empty() && cluster_scores.is_empty() && c.raw.is_empty();
        let chosen = if fast {
            c.tree.best().map(|(_, slot)| slot)
        } else {
            let mut scratch = std::mem::take(&mut c.scratch);
            let chosen = self.full_pick(snapshot, w, c, &mut states, &cluster_filters, &cluster_scores, &mut scratch);
            c.scratch = scratch;
            chosen
        };
        let Some(slot) = chosen else {
            return self.no_fit(snapshot, w, c, &states, &cluster_filters);
        };
        let Some(node) = snapshot.node(slot) else {
            return Decision::Unschedulable(self.diagnose(snapshot, c, &[]));
        };
        let mut placement = Placement { node: slot, node_name: node.name.clone(), devices: Vec::new() };
        if let Some(devices) = self.choose_devices(snapshot, w, c, &states, node) {
            placement.devices = devices;
        }
        self.finish(snapshot, w, placement.clone()).unwrap_or_else(|u| {
            placement.devices.clear();
            Decision::Unschedulable(Diagnosis {
                nodes: snapshot.node_count(),
                reasons: vec![(u.reason, 1)],
                wake_on: Events::ALL,
                rejected: None,
            })
        })
    }

    /// The device choice of the first plugin with [`Points::DEVICES`] that applies to `w`.
    fn choose_devices(
        &self,
        snapshot: &Snapshot,
        w: &WorkloadInfo,
        c: &ClassCache,
        cluster_states: &[Option<State>],
        node: &crate::snapshot::NodeInfo,
    ) -> Option<Vec<crate::snapshot::DeviceShare>> {
        let (i, p) = self.plugins.iter().enumerate().find(|(_, p)| p.points.contains(Points::DEVICES))?;
        let state = match p.locality {
            Locality::Node => {
                if !c.active.contains(&i) {
                    return None;
                }
                c.score_states[i].as_ref().or(c.states[i].as_ref())
            }
            Locality::Cluster => cluster_states[i].as_ref(),
        };
        p.plugin.devices(&Ctx { snapshot, workload: w, state }, node)
    }

    /// Reserve and permit for a chosen placement.
    fn finish(&self, snapshot: &Snapshot, w: &WorkloadInfo, mut placement: Placement) -> Result<Decision, Unfit> {
        let mut reserved = Vec::new();
        for p in &self.plugins {
            if p.points.contains(Points::RESERVE) {
                if let Err(u) = p.plugin.reserve(snapshot, w, &mut placement) {
                    for q in reserved.iter().rev() {
                        let q: &&Entry = q;
                        q.plugin.unreserve(w, &placement);
                    }
                    return Err(u);
                }
                reserved.push(p);
            }
        }
        for p in &self.plugins {
            if !p.points.contains(Points::PERMIT) {
                continue;
            }
            match p.plugin.permit(snapshot, w, &placement) {
                Permit::Allow | Permit::AllowGroup(_) => {}
                Permit::Wait { group, timeout } => return Ok(Decision::Wait { placement, group, timeout }),
                Permit::Reject(u) => {
                    for q in reserved.iter().rev() {
                        q.plugin.unreserve(w, &placement);
                    }
                    return Err(u);
                }
            }
        }
        Ok(Decision::Place(placement))
    }

    #[allow(clippy::too_many_arguments)]
    fn full_pick(
        &self,
        snapshot: &Snapshot,
        w: &WorkloadInfo,
        c: &ClassCache,
        states: &mut [Option<State>],
        filters: &[usize],
        scores: &[usize],
        scratch: &mut (Vec<NodeId>, Vec<i64>, Vec<i64>),
    ) -> Option<NodeId> {
        let (feasible, total, buf) = scratch;
        feasible.clear();
        feasible.extend(c.ok.iter().enumerate().filter(|(_, ok)| **ok).map(|(s, _)| s as NodeId));
        for &i in filters {
            let cx = Ctx { snapshot, workload: w, state: states[i].as_ref() };
            self.plugins[i].plugin.filter_slots(&cx, feasible);
        }
        if feasible.is_empty() {
            return None;
        }
        total.clear();
        total.extend(feasible.iter().map(|&s| c.local_total[s as usize]));
        buf.clear();
        buf.resize(feasible.len(), 0);
        for (i, raw) in &c.raw {
            for (k, &s) in feasible.iter().enumerate() {
                buf[k] = raw[s as usize];
            }
            let state = c.score_states[*i].as_ref().or(c.states[*i].as_ref());
            let cx = Ctx { snapshot, workload: w, state };
            self.plugins[*i].plugin.normalize(&cx, buf);
            for (t, b) in total.iter_mut().zip(buf.iter()) {
                *t += self.plugins[*i].weight * b;
            }
        }
        for &i in scores {
            let p = &self.plugins[i];
            match p.plugin.pre_score(snapshot, w, feasible) {
                Prepare::Skip => continue,
                Prepare::Run(Some(s)) => states[i] = Some(s),
                Prepare::Run(None) => {}
            }
            let cx = Ctx { snapshot, workload: w, state: states[i].as_ref() };
            for (k, &s) in feasible.iter().enumerate() {
                buf[k] = snapshot.node(s).map_or(0, |n| p.plugin.score(&cx, n));
            }
            if p.points.contains(Points::NORMALIZE) {
                p.plugin.normalize(&cx, buf);
            }
            for (t, b) in total.iter_mut().zip(buf.iter()) {
                *t += p.weight * b;
            }
        }
        // The tie-break hash only for the nodes that share the best score.
        let best = total.iter().copied().max()?;
        feasible
            .iter()
            .zip(total.iter())
            .filter(|(_, t)| **t == best)
            .max_by_key(|(s, _)| mix(self.seed, **s))
            .map(|(s, _)| *s)
    }

    fn no_fit(
        &self,
        snapshot: &Snapshot,
        w: &WorkloadInfo,
        c: &mut ClassCache,
        states: &[Option<State>],
        cluster_filters: &[usize],
    ) -> Decision {
        // Reasons from cluster-wide filters on nodes that passed the node-local ones.
        let mut extra = Vec::new();
        for (s, unfit) in c.unfit.iter().enumerate() {
            if unfit.is_some() {
                continue;
            }
            let Some(node) = snapshot.node(s as NodeId) else { continue };
            for &i in cluster_filters {
                let cx = Ctx { snapshot, workload: w, state: states[i].as_ref() };
                if let Err(u) = self.plugins[i].plugin.filter(&cx, node) {
                    extra.push((i, u));
                    break;
                }
            }
        }
        let diagnosis = self.diagnose(snapshot, c, &extra);
        let local_states = std::mem::take(&mut c.states);
        let mut result = None;
        // Gang members do not preempt: evicting for one member of a gang that may never
        // complete would cost others their place for nothing.
        let may_preempt = w.spec().scheduling_group.is_none();
        for p in &self.plugins {
            if !may_preempt || !p.points.contains(Points::POST_FILTER) {
                continue;
            }
            let filters = Filters {
                plugins: &self.plugins,
                class: c.key,
                snapshot_id: snapshot.id(),
                local_states: &local_states,
                local: &c.active,
                cluster_states: states,
                cluster: cluster_filters,
            };
            let cx = Ctx { snapshot, workload: w, state: None };
            if let Some((placement, victims)) = p.plugin.post_filter(&cx, &filters, &diagnosis) {
                result = Some((placement, victims));
                break;
            }
        }
        c.states = local_states;
        match result {
            Some((placement, victims)) => Decision::Preempt { placement, victims },
            None => Decision::Unschedulable(diagnosis),
        }
    }
}

impl Scheduler for Framework {
    fn name(&self) -> &str {
        &self.name
    }

    fn sort_key(&self, w: &WorkloadInfo) -> (i64, u64) {
        match self.plugins.iter().find(|p| p.points.contains(Points::QUEUE_SORT)) {
            Some(p) => p.plugin.sort_key(w),
            None => (-(w.priority() as i64), w.seq),
        }
    }

    fn schedule(&mut self, snapshot: &Snapshot, workload: &WorkloadInfo) -> Decision {
        self.cycle(snapshot, workload)
    }

    fn unreserve(&mut self, workload: &WorkloadInfo, placement: &Placement) {
        for p in &self.plugins {
            if p.points.contains(Points::RESERVE) {
                p.plugin.unreserve(workload, placement);
            }
        }
    }
}
