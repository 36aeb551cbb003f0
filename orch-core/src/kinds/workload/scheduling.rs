//! Where a workload may run: tolerations, node and workload (anti-)affinity, topology spread
//! and gang membership, as the scheduler reads them.

use serde::{Deserialize, Serialize};

use crate::labels::Labels;
use crate::selector::LabelSelector;

/// Membership of a gang: workloads (in one namespace) that share `name` are placed all or
/// nothing once `min_members` of them can be placed together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SchedulingGroup {
    /// The gang's name, shared by its members; a DNS-1123 label.
    pub name: String,
    /// How many members must be placeable at once before any is bound (at least 1).
    pub min_members: u32,
    /// How long placed members wait for the rest before all are released; default 60.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// How a toleration compares with a taint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TolerationOperator {
    /// Key and value must match.
    #[default]
    Equal,
    /// Key must match (an empty key matches every taint).
    Exists,
}

/// Lets a workload onto nodes with a matching taint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Toleration {
    /// Taint key; empty with `Exists` tolerates everything.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// How to compare.
    pub operator: TolerationOperator,
    /// Taint value, for `Equal`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// Only taints with this effect; `None` for all effects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effect: Option<crate::kinds::TaintEffect>,
    /// For `NoExecute`: stay this long after the taint appears, then be evicted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<u64>,
}

impl Toleration {
    /// True when this toleration lets the workload onto a node with `taint`.
    pub fn tolerates(&self, taint: &crate::kinds::Taint) -> bool {
        if self.effect.is_some_and(|e| e != taint.effect) {
            return false;
        }
        match self.operator {
            TolerationOperator::Exists => self.key.is_empty() || self.key == taint.key,
            TolerationOperator::Equal => self.key == taint.key && self.value == taint.value,
        }
    }
}

/// A term with a weight, for preferences (1-100).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Weighted<T> {
    /// 1-100; higher counts more.
    pub weight: i32,
    /// The preferred term.
    pub term: T,
}

/// Node and workload affinity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Affinity {
    /// Which nodes qualify or are preferred.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<NodeAffinity>,
    /// Run near workloads matching these terms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_affinity: Option<WorkloadAffinity>,
    /// Run away from workloads matching these terms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_anti_affinity: Option<WorkloadAffinity>,
}

/// Node affinity: required terms (any one must match) and weighted preferences.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeAffinity {
    /// A node qualifies when it matches at least one term (when there are any).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<NodeSelectorTerm>,
    /// Nodes matching these score higher.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preferred: Vec<Weighted<NodeSelectorTerm>>,
}

/// All requirements must match a node's labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeSelectorTerm {
    /// The requirements.
    pub match_expressions: Vec<NodeSelectorRequirement>,
}

/// Operators on node labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeSelectorOperator {
    /// Value is one of `values`.
    In,
    /// Value is none of `values` (or the label is absent).
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
    /// The label, as an integer, is greater than the single value.
    Gt,
    /// The label, as an integer, is less than the single value.
    Lt,
}

/// One requirement on a node label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelectorRequirement {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: NodeSelectorOperator,
    /// Values, as the operator needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl NodeSelectorRequirement {
    /// True when a node with `labels` satisfies the requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        let as_int = |s: &str| s.parse::<i64>().ok();
        match self.operator {
            NodeSelectorOperator::In => v.is_some_and(|v| self.values.contains(v)),
            NodeSelectorOperator::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            NodeSelectorOperator::Exists => v.is_some(),
            NodeSelectorOperator::DoesNotExist => v.is_none(),
            NodeSelectorOperator::Gt | NodeSelectorOperator::Lt => {
                match (v.and_then(|v| as_int(v)), self.values.first().and_then(|x| as_int(x))) {
                    (Some(a), Some(b)) => {
                        if self.operator == NodeSelectorOperator::Gt {
                            a > b
                        } else {
                            a < b
                        }
                    }
                    _ => false,
                }
            }
        }
    }
}

impl NodeSelectorTerm {
    /// True when every requirement matches.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

/// Workload (anti-)affinity: required and preferred terms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadAffinity {
    /// Every term must hold.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<AffinityTerm>,
    /// Terms that score.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preferred: Vec<Weighted<AffinityTerm>>,
}

/// Workloads matching `label_selector` (in `namespaces`, default: the workload's own), counted per
/// domain of `topology_key` (a node label such as `zone` or `hostname`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AffinityTerm {
    /// Which workloads.
    pub label_selector: LabelSelector,
    /// Their namespaces; empty for the workload's own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// The node label that defines a domain.
    pub topology_key: String,
}

/// What to do when a spread constraint cannot be met.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WhenUnsatisfiable {
    /// Leave the workload pending.
    #[default]
    DoNotSchedule,
    /// Place it anyway, preferring nodes that reduce skew.
    ScheduleAnyway,
}

/// Spread matching workloads evenly across the domains of a topology key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TopologySpreadConstraint {
    /// Largest allowed difference between the fullest and emptiest domain (at least 1).
    pub max_skew: i32,
    /// The node label that defines a domain.
    pub topology_key: String,
    /// Hard or soft.
    pub when_unsatisfiable: WhenUnsatisfiable,
    /// Which workloads count.
    pub label_selector: LabelSelector,
}
