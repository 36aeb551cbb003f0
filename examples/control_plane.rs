//! A one-process control plane that runs real processes: the in-memory store, a small placement
//! controller, the node lifecycle controller, and a node agent driving the process runtime.
//!
//! It declares a few workloads, shows them running as real processes, kills one behind the
//! agent's back and shows it restarted, then shuts down cleanly (the agent drains its node).
//!
//! `cargo run --release -p orch-examples --example control-plane`
//!
//! The placement controller here is a deliberately small stand-in (most free CPU that fits);
//! the scheduler framework is separate work.

use std::sync::Arc;
use std::time::Duration;

use orch_core::kinds::{
    Condition, ConditionStatus, ContainerState, Node, Phase, Resources, RestartPolicy, Workload, resource,
    set_condition,
};
use orch_core::node_lifecycle::{NodeLifecycle, NodeLifecycleConfig};
use orch_core::runtime::LogOptions;
use orch_core::{
    Action, Agent, AgentConfig, Api, Clock, Context, Controller, ControllerBuilder, Error, ListParams, Manager, Object,
    ObjectMeta, Quantity, Runtime, Store, SystemClock,
};
use orch_runtime::ProcessRuntime;
use orch_store::MemoryStore;

/// Binds each pending workload to the ready node with the most free CPU that fits its requests.
struct Placement;

#[async_trait::async_trait]
impl Controller for Placement {
    type Kind = Workload;
    type Error = Error;

    async fn reconcile(&self, w: Arc<Object<Workload>>, ctx: &Context) -> Result<Action, Error> {
        if w.spec.node_name.is_some() || w.metadata.is_being_deleted() {
            return Ok(Action::Done);
        }
        let nodes = ctx.cache::<Node>().expect("watched, so cached");
        let workloads = ctx.cache::<Workload>().expect("the primary kind is cached");
        let wants = w.spec.requests();
        let free = |n: &Object<Node>| -> Resources {
            let mut left = n.status.allocatable.clone();
            for placed in workloads.by_index(orch_core::cache::NODE_INDEX, &n.metadata.name) {
                for (r, q) in placed.spec.requests() {
                    let e = left.entry(r).or_default();
                    *e = *e - q;
                }
            }
            left
        };
        let ready = |n: &Object<Node>| {
            n.status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True)
                && !n.spec.unschedulable
        };
        let best = nodes
            .list()
            .into_iter()
            .filter(|n| ready(n))
            .map(|n| (free(&n), n))
            .filter(|(left, _)| wants.iter().all(|(r, q)| left.get(r).is_some_and(|l| l >= q)))
            .max_by_key(|(left, _)| left.get(resource::CPU).copied().unwrap_or_default())
            .map(|(_, n)| n.metadata.name.clone());
        let api: Api<Workload> = ctx.api(&w.metadata.namespace);
        match best {
            Some(node) => {
                let mut bound = (*w).clone();
                bound.spec.node_name = Some(node.clone());
                api.replace(&bound).await?;
                println!("[placement] {} -> {node}", w.metadata.name);
                Ok(Action::Done)
            }
            None => {
                let mut s = (*w).clone();
                let mut c = Condition::new("Scheduled", ConditionStatus::False, "Unschedulable");
                c.message = format!("0/{} nodes fit", nodes.len());
                set_condition(&mut s.status.conditions, c, SystemClock.now());
                if s.status != w.status {
                    api.replace_status(&s).await?;
                }
                Ok(Action::RequeueAfter(Duration::from_secs(2)))
            }
        }
    }
}

fn workload(name: &str, script: &str, cpu: &str, policy: RestartPolicy) -> Object<Workload> {
    let mut w = Workload::command("main", &["/bin/sh", "-c", script]);
    w.containers[0].resources.requests.insert(resource::CPU.into(), cpu.parse().expect("cpu"));
    w.restart_policy = policy;
    Object::new(ObjectMeta::named(name).with_label("app", name), w)
}

async fn show(api: &Api<Workload>, runtime: &dyn Runtime) -> orch_core::Result<()> {
    let pids: Vec<(String, i64)> = runtime
        .list()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|h| (h.id.clone(), h.data["pid"].as_i64().unwrap_or(0)))
        .collect();
    for w in api.list(&ListParams::default()).await?.items {
        let state = match w.status.container_statuses.first().map(|c| &c.state) {
            Some(ContainerState::Running { .. }) => "running".to_string(),
            Some(ContainerState::Waiting { reason }) => format!("waiting ({reason})"),
            Some(ContainerState::Terminated { exit_code, .. }) => format!("exited {exit_code}"),
            None => w
                .status
                .conditions
                .iter()
                .find(|c| c.type_ == "Scheduled" && c.status == ConditionStatus::False)
                .map_or("-".into(), |c| format!("{}: {}", c.reason, c.message)),
        };
        let pid =
            pids.iter().rev().find(|(id, _)| id.starts_with(&format!("default.{}.", w.metadata.name))).map(|p| p.1);
        println!(
            "  {:<8} node={:<7} phase={:<9} {:<22} restarts={} pid={}",
            w.metadata.name,
            w.spec.node_name.as_deref().unwrap_or("-"),
            format!("{:?}", w.status.phase),
            state,
            w.status.restart_count,
            pid.map_or("-".into(), |p| p.to_string()),
        );
    }
    Ok(())
}

async fn wait_until(
    api: &Api<Workload>,
    what: &str,
    check: impl Fn(&[Object<Workload>]) -> bool,
) -> orch_core::Result<()> {
    for _ in 0..200 {
        if check(&api.list(&ListParams::default()).await?.items) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("  (gave up waiting: {what})");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let dir = std::env::temp_dir().join(format!("orch-control-plane-{}", std::process::id()));
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(&dir)?);
    println!(
        "control plane: in-memory store, placement + node-lifecycle controllers, one agent (process runtime under {})",
        dir.display()
    );

    // The controllers.
    let mut manager = Manager::new(store.clone());
    manager.add(ControllerBuilder::new("placement", Placement).watches::<Node>(|_| Vec::new()));
    manager.add(NodeLifecycle::builder(NodeLifecycleConfig::default()));
    let (stop_manager, manager_stopped) = tokio::sync::oneshot::channel::<()>();
    let manager = tokio::spawn(manager.run(async move {
        let _ = manager_stopped.await;
    }));

    // The node agent: registers node-1 and runs what is bound to it.
    let mut config = AgentConfig::new("node-1");
    config.capacity = Some(Resources::from([
        (resource::CPU.to_string(), Quantity::from_units(2)),
        (resource::MEMORY.to_string(), "4Gi".parse()?),
    ]));
    config.backoff_base = Duration::from_millis(500);
    config.resync_interval = Duration::from_millis(500);
    config.stop_grace = Duration::from_secs(2);
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(Agent::new(config, store.clone(), runtime.clone()).run(
        async move {
            let _ = agent_stopped.await;
        },
        true,
    ));

    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    println!("\ndeclaring workloads");
    api.create(&workload(
        "ticker",
        "while true; do echo tick $(date +%s); sleep 0.3; done",
        "500m",
        RestartPolicy::Always,
    ))
    .await?;
    api.create(&workload("sleeper", "sleep 300", "500m", RestartPolicy::Always)).await?;
    api.create(&workload("batch", "echo computing; sleep 0.5; echo done", "250m", RestartPolicy::OnFailure)).await?;
    api.create(&workload("too-big", "sleep 1", "8", RestartPolicy::Always)).await?;
    let mut bad = workload("bad", "true", "1", RestartPolicy::Always);
    bad.spec.containers[0].resources.requests.insert(resource::MEMORY.into(), "-1Gi".parse()?);
    if let Err(e) = api.create(&bad).await {
        println!("refused: {e}");
    }

    wait_until(&api, "ticker and sleeper running, batch done", |ws| {
        let phase = |n: &str| ws.iter().find(|w| w.metadata.name == n).map(|w| w.status.phase);
        phase("ticker") == Some(Phase::Running)
            && phase("sleeper") == Some(Phase::Running)
            && phase("batch") == Some(Phase::Succeeded)
    })
    .await?;
    println!("\nrunning:");
    show(&api, &*runtime).await?;

    // Kill the ticker's process behind the agent's back.
    let ticker =
        runtime.list().await?.into_iter().find(|h| h.id.starts_with("default.ticker.")).ok_or("ticker not running")?;
    let pid = ticker.data["pid"].as_i64().unwrap_or(0);
    println!("\nkilling the ticker (pid {pid}) with SIGKILL");
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status()?;
    wait_until(&api, "ticker restarted", |ws| {
        ws.iter()
            .any(|w| w.metadata.name == "ticker" && w.status.restart_count == 1 && w.status.phase == Phase::Running)
    })
    .await?;
    println!("the agent restarted it:");
    show(&api, &*runtime).await?;
    let restarted =
        runtime.list().await?.into_iter().rfind(|h| h.id.starts_with("default.ticker.")).ok_or("no ticker")?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut lines = Vec::new();
    let mut logs = runtime.logs(&restarted, LogOptions { tail: Some(2), follow: false }).await?;
    while let Some(l) = futures::StreamExt::next(&mut logs).await {
        lines.push(l.line);
    }
    println!("last output of the new ticker: {lines:?}");

    println!("\nshutting down: the agent drains its node");
    let _ = stop_agent.send(());
    agent.await??;
    let _ = stop_manager.send(());
    manager.await??;
    println!("instances left running: {}", runtime.list().await?.len());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
