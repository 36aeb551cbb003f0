//! Virtual-time scale run: N simulated nodes, each with its own agent (all sharing one workload
//! cache and one renewal timer), 10 workloads per node, every node's heartbeat lease renewed
//! every 10 s, one hour of cluster time on a paused single-threaded runtime. Each run checks that
//! every heartbeat was renewed on time all hour (counted at the store: one lease per node, never
//! granted again, a renewal every 10 s, none refused) and that every workload runs at the end.
//! `ORCH_SIM_RENEWALS=own` gives every agent a renewal timer of its own.
//!
//! `cargo bench -p orch-benches --bench simulated` (nodes: `ORCH_SIM_NODES`, default "1000,10000")
//!
//! Criterion times 10 runs per size; the median run's split (setting up vs the hour) is printed
//! at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use orch_core::kinds::{Phase, Resources, RestartPolicy, Workload};
use orch_core::{
    Api, Cache, CacheConfig, DeleteOptions, DeleteOutcome, DynamicObject, LeaseId, LeaseInfo, ListParams, ListRequest,
    ListResponse, Object, ObjectKey, ObjectMeta, Runtime, Store, Timestamp, TokioClock, WatchRequest, WatchStream,
    WriteOptions,
};
use orch_runtime::Agent;
use orch_runtime::AgentConfig;
use orch_runtime::SharedRenewals;
use orch_runtime::SimCluster;
use orch_store::MemoryStore;

/// The memory store, counting the heartbeat leases granted and their renewals: a heartbeat that
/// lapses is granted a new lease, so leases granted beyond one per node, or renewals short of one
/// per node every 10 s, mean a heartbeat was not renewed on time. (Counting lease objects would
/// not tell: a lapsed agent recreates its lease.)
#[derive(Debug)]
struct Counting {
    inner: MemoryStore,
    granted: AtomicU64,
    renewed: AtomicU64,
    refused: AtomicU64,
}

#[async_trait::async_trait]
impl Store for Counting {
    async fn get(&self, key: &ObjectKey) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.get(key).await
    }
    async fn list(&self, req: &ListRequest) -> orch_core::Result<ListResponse> {
        self.inner.list(req).await
    }
    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.create(obj, opts).await
    }
    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.update(obj, opts).await
    }
    async fn update_many(
        &self,
        objs: Vec<DynamicObject>,
        opts: &WriteOptions,
    ) -> Vec<orch_core::Result<Arc<DynamicObject>>> {
        self.inner.update_many(objs, opts).await
    }
    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.update_status(obj, opts).await
    }
    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> orch_core::Result<DeleteOutcome> {
        self.inner.delete(key, opts).await
    }
    async fn watch(&self, req: &WatchRequest) -> orch_core::Result<WatchStream> {
        self.inner.watch(req).await
    }
    async fn current_revision(&self) -> orch_core::Result<u64> {
        self.inner.current_revision().await
    }
    async fn compact(&self, revision: u64) -> orch_core::Result<()> {
        self.inner.compact(revision).await
    }
    async fn grant_lease(&self, ttl: Duration) -> orch_core::Result<LeaseInfo> {
        self.granted.fetch_add(1, Ordering::Relaxed);
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, id: LeaseId) -> orch_core::Result<LeaseInfo> {
        let r = self.inner.keep_alive(id).await;
        let counter = if r.is_ok() { &self.renewed } else { &self.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }
    async fn revoke_lease(&self, id: LeaseId) -> orch_core::Result<()> {
        self.inner.revoke_lease(id).await
    }
    async fn lease(&self, id: LeaseId) -> orch_core::Result<LeaseInfo> {
        self.inner.lease(id).await
    }
}

/// Returns the whole wall time, the part of it spent setting up (agents registered, every
/// workload created, all at virtual time zero), and the workloads running at the end.
fn run(nodes: usize, per_node: usize, hours: u64) -> (Duration, Duration, usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
    rt.block_on(async move {
        let clock = Arc::new(TokioClock::starting_at(Timestamp(0)));
        let counting = Arc::new(Counting {
            inner: MemoryStore::builder().clock(clock.clone()).history_limit(1_000_000).build(),
            granted: AtomicU64::new(0),
            renewed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let store: Arc<dyn Store> = counting.clone();
        let cluster = SimCluster::new();
        let began = Instant::now();
        // One workload cache for every agent: each hears only of its own node's workloads.
        let shared: Cache<Workload> = Cache::spawn(store.clone(), CacheConfig::default());
        // One renewal task for every agent (each lease still renewed every 10 s through the
        // store); `ORCH_SIM_RENEWALS=own` gives each agent its own timer instead.
        let renewals = (std::env::var("ORCH_SIM_RENEWALS").as_deref() != Ok("own"))
            .then(|| SharedRenewals::spawn(store.clone(), Duration::from_secs(10)));
        let mut stops = Vec::new();
        let capacity: Resources = [("cpu", "32"), ("memory", "128Gi"), ("pods", "110")]
            .map(|(k, v)| (k.into(), v.parse().expect("quantity")))
            .into();
        for n in 0..nodes {
            let name = format!("sim-{n:05}");
            let mut config = AgentConfig::new(&name);
            config.renew_interval = Duration::from_secs(10);
            // Exits arrive as events (the runtime's wait); the periodic full check is a safety
            // net, every 5 minutes here.
            config.resync_interval = Duration::from_secs(300);
            // Simulated machines: a capacity of their own, not this host's.
            config.capacity = Some(capacity.clone());
            let runtime: Arc<dyn Runtime> = Arc::new(cluster.node(&name));
            let mut agent =
                Agent::new(config, store.clone(), runtime).with_clock(clock.clone()).with_shared_cache(shared.clone());
            if let Some(r) = &renewals {
                agent = agent.with_shared_renewals(r.clone());
            }
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stops.push((
                tx,
                tokio::spawn(agent.run(
                    async move {
                        let _ = rx.await;
                    },
                    false,
                )),
            ));
        }
        let api: Api<Workload> = Api::namespaced(store.clone(), "default");
        for n in 0..nodes {
            for i in 0..per_node {
                let mut w = Workload::command("main", &["sim"]);
                w.restart_policy = RestartPolicy::Always;
                w.node_name = Some(format!("sim-{n:05}"));
                api.create(&Object::new(ObjectMeta::named(format!("w-{n:05}-{i}")), w)).await.expect("create");
            }
        }
        let setup = began.elapsed();
        tokio::time::sleep(Duration::from_secs(3600 * hours)).await;
        let running = api
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .filter(|w| w.status.phase == Phase::Running)
            .count();
        // Every node's heartbeat was renewed on time all hour: one lease each, never granted
        // again (a lease lasts 40 s unless renewed; a lapsed one is replaced), never refused a
        // renewal, and renewed once every 10 s (359 or 360 times in the hour: the first tick
        // comes 10 s in, the last may fall at the hour's very end).
        let (granted, renewed, refused) = (
            counting.granted.load(Ordering::Relaxed),
            counting.renewed.load(Ordering::Relaxed),
            counting.refused.load(Ordering::Relaxed),
        );
        let nodes64 = nodes as u64;
        assert_eq!((granted, refused), (nodes64, 0), "a heartbeat lapsed: leases granted, renewals refused");
        let due = nodes64 * (3600 * hours / 10 - 1);
        assert!(renewed >= due, "{renewed} renewals for {nodes} heartbeats in {hours} h at 10 s: fewer than {due}");
        for (tx, task) in stops {
            let _ = tx.send(());
            let _ = task.await;
        }
        (began.elapsed(), setup, running)
    })
}

/// One run: wall time in all, the part spent setting up, workloads running at the end.
type Run = (Duration, Duration, usize);

/// Every run, per cluster size.
static RESULTS: Mutex<Vec<(usize, Vec<Run>)>> = Mutex::new(Vec::new());

fn bench(c: &mut Criterion) {
    let sizes: Vec<usize> = if std::env::args().any(|a| a == "--test") {
        vec![5]
    } else {
        std::env::var("ORCH_SIM_NODES")
            .unwrap_or_else(|_| "1000,10000".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    };
    let mut g = c.benchmark_group("simulated");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    for nodes in sizes {
        let mut runs = Vec::new();
        g.bench_function(format!("{nodes} nodes x 10 workloads, 1 h"), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let (wall, setup, running) = run(nodes, 10, 1);
                    assert_eq!(running, nodes * 10, "every workload runs at the end");
                    runs.push((wall, setup, running));
                    took += wall;
                }
                took
            })
        });
        RESULTS.lock().unwrap_or_else(|e| e.into_inner()).push((nodes, runs));
    }
    g.finish();
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}

fn main() {
    group::benches();
    Criterion::default().configure_from_args().final_summary();
    for (nodes, mut runs) in RESULTS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        if runs.is_empty() {
            continue;
        }
        runs.sort();
        let (wall, setup, running) = runs[runs.len() / 2];
        println!(
            "simulated/{nodes} nodes x 10 workloads, 1 h of cluster time, median of {} runs: {wall:.2?} wall in all ({setup:.2?} setting up, {:.2?} for the hour), {running} workloads running at the end (fastest {:.2?}, slowest {:.2?})",
            runs.len(),
            wall - setup,
            runs[0].0,
            runs[runs.len() - 1].0
        );
    }
}
