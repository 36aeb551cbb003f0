//! The workload controllers at size, in virtual time on the memory store:
//!
//! - **rollout**: a rolling update of a 1,000-replica deployment (max surge 25%, max
//!   unavailable 25%) over 100 simulated nodes, each with its agent, with the scheduler: wall
//!   time from the template change to the rollout complete (target <= 1 s);
//! - **density**: deployments of 10 replicas on simulated nodes, from the first create to every
//!   workload running, through deployment, replica set, scheduler and agents: workloads per wall
//!   second (target >= 10,000/s; the size is 10,000 deployments on 1,000 nodes);
//! - **gc**: a background delete of a deployment owning 1,000 replica sets of 100 workloads
//!   each (100,000 objects): wall time until the last is gone (target <= 2 s).
//!
//! `cargo bench -p orch-benches --bench workloads` (density size: `ORCH_DENSITY_DEPLOYMENTS`,
//! default 10,000, on one node per 10 deployments). With `--test` (CI) each runs once, the
//! density at 200 deployments and the collection at 10,000 objects.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use orch_controllers::{DeploymentController, GarbageCollector, ReplicaSetController};
use orch_core::kinds::{
    Deployment, IntOrPercent, Phase, ReplicaSet, Resources, RollingUpdate, Strategy, Workload, WorkloadTemplate,
};
use orch_core::{
    Api, CacheEvent, DeleteOptions, LabelSelector, ListParams, Manager, Object, ObjectMeta, Runtime, Store, Timestamp,
    TokioClock, testkit,
};
use orch_runtime::{Agent, AgentConfig, SharedRenewals, SimCluster};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::MemoryStore;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static REPORTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime")
}

/// A control plane with the scheduler and the deployment controllers, and `nodes` agents on
/// simulated nodes sharing the manager's workload cache.
async fn plane(nodes: usize) -> (Arc<dyn Store>, orch_core::Cache<Workload>) {
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(clock.clone()).history_limit(200_000).build());
    let mut manager = Manager::new(store.clone()).with_clock(clock.clone());
    manager.add(SchedulerService::new(Profile::default_profile()));
    manager.add(DeploymentController::builder().concurrency(16));
    manager.add(ReplicaSetController::builder().concurrency(16));
    let workloads = manager.cache::<Workload>();
    tokio::spawn(manager.run(std::future::pending()));
    let renewals = SharedRenewals::spawn(store.clone(), Duration::from_secs(10));
    let cluster = SimCluster::new();
    let capacity: Resources =
        [("cpu", "64"), ("memory", "256Gi"), ("pods", "200")].map(|(k, v)| (k.into(), v.parse().expect("q"))).into();
    for n in 0..nodes {
        let name = format!("sim-{n:05}");
        let mut config = AgentConfig::new(&name);
        config.resync_interval = Duration::from_secs(300);
        config.capacity = Some(capacity.clone());
        let runtime: Arc<dyn Runtime> = Arc::new(cluster.node(&name));
        let agent = Agent::new(config, store.clone(), runtime)
            .with_clock(clock.clone())
            .with_shared_cache(workloads.clone())
            .with_shared_renewals(renewals.clone());
        tokio::spawn(agent.run(std::future::pending::<()>(), false));
    }
    let api: Api<orch_core::kinds::Node> = Api::all(store.clone());
    testkit::wait_until("nodes registered", Duration::from_secs(600), async || {
        api.list(&ListParams::default()).await.is_ok_and(|l| l.items.len() == nodes)
    })
    .await;
    (store, workloads)
}

fn service(version: &str) -> Workload {
    let mut w = Workload::command("main", &["serve"]);
    w.containers[0].env = vec![orch_core::kinds::EnvVar { name: "VERSION".into(), value: version.into() }];
    w.containers[0].resources.requests.insert("cpu".into(), "100m".parse().expect("q"));
    w
}

async fn complete(api: &Api<Deployment>, name: &str) {
    testkit::wait_until("rollout complete", Duration::from_secs(24 * 3600), async || {
        let d = api.get(name).await.ok()?;
        let s = &d.status;
        (s.observed_generation == d.metadata.generation
            && s.updated_replicas == d.spec.replicas
            && s.available_replicas == d.spec.replicas
            && s.replicas == d.spec.replicas)
            .then_some(())
    })
    .await
}

/// Wall and virtual time of one rolling update of `replicas` over `nodes`.
fn rollout(nodes: usize, replicas: u32) -> (Duration, Duration) {
    runtime().block_on(async {
        let (store, _) = plane(nodes).await;
        let api: Api<Deployment> = Api::namespaced(store.clone(), "default");
        let mut d = Deployment::new("web", replicas, service("1"));
        d.strategy = Strategy::RollingUpdate(RollingUpdate {
            max_surge: IntOrPercent::Percent(25),
            max_unavailable: IntOrPercent::Percent(25),
        });
        api.create(&Object::new(ObjectMeta::named("web"), d)).await.expect("create");
        complete(&api, "web").await;
        let (wall, virt) = (Instant::now(), tokio::time::Instant::now());
        api.retry_on_conflict("web", |d| {
            d.spec.template.spec = service("2");
            Ok(())
        })
        .await
        .expect("update");
        complete(&api, "web").await;
        (wall.elapsed(), virt.elapsed())
    })
}

/// Wall time from the first create of `deployments` deployments of 10 to every workload running.
fn density(deployments: usize) -> Duration {
    runtime().block_on(async {
        let (store, workloads) = plane(deployments.div_ceil(10)).await;
        let total = deployments * 10;
        let mut events = workloads.subscribe();
        let api: Api<Deployment> = Api::namespaced(store.clone(), "default");
        let began = Instant::now();
        for i in 0..deployments {
            let d = Deployment::new(&format!("app-{i}"), 10, service("1"));
            api.create(&Object::new(ObjectMeta::named(format!("app-{i}")), d)).await.expect("create");
        }
        let mut running = std::collections::HashSet::with_capacity(total);
        while running.len() < total {
            match tokio::time::timeout(Duration::from_secs(3600), events.recv()).await {
                Ok(Some(CacheEvent::Applied(w))) if w.status.phase == Phase::Running => {
                    running.insert(w.metadata.name.clone());
                }
                Ok(Some(_)) => {}
                _ => panic!("only {} of {total} workloads running", running.len()),
            }
        }
        began.elapsed()
    })
}

/// Wall time of the collection of a tree of one deployment, `sets` replica sets and `per_set`
/// workloads each, after a background delete of the deployment.
fn gc(sets: usize, per_set: usize) -> Duration {
    runtime().block_on(async {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().history_limit(400_000).build());
        let deployments: Api<Deployment> = Api::namespaced(store.clone(), "default");
        let rs_api: Api<ReplicaSet> = Api::namespaced(store.clone(), "default");
        let w_api: Api<Workload> = Api::namespaced(store.clone(), "default");
        let spec = service("1");
        let root = deployments
            .create(&Object::new(ObjectMeta::named("root"), Deployment::new("web", 1, spec.clone())))
            .await
            .expect("create");
        for s in 0..sets {
            let mut meta = ObjectMeta::named(format!("root-{s}"));
            meta.owner_references = vec![root.controller_ref()];
            let rs = ReplicaSet {
                replicas: per_set as u32,
                selector: LabelSelector::from_labels([("app", "web")]),
                template: WorkloadTemplate::new([("app", "web")].into(), spec.clone()),
                min_ready_seconds: 0,
            };
            let rs = rs_api.create(&Object::new(meta, rs)).await.expect("create");
            for w in 0..per_set {
                let mut meta = ObjectMeta::named(format!("root-{s}-{w}"));
                meta.owner_references = vec![rs.controller_ref()];
                w_api.create(&Object::new(meta, spec.clone())).await.expect("create");
            }
        }
        let mut manager = Manager::new(store.clone());
        manager.add(GarbageCollector::builtin().concurrency(256));
        let cache = manager.cache::<Workload>();
        let mut ready = manager.readiness();
        tokio::spawn(manager.run(std::future::pending()));
        let _ = ready.wait_for(|r| *r).await;
        let mut events = cache.subscribe();
        let began = Instant::now();
        deployments.delete("root", &DeleteOptions::default()).await.expect("delete");
        let mut gone = 0;
        while gone < sets * per_set {
            match tokio::time::timeout(Duration::from_secs(3600), events.recv()).await {
                Ok(Some(CacheEvent::Deleted(_))) => gone += 1,
                Ok(Some(_)) => {}
                _ => panic!("only {gone} of {} workloads collected", sets * per_set),
            }
        }
        began.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let quick = std::env::args().any(|a| a == "--test");
    let mut g = c.benchmark_group("workloads");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.bench_function("rolling update of 1,000 replicas on 100 nodes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (wall, virt) = rollout(100, 1_000);
                REPORTS.lock().expect("reports").push(format!(
                    "rollout 1,000 replicas / 100 nodes: {:.3} s wall for {:.0} s of cluster time",
                    wall.as_secs_f64(),
                    virt.as_secs_f64()
                ));
                total += wall;
            }
            total
        })
    });
    let deployments: usize = if quick {
        200
    } else {
        std::env::var("ORCH_DENSITY_DEPLOYMENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
    };
    g.bench_function(format!("density: {deployments} deployments of 10"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let took = density(deployments);
                REPORTS.lock().expect("reports").push(format!(
                    "density {deployments} deployments x 10 on {} nodes: {:.2} s, {:.0} workloads/s",
                    deployments.div_ceil(10),
                    took.as_secs_f64(),
                    (deployments * 10) as f64 / took.as_secs_f64()
                ));
                total += took;
            }
            total
        })
    });
    let sets = if quick { 100 } else { 1_000 };
    g.bench_function(format!("gc of {} objects", sets * 101 + 1), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let took = gc(sets, 100);
                REPORTS.lock().expect("reports").push(format!(
                    "gc of {} objects: {:.3} s",
                    sets * 101 + 1,
                    took.as_secs_f64()
                ));
                total += took;
            }
            total
        })
    });
    g.finish();
    for r in REPORTS.lock().expect("reports").iter() {
        println!("{r}");
    }
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
criterion::criterion_main!(group::benches);
