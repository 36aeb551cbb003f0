//! Store throughput and watch fan-out (criterion).
//!
//! `cargo bench -p orch-benches --bench store`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use orch_benches::{GROUPS, Indexes, KIND, NAMESPACE, filled_memory_store, name, object};
use orch_core::{LabelSelector, ListRequest, ObjectKey, Selection, Store, WatchRequest, WriteOptions};
use orch_store::MemoryStore;
use tokio::sync::Notify;

const OBJECTS: usize = 100_000;
const SIZE: usize = 1024;

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn point_ops(c: &mut Criterion) {
    let rt = current_thread();
    let store: Arc<dyn Store> = rt.block_on(filled_memory_store(OBJECTS, SIZE));
    let keys: Vec<ObjectKey> = (0..OBJECTS).map(|i| ObjectKey::new(KIND, NAMESPACE, name(i))).collect();
    let mut g = c.benchmark_group("memory_store");
    g.throughput(Throughput::Elements(1));

    g.bench_function("get_100k", |b| {
        let mut idx = Indexes::new(7);
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(store.get(&keys[idx.next_below(OBJECTS)]).await.expect("get"));
                }
                start.elapsed()
            })
        })
    });

    g.bench_function("cas_update_100k", |b| {
        let mut idx = Indexes::new(11);
        // Each update reads the current object first (as a controller would hold it in its
        // cache) outside the timed section, then writes a changed spec with compare-and-swap.
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for n in 0..iters {
                    let i = idx.next_below(OBJECTS);
                    let mut next = (*store.get(&keys[i]).await.expect("get")).clone();
                    next.spec = orch_benches::spec_of_size(SIZE, i + n as usize);
                    let start = Instant::now();
                    black_box(store.update(next, &WriteOptions::default()).await.expect("update"));
                    total += start.elapsed();
                }
                total
            })
        })
    });

    g.bench_function("create_1kib", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let fresh = MemoryStore::new();
                let objects: Vec<_> = (0..iters as usize).map(|i| object(i, SIZE)).collect();
                let start = Instant::now();
                for o in objects {
                    black_box(fresh.create(o, &WriteOptions::default()).await.expect("create"));
                }
                start.elapsed()
            })
        })
    });

    let group_sel =
        Selection::kind(KIND).in_namespace(NAMESPACE).with_labels(LabelSelector::parse("group=g7").expect("selector"));
    g.bench_function(BenchmarkId::new("list_label_selector_100k", format!("{} matches", OBJECTS / GROUPS)), |b| {
        b.iter(|| {
            rt.block_on(async { black_box(store.list(&ListRequest::new(group_sel.clone())).await.expect("list")) })
        })
    });
    g.finish();
}

/// Time from a write until every one of `watchers` watch streams has delivered it.
fn watch_fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut g = c.benchmark_group("memory_store_watch_fanout");
    for watchers in [1usize, 100, 1000] {
        // The same store as the point operations: 100,000 objects of 1 KiB; each timed write
        // creates one more of 1 KiB.
        let store = rt.block_on(filled_memory_store(OBJECTS, SIZE));
        let remaining = Arc::new(AtomicUsize::new(0));
        let all_seen = Arc::new(Notify::new());
        rt.block_on(async {
            let from = store.current_revision().await.expect("revision") + 1;
            for _ in 0..watchers {
                let mut w = store.watch(&WatchRequest::from(Selection::kind(KIND), from)).await.expect("watch");
                let remaining = remaining.clone();
                let all_seen = all_seen.clone();
                tokio::spawn(async move {
                    while let Some(Ok(_)) = w.next().await {
                        if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                            all_seen.notify_one();
                        }
                    }
                });
            }
        });
        let next = Arc::new(AtomicUsize::new(0));
        g.bench_function(BenchmarkId::from_parameter(watchers), |b| {
            b.iter_custom(|iters| {
                let (store, remaining, all_seen, next) =
                    (store.clone(), remaining.clone(), all_seen.clone(), next.clone());
                // The writer is a task on the runtime, as a controller's writes would be.
                rt.block_on(rt.spawn(async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        remaining.store(watchers, Ordering::Release);
                        let seen = all_seen.notified();
                        let start = Instant::now();
                        let i = OBJECTS + next.fetch_add(1, Ordering::Relaxed);
                        store.create(object(i, SIZE), &WriteOptions::default()).await.expect("create");
                        seen.await;
                        total += start.elapsed();
                    }
                    total
                }))
                .expect("writer task")
            })
        });
    }
    g.finish();
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group! {
        name = benches;
        config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
        targets = point_ops, watch_fanout
    }
}
criterion_main!(group::benches);
