//! From an endpoint change written to the store to the node proxy and the DNS server serving
//! it, with 10,000 services and 100,000 endpoints.
//!
//! `cargo bench -p orch-benches --bench service_updates` (`-- --test`: 200 services)
//!
//! One memory store holds 10,000 services of 10 endpoints each (one slice per service): 5,000
//! with cluster addresses (in 127.64.0.0/16, each served by the node proxy on its own listener)
//! and 5,000 headless (answered by DNS with their ready endpoints). One resolver (its two
//! caches), one node proxy and one DNS server follow the store, all in this process on a
//! 2-worker tokio runtime. Then 400 changes, one at a time: a random service's slice is
//! rewritten with one endpoint's `ready` flipped, and the clock runs from just before the write
//! until
//! - for a proxied service: the proxy's pool for that port holds exactly the ready endpoints
//!   (followed through `ProxyStatus::changed`);
//! - for a headless service: a DNS query over UDP for its name answers exactly the ready
//!   endpoints (asked again and again until it does).
//!
//! Target (issue #21): p99 <= 10 ms.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use orch_core::kinds::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, SERVICE_NAME_LABEL, Service, ServicePort,
};
use orch_core::{Api, Object, ObjectMeta, Store};
use orch_runtime::net::dns::{DnsConfig, DnsServer};
use orch_runtime::net::{Frontend, NodeProxy, ProxyConfig, ProxyStatus, Resolver};
use orch_store::MemoryStore;

const NS: &str = "bench";
const PER_SERVICE: usize = 10;

fn quick() -> bool {
    std::env::args().any(|a| a == "--test")
}

struct Fixture {
    slices: Api<EndpointSlice>,
    current: Vec<Object<EndpointSlice>>,
    proxy: ProxyStatus,
    dns: SocketAddr,
    dns_client: tokio::net::UdpSocket,
    query_id: u16,
}

fn cluster_address(i: usize) -> String {
    format!("127.64.{}.{}", i / 250, i % 250 + 1)
}

fn endpoints(i: usize) -> Vec<Endpoint> {
    (0..PER_SERVICE)
        .map(|j| Endpoint {
            addresses: vec![format!("10.{}.{}.{}", i >> 8, i & 255, j + 1)],
            ports: vec![EndpointPort { port: 8080, ..Default::default() }],
            workload: format!("s{i}-{j}"),
            conditions: EndpointConditions { ready: true, serving: true, terminating: false },
            ..Default::default()
        })
        .collect()
}

/// Service `i` is proxied when even, headless when odd.
fn headless(i: usize) -> bool {
    i % 2 == 1
}

async fn setup(services: usize) -> Fixture {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc_api: Api<Service> = Api::namespaced(store.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(store.clone(), NS);
    let load = Instant::now();
    let mut current = Vec::with_capacity(services);
    for i in 0..services {
        let spec = Service { ports: vec![ServicePort::tcp(8080)], headless: headless(i), ..Default::default() };
        let mut svc =
            svc_api.create(&Object::new(ObjectMeta::namespaced(NS, format!("s{i}")), spec)).await.expect("service");
        if !headless(i) {
            svc.status.cluster_address = Some(cluster_address(i / 2));
            svc_api.replace_status(&svc).await.expect("status");
        }
        let meta = ObjectMeta::namespaced(NS, format!("s{i}-a")).with_label(SERVICE_NAME_LABEL, format!("s{i}"));
        let slice = EndpointSlice { service: format!("s{i}"), endpoints: endpoints(i) };
        current.push(slices.create(&Object::new(meta, slice)).await.expect("slice"));
    }
    println!(
        "service_updates: {services} services, {} endpoints written in {:.1?}",
        services * PER_SERVICE,
        load.elapsed()
    );

    let start = Instant::now();
    let resolver = Resolver::from_store(store);
    resolver.ready().await;
    println!("service_updates: resolver ready in {:.1?}", start.elapsed());
    let proxy = NodeProxy::new(ProxyConfig::default(), resolver.clone());
    let mut status = proxy.status();
    tokio::spawn(proxy.run(std::future::pending()));
    while status.applied() == 0 {
        status.changed().await;
    }
    let failed = status.failed();
    println!(
        "service_updates: proxy listening on {} ports in {:.1?}{}",
        status.listening().len(),
        start.elapsed(),
        if failed.is_empty() { String::new() } else { format!(" ({} could not be bound)", failed.len()) }
    );
    let dns = DnsServer::bind(DnsConfig::new("127.0.0.1:0".parse().expect("addr")), resolver).await.expect("dns");
    let dns_addr = dns.local_addr();
    tokio::spawn(dns.run(std::future::pending()));
    let dns_client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    dns_client.connect(dns_addr).await.expect("connect");
    Fixture { slices, current, proxy: status, dns: dns_addr, dns_client, query_id: 0 }
}

/// An A query for `name`, by hand (header, question).
fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

impl Fixture {
    /// How many A records DNS answers for service `i` now.
    async fn dns_answers(&mut self, i: usize) -> u16 {
        self.query_id = self.query_id.wrapping_add(1);
        let q = a_query(self.query_id, &format!("s{i}.{NS}.svc.cluster.local"));
        self.dns_client.send(&q).await.expect("send");
        let mut buf = [0u8; 2048];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(1), self.dns_client.recv(&mut buf))
                .await
                .expect("DNS answers within a second")
                .expect("recv");
            if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == self.query_id {
                return u16::from_be_bytes([buf[6], buf[7]]);
            }
        }
    }

    /// Flips one endpoint of service `i` and times until the proxy or DNS serves the change.
    async fn change(&mut self, i: usize, round: usize) -> Duration {
        let mut slice = self.current[i].clone();
        let j = round % PER_SERVICE;
        slice.spec.endpoints[j].conditions.ready = !slice.spec.endpoints[j].conditions.ready;
        let ready: Vec<SocketAddr> = slice
            .spec
            .endpoints
            .iter()
            .filter(|e| e.conditions.ready)
            .map(|e| SocketAddr::new(e.addresses[0].parse().expect("ip"), 8080))
            .collect();
        let start = Instant::now();
        self.current[i] = self.slices.replace(&slice).await.expect("replace");
        if headless(i) {
            while usize::from(self.dns_answers(i).await) != ready.len() {}
        } else {
            let front = Frontend {
                addr: SocketAddr::new(cluster_address(i / 2).parse().expect("ip"), 8080),
                protocol: Protocol::TCP,
            };
            let mut status = self.proxy.clone();
            while status.endpoints(front).unwrap_or_default() != ready {
                status.changed().await;
            }
        }
        start.elapsed()
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (services, changes) = if quick() { (200, 20) } else { (10_000, 400) };
    let mut fx = rt.block_on(setup(services));
    let _ = fx.dns;
    let mut proxied = Vec::new();
    let mut by_dns = Vec::new();
    let mut round = 0usize;
    let mut g = c.benchmark_group("service_updates");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.bench_function("endpoint change to proxy or DNS serving it", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                let i = fastrand::usize(..services);
                let t = rt.block_on(fx.change(i, round));
                if headless(i) {
                    by_dns.push(t)
                } else {
                    proxied.push(t)
                }
                took += t;
            }
            took
        })
    });
    g.finish();
    // The figures: a fixed number of changes beyond what criterion asked for.
    while proxied.len() + by_dns.len() < changes {
        round += 1;
        let i = fastrand::usize(..services);
        let t = rt.block_on(fx.change(i, round));
        if headless(i) { by_dns.push(t) } else { proxied.push(t) }
    }
    let mut all: Vec<Duration> = proxied.iter().chain(&by_dns).copied().collect();
    all.sort();
    proxied.sort();
    by_dns.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!(
        "| endpoint change to serving, {services} services, {} endpoints | changes | p50 ms | p99 ms | max ms |",
        services * PER_SERVICE
    );
    println!("|---|---|---|---|---|");
    for (what, v) in [("node proxy", &proxied), ("DNS (headless)", &by_dns), ("all (target p99 <= 10 ms)", &all)] {
        if v.is_empty() {
            continue;
        }
        println!(
            "| {what} | {} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(v[v.len() - 1])
        );
    }
    c.final_summary();
}
