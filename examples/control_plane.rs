//! A one-process control plane that runs real processes: the embedded durable store, the default
//! scheduler, the node lifecycle controller, and a node agent driving the process runtime.
//!
//! It declares a few workloads, shows them running as real processes, kills one behind the
//! agent's back and shows it restarted, then shuts down cleanly (the agent drains its node).
//!
//! `cargo run --release -p orch-examples --example control-plane [-- --data-dir DIR]`
//!
//! The store is one file, `store.redb`, in the data directory: `--data-dir DIR`, else
//! `$ORCH_DATA_DIR`, else a fresh directory under the system temp dir that is removed at the end.
//! Run it twice with the same directory and the second run finds the first one's objects.

use std::sync::Arc;
use std::time::Duration;

use orch_controllers::node_lifecycle::{NodeLifecycle, NodeLifecycleConfig};
use orch_core::kinds::{ConditionStatus, ContainerState, Phase, Resources, RestartPolicy, Workload, resource};
use orch_core::runtime::LogOptions;
use orch_core::{Api, ListParams, Manager, Object, ObjectMeta, Quantity, Runtime, Store};
use orch_runtime::Agent;
use orch_runtime::AgentConfig;
use orch_runtime::ProcessRuntime;
use orch_scheduler::Profile;
use orch_scheduler::SchedulerService;
use orch_store::RedbStore;

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

/// The data directory the user chose (`--data-dir DIR` or `ORCH_DATA_DIR`), if any.
fn chosen_data_dir() -> Option<std::path::PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if let Some(dir) = a.strip_prefix("--data-dir=") {
            return Some(dir.into());
        }
        if a == "--data-dir" {
            return args.next().map(Into::into);
        }
    }
    std::env::var_os("ORCH_DATA_DIR").filter(|d| !d.is_empty()).map(Into::into)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("orch-control-plane-{}", std::process::id()));
    let data_dir = chosen_data_dir().unwrap_or_else(|| dir.join("data"));
    std::fs::create_dir_all(&data_dir)?;
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(data_dir.join("store.redb"))?);
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(&dir)?);
    println!(
        "control plane: embedded store in {}, default scheduler + node-lifecycle controller, one agent (process runtime under {})",
        data_dir.display(),
        dir.display()
    );
    // A data directory used before: show that the store remembers, and leave it as it is.
    let remembered = Api::<Workload>::namespaced(store.clone(), "default").list(&ListParams::default()).await?.items;
    if !remembered.is_empty() {
        println!("\nthe store remembers {} workloads from an earlier run:", remembered.len());
        for w in &remembered {
            let node = w.spec.node_name.as_deref().unwrap_or("-");
            println!(
                "  {:8} node={node:7} phase={:?} restarts={}",
                w.metadata.name, w.status.phase, w.status.restart_count
            );
        }
        println!("(run without --data-dir, or with a new one, for the whole demo)");
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }

    // The controllers.
    let mut manager = Manager::new(store.clone());
    manager.add(SchedulerService::new(Profile::default_profile()));
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
    let ticker =
        workload("ticker", "while true; do echo tick $(date +%s); sleep 0.3; done", "500m", RestartPolicy::Always);
    api.create(&ticker).await?;
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
