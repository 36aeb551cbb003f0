//! Scheduler throughput on the shapes of kube-scheduler's `scheduler_perf` cases, next to
//! kube-scheduler's CI floor (its minimum over 250 CI runs, pods/s).
//!
//! Nodes: 4 CPU, 32 Gi, 110 pods. Workloads: 100m CPU, 500 Mi unless the case says otherwise.
//! Each case places its initial workloads first (not timed), then times the arrival and
//! scheduling of the measured ones through the [`SchedulingCore`] (queue, snapshot, the default
//! profile with every plugin, no sampling: every feasible node is evaluated for every
//! workload). Binding writes are not part of it: the service binds asynchronously (see the
//! `through the store` case).
//!
//! `cargo bench -p orch-benches --bench scheduler` (one case: add its name as a filter)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use orch_core::kinds::{
    Affinity, AffinityTerm, Node, NodeAffinity, NodeSelectorOperator, NodeSelectorRequirement, NodeSelectorTerm,
    ResourceRequirements, TopologySpreadConstraint, WhenUnsatisfiable, Workload, WorkloadAffinity,
};
use orch_core::{Api, Cache, CacheConfig, LabelSelector, Object, ObjectMeta, Quantity, Store};
use orch_scheduler::Framework;
use orch_scheduler::Profile;
use orch_scheduler::SchedulerService;
use orch_scheduler::SchedulingCore;
use orch_scheduler::core::OutcomeKind;
use orch_store::MemoryStore;

const NODES: usize = 5_000;

fn node(i: usize, labels: &[(&str, String)]) -> Object<Node> {
    let mut n = Object::new(ObjectMeta::named(format!("node-{i:05}")), Node::default());
    n.metadata.labels.insert("kubernetes.io/hostname", format!("node-{i:05}"));
    for (k, v) in labels {
        n.metadata.labels.insert(*k, v.clone());
    }
    n.status.allocatable.insert("cpu".into(), Quantity::from_units(4));
    n.status.allocatable.insert("memory".into(), "32Gi".parse().expect("quantity"));
    n.status.allocatable.insert("pods".into(), Quantity::from_units(110));
    n
}

fn workload(cpu: &str, mem: &str) -> Workload {
    let mut w = Workload::command("main", &["pause"]);
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), cpu.parse().expect("quantity"));
    requests.insert("memory".to_string(), mem.parse().expect("quantity"));
    w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
    w
}

fn object(name: String, spec: Workload, labels: &[(&str, &str)]) -> Arc<Object<Workload>> {
    let mut o = Object::new(ObjectMeta::namespaced("default", name), spec);
    for (k, v) in labels {
        o.metadata.labels.insert(*k, *v);
    }
    Arc::new(o)
}

struct Case {
    name: &'static str,
    floor: f64,
    init: usize,
    measured: usize,
    node_labels: fn(usize) -> Vec<(&'static str, String)>,
    init_workload: fn(usize) -> Arc<Object<Workload>>,
    measured_workload: fn(usize) -> Arc<Object<Workload>>,
    /// Measured workloads that must end up placed (the rest are expected not to fit).
    expect_placed: usize,
}

fn plain(i: usize) -> Arc<Object<Workload>> {
    object(format!("init-{i}"), workload("100m", "500Mi"), &[])
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

fn measured_plain(i: usize) -> Arc<Object<Workload>> {
    object(format!("m-{i}"), workload("100m", "500Mi"), &[])
}

fn spread(i: usize) -> Arc<Object<Workload>> {
    let mut w = workload("100m", "500Mi");
    w.topology_spread_constraints.push(TopologySpreadConstraint {
        max_skew: 5,
        topology_key: "topology.kubernetes.io/zone".into(),
        when_unsatisfiable: WhenUnsatisfiable::DoNotSchedule,
        label_selector: LabelSelector::from_labels([("color", "blue")]),
    });
    object(format!("m-{i}"), w, &[("color", "blue")])
}

fn node_affinity(i: usize) -> Arc<Object<Workload>> {
    let mut w = workload("100m", "500Mi");
    w.affinity = Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required: vec![NodeSelectorTerm {
                match_expressions: vec![NodeSelectorRequirement {
                    key: "topology.kubernetes.io/zone".into(),
                    operator: NodeSelectorOperator::In,
                    values: vec!["zone1".into(), "zone2".into()],
                }],
            }],
            preferred: vec![],
        }),
        ..Default::default()
    });
    object(format!("m-{i}"), w, &[])
}

fn anti_affinity_spec() -> Workload {
    let mut w = workload("100m", "500Mi");
    w.affinity = Some(Affinity {
        workload_anti_affinity: Some(WorkloadAffinity {
            required: vec![AffinityTerm {
                label_selector: LabelSelector::from_labels([("color", "green")]),
                namespaces: vec![],
                topology_key: "kubernetes.io/hostname".into(),
            }],
            preferred: vec![],
        }),
        ..Default::default()
    });
    w
}

fn anti_init(i: usize) -> Arc<Object<Workload>> {
    object(format!("init-{i}"), anti_affinity_spec(), &[("color", "green")])
}

fn anti_measured(i: usize) -> Arc<Object<Workload>> {
    object(format!("m-{i}"), anti_affinity_spec(), &[("color", "green")])
}

fn low_priority(i: usize) -> Arc<Object<Workload>> {
    let mut w = workload("900m", "500Mi");
    w.priority = 1;
    object(format!("init-{i}"), w, &[])
}

fn high_priority(i: usize) -> Arc<Object<Workload>> {
    let mut w = workload("3", "500Mi");
    w.priority = 10;
    object(format!("m-{i}"), w, &[])
}

fn too_big(i: usize) -> Arc<Object<Workload>> {
    object(format!("init-{i}"), workload("200", "500Mi"), &[])
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "SchedulingBasic",
            floor: 810.0,
            init: 5_000,
            measured: 50_000,
            node_labels: no_labels,
            init_workload: plain,
            measured_workload: measured_plain,
            expect_placed: 50_000,
        },
        Case {
            name: "TopologySpreading",
            floor: 460.0,
            init: 5_000,
            measured: 5_000,
            node_labels: zones,
            init_workload: plain,
            measured_workload: spread,
            expect_placed: 5_000,
        },
        Case {
            name: "SchedulingNodeAffinity",
            floor: 220.0,
            init: 5_000,
            measured: 10_000,
            node_labels: zone1,
            init_workload: plain,
            measured_workload: node_affinity,
            expect_placed: 10_000,
        },
        Case {
            name: "SchedulingPodAntiAffinity",
            floor: 60.0,
            init: 1_000,
            measured: 2_000,
            node_labels: no_labels,
            init_workload: anti_init,
            measured_workload: anti_measured,
            expect_placed: 2_000,
        },
        Case {
            name: "PreemptionAsync",
            floor: 570.0,
            init: 20_000,
            measured: 5_000,
            node_labels: no_labels,
            init_workload: low_priority,
            measured_workload: high_priority,
            expect_placed: 5_000,
        },
        Case {
            name: "Unschedulable",
            floor: 590.0,
            init: 100,
            measured: 10_000,
            node_labels: no_labels,
            init_workload: too_big,
            measured_workload: measured_plain,
            expect_placed: 10_000,
        },
    ]
}

/// Builds the cluster with the initial workloads placed; returns the core and the measured
/// workloads ready to submit.
fn prepare(case: &Case) -> (SchedulingCore, Vec<Arc<Object<Workload>>>) {
    let mut core = SchedulingCore::new(Framework::default());
    for i in 0..NODES {
        core.upsert_node(&node(i, &(case.node_labels)(i)));
    }
    for i in 0..case.init {
        core.upsert_workload((case.init_workload)(i));
    }
    // The initial workloads' binds land (only bound workloads can be preempted).
    for o in core.run_until_idle() {
        if matches!(o.kind, OutcomeKind::Bound(_)) {
            core.bound(&o.workload.key);
        }
    }
    let measured = (0..case.measured).map(case.measured_workload).collect();
    (core, measured)
}

/// Submits and schedules the measured workloads; returns how many were placed.
fn run(core: &mut SchedulingCore, measured: Vec<Arc<Object<Workload>>>) -> usize {
    for w in measured {
        core.upsert_workload(w);
    }
    core.run_until_idle()
        .iter()
        .filter(|o| {
            o.workload.key.name.starts_with("m-")
                && matches!(o.kind, OutcomeKind::Bound(_) | OutcomeKind::Preempted { .. })
        })
        .count()
}

static RESULTS: Mutex<Vec<(&'static str, f64, f64, usize)>> = Mutex::new(Vec::new());

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    for case in cases() {
        g.throughput(Throughput::Elements(case.measured as u64));
        g.measurement_time(Duration::from_secs(1));
        let mut times = Vec::new();
        g.bench_function(case.name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut core, measured) = prepare(&case);
                    let start = Instant::now();
                    let placed = run(&mut core, measured);
                    let took = start.elapsed();
                    assert_eq!(placed, case.expect_placed, "{}: placed {placed}", case.name);
                    times.push(took);
                    total += took;
                }
                total
            })
        });
        if !times.is_empty() {
            times.sort();
            let median = times[times.len() / 2];
            let rate = case.measured as f64 / median.as_secs_f64();
            RESULTS.lock().expect("results").push((case.name, rate, case.floor, times.len()));
        }
    }
    g.finish();
}

/// The basic case end to end: workloads created in the in-memory store, scheduled by the
/// [`SchedulerService`] and bound by compare-and-swap writes, timed until every one is bound.
fn through_store(nodes: usize, workloads: usize) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().history_limit(200_000).build());
        let node_api: Api<Node> = Api::all(store.clone());
        for i in 0..nodes {
            node_api.create(&node(i, &[])).await.expect("node");
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = tokio::spawn(SchedulerService::new(Profile::default_profile()).run(store.clone(), async {
            let _ = stopped.await;
        }));
        let api: Api<Workload> = Api::namespaced(store.clone(), "default");
        let cache: Cache<Workload> = Cache::spawn(store.clone(), CacheConfig::default());
        cache.ready().await;
        let bound = |cache: &Cache<Workload>| cache.list().iter().filter(|w| w.spec.node_name.is_some()).count();
        api.create(&(*object("warm-up".into(), workload("100m", "500Mi"), &[])).clone()).await.expect("create");
        while bound(&cache) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let start = Instant::now();
        for i in 0..workloads {
            api.create(&(*object(format!("m-{i}"), workload("100m", "500Mi"), &[])).clone()).await.expect("create");
        }
        while bound(&cache) < workloads + 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = start.elapsed();
        let _ = stop.send(());
        let _ = service.await;
        took
    })
}

fn bench_store(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler_store");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    let (nodes, workloads) = (NODES, 10_000);
    g.throughput(Throughput::Elements(workloads as u64));
    let mut times = Vec::new();
    g.bench_function("SchedulingBasic through the memory store", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let took = through_store(nodes, workloads);
                times.push(took);
                total += took;
            }
            total
        })
    });
    g.finish();
    if !times.is_empty() {
        times.sort();
        let rate = workloads as f64 / times[times.len() / 2].as_secs_f64();
        RESULTS.lock().expect("results").push((
            "SchedulingBasic, created in and bound through the memory store",
            rate,
            810.0,
            times.len(),
        ));
    }
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench, super::bench_store);
}

fn main() {
    group::benches();
    Criterion::default().configure_from_args().final_summary();
    let results = RESULTS.lock().expect("results");
    if !results.is_empty() {
        println!("\n| case | pods/s (median of {} runs) | kube-scheduler floor | ratio |", results[0].3);
        println!("|---|---|---|---|");
        for (name, rate, floor, _) in results.iter() {
            println!("| {name} | {rate:.0} | {floor:.0} | {:.0}x |", rate / floor);
        }
    }
}
