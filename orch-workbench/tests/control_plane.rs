//! The workbench's fast path is the code a cluster runs: the same short experiment, replayed
//! through the [`SchedulingCore`](orch_scheduler::SchedulingCore) directly and through the full
//! control plane in virtual time (a memory store, the scheduler service, simulated agents on
//! every node), places every task on the same node and the same GPU devices, for every policy.

use std::sync::Arc;
use std::time::Duration;

use orch_core::kinds::{ConditionStatus, Node, Workload, find_condition};
use orch_core::{Api, Runtime, Store, Timestamp, TokioClock};
use orch_runtime::{Agent, AgentConfig, SimCluster};
use orch_scheduler::{DEVICES_ANNOTATION, Framework, SCHEDULED_CONDITION, SchedulerService};
use orch_store::MemoryStore;
use orch_workbench::arrivals::paper_order;
use orch_workbench::experiment::{node_object, task_object};
use orch_workbench::{Arrivals, Experiment, NodeRow, Placed, Policy, TaskRow, Trace};

/// Eight nodes of three GPU models and sizes, and 40 tasks of every kind (shares, whole and
/// multi-GPU, cpu only, some bound to a model): inflated to 1.3 x, some fit nowhere.
fn trace() -> Arc<Trace> {
    let nodes = (0..8)
        .map(|i| NodeRow {
            name: format!("node-{i}"),
            cpu_milli: [32_000, 64_000, 16_000][i % 3],
            memory_mib: 131_072,
            gpus: [8, 2, 4][i % 3],
            model: ["T4", "V100", "P100"][i % 3].into(),
        })
        .collect();
    let shapes: [(i64, u32, i64, &str); 8] = [
        (4000, 1, 500, ""),
        (8000, 1, 1000, ""),
        (2000, 0, 0, ""),
        (4000, 1, 250, "T4"),
        (12000, 2, 1000, ""),
        (1000, 1, 700, ""),
        (6000, 4, 1000, "V100|P100"),
        (3000, 1, 300, ""),
    ];
    let tasks = (0..40)
        .map(|i| {
            let (cpu, num, milli, spec) = shapes[(i * 5) % shapes.len()];
            TaskRow {
                name: format!("task-{i:03}"),
                cpu_milli: cpu,
                memory_mib: 2048,
                num_gpu: num,
                gpu_milli: milli,
                gpu_spec: spec.split('|').filter(|s| !s.is_empty()).map(String::from).collect(),
                creation: None,
                deletion: None,
            }
        })
        .collect();
    Arc::new(Trace { nodes, tasks, name: "small".into() })
}

/// Replays `e` through a store, the scheduler service and simulated agents: one task at a time
/// (created, then waited for until it is bound or marked unschedulable, when it is deleted, as
/// the fast path drops it).
async fn control_plane(e: &Experiment) -> Vec<Placed> {
    let clock = Arc::new(TokioClock::starting_at(Timestamp(0)));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
    // The nodes with their GPUs (the agents do not discover devices), before anything runs;
    // each agent then registers on its node object.
    let node_api: Api<Node> = Api::all(store.clone());
    let mut rows: Vec<&NodeRow> = e.trace.nodes.iter().collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let cluster = SimCluster::new();
    let mut stops = Vec::new();
    for row in &rows {
        let node = node_object(row);
        node_api.create(&node).await.expect("create node");
        let mut config = AgentConfig::new(&row.name);
        config.capacity = Some(node.status.allocatable.clone());
        config.labels = node.metadata.labels.clone();
        let runtime: Arc<dyn Runtime> = Arc::new(cluster.node(&row.name));
        let agent = Agent::new(config, store.clone(), runtime).with_clock(clock.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push((
            tx,
            tokio::spawn(agent.run(
                async move {
                    let _ = rx.await;
                },
                false,
            )),
        ));
    }
    let profile = e.policy.profile(e.seed, &e.target, e.scale);
    let scheduler_name = profile.name.clone();
    let service =
        SchedulerService::with_scheduler(Framework::new(profile).with_class_capacity(1024)).clock(clock.clone());
    let (stop_scheduler, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(service.run(store.clone(), async move {
        let _ = stopped.await;
    }));

    let Arrivals::Paper { inflation } = e.arrivals else { panic!("paper arrivals only") };
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let mut placements = Vec::new();
    for a in paper_order(&e.trace, e.seed, inflation) {
        let mut object = task_object(&e.trace.tasks[a.task], &a.name);
        object.spec.scheduler_name = Some(scheduler_name.clone());
        api.create(&object).await.expect("create task");
        let mut waited = 0;
        let placed = loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
            assert!(waited < 10_000, "{} was neither bound nor refused", a.name);
            let w = api.get(&a.name).await.expect("get task");
            if let Some(node) = &w.spec.node_name {
                let devices = w
                    .metadata
                    .annotations
                    .get(DEVICES_ANNOTATION)
                    .map(|text| {
                        text.split(',')
                            .filter(|p| !p.is_empty())
                            .map(|p| {
                                let (id, milli) = p.rsplit_once(':').expect("id:milli");
                                (id.to_string(), milli.parse::<i64>().expect("milli"))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                break Placed { task: a.name.clone(), node: Some(node.clone()), devices };
            }
            if find_condition(&w.status.conditions, SCHEDULED_CONDITION)
                .is_some_and(|c| c.status == ConditionStatus::False)
            {
                api.delete(&a.name, &Default::default()).await.expect("delete refused task");
                break Placed { task: a.name.clone(), node: None, devices: Vec::new() };
            }
        };
        placements.push(placed);
    }
    let _ = stop_scheduler.send(());
    scheduler.await.expect("scheduler");
    for (tx, task) in stops {
        let _ = tx.send(());
        task.await.expect("agent").expect("agent ran");
    }
    placements
}

#[tokio::test(start_paused = true)]
async fn the_fast_path_and_the_control_plane_place_every_task_alike() {
    let trace = trace();
    for policy in Policy::ALL {
        let e = Experiment::new(trace.clone(), policy, 11);
        let fast = e.run();
        assert_eq!(fast.refused, 0);
        let dropped = fast.placements.iter().filter(|p| p.node.is_none()).count();
        assert!(dropped > 0 && dropped < fast.placements.len() / 2, "{policy}: some tasks fit nowhere ({dropped})");
        assert!(
            fast.placements.iter().any(|p| p.devices.iter().any(|d| d.1 < 1000)),
            "{policy}: some GPU shares were handed out"
        );
        let slow = control_plane(&e).await;
        assert_eq!(slow.len(), fast.placements.len(), "{policy}");
        for (a, b) in fast.placements.iter().zip(&slow) {
            assert_eq!(a, b, "{policy}: the fast path and the control plane differ");
        }
    }
}
