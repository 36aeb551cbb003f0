//! Scheduler throughput end to end, on kube-scheduler's `scheduler_perf` cases, beside each
//! case's CI floor (pods/s; kube measures it through a real API server and etcd).
//!
//! Each case runs on the in-memory store and on the embedded durable store (`RedbStore`):
//! 5,000 nodes (4 CPU, 32 Gi, 110 pods) and the case's initial workloads are created and bound
//! first (not timed). Then, timed, 30 concurrent creators create the measured workloads in the
//! store (as kube's test creates pods through 30 client goroutines); the [`SchedulerService`],
//! in a [`Manager`], sees them through its cache, schedules them and binds each by a write to
//! the store; a workload counts once its bind is visible in the manager's shared workload cache
//! (kube's test counts on the informer it shares with the scheduler). Throughput is measured
//! workloads / wall time of that phase (kube's is the average of per-second samples, which
//! leaves out the first second's ramp; ours keeps it).
//!
//! `Unschedulable` and `PreemptionAsync` keep creating high-priority workloads at 5/s during the
//! measured phase, as kube's churn does: in `Unschedulable` each needs 9 CPUs and fits nowhere
//! (each one's preemption attempt fails); in `PreemptionAsync` each needs 3 CPUs and preempts
//! three of a node's four 900m low-priority workloads. Only the measured workloads are counted.
//!
//! `cargo bench -p orch-benches --bench scheduler_e2e` (one case: add its name as a filter, e.g.
//! `-- SchedulingBasic`). With `--test` (CI), each case runs once at a tenth of its size.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use futures::StreamExt;
use orch_core::kinds::{
    Affinity, AffinityTerm, Node, NodeAffinity, NodeSelectorOperator, NodeSelectorRequirement, NodeSelectorTerm,
    ResourceRequirements, TopologySpreadConstraint, WhenUnsatisfiable, Workload, WorkloadAffinity,
};
use orch_core::{Api, CacheEvent, LabelSelector, Manager, Object, ObjectMeta, Quantity, Store};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::{MemoryStore, RedbStore};

// The allocator a production binary of orch uses (`orch` itself); glibc's malloc contends across
// threads on these many small allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The namespace of the measured workloads (the only ones counted).
const MEASURED_NS: &str = "measured";
/// Concurrent creators of the measured workloads (kube's test: 30 client goroutines).
const CREATORS: usize = 30;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Memory,
    Embedded,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Memory => "memory store",
            Backend::Embedded => "embedded store",
        }
    }
}

/// Churn during the measured phase: one workload every 200 ms (5/s).
#[derive(Clone, Copy)]
enum Churn {
    None,
    /// High-priority workloads that fit nowhere (9 CPUs on 4-CPU nodes).
    Unschedulable,
    /// High-priority workloads of 3 CPUs that preempt three 900m low-priority workloads.
    Preemptors,
}

struct Case {
    /// kube's case and workload name.
    name: &'static str,
    /// kube's CI floor for that exact workload (pods/s).
    floor: f64,
    nodes: usize,
    init: usize,
    measured: usize,
    node_labels: fn(usize) -> Vec<(&'static str, String)>,
    init_workload: fn(usize) -> Object<Workload>,
    measured_workload: fn(usize) -> Object<Workload>,
    churn: Churn,
}

fn node(i: usize, labels: &[(&'static str, String)]) -> Object<Node> {
    let mut n = Object::new(ObjectMeta::named(format!("node-{i:05}")), Node::default());
    n.metadata.labels.insert("kubernetes.io/hostname", format!("node-{i:05}"));
    for (k, v) in labels {
        n.metadata.labels.insert(*k, v.clone());
    }
    for (k, v) in [("cpu", "4"), ("memory", "32Gi"), ("pods", "110")] {
        let q: Quantity = v.parse().expect("quantity");
        n.status.allocatable.insert(k.into(), q);
        n.status.capacity.insert(k.into(), q);
    }
    n
}

fn spec(cpu: &str, mem: &str) -> Workload {
    let mut w = Workload::command("main", &["pause"]);
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), cpu.parse().expect("quantity"));
    requests.insert("memory".to_string(), mem.parse().expect("quantity"));
    w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
    w
}

fn object(ns: &str, name: String, spec: Workload, labels: &[(&str, &str)]) -> Object<Workload> {
    let mut o = Object::new(ObjectMeta::namespaced(ns, name), spec);
    for (k, v) in labels {
        o.metadata.labels.insert(*k, *v);
    }
    o
}

fn no_labels(_: usize) -> Vec<(&'static str, String)> {
    Vec::new()
}

fn zones(i: usize) -> Vec<(&'static str, String)> {
    vec![("topology.kubernetes.io/zone", format!("moon-{}", i % 3 + 1))]
}

fn zone1(_: usize) -> Vec<(&'static str, String)> {
    vec![("topology.kubernetes.io/zone", "zone1".to_string())]
}

/// kube's pod-default: 100m CPU, 500 Mi.
fn init_default(i: usize) -> Object<Workload> {
    object("init", format!("init-{i}"), spec("100m", "500Mi"), &[])
}

fn measured_default(i: usize) -> Object<Workload> {
    object(MEASURED_NS, format!("m-{i}"), spec("100m", "500Mi"), &[])
}

/// pod-with-topology-spreading: max skew 5 over zones, hard.
fn measured_spread(i: usize) -> Object<Workload> {
    let mut w = spec("100m", "500Mi");
    w.topology_spread_constraints = vec![TopologySpreadConstraint {
        max_skew: 5,
        topology_key: "topology.kubernetes.io/zone".into(),
        when_unsatisfiable: WhenUnsatisfiable::DoNotSchedule,
        label_selector: "color=blue".parse().expect("selector"),
    }];
    object(MEASURED_NS, format!("m-{i}"), w, &[("color", "blue")])
}

fn node_affinity_spec() -> Workload {
    let mut w = spec("100m", "500Mi");
    w.affinity = Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required: vec![NodeSelectorTerm {
                match_expressions: vec![NodeSelectorRequirement {
                    key: "topology.kubernetes.io/zone".into(),
                    operator: NodeSelectorOperator::In,
                    values: vec!["zone1".into(), "zone2".into()],
                }],
            }],
            preferred: Vec::new(),
        }),
        ..Default::default()
    });
    w
}

fn init_node_affinity(i: usize) -> Object<Workload> {
    object("init", format!("init-{i}"), node_affinity_spec(), &[])
}

fn measured_node_affinity(i: usize) -> Object<Workload> {
    object(MEASURED_NS, format!("m-{i}"), node_affinity_spec(), &[])
}

/// pod-with-pod-anti-affinity: `color: green`, required anti-affinity to `color: green` by
/// hostname across both namespaces: one per node.
fn anti_affinity_spec() -> Workload {
    let mut w = spec("100m", "500Mi");
    w.affinity = Some(Affinity {
        workload_anti_affinity: Some(WorkloadAffinity {
            required: vec![AffinityTerm {
                label_selector: LabelSelector::from_labels([("color", "green")]),
                namespaces: vec!["init".into(), MEASURED_NS.into()],
                topology_key: "kubernetes.io/hostname".into(),
            }],
            preferred: Vec::new(),
        }),
        ..Default::default()
    });
    w
}

fn init_anti(i: usize) -> Object<Workload> {
    object("init", format!("init-{i}"), anti_affinity_spec(), &[("color", "green")])
}

fn measured_anti(i: usize) -> Object<Workload> {
    object(MEASURED_NS, format!("m-{i}"), anti_affinity_spec(), &[("color", "green")])
}

/// pod-low-priority: 900m, priority 0, no grace: four fill a node to 3.6 CPUs.
fn init_low_priority(i: usize) -> Object<Workload> {
    let mut w = spec("900m", "500Mi");
    w.termination_grace_period_seconds = Some(0);
    object("init", format!("low-{i}"), w, &[])
}

/// The churn's workloads, by kind.
fn churn_workload(churn: Churn, i: usize) -> Option<Object<Workload>> {
    let (cpu, name) = match churn {
        Churn::None => return None,
        Churn::Unschedulable => ("9", format!("big-{i}")),
        Churn::Preemptors => ("3", format!("high-{i}")),
    };
    let mut w = spec(cpu, "500Mi");
    w.priority = 10;
    Some(object("churn", name, w, &[]))
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "SchedulingBasic/5000Nodes_10000Pods",
            floor: 680.0,
            nodes: 5_000,
            init: 1_000,
            measured: 10_000,
            node_labels: no_labels,
            init_workload: init_default,
            measured_workload: measured_default,
            churn: Churn::None,
        },
        Case {
            name: "SchedulingBasic/5000Nodes_50000Pods",
            floor: 810.0,
            nodes: 5_000,
            init: 5_000,
            measured: 50_000,
            node_labels: no_labels,
            init_workload: init_default,
            measured_workload: measured_default,
            churn: Churn::None,
        },
        Case {
            name: "TopologySpreading/5000Nodes_5000Pods",
            floor: 460.0,
            nodes: 5_000,
            init: 5_000,
            measured: 5_000,
            node_labels: zones,
            init_workload: init_default,
            measured_workload: measured_spread,
            churn: Churn::None,
        },
        Case {
            name: "SchedulingNodeAffinity/5000Nodes_10000Pods",
            floor: 220.0,
            nodes: 5_000,
            init: 5_000,
            measured: 10_000,
            node_labels: zone1,
            init_workload: init_node_affinity,
            measured_workload: measured_node_affinity,
            churn: Churn::None,
        },
        Case {
            name: "SchedulingPodAntiAffinity/5000Nodes_2000Pods",
            floor: 60.0,
            nodes: 5_000,
            init: 1_000,
            measured: 2_000,
            node_labels: no_labels,
            init_workload: init_anti,
            measured_workload: measured_anti,
            churn: Churn::None,
        },
        Case {
            name: "Unschedulable/5kNodes/100Init/10kPods",
            floor: 590.0,
            nodes: 5_000,
            init: 100,
            measured: 10_000,
            node_labels: no_labels,
            init_workload: init_default,
            measured_workload: measured_default,
            churn: Churn::Unschedulable,
        },
        Case {
            name: "PreemptionAsync/5000Nodes",
            floor: 570.0,
            nodes: 5_000,
            init: 20_000,
            measured: 5_000,
            node_labels: no_labels,
            init_workload: init_low_priority,
            measured_workload: measured_default,
            churn: Churn::Preemptors,
        },
    ]
}

/// Creates `objects` through `creators` concurrent tasks.
async fn create_all<K: orch_core::Resource>(store: &Arc<dyn Store>, objects: Vec<Object<K>>, creators: usize) {
    futures::stream::iter(objects)
        .map(|o| {
            let api: Api<K> = if o.metadata.namespace.is_empty() {
                Api::all(store.clone())
            } else {
                Api::namespaced(store.clone(), o.metadata.namespace.clone())
            };
            async move { api.create(&o).await.expect("create") }
        })
        .buffer_unordered(creators)
        .for_each(|_| async {})
        .await;
}

/// Counts workloads of `ns` whose bind the cache has seen, up to `want`.
fn count_bound(
    events: tokio::sync::mpsc::UnboundedReceiver<CacheEvent<Workload>>,
    ns: &'static str,
    want: usize,
) -> tokio::sync::oneshot::Receiver<()> {
    let (done, finished) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut events = events;
        let mut seen: HashSet<String> = HashSet::with_capacity(want);
        let mut done = Some(done);
        while let Some(e) = events.recv().await {
            if let CacheEvent::Applied(w) = e
                && w.metadata.namespace == ns
                && w.spec.node_name.is_some()
                && seen.insert(w.metadata.name.clone())
                && seen.len() >= want
                && let Some(d) = done.take()
            {
                let _ = d.send(());
            }
        }
    });
    finished
}

/// One run of a case; returns the wall time of the measured phase.
fn run(case: &Case, backend: Backend, scale: usize) -> Duration {
    let (nodes, init, measured) = (case.nodes / scale, case.init / scale, case.measured / scale);
    let dir = std::env::temp_dir().join(format!("orch-scheduler-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let took = rt.block_on(async {
        let store: Arc<dyn Store> = match backend {
            Backend::Memory => Arc::new(MemoryStore::builder().history_limit(400_000).build()),
            Backend::Embedded => {
                Arc::new(RedbStore::builder().history_limit(400_000).open(dir.join("store.redb")).expect("open store"))
            }
        };
        create_all(&store, (0..nodes).map(|i| node(i, &(case.node_labels)(i))).collect(), 64).await;
        let mut manager = Manager::new(store.clone());
        manager.add(SchedulerService::new(Profile::default_profile()));
        let workloads = manager.cache::<Workload>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(manager.run(async move {
            let _ = stopped.await;
        }));
        workloads.ready().await;
        // The initial workloads, created and bound before the timer.
        let init_bound = count_bound(workloads.subscribe(), "init", init);
        create_all(&store, (0..init).map(case.init_workload).collect(), 64).await;
        if init > 0 {
            init_bound.await.expect("initial workloads bound");
        }
        // Churn, for the whole measured phase.
        let churn = case.churn;
        let churning = {
            let store = store.clone();
            tokio::spawn(async move {
                let api: Api<Workload> = Api::namespaced(store, "churn");
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                for i in 0.. {
                    tick.tick().await;
                    let Some(w) = churn_workload(churn, i) else { return };
                    let _ = api.create(&w).await;
                }
            })
        };
        let measured_bound = count_bound(workloads.subscribe(), MEASURED_NS, measured);
        let batch: Vec<Object<Workload>> = (0..measured).map(case.measured_workload).collect();
        let start = Instant::now();
        create_all(&store, batch, CREATORS).await;
        measured_bound.await.expect("measured workloads bound");
        let took = start.elapsed();
        churning.abort();
        let _ = stop.send(());
        running.await.expect("manager task").expect("manager");
        took
    });
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    took
}

type Row = (String, f64, f64, usize);

static RESULTS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

fn bench(c: &mut Criterion) {
    let quick = std::env::args().any(|a| a == "--test");
    let scale = if quick { 10 } else { 1 };
    let mut g = c.benchmark_group("scheduler_e2e");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    for backend in [Backend::Memory, Backend::Embedded] {
        for case in cases() {
            let id = format!("{} / {}", case.name, backend.label());
            g.throughput(Throughput::Elements((case.measured / scale) as u64));
            let mut times = Vec::new();
            g.bench_function(&id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let took = run(&case, backend, scale);
                        times.push(took);
                        total += took;
                    }
                    total
                })
            });
            if !times.is_empty() {
                times.sort();
                let median = times[times.len() / 2];
                let rate = (case.measured / scale) as f64 / median.as_secs_f64();
                RESULTS.lock().expect("results").push((id, rate, case.floor, times.len()));
            }
        }
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
    let results = RESULTS.lock().expect("results");
    if !results.is_empty() {
        println!("\n| case (end to end) | pods/s (median of runs) | runs | kube-scheduler floor | ratio |");
        println!("|---|---|---|---|---|");
        for (name, rate, floor, runs) in results.iter() {
            println!("| {name} | {rate:.0} | {runs} | {floor:.0} | {:.0}x |", rate / floor);
        }
    }
}
