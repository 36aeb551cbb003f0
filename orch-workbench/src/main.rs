//! `orch-workbench`: replays a GPU cluster trace with placement policies and seeds, writes the
//! curves, the table and the plots. `orch-workbench --help` lists the options.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use orch_workbench::metrics::{Curve, UNALLOCATED};
use orch_workbench::{Arrivals, Experiment, Policy, Trace, openb_dir, report};

/// Replays a GPU cluster trace through orch's scheduler with each policy and seed, and writes the
/// FGD paper's metrics: per-run curves, medians over seeds, the table of unallocated GPUs beside
/// the paper's figures, and plots.
#[derive(Debug, Parser)]
#[command(name = "orch-workbench", version)]
struct Args {
    /// Folder of the openb trace [default: $ORCH_OPENB_DIR, else shared/data/openb beside the
    /// workspace].
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
    /// The openb task list: default, gpushare20, multigpu20, gpuspec33, cpu100… or a file name
    /// in the trace folder (on the openb GPU nodes).
    #[arg(long, short, default_value = "default")]
    workload: String,
    /// A node CSV of your own (with --tasks; see the crate docs for the format).
    #[arg(long, value_name = "FILE", requires = "tasks")]
    nodes: Option<PathBuf>,
    /// A task CSV of your own (with --nodes).
    #[arg(long, value_name = "FILE", requires = "nodes")]
    tasks: Option<PathBuf>,
    /// Policies, separated by commas [default: the paper's six].
    #[arg(long, short, value_delimiter = ',')]
    policy: Vec<Policy>,
    /// Seeds: a list (1,2,3) and/or inclusive ranges (42-51).
    #[arg(long, short, default_value = "42-51", value_parser = parse_seeds)]
    seeds: Seeds,
    /// Requested GPUs at the end, as a multiple of the cluster's capacity.
    #[arg(long, default_value_t = 1.3)]
    inflation: f64,
    /// Replay by the trace's creation and deletion times instead of the paper's procedure.
    #[arg(long)]
    trace_times: bool,
    /// Output folder.
    #[arg(long, short, default_value = "workbench-results")]
    out: PathBuf,
    /// Experiments run at once [default: the machine's cores].
    #[arg(long, short = 'j')]
    threads: Option<usize>,
    /// Also write every step of every run (steps/*.csv).
    #[arg(long)]
    steps: bool,
}

#[derive(Debug, Clone)]
struct Seeds(Vec<u64>);

fn parse_seeds(text: &str) -> Result<Seeds, String> {
    let mut seeds = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (
                    a.trim().parse().map_err(|_| format!("{part:?}: {a:?} is not a seed"))?,
                    b.trim().parse().map_err(|_| format!("{part:?}: {b:?} is not a seed"))?,
                );
                if a > b || b - a > 10_000 {
                    return Err(format!("{part:?}: a range goes from low to high, at most 10,000 seeds"));
                }
                seeds.extend(a..=b);
            }
            None => seeds.push(part.parse().map_err(|_| format!("{part:?} is not a seed"))?),
        }
    }
    if seeds.is_empty() {
        return Err("no seed given".into());
    }
    Ok(Seeds(seeds))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orch-workbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if !(args.inflation.is_finite() && args.inflation > 0.0) {
        return Err(format!("--inflation: must be a positive number (is {})", args.inflation).into());
    }
    let trace = match (&args.nodes, &args.tasks) {
        (Some(n), Some(t)) => Trace::load(n, t)?,
        _ => Trace::openb(&args.trace.clone().unwrap_or_else(openb_dir), &args.workload)?,
    };
    let trace = Arc::new(trace);
    let policies = if args.policy.is_empty() { Policy::PAPER.to_vec() } else { args.policy.clone() };
    let arrivals = if args.trace_times { Arrivals::TraceTimes } else { Arrivals::Paper { inflation: args.inflation } };
    let first = Experiment::new(trace.clone(), policies[0], 0);
    let experiments: Vec<Experiment> = policies
        .iter()
        .flat_map(|&p| args.seeds.0.iter().map(move |&s| (p, s)))
        .map(|(p, s)| Experiment::new(trace.clone(), p, s).arrivals(arrivals).target(first.target.clone()))
        .collect();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    eprintln!(
        "{}: {} nodes ({} GPUs), {} tasks ({:.1}% of GPU capacity), {} typical shapes; {} runs on {threads} threads",
        trace.name,
        trace.nodes.len(),
        trace.gpu_capacity_milli() / 1000,
        trace.tasks.len(),
        100.0 * trace.gpu_requested_milli() as f64 / trace.gpu_capacity_milli().max(1) as f64,
        first.target.shapes().len(),
        experiments.len()
    );
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let overall = terminal.then(|| {
        let b = multi.add(ProgressBar::new(experiments.len() as u64));
        b.set_style(
            ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} runs, {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_prefix("all");
        b
    });
    let bars: Mutex<HashMap<usize, ProgressBar>> = Mutex::new(HashMap::new());
    let progress = |i: usize, done: usize, total: usize| {
        let e = &experiments[i];
        if !terminal {
            if done == total {
                eprintln!("{} seed {}: {total} arrivals done", e.policy, e.seed);
            }
            return;
        }
        let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
        let bar = bars.entry(i).or_insert_with(|| {
            let b = multi.insert_from_back(1, ProgressBar::new(total as u64));
            b.set_style(
                ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} arrivals")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(format!("{} seed {}", e.policy, e.seed));
            b
        });
        bar.set_position(done as u64);
        if done == total {
            bar.finish_and_clear();
            bars.remove(&i);
            if let Some(o) = &overall {
                o.inc(1);
            }
        }
    };
    let runs = report::run_all(&experiments, threads, &progress);
    if let Some(o) = overall {
        o.finish_and_clear();
    }
    let took = started.elapsed();
    for r in &runs {
        if r.refused > 0 {
            eprintln!("warning: {} seed {}: {} decisions refused by the scheduling core", r.policy, r.seed, r.refused);
        }
    }
    // The paper's figures are for the default trace at 1.3 x.
    let paper = trace.name == "openb_pod_list_default" && !args.trace_times && (args.inflation - 1.3).abs() < 1e-9;
    let written = report::write_all(&args.out, &runs, args.steps, paper)?;
    let summaries = report::summarize(&runs);
    println!("{}", report::table_markdown(&summaries, paper));
    let mean_run = runs.iter().map(|r| r.wall.as_secs_f64()).sum::<f64>() / runs.len().max(1) as f64;
    println!(
        "{} runs in {:.2} s ({:.3} s per run on average, {threads} threads); {} files in {}",
        runs.len(),
        took.as_secs_f64(),
        mean_run,
        written.len(),
        args.out.display()
    );
    if args.trace_times {
        for s in &summaries {
            let last = runs
                .iter()
                .filter(|r| r.policy == s.policy)
                .filter_map(|r| Curve::of(r).points.last().map(|p| p.1[UNALLOCATED]))
                .collect::<Vec<_>>();
            println!("{}: unallocated GPU % after the last arrival, per seed: {last:.2?}", s.policy);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_as_lists_and_inclusive_ranges() {
        assert_eq!(parse_seeds("42-45,7").unwrap().0, vec![42, 43, 44, 45, 7]);
        assert_eq!(parse_seeds("3").unwrap().0, vec![3]);
        assert!(parse_seeds("5-2").unwrap_err().contains("from low to high"));
        assert!(parse_seeds("x").unwrap_err().contains("\"x\" is not a seed"));
        assert!(parse_seeds("").unwrap_err().contains("no seed"));
    }
}
