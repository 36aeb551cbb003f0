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

#[tokio::test(start_paused = true)]
async fn an_aborted_agent_leaves_nothing_running_behind() {
    let clock = Arc::new(TokioClock::starting_at(Timestamp(0)));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
    let cluster = SimCluster::new();
    let runtime: Arc<dyn Runtime> = Arc::new(cluster.node("sim-1"));
    let agent = Agent::new(AgentConfig::new("sim-1"), store.clone(), runtime.clone()).with_clock(clock);
    let (_tx, run) = spawn_agent(agent, false);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    // Exits after 30 s: an agent still at work would see the exit and write the status.
    let mut job = sim_workload("job", "sim-1", &[("SIM_RUN", "30")]);
    job.spec.restart_policy = RestartPolicy::Never;
    // A probe loop holds the agent itself: it must end with the agent too.
    job.spec.containers[0].liveness_probe = Some(
        serde_json::from_value(serde_json::json!({"action": {"exec": {"command": ["true"]}}, "periodSeconds": 1}))
            .unwrap(),
    );
    api.create(&job).await.unwrap();
    let running = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let w = api.get("job").await.unwrap();
        if w.status.phase == Phase::Running {
            break w;
        }
    };
    run.abort();
    let _ = run.await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(Arc::strong_count(&runtime), 1, "no task of the agent holds its runtime any more");
    tokio::time::sleep(Duration::from_secs(120)).await;
    let after = api.get("job").await.unwrap();
    assert_eq!(
        (after.status.phase, after.metadata.resource_version),
        (Phase::Running, running.metadata.resource_version),
        "no task of the aborted agent wrote anything"
    );
}

#[tokio::test(start_paused = true)]
async fn shared_renewals_let_an_aborted_agents_lease_lapse_without_one_more_renewal() {
    use orch_core::kinds::{NODE_LEASE_NAMESPACE, NodeLease};
    use orch_runtime::SharedRenewals;
    let clock = Arc::new(TokioClock::starting_at(Timestamp(0)));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
    let renewals = SharedRenewals::spawn(store.clone(), Duration::from_secs(10));
    let cluster = SimCluster::new();
    let runtime: Arc<dyn Runtime> = Arc::new(cluster.node("sim-1"));
    let config = AgentConfig { lease_ttl: Duration::from_secs(40), ..AgentConfig::new("sim-1") };
    let agent = Agent::new(config, store.clone(), runtime).with_clock(clock).with_shared_renewals(renewals.clone());
    let (_tx, run) = spawn_agent(agent, false);
    // Renewed at 10 s; the agent dies at 15 s, before the renewal due at 20 s.
    tokio::time::sleep(Duration::from_secs(15)).await;
    run.abort();
    let _ = run.await;
    let leases: Api<NodeLease> = Api::namespaced(store.clone(), NODE_LEASE_NAMESPACE);
    assert!(leases.get_opt("sim-1").await.unwrap().is_some());
    // The last renewal was at 10 s, so the lease ends at 50 s (one more renewal at 20 s would
    // have kept it until 60 s).
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert!(leases.get_opt("sim-1").await.unwrap().is_none(), "gone 40 s after its last renewal");
}
