//! The reconcile loop's costs (criterion): the work queue, and a no-op controller over 100,000
//! objects from a cold start.
//!
//! `cargo bench -p orch-benches --bench reconcile`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use orch_core::controller::queue::{QueueConfig, WorkQueue};
use orch_core::kinds::Node;
use orch_core::{Action, Api, Context, Controller, ControllerBuilder, Error, Manager, Object, ObjectMeta, Store};
use orch_store::MemoryStore;
use tokio::sync::Notify;

const KEYS: usize = 100_000;

fn queue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut g = c.benchmark_group("work_queue");
    g.throughput(Throughput::Elements(1));
    // One op = add + next + done, over 100k distinct keys, from one task.
    g.bench_function("add_next_done_100k_keys", |b| {
        let keys: Vec<String> = (0..KEYS).map(|i| format!("default/obj-{i:06}")).collect();
        b.iter_custom(|iters| {
            rt.block_on(async {
                let q: WorkQueue<String> = WorkQueue::new(QueueConfig::default());
                let start = Instant::now();
                let mut done = 0u64;
                while done < iters {
                    let batch = (iters - done).min(KEYS as u64) as usize;
                    for k in &keys[..batch] {
                        q.add(k.clone());
                    }
                    for _ in 0..batch {
                        let k = q.next().await.expect("a key");
                        q.done(black_box(&k));
                    }
                    done += batch as u64;
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

struct Count {
    seen: AtomicUsize,
    target: usize,
    all: Arc<Notify>,
}

#[async_trait::async_trait]
impl Controller for Count {
    type Kind = Node;
    type Error = Error;
    async fn reconcile(&self, _node: Arc<Object<Node>>, _ctx: &Context) -> Result<Action, Error> {
        if self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.all.notify_one();
        }
        Ok(Action::Done)
    }
}

fn noop_controller(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    rt.block_on(async {
        let nodes: Api<Node> = Api::all(store.clone());
        for i in 0..KEYS {
            let meta = ObjectMeta::named(format!("node-{i:06}")).with_label("zone", format!("z{}", i % 10));
            nodes.create(&Object::new(meta, Node::default())).await.expect("create");
        }
    });
    let mut g = c.benchmark_group("controller");
    g.sample_size(10);
    // From a cold start: list 100k objects into a fresh cache, then reconcile each once.
    g.bench_function("noop_reconcile_100k_cold_start", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let store = store.clone();
                total += rt.block_on(async move {
                    let all = Arc::new(Notify::new());
                    let counter = Count { seen: AtomicUsize::new(0), target: KEYS, all: all.clone() };
                    let mut manager = Manager::new(store);
                    manager.add(ControllerBuilder::new("noop", counter));
                    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                    let start = Instant::now();
                    let run = tokio::spawn(manager.run(async move {
                        let _ = rx.await;
                    }));
                    all.notified().await;
                    let took = start.elapsed();
                    let _ = tx.send(());
                    run.await.expect("manager").expect("run");
                    took
                });
            }
            total
        })
    });
    g.finish();
}

#[allow(missing_docs)]
mod group {
    use super::*;
    criterion::criterion_group! {
        name = benches;
        config = Criterion::default().measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(1));
        targets = queue, noop_controller
    }
}
criterion::criterion_main!(group::benches);
