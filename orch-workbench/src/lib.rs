//! The research workbench: replay a GPU cluster trace with any placement policy, measure what
//! the fragmentation papers measure, and get tables and plots, in seconds.
//!
//! The reference is the FGD paper ("Beware of Fragmentation: Scheduling GPU-Sharing Workloads
//! with Fragmentation Gradient Descent", USENIX ATC '23) and its Kubernetes-based simulator. An
//! [`Experiment`] follows its procedure on a [`Trace`] (the openb trace, one of its variants, or
//! a CSV of your own): the tasks shuffled with the seed, then random copies until the requested
//! GPUs reach 1.3 x capacity ([`Arrivals::Paper`]), or the trace's own creation and deletion
//! times ([`Arrivals::TraceTimes`]). Each task goes through orch's own scheduling core (the
//! [`SchedulingCore`](orch_scheduler::SchedulingCore) and plugin framework a cluster's scheduler
//! service runs) with the [`Policy`]'s score plugin, and the cluster is measured after every
//! arrival ([`Step`]): unallocated and fragmented GPUs, tasks placed and dropped by kind, nodes
//! in use. [`metrics`] turns runs into the paper's curves (by arrived GPU %, median over seeds
//! with the middle half as the spread), [`report`] writes CSV files, the table beside the
//! paper's figures, and (feature `plots`) PNG and SVG plots.
//!
//! ```no_run
//! use std::sync::Arc;
//! use orch_workbench::{Experiment, Policy, Trace, openb_dir, report};
//!
//! let trace = Arc::new(Trace::openb(&openb_dir(), "default")?);
//! let experiments: Vec<Experiment> = Policy::PAPER
//!     .into_iter()
//!     .flat_map(|p| (42..52).map(move |seed| (p, seed)))
//!     .map(|(p, seed)| Experiment::new(trace.clone(), p, seed))
//!     .collect();
//! let runs = report::run_all(&experiments, 2, &|_, _, _| {});
//! print!("{}", report::table_markdown(&report::summarize(&runs), true));
//! report::write_all("results".as_ref(), &runs, false, true)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The command `orch-workbench` does the same from the command line (`orch-workbench --help`).
//!
//! | feature | what it adds |
//! |---|---|
//! | `plots` (default) | [`plot`]: PNG and SVG plots with plotters |

pub mod arrivals;
pub mod experiment;
pub mod metrics;
#[cfg(feature = "plots")]
pub mod plot;
pub mod policy;
pub mod report;
pub mod trace;

pub use arrivals::{Arrival, Arrivals, Rng};
pub use experiment::{Experiment, Placed, Run, Step};
pub use metrics::{Band, Curve, Summary};
pub use policy::Policy;
pub use report::ReportError;
pub use trace::{NodeRow, TaskKind, TaskRow, Trace, TraceError, openb_dir};
