//! Replays the openb production GPU-cluster trace (Alibaba cluster-trace-gpu-v2023, the trace of
//! "Beware of Fragmentation", USENIX ATC '23) through the [`SchedulingCore`]: 1,523 nodes with
//! their GPUs device by device, and the tasks arriving and leaving in `creation_time` /
//! `deletion_time` order. Reports the wall time of the whole replay, the tasks placed at
//! arrival and at all, and the GPU allocation at its peak, for the default profile
//! (least-allocated) and for most-allocated (bin-packing).
//!
//! This is a plain timed program printing a markdown table, not a criterion bench: the replay is
//! one long deterministic run whose interesting outputs are placement figures, not a
//! distribution of timings (criterion times the `scheduler_perf` cases in `scheduler.rs`).
//!
//! `cargo bench -p orch-benches --bench openb_replay`
//!
//! - The trace is read from `$ORCH_OPENB_DIR`, by default `../shared/data/openb` next to the
//!   workspace. When neither `ORCH_OPENB_DIR` nor `ORCH_OPENB_PODS` is set and the default
//!   folder is not there, the bench says it skipped; a trace that was asked for and is missing
//!   is an error naming the file, and the bench exits with status 1.
//! - `ORCH_OPENB_PODS` picks another task list of the trace (e.g. `openb_pod_list_gpuspec33.csv`);
//!   the default is `openb_pod_list_default.csv`.
//! - `-- --test` runs the replay once per profile, as the full run does (it takes well under a
//!   second each; should it ever take over 20 s, `--test` cuts it to the first 2,000 tasks).
//!
//! How the trace maps onto orch:
//! - A node gets allocatable `cpu` (milli), `memory` (MiB) and `gpu` (whole devices), one
//!   [`Device`] per GPU with its model, and the label `orch.dev/gpu-model=<model>` when it has
//!   GPUs. No workloads-per-node limit is declared (the trace has none).
//! - A task requests `cpu`, `memory`, and `gpu`: `gpu_milli` milli-GPUs when it shares one GPU
//!   (`num_gpu == 1`, `gpu_milli < 1000`), else `num_gpu` whole GPUs. A GPU task with a
//!   `gpu_spec` (models separated by `|`) gets a required node affinity
//!   `orch.dev/gpu-model In [...]`. All tasks have the same priority (so nothing is preempted).
//! - Events are ordered by time; at equal times deletions come before arrivals (what leaves
//!   frees room for what comes). An arrival submits the task and schedules until idle; a
//!   deletion removes the task, placed or still pending. Between two events more than the
//!   queue's longest backoff (10 s) apart, the clock is moved past the backoffs and the queue
//!   is drained, so a task woken by a deletion is retried then and not only at the next event.
//! - A task with no `creation_time` arrives at time zero; one with no `deletion_time` runs to the
//!   end of the trace (`openb_pod_list_multigpu20.csv` has neither column: every task arrives at
//!   once and stays, which fills the cluster). A task whose `deletion_time`
//!   is not after its `creation_time` lives for an instant: it arrives, is scheduled, and is
//!   deleted right after (it counts as placed at arrival if it got a node).
//! - A task counts as placed if it was bound before its deletion; "at arrival" if it was bound
//!   in the scheduling run right after its submission.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orch_core::kinds::{
    Affinity, Device, Node, NodeAffinity, NodeSelectorOperator, NodeSelectorRequirement, NodeSelectorTerm,
    ResourceRequirements, Workload,
};
use orch_core::{Object, ObjectMeta, ObjectRef, Quantity};
use orch_scheduler::Framework;
use orch_scheduler::core::OutcomeKind;
use orch_scheduler::plugins::{ScoringStrategy, default_profile};
use orch_scheduler::snapshot::GPU;
use orch_scheduler::{Outcome, SchedulingCore};

/// Node label carrying the GPU model.
const GPU_MODEL_LABEL: &str = "orch.dev/gpu-model";

/// The queue's longest backoff: after this long every backed-off task is ready again.
const MAX_BACKOFF_MS: u64 = 10_000;

/// Under `--test`, a replay slower than this is cut to the first [`TEST_TASKS`] tasks.
const TEST_BUDGET: Duration = Duration::from_secs(20);
const TEST_TASKS: usize = 2_000;

struct NodeRow {
    name: String,
    cpu_milli: i64,
    memory_mib: i64,
    gpus: usize,
    model: String,
}

struct TaskRow {
    name: String,
    cpu_milli: i64,
    memory_mib: i64,
    num_gpu: i64,
    gpu_milli: i64,
    gpu_spec: Vec<String>,
    creation: u64,
    deletion: Option<u64>,
}

impl TaskRow {
    /// The GPU request in milli-GPUs.
    fn gpu_request_milli(&self) -> i64 {
        if self.num_gpu == 1 && self.gpu_milli > 0 && self.gpu_milli < 1000 {
            self.gpu_milli
        } else {
            self.num_gpu * 1000
        }
    }
}

/// Reads a CSV with a header line into rows of fields by column name (the trace has no quoted
/// fields).
fn read_csv(path: &Path) -> Result<Vec<HashMap<String, String>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().ok_or("empty file")?.split(',').map(|s| s.trim().to_string()).collect();
    Ok(lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| header.iter().cloned().zip(l.split(',').map(|s| s.trim().to_string())).collect())
        .collect())
}

fn field<'a>(row: &'a HashMap<String, String>, name: &str) -> &'a str {
    row.get(name).map(String::as_str).unwrap_or("")
}

fn int(row: &HashMap<String, String>, name: &str) -> Result<i64, String> {
    let v = field(row, name);
    if v.is_empty() {
        return Ok(0);
    }
    v.parse::<f64>().map(|f| f as i64).map_err(|e| format!("{name}={v:?}: {e}"))
}

fn read_nodes(path: &Path) -> Result<Vec<NodeRow>, String> {
    read_csv(path)?
        .iter()
        .map(|r| {
            Ok(NodeRow {
                name: field(r, "sn").to_string(),
                cpu_milli: int(r, "cpu_milli")?,
                memory_mib: int(r, "memory_mib")?,
                gpus: int(r, "gpu")?.max(0) as usize,
                model: field(r, "model").to_string(),
            })
        })
        .collect()
}

fn read_tasks(path: &Path) -> Result<Vec<TaskRow>, String> {
    read_csv(path)?
        .iter()
        .map(|r| {
            let deletion = field(r, "deletion_time");
            Ok(TaskRow {
                name: field(r, "name").to_string(),
                cpu_milli: int(r, "cpu_milli")?,
                memory_mib: int(r, "memory_mib")?,
                num_gpu: int(r, "num_gpu")?,
                gpu_milli: int(r, "gpu_milli")?,
                gpu_spec: field(r, "gpu_spec").split('|').filter(|m| !m.is_empty()).map(str::to_string).collect(),
                creation: int(r, "creation_time")?.max(0) as u64,
                deletion: if deletion.is_empty() { None } else { Some(int(r, "deletion_time")?.max(0) as u64) },
            })
        })
        .collect()
}

fn node_object(row: &NodeRow) -> Object<Node> {
    let mut n = Object::new(ObjectMeta::named(row.name.clone()), Node::default());
    let alloc = &mut n.status.allocatable;
    alloc.insert("cpu".into(), Quantity::from_milli(row.cpu_milli));
    alloc.insert("memory".into(), Quantity::from_bytes(row.memory_mib << 20));
    if row.gpus > 0 {
        alloc.insert("gpu".into(), Quantity::from_units(row.gpus as i64));
        n.metadata.labels.insert(GPU_MODEL_LABEL, row.model.clone());
        for i in 0..row.gpus {
            n.status.devices.push(Device { id: format!("gpu{i}"), resource: "gpu".into(), model: row.model.clone() });
        }
    }
    n
}

fn task_object(row: &TaskRow) -> Arc<Object<Workload>> {
    let mut w = Workload::command("main", &["task"]);
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), Quantity::from_milli(row.cpu_milli));
    requests.insert("memory".to_string(), Quantity::from_bytes(row.memory_mib << 20));
    let gpu = row.gpu_request_milli();
    if gpu > 0 {
        requests.insert("gpu".to_string(), Quantity::from_milli(gpu));
        if !row.gpu_spec.is_empty() {
            w.affinity = Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required: vec![NodeSelectorTerm {
                        match_expressions: vec![NodeSelectorRequirement {
                            key: GPU_MODEL_LABEL.into(),
                            operator: NodeSelectorOperator::In,
                            values: row.gpu_spec.clone(),
                        }],
                    }],
                    preferred: vec![],
                }),
                ..Default::default()
            });
        }
    }
    w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
    Arc::new(Object::new(ObjectMeta::namespaced("default", row.name.clone()), w))
}

/// What happens at one instant of the trace; at equal times they run in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Delete,
    Arrive,
    /// The deletion of a task that lives for an instant, right after its arrival.
    DeleteAfterArrival,
}

struct Replay {
    wall: Duration,
    tasks: usize,
    at_arrival: usize,
    placed: usize,
    total_gpu_milli: i64,
    peak_gpu_milli: i64,
}

/// The trace's events in the order they are replayed: (time in seconds, what, task index).
fn events(tasks: &[TaskRow]) -> Vec<(u64, Kind, usize)> {
    let mut events = Vec::with_capacity(2 * tasks.len());
    for (i, t) in tasks.iter().enumerate() {
        events.push((t.creation, Kind::Arrive, i));
        match t.deletion {
            None => {}
            Some(d) if d > t.creation => events.push((d, Kind::Delete, i)),
            Some(_) => events.push((t.creation, Kind::DeleteAfterArrival, i)),
        }
    }
    events.sort_unstable();
    events
}

/// Which tasks got a node, and the GPU allocation as it goes.
struct Tally<'a> {
    index: HashMap<&'a str, usize>,
    gpu_of: Vec<i64>,
    placed: Vec<bool>,
    on_node: Vec<bool>,
    at_arrival: usize,
    gpu_now: i64,
    peak: i64,
}

impl Tally<'_> {
    /// Counts what a scheduling step placed; `arrived` is the task submitted just before it.
    fn take(&mut self, core: &mut SchedulingCore, outcomes: Vec<Outcome>, arrived: Option<usize>) {
        for o in outcomes {
            let Some(&i) = self.index.get(o.workload.key.name.as_str()) else { continue };
            match o.kind {
                OutcomeKind::Bound(_) => {}
                OutcomeKind::Preempted { victims, .. } => {
                    for v in victims {
                        if let Some(&j) = self.index.get(v.info.key.name.as_str()) {
                            self.left(j);
                        }
                    }
                }
                _ => continue,
            }
            // Confirm the binding, as the scheduler service does once the store write lands.
            core.bound(&o.workload.key);
            if arrived == Some(i) {
                self.at_arrival += 1;
            }
            self.placed[i] = true;
            self.on_node[i] = true;
            self.gpu_now += self.gpu_of[i];
        }
        self.peak = self.peak.max(self.gpu_now);
    }

    /// Task `i` left its node (deleted or evicted), if it had one.
    fn left(&mut self, i: usize) {
        if std::mem::take(&mut self.on_node[i]) {
            self.gpu_now -= self.gpu_of[i];
        }
    }
}

fn replay(strategy: ScoringStrategy, nodes: &[NodeRow], tasks: &[TaskRow]) -> Replay {
    let objects: Vec<Arc<Object<Workload>>> = tasks.iter().map(task_object).collect();
    let events = events(tasks);
    let mut tally = Tally {
        index: tasks.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect(),
        gpu_of: tasks.iter().map(TaskRow::gpu_request_milli).collect(),
        placed: vec![false; tasks.len()],
        on_node: vec![false; tasks.len()],
        at_arrival: 0,
        gpu_now: 0,
        peak: 0,
    };

    let started = Instant::now();
    let mut core = SchedulingCore::new(Framework::new(default_profile(strategy)));
    for n in nodes {
        core.upsert_node(&node_object(n));
    }
    let mut last_ms = 0u64;
    for &(t, kind, i) in &events {
        let now_ms = t * 1000;
        if now_ms > last_ms + MAX_BACKOFF_MS {
            // Let every backoff expire and drain the queue before the clock jumps ahead.
            let out = core.set_time(last_ms + MAX_BACKOFF_MS);
            tally.take(&mut core, out, None);
            let out = core.run_until_idle();
            tally.take(&mut core, out, None);
        }
        last_ms = now_ms;
        let out = core.set_time(now_ms);
        tally.take(&mut core, out, None);
        match kind {
            Kind::Arrive => {
                core.upsert_workload(objects[i].clone());
                let out = core.run_until_idle();
                tally.take(&mut core, out, Some(i));
            }
            Kind::Delete | Kind::DeleteAfterArrival => {
                core.delete_workload(&ObjectRef::of(&objects[i]));
                tally.left(i);
                let out = core.run_until_idle();
                tally.take(&mut core, out, None);
            }
        }
    }
    let wall = started.elapsed();
    let total_gpu_milli: i64 = core.snapshot().nodes().map(|n| n.allocatable(GPU)).sum();
    // The running total must agree with the snapshot's own accounting.
    let in_snapshot: i64 = core.snapshot().nodes().map(|n| n.requested(GPU)).sum();
    assert_eq!(in_snapshot, tally.gpu_now, "GPU accounting drifted from the snapshot");
    Replay {
        wall,
        tasks: tasks.len(),
        at_arrival: tally.at_arrival,
        placed: tally.placed.iter().filter(|p| **p).count(),
        total_gpu_milli,
        peak_gpu_milli: tally.peak,
    }
}

/// The most GPU milli the live tasks ask for at any moment, whatever the scheduler does: the
/// ceiling of the peak allocation.
fn peak_demand_milli(tasks: &[TaskRow]) -> i64 {
    let gpu: Vec<i64> = tasks.iter().map(TaskRow::gpu_request_milli).collect();
    let (mut now, mut peak) = (0i64, 0i64);
    for (_, kind, i) in events(tasks) {
        now += if kind == Kind::Arrive { gpu[i] } else { -gpu[i] };
        peak = peak.max(now);
    }
    peak
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--test");
    let default_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/openb");
    let asked_dir = std::env::var_os("ORCH_OPENB_DIR").map(PathBuf::from);
    let asked_pods = std::env::var("ORCH_OPENB_PODS").ok();
    let (node_path, pod_path) = match orch_benches::locate_openb(asked_dir, asked_pods, &default_dir) {
        Ok(orch_benches::Trace::Found { nodes, pods }) => (nodes, pods),
        Ok(orch_benches::Trace::Absent(dir)) => {
            println!("openb trace not found at {} (set ORCH_OPENB_DIR to its folder); skipped", dir.display());
            return;
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let dir = node_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let pods = pod_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let (nodes, mut tasks) = match (read_nodes(&node_path), read_tasks(&pod_path)) {
        (Ok(n), Ok(t)) => (n, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("openb trace at {} could not be read: {e}", dir.display());
            std::process::exit(1);
        }
    };
    let gpus: usize = nodes.iter().map(|n| n.gpus).sum();
    println!("openb replay: {} nodes ({gpus} GPUs), {} tasks from {pods}", nodes.len(), tasks.len());
    let profiles = [
        ("default (LeastAllocated)", ScoringStrategy::LeastAllocated),
        ("MostAllocated (bin-packing)", ScoringStrategy::MostAllocated),
    ];
    let mut rows = Vec::new();
    for (name, strategy) in profiles {
        let mut r = replay(strategy, &nodes, &tasks);
        if quick && r.wall > TEST_BUDGET && tasks.len() > TEST_TASKS {
            println!("(--test: the full replay took {:.1?}; using the first {TEST_TASKS} tasks)", r.wall);
            tasks.truncate(TEST_TASKS);
            r = replay(strategy, &nodes, &tasks);
        }
        rows.push((name, r));
    }
    println!();
    println!(
        "GPU demand at the trace's busiest moment (every live task placed): {:.1} GPUs",
        peak_demand_milli(&tasks) as f64 / 1000.0
    );
    println!();
    println!(
        "| profile | wall time | tasks | placed at arrival | placed at all | share placed | peak GPU allocation |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.2?} | {} | {} | {} | {:.2}% | {:.1}% ({:.1} of {} GPUs) |",
            r.wall,
            r.tasks,
            r.at_arrival,
            r.placed,
            100.0 * r.placed as f64 / r.tasks.max(1) as f64,
            100.0 * r.peak_gpu_milli as f64 / r.total_gpu_milli.max(1) as f64,
            r.peak_gpu_milli as f64 / 1000.0,
            r.total_gpu_milli / 1000,
        );
    }
}
