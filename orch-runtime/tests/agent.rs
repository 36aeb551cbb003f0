//! The node agent driving real processes: registration, heartbeat, restart policies, crash-loop
//! backoff, recovery after an agent restart, and cleanup.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use orch_core::kinds::{ContainerState, Node, Phase, RestartPolicy, Volume, VolumeSource, Workload};
use orch_core::kinds::{NODE_LEASE_NAMESPACE, NodeLease};
use orch_core::testkit::wait_until;
use orch_core::{Api, DeleteOptions, Object, ObjectMeta, Runtime, Store};
use orch_runtime::Agent;
use orch_runtime::AgentConfig;
use orch_runtime::ProcessRuntime;
use orch_store::MemoryStore;

/// How long a test waits for what it expects (real processes on a loaded machine).
const LIMIT: Duration = Duration::from_secs(20);
use tokio::sync::oneshot;

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn root() -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("orch-agent-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config() -> AgentConfig {
    AgentConfig {
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        resync_interval: Duration::from_millis(200),
        renew_interval: Duration::from_millis(500),
        lease_ttl: Duration::from_secs(3),
        stop_grace: Duration::from_secs(2),
        data_root: root(),
        ..AgentConfig::new("node-1")
    }
}

fn workload(name: &str, script: &str, policy: RestartPolicy) -> Object<Workload> {
    let mut w = Workload::command("main", &["/bin/sh", "-c", script]);
    w.restart_policy = policy;
    w.node_name = Some("node-1".into());
    Object::new(ObjectMeta::named(name), w)
}

fn start_agent(
    store: &Arc<dyn Store>,
    runtime: &Arc<dyn Runtime>,
    drain: bool,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), orch_runtime::AgentError>>) {
    let (tx, rx) = oneshot::channel::<()>();
    let agent = Agent::new(config(), store.clone(), runtime.clone());
    let handle = tokio::spawn(agent.run(
        async move {
            let _ = rx.await;
        },
        drain,
    ));
    (tx, handle)
}

fn pid_of(h: &orch_core::Handle) -> i32 {
    h.data["pid"].as_i64().unwrap() as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_restarts_and_reports() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let (stop, agent) = start_agent(&store, &runtime, true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&workload("web", "sleep 60", RestartPolicy::Always)).await.unwrap();

    // Registered, with a heartbeat.
    let nodes: Api<Node> = Api::all(store.clone());
    let node = wait_until("node registered", LIMIT, async || nodes.get_opt("node-1").await.unwrap()).await;
    assert!(node.status.capacity.contains_key("cpu"));
    let leases: Api<NodeLease> = Api::namespaced(store.clone(), NODE_LEASE_NAMESPACE);
    let hb = wait_until("heartbeat", LIMIT, async || leases.get_opt("node-1").await.unwrap()).await;
    assert!(hb.metadata.lease.is_some(), "the heartbeat lives on a store lease");

    let running = wait_until("web running", LIMIT, async || {
        let w = api.get("web").await.unwrap();
        (w.status.phase == Phase::Running).then_some(w)
    })
    .await;
    assert_eq!(running.status.restart_count, 0);
    // Kill it behind the agent's back: it comes back, counted as a restart.
    let handles = runtime.list().await.unwrap();
    assert_eq!(handles.len(), 1);
    kill(Pid::from_raw(pid_of(&handles[0])), Signal::SIGKILL).unwrap();
    let restarted = wait_until("web restarted", LIMIT, async || {
        let w = api.get("web").await.unwrap();
        (w.status.phase == Phase::Running && w.status.restart_count == 1).then_some(w)
    })
    .await;
    assert!(matches!(restarted.status.container_statuses[0].state, ContainerState::Running { .. }));

    // Deleting the workload stops and removes its instance.
    api.delete("web", &DeleteOptions::default()).await.unwrap();
    wait_until("instance removed", LIMIT, async || runtime.list().await.unwrap().is_empty().then_some(())).await;
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    assert!(leases.get("node-1").await.unwrap_err().is_not_found(), "a draining agent releases its heartbeat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policies_and_crash_loop_backoff() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let (stop, agent) = start_agent(&store, &runtime, true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&workload("once-bad", "exit 2", RestartPolicy::Never)).await.unwrap();
    api.create(&workload("job-ok", "exit 0", RestartPolicy::OnFailure)).await.unwrap();
    api.create(&workload("crasher", "exit 1", RestartPolicy::Always)).await.unwrap();

    let failed = wait_until("once-bad failed", LIMIT, async || {
        let w = api.get("once-bad").await.unwrap();
        (w.status.phase == Phase::Failed).then_some(w)
    })
    .await;
    assert!(matches!(failed.status.container_statuses[0].state, ContainerState::Terminated { exit_code: 2, .. }));
    wait_until("job-ok succeeded", LIMIT, async || {
        (api.get("job-ok").await.unwrap().status.phase == Phase::Succeeded).then_some(())
    })
    .await;

    // The crasher backs off: 200 ms, 400 ms, 800 ms, ... so four restarts take at least 1.4 s.
    let began = Instant::now();
    wait_until("crash loop visible", LIMIT, async || {
        let w = api.get("crasher").await.unwrap();
        matches!(&w.status.container_statuses.first()?.state, ContainerState::Waiting { reason } if reason == "CrashLoopBackOff").then_some(())
    })
    .await;
    wait_until("four restarts", LIMIT, async || {
        (api.get("crasher").await.unwrap().status.restart_count >= 4).then_some(())
    })
    .await;
    assert!(
        began.elapsed() >= Duration::from_millis(1_400),
        "restarts came faster than the backoff allows: {:?}",
        began.elapsed()
    );
    // Each backoff is told by an event of the workload.
    let events: Api<orch_core::kinds::Event> = Api::namespaced(store.clone(), "default");
    let backoff = wait_until("BackOff events", LIMIT, async || {
        let list = events.list(&orch_core::ListParams::default()).await.unwrap().items;
        let mine: Vec<_> = list
            .into_iter()
            .filter(|e| e.spec.reason == "BackOff" && e.spec.involved_object.name == "crasher")
            .collect();
        (mine.len() >= 2).then_some(mine)
    })
    .await;
    assert!(
        backoff.iter().all(|e| e.spec.source == "agent/node-1" && e.spec.message.contains("container main exited"))
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(api.get("once-bad").await.unwrap().status.restart_count, 0, "Never means never");
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_running_instances() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let dir = root();
    let first: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(&dir).unwrap());
    let (stop, agent) = start_agent(&store, &first, false);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&workload("keeper", "sleep 60", RestartPolicy::Always)).await.unwrap();
    wait_until("keeper running", LIMIT, async || {
        (api.get("keeper").await.unwrap().status.phase == Phase::Running).then_some(())
    })
    .await;
    let before = first.list().await.unwrap();
    // Stop the agent without draining: the process keeps running.
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();

    let second: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(&dir).unwrap());
    let (stop, agent) = start_agent(&store, &second, true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = second.list().await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(pid_of(&after[0]), pid_of(&before[0]), "the same process, adopted, not restarted");
    let w = api.get("keeper").await.unwrap();
    assert_eq!((w.status.phase, w.status.restart_count), (Phase::Running, 0));
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    assert!(second.list().await.unwrap().is_empty(), "a draining agent stops and removes its instances");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn probe(action: orch_core::kinds::ProbeAction) -> orch_core::kinds::Probe {
    orch_core::kinds::Probe {
        action,
        initial_delay_seconds: 0,
        period_seconds: 1,
        timeout_seconds: 1,
        failure_threshold: 1,
        success_threshold: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_http_probe_and_liveness_restarts() {
    use orch_core::kinds::{ConditionStatus, ProbeAction, find_condition};
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let (stop, agent) = start_agent(&store, &runtime, true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");

    // A web server that comes up two seconds late: not ready until it answers.
    let port = free_port();
    let mut web = workload(
        "web",
        &format!("sleep 2; exec python3 -m http.server {port} --bind 127.0.0.1"),
        RestartPolicy::Always,
    );
    web.spec.containers[0].readiness_probe = Some(probe(ProbeAction::Http { path: "/".into(), port: u32::from(port) }));
    web.spec.containers[0].liveness_probe =
        Some(orch_core::kinds::Probe { initial_delay_seconds: 5, ..probe(ProbeAction::Tcp { port: u32::from(port) }) });
    api.create(&web).await.unwrap();
    let early = wait_until("web running", LIMIT, async || {
        let w = api.get("web").await.unwrap();
        (w.status.phase == Phase::Running).then_some(w)
    })
    .await;
    assert!(!early.status.container_statuses[0].ready, "ready before the server answered");
    let ready = wait_until("web ready", LIMIT, async || {
        let w = api.get("web").await.unwrap();
        (find_condition(&w.status.conditions, "Ready")?.status == ConditionStatus::True).then_some(w)
    })
    .await;
    assert!(ready.status.container_statuses[0].ready);

    // A liveness probe that starts failing gets the instance restarted.
    let mut sick = workload("sick", "touch alive; sleep 60", RestartPolicy::Always);
    sick.spec.containers[0].liveness_probe = Some(orch_core::kinds::Probe {
        initial_delay_seconds: 1, // give it a moment to create the file
        ..probe(ProbeAction::Exec { command: vec!["/bin/sh".into(), "-c".into(), "test -f alive".into()] })
    });
    api.create(&sick).await.unwrap();
    wait_until("sick running", LIMIT, async || {
        (api.get("sick").await.unwrap().status.phase == Phase::Running).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.get("sick").await.unwrap().status.restart_count, 0, "healthy while the file exists");
    let instance = runtime.list().await.unwrap().into_iter().find(|h| h.id.starts_with("default.sick.")).unwrap();
    let alive = root_of(&runtime, &instance).join("alive");
    std::fs::remove_file(&alive).unwrap();
    wait_until("sick restarted", LIMIT, async || {
        (api.get("sick").await.unwrap().status.restart_count >= 1).then_some(())
    })
    .await;
    // The stop is told by an event of the workload.
    let events: Api<orch_core::kinds::Event> = Api::namespaced(store.clone(), "default");
    let unhealthy = wait_until("an Unhealthy event", LIMIT, async || {
        let list = events.list(&orch_core::ListParams::default()).await.unwrap().items;
        list.into_iter().find(|e| e.spec.reason == "Unhealthy" && e.spec.involved_object.name == "sick")
    })
    .await;
    assert!(unhealthy.spec.message.contains("container main failed its liveness or startup probe"));
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

/// The instance directory of a process-runtime handle (its working directory by default).
fn root_of(runtime: &Arc<dyn Runtime>, handle: &orch_core::Handle) -> std::path::PathBuf {
    let _ = runtime;
    let pid = pid_of(handle);
    std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_spec_replaces_the_instance() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let (stop, agent) = start_agent(&store, &runtime, true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&workload("app", "sleep 60", RestartPolicy::Always)).await.unwrap();
    wait_until("app running", LIMIT, async || {
        (api.get("app").await.unwrap().status.phase == Phase::Running).then_some(())
    })
    .await;
    let before = runtime.list().await.unwrap();
    assert_eq!(before.len(), 1);
    api.patch(
        "app",
        &serde_json::json!({"spec": {"containers": [{"name": "main", "command": ["/bin/sh", "-c", "sleep 61"]}]}}),
    )
    .await
    .unwrap();
    let after = wait_until("replaced", LIMIT, async || {
        let l = runtime.list().await.unwrap();
        (l.len() == 1 && l[0].id != before[0].id).then_some(l)
    })
    .await;
    assert!(after[0].id.ends_with("-1"), "the next attempt: {}", after[0].id);
    let w = api.get("app").await.unwrap();
    assert_eq!(w.status.restart_count, 0, "an update is not a crash");
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_rotates_logs() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let config = AgentConfig { log_max_bytes: 1_000, log_keep: 2, ..config() };
    let agent = tokio::spawn(Agent::new(config, store.clone(), runtime.clone()).run(
        async move {
            let _ = rx.await;
        },
        true,
    ));
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&workload("chatty", "head -c 5000 /dev/zero | tr '\\0' 'x'; echo; sleep 60", RestartPolicy::Always))
        .await
        .unwrap();
    let handle = wait_until("chatty started", LIMIT, async || runtime.list().await.unwrap().into_iter().next()).await;
    let dir = std::fs::read_link(format!("/proc/{}/cwd", pid_of(&handle))).unwrap();
    wait_until("rotated", LIMIT, async || dir.join("stdout.log.1").exists().then_some(())).await;
    assert!(std::fs::metadata(dir.join("stdout.log")).unwrap().len() <= 1_000);
    tx.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_reach_the_program_and_an_empty_dir_goes_with_its_workload() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let (host, data_root) = (root(), root());
    std::fs::create_dir_all(&host).unwrap();
    let agent = Agent::new(AgentConfig { data_root: data_root.clone(), ..config() }, store.clone(), runtime.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(agent.run(
        async move {
            let _ = stopped.await;
        },
        true,
    ));
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let mut w = workload(
        "writer",
        "echo kept > $ORCH_VOLUME_HOST/out && echo scratch > $ORCH_VOLUME_SCRATCH/tmp && sleep 60",
        RestartPolicy::Always,
    );
    w.spec.volumes = vec![
        Volume { name: "host".into(), source: VolumeSource::HostPath { path: host.to_string_lossy().into() } },
        Volume { name: "scratch".into(), source: VolumeSource::EmptyDir { size_limit: None } },
    ];
    api.create(&w).await.unwrap();
    let out = host.join("out");
    wait_until("the program wrote into its hostPath volume", LIMIT, async || out.is_file()).await;
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "kept");
    // The emptyDir lives under the agent's data root, by namespace, workload and incarnation.
    let workload_dir = data_root.join("volumes").join("default").join("writer");
    let scratch = wait_until("the emptyDir holds the program's file", LIMIT, async || {
        let incarnation = std::fs::read_dir(&workload_dir).ok()?.flatten().next()?.path();
        let file = incarnation.join("scratch").join("tmp");
        file.is_file().then_some(file)
    })
    .await;
    assert_eq!(std::fs::read_to_string(&scratch).unwrap().trim(), "scratch");
    api.delete("writer", &DeleteOptions::default()).await.unwrap();
    wait_until("the emptyDir removed with its workload", LIMIT, async || !workload_dir.exists()).await;
    assert!(out.is_file(), "a hostPath volume is the node's: it stays");
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_whose_volume_cannot_be_provided_waits_with_the_reason_and_never_runs() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let (stop, agent) = start_agent(&store, &runtime, true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let mut w = workload("db", "sleep 60", RestartPolicy::Always);
    w.spec.volumes = vec![Volume { name: "data".into(), source: VolumeSource::Claim { claim_name: "db-data".into() } }];
    api.create(&w).await.unwrap();
    let reason = wait_until("the reason in the status", LIMIT, async || {
        let w = api.get("db").await.ok()?;
        match &w.status.container_statuses.first()?.state {
            ContainerState::Waiting { reason } => Some(reason.clone()),
            _ => None,
        }
    })
    .await;
    assert!(reason.starts_with("WaitingForVolume: spec.volumes[0] (\"data\"): claim \"db-data\""), "{reason}");
    assert_eq!(api.get("db").await.unwrap().status.phase, Phase::Pending);
    assert!(runtime.list().await.unwrap().is_empty(), "it never runs without its data");
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}
