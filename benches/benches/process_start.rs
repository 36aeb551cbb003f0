//! Process runtime start latency: start 200 sleeping processes and see them all reported
//! running.
//!
//! `cargo bench -p orch-benches --bench process_start`
//!
//! Criterion times one `start` call (fork, exec, directory and log files, handle written) and a
//! round of 200 starts until all report `Running`; at the end the median and p99 of every single
//! start and the median and worst round are printed. Targets (issue #5): median start <= 5 ms,
//! all 200 running in <= 2 s.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use orch_core::kinds::Container;
use orch_core::runtime::{InstanceSpec, InstanceState, Runtime};
use orch_runtime::ProcessRuntime;

static STARTS: Mutex<Vec<Duration>> = Mutex::new(Vec::new());
static ROUNDS: Mutex<Vec<Duration>> = Mutex::new(Vec::new());
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn sleeper() -> InstanceSpec {
    InstanceSpec {
        id: format!("bench-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        container: Container {
            name: "main".into(),
            command: vec!["/bin/sleep".into(), "30".into()],
            ..Default::default()
        },
        volumes: Vec::new(),
        labels: Default::default(),
    }
}

/// Starts `n` sleeping processes one after the other (each start timed), checks that all are
/// running, removes them; returns the time until all were running.
async fn round(runtime: &ProcessRuntime, n: usize) -> Duration {
    let began = Instant::now();
    let mut handles = Vec::with_capacity(n);
    let mut starts = Vec::with_capacity(n);
    for _ in 0..n {
        let spec = sleeper();
        let t = Instant::now();
        handles.push(runtime.start(&spec).await.expect("start"));
        starts.push(t.elapsed());
    }
    for h in &handles {
        assert!(matches!(runtime.status(h).await.expect("status"), InstanceState::Running { .. }));
    }
    let took = began.elapsed();
    for h in &handles {
        runtime.remove(h).await.expect("remove");
    }
    STARTS.lock().unwrap_or_else(|e| e.into_inner()).extend(starts);
    took
}

fn bench(c: &mut Criterion) {
    let n = if std::env::args().any(|a| a == "--test") { 10 } else { 200 };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let root = std::env::temp_dir().join(format!("orch-bench-process-{}", std::process::id()));
    let runtime = ProcessRuntime::new(&root).expect("runtime root");
    let mut g = c.benchmark_group("process_start");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(format!("{n} started and running"), |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let t = rt.block_on(round(&runtime, n));
                ROUNDS.lock().unwrap_or_else(|e| e.into_inner()).push(t);
                took += t;
            }
            took
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&root);
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}

fn main() {
    group::benches();
    Criterion::default().configure_from_args().final_summary();
    let mut starts = STARTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut rounds = ROUNDS.lock().unwrap_or_else(|e| e.into_inner());
    if starts.is_empty() || rounds.is_empty() {
        return;
    }
    starts.sort();
    rounds.sort();
    println!("\nprocess_start: {} starts in {} rounds", starts.len(), rounds.len());
    println!(
        "  one start: median {:.2?}  p99 {:.2?}  max {:.2?}",
        percentile(&starts, 0.5),
        percentile(&starts, 0.99),
        starts[starts.len() - 1]
    );
    println!("  a round, all running: median {:.0?}  worst {:.0?}", percentile(&rounds, 0.5), rounds[rounds.len() - 1]);
}
