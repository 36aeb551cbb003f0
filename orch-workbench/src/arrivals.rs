//! The order tasks arrive in: the FGD paper's procedure (shuffle, then inflate with random
//! copies), or the trace's own times.

use crate::trace::Trace;

/// How a trace's tasks arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// The FGD paper's procedure: the tasks in the list's order after a shuffle with the seed;
    /// after the list, tasks drawn at random from it (with replacement) until the requested GPUs
    /// reach `inflation` times the cluster's capacity (a list already past it loses random tasks
    /// instead). Tasks never leave; a task that fits nowhere is dropped.
    Paper {
        /// Requested GPUs at the end, as a multiple of capacity (1.3 in the paper).
        inflation: f64,
    },
    /// The trace's own creation and deletion times (a task without a creation time arrives at
    /// the start, one without a deletion time stays). Deletions free their node; a task that
    /// fits nowhere when it arrives is dropped. No shuffle, no inflation: the seed only changes
    /// the policies' draws and tie-breaks.
    TraceTimes,
}

impl Default for Arrivals {
    fn default() -> Self {
        Arrivals::Paper { inflation: 1.3 }
    }
}

/// One arrival: which task of the trace, and the name this copy goes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// Index into [`Trace::tasks`].
    pub task: usize,
    /// The original's name, or `<name>-copy-<n>` for the n-th drawn copy.
    pub name: String,
}

/// A small, fixed pseudo-random generator (SplitMix64): the same seed gives the same sequence on
/// every platform and in every version of the workbench.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A sequence from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform index below `n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Shuffles `items` (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// The arrivals of the paper's procedure for `seed`: the tasks shuffled, then random copies
/// until the requested GPUs would pass `inflation` x capacity (the draw that would pass it is
/// dropped and the list ends).
pub fn paper_order(trace: &Trace, seed: u64, inflation: f64) -> Vec<Arrival> {
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..trace.tasks.len()).collect();
    rng.shuffle(&mut order);
    let target = inflation * trace.gpu_capacity_milli() as f64;
    let mut requested = trace.gpu_requested_milli();
    if requested as f64 > target {
        // Past the target already: random tasks leave until it is met.
        while requested as f64 > target && !order.is_empty() {
            let i = rng.below(order.len());
            requested -= trace.tasks[order[i]].gpu_total();
            order.remove(i);
        }
    }
    let mut arrivals: Vec<Arrival> =
        order.iter().map(|&task| Arrival { task, name: trace.tasks[task].name.clone() }).collect();
    if trace.tasks.is_empty() || trace.gpu_requested_milli() == 0 {
        // Copies would never add GPUs: nothing to inflate.
        return arrivals;
    }
    let mut copy = 0;
    loop {
        let task = rng.below(trace.tasks.len());
        let gpu = trace.tasks[task].gpu_total();
        if (requested + gpu) as f64 > target {
            break;
        }
        requested += gpu;
        arrivals.push(Arrival { task, name: format!("{}-copy-{copy}", trace.tasks[task].name) });
        copy += 1;
    }
    arrivals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{NodeRow, TaskRow};

    fn trace(gpus: &[i64]) -> Trace {
        Trace {
            nodes: vec![NodeRow { name: "n".into(), cpu_milli: 1000, memory_mib: 1, gpus: 10, model: "T4".into() }],
            tasks: gpus
                .iter()
                .enumerate()
                .map(|(i, &g)| TaskRow {
                    name: format!("t{i}"),
                    cpu_milli: 1,
                    memory_mib: 1,
                    num_gpu: if g == 0 {
                        0
                    } else if g < 1000 {
                        1
                    } else {
                        (g / 1000) as u32
                    },
                    gpu_milli: if g == 0 { 0 } else { g.min(1000) },
                    gpu_spec: vec![],
                    creation: None,
                    deletion: None,
                })
                .collect(),
            name: "t".into(),
        }
    }

    #[test]
    fn shuffles_then_inflates_to_the_target_and_is_fixed_by_the_seed() {
        let t = trace(&[500, 1000, 2000, 0, 300]);
        let a = paper_order(&t, 42, 1.3);
        // Capacity 10 GPUs: target 13 GPUs; the list asks 3.8.
        let originals: Vec<usize> = a.iter().take(5).map(|x| x.task).collect();
        let mut sorted = originals.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3, 4], "every task once, first");
        let requested: i64 = a.iter().map(|x| t.tasks[x.task].gpu_total()).sum();
        assert!(requested <= 13_000 && requested > 13_000 - 2000, "{requested}");
        assert!(a[5..].iter().all(|x| x.name.contains("-copy-")));
        assert_eq!(a, paper_order(&t, 42, 1.3), "same seed, same order");
        assert_ne!(a, paper_order(&t, 43, 1.3), "another seed, another order");
    }

    #[test]
    fn a_list_past_the_target_loses_random_tasks() {
        let t = trace(&[1000; 20]);
        let a = paper_order(&t, 1, 1.3);
        assert_eq!(a.len(), 13, "20 GPUs asked of 10, target 13");
    }
}
