//! [`DaemonSet`]: one workload on every node that matches, following nodes as they come and go.

use serde::{Deserialize, Serialize};

use super::deployment::validate_template_for;
use super::{Condition, IntOrPercent, WorkloadTemplate, validate_conditions};
use crate::object::{Resource, Scope};
use crate::selector::LabelSelector;
use crate::validation::Validator;

/// How a daemon set replaces its workloads when its template changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum DaemonSetUpdate {
    /// Replace them node by node, at most `maxUnavailable` nodes without an available workload
    /// at once.
    RollingUpdate(DaemonRollingUpdate),
    /// Replace a workload only when someone deletes it.
    OnDelete,
}

impl Default for DaemonSetUpdate {
    fn default() -> Self {
        DaemonSetUpdate::RollingUpdate(DaemonRollingUpdate::default())
    }
}

/// The bound of a daemon set's rolling update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DaemonRollingUpdate {
    /// Nodes that may be without an available workload during the update (a percentage of the
    /// matching nodes rounds down, but at least one; default 1).
    pub max_unavailable: IntOrPercent,
}

impl Default for DaemonRollingUpdate {
    fn default() -> Self {
        DaemonRollingUpdate { max_unavailable: IntOrPercent::Count(1) }
    }
}

/// Run one copy of a template on every node its `nodeSelector`, affinity and tolerations
/// admit (the template's own scheduling fields), including nodes that join later.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DaemonSet {
    /// Which workloads belong to it; must match the template's labels and not be empty.
    pub selector: LabelSelector,
    /// What runs on each node; its `nodeSelector` and `tolerations` pick the nodes.
    pub template: WorkloadTemplate,
    /// How a changed template rolls out.
    pub update_strategy: DaemonSetUpdate,
    /// A workload counts as available only once it has been ready this long.
    pub min_ready_seconds: u32,
}

/// What the daemon set controller observes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DaemonSetStatus {
    /// The generation of the spec this status reflects.
    pub observed_generation: u64,
    /// Nodes that should run it.
    pub desired_number_scheduled: u32,
    /// Of those, nodes that run it.
    pub current_number_scheduled: u32,
    /// Nodes that run it but should not.
    pub number_misscheduled: u32,
    /// Nodes whose workload is ready.
    pub number_ready: u32,
    /// Nodes whose workload is available.
    pub number_available: u32,
    /// Nodes whose workload runs the current template.
    pub updated_number_scheduled: u32,
    /// Reserved for conditions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl Resource for DaemonSet {
    const KIND: &'static str = "DaemonSet";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = DaemonSetStatus;

    fn validate(&self, v: &mut Validator) {
        validate_template_for("spec.template", &self.selector, &self.template, true, v);
        // Each copy is bound to its node by the controller, not placed by the scheduler: the
        // fields only a scheduler honours are refused rather than ignored.
        let t = &self.template.spec;
        if t.affinity.is_some() {
            v.reject("spec.template.spec.affinity", "not supported for a daemon set: choose nodes with nodeSelector");
        }
        if !t.topology_spread_constraints.is_empty() {
            v.reject(
                "spec.template.spec.topologySpreadConstraints",
                "not supported for a daemon set: it runs on every matching node",
            );
        }
        if t.scheduling_group.is_some() {
            v.reject("spec.template.spec.schedulingGroup", "not supported for a daemon set");
        }
        if let DaemonSetUpdate::RollingUpdate(r) = self.update_strategy {
            match r.max_unavailable {
                IntOrPercent::Count(0) | IntOrPercent::Percent(0) => v.reject(
                    "spec.updateStrategy.maxUnavailable",
                    "must be at least 1 (or 1%): nothing could be replaced",
                ),
                IntOrPercent::Percent(p) if p > 100 => {
                    v.reject("spec.updateStrategy.maxUnavailable", format!("must be at most 100% (is {p}%)"))
                }
                _ => {}
            }
        }
    }

    fn validate_status(status: &DaemonSetStatus, v: &mut Validator) {
        validate_conditions("status.conditions", &status.conditions, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Workload;
    use crate::meta::ObjectMeta;
    use crate::object::Object;

    #[test]
    fn daemon_set_validation_names_fields() {
        let mut w = Workload::command("agent", &["run"]);
        w.node_name = Some("n1".into());
        let ds = DaemonSet {
            selector: LabelSelector::from_labels([("app", "logs")]),
            template: WorkloadTemplate::new([("app", "other")].into(), w),
            update_strategy: DaemonSetUpdate::RollingUpdate(DaemonRollingUpdate {
                max_unavailable: IntOrPercent::Count(0),
            }),
            min_ready_seconds: 0,
        };
        let err = Object::new(ObjectMeta::namespaced("default", "logs"), ds).validate().unwrap_err();
        let crate::Error::Invalid { source, .. } = &err else { panic!("{err}") };
        for f in ["spec.template.metadata.labels", "spec.template.spec.nodeName", "spec.updateStrategy.maxUnavailable"]
        {
            assert!(source.has_field(f), "missing {f} in {err}");
        }
    }
}
