//! Durable store figures: writes of 1 KiB objects with 1, 16 and 64 concurrent writers, watch
//! throughput, and the time to reopen the embedded store holding 100,000 objects (its file in
//! the page cache, its file's pages dropped first, and after a crash).
//!
//! `cargo bench -p orch-benches --bench store_durable` (`-- --test` for a quick smoke run)
//!
//! Criterion times every measurement (10 runs each, a fresh store for every run); at the end a
//! table puts the backends side by side, with the median of each measurement's runs.
//!
//! Every measurement is a function of an `Arc<dyn Store>`, and the table has one column per
//! backend in [`backends`]: the embedded store and, when an `etcd` binary is installed, etcd
//! (single member, started by the bench, data on the same disk), measured in the same run on the
//! same machine, with the ratio between them. Targets (issue #6): >= 20,000 durable writes/s
//! with 64 writers on the embedded store, at least 5x etcd; reopening 100,000 objects in <= 1 s.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use futures::StreamExt;
use orch_benches::{KIND, object};
use orch_core::{Selection, Store, WatchEvent, WatchRequest, WriteOptions};
use orch_store::RedbStore;

const SIZE: usize = 1024;

/// Sizes of one run: the full one, or a quick one for `--test`.
struct Sizes {
    writes: usize,
    watch_events: usize,
    reopen_objects: usize,
}

/// Makes a fresh, empty store for the named case.
type Fresh = Box<dyn Fn(&str) -> Arc<dyn Store>>;

/// A backend under measurement: a name for the column, and a way to get a fresh, empty store.
struct Backend {
    name: &'static str,
    fresh: Fresh,
}

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("orch-bench-durable-{}", std::process::id()))
}

fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend {
        name: "embedded (redb)",
        fresh: Box::new(|case| {
            let path = scratch().join(format!("{case}.redb"));
            let _ = std::fs::remove_file(&path);
            Arc::new(RedbStore::open(&path).expect("open the store"))
        }),
    }];
    #[cfg(feature = "etcd")]
    backends.extend(etcd_backend());
    backends
}

/// etcd, single member, data in the temp directory (the same disk as the embedded store's
/// file): a fresh etcd for every measurement, so none inherits another's history.
#[cfg(feature = "etcd")]
fn etcd_backend() -> Option<Backend> {
    use orch_store::EtcdStore;
    use orch_store::etcd::LocalEtcd;
    if !LocalEtcd::available() {
        eprintln!("etcd is not installed (apt-get install etcd-server): the etcd column is skipped");
        return None;
    }
    let current: std::sync::Mutex<Option<LocalEtcd>> = std::sync::Mutex::new(None);
    Some(Backend {
        name: "etcd",
        fresh: Box::new(move |case| {
            let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
            // Stop the previous measurement's etcd before starting this one's.
            *current = None;
            let etcd = LocalEtcd::start().expect("start etcd");
            let store = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    etcd.wait_ready(Duration::from_secs(30)).await.expect("etcd ready");
                    EtcdStore::connect(etcd.endpoints(), format!("bench/{case}")).await.expect("connect to etcd")
                })
            });
            *current = Some(etcd);
            Arc::new(store)
        }),
    })
}

/// The time `total` durable creates of 1 KiB objects take with `writers` concurrent writers.
/// Each write is acknowledged only once durable.
async fn durable_writes(store: Arc<dyn Store>, writers: usize, total: usize) -> Duration {
    let next = Arc::new(AtomicUsize::new(0));
    // One object per writer first, so the timed part measures steady state, not warm-up.
    let objects: Vec<_> = (0..total + writers).map(|i| object(i, SIZE)).collect();
    let objects = Arc::new(objects);
    for i in 0..writers {
        store.create(objects[total + i].clone(), &WriteOptions::default()).await.expect("create");
    }
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (store, next, objects) = (store.clone(), next.clone(), objects.clone());
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

/// Watch throughput: how long one watcher takes to receive `events` creates following 64
/// writers live, and to replay them from the history afterwards: (replay, live).
async fn watch_throughput(store: Arc<dyn Store>, events: usize) -> (Duration, Duration) {
    let from = store.current_revision().await.expect("revision") + 1;
    let live = store.watch(&WatchRequest::from(Selection::kind(KIND), from)).await.expect("watch");
    let start = Instant::now();
    let writing = tokio::spawn(durable_writes(store.clone(), 64, events));
    count(live, events).await;
    let live_took = start.elapsed();
    writing.await.expect("writers");
    // The last `events` revisions (the writers' warm-up creates came first).
    let end = store.current_revision().await.expect("revision");
    let replay = store.watch(&WatchRequest::from(Selection::kind(KIND), end + 1 - events as u64)).await.expect("watch");
    let start = Instant::now();
    count(replay, events).await;
    (start.elapsed(), live_took)
}

async fn count(mut stream: orch_core::WatchStream, events: usize) -> usize {
    let mut n = 0;
    while n < events {
        match stream.next().await {
            Some(Ok(WatchEvent::Progress(_))) => {}
            Some(Ok(_)) => n += 1,
            other => panic!("watch ended: {other:?}"),
        }
    }
    n
}

/// An embedded store file holding `objects` objects of 1 KiB (plus the writers' first 64),
/// closed cleanly.
async fn fill(dir: &Path, objects: usize) -> PathBuf {
    let path = dir.join("reopen.redb");
    let _ = std::fs::remove_file(&path);
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&path).expect("open"));
    durable_writes(store, 64, objects).await;
    path
}

/// The time to open the store file at `path`, holding `objects` (+ 64) objects.
fn reopen(path: &Path, objects: usize) -> Duration {
    let start = Instant::now();
    let store = RedbStore::open(path).expect("reopen");
    let took = start.elapsed();
    assert_eq!(store.len(), objects + 64);
    took
}

/// Drops the file's pages from the kernel's page cache (`dd iflag=nocache count=0` asks for
/// exactly that, for the whole file), so the next open reads it from the disk.
fn drop_page_cache(path: &Path) {
    let status = std::process::Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()
        .expect("run dd");
    assert!(status.success(), "dd could not drop the page cache of {}", path.display());
}

/// The argument that makes this program the writer that "crashes" for [`reopen_after_crash`].
const CRASH_WRITER: &str = "--crash-writer";

/// Writes `objects` objects with 64 writers, then exits without closing the store, as a crash
/// would leave it (every write acknowledged and durable, the file not closed cleanly).
fn crash_writer(path: &str, objects: usize) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = Arc::new(RedbStore::open(path).expect("open"));
        durable_writes(store.clone(), 64, objects).await;
        std::mem::forget(store);
    });
    std::process::exit(3)
}

/// Seconds to reopen the embedded store holding `objects` objects after a crash: redb first
/// recovers the file, then the store loads it.
fn reopen_after_crash(dir: &Path, objects: usize) -> Duration {
    let path = dir.join("crashed.redb");
    let _ = std::fs::remove_file(&path);
    let status = std::process::Command::new(std::env::current_exe().expect("this program"))
        .args([CRASH_WRITER, &path.display().to_string(), &objects.to_string()])
        .status()
        .expect("run the writer");
    assert_eq!(status.code(), Some(3), "the writer ends without closing the store");
    reopen(&path, objects)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Each measurement's per-run figures, for the side-by-side table printed at the end: (row,
/// backend) → values.
static FIGURES: Mutex<Vec<(String, &'static str, Vec<f64>)>> = Mutex::new(Vec::new());

fn record(row: &str, backend: &'static str, value: f64) {
    let mut figures = FIGURES.lock().unwrap_or_else(|e| e.into_inner());
    match figures.iter_mut().find(|(r, b, _)| r == row && *b == backend) {
        Some((_, _, values)) => values.push(value),
        None => figures.push((row.to_string(), backend, vec![value])),
    }
}

fn sizes() -> Sizes {
    if std::env::args().any(|a| a == "--test") {
        Sizes { writes: 2_000, watch_events: 2_000, reopen_objects: 2_000 }
    } else {
        Sizes { writes: 100_000, watch_events: 20_000, reopen_objects: 100_000 }
    }
}

/// Durable writes at 1, 16 and 64 writers, then watch throughput, for every backend; a fresh
/// store (and, for etcd, a fresh etcd) for every run.
fn bench_writes(c: &mut Criterion, rt: &tokio::runtime::Runtime, backends: &[Backend]) {
    let sizes = sizes();
    let mut g = c.benchmark_group("store_durable");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    for writers in [1usize, 16, 64] {
        // One writer waits for every commit: fewer writes keep the run short.
        let total = if writers == 1 { sizes.writes / 10 } else { sizes.writes };
        g.throughput(Throughput::Elements(total as u64));
        let row = format!("durable writes/s, 1 KiB, {writers} writers");
        for b in backends {
            g.bench_function(format!("writes/{writers} writers/{}", b.name), |bench| {
                bench.iter_custom(|iters| {
                    let mut took = Duration::ZERO;
                    for round in 0..iters {
                        let t = rt.block_on(async {
                            let store = (b.fresh)(&format!("writes-{writers}-{round}"));
                            durable_writes(store, writers, total).await
                        });
                        record(&row, b.name, total as f64 / t.as_secs_f64());
                        took += t;
                        // The next run starts without this one's dirty pages to write back.
                        let _ = std::fs::remove_dir_all(scratch());
                        std::fs::create_dir_all(scratch()).expect("scratch directory");
                    }
                    took
                })
            });
        }
    }
    g.throughput(Throughput::Elements(sizes.watch_events as u64));
    for b in backends {
        g.bench_function(format!("watch/{}", b.name), |bench| {
            bench.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let (replay, live) =
                        rt.block_on(async { watch_throughput((b.fresh)("watch"), sizes.watch_events).await });
                    record(
                        "watch events/s, replaying history",
                        b.name,
                        sizes.watch_events as f64 / replay.as_secs_f64(),
                    );
                    record(
                        "watch events/s, live behind 64 writers",
                        b.name,
                        sizes.watch_events as f64 / live.as_secs_f64(),
                    );
                    took += replay;
                }
                took
            })
        });
    }
    g.finish();
}

/// Reopening the embedded store: cleanly closed with its file in the page cache (as right after
/// it was written), the same with the file's pages dropped first (as after a reboot), and after a
/// crash.
fn bench_reopen(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let sizes = sizes();
    let dir = scratch();
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let mut g = c.benchmark_group("store_durable");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(sizes.reopen_objects as u64));
    let clean = format!("reopen with {} objects", sizes.reopen_objects + 64);
    let path = rt.block_on(fill(&dir, sizes.reopen_objects));
    g.bench_function("reopen/embedded (redb)", |bench| {
        bench.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let t = reopen(&path, sizes.reopen_objects);
                record(&clean, "embedded (redb)", t.as_secs_f64());
                took += t;
            }
            took
        })
    });
    let cold =
        format!("reopen with {} objects, the file's pages dropped from the page cache", sizes.reopen_objects + 64);
    g.bench_function("reopen cold/embedded (redb)", |bench| {
        bench.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                drop_page_cache(&path);
                let t = reopen(&path, sizes.reopen_objects);
                record(&cold, "embedded (redb)", t.as_secs_f64());
                took += t;
            }
            took
        })
    });
    let crashed =
        format!("reopen with {} objects after a crash (redb recovers the file first)", sizes.reopen_objects + 64);
    g.bench_function("reopen after a crash/embedded (redb)", |bench| {
        bench.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let t = reopen_after_crash(&dir, sizes.reopen_objects);
                record(&crashed, "embedded (redb)", t.as_secs_f64());
                took += t;
            }
            took
        })
    });
    g.finish();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == CRASH_WRITER) {
        crash_writer(&args[i + 1], args[i + 2].parse().expect("object count"));
    }
    let mut c = Criterion::default().configure_from_args();
    if args.iter().any(|a| a == "--list") {
        // Nothing to start (no etcd) just to list.
        return;
    }
    std::fs::create_dir_all(scratch()).expect("scratch directory");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let backends = rt.block_on(async { backends() });
    bench_writes(&mut c, &rt, &backends);
    bench_reopen(&mut c, &rt);
    c.final_summary();
    drop(backends);
    let _ = std::fs::remove_dir_all(scratch());

    // The side-by-side table: medians over every run, and the ratio when etcd was measured.
    let figures = FIGURES.lock().unwrap_or_else(|e| e.into_inner());
    if figures.is_empty() {
        return;
    }
    let names: Vec<&str> = {
        let mut n: Vec<&str> = Vec::new();
        for (_, b, _) in figures.iter() {
            if !n.contains(b) {
                n.push(b);
            }
        }
        n
    };
    let ratio = names.len() == 2;
    let mut header = names.clone();
    if ratio {
        header.push("embedded / etcd");
    }
    println!("\n| measurement (median of the runs) | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(header.len()));
    let mut rows: Vec<&str> = Vec::new();
    for (r, _, _) in figures.iter() {
        if !rows.contains(&r.as_str()) {
            rows.push(r);
        }
    }
    for row in rows {
        let value = |name: &str| {
            figures.iter().find(|(r, b, _)| r == row && *b == name).map(|(_, _, v)| (median(v.clone()), v.len()))
        };
        let seconds = row.starts_with("reopen");
        let mut cells: Vec<String> = names
            .iter()
            .map(|n| match value(n) {
                Some((v, runs)) if seconds => format!("{v:.2} s ({runs} runs)"),
                Some((v, runs)) => format!("{v:.0} ({runs} runs)"),
                None => "-".into(),
            })
            .collect();
        if ratio {
            cells.push(match (value(names[0]), value(names[1])) {
                (Some((a, _)), Some((b, _))) if b > 0.0 && !seconds => format!("{:.1}x", a / b),
                _ => "-".into(),
            });
        }
        println!("| {row} | {} |", cells.join(" | "));
    }
}
