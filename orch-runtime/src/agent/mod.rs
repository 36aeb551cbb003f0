//! The node agent: registers its node, keeps a heartbeat lease, and makes the runtime run the
//! workloads bound to its node, restarting them per their restart policy with crash-loop backoff.
//!
//! It reconciles against what really runs (the runtime's own list and states), not against its
//! memory, so after an agent restart it adopts running instances instead of restarting them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use orch_core::api::Api;
use orch_core::cache::{Cache, CacheConfig, ObjectRef};
use orch_core::controller::queue::{QueueConfig, WorkQueue};
use orch_core::error::{Error, Result};
use orch_core::kinds::{
    Condition, ConditionStatus, ContainerState, ContainerStatus, NODE_LEASE_NAMESPACE, Node, NodeLease, Phase, Probe,
    ProbeAction, Resources, RestartPolicy, Taint, Workload, WorkloadStatus, set_condition,
};
use orch_core::labels::Labels;
use orch_core::meta::{Clock, LeaseId, ObjectMeta, SystemClock};
use orch_core::object::{Object, Resource};
use orch_core::runtime::{ExitStatus, Handle, InstanceSpec, InstanceState, Runtime};
use orch_core::selector::FieldSelector;
use orch_core::store::{Selection, Store};

/// Settings of a node agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's name (a DNS-1123 subdomain).
    pub node_name: String,
    /// Node labels.
    pub labels: Labels,
    /// Node taints.
    pub taints: Vec<Taint>,
    /// Resources the node offers; `None` reads CPUs and memory from the host.
    pub capacity: Option<Resources>,
    /// Heartbeat lease time to live: how long a dead agent goes unnoticed (default 40 s).
    pub lease_ttl: Duration,
    /// How often the lease is renewed (default 10 s; a renewal writes nothing).
    pub renew_interval: Duration,
    /// How often the runtime's instances are checked against what the agent last saw, even
    /// without events (default 10 s): a difference (an exit whose event was missed, an instance
    /// gone behind the agent's back) syncs its workload, as does a workload bound here with no
    /// instance yet, or an instance whose workload is gone. Unchanged workloads cost one status
    /// read each, not a sync.
    pub resync_interval: Duration,
    /// First crash-loop delay (default 10 s); doubles per crash up to `backoff_max`.
    pub backoff_base: Duration,
    /// Longest crash-loop delay (default 5 min).
    pub backoff_max: Duration,
    /// Running this long without a crash resets the backoff (default 10 min).
    pub backoff_reset: Duration,
    /// Grace period when stopping instances (when the workload does not set one; default 30 s).
    pub stop_grace: Duration,
    /// Rotate an instance's log file past this size (default 10 MiB), on each resync.
    pub log_max_bytes: u64,
    /// Rotated log files kept per stream (default 3).
    pub log_keep: usize,
}

impl AgentConfig {
    /// Defaults for node `name`.
    pub fn new(name: impl Into<String>) -> Self {
        AgentConfig {
            node_name: name.into(),
            labels: Labels::new(),
            taints: Vec::new(),
            capacity: None,
            lease_ttl: Duration::from_secs(40),
            renew_interval: Duration::from_secs(10),
            resync_interval: Duration::from_secs(10),
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            backoff_reset: Duration::from_secs(600),
            stop_grace: Duration::from_secs(30),
            log_max_bytes: 10 * 1024 * 1024,
            log_keep: 3,
        }
    }
}

/// One container's instance as the agent tracks it.
#[derive(Debug, Clone)]
struct Tracked {
    /// Shared, so the per-pass copy of the record is cheap.
    handle: Arc<Handle>,
    attempt: u32,
    restarts: u32,
    started: Instant,
    /// Consecutive crashes, for the backoff.
    crashes: u32,
    /// Not before this may the next attempt start.
    not_before: Option<Instant>,
    last_exit: Option<ExitStatus>,
    /// The uid tag of the workload it was started for.
    uid_tag: String,
    /// The container spec it was started from; `None` when adopted (taken as current then).
    spec: Option<Arc<orch_core::kinds::Container>>,
    /// Stopped by the agent for failing its liveness or startup probe: its exit is a failure,
    /// whatever its code.
    unhealthy_kill: bool,
    /// The workload's generation `spec` was last found current at: while it is unchanged the
    /// spec needs no comparing.
    generation: u64,
    /// The runtime's state of the instance when a sync last looked (the resync compares).
    seen: Option<InstanceState>,
}

type Instances = HashMap<(ObjectRef, String), Tracked>;

/// What the probes of one instance last concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Health {
    /// The startup probe succeeded (or there is none): the other probes may run.
    started: bool,
    /// Passing its readiness probe (or none).
    ready: bool,
    /// Failed its liveness (or startup) probe: restart it.
    failed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

/// Runs one probe once; true on success.
async fn probe_once(runtime: &dyn Runtime, handle: &Handle, probe: &Probe) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    let addr = runtime.address(handle);
    let attempt = async {
        match &probe.action {
            ProbeAction::Exec { command } => runtime.exec(handle, command, timeout).await.is_ok_and(|code| code == 0),
            ProbeAction::Tcp { port } => {
                let Ok(port) = u16::try_from(*port) else { return false };
                tokio::net::TcpStream::connect((addr, port)).await.is_ok()
            }
            ProbeAction::Http { path, port } => {
                let Ok(port) = u16::try_from(*port) else { return false };
                let Ok(mut conn) = tokio::net::TcpStream::connect((addr, port)).await else { return false };
                let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: orch-agent\r\n\r\n");
                if conn.write_all(request.as_bytes()).await.is_err() {
                    return false;
                }
                let mut head = [0u8; 64];
                let Ok(n) = conn.read(&mut head).await else { return false };
                // "HTTP/1.x NNN ...": 2xx and 3xx are healthy.
                let text = String::from_utf8_lossy(&head[..n]);
                text.split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse::<u16>().ok())
                    .is_some_and(|c| (200..400).contains(&c))
            }
        }
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or(false)
}

/// One renewal timer for the agents of one process (a simulation of thousands of nodes; an agent
/// without one runs its own): every
/// `interval` it keeps each registered agent's heartbeat lease alive, one store renewal per
/// agent as before, but from one task on one timer instead of one per agent. An agent whose
/// renewal fails is told, and starts a new heartbeat as it would on its own.
#[derive(Clone)]
pub struct SharedRenewals {
    agents: Arc<Mutex<RenewalTable>>,
}

#[derive(Default)]
struct RenewalTable {
    next: u64,
    /// Agent number → its lease and how to tell it that a renewal failed (gone with the agent:
    /// an agent that died without unregistering is dropped, its lease left to lapse).
    leases: std::collections::BTreeMap<u64, (LeaseId, std::sync::Weak<tokio::sync::Notify>)>,
}

impl std::fmt::Debug for SharedRenewals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.agents.lock().unwrap_or_else(|e| e.into_inner()).leases.len();
        f.debug_struct("SharedRenewals").field("agents", &n).finish()
    }
}

impl SharedRenewals {
    /// Starts the renewal task: every `interval`, each registered lease is kept alive in `store`.
    /// It ends when every handle is dropped.
    pub fn spawn(store: Arc<dyn Store>, interval: Duration) -> Self {
        let agents: Arc<Mutex<RenewalTable>> = Default::default();
        let weak = Arc::downgrade(&agents);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut due: Vec<(u64, LeaseId)> = Vec::new();
            loop {
                tick.tick().await;
                let Some(agents) = weak.upgrade() else { return };
                due.clear();
                due.extend(agents.lock().unwrap_or_else(|e| e.into_inner()).leases.iter().map(|(a, (l, _))| (*a, *l)));
                for &(agent, lease) in &due {
                    // One stuck renewal must not hold up everybody else's.
                    let renewed = tokio::time::timeout(interval, store.keep_alive(lease)).await;
                    if matches!(renewed, Ok(Ok(_))) {
                        continue;
                    }
                    let mut table = agents.lock().unwrap_or_else(|e| e.into_inner());
                    match table.leases.get(&agent).map(|(l, failed)| (*l, failed.upgrade())) {
                        // Still this lease (not already replaced): the agent starts a new
                        // heartbeat; repeated failures before it does coalesce into one.
                        Some((current, Some(failed))) if current == lease => failed.notify_one(),
                        Some((_, None)) => {
                            table.leases.remove(&agent);
                        }
                        _ => {}
                    }
                }
                // Agents that ended without unregistering (their task was dropped).
                agents.lock().unwrap_or_else(|e| e.into_inner()).leases.retain(|_, (_, f)| f.strong_count() > 0);
            }
        });
        SharedRenewals { agents }
    }

    fn register(&self, lease: LeaseId, failed: &Arc<tokio::sync::Notify>) -> u64 {
        let mut table = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        table.next += 1;
        let n = table.next;
        table.leases.insert(n, (lease, Arc::downgrade(failed)));
        n
    }

    fn set_lease(&self, agent: u64, lease: LeaseId) {
        if let Some(entry) = self.agents.lock().unwrap_or_else(|e| e.into_inner()).leases.get_mut(&agent) {
            entry.0 = lease;
        }
    }

    /// Takes the agent out; returns its current lease.
    fn unregister(&self, agent: u64) -> Option<LeaseId> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner()).leases.remove(&agent).map(|(lease, _)| lease)
    }
}

/// A node agent over a store and a runtime.
pub struct Agent {
    config: AgentConfig,
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    clock: Arc<dyn Clock>,
    instances: Arc<Mutex<Instances>>,
    /// Probe results by instance id.
    health: Arc<Mutex<HashMap<String, Health>>>,
    /// A workload cache shared with other agents of this process, if any.
    shared: Option<Cache<Workload>>,
    /// A renewal task shared with other agents of this process, if any.
    renewals: Option<SharedRenewals>,
    /// The resource version of the status this agent last wrote, per workload, until the cache
    /// brings it back (that event needs no sync).
    written: Mutex<HashMap<ObjectRef, u64>>,
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

fn host_capacity() -> Resources {
    let mut r = Resources::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    r.insert(orch_core::kinds::resource::CPU.into(), orch_core::Quantity::from_units(cpus));
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
    });
    if let Some(kib) = mem_kib {
        r.insert(orch_core::kinds::resource::MEMORY.into(), orch_core::Quantity::from_bytes(kib * 1024));
    }
    r.insert(orch_core::kinds::resource::PODS.into(), orch_core::Quantity::from_units(110));
    r
}

impl Agent {
    /// An agent for the node in `config`.
    pub fn new(config: AgentConfig, store: Arc<dyn Store>, runtime: Arc<dyn Runtime>) -> Self {
        Agent {
            config,
            store,
            runtime,
            clock: Arc::new(SystemClock),
            instances: Default::default(),
            health: Default::default(),
            shared: None,
            renewals: None,
            written: Default::default(),
        }
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

    /// Uses `clock` for timestamps (a `TokioClock` in simulations and tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Registers (or updates) this node's `Node` object.
    async fn register(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.store.clone());
        let capacity = self.config.capacity.clone().unwrap_or_else(host_capacity);
        let now = self.clock.now();
        loop {
            let existing = nodes.get_opt(&self.config.node_name).await?;
            let mut node = existing.clone().unwrap_or_else(|| {
                let mut meta = ObjectMeta::named(&self.config.node_name);
                meta.labels = self.config.labels.clone();
                Object::new(meta, Node { taints: self.config.taints.clone(), ..Default::default() })
            });
            node.status.capacity = capacity.clone();
            node.status.allocatable = capacity.clone();
            set_condition(
                &mut node.status.conditions,
                Condition::new("Ready", ConditionStatus::True, "AgentReady"),
                now,
            );
            let result = match existing {
                None => nodes.create(&node).await.map(|_| ()),
                Some(_) => nodes.replace_status(&node).await.map(|_| ()),
            };
            match result {
                Err(e) if e.is_conflict() || matches!(e, Error::AlreadyExists(_)) => continue,
                other => return other,
            }
        }
    }

    /// Creates the heartbeat object on a fresh store lease; returns the lease id.
    async fn heartbeat(&self) -> Result<u64> {
        let lease = self.store.grant_lease(self.config.lease_ttl).await?;
        let leases: Api<NodeLease> = Api::namespaced(self.store.clone(), NODE_LEASE_NAMESPACE);
        let mut meta = ObjectMeta::named(&self.config.node_name);
        meta.lease = Some(lease.id);
        let hb = Object::new(meta, NodeLease { holder: self.config.node_name.clone() });
        loop {
            match leases.create(&hb).await {
                Ok(_) => return Ok(lease.id),
                // A heartbeat of a previous run of this agent: replace it.
                Err(Error::AlreadyExists(_)) => {
                    let _ = leases.delete(&self.config.node_name, &Default::default()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs until `shutdown` completes. With `drain`, stops every instance before returning;
    /// otherwise leaves them running for the next agent to adopt.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>, drain: bool) -> Result<()> {
        self.register().await?;
        let lease_id = self.heartbeat().await?;
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
        let workers = {
            let (queue, cache, this) = (queue.clone(), cache.clone(), this.clone());
            tokio::spawn(async move {
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
            })
        };
        shutdown.await;
        queue.shut_down();
        let _ = workers.await;
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
    /// instance yet, and the instances whose workload is gone; rotates logs on the way.
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
                if !running.contains(&(w.metadata.namespace.as_str(), w.metadata.name.as_str())) {
                    queue.add(ObjectRef::of(w));
                }
            }
        }
        let bound: std::collections::HashSet<(&str, &str)> =
            mine.iter().map(|w| (w.metadata.namespace.as_str(), w.metadata.name.as_str())).collect();
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

    /// Takes over what the runtime already runs (after an agent restart): the newest attempt of
    /// each container is adopted, older ones are stopped and removed.
    async fn adopt(&self, queue: &WorkQueue<ObjectRef>) -> Result<()> {
        let handles = self.runtime.list().await.map_err(|e| Error::Unavailable {
            message: format!("listing the {} runtime's instances", self.runtime.name()),
            source: Some(Box::new(e)),
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

    /// Starts the probe loops of a running instance (if its container has probes).
    fn watch_health(
        self: &Arc<Self>,
        key: &ObjectRef,
        container: &orch_core::kinds::Container,
        handle: &Handle,
        queue: &WorkQueue<ObjectRef>,
    ) {
        let probes: Vec<(ProbeKind, Probe)> = [
            (ProbeKind::Startup, &container.startup_probe),
            (ProbeKind::Readiness, &container.readiness_probe),
            (ProbeKind::Liveness, &container.liveness_probe),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.clone().map(|p| (k, p)))
        .collect();
        let initial = Health {
            started: container.startup_probe.is_none(),
            ready: container.readiness_probe.is_none(),
            failed: false,
        };
        self.health.lock().unwrap_or_else(|e| e.into_inner()).insert(handle.id.clone(), initial);
        for (kind, probe) in probes {
            let (this, key, handle, queue) = (self.clone(), key.clone(), handle.clone(), queue.clone());
            let slot = (key.clone(), container.name.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(u64::from(probe.initial_delay_seconds))).await;
                let period = Duration::from_secs(u64::from(probe.period_seconds.max(1)));
                let (mut successes, mut failures) = (0u32, 0u32);
                loop {
                    let current = this
                        .instances
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&slot)
                        .map(|t| t.handle.id.clone());
                    let health = this.health.lock().unwrap_or_else(|e| e.into_inner()).get(&handle.id).copied();
                    let (Some(health), true) = (health, current.as_deref() == Some(handle.id.as_str())) else { return };
                    if queue.is_shut_down() || health.failed || (kind == ProbeKind::Startup && health.started) {
                        return;
                    }
                    if kind != ProbeKind::Startup && !health.started {
                        tokio::time::sleep(period).await;
                        continue;
                    }
                    // An instance that is no longer running needs no probing.
                    if !matches!(this.runtime.status(&handle).await, Ok(InstanceState::Running { .. })) {
                        return;
                    }
                    if probe_once(&*this.runtime, &handle, &probe).await {
                        successes += 1;
                        failures = 0;
                    } else {
                        failures += 1;
                        successes = 0;
                    }
                    // Change only this probe's own field, under the lock: the other probes of
                    // the instance update theirs concurrently.
                    let changed = {
                        let mut all = this.health.lock().unwrap_or_else(|e| e.into_inner());
                        let Some(h) = all.get_mut(&handle.id) else { return };
                        let before = *h;
                        match kind {
                            ProbeKind::Startup if successes >= 1 => h.started = true,
                            ProbeKind::Readiness if successes >= probe.success_threshold.max(1) => h.ready = true,
                            ProbeKind::Readiness if failures >= probe.failure_threshold.max(1) => h.ready = false,
                            ProbeKind::Startup | ProbeKind::Liveness if failures >= probe.failure_threshold.max(1) => {
                                h.failed = true
                            }
                            _ => {}
                        }
                        (*h != before).then_some(*h)
                    };
                    if let Some(now) = changed {
                        tracing::info!(workload = %key, instance = %handle.id, probe = ?kind, health = ?now, "probe result changed");
                        queue.add(key.clone());
                    }
                    tokio::time::sleep(period).await;
                }
            });
        }
    }

    fn backoff(&self, crashes: u32) -> Duration {
        let factor = 2u32.saturating_pow(crashes.saturating_sub(1).min(16));
        self.config.backoff_base.saturating_mul(factor).min(self.config.backoff_max)
    }

    /// Brings one workload's instances in line; returns when to look again, if on a timer.
    async fn sync(
        self: &Arc<Self>,
        key: &ObjectRef,
        desired: Option<Arc<Object<Workload>>>,
        queue: &WorkQueue<ObjectRef>,
    ) -> Result<Option<Duration>> {
        let wanted = desired.filter(|w| {
            !w.metadata.is_being_deleted() && w.spec.node_name.as_deref() == Some(self.config.node_name.as_str())
        });
        let Some(workload) = wanted else {
            self.written.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
            // Not (or no longer) ours: stop and remove its instances.
            let gone: Vec<Tracked> = {
                let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
                let keys: Vec<_> = instances.keys().filter(|(r, _)| r == key).cloned().collect();
                keys.into_iter().filter_map(|k| instances.remove(&k)).collect()
            };
            for t in gone {
                self.runtime.stop(&t.handle, self.config.stop_grace).await.ok();
                self.runtime.remove(&t.handle).await.ok();
            }
            return Ok(None);
        };
        let grace = workload.spec.termination_grace_period_seconds.map_or(self.config.stop_grace, Duration::from_secs);
        let tag = uid_tag(&workload.metadata.uid);
        let unavailable = |what: &str, e: orch_core::runtime::RuntimeError| Error::Unavailable {
            message: format!("{what} for {key}"),
            source: Some(Box::new(e)),
        };
        // Instances of containers no longer in the spec go.
        let dropped: Vec<Tracked> = {
            let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<_> = instances
                .keys()
                .filter(|(r, name)| r == key && !workload.spec.containers.iter().any(|c| &c.name == name))
                .cloned()
                .collect();
            gone.into_iter().filter_map(|k| instances.remove(&k)).collect()
        };
        for t in dropped {
            self.runtime.stop(&t.handle, grace).await.map_err(|e| unavailable("stopping a dropped container", e))?;
            self.runtime.remove(&t.handle).await.ok();
        }
        let mut next_look: Option<Duration> = None;
        let mut statuses = Vec::new();
        for c in &workload.spec.containers {
            let slot = (key.clone(), c.name.clone());
            let tracked = self.instances.lock().unwrap_or_else(|e| e.into_inner()).get(&slot).cloned();
            let state = match &tracked {
                Some(t) => match self.runtime.status(&t.handle).await {
                    Ok(state) => state,
                    Err(orch_core::runtime::RuntimeError::NotFound(_)) => InstanceState::Lost,
                    // Unknown is not gone: starting another copy now could run two.
                    Err(e) => return Err(unavailable("reading an instance's state", e)),
                },
                None => InstanceState::Lost,
            };
            // An instance of another spec, or of an earlier workload with this name, is replaced
            // (that is an update, not a crash).
            let generation = workload.metadata.generation;
            let outdated = tracked.as_ref().is_some_and(|t| {
                t.uid_tag != tag || (t.generation != generation && t.spec.as_ref().is_some_and(|spec| **spec != *c))
            });
            if !outdated
                && tracked.as_ref().is_some_and(|t| t.generation != generation || t.seen != Some(state))
                && let Some(entry) = self.instances.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&slot)
            {
                // Current at this generation; and what the resync compares against.
                entry.generation = generation;
                entry.seen = Some(state);
            }
            if let Some(t) = tracked.as_ref().filter(|_| outdated) {
                self.runtime
                    .stop(&t.handle, grace)
                    .await
                    .map_err(|e| unavailable("stopping an outdated instance", e))?;
                self.runtime.remove(&t.handle).await.ok();
                self.health.lock().unwrap_or_else(|e| e.into_inner()).remove(&t.handle.id);
                self.instances.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
            }
            // The replacement continues the attempt count, so its id is new.
            let replaced_attempt = tracked.as_ref().filter(|_| outdated).map(|t| t.attempt + 1);
            let tracked = tracked.filter(|_| !outdated);
            let exited = match (&tracked, state) {
                (Some(t), InstanceState::Running { started_at }) => {
                    if t.spec.is_none() {
                        // Adopted: it runs the current spec from now on.
                        if let Some(entry) = self.instances.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&slot) {
                            entry.spec = Some(Arc::new(c.clone()));
                        }
                    }
                    let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner()).get(&t.handle.id).copied();
                    let probed = c.startup_probe.is_some() || c.readiness_probe.is_some() || c.liveness_probe.is_some();
                    if health.is_none() && probed {
                        // Adopted after an agent restart: its probes start now.
                        self.watch_health(key, c, &t.handle, queue);
                        health = self.health.lock().unwrap_or_else(|e| e.into_inner()).get(&t.handle.id).copied();
                    }
                    if health.is_some_and(|h| h.failed) {
                        // Failed its liveness or startup probe: stop it; the next pass restarts
                        // it as a failure.
                        tracing::warn!(workload = %key, instance = %t.handle.id, "unhealthy; restarting");
                        if let Some(entry) = self.instances.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&slot) {
                            entry.unhealthy_kill = true;
                        }
                        self.runtime
                            .stop(&t.handle, grace)
                            .await
                            .map_err(|e| unavailable("stopping an unhealthy instance", e))?;
                        next_look = Some(Duration::ZERO);
                        statuses.push(ContainerStatus {
                            name: c.name.clone(),
                            state: ContainerState::Waiting { reason: "Unhealthy".into() },
                            ready: false,
                            restart_count: t.restarts,
                        });
                        continue;
                    }
                    statuses.push(ContainerStatus {
                        name: c.name.clone(),
                        state: ContainerState::Running { started_at },
                        ready: health.is_none_or(|h| h.ready && h.started),
                        restart_count: t.restarts,
                    });
                    // A crash-free spell resets the backoff.
                    if t.crashes > 0
                        && t.started.elapsed() >= self.config.backoff_reset
                        && let Some(t) = self.instances.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&slot)
                    {
                        t.crashes = 0;
                    }
                    continue;
                }
                (Some(_), InstanceState::Exited(e)) => Some(e),
                (Some(t), InstanceState::Lost) => {
                    // Gone without a record: invent its exit once, so it stays the same exit on
                    // every pass (and status does not churn).
                    let e = t.last_exit.unwrap_or(ExitStatus {
                        code: None,
                        signal: None,
                        oom_killed: false,
                        finished_at: self.clock.now(),
                    });
                    if let Some(entry) = self.instances.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&slot) {
                        entry.last_exit.get_or_insert(e);
                    }
                    Some(e)
                }
                (None, _) => None,
            };
            let unhealthy = tracked.as_ref().is_some_and(|t| t.unhealthy_kill);
            let restart = match (exited, workload.spec.restart_policy) {
                (None, _) => true, // never started (or just replaced)
                (Some(_), RestartPolicy::Always) => true,
                (Some(e), RestartPolicy::OnFailure) => !e.success() || unhealthy,
                (Some(_), RestartPolicy::Never) => false,
            };
            let restarts = tracked.as_ref().map_or(0, |t| t.restarts);
            if !restart {
                let e = exited.expect("only exited instances are not restarted");
                statuses.push(terminated(c.name.clone(), &e, restarts));
                continue;
            }
            // Crash-loop backoff before a restart.
            if let (Some(t), Some(e)) = (&tracked, exited) {
                let crashes = if t.last_exit == Some(e) {
                    t.crashes
                } else if t.started.elapsed() >= self.config.backoff_reset {
                    // It ran a crash-free spell first: the count starts over.
                    1
                } else {
                    t.crashes + 1
                };
                let not_before = t
                    .not_before
                    .filter(|_| t.last_exit == Some(e))
                    .unwrap_or_else(|| Instant::now() + self.backoff(crashes));
                if let Some(entry) = self.instances.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&slot) {
                    entry.crashes = crashes;
                    entry.not_before = Some(not_before);
                    entry.last_exit = Some(e);
                }
                let now = Instant::now();
                if now < not_before {
                    statuses.push(ContainerStatus {
                        name: c.name.clone(),
                        state: ContainerState::Waiting { reason: "CrashLoopBackOff".into() },
                        ready: false,
                        restart_count: restarts,
                    });
                    let wait = not_before - now;
                    next_look = Some(next_look.map_or(wait, |n| n.min(wait)));
                    continue;
                }
                // Never start the next attempt while the last one might still run.
                self.runtime.stop(&t.handle, grace).await.map_err(|e| unavailable("stopping an exited instance", e))?;
                self.runtime.remove(&t.handle).await.ok();
                self.health.lock().unwrap_or_else(|e| e.into_inner()).remove(&t.handle.id);
            }
            let attempt = tracked.as_ref().map_or(replaced_attempt.unwrap_or(0), |t| t.attempt + 1);
            let spec = InstanceSpec {
                id: instance_id(key, &c.name, &workload.metadata.uid, attempt),
                container: c.clone(),
                volumes: Vec::new(),
                labels: [("orch.dev/node", self.config.node_name.as_str()), ("orch.dev/workload", key.name.as_str())]
                    .into(),
            };
            match self.runtime.start(&spec).await {
                Ok(handle) => {
                    let started_at = self.clock.now();
                    // What the next resync compares against (without it, every new instance
                    // would look changed to it once).
                    let seen = self.runtime.status(&handle).await.ok();
                    let restarts = if tracked.is_some() { restarts + 1 } else { 0 };
                    let t = Tracked {
                        handle: Arc::new(handle.clone()),
                        attempt,
                        restarts,
                        started: Instant::now(),
                        crashes: tracked.as_ref().map_or(0, |t| t.crashes),
                        not_before: None,
                        last_exit: None,
                        uid_tag: tag.clone(),
                        spec: Some(Arc::new(c.clone())),
                        unhealthy_kill: false,
                        generation: workload.metadata.generation,
                        seen,
                    };
                    self.instances.lock().unwrap_or_else(|e| e.into_inner()).insert(slot, t);
                    self.watch_health(key, c, &handle, queue);
                    // Wake this workload when the instance exits.
                    let (runtime, queue, key) = (self.runtime.clone(), queue.clone(), key.clone());
                    tokio::spawn(async move {
                        let _ = runtime.wait(&handle).await;
                        queue.add(key);
                    });
                    statuses.push(ContainerStatus {
                        name: c.name.clone(),
                        state: ContainerState::Running { started_at },
                        // Not ready until its probes say so.
                        ready: c.readiness_probe.is_none() && c.startup_probe.is_none(),
                        restart_count: restarts,
                    });
                }
                Err(e) => {
                    statuses.push(ContainerStatus {
                        name: c.name.clone(),
                        state: ContainerState::Waiting { reason: format!("StartFailed: {e}") },
                        ready: false,
                        restart_count: restarts,
                    });
                    next_look = Some(next_look.map_or(self.config.backoff_base, |n| n.min(self.config.backoff_base)));
                }
            }
        }
        if !self.report(&workload, statuses).await? {
            // The status write lost a race with a newer version (possibly the echo of this
            // agent's own last write, which is not synced): look again once the cache has it.
            let soon = Duration::from_millis(10);
            next_look = Some(next_look.map_or(soon, |n| n.min(soon)));
        }
        Ok(next_look)
    }

    /// Writes the status if it changed; false when the write lost a race with a newer version.
    async fn report(&self, workload: &Object<Workload>, statuses: Vec<ContainerStatus>) -> Result<bool> {
        let now = self.clock.now();
        let running = statuses.iter().any(|s| matches!(s.state, ContainerState::Running { .. }));
        let all_done = statuses.iter().all(|s| matches!(s.state, ContainerState::Terminated { .. }));
        let all_ok = statuses.iter().all(|s| matches!(s.state, ContainerState::Terminated { exit_code: 0, .. }));
        let phase = if running {
            Phase::Running
        } else if all_done && all_ok {
            Phase::Succeeded
        } else if all_done {
            Phase::Failed
        } else {
            Phase::Pending
        };
        let ready = statuses.iter().all(|s| s.ready);
        let mut status = WorkloadStatus {
            phase,
            restart_count: statuses.iter().map(|s| s.restart_count).sum(),
            start_time: workload.status.start_time.or(Some(now)),
            conditions: workload.status.conditions.clone(),
            container_statuses: statuses,
            ..Default::default()
        };
        let cond = if ready { ConditionStatus::True } else { ConditionStatus::False };
        set_condition(
            &mut status.conditions,
            Condition::new("Ready", cond, if ready { "Running" } else { "NotReady" }),
            now,
        );
        if status == workload.status {
            return Ok(true);
        }
        let mut next = workload.clone();
        next.status = status;
        let api: Api<Workload> = Api::namespaced(self.store.clone(), &workload.metadata.namespace);
        match api.replace_status(&next).await {
            Ok(written) => {
                self.written
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(ObjectRef::of(&written), written.metadata.resource_version);
                Ok(true)
            }
            Err(e) if e.is_conflict() => {
                self.written.lock().unwrap_or_else(|e| e.into_inner()).remove(&ObjectRef::of(workload));
                Ok(false)
            }
            // Deleted meanwhile: its deletion event syncs it.
            Err(e) if e.is_not_found() => Ok(true),
            Err(e) => Err(e),
        }
    }
}

fn terminated(name: String, e: &ExitStatus, restarts: u32) -> ContainerStatus {
    let code = e.code.unwrap_or_else(|| e.signal.map_or(-1, |s| 128 + s));
    ContainerStatus {
        name,
        state: ContainerState::Terminated {
            exit_code: code,
            reason: if e.oom_killed {
                "OOMKilled"
            } else if code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .into(),
            finished_at: e.finished_at,
        },
        ready: false,
        restart_count: restarts,
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
