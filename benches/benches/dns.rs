//! DNS queries per second that the cluster DNS server answers on one core.
//!
//! `cargo bench -p orch-benches --bench dns` (`-- --test` for a quick smoke run)
//!
//! The server (with its resolver and caches, over a memory store of 1,000 services: 500 with a
//! cluster address, 500 headless with 3 ready endpoints each) runs alone on a current-thread
//! tokio runtime in its own OS thread: one core. The bench client runs on the other core: 64
//! UDP sockets, each with one A query in flight at a time for a random service name, for 3 s
//! (0.3 s with `--test`). Every answer is checked to be NOERROR with at least one record.
//!
//! CoreDNS's published figure for the same kind of query (in-cluster names, `dnsperf` through
//! `kubernetes/perf-tests/dns`): 33,669 QPS for one CoreDNS 1.2.5 on a 2-vCPU GCE
//! n1-standard-2 node with both vCPUs pegged, about 16,800 per core (coredns/deployment,
//! `kubernetes/Scaling_CoreDNS.md`, "CPU and QPS"). That client ran on other machines across the
//! network; here client and server share one machine over loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use orch_core::kinds::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice, SERVICE_NAME_LABEL, Service, ServicePort,
};
use orch_core::{Api, Object, ObjectMeta, Store};
use orch_runtime::net::Resolver;
use orch_runtime::net::dns::{DnsConfig, DnsServer};
use orch_store::MemoryStore;

const SERVICES: usize = 1_000;
const SOCKETS: usize = 64;
const NS: &str = "bench";

fn quick() -> bool {
    std::env::args().any(|a| a == "--test")
}

/// Starts the server on its own thread and runtime; returns its address.
fn start_server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
            let services: Api<Service> = Api::namespaced(store.clone(), NS);
            let slices: Api<EndpointSlice> = Api::namespaced(store.clone(), NS);
            for i in 0..SERVICES {
                let headless = i % 2 == 1;
                let spec = Service { ports: vec![ServicePort::tcp(80)], headless, ..Default::default() };
                let mut svc = services
                    .create(&Object::new(ObjectMeta::namespaced(NS, format!("s{i}")), spec))
                    .await
                    .expect("svc");
                if !headless {
                    svc.status.cluster_address = Some(format!("127.64.{}.{}", i / 250, i % 250 + 1));
                    services.replace_status(&svc).await.expect("status");
                }
                let endpoints = (0..3)
                    .map(|j| Endpoint {
                        addresses: vec![format!("10.0.{}.{}", i % 250, j + 1)],
                        ports: vec![EndpointPort { port: 80, ..Default::default() }],
                        workload: format!("w{j}"),
                        conditions: EndpointConditions { ready: true, serving: true, terminating: false },
                        ..Default::default()
                    })
                    .collect();
                let meta =
                    ObjectMeta::namespaced(NS, format!("s{i}-a")).with_label(SERVICE_NAME_LABEL, format!("s{i}"));
                slices
                    .create(&Object::new(meta, EndpointSlice { service: format!("s{i}"), endpoints }))
                    .await
                    .expect("slice");
            }
            let resolver = Resolver::from_store(store);
            resolver.ready().await;
            let server =
                DnsServer::bind(DnsConfig::new("127.0.0.1:0".parse().expect("addr")), resolver).await.expect("bind");
            tx.send(server.local_addr()).expect("send address");
            let _ = server.run(std::future::pending()).await;
        });
    });
    rx.recv().expect("server address")
}

fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Queries answered per second by `SOCKETS` closed-loop clients during `secs`.
async fn load(server: SocketAddr, secs: f64) -> f64 {
    let answered = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..SOCKETS)
        .map(|k| {
            let answered = answered.clone();
            tokio::spawn(async move {
                let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
                sock.connect(server).await.expect("connect");
                let mut buf = [0u8; 1500];
                let mut id = (k as u16) << 10;
                while Instant::now() < deadline {
                    id = id.wrapping_add(1);
                    let q = a_query(id, &format!("s{}.{NS}.svc.cluster.local", fastrand::usize(..SERVICES)));
                    sock.send(&q).await.expect("send");
                    // A lost datagram must not stall the socket: ask again after a while.
                    let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await else {
                        continue;
                    };
                    let ok = n >= 12
                        && u16::from_be_bytes([buf[0], buf[1]]) == id
                        && buf[3] & 0x0f == 0
                        && u16::from_be_bytes([buf[6], buf[7]]) >= 1;
                    assert!(ok, "a wrong answer");
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    answered.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let server = start_server();
    let client = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let secs = if quick() { 0.3 } else { 3.0 };
    let mut rates = Vec::new();
    let mut g = c.benchmark_group("dns");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    g.bench_function("A queries, server on one core", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let qps = client.block_on(load(server, secs));
                rates.push(qps);
                took += Duration::from_secs_f64(1.0 / qps);
            }
            took
        })
    });
    g.finish();
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| A queries/s, orch DNS on one core, {SERVICES} services, {SOCKETS} sockets over loopback (median of {} runs) | {median:.0} |",
        rates.len()
    );
    println!(
        "| CoreDNS 1.2.5 published: in-cluster queries/s on 2 vCPUs (both pegged), per core | 33,669 / 2 = 16,835 |"
    );
    println!("| orch vs CoreDNS per core | {:.1}x |", median / 16_835.0);
    c.final_summary();
}
