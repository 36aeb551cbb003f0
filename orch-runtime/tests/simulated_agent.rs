//! The node agent on simulated nodes, in virtual time: crash-loop backoff over an hour of
//! cluster time, and a lost node's workloads marked lost.

use std::sync::Arc;
use std::time::Duration;

use orch_core::kinds::{EnvVar, Phase, RestartPolicy, Workload};
use orch_core::{Api, Object, ObjectMeta, Runtime, Store, Timestamp, TokioClock};
use orch_runtime::Agent;
use orch_runtime::AgentConfig;
use orch_runtime::SimCluster;
use orch_store::MemoryStore;

fn sim_workload(name: &str, node: &str, env: &[(&str, &str)]) -> Object<Workload> {
    let mut w = Workload::command("main", &["sim"]);
    w.containers[0].env = env.iter().map(|(k, v)| EnvVar { name: k.to_string(), value: v.to_string() }).collect();
    w.restart_policy = RestartPolicy::Always;
    w.node_name = Some(node.into());
    Object::new(ObjectMeta::named(name), w)
}

/// Runs `agent` until the returned sender fires (or is dropped), draining on the way out if
/// asked; the handle gives its result.
fn spawn_agent(
    agent: Agent,
    drain: bool,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), orch_runtime::AgentError>>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(agent.run(
        async move {
            let _ = rx.await;
        },
        drain,
    ));
    (tx, run)
}

#[tokio::test(start_paused = true)]
async fn an_hour_of_crash_looping_follows_the_backoff_schedule() {
    let store: Arc<dyn Store> =
        Arc::new(MemoryStore::builder().clock(Arc::new(TokioClock::starting_at(Timestamp(0)))).build());
    let cluster = SimCluster::new();
    let runtime: Arc<dyn Runtime> = Arc::new(cluster.node("sim-1"));
    let agent = Agent::new(AgentConfig::new("sim-1"), store.clone(), runtime)
        .with_clock(Arc::new(TokioClock::starting_at(Timestamp(0))));
    let (tx, run) = spawn_agent(agent, true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    // Runs 5 s, fails, forever.
    api.create(&sim_workload("crasher", "sim-1", &[("SIM_RUN", "5"), ("SIM_EXIT_CODE", "1")])).await.unwrap();
    api.create(&sim_workload("steady", "sim-1", &[])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    // Restarts at about 15, 40, 85, 170, 335 s, then every 305 s (5 s run + 5 min cap): 15 in
    // the hour when every delay is exact.
    let crasher = api.get("crasher").await.unwrap();
    assert!((13..=15).contains(&crasher.status.restart_count), "restarts: {}", crasher.status.restart_count);
    let steady = api.get("steady").await.unwrap();
    assert_eq!((steady.status.phase, steady.status.restart_count), (Phase::Running, 0));
    tx.send(()).unwrap();
    run.await.unwrap().unwrap();
    assert_eq!(cluster.instance_count(), 0, "drained");
}

#[tokio::test(start_paused = true)]
async fn shared_renewals_keep_every_heartbeat_alive_and_a_drain_revokes_it() {
    use orch_core::kinds::{NODE_LEASE_NAMESPACE, NodeLease};
    use orch_core::{Cache, CacheConfig};
    use orch_runtime::SharedRenewals;
    let clock = Arc::new(TokioClock::starting_at(Timestamp(0)));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
    let cluster = SimCluster::new();
    let shared: Cache<Workload> = Cache::spawn(store.clone(), CacheConfig::default());
    let renewals = SharedRenewals::spawn(store.clone(), Duration::from_secs(10));
    let mut stops = Vec::new();
    for n in 0..3 {
        let node = format!("sim-{n}");
        let runtime: Arc<dyn Runtime> = Arc::new(cluster.node(&node));
        let agent = Agent::new(AgentConfig::new(&node), store.clone(), runtime)
            .with_clock(clock.clone())
            .with_shared_cache(shared.clone())
            .with_shared_renewals(renewals.clone());
        // The first one drains when stopped.
        stops.push(spawn_agent(agent, n == 0));
    }
    // Heartbeat leases live 40 s: ten minutes later they are alive only if renewed all along.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let leases: Api<NodeLease> = Api::namespaced(store.clone(), NODE_LEASE_NAMESPACE);
    for n in 0..3 {
        assert!(leases.get_opt(&format!("sim-{n}")).await.unwrap().is_some(), "sim-{n}'s heartbeat lives");
    }
    // The draining agent revokes its heartbeat; the others keep theirs.
    let (tx, run) = stops.remove(0);
    tx.send(()).unwrap();
    run.await.unwrap().unwrap();
    assert!(leases.get_opt("sim-0").await.unwrap().is_none(), "a drained node's heartbeat is gone");
    tokio::time::sleep(Duration::from_secs(120)).await;
    for n in 1..3 {
        assert!(leases.get_opt(&format!("sim-{n}")).await.unwrap().is_some(), "sim-{n}'s heartbeat still lives");
    }
    for (tx, run) in stops {
        tx.send(()).unwrap();
        run.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_crash_after_a_long_healthy_run_waits_only_the_first_backoff() {
    let clock = Arc::new(TokioClock::starting_at(Timestamp(0)));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
    let cluster = SimCluster::new();
    let runtime: Arc<dyn Runtime> = Arc::new(cluster.node("sim-1"));
    let agent = Agent::new(AgentConfig::new("sim-1"), store.clone(), runtime).with_clock(clock);
    let (tx, run) = spawn_agent(agent, true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    // Runs 610 s (past the 10 min reset) and fails, forever: every crash follows a healthy
    // spell, so every restart waits the first delay, 10 s: restarts at about 620, 1240, 1860,
    // 2480 s. Without the reset the delays would double (10, 20, 40, 80 s: the fourth at 2590 s).
    api.create(&sim_workload("long", "sim-1", &[("SIM_RUN", "610"), ("SIM_EXIT_CODE", "1")])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2530)).await;
    let long = api.get("long").await.unwrap();
    assert_eq!(long.status.restart_count, 4, "restarts by 2,530 s");
    tx.send(()).unwrap();
    run.await.unwrap().unwrap();
}
