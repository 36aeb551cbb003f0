//! Shared by the service-traffic tests: a memory store with Service and EndpointSlice objects
//! written straight into it (as the endpoints controller would), and a resolver over it.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use orch_core::kinds::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, SERVICE_NAME_LABEL, Service, ServicePort,
    ServiceType,
};
use orch_core::{Api, DeleteOptions, Object, ObjectMeta, Store};
use orch_runtime::net::Resolver;
use orch_store::MemoryStore;

pub const NS: &str = "default";

/// Longest wait for anything in these tests.
pub const LIMIT: Duration = Duration::from_secs(10);

pub struct Cluster {
    pub store: Arc<dyn Store>,
    pub services: Api<Service>,
    pub slices: Api<EndpointSlice>,
    pub resolver: Resolver,
}

impl Cluster {
    pub async fn new() -> Self {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let resolver = Resolver::from_store(store.clone());
        resolver.ready().await;
        Cluster {
            services: Api::namespaced(store.clone(), NS),
            slices: Api::namespaced(store.clone(), NS),
            store,
            resolver,
        }
    }

    /// Creates a service with its status as the endpoints controller would write it.
    pub async fn service(&self, name: &str, spec: Service, cluster_address: Option<&str>) -> Object<Service> {
        let created = self.services.create(&Object::new(ObjectMeta::namespaced(NS, name), spec.clone())).await.unwrap();
        let mut with_status = created.clone();
        with_status.status.cluster_address = cluster_address.map(str::to_string);
        if spec.type_ == ServiceType::NodePort {
            for p in &spec.ports {
                if let Some(np) = p.node_port {
                    with_status.status.node_ports.insert(p.name.clone(), np);
                }
            }
        }
        self.services.replace_status(&with_status).await.unwrap()
    }

    /// Creates or replaces one slice of `service`.
    pub async fn slice(&self, service: &str, slice: &str, endpoints: Vec<Endpoint>) {
        let spec = EndpointSlice { service: service.into(), endpoints };
        match self.slices.get_opt(slice).await.unwrap() {
            Some(mut cur) => {
                cur.spec = spec;
                self.slices.replace(&cur).await.unwrap();
            }
            None => {
                let meta = ObjectMeta::namespaced(NS, slice).with_label(SERVICE_NAME_LABEL, service);
                self.slices.create(&Object::new(meta, spec)).await.unwrap();
            }
        }
    }

    pub async fn delete_slice(&self, slice: &str) {
        self.slices.delete(slice, &DeleteOptions::default()).await.unwrap();
    }

    pub async fn delete_service(&self, name: &str) {
        self.services.delete(name, &DeleteOptions::default()).await.unwrap();
    }
}

/// A service with one TCP port per `(name, port)`.
pub fn service_spec(ports: &[(&str, u16)]) -> Service {
    Service {
        ports: ports
            .iter()
            .map(|(n, p)| ServicePort { name: n.to_string(), port: u32::from(*p), ..Default::default() })
            .collect(),
        ..Default::default()
    }
}

/// An endpoint at `addr` serving each `(port name, port)`.
pub fn endpoint(addr: &str, ports: &[(&str, u16)], ready: bool) -> Endpoint {
    endpoint_with(addr, ports, Protocol::TCP, EndpointConditions { ready, serving: ready, terminating: false })
}

pub fn endpoint_with(
    addr: &str,
    ports: &[(&str, u16)],
    protocol: Protocol,
    conditions: EndpointConditions,
) -> Endpoint {
    Endpoint {
        addresses: vec![addr.to_string()],
        ports: ports.iter().map(|(n, p)| EndpointPort { name: n.to_string(), port: u32::from(*p), protocol }).collect(),
        workload: format!("w-{}", addr.replace(['.', ':'], "-")),
        conditions,
        ..Default::default()
    }
}

/// A TCP server on loopback that greets each connection with `<id>\n` and answers each line
/// with `<id>:<line>\n`; counts the connections it accepted.
pub struct EchoServer {
    pub id: String,
    pub addr: std::net::SocketAddr,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    pub async fn start(id: &str) -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (count, name) = (accepted.clone(), id.to_string());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { return };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let name = name.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    if w.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                        return;
                    }
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if w.write_all(format!("{name}:{line}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        EchoServer { id: id.to_string(), addr, accepted, task }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A client connection to an [`EchoServer`] (through the proxy or not).
pub struct EchoClient {
    pub server: String,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl EchoClient {
    /// Connects and reads the greeting: which server took the connection. `None` when the
    /// connection was closed before any greeting (no endpoint).
    pub async fn connect(addr: std::net::SocketAddr) -> Option<Self> {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let s = tokio::time::timeout(LIMIT, tokio::net::TcpStream::connect(addr)).await.unwrap().ok()?;
        let (r, write) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        let server = tokio::time::timeout(LIMIT, lines.next_line()).await.expect("greeting or close").ok()??;
        Some(EchoClient { server, lines, write })
    }

    /// Sends a line and reads the answer; `None` once the connection is closed.
    pub async fn ask(&mut self, line: &str) -> Option<String> {
        use tokio::io::AsyncWriteExt;
        self.write.write_all(format!("{line}\n").as_bytes()).await.ok()?;
        tokio::time::timeout(LIMIT, self.lines.next_line()).await.expect("answer or close").ok()?
    }

    /// Waits until the other side closes the connection.
    pub async fn closed(&mut self) {
        loop {
            match tokio::time::timeout(LIMIT, self.lines.next_line()).await.expect("closed in time") {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    }
}

/// Whether this process may add routes (`CAP_NET_ADMIN`); says why not, or fails where CI
/// requires it (`ORCH_REQUIRE_NET_ADMIN=1`).
pub fn may_route(test: &str) -> bool {
    let probe: std::net::IpAddr = format!("10.98.{}.254", std::process::id() % 250).parse().unwrap();
    match orch_runtime::net::LocalRoute::add(probe) {
        Ok(_) => true,
        Err(e) if std::env::var("ORCH_REQUIRE_NET_ADMIN").is_ok_and(|v| v == "1") => {
            panic!("{test}: routes are required here (ORCH_REQUIRE_NET_ADMIN=1) but cannot be added: {e}")
        }
        Err(e) => {
            eprintln!("skipped {test}: cannot add a local route here ({e}); it takes CAP_NET_ADMIN");
            false
        }
    }
}
