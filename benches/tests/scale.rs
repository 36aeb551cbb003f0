//! The node-scale scenario at a CI size (correctness only; the figures come from the `scale`
//! bench): 1,000 nodes and 30,000 workloads on the memory store, 200 nodes on the embedded one.
//! Every workload runs, every workload of a stopped node is evicted, nothing on a live node is
//! touched, and a one-node list finds the node's workloads.

use orch_benches::scale::{Backend, Scale, run};

#[test]
fn a_thousand_nodes_run_their_workloads_and_lose_only_the_dead_nodes_ones() {
    let r = run(&Scale { nodes: 1_000, per_node: 30, dead_every: 20, backend: Backend::Memory });
    assert_eq!(r.workloads, 30_000);
    assert_eq!(r.dead_nodes, 50);
    assert!(r.on_dead > 50 * 25, "the dead nodes held their share: {}", r.on_dead);
    assert_eq!(r.evicted, r.on_dead, "every workload of a stopped node is evicted");
    assert_eq!(r.live_touched, 0, "nothing on a live node is deleted or marked Unknown");
    assert!(r.one_node > 0);
    assert_eq!(r.one_node, r.one_node_cached, "the store's field index finds the node's workloads");
}

#[test]
fn the_embedded_store_runs_the_same_scenario() {
    let dir = std::env::temp_dir().join(format!("orch-scale-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let r = run(&Scale { nodes: 200, per_node: 30, dead_every: 20, backend: Backend::Embedded(dir.join("s.redb")) });
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!((r.workloads, r.dead_nodes, r.live_touched), (6_000, 10, 0));
    assert_eq!(r.evicted, r.on_dead);
    assert!(r.one_node > 0);
    assert_eq!(r.one_node, r.one_node_cached);
}
