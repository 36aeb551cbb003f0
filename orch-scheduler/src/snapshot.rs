//! The scheduler's view of the cluster: nodes with what is allocated on them, placed workloads,
//! topology domains and match counters, all kept up to date incrementally so that a scheduling
//! cycle never rebuilds anything proportional to the cluster.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use orch_core::cache::ObjectRef;
use orch_core::kinds::{
    AffinityTerm, Node, NodeStorage, Protocol, Taint, TaintEffect, VolumeSource, Workload, WorkloadAffinity,
    resource as res,
};
use orch_core::labels::Labels;
use orch_core::object::Object;
use orch_core::quantity::Quantity;
use orch_core::selector::LabelSelector;

/// Index of a node slot in a [`Snapshot`]. Slots of removed nodes are reused.
pub type NodeId = u32;

/// Dense index of a resource name (see [`resource_dim`]).
pub type Dim = u16;

/// Dimension of `cpu`.
pub const CPU: Dim = 0;
/// Dimension of `memory`.
pub const MEMORY: Dim = 1;
/// Dimension of `gpu`.
pub const GPU: Dim = 2;

/// One GPU share in milli-units: a whole device is 1000.
pub const WHOLE_DEVICE: i64 = 1000;

/// Resource names by dimension, and back.
type DimTable = (Vec<String>, HashMap<String, Dim>);

fn dims() -> &'static RwLock<DimTable> {
    static DIMS: OnceLock<RwLock<DimTable>> = OnceLock::new();
    DIMS.get_or_init(|| {
        let names: Vec<String> = [res::CPU, res::MEMORY, res::GPU].iter().map(|s| s.to_string()).collect();
        let by = names.iter().enumerate().map(|(i, n)| (n.clone(), i as Dim)).collect();
        RwLock::new((names, by))
    })
}

/// The dense dimension of a resource name, interned process-wide (`cpu`, `memory` and `gpu` are
/// 0, 1 and 2; extended resources get the next free numbers). `pods` is not a dimension: the
/// scheduler counts workloads per node separately.
pub fn resource_dim(name: &str) -> Dim {
    if let Some(d) = dims().read().unwrap_or_else(|e| e.into_inner()).1.get(name) {
        return *d;
    }
    let mut w = dims().write().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = w.1.get(name) {
        return *d;
    }
    let d = w.0.len() as Dim;
    w.0.push(name.to_string());
    w.1.insert(name.to_string(), d);
    d
}

/// The resource name of a dimension.
pub fn resource_name(dim: Dim) -> String {
    dims().read().unwrap_or_else(|e| e.into_inner()).0.get(dim as usize).cloned().unwrap_or_default()
}

fn milli(q: &Quantity) -> i64 {
    q.milli_ceil()
}

/// A pending or placed workload as the scheduler sees it: the object plus what it asks for,
/// digested once.
#[derive(Debug)]
pub struct WorkloadInfo {
    /// Namespace and name.
    pub key: ObjectRef,
    /// The object as last seen.
    pub object: Arc<Object<Workload>>,
    /// Requests by dimension, in milli-units (memory in milli-bytes), zero amounts left out.
    pub requests: Vec<(Dim, i64)>,
    /// Host ports it needs.
    pub host_ports: Vec<(Protocol, u32)>,
    /// The volume claims it uses (in its namespace), sorted, without repeats.
    pub claims: Vec<String>,
    /// Equivalence class: workloads with the same class are interchangeable to every node-local
    /// plugin, so their per-node results are computed once and reused.
    pub class: u64,
    /// Arrival order (first-in-first-out tie-breaks).
    pub seq: u64,
}

impl WorkloadInfo {
    /// Digests `object`; `seq` orders workloads of equal priority.
    pub fn new(object: Arc<Object<Workload>>, seq: u64) -> Self {
        let spec = &object.spec;
        let mut requests: Vec<(Dim, i64)> = spec
            .requests()
            .iter()
            .filter(|(name, _)| name.as_str() != res::PODS)
            .map(|(name, q)| (resource_dim(name), milli(q)))
            .filter(|(_, m)| *m > 0)
            .collect();
        requests.sort_unstable();
        let mut host_ports: Vec<(Protocol, u32)> = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .filter_map(|p| p.host_port.map(|hp| (p.protocol, hp)))
            .collect();
        host_ports.sort_unstable_by_key(|(p, n)| (*p as u8, *n));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        object.metadata.namespace.hash(&mut h);
        for (k, v) in object.metadata.labels.iter() {
            (k, v).hash(&mut h);
        }
        requests.hash(&mut h);
        for (p, n) in &host_ports {
            (*p as u8, *n).hash(&mut h);
        }
        spec.priority.hash(&mut h);
        spec.node_name.hash(&mut h);
        for (k, v) in spec.node_selector.iter() {
            (k, v).hash(&mut h);
        }
        spec.tolerations.hash(&mut h);
        spec.scheduling_group.hash(&mut h);
        // The nested constraint types are hashed through their canonical JSON.
        let mut w = HashWriter(&mut h);
        let _ = serde_json::to_writer(&mut w, &spec.affinity);
        let _ = serde_json::to_writer(&mut w, &spec.topology_spread_constraints);
        let class = h.finish();
        let mut claims: Vec<String> = spec
            .volumes
            .iter()
            .filter_map(|v| match &v.source {
                VolumeSource::Claim { claim_name } => Some(claim_name.clone()),
                _ => None,
            })
            .collect();
        claims.sort_unstable();
        claims.dedup();
        WorkloadInfo { key: ObjectRef::of(&object), object, requests, host_ports, claims, class, seq }
    }

    /// The digest of `object`, a newer version of this workload with the same spec (the same
    /// generation) and labels, such as one with a new status: everything derived is reused and
    /// only the object is new. `None` when anything it is derived from may differ.
    pub fn refreshed(&self, object: Arc<Object<Workload>>) -> Option<Self> {
        let (was, now) = (&self.object.metadata, &object.metadata);
        let same = was.uid == now.uid
            && was.generation == now.generation
            && was.namespace == now.namespace
            && was.name == now.name
            && was.labels == now.labels;
        same.then(|| WorkloadInfo {
            key: self.key.clone(),
            object,
            requests: self.requests.clone(),
            host_ports: self.host_ports.clone(),
            claims: self.claims.clone(),
            class: self.class,
            seq: self.seq,
        })
    }

    /// The workload's spec.
    pub fn spec(&self) -> &Workload {
        &self.object.spec
    }

    /// Its labels.
    pub fn labels(&self) -> &Labels {
        &self.object.metadata.labels
    }

    /// Its namespace.
    pub fn namespace(&self) -> &str {
        &self.object.metadata.namespace
    }

    /// Its priority.
    pub fn priority(&self) -> i32 {
        self.object.spec.priority
    }

    /// What it asks of one dimension, in milli-units.
    pub fn request(&self, dim: Dim) -> i64 {
        self.requests.iter().find(|(d, _)| *d == dim).map_or(0, |(_, m)| *m)
    }

    /// The gang key (`namespace/name`) when it belongs to one.
    pub fn group_key(&self) -> Option<String> {
        self.spec().scheduling_group.as_ref().map(|g| format!("{}/{}", self.namespace(), g.name))
    }
}

struct HashWriter<'a, H: Hasher>(&'a mut H);

impl<H: Hasher> std::io::Write for HashWriter<'_, H> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One device (a GPU) on a node, tracked individually so shares of it can be handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Device id on its node.
    pub id: String,
    /// Model, e.g. `V100M16`.
    pub model: String,
    /// Unallocated share in milli-units (1000 = the whole device).
    pub free: i64,
}

/// A share of one device given to a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceShare {
    /// Index into the node's [`NodeInfo::devices`].
    pub device: u16,
    /// Milli-units taken (1000 = the whole device).
    pub milli: i64,
}

/// A node and everything allocated on it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Its slot.
    pub id: NodeId,
    /// Its name.
    pub name: Arc<str>,
    /// Its labels.
    pub labels: Labels,
    /// Its taints.
    pub taints: Vec<Taint>,
    /// Cordoned: no new workloads.
    pub unschedulable: bool,
    /// Allocatable by dimension, milli-units; dimensions past the end are zero.
    pub allocatable: Vec<i64>,
    /// Requested by placed workloads, by dimension.
    pub requested: Vec<i64>,
    /// Most workloads it takes (`pods` allocatable); `u32::MAX` when not declared.
    pub max_workloads: u32,
    /// Placed workloads (bound or assumed).
    pub workloads: Vec<Arc<WorkloadInfo>>,
    /// Host ports in use.
    pub used_ports: Vec<(Protocol, u32)>,
    /// GPUs, one by one, when the node reports them.
    pub devices: Vec<DeviceSlot>,
    /// The volume classes its agent provides, with the room for them (`status.storage`).
    pub storage: Vec<NodeStorage>,
}

impl NodeInfo {
    fn from_node(id: NodeId, node: &Object<Node>) -> Self {
        let mut n = NodeInfo {
            id,
            name: Arc::from(node.metadata.name.as_str()),
            labels: Labels::new(),
            taints: Vec::new(),
            unschedulable: false,
            allocatable: Vec::new(),
            requested: Vec::new(),
            max_workloads: u32::MAX,
            workloads: Vec::new(),
            used_ports: Vec::new(),
            devices: Vec::new(),
            storage: Vec::new(),
        };
        n.refresh(node);
        n
    }

    /// Takes labels, taints and capacity from a new version of the node, keeping allocations.
    /// Returns true when the node's device list changed (the snapshot then hands shares out
    /// again and updates every placement on the node).
    fn refresh(&mut self, node: &Object<Node>) -> bool {
        self.labels = node.metadata.labels.clone();
        self.taints = node.spec.taints.clone();
        self.unschedulable = node.spec.unschedulable;
        let status = &node.status;
        self.storage.clone_from(&status.storage);
        let source = if status.allocatable.is_empty() { &status.capacity } else { &status.allocatable };
        let mut alloc = vec![0i64; 3];
        self.max_workloads = u32::MAX;
        for (name, q) in source {
            if name == res::PODS {
                self.max_workloads = q.units_ceil().clamp(0, u32::MAX as i64) as u32;
                continue;
            }
            let d = resource_dim(name) as usize;
            if alloc.len() <= d {
                alloc.resize(d + 1, 0);
            }
            alloc[d] = milli(q);
        }
        let gpus: Vec<_> = status.devices.iter().filter(|d| d.resource == res::GPU).collect();
        let same_devices = gpus.len() == self.devices.len()
            && gpus.iter().zip(&self.devices).all(|(a, b)| a.id == b.id && a.model == b.model);
        if !same_devices {
            self.devices = gpus
                .iter()
                .map(|d| DeviceSlot { id: d.id.clone(), model: d.model.clone(), free: WHOLE_DEVICE })
                .collect();
        }
        if !self.devices.is_empty() {
            alloc[GPU as usize] = alloc[GPU as usize].max(self.devices.len() as i64 * WHOLE_DEVICE);
        }
        self.allocatable = alloc;
        if self.requested.len() < self.allocatable.len() {
            self.requested.resize(self.allocatable.len(), 0);
        }
        !same_devices
    }

    /// Allocatable amount of `dim`.
    pub fn allocatable(&self, dim: Dim) -> i64 {
        self.allocatable.get(dim as usize).copied().unwrap_or(0)
    }

    /// Requested amount of `dim`.
    pub fn requested(&self, dim: Dim) -> i64 {
        self.requested.get(dim as usize).copied().unwrap_or(0)
    }

    /// Still free of `dim`.
    pub fn free(&self, dim: Dim) -> i64 {
        self.allocatable(dim).saturating_sub(self.requested(dim))
    }

    /// The devices that would hold a GPU request of `milli` (best fit: the fullest device a share
    /// fits on, so whole devices stay whole), or `None` when it does not fit the devices. A node
    /// without per-device information gets an empty pick (counted in total only).
    pub fn pick_devices(&self, milli: i64) -> Option<Vec<DeviceShare>> {
        if milli <= 0 || self.devices.is_empty() {
            return Some(Vec::new());
        }
        if milli < WHOLE_DEVICE {
            let best =
                self.devices.iter().enumerate().filter(|(_, d)| d.free >= milli).min_by_key(|(i, d)| (d.free, *i))?;
            return Some(vec![DeviceShare { device: best.0 as u16, milli }]);
        }
        // Above one GPU only whole GPUs: 1.5 GPUs is neither a share of one device nor whole
        // devices (admission refuses it), so there is no placement to give.
        if milli % WHOLE_DEVICE != 0 {
            return None;
        }
        let want = (milli / WHOLE_DEVICE) as usize;
        let whole: Vec<_> = self
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.free == WHOLE_DEVICE)
            .take(want)
            .map(|(i, _)| DeviceShare { device: i as u16, milli: WHOLE_DEVICE })
            .collect();
        (whole.len() == want).then_some(whole)
    }

    /// Whether a host port is taken.
    pub fn port_in_use(&self, port: (Protocol, u32)) -> bool {
        self.used_ports.contains(&port)
    }

    /// Counts a workload in (on a copy of a node, to try what-ifs; the snapshot's own nodes
    /// change only through the snapshot).
    pub fn take(&mut self, w: &Arc<WorkloadInfo>, shares: &[DeviceShare]) {
        for &(d, m) in &w.requests {
            let d = d as usize;
            if self.requested.len() <= d {
                self.requested.resize(d + 1, 0);
            }
            self.requested[d] = self.requested[d].saturating_add(m);
        }
        for s in shares {
            if let Some(dev) = self.devices.get_mut(s.device as usize) {
                dev.free -= s.milli;
            }
        }
        self.used_ports.extend_from_slice(&w.host_ports);
        self.workloads.push(w.clone());
    }

    /// Counts a workload out (on a copy of a node, to try what-ifs such as preemption).
    pub fn release(&mut self, w: &WorkloadInfo, shares: &[DeviceShare]) {
        for &(d, m) in &w.requests {
            if let Some(r) = self.requested.get_mut(d as usize) {
                *r = r.saturating_sub(m);
            }
        }
        for s in shares {
            if let Some(dev) = self.devices.get_mut(s.device as usize) {
                dev.free += s.milli;
            }
        }
        for p in &w.host_ports {
            if let Some(i) = self.used_ports.iter().position(|x| x == p) {
                self.used_ports.swap_remove(i);
            }
        }
        if let Some(i) = self.workloads.iter().position(|x| x.key == w.key) {
            self.workloads.swap_remove(i);
        }
    }
}

/// Where a workload was placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The node slot.
    pub node: NodeId,
    /// The node's name.
    pub node_name: Arc<str>,
    /// Device shares handed to it (empty when it takes no GPU or the node has no device list).
    pub devices: Vec<DeviceShare>,
}

/// A workload that counts on a node: bound in the store, or assumed (decided, write in flight).
#[derive(Debug, Clone)]
pub struct Placed {
    /// The workload.
    pub info: Arc<WorkloadInfo>,
    /// Where.
    pub placement: Placement,
    /// Decided by this scheduler and not yet confirmed by the store.
    pub assumed: bool,
}

/// The domains of one node label key.
#[derive(Debug, Default, Clone)]
pub struct Topology {
    /// Domain of each node slot; [`NO_DOMAIN`] when the node lacks the label.
    pub domain_of: Vec<u32>,
    /// Label value of each domain.
    pub values: Vec<String>,
    by_value: HashMap<String, u32>,
    /// Live nodes per domain.
    pub nodes: Vec<u32>,
}

/// A node without the topology label.
pub const NO_DOMAIN: u32 = u32::MAX;

impl Topology {
    fn set(&mut self, node: NodeId, value: Option<&str>) {
        let n = node as usize;
        if self.domain_of.len() <= n {
            self.domain_of.resize(n + 1, NO_DOMAIN);
        }
        let old = self.domain_of[n];
        if old != NO_DOMAIN {
            self.nodes[old as usize] -= 1;
        }
        let new = match value {
            None => NO_DOMAIN,
            Some(v) => match self.by_value.get(v) {
                Some(d) => *d,
                None => {
                    let d = self.values.len() as u32;
                    self.values.push(v.to_string());
                    self.by_value.insert(v.to_string(), d);
                    self.nodes.push(0);
                    d
                }
            },
        };
        if new != NO_DOMAIN {
            self.nodes[new as usize] += 1;
        }
        self.domain_of[n] = new;
    }

    /// The domain of a node slot.
    pub fn domain(&self, node: NodeId) -> u32 {
        self.domain_of.get(node as usize).copied().unwrap_or(NO_DOMAIN)
    }

    /// Number of domains ever seen (some may have no live node).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when no node has the label.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Which workloads a counter or term counts: a label selector within some namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadMatch {
    /// The selector.
    pub selector: LabelSelector,
    /// Namespaces (never empty: "the workload's own" is resolved before).
    pub namespaces: Vec<String>,
}

impl WorkloadMatch {
    /// Resolves a term's namespaces against the namespace of the workload that carries it.
    pub fn of_term(term: &AffinityTerm, own_namespace: &str) -> Self {
        let mut namespaces =
            if term.namespaces.is_empty() { vec![own_namespace.to_string()] } else { term.namespaces.clone() };
        namespaces.sort();
        namespaces.dedup();
        WorkloadMatch { selector: term.label_selector.clone(), namespaces }
    }

    /// True when `w` is counted.
    pub fn matches(&self, w: &WorkloadInfo) -> bool {
        self.namespaces.iter().any(|n| n == w.namespace()) && self.selector.matches(w.labels())
    }

    fn key(&self) -> String {
        format!("{}|{}", self.namespaces.join(","), self.selector)
    }
}

/// Per-node counts of placed workloads matching one [`WorkloadMatch`].
#[derive(Debug)]
pub struct MatchCounts {
    /// What is counted.
    pub what: WorkloadMatch,
    /// Count per node slot.
    pub per_node: Vec<u32>,
    /// Total over all nodes.
    pub total: u32,
}

/// Required anti-affinity terms of placed workloads, grouped by term, so an incoming workload
/// checks each distinct term once rather than each placed workload.
#[derive(Debug)]
pub struct ExistingTerm {
    /// Whom the term repels.
    pub what: WorkloadMatch,
    /// The topology key it repels across.
    pub topology_key: String,
    /// Placed workloads carrying the term, per node slot.
    pub per_node: Vec<u32>,
    /// Total carriers.
    pub total: u32,
}

const LOG_LIMIT: usize = 1 << 16;

/// The cluster as the scheduler sees it. Read-only to schedulers; the scheduling core applies
/// decisions and store events to it.
#[derive(Debug)]
pub struct Snapshot {
    /// Unique per snapshot (a clone gets a new one), so caches keyed by change sequence numbers
    /// never mix two snapshots.
    id: u64,
    nodes: Vec<Option<NodeInfo>>,
    by_name: HashMap<Arc<str>, NodeId>,
    free_slots: Vec<NodeId>,
    live: usize,
    /// hashbrown's default hasher (foldhash): every workload event looks here.
    placed: hashbrown::HashMap<ObjectRef, Placed>,
    topology: HashMap<String, Topology>,
    anti_terms: HashMap<String, ExistingTerm>,
    counters: Mutex<HashMap<String, MatchCounts>>,
    groups: HashMap<String, u32>,
    pending_groups: HashMap<String, u32>,
    /// Volume claims of placed workloads: the nodes using each, with how many workloads there.
    claims: HashMap<ObjectRef, Vec<(NodeId, u32)>>,
    /// Sequence number of the next node change.
    change_seq: u64,
    /// Node slots that changed, the last one at `change_seq - 1`.
    changes: VecDeque<NodeId>,
    /// Bumped when slots are added, so per-class caches know to grow.
    slots_epoch: u64,
}

impl Clone for Snapshot {
    fn clone(&self) -> Self {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        Snapshot {
            id: next_snapshot_id(),
            nodes: self.nodes.clone(),
            by_name: self.by_name.clone(),
            free_slots: self.free_slots.clone(),
            live: self.live,
            placed: self.placed.clone(),
            topology: self.topology.clone(),
            anti_terms: self
                .anti_terms
                .iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        ExistingTerm {
                            what: t.what.clone(),
                            topology_key: t.topology_key.clone(),
                            per_node: t.per_node.clone(),
                            total: t.total,
                        },
                    )
                })
                .collect(),
            counters: Mutex::new(
                counters
                    .iter()
                    .map(|(k, c)| {
                        (k.clone(), MatchCounts { what: c.what.clone(), per_node: c.per_node.clone(), total: c.total })
                    })
                    .collect(),
            ),
            groups: self.groups.clone(),
            pending_groups: self.pending_groups.clone(),
            claims: self.claims.clone(),
            change_seq: self.change_seq,
            changes: self.changes.clone(),
            slots_epoch: self.slots_epoch,
        }
    }
}

fn next_snapshot_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            id: next_snapshot_id(),
            nodes: Vec::new(),
            by_name: HashMap::new(),
            free_slots: Vec::new(),
            live: 0,
            placed: hashbrown::HashMap::new(),
            topology: HashMap::new(),
            anti_terms: HashMap::new(),
            counters: Mutex::new(HashMap::new()),
            groups: HashMap::new(),
            pending_groups: HashMap::new(),
            claims: HashMap::new(),
            change_seq: 0,
            changes: VecDeque::new(),
            slots_epoch: 0,
        }
    }
}

impl Snapshot {
    /// An empty cluster.
    pub fn new() -> Self {
        Snapshot::default()
    }

    /// This snapshot's identity (a clone has another).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Number of live nodes.
    pub fn node_count(&self) -> usize {
        self.live
    }

    /// Number of node slots (live or free); node ids are below it.
    pub fn slots(&self) -> usize {
        self.nodes.len()
    }

    /// A node by slot, if live.
    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes.get(id as usize).and_then(Option::as_ref)
    }

    /// A node slot by name.
    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).copied()
    }

    /// Every live node.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> + '_ {
        self.nodes.iter().filter_map(Option::as_ref)
    }

    /// A placed (bound or assumed) workload.
    pub fn placed(&self, key: &ObjectRef) -> Option<&Placed> {
        self.placed.get(key)
    }

    /// Every placed workload.
    pub fn placed_workloads(&self) -> impl Iterator<Item = &Placed> + '_ {
        self.placed.values()
    }

    /// Number of placed workloads.
    pub fn placed_count(&self) -> usize {
        self.placed.len()
    }

    /// The domains of a node label key; `None` when no node ever had it.
    pub fn topology(&self, key: &str) -> Option<&Topology> {
        self.topology.get(key)
    }

    /// Required anti-affinity terms of placed workloads.
    pub fn existing_anti_affinity(&self) -> impl Iterator<Item = &ExistingTerm> + '_ {
        self.anti_terms.values()
    }

    /// Placed workloads of a gang (bound or assumed).
    pub fn group_placed(&self, group: &str) -> u32 {
        self.groups.get(group).copied().unwrap_or(0)
    }

    /// The nodes where placed workloads (bound or assumed) use the volume claim `claim`, with how
    /// many workloads on each; empty when none does.
    pub fn claim_users(&self, claim: &ObjectRef) -> &[(NodeId, u32)] {
        self.claims.get(claim).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every volume claim placed workloads use, with the nodes using it.
    pub fn claims_in_use(&self) -> impl Iterator<Item = (&ObjectRef, &[(NodeId, u32)])> + '_ {
        self.claims.iter().map(|(k, v)| (k, v.as_slice()))
    }

    /// Members of a gang waiting to be scheduled.
    pub fn group_pending(&self, group: &str) -> u32 {
        self.pending_groups.get(group).copied().unwrap_or(0)
    }

    /// Sequence number of the next node change; see [`Snapshot::changes_since`].
    pub fn change_seq(&self) -> u64 {
        self.change_seq
    }

    /// Bumped whenever node slots are added.
    pub fn slots_epoch(&self) -> u64 {
        self.slots_epoch
    }

    /// Node slots changed since `seq` (possibly repeated), or `None` when the log no longer
    /// reaches back that far (recompute everything).
    pub fn changes_since(&self, seq: u64) -> Option<impl Iterator<Item = NodeId> + '_> {
        let first = self.change_seq - self.changes.len() as u64;
        if seq < first || seq > self.change_seq {
            return None;
        }
        Some(self.changes.iter().skip((seq - first) as usize).copied())
    }

    fn touch(&mut self, id: NodeId) {
        self.changes.push_back(id);
        self.change_seq += 1;
        if self.changes.len() > LOG_LIMIT {
            self.changes.pop_front();
        }
    }

    /// Calls `f` with per-node counts of placed workloads matching `what`, starting to maintain
    /// them on first use.
    pub fn with_counts<R>(&self, what: &WorkloadMatch, f: impl FnOnce(&MatchCounts) -> R) -> R {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let key = what.key();
        let c = counters.entry(key).or_insert_with(|| {
            let mut per_node = vec![0u32; self.nodes.len()];
            let mut total = 0;
            for p in self.placed.values() {
                if what.matches(&p.info) {
                    per_node[p.placement.node as usize] += 1;
                    total += 1;
                }
            }
            MatchCounts { what: what.clone(), per_node, total }
        });
        f(c)
    }

    /// Adds a node, or refreshes it when one of that name exists. Returns its slot.
    pub fn upsert_node(&mut self, node: &Object<Node>) -> NodeId {
        if let Some(&id) = self.by_name.get(node.metadata.name.as_str()) {
            let devices_changed = self.nodes[id as usize].as_mut().is_some_and(|n| n.refresh(node));
            if devices_changed {
                self.repick_devices(id);
            }
            self.index_labels(id);
            self.touch(id);
            return id;
        }
        let id = match self.free_slots.pop() {
            Some(id) => id,
            None => {
                self.nodes.push(None);
                self.slots_epoch += 1;
                let n = self.nodes.len();
                let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
                for c in counters.values_mut() {
                    c.per_node.resize(n, 0);
                }
                for t in self.anti_terms.values_mut() {
                    t.per_node.resize(n, 0);
                }
                (n - 1) as NodeId
            }
        };
        let info = NodeInfo::from_node(id, node);
        self.by_name.insert(info.name.clone(), id);
        self.nodes[id as usize] = Some(info);
        self.live += 1;
        self.index_labels(id);
        self.touch(id);
        id
    }

    /// After a node's device list changed: hands out shares again on the new set, and records
    /// them in each placement (a workload that no longer fits any device keeps no share).
    fn repick_devices(&mut self, id: NodeId) {
        let Some(node) = self.nodes[id as usize].as_mut() else { return };
        let keys: Vec<ObjectRef> = node.workloads.iter().map(|w| w.key.clone()).collect();
        for key in keys {
            let gpu = node.workloads.iter().find(|w| w.key == key).map_or(0, |w| w.request(GPU));
            let shares = node.pick_devices(gpu).unwrap_or_default();
            for s in &shares {
                node.devices[s.device as usize].free -= s.milli;
            }
            if let Some(p) = self.placed.get_mut(&key) {
                p.placement.devices = shares;
            }
        }
    }

    fn index_labels(&mut self, id: NodeId) {
        let Some(node) = self.nodes[id as usize].as_ref() else { return };
        for (k, t) in self.topology.iter_mut() {
            t.set(id, node.labels.get(k).map(String::as_str));
        }
        for (k, v) in node.labels.iter() {
            if !self.topology.contains_key(k) {
                let mut t = Topology::default();
                t.set(id, Some(v));
                self.topology.insert(k.clone(), t);
            }
        }
    }

    /// Removes a node; the workloads placed on it are removed too and returned.
    pub fn remove_node(&mut self, name: &str) -> Vec<Placed> {
        let Some(id) = self.by_name.remove(name) else { return Vec::new() };
        let keys: Vec<ObjectRef> = self.nodes[id as usize]
            .as_ref()
            .map(|n| n.workloads.iter().map(|w| w.key.clone()).collect())
            .unwrap_or_default();
        let removed = keys.iter().filter_map(|k| self.forget(k)).collect();
        for t in self.topology.values_mut() {
            t.set(id, None);
        }
        self.nodes[id as usize] = None;
        self.free_slots.push(id);
        self.live -= 1;
        self.touch(id);
        removed
    }

    /// Places a workload (assumed or bound). A workload already placed is moved.
    pub fn place(&mut self, info: Arc<WorkloadInfo>, placement: Placement, assumed: bool) {
        self.forget(&info.key);
        let id = placement.node;
        let Some(node) = self.nodes.get_mut(id as usize).and_then(Option::as_mut) else { return };
        node.take(&info, &placement.devices);
        {
            let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            for c in counters.values_mut() {
                if c.what.matches(&info) {
                    c.per_node[id as usize] += 1;
                    c.total += 1;
                }
            }
        }
        if let Some(anti) = info.spec().affinity.as_ref().and_then(|a| a.workload_anti_affinity.as_ref()) {
            for term in &anti.required {
                let what = WorkloadMatch::of_term(term, info.namespace());
                let key = format!("{}|{}", what.key(), term.topology_key);
                let n = self.nodes.len();
                let e = self.anti_terms.entry(key).or_insert_with(|| ExistingTerm {
                    what,
                    topology_key: term.topology_key.clone(),
                    per_node: vec![0; n],
                    total: 0,
                });
                e.per_node[id as usize] += 1;
                e.total += 1;
            }
        }
        if let Some(g) = info.group_key() {
            *self.groups.entry(g).or_default() += 1;
        }
        for c in &info.claims {
            let users = self.claims.entry(ObjectRef::new(info.namespace(), c.as_str())).or_default();
            match users.iter_mut().find(|(n, _)| *n == id) {
                Some((_, count)) => *count += 1,
                None => users.push((id, 1)),
            }
        }
        self.placed.insert(info.key.clone(), Placed { info, placement, assumed });
        self.touch(id);
    }

    /// Swaps in a newer digest of a placed workload that counts the same on its node (made by
    /// [`WorkloadInfo::refreshed`]), and marks it bound in the store: requests, ports, claims,
    /// devices and every count stay as they are.
    pub fn refresh(&mut self, info: Arc<WorkloadInfo>) {
        let Some(p) = self.placed.get_mut(&info.key) else { return };
        let id = p.placement.node;
        p.info = info.clone();
        p.assumed = false;
        if let Some(node) = self.nodes.get_mut(id as usize).and_then(Option::as_mut)
            && let Some(slot) = node.workloads.iter_mut().find(|w| w.key == info.key)
        {
            *slot = info;
        }
        self.touch(id);
    }

    /// Marks an assumed placement as bound in the store.
    pub fn confirm(&mut self, key: &ObjectRef) {
        if let Some(p) = self.placed.get_mut(key) {
            p.assumed = false;
        }
    }

    /// Removes a placed workload (deleted, finished, evicted, or an assumption rolled back).
    pub fn forget(&mut self, key: &ObjectRef) -> Option<Placed> {
        let p = self.placed.remove(key)?;
        let id = p.placement.node;
        if let Some(node) = self.nodes.get_mut(id as usize).and_then(Option::as_mut) {
            node.release(&p.info, &p.placement.devices);
        }
        {
            let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            for c in counters.values_mut() {
                if c.what.matches(&p.info) {
                    c.per_node[id as usize] -= 1;
                    c.total -= 1;
                }
            }
        }
        if let Some(anti) = p.info.spec().affinity.as_ref().and_then(|a| a.workload_anti_affinity.as_ref()) {
            for term in &anti.required {
                let what = WorkloadMatch::of_term(term, p.info.namespace());
                let key = format!("{}|{}", what.key(), term.topology_key);
                if let Some(e) = self.anti_terms.get_mut(&key) {
                    e.per_node[id as usize] -= 1;
                    e.total -= 1;
                    if e.total == 0 {
                        self.anti_terms.remove(&key);
                    }
                }
            }
        }
        if let Some(g) = p.info.group_key()
            && let Some(n) = self.groups.get_mut(&g)
        {
            *n -= 1;
            if *n == 0 {
                self.groups.remove(&g);
            }
        }
        for c in &p.info.claims {
            let key = ObjectRef::new(p.info.namespace(), c.as_str());
            if let Some(users) = self.claims.get_mut(&key) {
                if let Some(i) = users.iter().position(|(n, _)| *n == id) {
                    users[i].1 -= 1;
                    if users[i].1 == 0 {
                        users.swap_remove(i);
                    }
                }
                if users.is_empty() {
                    self.claims.remove(&key);
                }
            }
        }
        self.touch(id);
        Some(p)
    }

    /// Counts a pending gang member in (`+1`) or out (`-1`).
    pub fn note_pending(&mut self, info: &WorkloadInfo, delta: i32) {
        let Some(g) = info.group_key() else { return };
        let e = self.pending_groups.entry(g.clone()).or_default();
        *e = e.saturating_add_signed(delta);
        if *e == 0 {
            self.pending_groups.remove(&g);
        }
    }

    /// Checks that `info` fits `node` on resources, devices and ports (the invariant every
    /// placement must keep, whatever scheduler made it). Returns the device shares it would take.
    pub fn check_fit(&self, info: &WorkloadInfo, node: NodeId) -> Result<Vec<DeviceShare>, String> {
        let n = self.node(node).ok_or_else(|| format!("node slot {node} does not exist"))?;
        if n.workloads.len() as u32 >= n.max_workloads {
            return Err(format!("node {} is full ({} workloads)", n.name, n.max_workloads));
        }
        for &(d, m) in &info.requests {
            if n.free(d) < m {
                return Err(format!("insufficient {} on node {}", resource_name(d), n.name));
            }
        }
        for p in &info.host_ports {
            if n.port_in_use(*p) {
                return Err(format!("host port {} in use on node {}", p.1, n.name));
            }
        }
        n.pick_devices(info.request(GPU)).ok_or_else(|| format!("no GPU device on node {} has room", n.name))
    }
}

/// True when `taint` has an effect that keeps new workloads off (`NoSchedule`, `NoExecute`).
pub fn taint_blocks_scheduling(taint: &Taint) -> bool {
    matches!(taint.effect, TaintEffect::NoSchedule | TaintEffect::NoExecute)
}

/// The workload (anti-)affinity of a spec, when set.
pub fn workload_affinity(w: &Workload) -> (Option<&WorkloadAffinity>, Option<&WorkloadAffinity>) {
    match &w.affinity {
        Some(a) => (a.workload_affinity.as_ref(), a.workload_anti_affinity.as_ref()),
        None => (None, None),
    }
}
