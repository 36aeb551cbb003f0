//! The fragmentation measure of the FGD paper: how much of a node's free GPU share the tasks
//! that typically arrive could not use.

use std::cmp::Ordering;

use crate::snapshot::{CPU, NodeInfo};

/// A task shape: what one kind of task asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Milli-cores.
    pub cpu_milli: i64,
    /// Milli-GPU on each device (1000 for whole devices; 0 for cpu-only tasks).
    pub gpu_milli: i64,
    /// Devices (0 for cpu-only tasks).
    pub gpus: u32,
    /// GPU models it accepts, in the order the trace lists them; empty: any.
    pub models: Vec<String>,
}

impl Shape {
    /// Whether a node of GPU model `model` is one this shape accepts.
    pub fn accepts(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// The simulator's order among shapes of equal count: the larger shape first, comparing
    /// cpu, per-device GPU share, devices and the models (joined by `|`) in that order.
    fn size_order(&self, other: &Shape) -> Ordering {
        (self.cpu_milli, self.gpu_milli, self.gpus)
            .cmp(&(other.cpu_milli, other.gpu_milli, other.gpus))
            .then_with(|| self.models.join("|").cmp(&other.models.join("|")))
    }
}

/// The workload a cluster expects: task shapes with their frequencies (summing to 1). FGD
/// scores against it, and the fragmentation measure is defined by it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TargetWorkload {
    shapes: Vec<(Shape, f64)>,
}

impl TargetWorkload {
    /// Shapes with weights, renormalised to sum to 1 (shapes with weight <= 0 are dropped).
    pub fn new(shapes: impl IntoIterator<Item = (Shape, f64)>) -> Self {
        let shapes: Vec<(Shape, f64)> = shapes.into_iter().filter(|(_, w)| *w > 0.0 && w.is_finite()).collect();
        let sum: f64 = shapes.iter().map(|(_, w)| w).sum();
        TargetWorkload { shapes: shapes.into_iter().map(|(s, w)| (s, w / sum)).collect() }
    }

    /// The typical shapes of observed tasks, as the paper takes them: shapes by how many tasks
    /// had them, most frequent first (equal counts: larger shape first), taken until they
    /// cover `coverage` (0.95 in the paper) of the tasks, the one that crosses it included;
    /// frequencies renormalised over the shapes kept.
    pub fn typical(counts: impl IntoIterator<Item = (Shape, u64)>, coverage: f64) -> Self {
        let mut counts: Vec<(Shape, u64)> = counts.into_iter().filter(|(_, n)| *n > 0).collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.size_order(&a.0)));
        let total: u64 = counts.iter().map(|(_, n)| n).sum();
        let mut kept = Vec::new();
        let mut covered = 0u64;
        for (shape, n) in counts {
            if total > 0 && covered as f64 >= coverage * total as f64 {
                break;
            }
            covered += n;
            kept.push((shape, n as f64));
        }
        TargetWorkload::new(kept)
    }

    /// The shapes with their frequencies.
    pub fn shapes(&self) -> &[(Shape, f64)] {
        &self.shapes
    }

    /// Whether no shape is known (every node's fragmentation is then 0).
    pub fn is_empty(&self) -> bool {
        self.shapes.is_empty()
    }

    /// The node's fragmentation in milli-GPU: for each shape, weighted by its frequency, the free
    /// GPU share on devices that cannot hold the shape's per-device share when the shape fits
    /// the node (cpu, model, enough such devices), else all of the node's free GPU share
    /// (cpu-only shapes always count all of it: they can use none).
    pub fn node_frag(&self, node: &NodeInfo) -> f64 {
        let mut free = [0i64; 16];
        if node.devices.len() <= free.len() {
            for (f, d) in free.iter_mut().zip(&node.devices) {
                *f = d.free;
            }
            return self.frag(node.free(CPU), &free[..node.devices.len()], node_model(node));
        }
        let free: Vec<i64> = node.devices.iter().map(|d| d.free).collect();
        self.frag(node.free(CPU), &free, node_model(node))
    }

    /// [`node_frag`](Self::node_frag) of a node with `cpu_free` milli-cores, devices with
    /// `free` milli-GPU each, of GPU model `model`.
    pub fn frag(&self, cpu_free: i64, free: &[i64], model: &str) -> f64 {
        let total: i64 = free.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let mut sum = 0.0;
        for (shape, p) in &self.shapes {
            let f = if shape.gpus == 0 || cpu_free < shape.cpu_milli || !shape.accepts(model) {
                total
            } else {
                let (mut fit, mut small) = (0u32, 0i64);
                for &g in free {
                    if g >= shape.gpu_milli {
                        fit += 1;
                    } else {
                        small += g;
                    }
                }
                if fit >= shape.gpus { small } else { total }
            };
            sum += p * f as f64;
        }
        sum
    }
}

/// The node's GPU model (of its first device; nodes carry one model).
pub(crate) fn node_model(node: &NodeInfo) -> &str {
    node.devices.first().map_or("", |d| d.model.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::gpu::testing::{at, cluster, node, task};
    use proptest::prelude::*;

    fn shape(cpu: i64, milli: i64, gpus: u32) -> Shape {
        Shape { cpu_milli: cpu, gpu_milli: milli, gpus, models: vec![] }
    }

    #[test]
    fn typical_shapes_cover_the_threshold_and_renormalise() {
        let counts =
            vec![(shape(1000, 500, 1), 50), (shape(2000, 1000, 1), 30), (shape(4000, 0, 0), 15), (shape(1, 1, 1), 5)];
        let t = TargetWorkload::typical(counts, 0.95);
        // 50 + 30 = 80% < 95%, + 15 = 95%: the third is in, the fourth is not.
        assert_eq!(t.shapes().len(), 3);
        assert!((t.shapes()[0].1 - 50.0 / 95.0).abs() < 1e-12);
        assert!((t.shapes().iter().map(|s| s.1).sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn equal_counts_put_the_larger_shape_first() {
        let t = TargetWorkload::typical(vec![(shape(1000, 500, 1), 10), (shape(3000, 500, 1), 10)], 0.5);
        assert_eq!(t.shapes().len(), 1);
        assert_eq!(t.shapes()[0].0.cpu_milli, 3000);
    }

    #[test]
    fn hand_worked_node() {
        // 4 GPUs with 1000, 600, 300, 0 free; 8 cores free of 16.
        let n = node("n", 16, 4, "T4");
        let s = cluster(
            &[n],
            &[
                (task("a", 8000, 400), 0, vec![(1, 400)]),
                (task("b", 0, 700), 0, vec![(2, 700)]),
                (task("c", 0, 1000), 0, vec![(3, 1000)]),
            ],
        );
        let t = TargetWorkload::new(vec![
            (shape(1000, 500, 1), 0.5),   // fits: the 300 can't hold 500 -> 300
            (shape(1000, 1000, 2), 0.25), // only one whole device -> doesn't fit -> 1900
            (shape(1000, 0, 0), 0.125),   // cpu only -> 1900
            (Shape { cpu_milli: 1000, gpu_milli: 200, gpus: 1, models: vec!["V100".into()] }, 0.125), // wrong model -> 1900
        ]);
        let want = 0.5 * 300.0 + 0.25 * 1900.0 + 0.125 * 1900.0 + 0.125 * 1900.0;
        assert!((t.node_frag(at(&s, 0)) - want).abs() < 1e-9, "{} != {want}", t.node_frag(at(&s, 0)));
        // Without the cpu for the first shape, all of it counts.
        let t2 = TargetWorkload::new(vec![(shape(9000, 500, 1), 1.0)]);
        assert_eq!(t2.node_frag(at(&s, 0)), 1900.0);
    }

    /// Brute force, straight from the definition: a shape fits the node when some set of
    /// `gpus` distinct devices can each hold its per-device share (tried over every subset) and
    /// the cpu and model allow it; then the fragment is the free share of each device that cannot
    /// hold that share on its own, else everything free.
    fn brute(shapes: &[(Shape, f64)], cpu_free: i64, free: &[i64], model: &str) -> f64 {
        let total: i64 = free.iter().sum();
        let mut sum = 0.0;
        for (s, p) in shapes {
            let fits_gpu = s.gpus > 0
                && (0u32..(1 << free.len())).any(|set| {
                    set.count_ones() == s.gpus
                        && (0..free.len()).filter(|i| set & (1 << i) != 0).all(|i| free[i] >= s.gpu_milli)
                });
            let fits = fits_gpu && cpu_free >= s.cpu_milli && s.accepts(model);
            let f: i64 = if fits { free.iter().filter(|&&g| g < s.gpu_milli).sum() } else { total };
            sum += p * f as f64;
        }
        sum
    }

    proptest! {
        #[test]
        fn frag_matches_brute_force(
            free in proptest::collection::vec(prop_oneof![Just(0i64), Just(1000i64), 0i64..=1000], 0..=8),
            cpu_free in 0i64..20_000,
            raw in proptest::collection::vec((0i64..20_000, 0i64..=1000, 0u32..=4, 0u8..3, 1u32..10), 1..8),
            model in prop_oneof![Just("A"), Just("B")],
        ) {
            let shapes: Vec<(Shape, f64)> = raw
                .into_iter()
                .map(|(cpu, milli, gpus, m, w)| {
                    let (milli, gpus) = if gpus == 0 || milli == 0 { (0, 0) } else if gpus > 1 { (1000, gpus) } else { (milli, 1) };
                    let models = match m { 0 => vec![], 1 => vec!["A".to_string()], _ => vec!["B".to_string(), "C".to_string()] };
                    (Shape { cpu_milli: cpu, gpu_milli: milli, gpus, models }, w as f64)
                })
                .collect();
            let t = TargetWorkload::new(shapes);
            let fast = t.frag(cpu_free, &free, model);
            let slow = brute(t.shapes(), cpu_free, &free, model);
            prop_assert!((fast - slow).abs() < 1e-6, "fast {} brute {}", fast, slow);
        }
    }
}
