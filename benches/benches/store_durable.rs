//! Durable store figures: writes of 1 KiB objects with 1, 16 and 64 concurrent writers, watch
//! throughput, and the time to reopen the embedded store holding 100,000 objects.
//!
//! `cargo bench -p orch-benches --bench store_durable` (`-- --test` for a quick smoke run)
//!
//! Every measurement is a function of an `Arc<dyn Store>`, and the table has one column per
//! backend in [`backends`]: the embedded store and, when an `etcd` binary is installed, etcd
//! (single member, started by the bench, data on the same disk), measured in the same run on the
//! same machine, with the ratio between them. Targets (issue #6): >= 20,000 durable writes/s
//! with 64 writers on the embedded store, at least 5x etcd; reopening 100,000 objects in <= 1 s.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    rounds: usize,
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

/// Durable creates of 1 KiB objects per second with `writers` concurrent writers, `total`
/// writes in all. Each write is acknowledged only once durable.
async fn durable_writes(store: Arc<dyn Store>, writers: usize, total: usize) -> f64 {
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
    total as f64 / start.elapsed().as_secs_f64()
}

/// Watch throughput: events per second one watcher receives, replaying `events` creates from
/// the history, and following 64 writers live.
async fn watch_throughput(store: Arc<dyn Store>, events: usize) -> (f64, f64) {
    let from = store.current_revision().await.expect("revision") + 1;
    let live = store.watch(&WatchRequest::from(Selection::kind(KIND), from)).await.expect("watch");
    let start = Instant::now();
    let writing = tokio::spawn(durable_writes(store.clone(), 64, events));
    let live_rate = async {
        let n = count(live, events).await;
        n as f64 / start.elapsed().as_secs_f64()
    }
    .await;
    writing.await.expect("writers");
    // The last `events` revisions (the writers' warm-up creates came first).
    let end = store.current_revision().await.expect("revision");
    let replay = store.watch(&WatchRequest::from(Selection::kind(KIND), end + 1 - events as u64)).await.expect("watch");
    let start = Instant::now();
    let n = count(replay, events).await;
    (n as f64 / start.elapsed().as_secs_f64(), live_rate)
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

/// Seconds to reopen the embedded store holding `objects` objects of 1 KiB.
async fn reopen(dir: &Path, objects: usize) -> Duration {
    let path = dir.join("reopen.redb");
    let _ = std::fs::remove_file(&path);
    {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&path).expect("open"));
        durable_writes(store, 64, objects).await;
    }
    let start = Instant::now();
    let store = tokio::task::spawn_blocking(move || RedbStore::open(&path).expect("reopen")).await.expect("open");
    let took = start.elapsed();
    assert_eq!(store.len(), objects + 64);
    took
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
async fn reopen_after_crash(dir: &Path, objects: usize) -> Duration {
    let path = dir.join("crashed.redb");
    let _ = std::fs::remove_file(&path);
    let status = std::process::Command::new(std::env::current_exe().expect("this program"))
        .args([CRASH_WRITER, &path.display().to_string(), &objects.to_string()])
        .status()
        .expect("run the writer");
    assert_eq!(status.code(), Some(3), "the writer ends without closing the store");
    let start = Instant::now();
    let store = tokio::task::spawn_blocking(move || RedbStore::open(&path).expect("reopen")).await.expect("open");
    let took = start.elapsed();
    assert_eq!(store.len(), objects + 64);
    took
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == CRASH_WRITER) {
        crash_writer(&args[i + 1], args[i + 2].parse().expect("object count"));
    }
    let sizes = if args.iter().any(|a| a == "--test") {
        Sizes { writes: 2_000, watch_events: 2_000, reopen_objects: 2_000, rounds: 1 }
    } else {
        Sizes { writes: 100_000, watch_events: 100_000, reopen_objects: 100_000, rounds: 3 }
    };
    let dir = scratch();
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let backends = backends();
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    rt.block_on(async {
        for writers in [1usize, 16, 64] {
            // One writer waits for every commit: fewer writes keep the run short.
            let total = if writers == 1 { sizes.writes / 10 } else { sizes.writes };
            let mut cells = Vec::new();
            for b in &backends {
                let mut rates = Vec::new();
                for round in 0..sizes.rounds {
                    let store = (b.fresh)(&format!("writes-{writers}-{round}"));
                    rates.push(durable_writes(store, writers, total).await);
                    // The next round starts without this one's dirty pages to write back.
                    let _ = std::fs::remove_dir_all(scratch());
                    std::fs::create_dir_all(scratch()).expect("scratch directory");
                }
                eprintln!("{}: {writers} writers: {rates:.0?} writes/s", b.name);
                cells.push(format!("{:.0}", median(rates)));
            }
            rows.push((format!("durable writes/s, 1 KiB, {writers} writers"), cells));
        }
        let (mut replay, mut live) = (Vec::new(), Vec::new());
        for b in &backends {
            let (r, l) = watch_throughput((b.fresh)("watch"), sizes.watch_events).await;
            replay.push(format!("{r:.0}"));
            live.push(format!("{l:.0}"));
        }
        rows.push(("watch events/s, replaying history".into(), replay));
        rows.push(("watch events/s, live behind 64 writers".into(), live));
        let mut times = Vec::new();
        for _ in 0..sizes.rounds {
            times.push(reopen(&dir, sizes.reopen_objects).await.as_secs_f64());
            eprintln!("reopen: {times:.2?} s");
        }
        let mut cells = vec![format!("{:.2} s", median(times))];
        cells.resize(backends.len(), "-".into());
        rows.push((format!("reopen with {} objects", sizes.reopen_objects + 64), cells));
        let mut times = Vec::new();
        for _ in 0..sizes.rounds {
            times.push(reopen_after_crash(&dir, sizes.reopen_objects).await.as_secs_f64());
            eprintln!("reopen after a crash: {times:.2?} s");
        }
        let mut cells = vec![format!("{:.2} s", median(times))];
        cells.resize(backends.len(), "-".into());
        rows.push((
            format!("reopen with {} objects after a crash (redb recovers the file first)", sizes.reopen_objects + 64),
            cells,
        ));
    });
    let mut header: Vec<&str> = backends.iter().map(|b| b.name).collect();
    // With etcd measured too: how many times the embedded store's figure etcd's is.
    let ratio = header.len() == 2;
    if ratio {
        header.push("embedded / etcd");
    }
    println!("| measurement | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(header.len()));
    for (what, mut cells) in rows {
        if ratio {
            let r = match (cells[0].parse::<f64>(), cells[1].parse::<f64>()) {
                (Ok(a), Ok(b)) if b > 0.0 => format!("{:.1}x", a / b),
                _ => "-".into(),
            };
            cells.push(r);
        }
        println!("| {what} | {} |", cells.join(" | "));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
