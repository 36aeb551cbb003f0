//! End to end on the real engine: a control plane (memory store, default scheduler, node
//! lifecycle controller) with a node agent on the Docker runtime. A workload is scheduled and
//! runs as a container; killed behind the agent's back (`docker kill`), it is restarted; the
//! agent is restarted and adopts the running container instead of starting another, and a
//! stray container labelled for the node is removed after the orphan grace period. Skipped
//! with a note where no engine answers (see `docker_support`).

#![cfg(feature = "docker")]

mod docker_support;

use std::sync::Arc;
use std::time::Duration;

use docker_support::{Scope, skip};
use orch_controllers::node_lifecycle::{NodeLifecycle, NodeLifecycleConfig};
use orch_core::kinds::{ContainerState, Phase, Resources, RestartPolicy, Workload, resource};
use orch_core::runtime::InstanceSpec;
use orch_core::testkit::wait_until;
use orch_core::{Api, Manager, Object, ObjectMeta, Quantity, Runtime, Store};
use orch_runtime::Agent;
use orch_runtime::AgentConfig;
use orch_runtime::DockerRuntime;
use orch_scheduler::Profile;
use orch_scheduler::SchedulerService;
use orch_store::MemoryStore;
use tokio::sync::oneshot;

/// How long a test waits for what it expects (containers on a loaded machine).
const LIMIT: Duration = Duration::from_secs(30);

fn agent_config(node: &str) -> AgentConfig {
    let mut config = AgentConfig::new(node);
    config.capacity = Some(Resources::from([
        (resource::CPU.to_string(), Quantity::from_units(2)),
        (resource::MEMORY.to_string(), "4Gi".parse().unwrap()),
    ]));
    config.backoff_base = Duration::from_millis(200);
    config.backoff_max = Duration::from_secs(2);
    config.resync_interval = Duration::from_millis(200);
    config.renew_interval = Duration::from_millis(500);
    config.lease_ttl = Duration::from_secs(5);
    config.stop_grace = Duration::from_secs(2);
    config
}

fn start_agent(
    store: &Arc<dyn Store>,
    runtime: &Arc<dyn Runtime>,
    node: &str,
    drain: bool,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), orch_runtime::AgentError>>) {
    let (tx, rx) = oneshot::channel::<()>();
    let agent = Agent::new(agent_config(node), store.clone(), runtime.clone());
    let handle = tokio::spawn(agent.run(
        async move {
            let _ = rx.await;
        },
        drain,
    ));
    (tx, handle)
}

fn container_of(h: &orch_core::Handle) -> String {
    h.data["container"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_restarts_a_killed_container_and_adopts_it_after_its_own_restart() {
    if skip("the_agent_restarts_a_killed_container_and_adopts_it_after_its_own_restart") {
        return;
    }
    let scope = Scope::new("e2e");
    let node = scope.node.clone();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());

    // The control plane.
    let mut manager = Manager::new(store.clone());
    manager.add(SchedulerService::new(Profile::default_profile()));
    manager.add(NodeLifecycle::builder(NodeLifecycleConfig::default()));
    let (stop_manager, manager_stopped) = oneshot::channel::<()>();
    let manager = tokio::spawn(manager.run(async move {
        let _ = manager_stopped.await;
    }));

    let first: Arc<dyn Runtime> = Arc::new(DockerRuntime::connect(scope.config()).await.unwrap());
    let (stop, agent) = start_agent(&store, &first, &node, false);

    // Not bound: the scheduler places it on the agent's node.
    let mut w = Workload::command("main", &["/bin/sh", "-c", "echo up; exec sleep 600"]);
    w.containers[0].image = Some(scope.image.clone());
    w.containers[0].resources.requests.insert(resource::CPU.into(), "100m".parse().unwrap());
    w.restart_policy = RestartPolicy::Always;
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&Object::new(ObjectMeta::named("web"), w)).await.unwrap();
    let running = wait_until("web running", LIMIT, async || {
        let w = api.get("web").await.unwrap();
        (w.status.phase == Phase::Running).then_some(w)
    })
    .await;
    assert_eq!(running.spec.node_name.as_deref(), Some(node.as_str()), "scheduled onto the agent's node");
    assert_eq!(running.status.restart_count, 0);
    let handles = first.list().await.unwrap();
    assert_eq!(handles.len(), 1);
    let killed = container_of(&handles[0]);

    // Killed behind the agent's back: it comes back as a new container, counted as a restart.
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let sigkill = bollard::query_parameters::KillContainerOptionsBuilder::default().signal("SIGKILL").build();
    docker.kill_container(&killed, Some(sigkill)).await.unwrap();
    let restarted = wait_until("web restarted", LIMIT, async || {
        let w = api.get("web").await.unwrap();
        (w.status.phase == Phase::Running && w.status.restart_count == 1).then_some(w)
    })
    .await;
    assert!(matches!(restarted.status.container_statuses[0].state, ContainerState::Running { .. }));
    let handles = first.list().await.unwrap();
    assert_eq!(handles.len(), 1, "the killed container was removed: {handles:?}");
    let replacement = container_of(&handles[0]);
    assert_ne!(replacement, killed);
    let started_at = docker.inspect_container(&replacement, None).await.unwrap().state.unwrap().started_at;

    // The agent stops without draining; its container keeps running. A stray container
    // labelled for the node (no workload's) appears meanwhile.
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    let stray = InstanceSpec {
        id: "stray".into(),
        container: orch_core::kinds::Container {
            name: "main".into(),
            image: Some(scope.image.clone()),
            command: vec!["/bin/sleep".into(), "600".into()],
            ..Default::default()
        },
        volumes: Vec::new(),
        labels: Default::default(),
    };
    first.start(&stray).await.unwrap();
    drop(first);

    // A new agent on a new runtime adopts the container: same id, same start, no restart.
    let mut config = scope.config();
    config.orphan_grace = Some(Duration::from_secs(2));
    let second: Arc<dyn Runtime> = Arc::new(DockerRuntime::connect(config).await.unwrap());
    let (stop, agent) = start_agent(&store, &second, &node, true);
    let ids = wait_until("the stray container removed", LIMIT, async || {
        let ids: Vec<String> = second.list().await.unwrap().iter().map(container_of).collect();
        (ids.len() == 1).then_some(ids)
    })
    .await;
    assert_eq!(ids, std::slice::from_ref(&replacement), "the same container, adopted");
    let now = docker.inspect_container(&replacement, None).await.unwrap().state.unwrap();
    assert_eq!((now.status, now.started_at), (Some(bollard::models::ContainerStateStatusEnum::RUNNING), started_at));
    let w = api.get("web").await.unwrap();
    assert_eq!((w.status.phase, w.status.restart_count), (Phase::Running, 1));

    // Draining stops and removes it.
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    assert!(second.list().await.unwrap().is_empty(), "a draining agent removes its containers");
    stop_manager.send(()).unwrap();
    manager.await.unwrap().unwrap();
}

/// A range of `n` host ports nothing on this machine listens on now.
fn free_range(n: u16) -> std::ops::RangeInclusive<u16> {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let Some(last) = first.checked_add(n - 1) else { continue };
        if (first..=last).all(|p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()) {
            return first..=last;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_publishes_each_container_port_on_its_allocated_host_port() {
    if skip("the_agent_publishes_each_container_port_on_its_allocated_host_port") {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scope = Scope::new("ports");
    let node = scope.node.clone();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(DockerRuntime::connect(scope.config()).await.unwrap());
    let range = free_range(4);
    let mut config = agent_config(&node);
    config.port_range = range.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let agent = tokio::spawn(Agent::new(config, store.clone(), runtime.clone()).run(
        async move {
            let _ = rx.await;
        },
        true,
    ));
    // Inside its container the server listens on its container port, told as PORT_HTTP; its
    // page says that and the host port it was told.
    let script =
        r#"mkdir -p /www; echo "$PORT_HTTP $HOST_PORT_HTTP" > /www/index.html; exec httpd -f -p "$PORT_HTTP" -h /www"#;
    let mut w = Workload::command("main", &["/bin/sh", "-c", script]);
    w.containers[0].image = Some(scope.image.clone());
    w.containers[0].ports =
        vec![orch_core::kinds::ContainerPort { name: Some("http".into()), container_port: 8080, ..Default::default() }];
    w.node_name = Some(node.clone());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&Object::new(ObjectMeta::named("web"), w)).await.unwrap();
    let (port, page) = wait_until("web answering on its host port", LIMIT, async || {
        let w = api.get("web").await.unwrap();
        let p = w.status.ports.first()?.clone();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.host_port as u16)).await.ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        let page = body.rsplit("\r\n\r\n").next()?.trim().to_string();
        (!page.is_empty()).then_some((p, page))
    })
    .await;
    assert!(range.contains(&(port.host_port as u16)), "{port:?} from the agent's range");
    assert_eq!(port.container_port, 8080);
    assert_eq!(page, format!("8080 {}", port.host_port), "published host port -> container port");
    tx.send(()).unwrap();
    agent.await.unwrap().unwrap();
}
