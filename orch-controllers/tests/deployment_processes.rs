//! A deployment rolled out and back on real processes: the process runtime under a node agent,
//! with the scheduler and the deployment controllers, in real time.

use std::sync::Arc;
use std::time::Duration;

use orch_controllers::deployment;
use orch_controllers::{DeploymentController, GarbageCollector, ReplicaSetController};
use orch_core::kinds::{
    ConditionStatus, ContainerState, Deployment, EnvVar, IntOrPercent, Phase, RollingUpdate, Strategy, Workload,
    find_condition,
};
use orch_core::{Api, ListParams, Manager, Object, ObjectMeta, Runtime, Store, testkit};
use orch_runtime::{Agent, AgentConfig, ProcessRuntime};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::MemoryStore;

fn sleeper(version: &str) -> Workload {
    let mut w = Workload::command("main", &["/bin/sleep", "300"]);
    w.containers[0].env = vec![EnvVar { name: "VERSION".into(), value: version.into() }];
    w
}

/// The versions of the workloads whose process runs (phase Running, container running).
async fn running_versions(api: &Api<Workload>) -> Vec<String> {
    let mut out: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|w| {
            w.status.phase == Phase::Running
                && w.status.container_statuses.iter().all(|c| matches!(c.state, ContainerState::Running { .. }))
        })
        .map(|w| w.spec.containers[0].env[0].value.clone())
        .collect();
    out.sort();
    out
}

async fn complete(api: &Api<Deployment>) -> Object<Deployment> {
    testkit::wait_until("rollout complete", Duration::from_secs(60), async || {
        let d = api.get("sleepers").await.ok()?;
        let p = find_condition(&d.status.conditions, "Progressing")?;
        (d.status.observed_generation == d.metadata.generation
            && p.reason == "NewRevisionAvailable"
            && p.status == ConditionStatus::True
            && d.status.replicas == d.spec.replicas)
            .then_some(d)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_rolls_out_and_back_on_real_processes() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut manager = Manager::new(store.clone());
    manager.add(SchedulerService::new(Profile::default_profile()));
    manager.add(DeploymentController::builder());
    manager.add(ReplicaSetController::builder());
    manager.add(GarbageCollector::builtin());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let plane = tokio::spawn(manager.run(async move {
        let _ = stopped.await;
    }));
    let root = std::env::temp_dir().join(format!("orch-deploy-processes-{}", std::process::id()));
    let mut config = AgentConfig::new("local");
    config.data_root = root.join("agent");
    config.stop_grace = Duration::from_secs(2);
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root.join("runtime")).unwrap());
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(Agent::new(config, store.clone(), runtime).run(
        async move {
            let _ = agent_stopped.await;
        },
        true,
    ));

    let deployments: Api<Deployment> = Api::namespaced(store.clone(), "default");
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    let mut d = Deployment::new("sleepers", 3, sleeper("1"));
    d.strategy = Strategy::RollingUpdate(RollingUpdate {
        max_surge: IntOrPercent::Count(1),
        max_unavailable: IntOrPercent::Count(0),
    });
    let original = deployments.create(&Object::new(ObjectMeta::named("sleepers"), d)).await.unwrap().spec.template;
    complete(&deployments).await;
    assert_eq!(running_versions(&workloads).await, ["1", "1", "1"]);

    deployments
        .retry_on_conflict("sleepers", |d| {
            d.spec.template.spec = sleeper("2");
            Ok(())
        })
        .await
        .unwrap();
    let v2 = complete(&deployments).await;
    assert_eq!(v2.status.current_revision, 2);
    testkit::wait_until("version 2 runs", Duration::from_secs(30), async || {
        (running_versions(&workloads).await == ["2", "2", "2"]).then_some(())
    })
    .await;

    deployment::rollback(store.clone(), "default", "sleepers", None).await.unwrap();
    let back = complete(&deployments).await;
    assert_eq!(back.spec.template, original);
    assert_eq!(back.status.current_revision, 3);
    testkit::wait_until("version 1 runs again", Duration::from_secs(30), async || {
        (running_versions(&workloads).await == ["1", "1", "1"]).then_some(())
    })
    .await;

    let _ = stop_agent.send(());
    let _ = agent.await;
    let _ = stop.send(());
    let _ = plane.await;
    let _ = std::fs::remove_dir_all(&root);
}
