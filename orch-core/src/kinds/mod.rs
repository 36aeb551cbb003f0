//! The built-in kinds: [`Node`], its heartbeat [`NodeLease`], [`Workload`], [`Event`], [`Deployment`] with
//! its revisions ([`ReplicaSet`]), [`Job`], [`Workflow`], [`DaemonSet`], [`StatefulSet`], [`Service`] with its
//! [`EndpointSlice`]s, [`VolumeClaim`] with the [`PersistentVolume`] that serves it, and the types they
//! share.

mod daemonset;
mod deployment;
mod event;
mod job;
mod node;
mod service;
mod statefulset;
mod volume;
mod workflow;
mod workload;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use daemonset::{DaemonRollingUpdate, DaemonSet, DaemonSetStatus, DaemonSetUpdate};
pub use deployment::{
    Deployment, DeploymentStatus, IntOrPercent, RESTARTED_AT_ANNOTATION, REVISION_ANNOTATION, ReplicaSet,
    ReplicaSetStatus, RollbackPolicy, RollingUpdate, Strategy, TEMPLATE_HASH_LABEL, TemplateMeta, WorkloadTemplate,
    deployment_condition,
};
pub(crate) use event::is_camel_case;
pub use event::{EVENT_MESSAGE_LIMIT, Event, EventType, ObjectReference};
pub use job::{COMPLETION_INDEX_ANNOTATION, CompletionMode, Job, JobStatus, format_indexes, job_condition};
pub use node::{
    Device, NODE_LEASE_NAMESPACE, Node, NodeAddress, NodeLease, NodeStatus, NodeStorage, Taint, TaintEffect,
};
pub use service::{
    DEFAULT_ENDPOINTS_PER_SLICE, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, PortTarget,
    SERVICE_NAME_LABEL, Service, ServicePort, ServiceStatus, ServiceType,
};
pub use statefulset::{
    MAX_REPLICAS, ORDINAL_LABEL, PodManagementPolicy, StatefulRollingUpdate, StatefulSet, StatefulSetStatus,
    StatefulSetUpdate, VolumeClaimTemplate, stateful_set_condition,
};
pub use volume::{
    AccessMode, CLAIM_PROTECTION_FINALIZER, ClaimPhase, ClaimReference, PersistentVolume, PersistentVolumeStatus,
    ReclaimPolicy, VOLUME_PROTECTION_FINALIZER, VOLUME_RECLAIM_FINALIZER, VolumeClaim, VolumeClaimStatus, VolumePhase,
    volume_name_for_claim,
};
pub use workflow::{FailurePolicy, STEP_ANNOTATION, StepPhase, StepStatus, Workflow, WorkflowStatus, WorkflowStep};
pub use workload::{
    Affinity, AffinityTerm, Container, ContainerPort, ContainerState, ContainerStatus, EnvVar, NodeAffinity,
    NodeSelectorOperator, NodeSelectorRequirement, NodeSelectorTerm, PRE_STOP_FINALIZER, Phase, PortStatus, Probe,
    ProbeAction, Protocol, ResourceRequirements, RestartPolicy, SchedulingGroup, Toleration, TolerationOperator,
    TopologySpreadConstraint, Volume, VolumeMount, VolumeSource, Weighted, WhenUnsatisfiable, Workload,
    WorkloadAffinity, WorkloadStatus,
};

use crate::meta::Timestamp;
use crate::quantity::Quantity;
use crate::validation::{self, Validator};

/// Amounts by resource name: `cpu`, `memory`, `gpu`, `pods`, or any qualified extended resource
/// name such as `example.com/fpga`.
pub type Resources = BTreeMap<String, Quantity>;

/// Well-known resource names.
pub mod resource {
    /// CPU cores (`500m` is half a core).
    pub const CPU: &str = "cpu";
    /// Memory in bytes (`2Gi`).
    pub const MEMORY: &str = "memory";
    /// GPUs: a fraction of one (`300m`) shares a device; more than one must be whole.
    pub const GPU: &str = "gpu";
    /// Number of workloads a node accepts.
    pub const PODS: &str = "pods";
}

/// Checks that every resource name is well-formed and every amount non-negative.
pub(crate) fn validate_resources(field: &str, r: &Resources, v: &mut Validator) {
    for (name, q) in r {
        v.check_with(|| format!("{field}.{name}"), validation::qualified_name(name));
        if q.is_negative() {
            v.reject(format!("{field}.{name}"), format!("must be >= 0 (is {q})"));
        }
    }
}

/// Whether a condition holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConditionStatus {
    /// It holds.
    True,
    /// It does not hold.
    False,
    /// Nobody knows (for instance, the reporter stopped reporting).
    #[default]
    Unknown,
}

/// One observed fact about an object (`Ready`, `Scheduled`…), with why and since when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Condition {
    /// What the condition is about, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// A CamelCase reason for machines, e.g. `Unschedulable`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// A sentence for people.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When `status` last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Timestamp>,
}

impl Condition {
    /// A condition of `type_` with the given status and reason.
    pub fn new(type_: impl Into<String>, status: ConditionStatus, reason: impl Into<String>) -> Self {
        Condition { type_: type_.into(), status, reason: reason.into(), ..Default::default() }
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Sets a condition, keeping its transition time when the status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, mut c: Condition, now: Timestamp) {
    match conditions.iter_mut().find(|x| x.type_ == c.type_) {
        Some(existing) => {
            c.last_transition_time =
                if existing.status == c.status { existing.last_transition_time } else { Some(now) };
            *existing = c;
        }
        None => {
            c.last_transition_time = Some(now);
            conditions.push(c);
        }
    }
}

fn validate_conditions(field: &str, conditions: &[Condition], v: &mut Validator) {
    let mut seen = std::collections::HashSet::new();
    for (i, c) in conditions.iter().enumerate() {
        if c.type_.is_empty() {
            v.reject(format!("{field}[{i}].type"), "must not be empty");
        } else if !seen.insert(&c.type_) {
            v.reject(format!("{field}[{i}].type"), format!("duplicate condition {:?}", c.type_));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_condition_keeps_transition_time_when_unchanged() {
        let mut cs = Vec::new();
        set_condition(&mut cs, Condition::new("Ready", ConditionStatus::True, "Ok"), Timestamp(1));
        set_condition(&mut cs, Condition::new("Ready", ConditionStatus::True, "StillOk"), Timestamp(2));
        assert_eq!(cs[0].last_transition_time, Some(Timestamp(1)));
        assert_eq!(cs[0].reason, "StillOk");
        set_condition(&mut cs, Condition::new("Ready", ConditionStatus::False, "Down"), Timestamp(3));
        assert_eq!(cs[0].last_transition_time, Some(Timestamp(3)));
        assert_eq!(cs.len(), 1);
    }
}
