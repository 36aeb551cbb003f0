//! Best-fit: the node with the least left over.

use crate::framework::{Ctx, MAX_SCORE, Plugin, Points};
use crate::snapshot::{CPU, NodeInfo};

use super::{GpuAsk, NodeScale, total_free};

/// Scores `100 * (1 - (cpu left / max cpu + GPU left / max GPU) / 2)` after placing, truncated,
/// then rescales the scores of the feasible nodes to 0..=100 (`(s - lowest) * 100 / (highest -
/// lowest)`, integer division; all 0 when they are equal), as the simulator does.
#[derive(Debug, Clone, Copy, Default)]
pub struct BestFit {
    scale: NodeScale,
}

impl BestFit {
    /// Normalises by `scale`.
    pub fn new(scale: NodeScale) -> Self {
        BestFit { scale }
    }
}

impl Plugin for BestFit {
    fn name(&self) -> &str {
        "BestFit"
    }
    fn points(&self) -> Points {
        Points::SCORE | Points::NORMALIZE
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let ask = GpuAsk::of(cx.workload);
        let free = [node.free(CPU) as f64, total_free(node) as f64];
        let req = [ask.cpu as f64, ask.total() as f64];
        let max = [self.scale.cpu_milli as f64, self.scale.gpu_milli as f64];
        let mut left = 0.0;
        for i in 0..2 {
            left += (free[i] - req[i]) / max[i] * 0.5;
        }
        ((1.0 - left) * MAX_SCORE as f64) as i64
    }
    fn normalize(&self, _: &Ctx<'_>, scores: &mut [i64]) {
        let (Some(&lo), Some(&hi)) = (scores.iter().min(), scores.iter().max()) else { return };
        for s in scores.iter_mut() {
            *s = if hi == lo { 0 } else { (*s - lo) * MAX_SCORE / (hi - lo) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::gpu::testing::{cluster, node, score, task};

    #[test]
    fn hand_worked_scores_and_normalizing() {
        let s = cluster(&[node("big", 128, 8, "G3"), node("small", 16, 2, "P100")], &[]);
        let p = BestFit::default();
        let w = task("w", 8000, 1000);
        // big: (120000/128000 + 7000/8000) / 2 = 0.90625 -> 100 * 0.09375 = 9.375 -> 9.
        assert_eq!(score(&p, &s, &w, 0), 9);
        // small: (8000/128000 + 1000/8000) / 2 = 0.09375 -> 90.625 -> 90.
        assert_eq!(score(&p, &s, &w, 1), 90);
        let cx = Ctx { snapshot: &s, workload: &w, state: None };
        let mut scores = [9, 90, 40];
        p.normalize(&cx, &mut scores);
        assert_eq!(scores, [0, 100, 38], "(40 - 9) * 100 / 81 = 38");
        let mut same = [7, 7];
        p.normalize(&cx, &mut same);
        assert_eq!(same, [0, 0]);
    }
}
