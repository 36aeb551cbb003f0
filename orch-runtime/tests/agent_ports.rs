//! Host ports on the process runtime, with real processes: the agent gives each container port a
//! host port from its range, the program finds it in `PORT_<NAME>` and really listens there, the
//! status says the same port and the node's address, no two workloads share a port, a gone
//! workload's ports come back, and an agent restart neither loses nor duplicates one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use orch_core::kinds::{ConditionStatus, ContainerPort, ContainerState, Node, Phase, Workload};
use orch_core::testkit::wait_until;
use orch_core::{Api, DeleteOptions, Object, ObjectMeta, Runtime, Store};
use orch_runtime::{Agent, AgentConfig, ProcessRuntime};
use orch_store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(20);

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn root(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "orch-ports-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A range of `n` ports nothing else on this machine listens on now (tests run in parallel,
/// so each takes ports the system just handed out).
fn free_range(n: u16) -> std::ops::RangeInclusive<u16> {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let Some(last) = first.checked_add(n - 1) else { continue };
        if (first..=last).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return first..=last;
        }
    }
}

fn config(data_root: &std::path::Path, range: std::ops::RangeInclusive<u16>) -> AgentConfig {
    AgentConfig {
        backoff_base: Duration::from_millis(200),
        resync_interval: Duration::from_millis(200),
        stop_grace: Duration::from_secs(2),
        data_root: data_root.to_path_buf(),
        port_range: range,
        ..AgentConfig::new("node-1")
    }
}

/// A busybox HTTP server on `$PORT_HTTP` whose page is the port it was told.
fn server(name: &str) -> Object<Workload> {
    let script =
        r#"d=$(mktemp -d); echo "$PORT_HTTP" > "$d/index.html"; exec /bin/busybox httpd -f -p "$PORT_HTTP" -h "$d""#;
    let mut w = Workload::command("main", &["/bin/sh", "-c", script]);
    w.containers[0].ports = vec![ContainerPort { name: Some("http".into()), container_port: 80, ..Default::default() }];
    // Probes name the container port; the agent probes the host port the program listens on.
    w.containers[0].readiness_probe = Some(
        serde_json::from_value(serde_json::json!({"action": {"http": {"path": "/", "port": 80}}, "periodSeconds": 1}))
            .unwrap(),
    );
    w.node_name = Some("node-1".into());
    Object::new(ObjectMeta::named(name), w)
}

type Running = (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), orch_runtime::AgentError>>);

fn start(config: AgentConfig, store: &Arc<dyn Store>, runtime: &Arc<dyn Runtime>) -> Running {
    let (tx, rx) = oneshot::channel::<()>();
    let agent = Agent::new(config, store.clone(), runtime.clone());
    (
        tx,
        tokio::spawn(agent.run(
            async move {
                let _ = rx.await;
            },
            false,
        )),
    )
}

async fn http_get(port: u32) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port as u16)).await.ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body.rsplit("\r\n\r\n").next()?.trim().to_string())
}

/// The host port the status reports once the workload runs and answers on it.
async fn serving_port(api: &Api<Workload>, name: &str) -> u32 {
    wait_until(&format!("{name} serving on its port"), LIMIT, async || {
        let w = api.get(name).await.unwrap();
        let ready = w.status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True);
        if w.status.phase != Phase::Running || !ready {
            return None;
        }
        assert_eq!(w.status.address, "127.0.0.1", "the node's address");
        let p = w.status.ports.first()?;
        assert_eq!((p.container.as_str(), p.name.as_deref(), p.container_port), ("main", Some("http"), 80));
        // The program was told the same port and listens on it.
        (http_get(p.host_port).await? == p.host_port.to_string()).then_some(p.host_port)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_get_their_ports_uniquely_and_the_ports_come_back() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root("rt")).unwrap());
    let data = root("data");
    let range = free_range(2);
    let (stop, agent) = start(config(&data, range.clone()), &store, &runtime);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&server("a")).await.unwrap();
    api.create(&server("b")).await.unwrap();
    let (a, b) = (serving_port(&api, "a").await, serving_port(&api, "b").await);
    assert_ne!(a, b, "two workloads never share a port");
    assert!(range.contains(&(a as u16)) && range.contains(&(b as u16)));
    let nodes: Api<Node> = Api::all(store.clone());
    let node = nodes.get("node-1").await.unwrap();
    assert_eq!(node.status.addresses[0].address, "127.0.0.1", "the node reports its address");

    // The range is used up: a third waits, saying why.
    api.create(&server("c")).await.unwrap();
    wait_until("c waits for a port", LIMIT, async || {
        let w = api.get("c").await.unwrap();
        matches!(&w.status.container_statuses.first()?.state,
            ContainerState::Waiting { reason } if reason.starts_with("PortsUnavailable") && reason.contains("no free host port"))
        .then_some(())
    })
    .await;

    // An agent restart loses nothing and hands out nothing twice: a, b keep their ports and c
    // still waits.
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    let (stop, agent) = start(config(&data, range.clone()), &store, &runtime);
    assert_eq!(serving_port(&api, "a").await, a);
    assert_eq!(serving_port(&api, "b").await, b);
    // The same again with the agent's records wiped: the statuses say who holds what.
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    std::fs::remove_dir_all(data.join("ports")).unwrap();
    let (stop, agent) = start(config(&data, range.clone()), &store, &runtime);
    assert_eq!(serving_port(&api, "a").await, a);
    let c = api.get("c").await.unwrap();
    assert!(c.status.ports.is_empty() && c.status.phase == Phase::Pending, "c got no port twice: {:?}", c.status);

    // a's port comes back when a is gone, and c gets it.
    api.delete("a", &DeleteOptions::default()).await.unwrap();
    assert_eq!(serving_port(&api, "c").await, a);
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    for h in runtime.list().await.unwrap() {
        runtime.remove(&h).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_workload_is_terminating_in_its_endpoints_before_it_is_signalled() {
    use orch_controllers::{EndpointsController, GarbageCollector};
    use orch_core::kinds::{EndpointSlice, PRE_STOP_FINALIZER, Service, ServicePort};
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut manager = orch_core::Manager::new(store.clone());
    manager.add(EndpointsController::builder(Default::default()));
    manager.add(GarbageCollector::builtin());
    let (stop_manager, stopped) = oneshot::channel::<()>();
    let manager = tokio::spawn(manager.run(async move {
        let _ = stopped.await;
    }));
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root("rt")).unwrap());
    let (stop, agent) = start(config(&root("data"), free_range(4)), &store, &runtime);

    let delay = Duration::from_secs(3);
    let mut w = server("web-0");
    w.metadata.labels.insert("app", "web");
    w.spec.pre_stop_delay_seconds = Some(delay.as_secs());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&w).await.unwrap();
    let services: Api<Service> = Api::namespaced(store.clone(), "default");
    let svc = Service::selecting(&[("app", "web")], vec![ServicePort::to_named(80, "http")]);
    services.create(&Object::new(ObjectMeta::named("web"), svc)).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(store.clone(), "default");
    let endpoint = async || {
        let all = slices.list(&Default::default()).await.unwrap().items;
        all.into_iter().flat_map(|s| s.spec.endpoints).next()
    };
    let port = serving_port(&api, "web-0").await;
    let ready = wait_until("a ready endpoint", LIMIT, async || endpoint().await.filter(|e| e.conditions.ready)).await;
    assert_eq!(ready.ports[0].port, port);
    assert!(api.get("web-0").await.unwrap().metadata.finalizers.iter().any(|f| f == PRE_STOP_FINALIZER));

    let deleted_at = std::time::Instant::now();
    api.delete("web-0", &DeleteOptions::default()).await.unwrap();
    let e =
        wait_until("terminating in its slice", LIMIT, async || endpoint().await.filter(|e| e.conditions.terminating))
            .await;
    assert!(!e.conditions.ready && e.conditions.serving, "out of rotation, still serving: {:?}", e.conditions);
    // Not signalled yet: it still answers, and still exists.
    assert_eq!(http_get(port).await.as_deref(), Some(port.to_string().as_str()), "stopped before the delay");
    assert!(api.get_opt("web-0").await.unwrap().is_some());
    // Then it is stopped, and the workload and its endpoint go.
    wait_until("web-0 gone", LIMIT, async || api.get_opt("web-0").await.unwrap().is_none().then_some(())).await;
    assert!(deleted_at.elapsed() >= delay, "stopped after {:?}, before the {delay:?} delay", deleted_at.elapsed());
    assert!(runtime.list().await.unwrap().is_empty(), "its instance is removed");
    assert!(http_get(port).await.is_none(), "nothing listens any more");
    wait_until("endpoint gone", LIMIT, async || endpoint().await.is_none().then_some(())).await;
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    stop_manager.send(()).unwrap();
    manager.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_workload_that_never_ran_does_not_wait_out_its_pre_stop_delay() {
    use orch_core::kinds::PRE_STOP_FINALIZER;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root("rt")).unwrap());
    let (stop, agent) = start(config(&root("data"), free_range(2)), &store, &runtime);
    // Its program does not exist: it never starts, but it holds a port and the finalizer.
    let mut w = server("broken");
    w.spec.containers[0].command = vec!["/nonexistent/server".into()];
    w.spec.pre_stop_delay_seconds = Some(3600);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&w).await.unwrap();
    wait_until("start failed, finalizer on", LIMIT, async || {
        let w = api.get("broken").await.unwrap();
        let failed = matches!(&w.status.container_statuses.first()?.state,
            ContainerState::Waiting { reason } if reason.starts_with("StartFailed"));
        (failed && w.metadata.finalizers.iter().any(|f| f == PRE_STOP_FINALIZER)).then_some(())
    })
    .await;
    api.delete("broken", &DeleteOptions::default()).await.unwrap();
    wait_until("gone without the hour's delay", LIMIT, async || {
        api.get_opt("broken").await.unwrap().is_none().then_some(())
    })
    .await;
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}
