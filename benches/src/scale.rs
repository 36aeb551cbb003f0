//! The node-scale scenario, shared by the `scale` bench (Kubernetes' largest supported cluster:
//! 5,000 nodes, 150,000 workloads) and a CI test at a smaller size that checks correctness only.
//!
//! Everything runs in one process on a paused single-threaded tokio runtime, in virtual time: a
//! store, a [`Manager`] with the default [`SchedulerService`] and the [`NodeLifecycle`]
//! controller, and one agent per node on simulated nodes (sharing the manager's workload cache
//! and one renewal timer). Unbound workloads are created, scheduled and started; then a share of
//! the agents stops abruptly (their tasks aborted), and the run goes on until the node lifecycle
//! controller has evicted every workload of their nodes, at its default rate.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orch_controllers::NodeLifecycle;
use orch_core::TokioClock;
use orch_core::kinds::{Phase, Resources, RestartPolicy, Workload};
use orch_core::{Api, CacheEvent, FieldSelector, ListParams, Manager, Object, ObjectMeta, Runtime, Store, Timestamp};
use orch_runtime::{Agent, AgentConfig, Enforcement, SharedRenewals, SimCluster};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::{MemoryStore, RedbStore};

/// Which store the scenario runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `MemoryStore`.
    Memory,
    /// `RedbStore` in this file.
    Embedded(PathBuf),
}

/// The size of a run.
#[derive(Debug, Clone)]
pub struct Scale {
    /// Simulated nodes, each with its agent.
    pub nodes: usize,
    /// Workloads per node (all are created unbound; the scheduler spreads them).
    pub per_node: usize,
    /// Every `dead_every`-th node's agent stops abruptly (20: 5%).
    pub dead_every: usize,
    /// The store.
    pub backend: Backend,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Workloads created.
    pub workloads: usize,
    /// Wall time from the first create to every workload `Running`.
    pub to_running: Duration,
    /// Peak resident memory of the process at that point (`VmHWM`), when the OS says.
    pub peak_rss: Option<u64>,
    /// Nodes whose agents were stopped.
    pub dead_nodes: usize,
    /// Workloads the stopped nodes held, and how many of them were evicted.
    pub on_dead: usize,
    /// See `on_dead`.
    pub evicted: usize,
    /// From the agents' stop to the last eviction: wall time, and virtual (cluster) time.
    pub eviction_wall: Duration,
    /// See `eviction_wall`.
    pub eviction_virtual: Duration,
    /// Workloads on live nodes deleted or marked `Unknown` during the eviction: must be zero.
    pub live_touched: usize,
    /// Workloads on one node (of `workloads` in all), as listed from the store by a
    /// `spec.nodeName` field selector and as the cache holds them, and the median time of the
    /// list.
    pub one_node: usize,
    /// See `one_node`.
    pub one_node_cached: usize,
    /// See `one_node`.
    pub one_node_list: Duration,
}

fn node_name(n: usize) -> String {
    format!("sim-{n:05}")
}

/// Peak resident set size of this process so far, in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs the scenario; panics when something is wrong (a workload that never runs, an eviction
/// that never ends).
pub fn run(scale: &Scale) -> Report {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
    rt.block_on(run_on(scale))
}

async fn run_on(scale: &Scale) -> Report {
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
    let total = scale.nodes * scale.per_node;
    let store: Arc<dyn Store> = match &scale.backend {
        Backend::Memory => Arc::new(MemoryStore::builder().clock(clock.clone()).history_limit(100_000).build()),
        // Virtual time stands still while the embedded store's threads commit (see `Paced`).
        Backend::Embedded(path) => Arc::new(orch_core::testkit::Paced::new(Arc::new(
            RedbStore::builder().clock(clock.clone()).history_limit(100_000).open(path).expect("open store"),
        ))),
    };
    let mut manager = Manager::new(store.clone()).with_clock(clock.clone());
    manager.add(SchedulerService::new(Profile::default_profile()));
    manager.add(NodeLifecycle::builder(Default::default()));
    let workloads = manager.cache::<Workload>();
    let (stop_manager, stopped) = tokio::sync::oneshot::channel::<()>();
    let running_manager = tokio::spawn(manager.run(async move {
        let _ = stopped.await;
    }));
    // The agents: one renewal timer and the manager's workload cache for all.
    let renewals = SharedRenewals::spawn(store.clone(), Duration::from_secs(10));
    let cluster = SimCluster::new();
    let capacity: Resources =
        [("cpu", "32"), ("memory", "128Gi"), ("pods", "110")].map(|(k, v)| (k.into(), v.parse().expect("q"))).into();
    // The agents' files in a directory of this run's own, so no run sees another's.
    let data = std::env::temp_dir().join(format!("orch-scale-{}-{:016x}", std::process::id(), fastrand::u64(..)));
    let mut agents = Vec::with_capacity(scale.nodes);
    for n in 0..scale.nodes {
        let name = node_name(n);
        let mut config = AgentConfig::new(&name);
        config.resync_interval = Duration::from_secs(300);
        config.data_root = data.join(&name);
        config.capacity = Some(capacity.clone());
        // No volumes here: the nodes' local storage is only accounted (no loop-mount probe).
        config.local_storage_enforcement = Enforcement::Off;
        let runtime: Arc<dyn Runtime> = Arc::new(cluster.node(&name));
        let agent = Agent::new(config, store.clone(), runtime)
            .with_clock(clock.clone())
            .with_shared_cache(workloads.clone())
            .with_shared_renewals(renewals.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(
            async move {
                let _ = rx.await;
            },
            false,
        ));
        agents.push((tx, task));
    }
    let nodes: Api<orch_core::kinds::Node> = Api::all(store.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        // An agent that stops here failed to start: say why rather than wait for its node.
        if let Some(n) = agents.iter().position(|(_, task)| task.is_finished()) {
            let outcome = (&mut agents[n].1).await;
            panic!("the agent of {} stopped before every node registered: {outcome:?}", node_name(n));
        }
        if nodes.list(&ListParams::default()).await.is_ok_and(|l| l.items.len() == scale.nodes) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after 600 s waiting for every node to register");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Create → all Running, in wall time. The count runs beside the creates and takes in every
    // change queued whenever it runs (`try_recv` is not held to tokio's budget of 128 receives a
    // turn, which among thousands of busy agent tasks would let its queue, and with it an old
    // version of every workload, grow for the whole run).
    let mut events = workloads.subscribe();
    let (all_running, running_seen) = tokio::sync::oneshot::channel::<usize>();
    let counter = tokio::spawn(async move {
        let mut running: HashSet<String> = HashSet::with_capacity(total);
        let take = |running: &mut HashSet<String>, event: CacheEvent<Workload>| {
            if let CacheEvent::Applied(w) = event
                && w.status.phase == Phase::Running
            {
                running.insert(w.metadata.name.clone());
            }
        };
        let mut closed = false;
        loop {
            while let Ok(event) = events.try_recv() {
                take(&mut running, event);
            }
            if closed || running.len() >= total {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(600), events.recv()).await {
                Ok(Some(event)) => take(&mut running, event),
                _ => closed = true,
            }
        }
        let _ = all_running.send(running.len());
    });
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let began = Instant::now();
    for i in 0..total {
        let mut w = Workload::command("main", &["sim"]);
        w.restart_policy = RestartPolicy::Always;
        let requests = &mut w.containers[0].resources.requests;
        requests.insert("cpu".into(), "100m".parse().expect("q"));
        requests.insert("memory".into(), "100Mi".parse().expect("q"));
        api.create(&Object::new(ObjectMeta::named(format!("w-{i:06}")), w)).await.expect("create");
    }
    let running = running_seen.await.expect("the count of running workloads ends with a number");
    assert_eq!(running, total, "only {running} of {total} workloads running");
    let to_running = began.elapsed();
    counter.await.expect("count");
    let peak = peak_rss();

    // One node's workloads, listed from the store by field selector.
    let on_node = ListParams { fields: FieldSelector::equals("spec.nodeName", node_name(1)), ..Default::default() };
    let mut times = Vec::with_capacity(101);
    let mut one_node = 0;
    for _ in 0..101 {
        let t = Instant::now();
        one_node = api.list(&on_node).await.expect("list one node").items.len();
        times.push(t.elapsed());
    }
    times.sort();
    let one_node_cached = workloads.by_index(orch_core::cache::NODE_INDEX, &node_name(1)).len();

    // Some agents stop abruptly; count what happens to every workload from then on.
    let dead: HashSet<String> = (0..scale.nodes).filter(|n| n % scale.dead_every == 0).map(node_name).collect();
    let on_dead: HashSet<String> = workloads
        .list()
        .iter()
        .filter(|w| w.spec.node_name.as_ref().is_some_and(|n| dead.contains(n)))
        .map(|w| w.metadata.name.clone())
        .collect();
    let mut events = workloads.subscribe();
    for (n, (_, task)) in agents.iter().enumerate() {
        if dead.contains(&node_name(n)) {
            task.abort();
        }
    }
    let (wall_began, virtual_began) = (Instant::now(), tokio::time::Instant::now());
    let (mut evicted, mut live_touched) = (0usize, 0usize);
    while evicted < on_dead.len() {
        match tokio::time::timeout(Duration::from_secs(24 * 3600), events.recv()).await {
            Ok(Some(CacheEvent::Deleted(w))) => {
                if on_dead.contains(&w.metadata.name) {
                    evicted += 1;
                } else {
                    live_touched += 1;
                }
            }
            Ok(Some(CacheEvent::Applied(w))) => {
                if w.status.phase == Phase::Unknown && !on_dead.contains(&w.metadata.name) {
                    live_touched += 1;
                }
            }
            _ => panic!("eviction stalled: {evicted} of {} evicted", on_dead.len()),
        }
    }
    let (eviction_wall, eviction_virtual) = (wall_began.elapsed(), virtual_began.elapsed());

    for (tx, task) in agents {
        let _ = tx.send(());
        let _ = task.await;
    }
    let _ = stop_manager.send(());
    let _ = running_manager.await;
    let _ = std::fs::remove_dir_all(&data);
    Report {
        workloads: total,
        to_running,
        peak_rss: peak,
        dead_nodes: dead.len(),
        on_dead: on_dead.len(),
        evicted,
        eviction_wall,
        eviction_virtual,
        live_touched,
        one_node,
        one_node_cached,
        one_node_list: times[times.len() / 2],
    }
}
