//! One experiment: a trace replayed with one policy and one seed through orch's scheduling core
//! (the same [`SchedulingCore`] and plugin [`Framework`] the scheduler service runs), measured
//! at every arrival.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orch_core::kinds::{
    Affinity, Device, Node, NodeAffinity, NodeSelectorOperator, NodeSelectorRequirement, NodeSelectorTerm,
    ResourceRequirements, Workload,
};
use orch_core::{Object, ObjectMeta, ObjectRef, Quantity};
use orch_scheduler::core::OutcomeKind;
use orch_scheduler::plugins::gpu::{GPU_MODEL_LABEL, NodeScale, TargetWorkload};
use orch_scheduler::{Framework, SchedulingCore};

use crate::arrivals::{Arrival, Arrivals, paper_order};
use crate::policy::Policy;
use crate::trace::{NodeRow, TaskRow, Trace};

/// Namespace of the replayed tasks.
pub const NAMESPACE: &str = "default";

/// The share of tasks the typical shapes cover, as in the paper.
pub const TYPICAL_COVERAGE: f64 = 0.95;

/// A node of the trace as orch's `Node`: allocatable `cpu`, `memory`, `gpu`, one device per GPU
/// (`gpu0`, `gpu1`…) with its model, and the [`GPU_MODEL_LABEL`] label.
pub fn node_object(row: &NodeRow) -> Object<Node> {
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
    n.status.capacity = n.status.allocatable.clone();
    n
}

/// A task of the trace as orch's `Workload` named `name`: requests `cpu`, `memory` and `gpu`
/// (`gpu_milli` milli-GPU for a share, else `num_gpu` whole GPUs), and, for a GPU task with a
/// `gpu_spec`, a required node affinity on [`GPU_MODEL_LABEL`].
pub fn task_object(row: &TaskRow, name: &str) -> Object<Workload> {
    let mut w = Workload::command("main", &["task"]);
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), Quantity::from_milli(row.cpu_milli));
    requests.insert("memory".to_string(), Quantity::from_bytes(row.memory_mib << 20));
    if row.gpu_total() > 0 {
        requests.insert("gpu".to_string(), Quantity::from_milli(row.gpu_total()));
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
    Object::new(ObjectMeta::namespaced(NAMESPACE, name), w)
}

/// The cluster after one arrival (and the deletions before it).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Step {
    /// GPUs asked for by every arrival so far, placed or dropped, milli-GPU.
    pub arrived_milli: i64,
    /// GPUs allocated, milli-GPU.
    pub allocated_milli: i64,
    /// The cluster's fragmentation (the paper's measure, over the typical shapes), milli-GPU.
    pub frag_milli: f64,
    /// Tasks placed so far, by [`TaskKind`](crate::TaskKind) (cpu, share, whole).
    pub placed: [u32; 3],
    /// Tasks dropped so far (fit nowhere), by [`TaskKind`](crate::TaskKind).
    pub failed: [u32; 3],
    /// Nodes running at least one task.
    pub used_nodes: u32,
    /// Cpu allocated, milli-cores.
    pub cpu_allocated_milli: i64,
    /// The arrival's time in the trace (trace-time replays only).
    pub time: Option<u64>,
}

/// Where one arrival went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The task's name (copies: `<name>-copy-<n>`).
    pub task: String,
    /// Its node, or `None` when it fit nowhere and was dropped.
    pub node: Option<String>,
    /// The device ids of its GPU shares (`gpu0`…), with milli-GPU each.
    pub devices: Vec<(String, i64)>,
}

/// What one experiment measured.
#[derive(Debug, Clone)]
pub struct Run {
    /// The policy.
    pub policy: Policy,
    /// The seed.
    pub seed: u64,
    /// The cluster after each arrival.
    pub steps: Vec<Step>,
    /// Where each arrival went, in arrival order.
    pub placements: Vec<Placed>,
    /// GPU capacity of the cluster, milli-GPU.
    pub gpu_capacity_milli: i64,
    /// Cpu capacity of the cluster, milli-cores.
    pub cpu_capacity_milli: i64,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Decisions the scheduling core refused (a policy that broke an invariant); 0 when all is
    /// well.
    pub refused: usize,
    /// Wall time of the replay (building the cluster and the tasks included, reading the trace
    /// not).
    pub wall: Duration,
}

/// One replay: a trace, a policy, a seed, and how the tasks arrive.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// The trace.
    pub trace: Arc<Trace>,
    /// The policy.
    pub policy: Policy,
    /// The seed (arrival order, random draws, tie-breaks).
    pub seed: u64,
    /// How tasks arrive.
    pub arrivals: Arrivals,
    /// The typical task shapes (FGD's target and the fragmentation measure).
    pub target: Arc<TargetWorkload>,
    /// What the policies normalise by: the biggest node of the trace.
    pub scale: NodeScale,
}

impl Experiment {
    /// `policy` on `trace` with `seed`, the paper's arrivals (inflation 1.3), the typical shapes
    /// covering 95% of the trace's tasks.
    pub fn new(trace: Arc<Trace>, policy: Policy, seed: u64) -> Self {
        let target = Arc::new(trace.typical_shapes(TYPICAL_COVERAGE));
        let scale = NodeScale {
            cpu_milli: trace.nodes.iter().map(|n| n.cpu_milli).max().unwrap_or(1).max(1),
            gpu_milli: trace.nodes.iter().map(|n| n.gpus as i64 * 1000).max().unwrap_or(1000).max(1000),
        };
        Experiment { trace, policy, seed, arrivals: Arrivals::default(), target, scale }
    }

    /// Changes how tasks arrive.
    pub fn arrivals(mut self, arrivals: Arrivals) -> Self {
        self.arrivals = arrivals;
        self
    }

    /// Uses these typical shapes (shared between experiments of one trace).
    pub fn target(mut self, target: Arc<TargetWorkload>) -> Self {
        self.target = target;
        self
    }

    /// The arrivals, in order: (arrival, its time, the index of the task it deletes first).
    fn events(&self) -> Vec<Event> {
        match self.arrivals {
            Arrivals::Paper { inflation } => paper_order(&self.trace, self.seed, inflation)
                .into_iter()
                .map(|a| Event { arrival: a, time: None, leaves_at: None })
                .collect(),
            Arrivals::TraceTimes => self
                .trace
                .tasks
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let at = t.creation.unwrap_or(0);
                    Event {
                        arrival: Arrival { task: i, name: t.name.clone() },
                        time: Some(at),
                        // A task that leaves no later than it arrives lives for an instant.
                        leaves_at: t.deletion.map(|d| d.max(at)),
                    }
                })
                .collect(),
        }
    }

    /// Runs the replay.
    pub fn run(&self) -> Run {
        self.run_with(&mut |_, _| {})
    }

    /// Runs the replay, calling `progress(done, total)` every few hundred arrivals.
    pub fn run_with(&self, progress: &mut dyn FnMut(usize, usize)) -> Run {
        let started = Instant::now();
        let profile = self.policy.profile(self.seed, &self.target, self.scale);
        // Room for every task class of a trace (openb's variants have up to ~460).
        let mut core = SchedulingCore::new(Framework::new(profile).with_class_capacity(1024));
        // By name, as the scheduler service takes them in: slots, and so tie-breaks, agree.
        let mut nodes: Vec<&NodeRow> = self.trace.nodes.iter().collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        for n in &nodes {
            core.upsert_node(&node_object(n));
        }
        let slots = core.snapshot().slots();
        let mut frag = vec![0.0f64; slots];
        let mut tasks_on = vec![0u32; slots];
        let mut step = Step::default();
        for n in core.snapshot().nodes() {
            frag[n.id as usize] = self.target.node_frag(n);
            step.frag_milli += frag[n.id as usize];
        }
        let events = self.events();
        let mut order: Vec<usize> = (0..events.len()).collect();
        if matches!(self.arrivals, Arrivals::TraceTimes) {
            order.sort_by_key(|&i| (events[i].time, i));
        }
        // Departures still to come: (time, arrival index).
        let mut leaving: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> = Default::default();
        let mut where_is: Vec<Option<(u32, i64, i64)>> = vec![None; events.len()];
        let mut run = Run {
            policy: self.policy,
            seed: self.seed,
            steps: Vec::with_capacity(events.len()),
            placements: Vec::with_capacity(events.len()),
            gpu_capacity_milli: self.trace.gpu_capacity_milli(),
            cpu_capacity_milli: self.trace.nodes.iter().map(|n| n.cpu_milli).sum(),
            nodes: self.trace.nodes.len(),
            refused: 0,
            wall: Duration::ZERO,
        };
        let total = order.len();
        for (done, &e) in order.iter().enumerate() {
            if done % 256 == 0 {
                progress(done, total);
            }
            let ev = &events[e];
            // Departures due by now leave first.
            while let Some(std::cmp::Reverse((t, j))) = leaving.peek().copied() {
                if ev.time.is_none_or(|now| t > now) {
                    break;
                }
                leaving.pop();
                let key = ObjectRef { namespace: NAMESPACE.into(), name: events[j].arrival.name.clone() };
                core.delete_workload(&key);
                if let Some((slot, gpu, cpu)) = where_is[j].take() {
                    let s = slot as usize;
                    step.allocated_milli -= gpu;
                    step.cpu_allocated_milli -= cpu;
                    tasks_on[s] -= 1;
                    if tasks_on[s] == 0 {
                        step.used_nodes -= 1;
                    }
                    self.refresh_frag(&core, slot, &mut frag, &mut step);
                }
            }
            let row = &self.trace.tasks[ev.arrival.task];
            let kind = row.kind().index();
            let object = Arc::new(task_object(row, &ev.arrival.name));
            let key = ObjectRef::of(&object);
            step.arrived_milli += row.gpu_total();
            step.time = ev.time;
            core.upsert_workload(object);
            let mut placed = None;
            for o in core.run_until_idle() {
                match o.kind {
                    OutcomeKind::Bound(p) if o.workload.key == key => placed = Some(p),
                    OutcomeKind::Refused(_) => run.refused += 1,
                    _ => {}
                }
            }
            match placed {
                Some(p) => {
                    core.bound(&key);
                    let node = core.snapshot().node(p.node);
                    run.placements.push(Placed {
                        task: ev.arrival.name.clone(),
                        node: Some(p.node_name.to_string()),
                        devices: p
                            .devices
                            .iter()
                            .map(|d| {
                                let id = node.and_then(|n| n.devices.get(d.device as usize)).map(|x| x.id.clone());
                                (id.unwrap_or_default(), d.milli)
                            })
                            .collect(),
                    });
                    step.placed[kind] += 1;
                    step.allocated_milli += row.gpu_total();
                    step.cpu_allocated_milli += row.cpu_milli;
                    let s = p.node as usize;
                    if tasks_on[s] == 0 {
                        step.used_nodes += 1;
                    }
                    tasks_on[s] += 1;
                    self.refresh_frag(&core, p.node, &mut frag, &mut step);
                    where_is[e] = Some((p.node, row.gpu_total(), row.cpu_milli));
                    if let Some(t) = ev.leaves_at {
                        leaving.push(std::cmp::Reverse((t, e)));
                    }
                }
                None => {
                    // Dropped, not retried.
                    core.delete_workload(&key);
                    step.failed[kind] += 1;
                    run.placements.push(Placed { task: ev.arrival.name.clone(), node: None, devices: Vec::new() });
                }
            }
            run.steps.push(step);
        }
        progress(total, total);
        run.wall = started.elapsed();
        run
    }

    fn refresh_frag(&self, core: &SchedulingCore, slot: u32, frag: &mut [f64], step: &mut Step) {
        let s = slot as usize;
        let now = core.snapshot().node(slot).map_or(0.0, |n| self.target.node_frag(n));
        step.frag_milli += now - frag[s];
        frag[s] = now;
    }
}

struct Event {
    arrival: Arrival,
    time: Option<u64>,
    leaves_at: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::NodeRow;

    fn small() -> Arc<Trace> {
        let nodes = (0..6)
            .map(|i| NodeRow {
                name: format!("node-{i}"),
                cpu_milli: 32_000,
                memory_mib: 65_536,
                gpus: if i % 3 == 0 { 8 } else { 2 },
                model: if i % 2 == 0 { "T4".into() } else { "V100".into() },
            })
            .collect();
        let shapes: [(i64, u32, i64, &str); 6] = [
            (4000, 1, 500, ""),
            (8000, 1, 1000, ""),
            (2000, 0, 0, ""),
            (4000, 1, 250, "T4"),
            (12000, 2, 1000, ""),
            (1000, 1, 700, ""),
        ];
        let tasks = (0..60)
            .map(|i| {
                let (cpu, num, milli, spec) = shapes[i * 7 % shapes.len()];
                TaskRow {
                    name: format!("task-{i:03}"),
                    cpu_milli: cpu,
                    memory_mib: 1024,
                    num_gpu: num,
                    gpu_milli: milli,
                    gpu_spec: if spec.is_empty() { vec![] } else { vec![spec.to_string()] },
                    creation: Some(i as u64 * 10),
                    deletion: Some(i as u64 * 10 + 95),
                }
            })
            .collect();
        Arc::new(Trace { nodes, tasks, name: "small".into() })
    }

    #[test]
    fn metrics_add_up() {
        let trace = small();
        for policy in Policy::ALL {
            let run = Experiment::new(trace.clone(), policy, 7).run();
            assert_eq!(run.refused, 0);
            let last = run.steps.last().unwrap();
            assert_eq!(run.steps.len(), run.placements.len());
            // Capacity 24 GPUs; the list asks 44.5, so random tasks leave until at most 1.3 x
            // capacity remains (the last one to leave asked at most 2 GPUs).
            assert_eq!(run.gpu_capacity_milli, 24_000);
            assert!(last.arrived_milli <= 31_200 && last.arrived_milli > 31_200 - 2000, "{}", last.arrived_milli);
            let placed: u32 = last.placed.iter().sum();
            let failed: u32 = last.failed.iter().sum();
            assert_eq!((placed + failed) as usize, run.steps.len());
            assert_eq!(run.placements.iter().filter(|p| p.node.is_some()).count(), placed as usize);
            let gpu: i64 = run
                .placements
                .iter()
                .filter(|p| p.node.is_some())
                .map(|p| p.devices.iter().map(|d| d.1).sum::<i64>())
                .sum();
            assert_eq!(gpu, last.allocated_milli, "{policy}: device shares add up to the allocation");
            assert!(last.allocated_milli <= run.gpu_capacity_milli);
            assert!(
                last.frag_milli >= 0.0
                    && last.frag_milli <= (run.gpu_capacity_milli - last.allocated_milli) as f64 + 1e-6
            );
            assert!(failed > 0, "{policy}: 130% of capacity cannot all fit");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_run_and_another_seed_another() {
        let trace = small();
        for policy in Policy::ALL {
            let a = Experiment::new(trace.clone(), policy, 1).run();
            let b = Experiment::new(trace.clone(), policy, 1).run();
            assert_eq!(a.placements, b.placements, "{policy}");
            assert_eq!(a.steps, b.steps, "{policy}");
            let c = Experiment::new(trace.clone(), policy, 2).run();
            assert_ne!(a.placements, c.placements, "{policy}");
        }
    }

    #[test]
    fn trace_times_free_nodes_when_tasks_leave() {
        let trace = small();
        let run = Experiment::new(trace.clone(), Policy::BestFit, 3).arrivals(Arrivals::TraceTimes).run();
        assert_eq!(run.steps.len(), trace.tasks.len(), "no inflation");
        // Each task lives 95 s and one arrives every 10 s: at most 10 at once.
        let placed: Vec<&Placed> = run.placements.iter().filter(|p| p.node.is_some()).collect();
        assert_eq!(placed.len(), trace.tasks.len(), "with departures, everything fits");
        let most = run.steps.iter().map(|s| s.allocated_milli).max().unwrap();
        let last = run.steps.last().unwrap();
        assert!(last.allocated_milli < last.arrived_milli, "departures freed GPUs");
        assert!(most <= 10 * 2000, "{most}");
        assert_eq!(run.steps[5].time, Some(50));
    }
}
