//! The API server's figures: durable writes per second through the API at 64 clients beside the
//! same store used directly, in the same run; and write-to-delivery latency at many watches held
//! by one server.
//!
//! `cargo bench -p orch-benches --bench api` (`-- --test` for a quick smoke run)
//!
//! Both run the server and its clients in this one process, on this machine's two cores: the
//! clients' work (encoding requests, decoding every watch event) competes with the server's.
//!
//! - Writes: 64 writers, each its own `RemoteStore` (its own HTTP/2 connection), create 1 KiB
//!   objects in the embedded store (redb) behind an `ApiServer` on loopback; beside them, 64
//!   writers create the same objects in a fresh embedded store directly. Each write counts when
//!   the server (or the store) acknowledged it durable. Target (issue #20): >= 50% of direct.
//! - Watch latency: W watches (10,000; 100 with `--test`) on the memory store's server, spread
//!   over connections of 100 streams each; then 50 writes, one every 20 ms; for each write, the
//!   time from just before the call to the moment each watcher's stream yields the event. p50,
//!   p99 and max over all W x 50 deliveries. Target: p99 <= 10 ms.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use futures::StreamExt;
use orch_benches::{KIND, object};
use orch_core::{Selection, Store, WatchEvent, WatchRequest, WriteOptions};
use orch_store::api::{ApiServer, RemoteStore};
use orch_store::{MemoryStore, RedbStore};

const SIZE: usize = 1024;
const CLIENTS: usize = 64;

fn quick() -> bool {
    std::env::args().any(|a| a == "--test")
}

fn scratch() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("orch-bench-api-{}", std::process::id()))
}

fn fresh_redb(case: &str) -> Arc<dyn Store> {
    std::fs::create_dir_all(scratch()).expect("scratch directory");
    let path = scratch().join(format!("{case}.redb"));
    let _ = std::fs::remove_file(&path);
    Arc::new(RedbStore::open(&path).expect("open the store"))
}

/// The time `total` creates take with one writer per store in `stores`.
async fn writes(stores: Vec<Arc<dyn Store>>, total: usize) -> Duration {
    let next = Arc::new(AtomicUsize::new(0));
    let objects = Arc::new((0..total + stores.len()).map(|i| object(i, SIZE)).collect::<Vec<_>>());
    for (i, s) in stores.iter().enumerate() {
        s.create(objects[total + i].clone(), &WriteOptions::default()).await.expect("warm-up create");
    }
    let start = Instant::now();
    let tasks: Vec<_> = stores
        .into_iter()
        .map(|store| {
            let (next, objects) = (next.clone(), objects.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    store.create(objects[i].clone(), &WriteOptions::default()).await.expect("create");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
    start.elapsed()
}

/// (direct, through the API) writes per second, each on a fresh embedded store.
async fn writes_pair(total: usize, round: u64) -> (f64, f64) {
    let direct = fresh_redb(&format!("direct-{round}"));
    let t = writes(vec![direct; CLIENTS], total).await;
    let direct_rate = total as f64 / t.as_secs_f64();
    let served = fresh_redb(&format!("served-{round}"));
    let server = ApiServer::new(served).spawn("127.0.0.1:0".parse().unwrap()).await.expect("bind");
    let clients: Vec<Arc<dyn Store>> =
        (0..CLIENTS).map(|_| Arc::new(RemoteStore::new(server.url()).expect("client")) as Arc<dyn Store>).collect();
    let t = writes(clients, total).await;
    server.shutdown().await.expect("stop");
    let _ = std::fs::remove_dir_all(scratch());
    (direct_rate, total as f64 / t.as_secs_f64())
}

/// Write-to-delivery latencies (ms) at `watches` watches.
async fn watch_latency(watches: usize, writes: usize) -> Vec<f64> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = ApiServer::new(store.clone()).spawn("127.0.0.1:0".parse().unwrap()).await.expect("bind");
    let per_connection = 100;
    let clients: Vec<RemoteStore> =
        (0..watches.div_ceil(per_connection)).map(|_| RemoteStore::new(server.url()).expect("client")).collect();
    let writer = RemoteStore::new(server.url()).expect("client");
    let from = writer.current_revision().await.expect("revision") + 1;
    let sel = Selection::kind(KIND);
    let started: Arc<Vec<std::sync::OnceLock<Instant>>> = Arc::new((0..writes).map(|_| Default::default()).collect());
    let mut tasks = Vec::with_capacity(watches);
    for i in 0..watches {
        let mut w = clients[i / per_connection].watch(&WatchRequest::from(sel.clone(), from)).await.expect("watch");
        let started = started.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(writes);
            while lat.len() < writes {
                match w.next().await {
                    Some(Ok(WatchEvent::Progress(_))) => {}
                    Some(Ok(_)) => {
                        let at = Instant::now();
                        let sent = started[lat.len()].get().copied().expect("the write started before its event");
                        lat.push((at - sent).as_secs_f64() * 1e3);
                    }
                    other => panic!("watch ended: {other:?}"),
                }
            }
            lat
        }));
    }
    for i in 0..writes {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = started[i].set(Instant::now());
        writer.create(object(i, 256), &WriteOptions::default()).await.expect("create");
    }
    let mut all = Vec::with_capacity(watches * writes);
    for t in tasks {
        all.extend(t.await.expect("watcher"));
    }
    server.shutdown().await.expect("stop");
    all.sort_by(f64::total_cmp);
    all
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let total = if quick() { 2_000 } else { 50_000 };
    let mut pairs = Vec::new();
    let mut g = c.benchmark_group("api");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(total as u64));
    g.bench_function("durable writes, 64 clients, through the API", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for round in 0..iters {
                let (direct, api) = rt.block_on(writes_pair(total, round));
                pairs.push((direct, api));
                took += Duration::from_secs_f64(total as f64 / api);
            }
            took
        })
    });
    g.finish();
    let watches = if quick() { 100 } else { 10_000 };
    let lat = rt.block_on(watch_latency(watches, 50));
    let direct: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let api: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, a) = (med(direct), med(api));
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| durable writes/s, 1 KiB, 64 writers, embedded store directly | {d:.0} |");
    println!(
        "| durable writes/s, 1 KiB, 64 clients through the API | {a:.0} ({:.0}% of direct; target >= 50%) |",
        a / d * 100.0
    );
    println!(
        "| write to delivery at {watches} watches, ms: p50 / p99 / max | {:.2} / {:.2} / {:.2} (target p99 <= 10) |",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat[lat.len() - 1]
    );
    c.final_summary();
}
