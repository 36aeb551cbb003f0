//! A rolling update under a steady client load loses no request. A control plane (scheduler,
//! deployment and replica set controllers, endpoints controller, garbage collector) on the
//! memory store, a node agent running real processes (busybox HTTP servers on their
//! `PORT_HTTP`, ready by an HTTP probe, each request taking 200 ms), and the node proxy in front
//! of the service's cluster address. Four clients send requests through the proxy, one after
//! another each, for the whole rollout from v1 to v2; every request is counted, and none may
//! fail. (With no pre-stop delay, requests in flight when an old server stops fail.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use orch_controllers::endpoints::{AddressRange, EndpointsConfig};
use orch_controllers::{DeploymentController, EndpointsController, GarbageCollector, ReplicaSetController};
use orch_core::kinds::{
    ContainerPort, Deployment, EnvVar, IntOrPercent, RollingUpdate, Service, ServicePort, Strategy, Workload,
};
use orch_core::testkit::wait_until;
use orch_core::{Api, ListParams, Manager, Object, ObjectMeta, Runtime, Store};
use orch_runtime::net::{NodeProxy, ProxyConfig, Resolver};
use orch_runtime::{Agent, AgentConfig, ProcessRuntime};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(60);

fn dir(what: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("orch-rollout-traffic-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A busybox HTTP server whose page `/cgi-bin/page` takes 200 ms and says its version: a
/// request in flight when the server is stopped fails, so only a server taken out of the
/// endpoints before it stops loses nothing.
fn server(version: &str) -> Workload {
    let script = r#"d=$(mktemp -d); mkdir "$d/cgi-bin"
cat > "$d/cgi-bin/page" <<END
#!/bin/sh
sleep 0.2
echo "Content-Type: text/plain"
echo
echo $VERSION
END
chmod +x "$d/cgi-bin/page"; echo up > "$d/index.html"
exec /bin/busybox httpd -f -p "$ORCH_ADDRESS:$PORT_HTTP" -h "$d""#;
    let mut w = Workload::command("main", &["/bin/sh", "-c", script]);
    let c = &mut w.containers[0];
    c.env = vec![EnvVar { name: "VERSION".into(), value: version.into() }];
    c.ports = vec![ContainerPort { name: Some("http".into()), container_port: 80, ..Default::default() }];
    c.readiness_probe = Some(
        serde_json::from_value(serde_json::json!({"action": {"http": {"path": "/", "port": 80}}, "periodSeconds": 1}))
            .unwrap(),
    );
    c.resources.requests.insert("cpu".into(), "100m".parse().unwrap());
    w
}

/// One HTTP/1.0 request to `addr`; the page, or why not.
async fn request(addr: std::net::SocketAddr) -> Result<String, String> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"GET /cgi-bin/page HTTP/1.0\r\n\r\n").await.map_err(|e| format!("write: {e}"))?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.map_err(|e| format!("read: {e}"))?;
        if !answer.starts_with("HTTP/1.") || !answer.contains(" 200 ") {
            return Err(format!("answer: {answer:?}"));
        }
        // The page is the last line (the script writes its headers with bare line feeds).
        Ok(answer.trim_end().lines().last().unwrap_or_default().trim().to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.map_err(|_| "timed out".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_under_load_loses_no_request() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut manager = Manager::new(store.clone());
    manager.add(SchedulerService::new(Profile::default_profile()));
    manager.add(DeploymentController::builder());
    manager.add(ReplicaSetController::builder());
    manager.add(EndpointsController::builder(EndpointsConfig {
        cluster_range: AddressRange::parse("127.67.0.0/24").unwrap(),
        ..Default::default()
    }));
    manager.add(GarbageCollector::builtin());
    let (stop_manager, stopped) = tokio::sync::oneshot::channel::<()>();
    let manager = tokio::spawn(manager.run(async move {
        let _ = stopped.await;
    }));
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(dir("rt")).unwrap());
    let mut config = AgentConfig::new("node-1");
    config.data_root = dir("data");
    config.resync_interval = Duration::from_millis(500);
    config.pre_stop_delay = Duration::from_secs(1);
    config.stop_grace = Duration::from_secs(5);
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(Agent::new(config, store.clone(), runtime.clone()).run(
        async move {
            let _ = agent_stopped.await;
        },
        true,
    ));
    let resolver = Resolver::from_store(store.clone());
    let proxy = NodeProxy::new(
        ProxyConfig { node_addresses: vec!["127.0.0.1".parse().unwrap()], ..Default::default() },
        resolver.clone(),
    );
    let (stop_proxy, proxy_stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(proxy.run(async move {
        let _ = proxy_stopped.await;
    }));

    // Two replicas of v1 behind a service; one new one at a time, never one fewer available.
    let deployments: Api<Deployment> = Api::namespaced(store.clone(), "default");
    let mut d = Deployment::new("web", 2, server("v1"));
    d.strategy = Strategy::RollingUpdate(RollingUpdate {
        max_surge: IntOrPercent::Count(1),
        max_unavailable: IntOrPercent::Count(0),
    });
    deployments.create(&Object::new(ObjectMeta::named("web"), d)).await.unwrap();
    let services: Api<Service> = Api::namespaced(store.clone(), "default");
    let svc = Service::selecting(&[("app", "web")], vec![ServicePort::to_named(80, "http")]);
    services.create(&Object::new(ObjectMeta::named("web"), svc)).await.unwrap();
    let address = wait_until("two ready endpoints behind the cluster address", LIMIT, async || {
        let s = resolver.resolve("web.default")?;
        let ready = s.endpoints.iter().filter(|e| e.conditions.ready).count();
        (ready == 2).then_some(())?;
        let a: std::net::IpAddr = services.get("web").await.ok()?.status.cluster_address?.parse().ok()?;
        Some(std::net::SocketAddr::new(a, 80))
    })
    .await;
    wait_until("the proxy answers with v1", LIMIT, async || (request(address).await.ok()? == "v1").then_some(())).await;

    // The load: four clients, each one request after another, counting.
    let running = Arc::new(AtomicBool::new(true));
    let (ok, v2_seen) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (running, ok, v2_seen, failures) = (running.clone(), ok.clone(), v2_seen.clone(), failures.clone());
        clients.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                match request(address).await {
                    Ok(v) if v == "v1" => _ = ok.fetch_add(1, Ordering::Relaxed),
                    Ok(v) if v == "v2" => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        v2_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(other) => failures.lock().unwrap().push(format!("unexpected page {other:?}")),
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    wait_until("load flowing", LIMIT, async || (ok.load(Ordering::Relaxed) >= 20).then_some(())).await;

    // Roll to v2.
    deployments
        .retry_on_conflict("web", |d| {
            d.spec.template.spec = server("v2");
            Ok(())
        })
        .await
        .unwrap();
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    wait_until("only v2 left, both ready", LIMIT, async || {
        let all = workloads.list(&ListParams::default()).await.ok()?.items;
        let v2 = |w: &Object<Workload>| w.spec.containers[0].env[0].value == "v2";
        let done = all.len() == 2 && all.iter().all(v2);
        let s = resolver.resolve("web.default")?;
        (done && s.endpoints.len() == 2 && s.endpoints.iter().all(|e| e.conditions.ready)).then_some(())
    })
    .await;
    // Some more load on v2 alone, then stop and count.
    let at_end = v2_seen.load(Ordering::Relaxed);
    wait_until("v2 answers", LIMIT, async || (v2_seen.load(Ordering::Relaxed) >= at_end + 20).then_some(())).await;
    running.store(false, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failures.lock().unwrap().clone());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rollout: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(10)]
    );
    assert!(ok >= 60, "{ok} requests");
    assert_eq!(request(address).await.as_deref(), Ok("v2"));

    let _ = stop_proxy.send(());
    proxy.await.unwrap();
    let _ = stop_agent.send(());
    agent.await.unwrap().unwrap();
    let _ = stop_manager.send(());
    manager.await.unwrap().unwrap();
}
