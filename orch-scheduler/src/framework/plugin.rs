//! The plugin contract: what a [`Plugin`] implements at each extension point, what it is given
//! ([`Ctx`], [`Filters`]) and what it answers ([`Unfit`], [`Permit`], [`Diagnosis`]), and the
//! [`Profile`] that lists plugins with their weights. The engine that runs them is
//! [`Framework`](super::Framework).

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::queue::Events;
use crate::snapshot::{DeviceShare, NodeId, NodeInfo, Placement, Snapshot, WorkloadInfo};
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
    /// Chooses which devices (GPUs, and how much of each) the workload gets on the chosen node,
    /// before reserve. The first plugin of a profile with this point decides; without one, the
    /// tightest fit ([`NodeInfo::pick_devices`]) does.
    pub const DEVICES: Points = Points(128);

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

    /// The device shares the workload gets on `node`, the node the cycle chose (only called on
    /// plugins that declare [`Points::DEVICES`], with the state of their pre-score, or of their
    /// pre-filter when pre-score kept none). `None` leaves the choice to the tightest fit.
    ///
    /// # To ensure correctness
    /// - The shares must fit the node as it is (each device has the room, the shares add up to the
    ///   workload's `gpu` request); a choice that does not is replaced by the tightest fit, so a
    ///   policy can never overcommit a device.
    /// - The answer must depend only on the workload, the node and the plugin's state, so the
    ///   scheduler service and a replay of the same decisions hand out the same devices.
    fn devices(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Option<Vec<DeviceShare>> {
        let _ = (cx, node);
        None
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

/// A plugin as the engine holds it: with the extension points and locality it declared.
pub(crate) struct Entry {
    pub(crate) plugin: Arc<dyn Plugin>,
    pub(crate) weight: i64,
    pub(crate) points: Points,
    pub(crate) locality: Locality,
}

/// Lets a post-filter plugin run the node-local filters against a modified node (a node with
/// victims removed), with the cycle's state.
pub struct Filters<'a> {
    pub(crate) plugins: &'a [Entry],
    pub(crate) class: u64,
    pub(crate) snapshot_id: u64,
    pub(crate) local_states: &'a [Option<State>],
    pub(crate) local: &'a [usize],
    pub(crate) cluster_states: &'a [Option<State>],
    pub(crate) cluster: &'a [usize],
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
            let p = &self.plugins[i];
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
            self.plugins[i].plugin.filter(&c, node)?;
        }
        Ok(())
    }
}
