//! Node provisioning: when workloads fit on no node, ask a [`NodeProvider`] for new nodes shaped
//! by [`NodePool`]s; give back the nodes of a pool that stay empty.
//!
//! The [`Provisioner`] runs in a [`Manager`](orch_core::Manager) beside the scheduler, and only while
//! that manager leads (its writes carry the leader's fencing token). Each pass:
//! 1. **Registration.** A node it launched whose agent has registered (`Ready`) first gets the
//!    waiting workloads the plan puts there, bound by the provisioner itself, and is then opened
//!    for scheduling: the scheduler cannot hand a node asked for a big workload to small ones
//!    first. One that has not registered within `launch_timeout` is terminated and deleted.
//! 2. **Scale up.** The workloads the scheduler marked `Unschedulable` are placed, in the
//!    scheduler's order, on a copy of the cluster that also holds the nodes still launching,
//!    with the scheduler's own plugins (resources, devices, ports, taints, node selectors,
//!    affinity, spread). A workload that fits nowhere gets a new node of the first pool, in the
//!    order given, that is under its limit and on which it would fit; the workloads after it fill
//!    the new nodes before more are asked for. Each new node is created in the store first
//!    (cordoned, labelled with its pool, marked as launching), then launched: the store holds the
//!    intent, so a pass after a crash or failover sees it and does not ask twice.
//! 3. **Scale down.** A node of a pool with `empty_after` that has run no workload for that long
//!    is cordoned, checked empty again, terminated and deleted.
//!
//! A [`NodeProvider`] is the one part that knows about machines: a cloud's API, a pool of
//! spare hosts, or `orch_runtime::LocalNodes`, which starts each node as an agent in this process (the
//! simulated runtime uses it to grow a simulated cluster).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use orch_core::api::{Api, ListParams};
use orch_core::backoff::Backoff;
use orch_core::cache::Cache;
use orch_core::cache::CacheRegistry;
use orch_core::error::{Error, Result};

use crate::error::ProvisionerError;
use orch_core::kinds::{Condition, ConditionStatus, Node, Phase, Workload, find_condition};
use orch_core::meta::{Clock, ObjectMeta, Timestamp, TokioClock};
use orch_core::object::Object;
use orch_core::provider::{NodePool, NodeProvider, POOL_LABEL};
use orch_core::runnable::{Leadership, RunParts, Runnable};
use orch_core::selector::FieldSelector;
use orch_core::store::{DeleteOptions, Guard, Store};
use orch_scheduler::snapshot::{Placement, Snapshot, WorkloadInfo};
use orch_scheduler::{
    DEFAULT_SCHEDULER, Decision, Framework, Profile, SCHEDULED_CONDITION, Scheduler, devices_annotation,
};

/// Present on a provisioned node from its creation until its agent registers; the node stays
/// cordoned meanwhile. Its value is the time the node was asked for (ms since the epoch).
pub const LAUNCHING_ANNOTATION: &str = "node.orch.dev/launching";

/// Present on a provisioned node the provisioner has cordoned to give it back; a pass that
/// finds a workload there after all opens it again.
pub const SCALING_DOWN_ANNOTATION: &str = "node.orch.dev/scaling-down";

/// The node object of a new node of this pool, as the provisioner creates it: labelled,
/// tainted, cordoned and marked as launching.
fn new_node(pool: &NodePool, name: &str, now: Timestamp) -> Object<Node> {
    let mut meta = ObjectMeta::named(name);
    meta.labels = pool.labels.clone();
    meta.labels.insert(POOL_LABEL, pool.name.clone());
    meta.annotations.insert(LAUNCHING_ANNOTATION, now.as_millis().to_string());
    Object::new(meta, Node { unschedulable: true, taints: pool.taints.clone(), provider_id: None })
}

/// A node of this pool as it will be once its agent registers: what the scale-up pass
/// places workloads on.
fn registered(pool: &NodePool, name: &str) -> Object<Node> {
    let mut node = new_node(pool, name, Timestamp(0));
    node.metadata.annotations.remove(LAUNCHING_ANNOTATION);
    node.spec.unschedulable = false;
    node.status.capacity = pool.capacity.clone();
    node.status.allocatable = pool.capacity.clone();
    node
}

/// Settings of the [`Provisioner`].
#[derive(Debug, Clone)]
pub struct ProvisionerConfig {
    /// Time between passes (default 2 s).
    pub interval: Duration,
    /// A launched node that has not registered after this long is terminated (default 10 min).
    pub launch_timeout: Duration,
    /// After a failed launch, the pool is passed over this long, doubling with each failure in
    /// a row up to 32 times (default 10 s); a launch that succeeds resets it.
    pub launch_backoff: Duration,
    /// The scheduler whose unschedulable workloads it provisions for (default
    /// `default-scheduler`).
    pub scheduler_name: String,
}

impl Default for ProvisionerConfig {
    fn default() -> Self {
        ProvisionerConfig {
            interval: Duration::from_secs(2),
            launch_timeout: Duration::from_secs(600),
            launch_backoff: Duration::from_secs(10),
            scheduler_name: DEFAULT_SCHEDULER.to_string(),
        }
    }
}

/// What one pass did, for tests and logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Nodes asked for, by name.
    pub launched: Vec<String>,
    /// Launching nodes that registered and were opened for scheduling.
    pub registered: Vec<String>,
    /// Nodes given back (empty too long) or abandoned (did not register in time).
    pub removed: Vec<String>,
    /// Nodes whose launch failed (their node objects are deleted again).
    pub failed: Vec<String>,
    /// Workloads for which no pool has a node they would fit on (or every such pool is full).
    pub unprovisionable: usize,
}

/// Asks for nodes when workloads fit nowhere and gives back nodes that stay empty (see the
/// [module documentation](self)). Add it to a [`Manager`](orch_core::Manager) with
/// [`Manager::add`](orch_core::Manager::add).
pub struct Provisioner {
    pools: Vec<NodePool>,
    provider: Arc<dyn NodeProvider>,
    profile: Profile,
    config: ProvisionerConfig,
    clock: Arc<dyn Clock>,
    /// `with_clock` was called: the manager's clock does not replace it.
    clock_set: bool,
    /// Since when each provisioned node has been seen empty.
    empty_since: HashMap<String, Instant>,
    /// Pools whose last launch failed: passed over until the instant, with the failures in a row.
    backoff: HashMap<String, (Instant, u32)>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner").field("pools", &self.pools).field("config", &self.config).finish()
    }
}

impl Provisioner {
    /// A provisioner for `pools` (tried in this order) that launches through `provider` and
    /// judges fit with the default plugins, scoring for bin-packing (most allocated), so the
    /// workloads it provides for fill the fewest new nodes.
    pub fn new(pools: Vec<NodePool>, provider: Arc<dyn NodeProvider>) -> Self {
        use orch_scheduler::plugins::{ScoringStrategy, default_profile};
        Provisioner {
            pools,
            provider,
            profile: default_profile(ScoringStrategy::MostAllocated),
            config: ProvisionerConfig::default(),
            clock: Arc::new(TokioClock::from_system_time()),
            clock_set: false,
            empty_since: HashMap::new(),
            backoff: HashMap::new(),
        }
    }

    /// Judges fit with `profile` (give it the scheduler's profile, so the two agree).
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    /// Replaces the settings.
    pub fn config(mut self, config: ProvisionerConfig) -> Self {
        self.config = config;
        self
    }

    /// Uses `clock` for launch times (default: the manager's clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self.clock_set = true;
        self
    }

    /// A launch of `pool` failed lately: it is passed over until its backoff is over.
    fn backing_off(&self, pool: &str) -> bool {
        self.backoff.get(pool).is_some_and(|(until, _)| Instant::now() < *until)
    }

    fn pool(&self, node: &Object<Node>) -> Option<&NodePool> {
        let name = node.metadata.labels.get(POOL_LABEL)?;
        self.pools.iter().find(|p| p.name == *name)
    }

    /// One pass over the cluster as `nodes` and `workloads` hold it; writes go through `store`
    /// fenced by `guard`.
    pub async fn pass(
        &mut self,
        store: &Arc<dyn Store>,
        guard: Option<Guard>,
        nodes: &[Arc<Object<Node>>],
        workloads: &[Arc<Object<Workload>>],
    ) -> Result<PassReport, ProvisionerError> {
        let api: Api<Node> = Api::all(store.clone()).fenced(guard.clone());
        let mut report = PassReport::default();
        let now = self.clock.now();
        let mut live: Vec<Arc<Object<Node>>> = Vec::with_capacity(nodes.len());
        let mut arrived: Vec<Arc<Object<Node>>> = Vec::new();
        for node in nodes {
            let Some(pool) = self.pool(node).cloned() else {
                live.push(node.clone());
                continue;
            };
            let Some(asked) = node.metadata.annotations.get(LAUNCHING_ANNOTATION) else {
                live.push(node.clone());
                continue;
            };
            let name = node.metadata.name.clone();
            if is_ready(node) {
                // Opened below, once what was asked for it is bound there.
                arrived.push(node.clone());
                live.push(node.clone());
                continue;
            }
            let asked = Timestamp(asked.parse().unwrap_or(0));
            if now.since(asked) >= self.config.launch_timeout {
                tracing::warn!(node = %name, pool = %pool.name, "provisioned node did not register in time");
                self.provider
                    .terminate(&name, &pool)
                    .await
                    .map_err(|source| ProvisionerError::Terminate { node: name.clone(), source })?;
                delete_node(&api, &name).await?;
                report.removed.push(name);
                continue;
            }
            live.push(node.clone());
        }
        let planned = self.scale_up(&api, &live, &arrived, workloads, &mut report).await?;
        // The workloads a node was asked for are bound there before anything else may land on
        // it, so the scheduler cannot give a node planned for a big workload to small ones.
        for (w, node_name, devices) in planned {
            let workloads =
                Api::<Workload>::namespaced(store.clone(), w.metadata.namespace.clone()).fenced(guard.clone());
            let mut next = (*w).clone();
            next.spec.node_name = Some(node_name);
            if let Some(text) = devices {
                next.metadata.annotations.insert(orch_scheduler::DEVICES_ANNOTATION, text);
            }
            match workloads.replace(&next).await {
                Ok(_) => {}
                // Bound or changed meanwhile: the scheduler has it.
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(e.into()),
            }
        }
        for node in arrived {
            let open = opened(&node, LAUNCHING_ANNOTATION);
            match api.replace(&open).await {
                Ok(_) => report.registered.push(open.metadata.name.clone()),
                // Changed meanwhile: the next pass looks again.
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
            tracing::info!(node = %open.metadata.name, "provisioned node registered");
        }
        self.scale_down(store, &api, &live, workloads, &mut report).await?;
        Ok(report)
    }

    /// Asks for the nodes the waiting workloads need; returns the workloads placed on `arrived`
    /// nodes (registered, not yet opened), with the node and the device shares to bind them with.
    async fn scale_up(
        &mut self,
        api: &Api<Node>,
        nodes: &[Arc<Object<Node>>],
        arrived: &[Arc<Object<Node>>],
        workloads: &[Arc<Object<Workload>>],
        report: &mut PassReport,
    ) -> Result<Vec<Planned>, ProvisionerError> {
        let mut pending: Vec<&Arc<Object<Workload>>> = workloads.iter().filter(|w| self.waits_for_a_node(w)).collect();
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        // Higher priority first, as the scheduler does; within a priority the largest first
        // (first-fit decreasing packs tighter than arrival order), then first come.
        let request = |w: &Object<Workload>, name: &str| -> i64 {
            w.spec.containers.iter().filter_map(|c| c.resources.requests.get(name)).map(|q| q.milli_ceil()).sum()
        };
        pending.sort_by_key(|w| {
            let size = (request(w, orch_core::kinds::resource::CPU), request(w, orch_core::kinds::resource::MEMORY));
            (-(w.spec.priority as i64), std::cmp::Reverse(size), w.metadata.create_revision)
        });
        // The cluster as it will be: nodes still launching count as registered.
        let mut sim = Snapshot::new();
        let mut per_pool: HashMap<String, usize> = HashMap::new();
        for node in nodes {
            match self.pool(node) {
                Some(pool) => {
                    *per_pool.entry(pool.name.clone()).or_default() += 1;
                    if arrived.iter().any(|a| a.metadata.name == node.metadata.name) {
                        // Registered: as its agent reports it, open.
                        sim.upsert_node(&opened(node, LAUNCHING_ANNOTATION));
                    } else if node.metadata.annotations.contains_key(LAUNCHING_ANNOTATION) {
                        sim.upsert_node(&registered(pool, &node.metadata.name));
                    } else {
                        sim.upsert_node(node);
                    }
                }
                None => {
                    sim.upsert_node(node);
                }
            }
        }
        let mut seq = 0u64;
        for w in workloads {
            let Some(node) = &w.spec.node_name else { continue };
            if matches!(w.status.phase, Phase::Succeeded | Phase::Failed) {
                continue;
            }
            let Some(id) = sim.node_id(node) else { continue };
            seq += 1;
            let info = Arc::new(WorkloadInfo::new(w.clone(), seq));
            // On the devices its annotation names, as the scheduler counts it.
            let gpu = info.request(orch_scheduler::snapshot::GPU);
            let devices = sim
                .node(id)
                .and_then(|n| orch_scheduler::parse_devices(n, w, gpu).or_else(|| n.pick_devices(gpu)))
                .unwrap_or_default();
            sim.place(info, Placement { node: id, node_name: Arc::from(node.as_str()), devices }, false);
        }
        // First fit: among the nodes a workload fits, the earliest in a fixed order (the
        // cluster's nodes, then those launching, oldest first, then the new ones), so a pass
        // that sees the nodes an earlier one asked for packs the same way and asks for no more.
        let ranks = Arc::new(Mutex::new(HashMap::new()));
        {
            let mut ranks = ranks.lock().unwrap_or_else(|e| e.into_inner());
            let mut order: Vec<&Arc<Object<Node>>> = nodes.iter().collect();
            order.sort_by_key(|n| {
                let launching = n.metadata.annotations.contains_key(LAUNCHING_ANNOTATION);
                (launching, launching.then_some(n.metadata.create_revision), n.metadata.name.clone())
            });
            for (i, n) in order.into_iter().enumerate() {
                ranks.insert(n.metadata.name.clone(), i as i64);
            }
        }
        let mut framework = Framework::new(self.profile.clone().with(FirstFit(ranks.clone()), FIRST_FIT_WEIGHT));
        let mut new_nodes: Vec<(String, NodePool)> = Vec::new();
        let mut planned = Vec::new();
        for w in pending {
            seq += 1;
            let info = Arc::new(WorkloadInfo::new(w.clone(), seq));
            if let Some(placement) = fits(&mut framework, &sim, &info) {
                if arrived.iter().any(|a| *a.metadata.name == *placement.node_name) {
                    let devices = (!placement.devices.is_empty())
                        .then(|| sim.node(placement.node).map(|n| devices_annotation(n, &placement.devices)))
                        .flatten();
                    planned.push((w.clone(), placement.node_name.to_string(), devices));
                }
                sim.place(info, placement, true);
                continue;
            }
            let mut placed = false;
            for pool in &self.pools {
                let count = per_pool.get(&pool.name).copied().unwrap_or(0);
                if count >= pool.max_nodes || self.backing_off(&pool.name) {
                    continue;
                }
                let name = format!("{}-{}", pool.name, &uuid::Uuid::new_v4().simple().to_string()[..10]);
                sim.upsert_node(&registered(pool, &name));
                {
                    let mut ranks = ranks.lock().unwrap_or_else(|e| e.into_inner());
                    let next = ranks.len() as i64;
                    ranks.insert(name.clone(), next);
                }
                match fits(&mut framework, &sim, &info) {
                    Some(placement) if *placement.node_name == *name => {
                        sim.place(info.clone(), placement, true);
                        per_pool.insert(pool.name.clone(), count + 1);
                        new_nodes.push((name, pool.clone()));
                        placed = true;
                        break;
                    }
                    _ => {
                        sim.remove_node(&name);
                        ranks.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
                    }
                }
            }
            if !placed {
                report.unprovisionable += 1;
            }
        }
        let now = self.clock.now();
        for (name, pool) in new_nodes {
            if self.backing_off(&pool.name) {
                // A launch of this pool just failed: the rest waits for a later pass.
                continue;
            }
            // The intent first: a pass after a crash or a failover sees the node and counts it.
            api.create(&new_node(&pool, &name, now)).await?;
            match self.provider.launch(&name, &pool).await {
                Ok(provider_id) => {
                    if let Ok(mut node) = api.get(&name).await {
                        node.spec.provider_id = Some(provider_id);
                        match api.replace(&node).await {
                            Ok(_) => {}
                            // The agent registered meanwhile; the id is a courtesy.
                            Err(e) if e.is_conflict() => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    tracing::info!(node = %name, pool = %pool.name, "node launched");
                    self.backoff.remove(&pool.name);
                    report.launched.push(name);
                }
                Err(e) => {
                    let failures = self.backoff.get(&pool.name).map_or(0, |(_, n)| *n) + 1;
                    let wait =
                        Backoff::new(self.config.launch_backoff, self.config.launch_backoff * 32).delay(failures);
                    tracing::warn!(node = %name, pool = %pool.name, error = %e, ?wait, "node launch failed; pool passed over meanwhile");
                    self.backoff.insert(pool.name.clone(), (Instant::now() + wait, failures));
                    report.failed.push(name.clone());
                    let _ = self.provider.terminate(&name, &pool).await;
                    delete_node(api, &name).await?;
                }
            }
        }
        Ok(planned)
    }

    async fn scale_down(
        &mut self,
        store: &Arc<dyn Store>,
        api: &Api<Node>,
        nodes: &[Arc<Object<Node>>],
        workloads: &[Arc<Object<Workload>>],
        report: &mut PassReport,
    ) -> Result<(), ProvisionerError> {
        let mut busy: HashMap<&str, usize> = HashMap::new();
        for w in workloads {
            if let Some(node) = &w.spec.node_name
                && !matches!(w.status.phase, Phase::Succeeded | Phase::Failed)
            {
                *busy.entry(node.as_str()).or_default() += 1;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for node in nodes {
            let Some(pool) = self.pool(node).cloned() else { continue };
            let (Some(after), name) = (pool.empty_after, node.metadata.name.clone()) else { continue };
            if node.metadata.annotations.contains_key(LAUNCHING_ANNOTATION) {
                continue;
            }
            seen.insert(name.clone());
            if busy.contains_key(name.as_str()) {
                self.empty_since.remove(&name);
                // Cordoned by a scale-down that found a workload there: open it again (until
                // that write lands, every pass tries).
                if node.metadata.annotations.contains_key(SCALING_DOWN_ANNOTATION) {
                    match api.replace(&opened(node, SCALING_DOWN_ANNOTATION)).await {
                        Ok(_) => {}
                        Err(e) if e.is_conflict() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            let since = *self.empty_since.entry(name.clone()).or_insert_with(Instant::now);
            if since.elapsed() < after {
                continue;
            }
            // Cordon first, so nothing new lands, then look again at what is bound there.
            let mut cordoned = (**node).clone();
            cordoned.spec.unschedulable = true;
            cordoned.metadata.annotations.insert(SCALING_DOWN_ANNOTATION, "true");
            match api.replace(&cordoned).await {
                Ok(_) => {}
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
            let on_node =
                ListParams { fields: FieldSelector::equals("spec.nodeName", name.clone()), ..Default::default() };
            let bound = Api::<Workload>::all(store.clone()).list(&on_node).await?;
            if bound.items.iter().any(|w| !matches!(w.status.phase, Phase::Succeeded | Phase::Failed)) {
                // Something landed meanwhile: the next pass sees it busy and opens it again.
                self.empty_since.remove(&name);
                continue;
            }
            tracing::info!(node = %name, pool = %pool.name, "giving back a node that stayed empty");
            self.provider
                .terminate(&name, &pool)
                .await
                .map_err(|source| ProvisionerError::Terminate { node: name.clone(), source })?;
            delete_node(api, &name).await?;
            self.empty_since.remove(&name);
            report.removed.push(name);
        }
        self.empty_since.retain(|name, _| seen.contains(name));
        Ok(())
    }

    /// Unbound, not being deleted, for our scheduler, and marked as fitting nowhere.
    fn waits_for_a_node(&self, w: &Object<Workload>) -> bool {
        let ours = w.spec.scheduler_name.as_deref().unwrap_or(DEFAULT_SCHEDULER) == self.config.scheduler_name;
        ours && w.spec.node_name.is_none()
            && w.metadata.deletion_timestamp.is_none()
            && find_condition(&w.status.conditions, SCHEDULED_CONDITION)
                .is_some_and(|c| c.status == ConditionStatus::False && c.reason == "Unschedulable")
    }

    async fn serve(
        mut self,
        store: Arc<dyn Store>,
        nodes: Cache<Node>,
        workloads: Cache<Workload>,
        leader: watch::Receiver<Leadership>,
        mut stop: watch::Receiver<bool>,
    ) {
        tokio::select! {
            _ = futures::future::join(nodes.ready(), workloads.ready()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        loop {
            let guard = match &*leader.borrow() {
                Leadership::Leading(g) => Some(g.clone()),
                Leadership::Standby => None,
            };
            if let Some(guard) = guard {
                match self.pass(&store, guard, &nodes.list(), &workloads.list()).await {
                    Ok(report) => {
                        metrics::counter!("orch_provisioner_launched_total").increment(report.launched.len() as u64);
                        metrics::counter!("orch_provisioner_removed_total").increment(report.removed.len() as u64);
                    }
                    Err(e) => tracing::warn!(error = %e, "provisioner pass failed; trying again next pass"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            }
        }
    }
}

impl Runnable for Provisioner {
    fn name(&self) -> &str {
        "provisioner"
    }

    fn prepare(&mut self, caches: &CacheRegistry, store: &Arc<dyn Store>) {
        caches.get_or_start::<Node>(store);
        caches.get_or_start::<Workload>(store);
    }

    fn run(self: Box<Self>, parts: RunParts) -> BoxFuture<'static, ()> {
        let RunParts { store, caches, leader, shutdown, clock, .. } = parts;
        let (nodes, workloads) = (caches.get_or_start::<Node>(&store), caches.get_or_start::<Workload>(&store));
        let mut this = *self;
        if !this.clock_set {
            this.clock = clock;
        }
        this.serve(store, nodes, workloads, leader, shutdown).boxed()
    }
}

/// A waiting workload to bind to a node that has just registered: the workload, the node, and
/// its device shares as annotation text.
type Planned = (Arc<Object<Workload>>, String, Option<String>);

/// Outweighs every other score: the earliest node that fits wins.
const FIRST_FIT_WEIGHT: i64 = 1_000;

/// Scores nodes by their rank in the provisioner's order, earliest highest.
struct FirstFit(Arc<Mutex<HashMap<String, i64>>>);

impl orch_scheduler::Plugin for FirstFit {
    fn name(&self) -> &str {
        "ProvisionerFirstFit"
    }

    fn points(&self) -> orch_scheduler::Points {
        orch_scheduler::Points::SCORE
    }

    fn score(&self, _cx: &orch_scheduler::Ctx<'_>, node: &orch_scheduler::NodeInfo) -> i64 {
        let ranks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        1_000_000 - ranks.get(&*node.name).copied().unwrap_or(999_999).min(999_999)
    }
}

/// Where `framework` would place `info` in `sim`, if anywhere.
fn fits(framework: &mut Framework, sim: &Snapshot, info: &WorkloadInfo) -> Option<Placement> {
    match framework.schedule(sim, info) {
        Decision::Place(p) | Decision::Wait { placement: p, .. } => Some(p),
        Decision::Preempt { .. } | Decision::Unschedulable(_) => None,
    }
}

/// `node` open for scheduling, without the provisioner's `mark` that kept it cordoned.
fn opened(node: &Object<Node>, mark: &str) -> Object<Node> {
    let mut open = node.clone();
    open.metadata.annotations.remove(mark);
    open.spec.unschedulable = false;
    open
}

fn is_ready(node: &Object<Node>) -> bool {
    find_condition(&node.status.conditions, "Ready").is_some_and(|c: &Condition| c.status == ConditionStatus::True)
}

async fn delete_node(api: &Api<Node>, name: &str) -> Result<()> {
    match api.delete(name, &DeleteOptions::default()).await {
        Ok(_) | Err(Error::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}
