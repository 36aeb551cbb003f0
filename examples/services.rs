//! Two replicas of a small HTTP server behind a service, reached by name, rolled to a new
//! version without a dropped request.
//!
//! A control plane (memory store, scheduler, deployment, replica set and endpoints controllers,
//! garbage collector), a node agent running real processes, the node proxy and the cluster DNS
//! server run in this process. The server is this program itself, started by the agent with the
//! argument `serve`: it listens where the agent tells it (`ORCH_ADDRESS`, `PORT_HTTP`) and answers
//! each request with its version after 50 ms of "work". The example:
//!
//! - declares a deployment of two replicas of version 1 and a service `web` in front of them;
//! - asks the DNS server for `web.default.svc.cluster.local` with a stock resolver, and gets the
//!   service's cluster address, where the node proxy balances connections over the ready
//!   replicas;
//! - starts four clients that resolve the name and send requests one after another;
//! - rolls the deployment to version 2 (one new replica at a time, never one fewer ready): each
//!   old replica leaves the endpoints (terminating) a second before it is stopped;
//! - counts the requests, and fails if a single one was lost.
//!
//! `cargo run -p orch-examples --example services`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use orch_controllers::{
    DeploymentController, EndpointsConfig, EndpointsController, GarbageCollector, ReplicaSetController,
};
use orch_core::kinds::{
    ContainerPort, Deployment, EnvVar, IntOrPercent, RollingUpdate, Service, ServicePort, Strategy, Workload,
};
use orch_core::{Api, ListParams, Manager, Object, ObjectMeta, Runtime, Store};
use orch_runtime::net::dns::{DnsConfig, DnsServer};
use orch_runtime::net::{NodeProxy, ProxyConfig, Resolver};
use orch_runtime::{Agent, AgentConfig, ProcessRuntime};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

const NAME: &str = "web.default.svc.cluster.local.";

/// The server: answers every request with its version and workload, after 50 ms.
async fn serve() -> Result<(), Error> {
    let address = std::env::var("ORCH_ADDRESS")?;
    let port = std::env::var("PORT_HTTP")?;
    let version = std::env::var("VERSION").unwrap_or_default();
    // `namespace.workload.container.attempt`: the workload's name, for the answers.
    let instance = std::env::var("ORCH_INSTANCE_ID").unwrap_or_default();
    let workload = instance.split('.').nth(1).unwrap_or("?").to_string();
    let listener = tokio::net::TcpListener::bind(format!("{address}:{port}")).await?;
    let answer: Arc<str> = format!("{version} from {workload}\n").into();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut conn, _)) = accepted else { continue };
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let head = format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", answer.len());
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
            // Stopped: no new connections; answers in flight get their 50 ms.
            _ = term.recv() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(());
            }
        }
    }
}

/// Version `v` of the server: this program with `serve`, its port named `http`, ready once it
/// answers.
fn web(v: &str) -> Result<Workload, Error> {
    let me = std::env::current_exe()?.to_string_lossy().into_owned();
    let mut w = Workload::command("web", &[&me, "serve"]);
    let c = &mut w.containers[0];
    c.env = vec![EnvVar { name: "VERSION".into(), value: v.into() }];
    c.ports = vec![ContainerPort { name: Some("http".into()), container_port: 8080, ..Default::default() }];
    c.readiness_probe = Some(serde_json::from_value(serde_json::json!({
        "action": {"http": {"path": "/", "port": 8080}},
        "periodSeconds": 1
    }))?);
    Ok(w)
}

/// One request: the answer's text, or what went wrong.
async fn get(addr: SocketAddr) -> Result<String, String> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.map_err(|e| format!("write: {e}"))?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.map_err(|e| format!("read: {e}"))?;
        match answer.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.trim().to_string()),
            _ => Err(format!("bad answer {answer:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.map_err(|_| "timed out".to_string())?
}

/// A stock DNS resolver asking only the cluster DNS server at `server`.
fn stock_resolver(server: SocketAddr) -> hickory_resolver::TokioResolver {
    let mut ns = NameServerConfig::udp(server.ip());
    for c in &mut ns.connections {
        c.port = server.port();
    }
    let config = ResolverConfig::from_name_servers(vec![ns]);
    hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .build()
        .expect("a resolver")
}

async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> Result<T, Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    if std::env::args().nth(1).as_deref() == Some("serve") {
        return serve().await;
    }
    let work = std::env::temp_dir().join(format!("orch-example-services-{}", std::process::id()));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());

    // The control plane.
    let mut manager = Manager::new(store.clone());
    manager.add(SchedulerService::new(Profile::default_profile()));
    manager.add(DeploymentController::builder());
    manager.add(ReplicaSetController::builder());
    manager.add(EndpointsController::builder(EndpointsConfig::default()));
    manager.add(GarbageCollector::builtin());
    let (stop_plane, plane_stopped) = tokio::sync::oneshot::channel::<()>();
    let plane = tokio::spawn(manager.run(async move {
        let _ = plane_stopped.await;
    }));

    // A node: the agent (real processes), its proxy and a DNS server.
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(work.join("instances"))?);
    let mut config = AgentConfig::new("node-1");
    config.data_root = work.join("data");
    config.pre_stop_delay = Duration::from_secs(1);
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(Agent::new(config, store.clone(), runtime).run(
        async move {
            let _ = agent_stopped.await;
        },
        true,
    ));
    let resolver = Resolver::from_store(store.clone());
    let dns = DnsServer::bind(DnsConfig::new("127.0.0.1:0".parse()?), resolver.clone()).await?;
    let dns_addr = dns.local_addr();
    let (stop_net, net_stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let dns_task = tokio::spawn(dns.run(until_stopped(net_stopped.clone())));
    let proxy = NodeProxy::new(
        ProxyConfig { node_addresses: vec!["127.0.0.1".parse()?], ..Default::default() },
        resolver.clone(),
    );
    let proxy_task = tokio::spawn(proxy.run(until_stopped(net_stopped)));
    println!("control plane, node-1, its proxy and DNS on {dns_addr} are up");

    // Two replicas of v1 behind the service `web`.
    let deployments: Api<Deployment> = Api::namespaced(store.clone(), "default");
    let mut d = Deployment::new("web", 2, web("v1")?);
    d.strategy = Strategy::RollingUpdate(RollingUpdate {
        max_surge: IntOrPercent::Count(1),
        max_unavailable: IntOrPercent::Count(0),
    });
    deployments.create(&Object::new(ObjectMeta::named("web"), d)).await?;
    let services: Api<Service> = Api::namespaced(store.clone(), "default");
    let svc = Service::selecting(&[("app", "web")], vec![ServicePort::to_named(80, "http")]);
    services.create(&Object::new(ObjectMeta::named("web"), svc)).await?;
    wait_for("two ready replicas", async || {
        let s = resolver.resolve("web.default")?;
        (s.endpoints.iter().filter(|e| e.conditions.ready).count() == 2).then_some(())
    })
    .await?;

    // By name, through a stock resolver.
    let dns_client = stock_resolver(dns_addr);
    let address =
        wait_for("the name to resolve", async || dns_client.lookup_ip(NAME).await.ok()?.iter().next()).await?;
    println!("{NAME} -> {address}");
    for _ in 0..4 {
        println!("  {}", get(SocketAddr::new(address, 80)).await?);
    }

    // Four clients, each resolving the name and sending requests one after another.
    let running = Arc::new(AtomicBool::new(true));
    let answers: Arc<Mutex<BTreeMap<String, usize>>> = Default::default();
    let failures: Arc<Mutex<Vec<String>>> = Default::default();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (running, answers, failures) = (running.clone(), answers.clone(), failures.clone());
        let dns_client = stock_resolver(dns_addr);
        clients.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                let addr = match dns_client.lookup_ip(NAME).await.map(|l| l.iter().next()) {
                    Ok(Some(a)) => SocketAddr::new(a, 80),
                    other => {
                        failures.lock().unwrap().push(format!("lookup: {other:?}"));
                        continue;
                    }
                };
                match get(addr).await {
                    Ok(text) => {
                        let version = text.split_whitespace().next().unwrap_or_default().to_string();
                        *answers.lock().unwrap().entry(version).or_default() += 1;
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Roll to v2, printing the endpoints as they change.
    println!("rolling to v2 under load");
    let v2 = web("v2")?;
    deployments
        .retry_on_conflict("web", |d| {
            d.spec.template.spec = v2.clone();
            Ok(())
        })
        .await?;
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    let mut changes = resolver.watch("web.default");
    let mut last = String::new();
    wait_for("the rollout", async || {
        if let Some(s) = changes.borrow_and_update().clone() {
            let mut now: Vec<String> = s
                .endpoints
                .iter()
                .map(|e| {
                    let state = if e.conditions.ready {
                        "ready"
                    } else if e.conditions.terminating {
                        "terminating"
                    } else {
                        "starting"
                    };
                    format!("{} {state}", e.workload)
                })
                .collect();
            now.sort();
            let line = now.join(", ");
            if line != last {
                println!("  endpoints: {line}");
                last = line;
            }
        }
        let all = workloads.list(&ListParams::default()).await.ok()?.items;
        let done = all.len() == 2 && all.iter().all(|w| w.spec.containers[0].env[0].value == "v2");
        let ready = resolver.resolve("web.default")?.endpoints.iter().filter(|e| e.conditions.ready).count();
        (done && ready == 2 && last.matches("ready").count() == 2).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.store(false, Ordering::Relaxed);
    for c in clients {
        c.await?;
    }
    let answers = answers.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();
    let total: usize = answers.values().sum::<usize>() + failures.len();
    println!("{total} requests during the rollout: {answers:?}, {} failed", failures.len());

    let _ = stop_net.send(true);
    dns_task.await??;
    proxy_task.await?;
    let _ = stop_agent.send(());
    agent.await??;
    let _ = stop_plane.send(());
    plane.await??;
    let _ = std::fs::remove_dir_all(&work);
    if !failures.is_empty() {
        return Err(format!("requests were lost: {:?}", &failures[..failures.len().min(5)]).into());
    }
    if !answers.contains_key("v1") || !answers.contains_key("v2") {
        return Err("the clients did not see both versions".into());
    }
    println!("no request lost");
    Ok(())
}
