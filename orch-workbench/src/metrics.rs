//! From runs to the paper's curves: each run's metrics by arrived GPU % (integer bins, as the
//! simulator's analysis scripts make them), and their median and spread over seeds.

use crate::experiment::{Run, Step};
use crate::policy::Policy;

/// The metrics of a curve, in column order (CSV headers).
pub const COLUMNS: [&str; 11] = [
    "unallocated_gpu_pct",
    "fragmented_gpu_pct",
    "frag_ratio_pct",
    "used_nodes_pct",
    "cpu_allocated_pct",
    "placed_cpu",
    "placed_share",
    "placed_whole",
    "failed_cpu",
    "failed_share",
    "failed_whole",
];

/// Index of unallocated GPU % (100 - allocated / capacity) in [`COLUMNS`].
pub const UNALLOCATED: usize = 0;
/// Index of fragmented GPU % (fragmentation / capacity) in [`COLUMNS`].
pub const FRAGMENTED: usize = 1;
/// Index of the fragmentation ratio (fragmentation / unallocated GPUs) in [`COLUMNS`].
pub const FRAG_RATIO: usize = 2;

/// Number of metrics.
pub const METRICS: usize = COLUMNS.len();

/// The metrics of one step, in [`COLUMNS`] order.
pub fn values(run: &Run, s: &Step) -> [f64; METRICS] {
    let cap = run.gpu_capacity_milli.max(1) as f64;
    let idle = (run.gpu_capacity_milli - s.allocated_milli) as f64;
    [
        100.0 - 100.0 * s.allocated_milli as f64 / cap,
        100.0 * s.frag_milli / cap,
        if idle > 0.0 { 100.0 * s.frag_milli / idle } else { 0.0 },
        100.0 * s.used_nodes as f64 / run.nodes.max(1) as f64,
        100.0 * s.cpu_allocated_milli as f64 / run.cpu_capacity_milli.max(1) as f64,
        s.placed[0] as f64,
        s.placed[1] as f64,
        s.placed[2] as f64,
        s.failed[0] as f64,
        s.failed[1] as f64,
        s.failed[2] as f64,
    ]
}

/// Arrived GPUs as a % of capacity.
pub fn arrived_pct(run: &Run, s: &Step) -> f64 {
    100.0 * s.arrived_milli as f64 / run.gpu_capacity_milli.max(1) as f64
}

/// One run's metrics by arrived GPU %.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// (arrived %, the metrics) for each integer arrived % the run reached.
    pub points: Vec<(u32, [f64; METRICS])>,
}

impl Curve {
    /// The run's curve: the value at `x` is the mean over the steps whose arrived % rounds to
    /// `x` (half to even, as Python's `round`); where no step does, over those that round to
    /// `x - 1`, `x` or `x + 1`; where none do either, there is no point.
    pub fn of(run: &Run) -> Curve {
        let mut bins: Vec<([f64; METRICS], usize)> = Vec::new();
        for s in &run.steps {
            let x = arrived_pct(run, s).round_ties_even().max(0.0) as usize;
            if bins.len() <= x {
                bins.resize(x + 1, ([0.0; METRICS], 0));
            }
            let v = values(run, s);
            for (acc, v) in bins[x].0.iter_mut().zip(v) {
                *acc += v;
            }
            bins[x].1 += 1;
        }
        let mut points = Vec::new();
        for x in 0..bins.len() {
            let range = if bins[x].1 > 0 { x..x + 1 } else { x.saturating_sub(1)..(x + 2).min(bins.len()) };
            let (mut sum, mut n) = ([0.0; METRICS], 0);
            for b in &bins[range] {
                for (acc, v) in sum.iter_mut().zip(b.0) {
                    *acc += v;
                }
                n += b.1;
            }
            if n > 0 {
                points.push((x as u32, sum.map(|v| v / n as f64)));
            }
        }
        Curve { points }
    }

    /// The metrics at arrived `x` %, if the run has a point there.
    pub fn at(&self, x: u32) -> Option<&[f64; METRICS]> {
        self.points.binary_search_by_key(&x, |p| p.0).ok().map(|i| &self.points[i].1)
    }
}

/// A value over seeds: the median and the middle half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    /// Median.
    pub median: f64,
    /// 25th percentile.
    pub low: f64,
    /// 75th percentile.
    pub high: f64,
}

/// The `q`-quantile (0..=1) of sorted values, interpolating linearly (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Band {
    /// The band of `values` (any order).
    pub fn of(values: &[f64]) -> Band {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        Band { median: quantile(&v, 0.5), low: quantile(&v, 0.25), high: quantile(&v, 0.75) }
    }
}

/// One policy's curves over seeds: the median and the middle half at each arrived %.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The policy.
    pub policy: Policy,
    /// Seeds (runs) summarised.
    pub seeds: usize,
    /// (arrived %, each metric's band) where at least one run has a point.
    pub points: Vec<(u32, [Band; METRICS])>,
}

impl Summary {
    /// Summarises the curves of one policy's runs.
    pub fn of(policy: Policy, curves: &[Curve]) -> Summary {
        let max = curves.iter().filter_map(|c| c.points.last().map(|p| p.0)).max().unwrap_or(0);
        let mut points = Vec::new();
        for x in 0..=max {
            let at: Vec<&[f64; METRICS]> = curves.iter().filter_map(|c| c.at(x)).collect();
            if at.is_empty() {
                continue;
            }
            let bands = std::array::from_fn(|m| Band::of(&at.iter().map(|v| v[m]).collect::<Vec<_>>()));
            points.push((x, bands));
        }
        Summary { policy, seeds: curves.len(), points }
    }

    /// The band of metric `m` at arrived `x` %.
    pub fn at(&self, x: u32, m: usize) -> Option<Band> {
        self.points.iter().find(|p| p.0 == x).map(|p| p.1[m])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(steps: &[(i64, i64)]) -> Run {
        Run {
            policy: Policy::Fgd,
            seed: 0,
            steps: steps
                .iter()
                .map(|&(arrived, alloc)| Step { arrived_milli: arrived, allocated_milli: alloc, ..Default::default() })
                .collect(),
            placements: vec![],
            gpu_capacity_milli: 100_000,
            cpu_capacity_milli: 1,
            nodes: 1,
            refused: 0,
            wall: Default::default(),
        }
    }

    #[test]
    fn bins_by_rounded_arrived_share_and_fills_gaps_from_neighbours() {
        // Capacity 100 GPUs: arrived 0.4, 0.6 and 1.4 GPUs are 0.4%, 0.6%, 1.4% -> bins 0, 1, 1;
        // 2.5% rounds to 2 (half to even); 5% leaves 3 and 4 empty: 3 takes bins 2..=4, 4 takes 3..=5.
        let c = Curve::of(&run(&[(400, 400), (600, 600), (1400, 1000), (2500, 2000), (5000, 3000)]));
        let xs: Vec<u32> = c.points.iter().map(|p| p.0).collect();
        assert_eq!(xs, [0, 1, 2, 3, 4, 5]);
        assert!((c.at(0).unwrap()[UNALLOCATED] - 99.6).abs() < 1e-9);
        assert!((c.at(1).unwrap()[UNALLOCATED] - (99.4 + 99.0) / 2.0).abs() < 1e-9);
        assert!((c.at(2).unwrap()[UNALLOCATED] - 98.0).abs() < 1e-9);
        assert!((c.at(3).unwrap()[UNALLOCATED] - 98.0).abs() < 1e-9, "only bin 2 is near");
        assert!((c.at(4).unwrap()[UNALLOCATED] - 97.0).abs() < 1e-9, "only bin 5 is near");
    }

    #[test]
    fn bands_are_numpy_quantiles() {
        let b = Band::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((b.median, b.low, b.high), (2.5, 1.75, 3.25));
        let b = Band::of(&[5.0]);
        assert_eq!((b.median, b.low, b.high), (5.0, 5.0, 5.0));
    }
}
