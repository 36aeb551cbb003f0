//! The plugin framework: extension points, profiles, and the default [`Framework`] scheduler.
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

use std::any::Any;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::queue::Events;
use crate::snapshot::{NodeId, NodeInfo, Placement, Snapshot, WorkloadInfo};
use crate::{DEFAULT_SCHEDULER, Decision, Scheduler};
use orch_core::cache::ObjectRef;

/// Highest score a plugin should give (scores are weighted and summed).
pub const MAX_SCORE: i64 = 100;

/// Per-cycle data a plugin keeps between its extension points.
pub type State = Box<dyn Any + Send + Sync>;

/// Why a node does not fit, in words an operator reads ("insufficient cpu").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Unfit {
    /// The reason, aggregated across nodes by equal text.
    pub reason: Cow<'static, str>,
    /// Whether evicting lower-priority workloads from the node could make it fit.
    pub preemptible: bool,
}

impl Unfit {
    /// A reason preemption cannot fix (taints, selectors…).
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        Unfit { reason: reason.into(), preemptible: false }
    }

    /// A reason evicting lower-priority workloads could fix (resources, ports).
    pub fn preemptible(reason: impl Into<Cow<'static, str>>) -> Self {
        Unfit { reason: reason.into(), preemptible: true }
    }
}

/// Extension points a plugin implements (a bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Points(pub u32);

impl Points {
    /// Orders the queue.
    pub const QUEUE_SORT: Points = Points(1);
    /// Pre-filter and filter.
    pub const FILTER: Points = Points(2);
    /// Runs when nothing fits (preemption).
    pub const POST_FILTER: Points = Points(4);
    /// Pre-score and score.
    pub const SCORE: Points = Points(8);
    /// Normalizes its scores across nodes after scoring.
    pub const NORMALIZE: Points = Points(16);
    /// Reserve and unreserve.
    pub const RESERVE: Points = Points(32);
    /// Permit (allow, wait, reject).
    pub const PERMIT: Points = Points(64);

    /// Whether every point of `other` is in `self`.
    pub fn contains(self, other: Points) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Points {
    type Output = Points;
    fn bitor(self, rhs: Points) -> Points {
        Points(self.0 | rhs.0)
    }
}

/// How far a plugin looks when it filters or scores a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locality {
    /// Only at the workload and the node (its labels, taints, allocations, its own workloads):
    /// results are cached per workload class and node, recomputed when the node changes.
    /// Pre-filter and pre-score state must depend on the workload only.
    Node,
    /// Elsewhere too (other nodes' workloads): runs in full every cycle.
    Cluster,
}

/// What a permit plugin says about a reserved placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permit {
    /// Go ahead and bind.
    Allow,
    /// Go ahead and bind this one and every member of `group` waiting.
    AllowGroup(String),
    /// Hold the reservation until the group completes, at most `timeout`.
    Wait {
        /// The gang key.
        group: String,
        /// How long to wait.
        timeout: Duration,
    },
    /// Give up this placement.
    Reject(Unfit),
}

/// What pre-filter and pre-score say.
pub enum Prepare {
    /// The plugin does not apply to this workload: skip its filter (or score).
    Skip,
    /// Run it, with this state.
    Run(Option<State>),
}

impl fmt::Debug for Prepare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prepare::Skip => f.write_str("Skip"),
            Prepare::Run(s) => write!(f, "Run(state: {})", s.is_some()),
        }
    }
}

/// What a plugin sees of the cycle: the snapshot, the workload, and its own state.
pub struct Ctx<'a> {
    /// The cluster.
    pub snapshot: &'a Snapshot,
    /// The workload being placed.
    pub workload: &'a WorkloadInfo,
    /// The plugin's own state from pre-filter / pre-score.
    pub state: Option<&'a State>,
}

impl Ctx<'_> {
    /// The plugin's state as `T`.
    pub fn state<T: 'static>(&self) -> Option<&T> {
        self.state.and_then(|s| s.downcast_ref::<T>())
    }
}

/// A scheduling plugin: implement the extension points you need and declare them in
/// [`Plugin::points`]. Every method has a neutral default.
pub trait Plugin: Send + Sync + 'static {
    /// Unique name within a profile.
    fn name(&self) -> &str;

    /// Extension points implemented.
    fn points(&self) -> Points;

    /// Whether filter and score look beyond the node.
    fn locality(&self) -> Locality {
        Locality::Node
    }

    /// Cluster events that may turn this plugin's rejection into a fit; a workload it rejected
    /// waits for one of them before it is retried.
    fn wake_on(&self) -> Events {
        Events::ALL
    }

    /// For node-local plugins that read parts of a workload beyond what
    /// [`WorkloadInfo::class`] covers (requests, ports, priority, node selector, affinity,
    /// tolerations, spread, gang, labels, namespace): a hash of those parts, so workloads that
    /// differ in them never share cached results. Default: nothing more.
    fn class_key(&self, w: &WorkloadInfo) -> u64 {
        let _ = w;
        0
    }

    /// Queue order key (smaller first); only the first queue-sort plugin is used.
    fn sort_key(&self, w: &WorkloadInfo) -> (i64, u64) {
        (-(w.priority() as i64), w.seq)
    }

    /// Prepares filtering for one workload, or rejects it outright.
    fn pre_filter(&self, snapshot: &Snapshot, w: &WorkloadInfo) -> Result<Prepare, Unfit> {
        let _ = (snapshot, w);
        Ok(Prepare::Run(None))
    }

    /// Whether the node can take the workload.
    fn filter(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        let _ = (cx, node);
        Ok(())
    }

    /// Keeps the node slots that pass [`filter`](Plugin::filter). Cluster-wide plugins whose
    /// verdict is a lookup by slot can override it to filter thousands of nodes without
    /// touching each node's record; the result must equal calling `filter` on each.
    fn filter_slots(&self, cx: &Ctx<'_>, slots: &mut Vec<NodeId>) {
        slots.retain(|s| cx.snapshot.node(*s).is_some_and(|n| self.filter(cx, n).is_ok()));
    }

    /// When no node fits: a placement that fits after evicting victims, if any.
    fn post_filter(
        &self,
        cx: &Ctx<'_>,
        filters: &Filters<'_>,
        diagnosis: &Diagnosis,
    ) -> Option<(Placement, Vec<ObjectRef>)> {
        let _ = (cx, filters, diagnosis);
        None
    }

    /// Prepares scoring, given the nodes that passed the filters.
    fn pre_score(&self, snapshot: &Snapshot, w: &WorkloadInfo, feasible: &[NodeId]) -> Prepare {
        let _ = (snapshot, w, feasible);
        Prepare::Run(None)
    }

    /// Score of a feasible node, 0..=[`MAX_SCORE`] (more is better) unless normalized.
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let _ = (cx, node);
        0
    }

    /// Rescales scores (aligned with the feasible nodes) into 0..=[`MAX_SCORE`].
    fn normalize(&self, cx: &Ctx<'_>, scores: &mut [i64]) {
        let _ = (cx, scores);
    }

    /// Adjusts or vetoes the chosen placement (e.g. picks devices).
    fn reserve(&self, snapshot: &Snapshot, w: &WorkloadInfo, placement: &mut Placement) -> Result<(), Unfit> {
        let _ = (snapshot, w, placement);
        Ok(())
    }

    /// A reservation was rolled back.
    fn unreserve(&self, w: &WorkloadInfo, placement: &Placement) {
        let _ = (w, placement);
    }

    /// Allows, delays or rejects a reserved placement.
    fn permit(&self, snapshot: &Snapshot, w: &WorkloadInfo, placement: &Placement) -> Permit {
        let _ = (snapshot, w, placement);
        Permit::Allow
    }
}

/// A plugin with its score weight.
#[derive(Clone)]
pub struct Configured {
    /// The plugin.
    pub plugin: Arc<dyn Plugin>,
    /// Weight of its score.
    pub weight: i64,
}

/// A set of plugins with weights: one scheduler's configuration.
#[derive(Clone)]
pub struct Profile {
    /// Scheduler name workloads ask for.
    pub name: String,
    /// Plugins in the order they run.
    pub plugins: Vec<Configured>,
    /// Seed of the tie-break between equally scored nodes (same seed, same placements).
    pub seed: u64,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field("plugins", &self.plugins.iter().map(|p| (p.plugin.name().to_string(), p.weight)).collect::<Vec<_>>())
            .field("seed", &self.seed)
            .finish()
    }
}

impl Profile {
    /// An empty profile.
    pub fn new(name: impl Into<String>) -> Self {
        Profile { name: name.into(), plugins: Vec::new(), seed: 0 }
    }

    /// The default profile: every default plugin, least-allocated scoring.
    pub fn default_profile() -> Self {
        crate::plugins::default_profile(crate::plugins::ScoringStrategy::LeastAllocated)
    }

    /// Adds a plugin with a score weight.
    pub fn with(mut self, plugin: impl Plugin, weight: i64) -> Self {
        self.plugins.push(Configured { plugin: Arc::new(plugin), weight });
        self
    }

    /// Removes the plugin of that name.
    pub fn without(mut self, name: &str) -> Self {
        self.plugins.retain(|p| p.plugin.name() != name);
        self
    }

    /// Changes a plugin's weight.
    pub fn weight(mut self, name: &str, weight: i64) -> Self {
        for p in &mut self.plugins {
            if p.plugin.name() == name {
                p.weight = weight;
            }
        }
        self
    }

    /// Sets the tie-break seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// Why a workload fits nowhere: node counts per reason.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Diagnosis {
    /// Nodes considered.
    pub nodes: usize,
    /// Reasons with how many nodes gave each, most frequent first.
    pub reasons: Vec<(Cow<'static, str>, usize)>,
    /// Events that may make it fit.
    pub wake_on: Events,
    /// Set when a pre-filter rejected it before any node was looked at.
    pub rejected: Option<Cow<'static, str>>,
}

impl Diagnosis {
    /// A diagnosis for a custom scheduler: nodes considered and reasons with node counts; the
    /// workload is retried on any cluster event.
    pub fn new(nodes: usize, reasons: Vec<(Cow<'static, str>, usize)>) -> Self {
        Diagnosis { nodes, reasons, wake_on: Events::ALL, rejected: None }
    }

    /// "0/5000 nodes fit: 4980 insufficient cpu, 20 taint {dedicated=gpu}".
    pub fn message(&self) -> String {
        if let Some(r) = &self.rejected {
            return format!("0/{} nodes fit: {r}", self.nodes);
        }
        let parts: Vec<String> = self.reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        if parts.is_empty() {
            format!("0/{} nodes fit", self.nodes)
        } else {
            format!("0/{} nodes fit: {}", self.nodes, parts.join(", "))
        }
    }
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

/// Lets a post-filter plugin run the node-local filters against a modified node (a node with
/// victims removed), with the cycle's state.
pub struct Filters<'a> {
    fw: &'a Framework,
    class: u64,
    snapshot_id: u64,
    local_states: &'a [Option<State>],
    local: &'a [usize],
    cluster_states: &'a [Option<State>],
    cluster: &'a [usize],
}

impl Filters<'_> {
    /// The equivalence class results for this workload may be cached under (it includes the
    /// snapshot's identity and every plugin's [`Plugin::class_key`]).
    pub fn class(&self) -> (u64, u64) {
        (self.snapshot_id, self.class)
    }

    /// Runs the node-local filters on `node` for the workload of `cx`.
    pub fn check(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        for &i in self.local {
            let p = &self.fw.plugins[i];
            if !p.points.contains(Points::FILTER) {
                continue;
            }
            let c = Ctx { snapshot: cx.snapshot, workload: cx.workload, state: self.local_states[i].as_ref() };
            p.plugin.filter(&c, node)?;
        }
        Ok(())
    }

    /// Runs the cluster-wide filters on `node`. Their state was gathered from the snapshot as it
    /// is, so a what-if that removes workloads is judged conservatively: a conflict with a
    /// workload that would be evicted still counts.
    pub fn check_cluster(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        for &i in self.cluster {
            let c = Ctx { snapshot: cx.snapshot, workload: cx.workload, state: self.cluster_states[i].as_ref() };
            self.fw.plugins[i].plugin.filter(&c, node)?;
        }
        Ok(())
    }
}

struct Entry {
    plugin: Arc<dyn Plugin>,
    weight: i64,
    points: Points,
    locality: Locality,
}

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

impl Default for Framework {
    fn default() -> Self {
        Framework::new(Profile::default_profile())
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
                fw: self,
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
