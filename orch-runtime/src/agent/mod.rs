//! The node agent: registers its node, keeps a heartbeat lease, and makes the runtime run the
//! workloads bound to its node, restarting them per their restart policy with crash-loop backoff.
//!
//! It reconciles against what really runs (the runtime's own list and states), not against its
//! memory, so after an agent restart it adopts running instances instead of restarting them.
//!
//! It makes each workload's volumes available before starting it (see `volumes`): claims
//! through the volume provider of their class on this node (`local` by default), which the node
//! advertises in `status.storage`; it reclaims the volumes of its node being deleted, and evicts
//! workloads whose `emptyDir` grows past its size limit.

mod config;
mod error;
mod heartbeat;
mod ports;
mod probes;
mod sync;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_core::VolumeProvider;
use orch_core::cache::{Cache, CacheConfig, ObjectRef};
use orch_core::controller::queue::{QueueConfig, WorkQueue};
use orch_core::kinds::{ContainerStatus, Phase, Workload};
use orch_core::meta::{Clock, TokioClock};
use orch_core::object::{Object, Resource};
use orch_core::runtime::{Handle, InstanceState, Runtime};
use orch_core::selector::FieldSelector;
use orch_core::store::{Selection, Store};
use tokio::time::Instant;

pub use config::{AgentConfig, DEFAULT_PORT_RANGE};
pub use error::AgentError;
pub use heartbeat::SharedRenewals;
use probes::Health;
use sync::Tracked;

/// The agent's records, by (workload, container).
type Instances = HashMap<(ObjectRef, String), Tracked>;

/// A node agent over a store and a runtime.
pub struct Agent {
    config: AgentConfig,
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    clock: Arc<dyn Clock>,
    instances: Arc<Mutex<Instances>>,
    /// The node's host ports and which workload holds each.
    ports: ports::Ports,
    /// When the agent first saw each workload it is waiting out the pre-stop delay of.
    terminating: Mutex<HashMap<ObjectRef, Instant>>,
    /// Probe results by instance id.
    health: Arc<Mutex<HashMap<String, Health>>>,
    /// A workload cache shared with other agents of this process, if any.
    shared: Option<Cache<Workload>>,
    /// A renewal task shared with other agents of this process, if any.
    renewals: Option<SharedRenewals>,
    /// The resource version of the status this agent last wrote, per workload, until the cache
    /// brings it back (that event needs no sync).
    written: Mutex<HashMap<ObjectRef, u64>>,
    /// Every task the agent starts while it runs (exit waiters, probe loops): all end with it,
    /// whether it stops or the task running it is aborted.
    spawned: Arc<Mutex<tokio::task::JoinSet<()>>>,
    /// Tells people when a container crash-loops (`BackOff` events); made on first use, on the
    /// agent's clock.
    recorder: std::sync::OnceLock<orch_core::events::Recorder>,
    /// The volume providers of this node, by volume class (`local` is added by `run` unless
    /// given).
    providers: BTreeMap<String, Arc<dyn VolumeProvider>>,
    /// The claim volumes published for each workload, kept on disk.
    publications: volumes::Publications,
    /// The workloads with `emptyDir` directories on this node.
    dirs: volumes::WorkloadDirs,
    /// Workloads found over an `emptyDir` size limit, or bound to a node their volume is not
    /// on, until their eviction is written.
    evictions: Mutex<HashMap<ObjectRef, Eviction>>,
    /// Held while claim volumes are looked up, created and published, and while a volume is
    /// reclaimed: a volume is never created again, or published, after its reclaim read it
    /// unused, nor deleted between a workload's read of it and its publish.
    volume_ops: tokio::sync::Mutex<()>,
}

/// A workload to evict: the incarnation (uid), why, and once its instances are stopped, their
/// last statuses.
#[derive(Debug, Clone)]
struct Eviction {
    uid: String,
    /// `Evicted` (over a size limit) or `VolumeNodeConflict` (its volume lives elsewhere).
    reason: &'static str,
    message: String,
    statuses: Option<Vec<ContainerStatus>>,
}

/// Aborts the agent's tasks when dropped: when [`Agent::run`] returns or is dropped mid-way.
struct AbortOnDrop(Arc<Mutex<tokio::task::JoinSet<()>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).abort_all();
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("node", &self.config.node_name).field("runtime", &self.runtime.name()).finish()
    }
}

/// The id of an instance: namespace, workload, container and attempt, dot-separated (none of
/// the first three may contain a dot except the workload name, which sits in the middle).
/// The first characters of a workload uid that go into its instance ids, so a workload deleted
/// and re-created under the same name never shares an instance id with its predecessor.
fn uid_tag(uid: &str) -> String {
    uid.chars().filter(char::is_ascii_alphanumeric).take(8).collect::<String>().to_ascii_lowercase()
}

/// `namespace.workload.container.uidtag-attempt`: only the workload name may contain dots, and
/// it sits in the middle.
fn instance_id(r: &ObjectRef, container: &str, uid: &str, attempt: u32) -> String {
    format!("{}.{}.{}.{}-{}", r.namespace, r.name, container, uid_tag(uid), attempt)
}

/// A workload's (namespace, name), borrowed.
fn named(r: &ObjectRef) -> (&str, &str) {
    (r.namespace.as_str(), r.name.as_str())
}

fn parse_instance_id(id: &str) -> Option<(ObjectRef, String, String, u32)> {
    let (ns, rest) = id.split_once('.')?;
    let (rest, last) = rest.rsplit_once('.')?;
    let (name, container) = rest.rsplit_once('.')?;
    let (tag, attempt) = last.rsplit_once('-')?;
    Some((ObjectRef::new(ns, name), container.to_string(), tag.to_string(), attempt.parse().ok()?))
}

/// The instances `runtime` runs (or ran and still keeps) for the workload `namespace/name`:
/// `(container, attempt, handle)`, by container, newest attempt last. What a node's log server
/// reads from.
pub async fn instances_of(
    runtime: &dyn Runtime,
    namespace: &str,
    name: &str,
) -> Result<Vec<(String, u32, Handle)>, orch_core::runtime::RuntimeError> {
    let mut out: Vec<(String, u32, Handle)> = runtime
        .list()
        .await?
        .into_iter()
        .filter_map(|h| {
            let (r, container, _, attempt) = parse_instance_id(&h.id)?;
            (r.namespace == namespace && r.name == name).then_some((container, attempt, h))
        })
        .collect();
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    Ok(out)
}

/// Where the agent keeps the last lines of a container's previous (exited, removed) instance,
/// under its data root: what `orch logs --previous` shows.
pub fn previous_logs_path(
    data_root: &std::path::Path,
    namespace: &str,
    name: &str,
    container: &str,
) -> std::path::PathBuf {
    data_root.join("previous-logs").join(namespace).join(name).join(format!("{container}.log"))
}

/// How many lines of an exited instance are kept for `--previous`.
const PREVIOUS_LOG_LINES: usize = 10_000;

impl Agent {
    /// An agent for the node in `config`.
    pub fn new(config: AgentConfig, store: Arc<dyn Store>, runtime: Arc<dyn Runtime>) -> Self {
        let config_root = config.data_root.clone();
        Agent {
            ports: ports::Ports::new(config.port_range.clone(), config.address, &config.data_root),
            config,
            store,
            runtime,
            clock: Arc::new(TokioClock::from_system_time()),
            instances: Default::default(),
            terminating: Default::default(),
            health: Default::default(),
            shared: None,
            renewals: None,
            written: Default::default(),
            spawned: Default::default(),
            recorder: std::sync::OnceLock::new(),
            providers: BTreeMap::new(),
            publications: volumes::Publications::new(&config_root),
            dirs: volumes::WorkloadDirs::new(&config_root),
            evictions: Default::default(),
            volume_ops: tokio::sync::Mutex::new(()),
        }
    }

    /// Provides volumes of class `class` (a DNS-1123 subdomain such as `local` or `docker`) from
    /// `provider` on this node: the node lists the class in `status.storage` with the
    /// provider's capacity and access modes, the volumes of the class bound to claims of the
    /// workloads here are created and published through it, and those of this node being
    /// deleted are reclaimed through it. Without a provider for `local`, the agent opens
    /// [`LocalVolumes`](crate::LocalVolumes) under `<data_root>/local-volumes` with
    /// [`AgentConfig::local_storage`] as its capacity, enforcing sizes as
    /// [`AgentConfig::local_storage_enforcement`] says. An invalid class makes
    /// [`run`](Agent::run) fail naming it.
    pub fn with_volume_provider(mut self, class: impl Into<String>, provider: Arc<dyn VolumeProvider>) -> Self {
        self.providers.insert(class.into(), provider);
        self
    }

    /// Reads workloads from `cache`, shared with the other agents of this process, instead of
    /// opening a watch of its own: each agent then hears only of its own node's workloads
    /// (through the cache's node index), so a simulation of thousands of nodes costs one watch.
    pub fn with_shared_cache(mut self, cache: Cache<Workload>) -> Self {
        self.shared = Some(cache);
        self
    }

    /// Has `renewals` keep its heartbeat lease alive, on their interval (instead of
    /// `renew_interval` on a timer of its own): with thousands of simulated agents in one
    /// process, one timer instead of thousands.
    pub fn with_shared_renewals(mut self, renewals: SharedRenewals) -> Self {
        self.renewals = Some(renewals);
        self
    }

    /// Starts `task` as one of the agent's own tasks (it ends with the agent).
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
        // Finished tasks leave the set here, so it holds only what runs.
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    /// Uses `clock` for timestamps (default: the system's time, advancing with `tokio::time`, so
    /// on a paused runtime the agent runs in virtual time).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Runs until `shutdown` completes. With `drain`, stops every instance before returning;
    /// otherwise leaves them running for the next agent to adopt.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>, drain: bool) -> Result<(), AgentError> {
        self.open_volume_providers().await?;
        self.register().await?;
        let lease_id = self.heartbeat().await?;
        let _owned = AbortOnDrop(self.spawned.clone());
        let this = Arc::new(self);
        let queue: WorkQueue<ObjectRef> = WorkQueue::new(QueueConfig::default());
        let node = this.config.node_name.clone();
        let (cache, mut events) = match &this.shared {
            Some(shared) => (shared.clone(), shared.subscribe_index(orch_core::cache::NODE_INDEX, &node)),
            None => {
                let selection =
                    Selection::kind(Workload::KIND).with_fields(FieldSelector::equals("spec.nodeName", node.clone()));
                let cache: Cache<Workload> =
                    Cache::spawn(this.store.clone(), CacheConfig { selection, ..CacheConfig::default() });
                let events = cache.subscribe();
                (cache, events)
            }
        };
        // The workloads bound here (a shared cache holds every node's).
        let mine = {
            let (cache, node) = (cache.clone(), node.clone());
            move || cache.by_index(orch_core::cache::NODE_INDEX, &node)
        };
        cache.ready().await;
        // The ports held before a restart, from the agent's files and then from the statuses of
        // the workloads bound here; every holder is synced (its workload may be gone).
        for key in this.ports.load() {
            queue.add(key);
        }
        // Likewise the workloads that volumes were published for (they may be gone).
        for key in this.publications.load() {
            queue.add(key);
        }
        this.dirs.load();
        let address = this.config.address.to_string();
        for w in mine().iter().filter(|w| w.status.address == address) {
            this.ports.adopt_status(&ObjectRef::of(w), &uid_tag(&w.metadata.uid), &w.status.ports);
        }
        // Nothing may start before what already runs is known, or a second copy could start.
        while let Err(e) = this.adopt(&queue).await {
            tracing::warn!(node = %this.config.node_name, error = %e, "cannot list the runtime's instances; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for w in mine() {
            queue.add(ObjectRef::of(&w));
        }
        let mut tasks = tokio::task::JoinSet::new();
        {
            let (queue, this) = (queue.clone(), this.clone());
            tasks.spawn(async move {
                while let Some(e) = events.recv().await {
                    let key = ObjectRef::of(e.object());
                    // The echo of a status this agent just wrote changes nothing it acts on.
                    let echo = {
                        let mut written = this.written.lock().unwrap_or_else(|e| e.into_inner());
                        written.get(&key) == Some(&e.object().metadata.resource_version)
                            && written.remove(&key).is_some()
                    };
                    if !echo {
                        queue.add(key);
                    }
                }
            });
        }
        {
            let (queue, this, every, mine) = (queue.clone(), this.clone(), this.config.resync_interval, mine.clone());
            tasks.spawn(async move {
                let mut tick = tokio::time::interval_at(Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    this.resync(&queue, &mine()).await;
                }
            });
        }
        {
            let (this, queue, mine) = (this.clone(), queue.clone(), mine.clone());
            tasks.spawn(async move { this.watch_volumes(queue, mine).await });
        }
        // Renewals: through the process's shared renewal task, or through one of its own on
        // `renew_interval` (the same mechanism for one agent). A failed renewal means the lease
        // lapsed (a long pause, a store outage): the agent starts a new heartbeat.
        let renewals = match this.renewals.clone() {
            Some(shared) => shared,
            None => SharedRenewals::spawn(this.store.clone(), this.config.renew_interval),
        };
        let failed = Arc::new(tokio::sync::Notify::new());
        let me = renewals.register(lease_id, &failed);
        {
            let (this, renewals) = (this.clone(), renewals.clone());
            tasks.spawn(async move {
                loop {
                    failed.notified().await;
                    match this.heartbeat().await {
                        Ok(id) => renewals.set_lease(me, id),
                        Err(e) => tracing::warn!(node = %this.config.node_name, error = %e, "heartbeat failed"),
                    }
                }
            });
        }
        let mut workers = tokio::task::JoinSet::new();
        {
            let (queue, cache, this) = (queue.clone(), cache.clone(), this.clone());
            workers.spawn(async move {
                while let Some(key) = queue.next().await {
                    let again = this.sync(&key, cache.get(&key), &queue).await;
                    queue.done(&key);
                    match again {
                        Ok(Some(after)) => queue.add_after(key, after),
                        Ok(None) => queue.forget(&key),
                        Err(e) => {
                            tracing::warn!(workload = %key, error = %e, "agent sync failed");
                            queue.add_backoff(key);
                        }
                    }
                }
            });
        }
        shutdown.await;
        queue.shut_down();
        while workers.join_next().await.is_some() {}
        tasks.shutdown().await;
        // The heartbeat's current lease (a lapsed one may have been replaced), for the drain.
        let lease_id = renewals.unregister(me).unwrap_or(lease_id);
        if drain {
            let all: Vec<Tracked> =
                this.instances.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, t)| t).collect();
            for t in all {
                let _ = this.runtime.stop(&t.handle, this.config.stop_grace).await;
                let _ = this.runtime.remove(&t.handle).await;
            }
            let _ = this.store.revoke_lease(lease_id).await;
        }
        Ok(())
    }

    /// Compares what runs with what the agent last saw, like kubelet's relist: queues the
    /// workloads whose instances changed state or vanished, the workloads bound here with no
    /// instance yet (unless evicted), the instances whose workload is gone, and the workloads
    /// gone from here that still hold published volumes; rotates logs on the way, and measures
    /// the sized `emptyDir`s of the workloads that run, queueing for eviction those over their
    /// limit.
    async fn resync(&self, queue: &WorkQueue<ObjectRef>, mine: &[Arc<Object<Workload>>]) {
        let tracked: Vec<(ObjectRef, Arc<Handle>, Option<InstanceState>)> = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((r, _), t)| (r.clone(), t.handle.clone(), t.seen))
            .collect();
        {
            let running: std::collections::HashSet<(&str, &str)> = tracked.iter().map(|(r, _, _)| named(r)).collect();
            for w in mine {
                if !running.contains(&(w.metadata.namespace.as_str(), w.metadata.name.as_str()))
                    && !sync::is_evicted(&w.status)
                {
                    queue.add(ObjectRef::of(w));
                }
            }
            self.check_size_limits(queue, mine, &running).await;
        }
        let bound: std::collections::HashSet<(&str, &str)> =
            mine.iter().map(|w| (w.metadata.namespace.as_str(), w.metadata.name.as_str())).collect();
        for key in self.publications.keys() {
            if !bound.contains(&named(&key)) {
                queue.add(key);
            }
        }
        let rotate = self.runtime.capabilities().log_files;
        for (key, handle, seen) in tracked {
            if rotate
                && let Err(e) = self.runtime.rotate_logs(&handle, self.config.log_max_bytes, self.config.log_keep).await
            {
                tracing::warn!(instance = %handle.id, error = %e, "log rotation failed");
            }
            let now = self.runtime.status(&handle).await.ok();
            if now.is_none() || now != seen || !bound.contains(&named(&key)) {
                queue.add(key);
            }
        }
    }

    /// Measures the sized `emptyDir`s of the workloads in `running` that have not ended (off the
    /// async threads); one over its limit is recorded for eviction and its workload queued.
    async fn check_size_limits(
        &self,
        queue: &WorkQueue<ObjectRef>,
        mine: &[Arc<Object<Workload>>],
        running: &std::collections::HashSet<(&str, &str)>,
    ) {
        for w in mine {
            // Only what may still run is evicted: a workload that ended stays as it ended.
            let ended = matches!(w.status.phase, Phase::Succeeded | Phase::Failed);
            if ended || !running.contains(&(w.metadata.namespace.as_str(), w.metadata.name.as_str())) {
                continue;
            }
            let key = ObjectRef::of(w);
            let dirs =
                volumes::sized_empty_dirs(&self.config.data_root, &key, &uid_tag(&w.metadata.uid), &w.spec.volumes);
            if dirs.is_empty() {
                continue;
            }
            let Ok(Some(message)) = tokio::task::spawn_blocking(move || volumes::over_limit(&dirs)).await else {
                continue;
            };
            let mut evictions = self.evictions.lock().unwrap_or_else(|e| e.into_inner());
            if evictions.get(&key).is_none_or(|e| e.uid != w.metadata.uid) {
                tracing::info!(workload = %key, %message, "evicting a workload over its emptyDir size limit");
                evictions.insert(
                    key.clone(),
                    Eviction { uid: w.metadata.uid.clone(), reason: volumes::EVICTED, message, statuses: None },
                );
            }
            queue.add(key);
        }
    }

    /// Tells people about the agent's decisions (crash loops, evictions, volumes it cannot
    /// provide); made on first use, on the agent's clock.
    fn recorder(&self) -> &orch_core::events::Recorder {
        self.recorder.get_or_init(|| {
            orch_core::events::Recorder::with_clock(
                self.store.clone(),
                format!("agent/{}", self.config.node_name),
                Default::default(),
                self.clock.clone(),
            )
        })
    }

    /// Takes over what the runtime already runs (after an agent restart): the newest attempt of
    /// each container is adopted, older ones are stopped and removed.
    async fn adopt(&self, queue: &WorkQueue<ObjectRef>) -> Result<(), AgentError> {
        let handles = self.runtime.list().await.map_err(|source| AgentError::Runtime {
            runtime: self.runtime.name().to_string(),
            what: "listing its instances".into(),
            source,
        })?;
        let mut newest: HashMap<(ObjectRef, String), (String, u32, Handle)> = HashMap::new();
        let mut superseded = Vec::new();
        for handle in handles {
            let Some((r, container, tag, attempt)) = parse_instance_id(&handle.id) else { continue };
            let slot = (r, container);
            match newest.get(&slot) {
                Some((_, a, _)) if *a >= attempt => superseded.push(handle),
                _ => {
                    if let Some((_, _, older)) = newest.insert(slot, (tag, attempt, handle)) {
                        superseded.push(older);
                    }
                }
            }
        }
        for old in superseded {
            self.runtime.stop(&old, Duration::ZERO).await.ok();
            self.runtime.remove(&old).await.ok();
        }
        for ((r, container), (tag, attempt, handle)) in newest {
            let last_exit = match self.runtime.recover(&handle).await {
                Ok(InstanceState::Exited(e)) => Some(e),
                _ => None,
            };
            self.instances.lock().unwrap_or_else(|e| e.into_inner()).insert(
                (r.clone(), container),
                Tracked {
                    handle: Arc::new(handle),
                    attempt,
                    restarts: attempt,
                    started: Instant::now(),
                    crashes: 0,
                    not_before: None,
                    last_exit,
                    uid_tag: tag,
                    spec: None,
                    unhealthy_kill: false,
                    generation: 0,
                    seen: None,
                },
            );
            queue.add(r);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_round_trip() {
        let r = ObjectRef::new("default", "web.v2");
        let id = instance_id(&r, "main", "0A1B2C3D-4e5f", 7);
        assert_eq!(id, "default.web.v2.main.0a1b2c3d-7");
        assert_eq!(parse_instance_id(&id), Some((r, "main".into(), "0a1b2c3d".into(), 7)));
        assert_eq!(parse_instance_id("nodots"), None);
    }
}
