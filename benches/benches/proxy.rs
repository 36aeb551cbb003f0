//! The node proxy beside a direct connection, in the same run, on loopback: bulk throughput,
//! small requests per second, and the latency a small request gains through the proxy.
//!
//! `cargo bench -p orch-benches --bench proxy` (`-- --test` for a quick smoke run)
//!
//! Everything runs in this one process, in two setups measured one after the other, each with
//! its direct figures beside its proxied ones:
//! - shared: the echo server, the proxy and the clients on one 2-worker tokio runtime, so the
//!   proxy's copies compete with the clients and the server for this machine's two cores (a busy
//!   node);
//! - own core: the proxy alone on a current-thread runtime in its own thread, the server and the
//!   clients on a current-thread runtime in the main thread (a node with a core to spare).
//!
//! - Bulk: one connection sends 256 MiB (8 MiB with `--test`) in 64 KiB writes to a server that
//!   reads to the end and answers one byte; MiB/s from the first write to that byte, median of 5
//!   (criterion also times it in the shared setup).
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

/// A proxy serving one service at `127.64.250.<n>:8080` with the server as its only endpoint.
async fn proxy(to: SocketAddr, n: u8) -> SocketAddr {
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
    svc.status.cluster_address = Some(format!("127.64.250.{n}"));
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
    let front = Frontend { addr: SocketAddr::from(([127, 64, 250, n], 8080)), protocol: Default::default() };
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

/// The time of one bulk upload of `bytes`.
async fn timed_bulk(addr: SocketAddr, bytes: usize) -> Duration {
    let start = Instant::now();
    bulk(addr, bytes).await;
    start.elapsed()
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

/// The figures of one setup: (bulk MiB/s, small requests/s, round trips, connect + round trips),
/// direct then proxied.
type Figures = ((f64, f64), (f64, f64), (Vec<Duration>, Vec<Duration>), (Vec<Duration>, Vec<Duration>));

fn measure(rt: &tokio::runtime::Runtime, direct: SocketAddr, proxied: SocketAddr) -> Figures {
    let bytes = if quick() { 8 << 20 } else { 256 << 20 };
    let runs = if quick() { 1 } else { 5 };
    let each = if quick() { 200 } else { 5_000 };
    let (n, nc) = if quick() { (500, 100) } else { (20_000, 2_000) };
    rt.block_on(async {
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (mut bd, mut bp) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            bd.push(bulk(direct, bytes).await);
            bp.push(bulk(proxied, bytes).await);
        }
        let small = (small_requests(direct, each).await, small_requests(proxied, each).await);
        let lat = (latencies(direct, n).await, latencies(proxied, n).await);
        let con = (connect_latencies(direct, nc).await, connect_latencies(proxied, nc).await);
        ((med(bd), med(bp)), small, lat, con)
    })
}

fn print(setup: &str, f: &Figures) {
    let ((bd, bp), (sd, sp), (ld, lp), (cd, cp)) = f;
    println!("| {setup} | bulk upload, MiB/s (median) | {bd:.0} | {bp:.0} | {:.0}% (target >= 80%) |", bp / bd * 100.0);
    println!(
        "| {setup} | 64-byte requests/s, {CONNECTIONS} connections | {sd:.0} | {sp:.0} | {:.0}% (target >= 80%) |",
        sp / sd * 100.0
    );
    println!(
        "| {setup} | 64-byte round trip on an open connection, µs: p50 / p99 | {:.0} / {:.0} | {:.0} / {:.0} | {:+.0} µs p99 (target <= +100) |",
        us(pct(ld, 0.5)),
        us(pct(ld, 0.99)),
        us(pct(lp, 0.5)),
        us(pct(lp, 0.99)),
        us(pct(lp, 0.99)) - us(pct(ld, 0.99)),
    );
    println!(
        "| {setup} | connect + 64-byte round trip + close, µs: p50 / p99 | {:.0} / {:.0} | {:.0} / {:.0} | {:+.0} µs p99 |",
        us(pct(cd, 0.5)),
        us(pct(cd, 0.99)),
        us(pct(cp, 0.5)),
        us(pct(cp, 0.99)),
        us(pct(cp, 0.99)) - us(pct(cd, 0.99)),
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    // Setup 1: server, clients and proxy share one 2-worker runtime (both cores).
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (direct, proxied) = rt.block_on(async {
        let direct = server().await;
        (direct, proxy(direct, 1).await)
    });
    let bytes = if quick() { 8 << 20 } else { 256 << 20 };
    let mut g = c.benchmark_group("proxy");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("bulk upload, direct", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rt.block_on(timed_bulk(direct, bytes))).sum())
    });
    g.bench_function("bulk upload, proxied", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rt.block_on(timed_bulk(proxied, bytes))).sum())
    });
    g.finish();
    let shared = measure(&rt, direct, proxied);

    // Setup 2: the proxy on a core of its own (its own thread and current-thread runtime, as a
    // node proxy on a node with cores to spare); server and clients on the other.
    let rt1 = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let direct1 = rt1.block_on(server());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let own = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        own.block_on(async move {
            tx.send(proxy(direct1, 2).await).expect("send");
            std::future::pending::<()>().await
        })
    });
    let proxied1 = rx.recv().expect("proxy address");
    let own = measure(&rt1, direct1, proxied1);

    println!();
    println!("| setup | figure | direct | through the proxy | proxy vs direct |");
    println!("|---|---|---|---|---|");
    print("proxy, server and clients share 2 cores", &shared);
    print("proxy on its own core", &own);
    c.final_summary();
}
