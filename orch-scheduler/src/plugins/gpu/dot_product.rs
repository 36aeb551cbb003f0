//! Dot-product (Tetris-style alignment, as the FGD simulator scores it).

use crate::framework::{Ctx, MAX_SCORE, Plugin, Points};
use crate::snapshot::{CPU, NodeInfo};

use super::{GpuAsk, NodeScale, total_free};

/// Scores `100 * (1 - (free . request) / 2)`, truncated, where `free` is the node's free
/// (cpu, GPU in all) and `request` the workload's, both divided by the biggest node's: the node
/// whose free resources align least with the request wins. (The simulator's direction, the
/// reverse of Tetris' "most aligned"; its GPU dimension merges the devices into one number.)
#[derive(Debug, Clone, Copy, Default)]
pub struct DotProduct {
    scale: NodeScale,
}

impl DotProduct {
    /// Normalises by `scale`.
    pub fn new(scale: NodeScale) -> Self {
        DotProduct { scale }
    }
}

impl Plugin for DotProduct {
    fn name(&self) -> &str {
        "DotProduct"
    }
    fn points(&self) -> Points {
        Points::SCORE
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let ask = GpuAsk::of(cx.workload);
        let (cpu, gpu) = (self.scale.cpu_milli as f64, self.scale.gpu_milli as f64);
        let node_vec = [node.free(CPU) as f64 / cpu, total_free(node) as f64 / gpu];
        let ask_vec = [ask.cpu as f64 / cpu, ask.total() as f64 / gpu];
        let dot = node_vec[0] * ask_vec[0] + node_vec[1] * ask_vec[1];
        let score = 1.0 - dot / 2.0;
        (MAX_SCORE as f64 * score) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::gpu::testing::{cluster, node, score, task};

    #[test]
    fn hand_worked_scores() {
        // Node 0: 64 cores, 8 GPUs free; node 1: 32 cores and 2 GPUs free (a 32-core, 6-GPU task on it).
        let s = cluster(
            &[node("a", 64, 8, "G2"), node("b", 64, 8, "G2")],
            &[(task("x", 32_000, 6000), 1, vec![(0, 1000), (1, 1000), (2, 1000), (3, 1000), (4, 1000), (5, 1000)])],
        );
        let p = DotProduct::default();
        let w = task("w", 16_000, 1000);
        // a: (0.5, 1) . (0.125, 0.125) = 0.1875; 1 - 0.09375 = 0.90625 -> 90.
        assert_eq!(score(&p, &s, &w, 0), 90);
        // b: (0.25, 0.25) . (0.125, 0.125) = 0.0625; 1 - 0.03125 -> 96: the emptier node loses.
        assert_eq!(score(&p, &s, &w, 1), 96);
    }
}
