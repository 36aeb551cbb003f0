//! The scheduling core alone, on the shapes of kube-scheduler's `scheduler_perf` cases: no
//! store, no decoding, no bind write. Objects are built before the timer; each case places its
//! initial workloads first (not timed), then times the arrival and scheduling of the measured
//! ones through the [`SchedulingCore`] (queue, snapshot, the default profile with every plugin,
//! no sampling: every feasible node is evaluated for every workload).
//!
//! These figures are not comparable with kube-scheduler's floors, which are measured end to end
//! through an API server: `benches/benches/scheduler_e2e.rs` measures that, on our stores.
//!
//! Nodes: 4 CPU, 32 Gi, 110 pods. Workloads: 100m CPU, 500 Mi unless the case says otherwise.
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
use orch_core::{LabelSelector, Object, ObjectMeta, Quantity};
use orch_scheduler::Framework;
use orch_scheduler::SchedulingCore;
use orch_scheduler::core::OutcomeKind;

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
            init: 5_000,
            measured: 50_000,
            node_labels: no_labels,
            init_workload: plain,
            measured_workload: measured_plain,
            expect_placed: 50_000,
        },
        Case {
            name: "TopologySpreading",
            init: 5_000,
            measured: 5_000,
            node_labels: zones,
            init_workload: plain,
            measured_workload: spread,
            expect_placed: 5_000,
        },
        Case {
            name: "SchedulingNodeAffinity",
            init: 5_000,
            measured: 10_000,
            node_labels: zone1,
            init_workload: plain,
            measured_workload: node_affinity,
            expect_placed: 10_000,
        },
        Case {
            name: "SchedulingPodAntiAffinity",
            init: 1_000,
            measured: 2_000,
            node_labels: no_labels,
            init_workload: anti_init,
            measured_workload: anti_measured,
            expect_placed: 2_000,
        },
        Case {
            name: "PreemptionAsync",
            init: 20_000,
            measured: 5_000,
            node_labels: no_labels,
            init_workload: low_priority,
            measured_workload: high_priority,
            expect_placed: 5_000,
        },
        Case {
            name: "Unschedulable",
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

static RESULTS: Mutex<Vec<(&'static str, f64, usize)>> = Mutex::new(Vec::new());

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
            RESULTS.lock().expect("results").push((case.name, rate, times.len()));
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
        println!("\nscheduling core, no store:");
        println!("| case | pods/s (median) | runs |");
        println!("|---|---|---|");
        for (name, rate, runs) in results.iter() {
            println!("| {name} | {rate:.0} | {runs} |");
        }
    }
}
