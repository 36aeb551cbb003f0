//! [`Workflow`]: a DAG of steps, each a workload template run to completion once its
//! dependencies have succeeded.

use std::collections::{BTreeMap, HashMap};

use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

use super::{RestartPolicy, WorkloadTemplate};
use crate::meta::Timestamp;
use crate::object::{Resource, Scope};
use crate::validation::{self, Validator};

/// The annotation naming the step a workflow's workload runs.
pub const STEP_ANNOTATION: &str = "orch.dev/workflow-step";

/// What a workflow does when a step fails for good (its retries spent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailurePolicy {
    /// Start nothing more; the workflow fails once its running steps end.
    #[default]
    FailFast,
    /// Go on with every step that does not depend on the failed one; the workflow fails at the
    /// end.
    Continue,
}

/// One step: a template run to completion, after the steps it depends on succeeded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkflowStep {
    /// Unique in the workflow; a DNS-1123 label.
    pub name: String,
    /// What it runs; the restart policy must be `Never` or `OnFailure`.
    pub template: WorkloadTemplate,
    /// Steps that must succeed first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Further tries after a failure (default 0).
    pub retries: u32,
}

/// A DAG of steps. A cycle, or a dependency on a step that does not exist, is refused at
/// admission (the error names the cycle).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Workflow {
    /// The steps, at least one.
    pub steps: Vec<WorkflowStep>,
    /// Steps running at once at most; `None` for no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    /// Fail fast or continue past a failed step.
    pub failure_policy: FailurePolicy,
}

/// Where a workflow, or one of its steps, stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepPhase {
    /// Waiting for dependencies (or for room under the parallelism).
    #[default]
    Pending,
    /// A workload runs it.
    Running,
    /// Done.
    Succeeded,
    /// Failed with its retries spent.
    Failed,
    /// Never run: a dependency failed, or the workflow failed fast.
    Skipped,
}

impl StepPhase {
    /// Succeeded, failed or skipped.
    pub fn is_final(self) -> bool {
        matches!(self, StepPhase::Succeeded | StepPhase::Failed | StepPhase::Skipped)
    }
}

/// One step's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StepStatus {
    /// Where it stands.
    pub phase: StepPhase,
    /// Workloads started for it so far.
    #[serde(skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What the workflow controller observes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkflowStatus {
    /// `Pending` before it starts, `Running`, then `Succeeded` or `Failed`.
    pub phase: StepPhase,
    /// Each step's state, by name.
    pub steps: BTreeMap<String, StepStatus>,
    /// Why it failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When it started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Timestamp>,
    /// When it finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Timestamp>,
}

impl Workflow {
    /// The steps as a graph (an edge from each dependency to its dependent), with each step's
    /// node; dependencies on unknown steps are left out.
    pub fn graph(&self) -> (DiGraph<usize, ()>, HashMap<&str, NodeIndex>) {
        let mut g = DiGraph::with_capacity(self.steps.len(), self.steps.len());
        let mut nodes = HashMap::with_capacity(self.steps.len());
        for (i, s) in self.steps.iter().enumerate() {
            nodes.entry(s.name.as_str()).or_insert_with(|| g.add_node(i));
        }
        for s in &self.steps {
            for d in &s.depends_on {
                if let (Some(&from), Some(&to)) = (nodes.get(d.as_str()), nodes.get(s.name.as_str())) {
                    g.add_edge(from, to, ());
                }
            }
        }
        (g, nodes)
    }

    /// A dependency cycle, as the step names around it (the first repeated at the end), if the
    /// steps have one.
    pub fn find_cycle(&self) -> Option<Vec<String>> {
        let (g, _) = self.graph();
        for scc in petgraph::algo::tarjan_scc(&g) {
            let looped = scc.len() > 1 || g.contains_edge(scc[0], scc[0]);
            if !looped {
                continue;
            }
            // Walk inside the component until a node repeats: that stretch is a cycle.
            let inside: std::collections::HashSet<NodeIndex> = scc.iter().copied().collect();
            let mut path = vec![scc[0]];
            let mut at = scc[0];
            loop {
                let next = g
                    .neighbors(at)
                    .find(|n| inside.contains(n))
                    .expect("a strongly connected node has a successor inside");
                if let Some(pos) = path.iter().position(|p| *p == next) {
                    let mut cycle: Vec<String> = path[pos..].iter().map(|n| self.steps[g[*n]].name.clone()).collect();
                    cycle.push(self.steps[g[next]].name.clone());
                    return Some(cycle);
                }
                path.push(next);
                at = next;
            }
        }
        None
    }
}

impl Resource for Workflow {
    const KIND: &'static str = "Workflow";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = WorkflowStatus;

    fn validate(&self, v: &mut Validator) {
        if self.steps.is_empty() {
            v.reject("spec.steps", "must have at least one step");
        }
        if self.parallelism == Some(0) {
            v.reject("spec.parallelism", "must be >= 1 (leave it out for no limit)");
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.steps.iter().enumerate() {
            v.check_with(|| format!("spec.steps[{i}].name"), validation::dns1123_label(&s.name));
            if !seen.insert(s.name.as_str()) {
                v.reject(format!("spec.steps[{i}].name"), format!("duplicate step {:?}", s.name));
            }
            s.template.validate_under(&format!("spec.steps[{i}].template"), v);
            if s.template.spec.restart_policy == RestartPolicy::Always {
                v.reject(
                    format!("spec.steps[{i}].template.spec.restartPolicy"),
                    "must be Never or OnFailure: a step runs to completion",
                );
            }
        }
        let names: std::collections::HashSet<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
        for (i, s) in self.steps.iter().enumerate() {
            for (j, d) in s.depends_on.iter().enumerate() {
                if !names.contains(d.as_str()) {
                    v.reject(format!("spec.steps[{i}].dependsOn[{j}]"), format!("unknown step {d:?}"));
                }
            }
        }
        if let Some(cycle) = self.find_cycle() {
            v.reject("spec.steps", format!("dependency cycle: {}", cycle.join(" -> ")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Workload;
    use crate::meta::ObjectMeta;
    use crate::object::Object;

    fn step(name: &str, deps: &[&str]) -> WorkflowStep {
        let mut w = Workload::command("main", &["x"]);
        w.restart_policy = RestartPolicy::Never;
        WorkflowStep {
            name: name.into(),
            template: WorkloadTemplate::new(Default::default(), w),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            retries: 0,
        }
    }

    #[test]
    fn a_cycle_is_refused_naming_it() {
        let wf = Workflow {
            steps: vec![step("fetch", &[]), step("a", &["fetch", "c"]), step("b", &["a"]), step("c", &["b"])],
            ..Default::default()
        };
        let err = Object::new(ObjectMeta::namespaced("default", "wf"), wf).validate().unwrap_err().to_string();
        assert!(
            ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"].iter().any(|c| err.contains(c)),
            "the cycle is named: {err}"
        );
        let selfloop = Workflow { steps: vec![step("x", &["x"])], ..Default::default() };
        assert_eq!(selfloop.find_cycle(), Some(vec!["x".to_string(), "x".to_string()]));
    }

    #[test]
    fn bad_steps_are_named() {
        let mut bad = step("Bad_Name", &["nowhere"]);
        bad.template.spec.restart_policy = RestartPolicy::Always;
        let wf =
            Workflow { steps: vec![step("a", &[]), step("a", &[]), bad], parallelism: Some(0), ..Default::default() };
        let err = Object::new(ObjectMeta::namespaced("default", "wf"), wf).validate().unwrap_err();
        let crate::Error::Invalid { source, .. } = &err else { panic!("{err}") };
        for f in [
            "spec.parallelism",
            "spec.steps[1].name",
            "spec.steps[2].name",
            "spec.steps[2].dependsOn[0]",
            "spec.steps[2].template.spec.restartPolicy",
        ] {
            assert!(source.has_field(f), "missing {f} in {err}");
        }
        assert!(err.to_string().contains("unknown step \"nowhere\""), "{err}");
        let ok = Workflow { steps: vec![step("a", &[]), step("b", &["a"])], ..Default::default() };
        assert!(ok.find_cycle().is_none());
        Object::new(ObjectMeta::namespaced("default", "wf"), ok).validate().unwrap();
    }
}
