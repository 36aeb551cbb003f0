//! GPU packing: fill used GPUs, then used nodes, then new nodes.

use crate::framework::{Ctx, Plugin, Points};
use crate::snapshot::{NodeInfo, WHOLE_DEVICE};

use super::GpuAsk;

/// Prefers, for a GPU task: a partly used GPU that can hold it (`100 - free/100` of the devices
/// it would take, at least 50: 90 to 100, tighter is better), else free GPUs on a node already
/// in use (`50 - free GPUs taken`, at least 33), else a node with no GPU in use
/// (`33 - its GPUs`: smaller nodes first). Devices are taken tightest first (the tightest fit
/// then hands them out the same way). Cpu-only tasks score 0 everywhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuPacking;

impl Plugin for GpuPacking {
    fn name(&self) -> &str {
        "GpuPacking"
    }
    fn points(&self) -> Points {
        Points::SCORE
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        let ask = GpuAsk::of(cx.workload);
        if ask.count == 0 {
            return 0;
        }
        let gpus = node.devices.len() as i64;
        let whole_free = node.devices.iter().filter(|d| d.free == WHOLE_DEVICE).count() as i64;
        if whole_free == gpus {
            return (100 / 3 - whole_free).max(whole_free);
        }
        // Devices by free share, ascending, stable: the tightest that hold the per-device share.
        let mut order: Vec<usize> = (0..node.devices.len()).collect();
        order.sort_by_key(|&i| node.devices[i].free);
        let mut want = ask.count;
        let (mut taken_whole, mut free_pct) = (0i64, 0i64);
        for i in order {
            if want == 0 {
                break;
            }
            let free = node.devices[i].free;
            if ask.milli <= free {
                want -= 1;
                if free == WHOLE_DEVICE {
                    taken_whole += 1;
                }
                free_pct += free * 100 / WHOLE_DEVICE;
            }
        }
        if taken_whole > 0 {
            return (100 / 2 - taken_whole).max(100 / 3);
        }
        (100 - free_pct / 10).max(100 / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::gpu::testing::{cluster, node, score, task};

    #[test]
    fn hand_worked_scores() {
        let s = cluster(
            &[node("fresh8", 8, 8, "G2"), node("fresh2", 8, 2, "T4"), node("used", 8, 4, "T4")],
            // On "used": device 0 has 350 free, device 1 has 800 free, devices 2, 3 whole.
            &[(task("a", 0, 650), 2, vec![(0, 650)]), (task("b", 0, 200), 2, vec![(1, 200)])],
        );
        let p = GpuPacking;
        let share = task("t", 0, 300);
        assert_eq!(score(&p, &s, &share, 0), 33 - 8, "untouched 8-GPU node");
        assert_eq!(score(&p, &s, &share, 1), 33 - 2, "untouched 2-GPU node: smaller first");
        // The tightest device holding 300 is device 0 (350 free): 100 - 35/10 = 97.
        assert_eq!(score(&p, &s, &share, 2), 97);
        // 500 does not fit device 0; device 1 (800 free): 100 - 80/10 = 92.
        assert_eq!(score(&p, &s, &task("u", 0, 500), 2), 92);
        // Two whole GPUs on a used node: 50 - 2.
        assert_eq!(score(&p, &s, &task("v", 0, 2000), 2), 48);
        assert_eq!(score(&p, &s, &task("c", 1000, 0), 2), 0);
    }
}
