//! Heap bytes the node agent spends per managed instance, counted by dhat.
//!
//! `cargo bench -p orch-benches --bench agent_memory`
//!
//! One agent on a simulated node runs 2,000 single-container workloads. The headline is the heap
//! growth from "workloads stored, agent not started" to "all running", per instance. It includes
//! everything running them costs: the agent's workload cache (decoded objects and indexes), its
//! per-instance records, the exit watchers, the simulated runtime's records, and the status the
//! agent wrote to the store. The split printed after it is rough (see the labels).

use std::sync::Arc;
use std::time::Duration;

use orch_core::kinds::{Phase, Workload};
use orch_core::{Api, ListParams, Object, ObjectMeta, Runtime, Store};
use orch_runtime::Agent;
use orch_runtime::AgentConfig;
use orch_runtime::SimCluster;
use orch_store::MemoryStore;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = if std::env::args().any(|a| a == "--test") { 50 } else { 2_000 };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
    let _profiler = dhat::Profiler::builder().testing().build();
    rt.block_on(async move {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().history_limit(1_000).build());
        let api: Api<Workload> = Api::namespaced(store.clone(), "default");
        for i in 0..n {
            let mut w = Workload::command("main", &["sim"]);
            w.node_name = Some("sim-1".into());
            api.create(&Object::new(ObjectMeta::named(format!("w-{i:05}")), w)).await.expect("create");
        }
        let cluster = SimCluster::new();
        let runtime: Arc<dyn Runtime> = Arc::new(cluster.node("sim-1"));
        let before = dhat::HeapStats::get().curr_bytes;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(Agent::new(AgentConfig::new("sim-1"), store.clone(), runtime).run(
            async move {
                let _ = rx.await;
            },
            false,
        ));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let running = api
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .filter(|w| w.status.phase == Phase::Running)
            .count();
        assert_eq!(running, n, "every workload running");
        let with_agent = dhat::HeapStats::get().curr_bytes;
        // The store's share: the same growth without the agent is the status it wrote.
        let store_now = store.current_revision().await.expect("revision");
        let total = with_agent as f64 - before as f64;
        println!("agent_memory/{n} instances on one simulated node (store at revision {store_now})");
        println!("  heap growth with the agent running everything: {:.0} B/instance", total / n as f64);
        let _ = tx.send(());
        let _ = agent.await;
        let after_stop = dhat::HeapStats::get().curr_bytes;
        println!(
            "  released when the agent stops (its records, probe state, tasks): {:.0} B/instance",
            (with_agent as f64 - after_stop as f64) / n as f64
        );
        println!(
            "  still held after (store status writes, runtime records, the agent's cache until its reflector exits): {:.0} B/instance",
            (after_stop as f64 - before as f64) / n as f64
        );
    });
}
