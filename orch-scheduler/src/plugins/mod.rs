//! The default plugins.
//!
//! | plugin | points | what it does |
//! |---|---|---|
//! | [`PrioritySort`] | queue sort | higher priority first, then first come |
//! | [`NodeName`] | filter | `spec.nodeName` pins a workload to a node |
//! | [`NodeUnschedulable`] | filter | cordoned nodes take nothing new |
//! | [`TaintToleration`] | filter, score | `NoSchedule`/`NoExecute` taints need a toleration; `PreferNoSchedule` lowers the score |
//! | [`NodeAffinity`] | filter, score | node selector, required and preferred node affinity |
//! | [`ResourcesFit`] | filter, score, reserve | cpu, memory, extended resources, GPUs device by device, host ports, workloads per node; least/most-allocated scoring |
//! | [`BalancedAllocation`] | score | prefers nodes whose resources stay evenly used |
//! | [`TopologySpread`] | filter, score | max skew across topology domains, hard or soft |
//! | [`WorkloadAffinity`] | filter, score | workload affinity and anti-affinity by topology key, required and preferred, both directions |
//! | [`Gang`] | pre-filter, permit | all-or-nothing placement of a scheduling group, with a timeout |
//! | [`Preemption`] | post-filter | evicts the fewest, lowest-priority workloads that make room |
//!
//! [`VolumeBinding`] (filter: a workload goes where its volume claims' data is, or where a pending
//! claim fits) reads claims and volumes from caches, so it is not in the default profile: a
//! control plane that provides volumes adds it (`orch server` does).
//!
//! GPU placement policies from the literature (random, dot product, GPU clustering, GPU packing,
//! best fit, FGD) and the fragmentation measure are in [`gpu`]; they are not in the default
//! profile.

mod affinity;
mod fit;
mod gang;
pub mod gpu;
mod node;
mod preemption;
mod spread;
mod volume;

pub use affinity::WorkloadAffinity;
pub use fit::{BalancedAllocation, ResourcesFit, ScoringStrategy};
pub use gang::Gang;
pub use node::{NodeAffinity, NodeName, NodeUnschedulable, PrioritySort, TaintToleration, UNSCHEDULABLE_TAINT};
pub use preemption::Preemption;
pub use spread::TopologySpread;
pub use volume::VolumeBinding;

use super::DEFAULT_SCHEDULER;
use super::framework::Profile;

impl Profile {
    /// The default profile: every default plugin, least-allocated scoring.
    pub fn default_profile() -> Self {
        default_profile(ScoringStrategy::LeastAllocated)
    }
}

impl Default for crate::Framework {
    fn default() -> Self {
        crate::Framework::new(Profile::default_profile())
    }
}

/// Every default plugin with kube-scheduler's default weights, scoring with `strategy`.
pub fn default_profile(strategy: ScoringStrategy) -> Profile {
    Profile::new(DEFAULT_SCHEDULER)
        .with(PrioritySort, 0)
        .with(NodeName, 0)
        .with(NodeUnschedulable, 0)
        .with(TaintToleration, 3)
        .with(NodeAffinity, 2)
        .with(ResourcesFit::new(strategy), 1)
        .with(BalancedAllocation, 1)
        .with(TopologySpread, 2)
        .with(WorkloadAffinity, 2)
        .with(Gang::default(), 0)
        .with(Preemption::default(), 0)
}

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::framework::{Configured, Plugin};
use crate::error::SchedulerError;
use orch_core::validation::Validator;

/// A profile as configuration (JSON, YAML, TOML…): plugins by name, in order, with weights.
///
/// ```
/// use orch_scheduler::plugins::{ProfileConfig, Registry};
/// let config: ProfileConfig = serde_json::from_str(r#"{
///     "name": "packing",
///     "plugins": [
///         {"name": "NodeAffinity"},
///         {"name": "TaintToleration", "weight": 3},
///         {"name": "ResourcesFit", "args": {"strategy": "MostAllocated", "resources": {"cpu": 1, "memory": 1, "gpu": 4}}}
///     ]
/// }"#).unwrap();
/// let profile = Registry::default().profile(&config).unwrap();
/// assert_eq!(profile.plugins.len(), 3);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProfileConfig {
    /// Scheduler name (`schedulerName` of the workloads it places).
    pub name: String,
    /// Plugins in the order they run.
    pub plugins: Vec<PluginConfig>,
    /// Tie-break seed.
    pub seed: u64,
}

/// One plugin of a [`ProfileConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfig {
    /// Registered name.
    pub name: String,
    /// Score weight (default 1).
    #[serde(default = "one")]
    pub weight: i64,
    /// Plugin arguments, as the plugin's factory reads them.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub args: serde_json::Value,
}

fn one() -> i64 {
    1
}

/// Builds a plugin from its arguments, or says what is wrong with them.
pub type Factory = Arc<dyn Fn(&serde_json::Value) -> std::result::Result<Arc<dyn Plugin>, String> + Send + Sync>;

/// Plugin factories by name: every default plugin, plus the ones you register.
#[derive(Clone)]
pub struct Registry {
    factories: HashMap<String, Factory>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.factories.keys().collect();
        names.sort();
        f.debug_struct("Registry").field("plugins", &names).finish()
    }
}

fn no_args<P: Plugin + Clone>(p: P) -> Factory {
    Arc::new(move |args: &serde_json::Value| {
        if args.is_null() || args.as_object().is_some_and(|m| m.is_empty()) {
            Ok(Arc::new(p.clone()) as Arc<dyn Plugin>)
        } else {
            Err("takes no arguments".into())
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FitArgs {
    #[serde(default)]
    strategy: Option<String>,
    #[serde(default)]
    resources: Option<std::collections::BTreeMap<String, i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaleArgs {
    #[serde(default)]
    max_node_cpu_milli: Option<i64>,
    #[serde(default)]
    max_node_gpu_milli: Option<i64>,
}

fn scale_args(args: &serde_json::Value) -> Result<gpu::NodeScale, String> {
    if args.is_null() {
        return Ok(gpu::NodeScale::default());
    }
    let a: ScaleArgs = serde_json::from_value(args.clone()).map_err(|e| e.to_string())?;
    let d = gpu::NodeScale::default();
    let scale = gpu::NodeScale {
        cpu_milli: a.max_node_cpu_milli.unwrap_or(d.cpu_milli),
        gpu_milli: a.max_node_gpu_milli.unwrap_or(d.gpu_milli),
    };
    if scale.cpu_milli <= 0 {
        return Err(format!("maxNodeCpuMilli: must be > 0 (is {})", scale.cpu_milli));
    }
    if scale.gpu_milli <= 0 {
        return Err(format!("maxNodeGpuMilli: must be > 0 (is {})", scale.gpu_milli));
    }
    Ok(scale)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ShapeArgs {
    cpu_milli: i64,
    #[serde(default)]
    gpu_milli: i64,
    #[serde(default)]
    gpus: u32,
    #[serde(default)]
    models: Vec<String>,
    weight: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FgdArgs {
    shapes: Vec<ShapeArgs>,
}

fn fgd_args(args: &serde_json::Value) -> Result<gpu::TargetWorkload, String> {
    let a: FgdArgs = serde_json::from_value(args.clone()).map_err(|e| e.to_string())?;
    if a.shapes.is_empty() {
        return Err("shapes: must list the expected task shapes".into());
    }
    let mut shapes = Vec::new();
    for (i, s) in a.shapes.into_iter().enumerate() {
        if !(s.weight > 0.0 && s.weight.is_finite()) {
            return Err(format!("shapes[{i}].weight: must be > 0 (is {})", s.weight));
        }
        if !(0..=1000).contains(&s.gpu_milli)
            || (s.gpus > 1 && s.gpu_milli != 1000)
            || ((s.gpus == 0) != (s.gpu_milli == 0))
        {
            return Err(format!(
                "shapes[{i}]: gpuMilli is the share of each of `gpus` devices: 1..=1000 with gpus 1, 1000 with more, 0 with none (is {} x {})",
                s.gpu_milli, s.gpus
            ));
        }
        shapes.push((
            gpu::Shape { cpu_milli: s.cpu_milli, gpu_milli: s.gpu_milli, gpus: s.gpus, models: s.models },
            s.weight,
        ));
    }
    Ok(gpu::TargetWorkload::new(shapes))
}

impl Default for Registry {
    fn default() -> Self {
        let mut r = Registry { factories: HashMap::new() };
        r.register("PrioritySort", no_args(PrioritySort));
        r.register("NodeName", no_args(NodeName));
        r.register("NodeUnschedulable", no_args(NodeUnschedulable));
        r.register("TaintToleration", no_args(TaintToleration));
        r.register("NodeAffinity", no_args(NodeAffinity));
        r.register("BalancedAllocation", no_args(BalancedAllocation));
        r.register("TopologySpread", no_args(TopologySpread));
        r.register("WorkloadAffinity", no_args(WorkloadAffinity));
        r.register(
            "Gang",
            Arc::new(|args: &serde_json::Value| match args.get("defaultTimeoutSeconds").map(|v| v.as_u64()) {
                None => Ok(Arc::new(Gang::default()) as Arc<dyn Plugin>),
                Some(Some(s)) if s > 0 => {
                    Ok(Arc::new(Gang::with_default_timeout(std::time::Duration::from_secs(s))) as Arc<dyn Plugin>)
                }
                Some(_) => Err("defaultTimeoutSeconds: must be a positive integer".into()),
            }),
        );
        r.register(
            "Preemption",
            Arc::new(|_: &serde_json::Value| Ok(Arc::new(Preemption::default()) as Arc<dyn Plugin>)),
        );
        r.register(
            "ResourcesFit",
            Arc::new(|args: &serde_json::Value| {
                let a: FitArgs = if args.is_null() {
                    FitArgs { strategy: None, resources: None }
                } else {
                    serde_json::from_value(args.clone()).map_err(|e| e.to_string())?
                };
                let strategy = match a.strategy.as_deref() {
                    None | Some("LeastAllocated") => ScoringStrategy::LeastAllocated,
                    Some("MostAllocated") => ScoringStrategy::MostAllocated,
                    Some(other) => {
                        return Err(format!("strategy: must be LeastAllocated or MostAllocated (is {other:?})"));
                    }
                };
                let plugin = match a.resources {
                    None => ResourcesFit::new(strategy),
                    Some(res) => {
                        if let Some((name, w)) = res.iter().find(|(_, w)| **w < 0) {
                            return Err(format!("resources.{name}: weight must be >= 0 (is {w})"));
                        }
                        let pairs: Vec<(&str, i64)> = res.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                        ResourcesFit::with_weights(strategy, &pairs)
                    }
                };
                Ok(Arc::new(plugin) as Arc<dyn Plugin>)
            }),
        );
        r.register(
            "RandomFit",
            Arc::new(|args: &serde_json::Value| match args.get("seed") {
                None => Ok(Arc::new(gpu::RandomFit::new(0)) as Arc<dyn Plugin>),
                Some(v) => match v.as_u64() {
                    Some(seed) => Ok(Arc::new(gpu::RandomFit::new(seed)) as Arc<dyn Plugin>),
                    None => Err(format!("seed: must be a non-negative integer (is {v})")),
                },
            }),
        );
        r.register(
            "DotProduct",
            Arc::new(|a: &serde_json::Value| Ok(Arc::new(gpu::DotProduct::new(scale_args(a)?)) as Arc<dyn Plugin>)),
        );
        r.register(
            "GpuClustering",
            Arc::new(|a: &serde_json::Value| Ok(Arc::new(gpu::GpuClustering::new(scale_args(a)?)) as Arc<dyn Plugin>)),
        );
        r.register("GpuPacking", no_args(gpu::GpuPacking));
        r.register(
            "BestFit",
            Arc::new(|a: &serde_json::Value| Ok(Arc::new(gpu::BestFit::new(scale_args(a)?)) as Arc<dyn Plugin>)),
        );
        r.register(
            "FGD",
            Arc::new(|a: &serde_json::Value| Ok(Arc::new(gpu::Fgd::new(fgd_args(a)?)) as Arc<dyn Plugin>)),
        );
        r
    }
}

impl Registry {
    /// Registers (or replaces) a factory under `name`.
    pub fn register(&mut self, name: impl Into<String>, factory: Factory) -> &mut Self {
        self.factories.insert(name.into(), factory);
        self
    }

    /// Registers a plugin that takes no arguments.
    pub fn register_plugin<P: Plugin + Clone>(&mut self, name: impl Into<String>, plugin: P) -> &mut Self {
        self.register(name, no_args(plugin))
    }

    /// Builds a profile; every problem is reported with the field it is about.
    pub fn profile(&self, config: &ProfileConfig) -> Result<Profile, SchedulerError> {
        let mut v = Validator::new();
        let mut plugins = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, p) in config.plugins.iter().enumerate() {
            let field = format!("plugins[{i}]");
            if !seen.insert(p.name.as_str()) {
                v.reject(format!("{field}.name"), format!("plugin {:?} is listed twice", p.name));
                continue;
            }
            if p.weight < 0 {
                v.reject(format!("{field}.weight"), format!("must be >= 0 (is {})", p.weight));
            }
            match self.factories.get(&p.name) {
                None => {
                    let mut known: Vec<_> = self.factories.keys().map(String::as_str).collect();
                    known.sort();
                    v.reject(
                        format!("{field}.name"),
                        format!("unknown plugin {:?} (known: {})", p.name, known.join(", ")),
                    );
                }
                Some(f) => match f(&p.args) {
                    Ok(plugin) => plugins.push(Configured { plugin, weight: p.weight }),
                    Err(e) => v.reject(format!("{field}.args"), e),
                },
            }
        }
        v.finish().map_err(SchedulerError::InvalidProfile)?;
        let name = if config.name.is_empty() { DEFAULT_SCHEDULER.to_string() } else { config.name.clone() };
        Ok(Profile { name, plugins, seed: config.seed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_profile_config_names_every_field() {
        let config: ProfileConfig = serde_json::from_value(serde_json::json!({
            "plugins": [
                {"name": "NodeAffinity"},
                {"name": "NodeAffinity"},
                {"name": "Nope"},
                {"name": "ResourcesFit", "args": {"strategy": "Random"}},
                {"name": "TaintToleration", "weight": -2}
            ]
        }))
        .unwrap();
        let err = Registry::default().profile(&config).unwrap_err().to_string();
        for part in [
            "plugins[1].name: plugin \"NodeAffinity\" is listed twice",
            "plugins[2].name: unknown plugin \"Nope\"",
            "plugins[3].args: strategy: must be LeastAllocated or MostAllocated",
            "plugins[4].weight: must be >= 0 (is -2)",
        ] {
            assert!(err.contains(part), "{part} missing from {err}");
        }
    }

    #[test]
    fn gpu_policies_build_from_config_and_bad_arguments_are_named() {
        let config: ProfileConfig = serde_json::from_value(serde_json::json!({
            "plugins": [
                {"name": "RandomFit", "args": {"seed": 3}},
                {"name": "DotProduct", "args": {"maxNodeCpuMilli": 96000}},
                {"name": "GpuClustering"},
                {"name": "GpuPacking"},
                {"name": "BestFit"},
                {"name": "FGD", "args": {"shapes": [{"cpuMilli": 4000, "gpuMilli": 500, "gpus": 1, "weight": 3},
                                                    {"cpuMilli": 8000, "weight": 1}]}}
            ]
        }))
        .unwrap();
        let p = Registry::default().profile(&config).unwrap();
        assert_eq!(p.plugins.len(), 6);
        let bad: ProfileConfig = serde_json::from_value(serde_json::json!({
            "plugins": [
                {"name": "RandomFit", "args": {"seed": -1}},
                {"name": "BestFit", "args": {"maxNodeGpuMilli": 0}},
                {"name": "FGD", "args": {"shapes": [{"cpuMilli": 1, "gpuMilli": 500, "gpus": 2, "weight": 1}]}}
            ]
        }))
        .unwrap();
        let err = Registry::default().profile(&bad).unwrap_err().to_string();
        for part in [
            "plugins[0].args: seed: must be a non-negative integer",
            "plugins[1].args: maxNodeGpuMilli: must be > 0",
            "plugins[2].args: shapes[0]: gpuMilli is the share",
        ] {
            assert!(err.contains(part), "{part} missing from {err}");
        }
    }

    #[test]
    fn config_round_trips_to_the_default_profile() {
        let names = [
            "PrioritySort",
            "NodeName",
            "NodeUnschedulable",
            "TaintToleration",
            "NodeAffinity",
            "ResourcesFit",
            "BalancedAllocation",
            "TopologySpread",
            "WorkloadAffinity",
            "Gang",
            "Preemption",
        ];
        let config = ProfileConfig {
            name: String::new(),
            plugins: names
                .iter()
                .map(|n| PluginConfig { name: n.to_string(), weight: 1, args: serde_json::Value::Null })
                .collect(),
            seed: 7,
        };
        let p = Registry::default().profile(&config).unwrap();
        let built: Vec<_> = p.plugins.iter().map(|c| c.plugin.name().to_string()).collect();
        let default: Vec<_> = default_profile(ScoringStrategy::LeastAllocated)
            .plugins
            .iter()
            .map(|c| c.plugin.name().to_string())
            .collect();
        assert_eq!(built, default);
        assert_eq!(p.name, DEFAULT_SCHEDULER);
        assert_eq!(p.seed, 7);
    }
}
