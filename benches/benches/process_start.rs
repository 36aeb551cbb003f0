//! Process runtime start latency: start 200 sleeping processes and see them all reported
//! running.
//!
//! `cargo bench -p orch-benches --bench process_start`
//!
//! Reports the median and p99 of one `start` call (fork, exec, directory and log files, handle
//! written) and the time until all 200 report `Running`, over 5 rounds.

use std::time::{Duration, Instant};

use orch_core::kinds::Container;
use orch_core::runtime::{InstanceSpec, InstanceState, Runtime};
use orch_runtime::ProcessRuntime;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--test");
    let (rounds, n) = if quick { (1, 10) } else { (5, 200) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let root = std::env::temp_dir().join(format!("orch-bench-process-{}", std::process::id()));
    let runtime = ProcessRuntime::new(&root).expect("runtime root");
    let mut starts = Vec::new();
    let mut all_running = Vec::new();
    rt.block_on(async {
        for round in 0..rounds {
            let began = Instant::now();
            let mut handles = Vec::with_capacity(n);
            for i in 0..n {
                let spec = InstanceSpec {
                    id: format!("bench-{round}-{i}"),
                    container: Container {
                        name: "main".into(),
                        command: vec!["/bin/sleep".into(), "30".into()],
                        ..Default::default()
                    },
                    volumes: Vec::new(),
                    labels: Default::default(),
                };
                let t = Instant::now();
                handles.push(runtime.start(&spec).await.expect("start"));
                starts.push(t.elapsed());
            }
            for h in &handles {
                assert!(matches!(runtime.status(h).await.expect("status"), InstanceState::Running { .. }));
            }
            all_running.push(began.elapsed());
            for h in &handles {
                runtime.remove(h).await.expect("remove");
            }
        }
    });
    let _ = std::fs::remove_dir_all(&root);
    starts.sort();
    all_running.sort();
    println!("process_start/{n} processes x {rounds} rounds");
    println!(
        "  start latency: median {:.2?}  p99 {:.2?}  max {:.2?}",
        percentile(&starts, 0.5),
        percentile(&starts, 0.99),
        starts[starts.len() - 1]
    );
    println!(
        "  all {n} running after: median {:.0?}  worst {:.0?}",
        percentile(&all_running, 0.5),
        all_running[all_running.len() - 1]
    );
}
