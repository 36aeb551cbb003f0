//! Node scale: Kubernetes' largest supported cluster, 5,000 nodes and 150,000 workloads (30 per
//! node), through the store, the scheduler service, the node lifecycle controller and an agent
//! per simulated node, on the memory store and on the embedded store; then 5% of the agents stop
//! abruptly and the eviction runs to its end at the default rate (one node every 10 s after a
//! 5-minute timeout). The scenario is `orch_benches::scale`.
//!
//! Reported: create → all Running (wall time, workloads/s), peak RSS and bytes per workload,
//! eviction wall time against its virtual time, one node's list by field selector; the run
//! itself checks that nothing on a live node was touched.
//!
//! `cargo bench -p orch-benches --bench scale` (sizes: `ORCH_SCALE_NODES`, default 5000). With
//! `--test` (CI) it runs once, at 100 nodes unless `ORCH_SCALE_NODES` says otherwise: one run at
//! full size is `ORCH_SCALE_NODES=5000 cargo bench -p orch-benches --bench scale -- --test`.

use std::sync::Mutex;
use std::time::Duration;

use criterion::{Criterion, SamplingMode};
use orch_benches::scale::{Backend, Report, Scale, run};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static REPORTS: Mutex<Vec<(String, Report)>> = Mutex::new(Vec::new());

fn bench(c: &mut Criterion) {
    let quick = std::env::args().any(|a| a == "--test");
    let asked: Option<usize> = std::env::var("ORCH_SCALE_NODES").ok().and_then(|v| v.parse().ok());
    let nodes = asked.unwrap_or(if quick { 100 } else { 5_000 });
    let dir = std::env::temp_dir().join(format!("orch-scale-{}", std::process::id()));
    let mut g = c.benchmark_group("scale");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    for (label, embedded) in [("memory store", false), ("embedded store", true)] {
        let id = format!("{nodes} nodes, {} workloads / {label}", nodes * 30);
        g.bench_function(&id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir).expect("scratch dir");
                    let backend = if embedded { Backend::Embedded(dir.join("store.redb")) } else { Backend::Memory };
                    let report = run(&Scale { nodes, per_node: 30, dead_every: 20, backend });
                    assert_eq!(report.live_touched, 0, "a workload on a live node was touched");
                    assert_eq!(report.evicted, report.on_dead, "every workload of a stopped node is evicted");
                    total += report.to_running;
                    REPORTS.lock().expect("reports").push((id.clone(), report));
                }
                total
            })
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
    g.finish();
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}

fn main() {
    group::benches();
    Criterion::default().configure_from_args().final_summary();
    let reports = REPORTS.lock().expect("reports");
    if reports.is_empty() {
        return;
    }
    println!(
        "\n| run | create → all Running | workloads/s | peak RSS | per workload | eviction wall / virtual (evicted) | one-node list | live touched |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (id, r) in reports.iter() {
        let rss = r.peak_rss.unwrap_or(0);
        println!(
            "| {id} | {:.2} s | {:.0} | {:.2} GiB | {:.1} KB | {:.1} s / {:.0} s ({:.2}%; {}) | {:.3} ms ({} of {}) | {} |",
            r.to_running.as_secs_f64(),
            r.workloads as f64 / r.to_running.as_secs_f64(),
            rss as f64 / (1u64 << 30) as f64,
            rss as f64 / r.workloads as f64 / 1000.0,
            r.eviction_wall.as_secs_f64(),
            r.eviction_virtual.as_secs_f64(),
            100.0 * r.eviction_wall.as_secs_f64() / r.eviction_virtual.as_secs_f64(),
            r.evicted,
            r.one_node_list.as_secs_f64() * 1000.0,
            r.one_node,
            r.workloads,
            r.live_touched,
        );
    }
}
