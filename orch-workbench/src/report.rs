//! Running many experiments at once, and writing what they measured: CSV files and the table of
//! unallocated GPUs beside the paper's.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::experiment::{Experiment, Run};
use crate::metrics::{COLUMNS, Curve, Summary, UNALLOCATED, arrived_pct, values};
use crate::policy::Policy;

/// Why results could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A file or folder could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("{}: {reason}", path.display())]
    Plot {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Runs `experiments` on up to `threads` threads (one experiment per thread at a time); returns
/// the runs in the same order. `progress(i, done, total)` reports experiment `i`'s arrivals.
pub fn run_all(
    experiments: &[Experiment],
    threads: usize,
    progress: &(dyn Fn(usize, usize, usize) + Sync),
) -> Vec<Run> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Run>>> = Mutex::new(vec![None; experiments.len()]);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, experiments.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(e) = experiments.get(i) else { break };
                    let run = e.run_with(&mut |done, total| progress(i, done, total));
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(run);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().flatten().collect()
}

/// The summaries of `runs`, one per policy, in the order the policies first appear.
pub fn summarize(runs: &[Run]) -> Vec<Summary> {
    let mut policies: Vec<Policy> = Vec::new();
    for r in runs {
        if !policies.contains(&r.policy) {
            policies.push(r.policy);
        }
    }
    policies
        .into_iter()
        .map(|p| {
            let curves: Vec<Curve> = runs.iter().filter(|r| r.policy == p).map(Curve::of).collect();
            Summary::of(p, &curves)
        })
        .collect()
}

fn create(path: &Path) -> Result<std::io::BufWriter<std::fs::File>, ReportError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Io { path: dir.to_path_buf(), source })?;
    }
    let f = std::fs::File::create(path).map_err(|source| ReportError::Io { path: path.to_path_buf(), source })?;
    Ok(std::io::BufWriter::new(f))
}

fn write_text(path: &Path, text: &str) -> Result<(), ReportError> {
    let mut f = create(path)?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.flush())
        .map_err(|source| ReportError::Io { path: path.to_path_buf(), source })
}

/// A run's curve as CSV: `arrived_pct` and the [`COLUMNS`].
pub fn curve_csv(curve: &Curve) -> String {
    let mut s = format!("arrived_pct,{}\n", COLUMNS.join(","));
    for (x, v) in &curve.points {
        let _ = write!(s, "{x}");
        for v in v {
            let _ = write!(s, ",{v:.4}");
        }
        s.push('\n');
    }
    s
}

/// Every step of a run as CSV: arrived %, the [`COLUMNS`], and the trace time when there is one.
pub fn steps_csv(run: &Run) -> String {
    let mut s = format!("arrived_pct,{},time\n", COLUMNS.join(","));
    for step in &run.steps {
        let _ = write!(s, "{:.4}", arrived_pct(run, step));
        for v in values(run, step) {
            let _ = write!(s, ",{v:.4}");
        }
        let _ = writeln!(s, ",{}", step.time.map(|t| t.to_string()).unwrap_or_default());
    }
    s
}

/// The policies' medians and middle halves as CSV: one row per policy and arrived %, three
/// columns (`_median`, `_p25`, `_p75`) per metric.
pub fn summary_csv(summaries: &[Summary]) -> String {
    let mut s = String::from("policy,seeds,arrived_pct");
    for c in COLUMNS {
        let _ = write!(s, ",{c}_median,{c}_p25,{c}_p75");
    }
    s.push('\n');
    for sum in summaries {
        for (x, bands) in &sum.points {
            let _ = write!(s, "{},{},{x}", sum.policy, sum.seeds);
            for b in bands {
                let _ = write!(s, ",{:.4},{:.4},{:.4}", b.median, b.low, b.high);
            }
            s.push('\n');
        }
    }
    s
}

/// The table of unallocated GPU % at 100% and 130% arrived (median over seeds), beside the
/// paper's figures when `paper` (they are for the default openb trace at 1.3 x), as markdown.
pub fn table_markdown(summaries: &[Summary], paper: bool) -> String {
    let mut s = String::from(
        "| policy | seeds | unallocated GPU % at 100% arrived | paper | diff | at 130% arrived | paper | diff |\n|---|---|---|---|---|---|---|---|\n",
    );
    for sum in summaries {
        let ours = |x| sum.at(x, UNALLOCATED).map(|b| b.median);
        let paper = sum.policy.paper_unallocated().filter(|_| paper);
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let diff = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:+.2}", a - b),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            sum.policy,
            sum.seeds,
            cell(ours(100)),
            cell(paper.map(|p| p.0)),
            diff(ours(100), paper.map(|p| p.0)),
            cell(ours(130)),
            cell(paper.map(|p| p.1)),
            diff(ours(130), paper.map(|p| p.1)),
        );
    }
    s
}

/// The table as CSV (`policy,seeds,unallocated_100,paper_100,unallocated_130,paper_130`).
pub fn table_csv(summaries: &[Summary], paper: bool) -> String {
    let mut s = String::from("policy,seeds,unallocated_100,paper_100,unallocated_130,paper_130\n");
    for sum in summaries {
        let ours = |x| sum.at(x, UNALLOCATED).map_or(String::new(), |b| format!("{:.4}", b.median));
        let paper = sum.policy.paper_unallocated().filter(|_| paper);
        let p = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "{},{},{},{},{},{}",
            sum.policy,
            sum.seeds,
            ours(100),
            p(paper.map(|x| x.0)),
            ours(130),
            p(paper.map(|x| x.1))
        );
    }
    s
}

/// Writes everything into `dir`: `runs/<policy>-seed<seed>.csv` (each run's curve),
/// `steps/<policy>-seed<seed>.csv` (every step, when `steps`), `curves.csv` (medians and middle
/// halves), `table.csv` and `table.md` (with the paper's figures when `paper`); and, with the
/// `plots` feature, `unallocated.{png,svg}` and `fragmented.{png,svg}`. Returns the files
/// written.
pub fn write_all(dir: &Path, runs: &[Run], steps: bool, paper: bool) -> Result<Vec<PathBuf>, ReportError> {
    let mut written = Vec::new();
    for r in runs {
        let stem = format!("{}-seed{}", r.policy, r.seed);
        let p = dir.join("runs").join(format!("{stem}.csv"));
        write_text(&p, &curve_csv(&Curve::of(r)))?;
        written.push(p);
        if steps {
            let p = dir.join("steps").join(format!("{stem}.csv"));
            write_text(&p, &steps_csv(r))?;
            written.push(p);
        }
    }
    let summaries = summarize(runs);
    for (name, text) in [
        ("curves.csv", summary_csv(&summaries)),
        ("table.csv", table_csv(&summaries, paper)),
        ("table.md", table_markdown(&summaries, paper)),
    ] {
        let p = dir.join(name);
        write_text(&p, &text)?;
        written.push(p);
    }
    #[cfg(feature = "plots")]
    written.extend(crate::plot::plot_all(dir, &summaries)?);
    Ok(written)
}
