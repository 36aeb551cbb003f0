//! Virtual-time scale run: N simulated nodes, each with its own agent (all sharing one workload
//! cache and one renewal timer), 10 workloads per node, every node's heartbeat lease renewed
//! every 10 s, one hour of cluster time on a paused single-threaded runtime.
//! `ORCH_SIM_RENEWALS=own` gives every agent a renewal timer of its own.
//!
//! `cargo bench -p orch-benches --bench simulated` (nodes: `ORCH_SIM_NODES`, default "1000,10000")
//!
//! Criterion times 10 runs per size; the median run's split (setting up vs the hour) is printed
//! at the end.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use orch_core::kinds::{NODE_LEASE_NAMESPACE, NodeLease};
use orch_core::kinds::{Phase, Resources, RestartPolicy, Workload};
use orch_core::{Api, Cache, CacheConfig, ListParams, Object, ObjectMeta, Runtime, Store, Timestamp, TokioClock};
use orch_runtime::Agent;
use orch_runtime::AgentConfig;
use orch_runtime::SharedRenewals;
use orch_runtime::SimCluster;
use orch_store::MemoryStore;

/// Returns the whole wall time, the part of it spent setting up (agents registered, every
/// workload created, all at virtual time zero), and the workloads running at the end.
fn run(nodes: usize, per_node: usize, hours: u64) -> (Duration, Duration, usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
    rt.block_on(async move {
        let clock = Arc::new(TokioClock::starting_at(Timestamp(0)));
        let store: Arc<dyn Store> =
            Arc::new(MemoryStore::builder().clock(clock.clone()).history_limit(1_000_000).build());
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
        // Every node's heartbeat lived through the hour (its lease lasts 40 s unless renewed).
        let heartbeats: Api<NodeLease> = Api::namespaced(store.clone(), NODE_LEASE_NAMESPACE);
        let alive = heartbeats.list(&ListParams::default()).await.expect("list heartbeats").items.len();
        assert_eq!(alive, nodes, "every heartbeat lease was renewed");
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
