//! The policies an experiment compares, each a scheduler [`Profile`] built from orch's GPU score
//! plugins ([`orch_scheduler::plugins::gpu`]).

use std::fmt;
use std::str::FromStr;

use orch_scheduler::Profile;
use orch_scheduler::plugins::gpu::{
    BestFit, DotProduct, Fgd, GpuClustering, GpuPacking, NodeScale, RandomFit, TargetWorkload, gpu_profile,
};

/// A placement policy of the FGD paper (or ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    /// [`RandomFit`].
    Random,
    /// [`DotProduct`].
    DotProd,
    /// [`GpuClustering`].
    GpuClustering,
    /// [`GpuPacking`].
    GpuPacking,
    /// [`BestFit`].
    BestFit,
    /// [`Fgd`].
    Fgd,
    /// Ours: [`Fgd`] first, [`BestFit`] among the nodes FGD scores equal (a profile of the two
    /// plugins, FGD weighted 101 and BestFit 1, so BestFit only ever breaks FGD's ties).
    FgdBestFit,
}

impl Policy {
    /// The six policies of the paper, in its order.
    pub const PAPER: [Policy; 6] =
        [Policy::Random, Policy::DotProd, Policy::GpuClustering, Policy::GpuPacking, Policy::BestFit, Policy::Fgd];

    /// Every policy the workbench knows.
    pub const ALL: [Policy; 7] = [
        Policy::Random,
        Policy::DotProd,
        Policy::GpuClustering,
        Policy::GpuPacking,
        Policy::BestFit,
        Policy::Fgd,
        Policy::FgdBestFit,
    ];

    /// The name tables and files use (`Random`, `DotProd`, `GpuClustering`, `GpuPacking`,
    /// `BestFit`, `FGD`).
    pub fn name(self) -> &'static str {
        match self {
            Policy::Random => "Random",
            Policy::DotProd => "DotProd",
            Policy::GpuClustering => "GpuClustering",
            Policy::GpuPacking => "GpuPacking",
            Policy::BestFit => "BestFit",
            Policy::Fgd => "FGD",
            Policy::FgdBestFit => "FGD-BestFit",
        }
    }

    /// The paper's figures (Random .. FGD): unallocated GPU % at 100% and 130% arrived, median
    /// of 10 seeds, from the simulator's expected results; `None` for policies not in the paper.
    pub fn paper_unallocated(self) -> Option<(f64, f64)> {
        Some(match self {
            Policy::Random => (13.75, 12.62),
            Policy::DotProd => (9.45, 9.20),
            Policy::GpuClustering => (8.42, 8.21),
            Policy::GpuPacking => (8.20, 7.94),
            Policy::BestFit => (7.09, 6.89),
            Policy::Fgd => (4.77, 4.60),
            _ => return None,
        })
    }

    /// The scheduler profile: the filters and this policy's score (see
    /// [`gpu_profile`]), tie-breaks and draws from `seed`.
    pub fn profile(self, seed: u64, target: &TargetWorkload, scale: NodeScale) -> Profile {
        let name = format!("workbench-{}", self.name().to_ascii_lowercase());
        let profile = match self {
            Policy::Random => gpu_profile(name, RandomFit::new(seed)),
            Policy::DotProd => gpu_profile(name, DotProduct::new(scale)),
            Policy::GpuClustering => gpu_profile(name, GpuClustering::new(scale)),
            Policy::GpuPacking => gpu_profile(name, GpuPacking),
            Policy::BestFit => gpu_profile(name, BestFit::new(scale)),
            Policy::Fgd => gpu_profile(name, Fgd::new(target.clone())),
            // BestFit's normalised score is 0..=100: weighted 1 against FGD's 101 it can only
            // decide between nodes FGD scores equal.
            Policy::FgdBestFit => {
                gpu_profile(name, Fgd::new(target.clone())).weight("FGD", 101).with(BestFit::new(scale), 1)
            }
        };
        // The tie-break's own stream, apart from the arrival order's and the draws'.
        profile.seed(seed ^ 0x7469_6562_7265_616b)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;

    /// A policy by name, any case (`fgd`, `BestFit`, `dotprod`…).
    fn from_str(s: &str) -> Result<Self, String> {
        let plain = |s: &str| s.trim().to_ascii_lowercase().replace(['-', '_'], "");
        Policy::ALL.into_iter().find(|p| plain(p.name()) == plain(s)).ok_or_else(|| {
            let names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
            format!("unknown policy {s:?} (known: {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
            assert_eq!(p.name().to_lowercase().parse::<Policy>(), Ok(p));
        }
        let err = "tetris".parse::<Policy>().unwrap_err();
        assert!(err.contains("unknown policy \"tetris\"") && err.contains("FGD"), "{err}");
    }
}
