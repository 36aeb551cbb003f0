//! Roll a new version of a service out and back: a deployment on simulated nodes.
//!
//! A control plane (store, scheduler, deployment and replica set controllers, garbage
//! collector) and three simulated nodes run in this process, in virtual time. The example
//! declares a deployment of six copies of version 1, waits for the rollout, changes the
//! template to version 2 and prints the progress as the controller replaces the workloads
//! (at most two extra, at most one missing), then rolls back to version 1 and prints the
//! deployment's events.
//!
//! `cargo run -p orch-examples --example rollout`

use std::sync::Arc;
use std::time::Duration;

use orch_controllers::deployment::{self, history};
use orch_controllers::{DeploymentController, GarbageCollector, ReplicaSetController};
use orch_core::kinds::{
    Deployment, EnvVar, Event, IntOrPercent, Probe, ProbeAction, RollingUpdate, Strategy, Workload,
    deployment_condition, find_condition,
};
use orch_core::{Api, ListParams, Manager, Object, ObjectMeta, Runtime, Store, Timestamp, TokioClock};
use orch_runtime::{Agent, AgentConfig, SimCluster};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::MemoryStore;

/// Version `v` of a simulated web server: ready (by its probe) once it has started, 2 s after
/// it is launched.
fn web(v: &str) -> Workload {
    let mut w = Workload::command("web", &["serve"]);
    w.containers[0].env = vec![
        EnvVar { name: "VERSION".into(), value: v.into() },
        EnvVar { name: "SIM_START_DELAY".into(), value: "2".into() },
    ];
    w.containers[0].readiness_probe = Some(Probe {
        action: ProbeAction::Exec { command: vec!["check".into()] },
        initial_delay_seconds: 0,
        period_seconds: 1,
        timeout_seconds: 1,
        failure_threshold: 1,
        success_threshold: 1,
    });
    w
}

/// Prints the rollout's progress until it completes.
async fn watch_rollout(api: &Api<Deployment>) -> Result<Object<Deployment>, Box<dyn std::error::Error>> {
    let mut last = String::new();
    loop {
        let d = api.get("web").await?;
        let s = &d.status;
        let progressing = find_condition(&s.conditions, deployment_condition::PROGRESSING);
        let line = format!(
            "revision {}: {} updated, {} ready, {} available of {} ({})",
            s.current_revision,
            s.updated_replicas,
            s.ready_replicas,
            s.available_replicas,
            d.spec.replicas,
            progressing.map_or("", |c| c.reason.as_str())
        );
        if line != last {
            println!("  {line}");
            last = line;
        }
        let done = s.observed_generation == d.metadata.generation
            && progressing.is_some_and(|c| c.reason == "NewRevisionAvailable")
            && s.replicas == d.spec.replicas;
        if done {
            return Ok(d);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
    let mut manager = Manager::new(store.clone()).with_clock(clock.clone());
    manager.add(SchedulerService::new(Profile::default_profile()));
    manager.add(DeploymentController::builder());
    manager.add(ReplicaSetController::builder());
    manager.add(GarbageCollector::builtin());
    tokio::spawn(manager.run(std::future::pending()));
    let cluster = SimCluster::new();
    for n in 0..3 {
        let name = format!("node-{n}");
        let mut config = AgentConfig::new(&name);
        config.capacity = Some(
            [("cpu", "8"), ("memory", "32Gi"), ("pods", "50")]
                .map(|(k, v)| (k.into(), v.parse().expect("quantity")))
                .into(),
        );
        let runtime: Arc<dyn Runtime> = Arc::new(cluster.node(&name));
        let agent = Agent::new(config, store.clone(), runtime).with_clock(clock.clone());
        tokio::spawn(agent.run(std::future::pending::<()>(), false));
    }

    // Declare: six copies of version 1, replaced at most two extra and one missing at a time.
    let deployments: Api<Deployment> = Api::namespaced(store.clone(), "default");
    let mut spec = Deployment::new("web", 6, web("1"));
    spec.strategy = Strategy::RollingUpdate(RollingUpdate {
        max_surge: IntOrPercent::Count(2),
        max_unavailable: IntOrPercent::Count(1),
    });
    spec.rollback.on_failure = true;
    deployments.create(&Object::new(ObjectMeta::named("web"), spec)).await?;
    println!("rolling out version 1");
    watch_rollout(&deployments).await?;

    // Roll out version 2.
    println!("rolling out version 2");
    deployments
        .retry_on_conflict("web", |d| {
            d.spec.template.spec = web("2");
            Ok(())
        })
        .await?;
    watch_rollout(&deployments).await?;

    // Roll back to the previous revision.
    let revisions: Vec<u64> = history(store.clone(), "default", "web").await?.iter().map(|(n, _)| *n).collect();
    println!("revisions kept: {revisions:?}; rolling back");
    deployment::rollback(store.clone(), "default", "web", None).await?;
    let back = watch_rollout(&deployments).await?;
    let version = &back.spec.template.spec.containers[0].env[0].value;
    println!("running version {version} as revision {}", back.status.current_revision);
    assert_eq!(version, "1", "the rollback restored version 1");

    println!("events of web:");
    let events: Api<Event> = Api::namespaced(store.clone(), "default");
    let mut list = events.list(&ListParams::default()).await?.items;
    list.retain(|e| e.spec.involved_object.kind == "Deployment");
    list.sort_by_key(|e| (e.spec.first_timestamp, e.metadata.create_revision));
    for e in list {
        println!("  {:<18} x{} {}", e.spec.reason, e.spec.count, e.spec.message);
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Virtual time: the simulated cluster's minutes pass in milliseconds.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()?;
    rt.block_on(run())
}
