//! A custom scheduling plugin added to the default scheduler.
//!
//! `CheapPool` is a score plugin: nodes labelled `pool=cheap` (spot machines, say) score higher
//! than on-demand ones, so workloads land there while the cheap pool has room and spill over to
//! on-demand nodes when it has not. It joins the default profile with a weight, in place of
//! `BalancedAllocation`; every other default plugin (resources fit, taints, affinity, spread,
//! gangs, preemption…) keeps working. A [`SchedulingCore`] runs it on four nodes and a few
//! workloads and prints where each went and why, then one workload that fits nowhere with the
//! scheduler's explanation.
//!
//! `cargo run -p orch-examples --example scheduler-plugin`

use std::collections::BTreeMap;
use std::sync::Arc;

use orch_core::kinds::{Node, ResourceRequirements, Workload};
use orch_core::{Object, ObjectMeta};
use orch_scheduler::Framework;
use orch_scheduler::SchedulingCore;
use orch_scheduler::core::OutcomeKind;
use orch_scheduler::framework::MAX_SCORE;
use orch_scheduler::plugins::{ScoringStrategy, default_profile};
use orch_scheduler::snapshot::CPU;
use orch_scheduler::{Ctx, NodeInfo, Plugin, Points};

/// Prefers nodes of the cheap pool.
///
/// Its score depends on the node alone (the default [`Plugin::locality`] says so), which lets
/// the framework compute it once per node and kind of workload and reuse it until the node
/// changes.
#[derive(Debug, Clone)]
struct CheapPool;

impl Plugin for CheapPool {
    fn name(&self) -> &str {
        "CheapPool"
    }

    fn points(&self) -> Points {
        Points::SCORE
    }

    fn score(&self, _: &Ctx<'_>, node: &NodeInfo) -> i64 {
        if is_cheap(node) { MAX_SCORE } else { 0 }
    }
}

fn is_cheap(node: &NodeInfo) -> bool {
    node.labels.get("pool").is_some_and(|p| p == "cheap")
}

fn node(name: &str, pool: &str, cpu: &str) -> Object<Node> {
    let mut n = Object::new(ObjectMeta::named(name), Node::default());
    n.metadata.labels.insert("pool", pool);
    n.status.allocatable.insert("cpu".into(), cpu.parse().expect("quantity"));
    n.status.allocatable.insert("memory".into(), "32Gi".parse().expect("quantity"));
    n
}

fn workload(name: &str, cpu: &str) -> Arc<Object<Workload>> {
    let mut w = Workload::command("main", &["serve"]);
    let requests = BTreeMap::from([
        ("cpu".to_string(), cpu.parse().expect("quantity")),
        ("memory".to_string(), "2Gi".parse().expect("quantity")),
    ]);
    w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
    Arc::new(Object::new(ObjectMeta::namespaced("default", name), w))
}

fn main() {
    // The default plugins, minus BalancedAllocation (its preference for evenly used cpu and
    // memory is noise next to a cost preference), plus CheapPool. Scores are weighted and
    // summed: least-allocated scoring gives at most 100 x 1, so CheapPool's 100 x 2 makes a
    // cheap node win whenever one fits, and among cheap nodes the emptiest wins.
    let profile = default_profile(ScoringStrategy::LeastAllocated).without("BalancedAllocation").with(CheapPool, 2);
    // (To name it in a profile configuration file instead, register it:
    // `Registry::default().register_plugin("CheapPool", CheapPool)`.)
    let mut core = SchedulingCore::new(Framework::new(profile));

    core.upsert_node(&node("cheap-1", "cheap", "4"));
    core.upsert_node(&node("cheap-2", "cheap", "4"));
    core.upsert_node(&node("on-demand-1", "on-demand", "16"));
    core.upsert_node(&node("on-demand-2", "on-demand", "16"));

    let arrivals = [
        ("web-0", "1500m"),
        ("web-1", "1500m"),
        ("web-2", "1500m"),
        ("web-3", "1500m"),
        ("web-4", "1500m"),
        ("batch-0", "6"),
        ("huge", "24"),
    ];
    for (name, cpu) in arrivals {
        core.upsert_workload(workload(name, cpu));
        for outcome in core.run_until_idle() {
            let name = &outcome.workload.key.name;
            match &outcome.kind {
                OutcomeKind::Bound(p) => {
                    let snapshot = core.snapshot();
                    let placed_on = snapshot.node_id(&p.node_name).and_then(|id| snapshot.node(id));
                    let why = if placed_on.is_some_and(is_cheap) {
                        "cheap pool, emptiest cheap node".to_string()
                    } else {
                        let free: Vec<String> = snapshot
                            .nodes()
                            .filter(|n| is_cheap(n))
                            .map(|n| format!("{} has {}m cpu free", n.name, n.free(CPU)))
                            .collect();
                        format!("no room in the cheap pool ({})", free.join(", "))
                    };
                    println!("{name:8} ({cpu:>5} cpu) -> {:12} {why}", p.node_name);
                }
                OutcomeKind::Unschedulable(d) => println!("{name:8} ({cpu:>5} cpu) -> unschedulable: {}", d.message()),
                other => println!("{name:8} -> {other:?}"),
            }
        }
    }
}
