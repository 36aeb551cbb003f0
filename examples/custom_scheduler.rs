//! Replacing the whole scheduler: first-fit-decreasing bin packing as an
//! [`orch_scheduler::Scheduler`].
//!
//! The policy sees each batch of pending workloads and a read-only [`Snapshot`] of the cluster,
//! takes the biggest workloads first and puts each on the first node (in node order) with room,
//! and answers with one [`Decision`] per workload. A [`SchedulingCore`] with
//! [`with_batch`](SchedulingCore::with_batch) hands it up to 64 workloads at a time and applies
//! the decisions, checking every placement against the snapshot.
//!
//! Two runs on the same two nodes and workloads:
//! 1. the policy counts its own earlier decisions in the batch: everything that can fit does;
//! 2. a buggy variant forgets them and sends several workloads to a node that holds only one:
//!    the core refuses each placement that would overcommit the node (the workload retries
//!    after a backoff), so no node is ever overcommitted, whatever the policy decides.
//!
//! `cargo run -p orch-examples --example custom-scheduler`

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use orch_core::kinds::{Node, ResourceRequirements, Workload};
use orch_core::{Object, ObjectMeta};
use orch_scheduler::Decision;
use orch_scheduler::Scheduler;
use orch_scheduler::SchedulingCore;
use orch_scheduler::Snapshot;
use orch_scheduler::core::OutcomeKind;
use orch_scheduler::snapshot::{CPU, Dim, MEMORY};
use orch_scheduler::{Diagnosis, Events, NodeId, Placement, WorkloadInfo};

/// First-fit decreasing: biggest (cpu, then memory) first, each on the first node with room.
struct FirstFitDecreasing {
    /// Whether to count the batch's earlier decisions: the snapshot shows them only after the
    /// core has applied the whole batch. `false` is the bug of run 2.
    remember_batch: bool,
}

/// What this batch's decisions so far take from each node, on top of the snapshot.
type Taken = HashMap<NodeId, HashMap<Dim, i64>>;

impl FirstFitDecreasing {
    fn first_fit(&self, snapshot: &Snapshot, w: &WorkloadInfo, taken: &mut Taken) -> Decision {
        let fits = |node: &orch_scheduler::NodeInfo, taken: &Taken| {
            let mine = taken.get(&node.id);
            w.requests.iter().all(|&(d, m)| node.free(d) - mine.and_then(|t| t.get(&d)).copied().unwrap_or(0) >= m)
        };
        let Some(node) = snapshot.nodes().find(|n| fits(n, taken)) else {
            return Decision::Unschedulable(Diagnosis {
                nodes: snapshot.node_count(),
                reasons: vec![("no room left".into(), snapshot.node_count())],
                // Retry when room may have appeared.
                wake_on: Events::NODE_ADDED | Events::NODE_UPDATED | Events::WORKLOAD_DELETED,
                rejected: None,
            });
        };
        if self.remember_batch {
            for &(d, m) in &w.requests {
                *taken.entry(node.id).or_default().entry(d).or_default() += m;
            }
        }
        // Devices left empty: the core picks GPU shares itself (none are asked for here).
        Decision::Place(Placement { node: node.id, node_name: node.name.clone(), devices: Vec::new() })
    }
}

impl Scheduler for FirstFitDecreasing {
    fn name(&self) -> &str {
        "first-fit-decreasing"
    }

    fn schedule(&mut self, snapshot: &Snapshot, workload: &WorkloadInfo) -> Decision {
        self.first_fit(snapshot, workload, &mut Taken::new())
    }

    fn schedule_batch(&mut self, snapshot: &Snapshot, batch: &[Arc<WorkloadInfo>]) -> Option<Vec<Decision>> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse((batch[i].request(CPU), batch[i].request(MEMORY))));
        let mut taken = Taken::new();
        let mut decisions: Vec<Option<Decision>> = vec![None; batch.len()];
        for i in order {
            decisions[i] = Some(self.first_fit(snapshot, &batch[i], &mut taken));
        }
        // One decision per workload, in the batch's order.
        decisions.into_iter().collect()
    }
}

fn node(name: &str) -> Object<Node> {
    let mut n = Object::new(ObjectMeta::named(name), Node::default());
    n.status.allocatable.insert("cpu".into(), "4".parse().expect("quantity"));
    n.status.allocatable.insert("memory".into(), "16Gi".parse().expect("quantity"));
    n
}

fn workload(name: &str, cpu: &str) -> Arc<Object<Workload>> {
    let mut w = Workload::command("main", &["crunch"]);
    let requests = BTreeMap::from([
        ("cpu".to_string(), cpu.parse().expect("quantity")),
        ("memory".to_string(), "1Gi".parse().expect("quantity")),
    ]);
    w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
    Arc::new(Object::new(ObjectMeta::namespaced("default", name), w))
}

fn run(remember_batch: bool) {
    let mut core = SchedulingCore::new(FirstFitDecreasing { remember_batch }).with_batch(64);
    core.upsert_node(&node("node-a"));
    core.upsert_node(&node("node-b"));
    // Two 4-cpu nodes. In arrival order, plain first fit would put both small ones on node-a
    // and then have no room for the second big one; biggest first, everything fits.
    for (name, cpu) in [("small-1", "1"), ("small-2", "1"), ("big-1", "3"), ("big-2", "3"), ("too-big", "6")] {
        core.upsert_workload(workload(name, cpu));
    }
    // Three rounds, a few seconds apart so refused workloads come out of their backoff. A
    // workload found unschedulable in a batch whose other members were placed is retried once
    // too: those placements are cluster events that happened while it was being scheduled.
    for round in 0..3 {
        core.set_time(round * 5_000);
        for o in core.run_until_idle() {
            let name = &o.workload.key.name;
            match &o.kind {
                OutcomeKind::Bound(p) => println!("  {name:8} -> {}", p.node_name),
                OutcomeKind::Refused(why) => println!("  {name:8} refused by the core: {why}"),
                OutcomeKind::Unschedulable(d) => println!("  {name:8} unschedulable: {}", d.message()),
                other => println!("  {name:8} {other:?}"),
            }
        }
    }
    for n in core.snapshot().nodes() {
        let (used, alloc) = (n.requested(CPU), n.allocatable(CPU));
        assert!(used <= alloc, "the core never lets a node be overcommitted");
        println!("  {}: {}m of {}m cpu requested", n.name, used, alloc);
    }
}

fn main() {
    println!("1. first-fit decreasing, counting its own decisions within a batch:");
    run(true);
    println!("2. the buggy variant, which forgets them:");
    run(false);
}
