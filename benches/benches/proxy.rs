//! The node proxy beside a direct connection, in the same run, on loopback: bulk throughput,
//! small requests per second, and the latency a small request gains through the proxy.
//!
//! `cargo bench -p orch-benches --bench proxy` (`-- --test` for a quick smoke run)
//!
//! Everything runs in this one process on a 2-worker tokio runtime: the echo server, the proxy
//! and the clients share this machine's two cores, so the proxy's copies compete with the
//! client and the server for CPU (as they would on a busy node).
//!
//! - Bulk: one connection sends 256 MiB (8 MiB with `--test`) in 64 KiB writes to a server that
//!   reads to the end and answers one byte; MiB/s from the first write to that byte.
//! - Small requests: 16 connections each do round trips of a 64-byte request and a 64-byte
//!   answer; requests per second over all of them.
//! - Latency: one connection, 64-byte round trips one at a time (20,000; 500 with `--test`);
//!   p50 and p99, and a new connection per request (2,000; 100 with `--test`).
//!
//! Targets (issue #21): proxied throughput >= 80% of direct; <= 100 µs added p99 for small
//! requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use orch_core::kinds::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice, SERVICE_NAME_LABEL, Service, ServicePort,
};
use orch_core::{Api, Object, ObjectMeta, Store};
use orch_runtime::net::{Frontend, NodeProxy, ProxyConfig, Resolver};
use orch_store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REQUEST: usize = 64;
const CHUNK: usize = 64 * 1024;
const CONNECTIONS: usize = 16;

fn quick() -> bool {
    std::env::args().any(|a| a == "--test")
}

/// Echoes fixed-size requests; a request starting with `B` is a bulk upload: read to the end,
/// answer one byte.
async fn server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    if s.read_exact(&mut buf[..REQUEST]).await.is_err() {
                        return;
                    }
                    if buf[0] == b'B' {
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                        let _ = s.write_all(b"k").await;
                        return;
                    }
                    if s.write_all(&buf[..REQUEST]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A proxy serving one service at `127.64.250.1:8080` with the server as its only endpoint.
async fn proxy(to: SocketAddr) -> SocketAddr {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let services: Api<Service> = Api::namespaced(store.clone(), "bench");
    let slices: Api<EndpointSlice> = Api::namespaced(store.clone(), "bench");
    let mut svc = services
        .create(&Object::new(
            ObjectMeta::namespaced("bench", "echo"),
            Service { ports: vec![ServicePort::tcp(8080)], ..Default::default() },
        ))
        .await
        .expect("service");
    svc.status.cluster_address = Some("127.64.250.1".into());
    services.replace_status(&svc).await.expect("status");
    let endpoint = Endpoint {
        addresses: vec![to.ip().to_string()],
        ports: vec![EndpointPort { port: u32::from(to.port()), ..Default::default() }],
        conditions: EndpointConditions { ready: true, serving: true, terminating: false },
        ..Default::default()
    };
    slices
        .create(&Object::new(
            ObjectMeta::namespaced("bench", "echo-1").with_label(SERVICE_NAME_LABEL, "echo"),
            EndpointSlice { service: "echo".into(), endpoints: vec![endpoint] },
        ))
        .await
        .expect("slice");
    let resolver = Resolver::from_store(store);
    let proxy = NodeProxy::new(ProxyConfig::default(), resolver);
    let mut status = proxy.status();
    tokio::spawn(proxy.run(std::future::pending()));
    let front = Frontend { addr: "127.64.250.1:8080".parse().expect("addr"), protocol: Default::default() };
    while status.endpoints(front).unwrap_or_default().is_empty() {
        status.changed().await;
    }
    front.addr
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// MiB/s of one bulk upload of `bytes`.
async fn bulk(addr: SocketAddr, bytes: usize) -> f64 {
    let mut s = connect(addr).await;
    let chunk = vec![b'B'; CHUNK];
    let start = Instant::now();
    s.write_all(&chunk[..REQUEST]).await.expect("header");
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).await.expect("write");
        sent += CHUNK;
    }
    s.shutdown().await.expect("shutdown");
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.expect("ack");
    sent as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64()
}

async fn round_trip(s: &mut TcpStream, buf: &mut [u8; REQUEST]) {
    s.write_all(&buf[..]).await.expect("request");
    s.read_exact(&mut buf[..]).await.expect("answer");
}

/// Requests per second of `CONNECTIONS` connections doing `each` round trips.
async fn small_requests(addr: SocketAddr, each: usize) -> f64 {
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(connect(addr).await);
    }
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [b'r'; REQUEST];
                for _ in 0..each {
                    round_trip(&mut s, &mut buf).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    (CONNECTIONS * each) as f64 / start.elapsed().as_secs_f64()
}

/// Round trips one at a time on one connection, each timed.
async fn latencies(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let mut s = connect(addr).await;
    let mut buf = [b'r'; REQUEST];
    for _ in 0..100 {
        round_trip(&mut s, &mut buf).await;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        round_trip(&mut s, &mut buf).await;
        out.push(start.elapsed());
    }
    out.sort();
    out
}

/// Connect, one round trip, close: each timed.
async fn connect_latencies(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut s = connect(addr).await;
        let mut buf = [b'r'; REQUEST];
        round_trip(&mut s, &mut buf).await;
        out.push(start.elapsed());
    }
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (direct, proxied) = rt.block_on(async {
        let direct = server().await;
        (direct, proxy(direct).await)
    });
    let bytes = if quick() { 8 << 20 } else { 256 << 20 };
    let mut bulk_pairs = Vec::new();
    let mut g = c.benchmark_group("proxy");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("bulk upload, proxied (direct measured beside it)", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let (d, p) = rt.block_on(async { (bulk(direct, bytes).await, bulk(proxied, bytes).await) });
                bulk_pairs.push((d, p));
                took += Duration::from_secs_f64(bytes as f64 / (1024.0 * 1024.0) / p);
            }
            took
        })
    });
    g.finish();

    let each = if quick() { 200 } else { 5_000 };
    let (n, nc) = if quick() { (500, 100) } else { (20_000, 2_000) };
    let (small_d, small_p, lat_d, lat_p, con_d, con_p) = rt.block_on(async {
        let small_d = small_requests(direct, each).await;
        let small_p = small_requests(proxied, each).await;
        let lat_d = latencies(direct, n).await;
        let lat_p = latencies(proxied, n).await;
        let con_d = connect_latencies(direct, nc).await;
        let con_p = connect_latencies(proxied, nc).await;
        (small_d, small_p, lat_d, lat_p, con_d, con_p)
    });
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (bd, bp) = (med(bulk_pairs.iter().map(|p| p.0).collect()), med(bulk_pairs.iter().map(|p| p.1).collect()));
    println!();
    println!("| figure | direct | through the proxy | proxy vs direct |");
    println!("|---|---|---|---|");
    println!("| bulk upload, MiB/s (median) | {bd:.0} | {bp:.0} | {:.0}% (target >= 80%) |", bp / bd * 100.0);
    println!(
        "| 64-byte requests/s, {CONNECTIONS} connections | {small_d:.0} | {small_p:.0} | {:.0}% (target >= 80%) |",
        small_p / small_d * 100.0
    );
    println!(
        "| 64-byte round trip on an open connection, µs: p50 / p99 | {:.0} / {:.0} | {:.0} / {:.0} | +{:.0} µs p99 (target <= 100) |",
        us(pct(&lat_d, 0.5)),
        us(pct(&lat_d, 0.99)),
        us(pct(&lat_p, 0.5)),
        us(pct(&lat_p, 0.99)),
        us(pct(&lat_p, 0.99)) - us(pct(&lat_d, 0.99)),
    );
    println!(
        "| connect + 64-byte round trip + close, µs: p50 / p99 | {:.0} / {:.0} | {:.0} / {:.0} | +{:.0} µs p99 |",
        us(pct(&con_d, 0.5)),
        us(pct(&con_d, 0.99)),
        us(pct(&con_p, 0.5)),
        us(pct(&con_p, 0.99)),
        us(pct(&con_p, 0.99)) - us(pct(&con_d, 0.99)),
    );
    c.final_summary();
}
