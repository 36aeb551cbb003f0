//! The research workbench against the FGD paper's simulator: one experiment (FGD, seed 42,
//! inflation 1.3, the default openb trace: 1,213 GPU nodes, ~10,700 arrivals through the
//! scheduling core, the fragmentation measured after each) timed by criterion on one thread;
//! then the whole reproduction table (the six policies x 10 seeds, 42..51) timed once on every
//! core, and printed beside the paper's figures.
//!
//! `cargo bench -p orch-benches --bench workbench`
//!
//! - The trace is read from `$ORCH_OPENB_DIR`, by default `../shared/data/openb` next to the
//!   workspace; when it is not there the bench says so and exits successfully.
//! - Timed: building the cluster and the tasks' objects, the replay, the metrics at every step.
//!   Not timed: reading the CSV files (once, before), the curves and the table (after).
//! - `-- --test` runs the experiment once and the table with one seed per policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use orch_workbench::report::{run_all, summarize, table_markdown};
use orch_workbench::{Experiment, Policy, Trace, openb_dir};

fn trace() -> Option<Arc<Trace>> {
    let dir = openb_dir();
    match Trace::openb(&dir, "default") {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            println!("workbench: the openb trace could not be read ({e}); skipped");
            None
        }
    }
}

fn one_experiment(c: &mut Criterion, trace: &Arc<Trace>) {
    let mut g = c.benchmark_group("workbench");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(5));
    let e = Experiment::new(trace.clone(), Policy::Fgd, 42);
    g.bench_function("one experiment (FGD, seed 42, 1.3x, default trace)", |b| {
        b.iter(|| {
            let run = e.run();
            assert_eq!(run.refused, 0);
            run.steps.len()
        })
    });
    g.finish();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--test");
    let Some(trace) = trace() else { return };
    let mut c = Criterion::default().configure_from_args();
    one_experiment(&mut c, &trace);
    c.final_summary();

    let seeds: Vec<u64> = if quick { vec![42] } else { (42..52).collect() };
    let experiments: Vec<Experiment> = Policy::PAPER
        .into_iter()
        .flat_map(|p| seeds.iter().map(move |&s| (p, s)))
        .map(|(p, s)| Experiment::new(trace.clone(), p, s))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    let runs = run_all(&experiments, threads, &|_, _, _| {});
    let took = started.elapsed();
    let arrivals: usize = runs.iter().map(|r| r.steps.len()).sum();
    println!();
    println!(
        "workbench/reproduction table: {} runs ({} policies x {} seeds, {arrivals} arrivals in all) in {:.2} s on {threads} threads{}",
        runs.len(),
        Policy::PAPER.len(),
        seeds.len(),
        took.as_secs_f64(),
        if quick { " (--test: one seed per policy)" } else { "" }
    );
    for p in Policy::PAPER {
        let mine: Vec<f64> = runs.iter().filter(|r| r.policy == p).map(|r| r.wall.as_secs_f64()).collect();
        println!("  {p}: {:.3} s per run on average", mine.iter().sum::<f64>() / mine.len().max(1) as f64);
    }
    println!();
    print!("{}", table_markdown(&summarize(&runs), true));
}
