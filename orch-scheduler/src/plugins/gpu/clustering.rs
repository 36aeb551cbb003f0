//! GPU clustering: tasks of a kind together.

use crate::framework::{Ctx, Plugin, Points};
use crate::snapshot::{GPU, NodeInfo, WHOLE_DEVICE};

use super::{GpuAsk, NodeScale, total_free};

/// The kind of GPU task for clustering: a share of one GPU, or `n` whole GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Share,
    Whole(i64),
}

fn kind_of(gpu: i64) -> Option<Kind> {
    if gpu <= 0 {
        None
    } else if gpu < WHOLE_DEVICE {
        Some(Kind::Share)
    } else {
        Some(Kind::Whole(gpu / WHOLE_DEVICE))
    }
}

/// Packs GPU tasks of the same kind (GPU share, 1 GPU, 2 GPUs, …) on the same nodes. With `u`
/// the node's used GPU share out of the biggest node's (`25 * used / max`, integer division):
/// `75 + u` when the node runs only tasks of this kind, `50 + u` when it runs this kind and
/// others, `25 + u` when it runs no GPU task, `u` when only other kinds. Cpu-only tasks score 0
/// everywhere (the tie-break decides).
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuClustering {
    scale: NodeScale,
}

impl GpuClustering {
    /// Normalises by `scale`.
    pub fn new(scale: NodeScale) -> Self {
        GpuClustering { scale }
    }
}

impl Plugin for GpuClustering {
    fn name(&self) -> &str {
        "GpuClustering"
    }
    fn points(&self) -> Points {
        Points::SCORE
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let ask = GpuAsk::of(cx.workload);
        let Some(mine) = kind_of(ask.total()) else { return 0 };
        let (mut same, mut kinds) = (false, Vec::<Kind>::new());
        for w in &node.workloads {
            if let Some(k) = kind_of(w.request(GPU)) {
                same |= k == mine;
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        let max = self.scale.gpu_milli;
        let used = 25 * (max - total_free(node)) / max;
        used + match (same, kinds.len()) {
            (true, 1) => 75,
            (true, _) => 50,
            (false, 0) => 25,
            (false, _) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::gpu::testing::{cluster, node, score, task};

    #[test]
    fn hand_worked_scores() {
        let s = cluster(
            &[
                node("empty", 8, 8, "G2"),
                node("shares", 8, 8, "G2"),
                node("mixed", 8, 8, "G2"),
                node("wholes", 8, 8, "G2"),
            ],
            &[
                (task("s1", 0, 500), 1, vec![(0, 500)]),
                (task("s2", 0, 500), 2, vec![(0, 500)]),
                (task("w2", 0, 2000), 2, vec![(1, 1000), (2, 1000)]),
                (task("w1", 0, 1000), 3, vec![(0, 1000)]),
                (task("cpu", 1000, 0), 0, vec![]),
            ],
        );
        let p = GpuClustering::default();
        let share = task("t", 0, 300);
        // used share: empty 0, shares 500 -> 25*500/8000 = 1, mixed 2500 -> 7, wholes 1000 -> 3.
        assert_eq!(score(&p, &s, &share, 0), 25, "no GPU task yet (the cpu task does not count)");
        assert_eq!(score(&p, &s, &share, 1), 75 + 1, "only shares");
        assert_eq!(score(&p, &s, &share, 2), 50 + 7, "shares among others");
        assert_eq!(score(&p, &s, &share, 3), 3, "only other kinds");
        assert_eq!(score(&p, &s, &task("one", 0, 1000), 3), 75 + 3);
        assert_eq!(score(&p, &s, &task("c", 1000, 0), 1), 0);
    }
}
