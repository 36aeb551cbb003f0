//! A cluster that grows and shrinks with its work: a node provisioner beside the scheduler.
//!
//! The cluster starts with no node. Ten workloads of one CPU arrive; the scheduler marks them
//! unschedulable, the provisioner plans them onto new 4-CPU nodes of the `general` pool and
//! launches those nodes (each an agent on the simulated runtime, in this process). Each node,
//! once registered, is given the workloads planned for it and opened; the workloads run. When
//! the work is done and the nodes have stayed empty for two seconds, they go back.
//!
//! `cargo run -p orch-examples --example autoscaling`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use orch_controllers::Provisioner;
use orch_controllers::ProvisionerConfig;
use orch_core::kinds::{Node, Phase, ResourceRequirements, Resources, Workload};
use orch_core::provider::NodePool;
use orch_core::{Api, ListParams, Manager, Object, ObjectMeta, Quantity, Store};
use orch_runtime::LocalNodes;
use orch_runtime::SimCluster;
use orch_scheduler::Profile;
use orch_scheduler::SchedulerConfig;
use orch_scheduler::SchedulerService;
use orch_store::MemoryStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cluster = SimCluster::new();
    let sim = cluster.clone();
    let nodes = Arc::new(LocalNodes::new(store.clone(), move |name| Arc::new(sim.node(name))));

    let mut shape = Resources::new();
    shape.insert("cpu".into(), Quantity::from_units(4));
    shape.insert("memory".into(), "16Gi".parse()?);
    shape.insert("pods".into(), Quantity::from_units(30));
    let general = NodePool::new("general", shape, 5).empty_after(Duration::from_secs(2));
    let mut manager = Manager::new(store.clone());
    let quick = SchedulerConfig {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        ..SchedulerConfig::default()
    };
    manager.add(SchedulerService::new(Profile::default_profile()).config(quick));
    let every = ProvisionerConfig { interval: Duration::from_millis(200), ..Default::default() };
    manager.add(Provisioner::new(vec![general], nodes.clone()).config(every));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let control_plane = tokio::spawn(manager.run(async {
        let _ = stopped.await;
    }));

    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    let node_api: Api<Node> = Api::all(store.clone());
    println!("no node yet; 10 workloads of 1 CPU arrive");
    for i in 0..10 {
        let mut w = Workload::command("main", &["sim"]);
        let mut requests = BTreeMap::new();
        requests.insert("cpu".to_string(), Quantity::from_units(1));
        w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
        workloads.create(&Object::new(ObjectMeta::named(format!("job-{i}")), w)).await?;
    }
    wait(|| async {
        let list = workloads.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
        list.iter().all(|w| w.status.phase == Phase::Running)
    })
    .await?;
    let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in workloads.list(&ListParams::default()).await?.items {
        per_node.entry(w.spec.node_name.clone().unwrap_or_default()).or_default().push(w.metadata.name);
    }
    println!("all running, on {} new nodes:", per_node.len());
    for (node, names) in &per_node {
        println!("  {node}: {}", names.join(" "));
    }

    println!("the work is done: the workloads are deleted");
    for w in workloads.list(&ListParams::default()).await?.items {
        workloads.delete(&w.metadata.name, &Default::default()).await?;
    }
    wait(|| async { node_api.list(&ListParams::default()).await.is_ok_and(|l| l.items.is_empty()) }).await?;
    println!("every node went back after staying empty; agents running: {}", nodes.running().len());
    let _ = stop.send(());
    control_plane.await??;
    println!("stopped cleanly");
    Ok(())
}

/// Polls `done` until it holds, for at most a minute.
async fn wait<F, Fut>(mut done: F) -> Result<(), Box<dyn std::error::Error>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if done().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("timed out".into())
}
