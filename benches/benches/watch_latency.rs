//! Watch delivery latency percentiles: from a write until all of N watchers have it.
//!
//! `cargo bench -p orch-benches --bench watch_latency`
//!
//! Criterion (the `store` bench) reports the mean of the same measurement; this one reports the
//! p50 and p99 over 2,000 writes for 1, 100 and 1,000 watchers, on a 2-worker tokio runtime,
//! with the writer and the watchers all tasks on that runtime. The store holds 100,000 objects
//! of 1 KiB (two labels each) before the watches start; each write creates one more of 1 KiB.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use orch_benches::{KIND, filled_memory_store, object};
use orch_core::{Selection, Store, WatchRequest, WriteOptions};
use tokio::sync::Notify;

/// Objects in the store before the watches start, and the size of every object's spec.
const OBJECTS: usize = 100_000;
const SIZE: usize = 1024;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // `cargo bench -- --test` (as CI runs it) only checks that the measurement works.
    let test = std::env::args().any(|a| a == "--test");
    let (writes, objects) = if test { (20, 1_000) } else { (2_000, OBJECTS) };
    for watchers in [1usize, 100, 1000] {
        let samples = rt.block_on(async {
            let store = filled_memory_store(objects, SIZE).await;
            let from = store.current_revision().await.expect("revision") + 1;
            let remaining = Arc::new(AtomicUsize::new(0));
            let all_seen = Arc::new(Notify::new());
            for _ in 0..watchers {
                let mut w = store.watch(&WatchRequest::from(Selection::kind(KIND), from)).await.expect("watch");
                let (remaining, all_seen) = (remaining.clone(), all_seen.clone());
                tokio::spawn(async move {
                    while let Some(Ok(_)) = w.next().await {
                        if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                            all_seen.notify_one();
                        }
                    }
                });
            }
            // The writer is a task on the runtime, as a controller's writes would be.
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(writes);
                for i in 0..writes + 100 {
                    remaining.store(watchers, Ordering::Release);
                    let seen = all_seen.notified();
                    let start = Instant::now();
                    store.create(object(objects + i, SIZE), &WriteOptions::default()).await.expect("create");
                    seen.await;
                    if i >= 100 {
                        samples.push(start.elapsed()); // the first 100 warm up
                    }
                }
                samples
            })
            .await
            .expect("writer task")
        });
        let mut sorted = samples;
        sorted.sort();
        println!(
            "watch_latency/{watchers:>4} watchers: p50 {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}  ({writes} writes of 1 KiB, {objects} objects stored)",
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.99),
            sorted[sorted.len() - 1]
        );
    }
}
