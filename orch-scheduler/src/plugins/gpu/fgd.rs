//! Fragmentation gradient descent (FGD): place where the cluster's fragmentation grows least.

use std::sync::Arc;

use crate::framework::{Ctx, MAX_SCORE, Plugin, Points};
use crate::snapshot::{CPU, DeviceShare, NodeInfo, WHOLE_DEVICE};

use super::frag::node_model;
use super::{GpuAsk, TargetWorkload};

/// Scores a node by how much placing the workload there changes the node's fragmentation
/// ([`TargetWorkload::node_frag`]): `100 * sigmoid((before - after) / 1000)`, truncated (the
/// change in GPUs; 50 when nothing changes, more when fragmentation shrinks). Since only this
/// node changes, the node whose score is highest is the one where the cluster's fragmentation
/// grows least.
///
/// A GPU share is tried on every device with room (the node scores its best device, and the
/// workload gets the lowest-numbered device with that score); whole devices are the
/// lowest-numbered free ones, as the tightest fit hands them out.
#[derive(Debug, Clone)]
pub struct Fgd {
    target: Arc<TargetWorkload>,
    resolution: i64,
}

impl Fgd {
    /// Scores against `target`, the workload the cluster expects.
    pub fn new(target: TargetWorkload) -> Self {
        Fgd { target: Arc::new(target), resolution: 1 }
    }

    /// Scores in steps of `1 / resolution` (scores then go up to `100 * resolution`): fewer
    /// ties than the paper's whole numbers.
    pub fn with_resolution(mut self, resolution: i64) -> Self {
        self.resolution = resolution.max(1);
        self
    }

    /// The workload it scores against.
    pub fn target(&self) -> &TargetWorkload {
        &self.target
    }

    /// The node's score for `ask`, and the device a GPU share goes on.
    pub fn evaluate(&self, node: &NodeInfo, ask: &GpuAsk) -> (i64, Option<u16>) {
        let mut buf = [0i64; 16];
        let mut heap = Vec::new();
        let free: &mut [i64] = if node.devices.len() <= buf.len() {
            &mut buf[..node.devices.len()]
        } else {
            heap.resize(node.devices.len(), 0);
            &mut heap
        };
        for (f, d) in free.iter_mut().zip(&node.devices) {
            *f = d.free;
        }
        let model = node_model(node);
        let cpu = node.free(CPU);
        let before = self.target.frag(cpu, free, model);
        let scale = (MAX_SCORE * self.resolution) as f64;
        let score = |after: f64| (sigmoid((before - after) / 1000.0) * scale) as i64;
        if ask.is_share() {
            let mut best: Option<(i64, u16)> = None;
            for i in 0..free.len() {
                let f = free[i];
                // A device with as much free as an earlier one scores the same: keep the earlier.
                if f < ask.milli || free[..i].contains(&f) {
                    continue;
                }
                free[i] -= ask.milli;
                let s = score(self.target.frag(cpu - ask.cpu, free, model));
                free[i] = f;
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, i as u16));
                }
            }
            return match best {
                Some((s, i)) => (s, Some(i)),
                None => (0, None),
            };
        }
        let mut want = ask.count;
        for f in free.iter_mut() {
            if want == 0 {
                break;
            }
            if *f == WHOLE_DEVICE {
                *f = 0;
                want -= 1;
            }
        }
        (score(self.target.frag(cpu - ask.cpu, free, model)), None)
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Plugin for Fgd {
    fn name(&self) -> &str {
        "FGD"
    }
    fn points(&self) -> Points {
        Points::SCORE | Points::DEVICES
    }
    fn score(&self, cx: &Ctx<'_>, node: &NodeInfo) -> i64 {
        self.evaluate(node, &GpuAsk::of(cx.workload)).0
    }
    fn devices(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Option<Vec<DeviceShare>> {
        let ask = GpuAsk::of(cx.workload);
        let (_, device) = self.evaluate(node, &ask);
        device.map(|d| vec![DeviceShare { device: d, milli: ask.milli }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::gpu::Shape;
    use crate::plugins::gpu::testing::{cluster, devices, node, score, task};

    fn shape(cpu: i64, milli: i64, gpus: u32) -> Shape {
        Shape { cpu_milli: cpu, gpu_milli: milli, gpus, models: vec![] }
    }

    #[test]
    fn hand_worked_share_placement() {
        // Target: half the tasks want 0.5 GPU, half want a whole GPU.
        let target = TargetWorkload::new(vec![(shape(1000, 500, 1), 0.5), (shape(1000, 1000, 1), 0.5)]);
        let p = Fgd::new(target);
        // Node 0: two GPUs, device 0 with 600 free, device 1 whole. Node 1: two whole GPUs.
        let s = cluster(&[node("a", 16, 2, "T4"), node("b", 16, 2, "T4")], &[(task("x", 0, 400), 0, vec![(0, 400)])]);
        let w = task("w", 1000, 500);
        // Node a before: half: 0 (both devices hold 500); whole: 600 (device 0 cannot) -> 300.
        //  on device 0 (600 -> 100): half: 100, whole: 100 -> 100; delta +200 -> sigmoid(0.2) = 0.5498 -> 54.
        //  on device 1 (1000 -> 500): half: 0, whole: 600 + 500 = 1100 (no whole device left: all) -> 550;
        //  delta -250 -> sigmoid(-0.25) = 0.4378 -> 43. Best: device 0, 54.
        assert_eq!(score(&p, &s, &w, 0), 54);
        assert_eq!(devices(&p, &s, &w, 0), Some(vec![(0, 500)]));
        // Node b before: 0. After on device 0: half 0, whole 500 -> 250; delta -250 -> 43 (device 0,
        // the lowest of two equal devices).
        assert_eq!(score(&p, &s, &w, 1), 43);
        assert_eq!(devices(&p, &s, &w, 1), Some(vec![(0, 500)]));
    }

    #[test]
    fn whole_gpu_and_cpu_tasks() {
        let target = TargetWorkload::new(vec![(shape(8000, 1000, 2), 1.0)]);
        let p = Fgd::new(target);
        let s = cluster(&[node("a", 16, 4, "T4")], &[]);
        // Before 0. Two whole GPUs taken: two left, still fits (cpu 16 - 4 >= 8): 0 -> 50.
        assert_eq!(score(&p, &s, &task("w", 4000, 2000), 0), 50);
        // Three taken: one left, cannot hold two: 1000 -> sigmoid(-1) = 0.2689 -> 26.
        assert_eq!(score(&p, &s, &task("v", 4000, 3000), 0), 26);
        // A cpu task taking 10 cores: 6 left < 8, the shape no longer fits: all 4000 -> sigmoid(-4) -> 1.
        assert_eq!(score(&p, &s, &task("c", 10_000, 0), 0), 1);
        assert_eq!(devices(&p, &s, &task("w", 4000, 2000), 0), None, "whole devices: the tightest fit's");
    }
}
