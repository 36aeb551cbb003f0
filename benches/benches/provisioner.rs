//! The node provisioner's pass at cluster scale: 1,000 full nodes (4 CPU each, four 1-CPU
//! workloads bound on each) and 1,000 workloads marked unschedulable (1 CPU each, so 250 new
//! 4-CPU nodes). One pass plans them with the scheduler's plugins on a copy of the cluster and
//! creates the new nodes in a memory store; the provider launches nothing, so what is timed is
//! the provisioner's own work. A second pass, with those nodes launching, finds nothing to ask
//! for.
//!
//! `cargo bench -p orch-benches --bench provisioner`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use orch_controllers::Provisioner;
use orch_core::kinds::{Condition, ConditionStatus, Node, ResourceRequirements, Resources, Workload};
use orch_core::provider::NodePool;
use orch_core::provider::NodeProvider;
use orch_core::{Object, ObjectMeta, Quantity, Store};
use orch_scheduler::SCHEDULED_CONDITION;
use orch_store::MemoryStore;

const NODES: usize = 1_000;
const PENDING: usize = 1_000;

/// Launches nothing.
struct Nothing;

#[async_trait::async_trait]
impl NodeProvider for Nothing {
    async fn launch(&self, name: &str, _pool: &NodePool) -> Result<String, orch_core::provider::ProviderError> {
        Ok(format!("none://{name}"))
    }
    async fn terminate(&self, _name: &str, _pool: &NodePool) -> Result<(), orch_core::provider::ProviderError> {
        Ok(())
    }
}

fn shape() -> Resources {
    let mut r = Resources::new();
    r.insert("cpu".into(), Quantity::from_units(4));
    r.insert("memory".into(), "32Gi".parse().expect("quantity"));
    r.insert("pods".into(), Quantity::from_units(110));
    r
}

fn workload(i: usize, node: Option<String>) -> Arc<Object<Workload>> {
    let mut w = Workload::command("main", &["pause"]);
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), Quantity::from_units(1));
    requests.insert("memory".to_string(), "1Gi".parse().expect("quantity"));
    w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
    w.node_name = node.clone();
    let mut o = Object::new(ObjectMeta::namespaced("default", format!("w-{i:05}")), w);
    o.metadata.create_revision = i as u64 + 1;
    if node.is_none() {
        o.status.conditions.push(Condition::new(SCHEDULED_CONDITION, ConditionStatus::False, "Unschedulable"));
    }
    Arc::new(o)
}

/// The nodes and the workloads (bound, then waiting).
type Cluster = (Vec<Arc<Object<Node>>>, Vec<Arc<Object<Workload>>>);

fn cluster() -> Cluster {
    let mut nodes = Vec::with_capacity(NODES);
    let mut workloads = Vec::with_capacity(NODES * 4 + PENDING);
    for i in 0..NODES {
        let name = format!("node-{i:05}");
        let mut n = Object::new(ObjectMeta::named(name.clone()), Node::default());
        n.status.allocatable = shape();
        nodes.push(Arc::new(n));
        for j in 0..4 {
            workloads.push(workload(i * 4 + j, Some(name.clone())));
        }
    }
    for i in 0..PENDING {
        workloads.push(workload(NODES * 4 + i, None));
    }
    (nodes, workloads)
}

static RESULTS: Mutex<Vec<(String, Duration, usize)>> = Mutex::new(Vec::new());

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (nodes, workloads) = cluster();
    let mut g = c.benchmark_group("provisioner");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.bench_function("pass: 1,000 pending onto 1,000 full nodes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
                let pool = NodePool::new("general", shape(), 10_000);
                let mut p = Provisioner::new(vec![pool], Arc::new(Nothing));
                let start = Instant::now();
                let report = rt.block_on(p.pass(&store, None, &nodes, &workloads)).expect("pass");
                let took = start.elapsed();
                total += took;
                assert_eq!(report.launched.len(), PENDING / 4, "four 1-CPU workloads per new 4-CPU node");
                // Again, with those nodes launching: nothing more to ask for.
                let launched: Vec<Arc<Object<Node>>> = rt.block_on(async {
                    let api: orch_core::Api<Node> = orch_core::Api::all(store.clone());
                    api.list(&Default::default()).await.expect("list").items.into_iter().map(Arc::new).collect()
                });
                let all: Vec<_> = nodes.iter().cloned().chain(launched).collect();
                let again = rt.block_on(p.pass(&store, None, &all, &workloads)).expect("pass");
                assert!(again.launched.is_empty(), "asked twice");
                RESULTS.lock().expect("results").push(("pass".into(), took, report.launched.len()));
            }
            total
        })
    });
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
    let mut results = RESULTS.lock().expect("results");
    if !results.is_empty() {
        results.sort_by_key(|r| r.1);
        let median = &results[results.len() / 2];
        println!(
            "\nprovisioner pass, {PENDING} pending onto {NODES} full nodes: median {:.1} ms over {} passes, {} nodes asked for",
            median.1.as_secs_f64() * 1e3,
            results.len(),
            median.2
        );
    }
}
