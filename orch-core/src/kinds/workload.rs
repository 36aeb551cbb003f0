use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{Condition, Resources, resource, validate_conditions, validate_resources};
use crate::labels::Labels;
use crate::meta::Timestamp;
use crate::object::{Resource, Scope};
use crate::quantity::Quantity;
use crate::selector::LabelSelector;
use crate::validation::{self, Validator};

/// The unit that is scheduled onto a node and run there, like a Kubernetes pod: one or more
/// containers (or plain processes) sharing a node, volumes and a lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Workload {
    /// What runs; at least one.
    pub containers: Vec<Container>,
    /// Storage the containers can mount.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// What the node agent does when a container exits.
    pub restart_policy: RestartPolicy,
    /// The node it is bound to; set by the scheduler (or by the user, to skip scheduling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Only nodes with all these labels qualify.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub node_selector: Labels,
    /// Node and workload (anti-)affinity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Taints this workload accepts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Higher runs first and may preempt lower.
    pub priority: i32,
    /// Which scheduler places it; `None` for the default one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    /// How long a stop waits between the polite signal and the kill.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<u64>,
    /// How to spread matching workloads across topology domains.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// A gang this workload belongs to: the scheduler binds its members all together or none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduling_group: Option<SchedulingGroup>,
}

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

/// One container (or process) of a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Container {
    /// Unique within the workload; a DNS-1123 label.
    pub name: String,
    /// Image to run (container runtimes); process runtimes run `command` directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Executable and its first arguments; replaces the image's entry point.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Further arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Resources the scheduler reserves (requests) and the runtime enforces (limits).
    pub resources: ResourceRequirements,
    /// Ports it listens on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// Volumes mounted into it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Restart the container when this fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    /// Keep the workload out of service endpoints while this fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    /// Hold the other probes back until this succeeds once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
}

/// An environment variable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvVar {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// Requests (reserved by the scheduler) and limits (enforced by the runtime).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceRequirements {
    /// Reserved on the node.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: Resources,
    /// Never exceeded.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: Resources,
}

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    #[default]
    TCP,
    /// UDP.
    UDP,
}

/// A port a container listens on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerPort {
    /// Optional name, unique in the workload; services can target it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port inside the container, 1-65535.
    pub container_port: u32,
    /// Also bind this port on the node (the scheduler keeps host ports unique per node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u32>,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// Where a volume's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VolumeSource {
    /// A directory on the node, shared with the host.
    HostPath {
        /// Absolute path on the node.
        path: String,
    },
    /// A fresh per-workload directory, removed with the workload.
    EmptyDir {
        /// Optional size cap.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size_limit: Option<Quantity>,
    },
    /// A named volume claim, provisioned and attached by a volume controller.
    Claim {
        /// The claim's name, in the workload's namespace.
        claim_name: String,
    },
}

/// A named volume of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    /// Unique within the workload; a DNS-1123 label.
    pub name: String,
    /// Where its data comes from.
    pub source: VolumeSource,
}

/// A volume mounted into a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VolumeMount {
    /// Name of one of the workload's volumes.
    pub name: String,
    /// Absolute path inside the container.
    pub mount_path: String,
    /// Mount read-only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeAction {
    /// Runs a command in the container; exit code 0 is success.
    Exec {
        /// The command.
        command: Vec<String>,
    },
    /// HTTP GET; a 2xx or 3xx answer is success.
    Http {
        /// Path, e.g. `/healthz`.
        path: String,
        /// Port, 1-65535.
        port: u32,
    },
    /// A TCP connection that opens is success.
    Tcp {
        /// Port, 1-65535.
        port: u32,
    },
}

/// A periodic health check run by the node agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// What to check.
    pub action: ProbeAction,
    /// Wait this long after start before the first check.
    #[serde(default)]
    pub initial_delay_seconds: u32,
    /// Check this often (at least 1).
    #[serde(default = "one_ten")]
    pub period_seconds: u32,
    /// Give up on one check after this long (at least 1).
    #[serde(default = "one")]
    pub timeout_seconds: u32,
    /// Consecutive failures that count as failed (at least 1).
    #[serde(default = "three")]
    pub failure_threshold: u32,
    /// Consecutive successes that count as healthy again (at least 1).
    #[serde(default = "one")]
    pub success_threshold: u32,
}

fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}
fn one_ten() -> u32 {
    10
}

/// What the node agent does when a container exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Restart whatever the exit code (services).
    #[default]
    Always,
    /// Restart on a non-zero exit (batch jobs that may fail).
    OnFailure,
    /// Never restart.
    Never,
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
    pub effect: Option<super::TaintEffect>,
    /// For `NoExecute`: stay this long after the taint appears, then be evicted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<u64>,
}

impl Toleration {
    /// True when this toleration lets the workload onto a node with `taint`.
    pub fn tolerates(&self, taint: &super::Taint) -> bool {
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

/// Lifecycle phase of a workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Accepted; not yet running (unscheduled, or starting).
    #[default]
    Pending,
    /// Bound to a node and at least one container is running.
    Running,
    /// Every container exited with success and will not restart.
    Succeeded,
    /// Every container exited and at least one failed; none will restart.
    Failed,
    /// The node stopped reporting.
    Unknown,
}

/// State of one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ContainerState {
    /// Not started yet (or waiting out a crash-loop backoff).
    Waiting {
        /// Why, e.g. `CrashLoopBackOff`.
        reason: String,
    },
    /// Running since `started_at`.
    Running {
        /// When it started.
        started_at: Timestamp,
    },
    /// Exited.
    Terminated {
        /// Exit code (128 + n when killed by signal n).
        exit_code: i32,
        /// Why, e.g. `Completed`, `Error`, `OOMKilled`.
        reason: String,
        /// When it exited.
        finished_at: Timestamp,
    },
}

/// What the node agent reports about one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    /// Container name.
    pub name: String,
    /// Current state.
    pub state: ContainerState,
    /// Passing its readiness probe (or running, without one).
    pub ready: bool,
    /// Times restarted.
    pub restart_count: u32,
}

/// Observed state of a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadStatus {
    /// Lifecycle phase.
    pub phase: Phase,
    /// `Scheduled`, `Ready`…
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Restarts across all containers.
    pub restart_count: u32,
    /// Per-container state.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub container_statuses: Vec<ContainerStatus>,
    /// When the agent first started it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Timestamp>,
    /// A CamelCase reason for the phase.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// A sentence for people.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Workload {
    /// A workload of one container running `command` (builder style start).
    pub fn command(name: &str, command: &[&str]) -> Self {
        Workload {
            containers: vec![Container {
                name: name.into(),
                command: command.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Sum of the containers' requests (what the scheduler reserves).
    pub fn requests(&self) -> Resources {
        let mut total = Resources::new();
        for c in &self.containers {
            for (k, q) in &c.resources.requests {
                let e = total.entry(k.clone()).or_default();
                *e = *e + *q;
            }
        }
        total
    }
}

fn check_port(v: &mut Validator, field: impl FnOnce() -> String, port: u32) {
    if !(1..=65535).contains(&port) {
        v.reject(field(), format!("must be between 1 and 65535 (is {port})"));
    }
}

fn validate_probe(field: &str, p: &Probe, v: &mut Validator) {
    match &p.action {
        ProbeAction::Exec { command } if command.is_empty() => {
            v.reject(format!("{field}.action.exec.command"), "must not be empty")
        }
        ProbeAction::Http { path, port } => {
            check_port(v, || format!("{field}.action.http.port"), *port);
            if !path.starts_with('/') {
                v.reject(format!("{field}.action.http.path"), "must start with '/'");
            }
        }
        ProbeAction::Tcp { port } => check_port(v, || format!("{field}.action.tcp.port"), *port),
        ProbeAction::Exec { .. } => {}
    }
    for (name, value) in [
        ("periodSeconds", p.period_seconds),
        ("timeoutSeconds", p.timeout_seconds),
        ("failureThreshold", p.failure_threshold),
        ("successThreshold", p.success_threshold),
    ] {
        if value == 0 {
            v.reject(format!("{field}.{name}"), "must be >= 1");
        }
    }
}

fn validate_node_term(field: &str, t: &NodeSelectorTerm, v: &mut Validator) {
    for (i, r) in t.match_expressions.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        v.check_with(|| format!("{f}.key"), validation::qualified_name(&r.key));
        match r.operator {
            NodeSelectorOperator::In | NodeSelectorOperator::NotIn if r.values.is_empty() => {
                v.reject(format!("{f}.values"), "must not be empty for In and NotIn")
            }
            NodeSelectorOperator::Exists | NodeSelectorOperator::DoesNotExist if !r.values.is_empty() => {
                v.reject(format!("{f}.values"), "must be empty for Exists and DoesNotExist")
            }
            NodeSelectorOperator::Gt | NodeSelectorOperator::Lt
                if r.values.len() != 1 || r.values[0].parse::<i64>().is_err() =>
            {
                v.reject(format!("{f}.values"), "must be exactly one integer for Gt and Lt")
            }
            _ => {}
        }
    }
}

fn validate_weight(field: String, w: i32, v: &mut Validator) {
    if !(1..=100).contains(&w) {
        v.reject(field, format!("must be between 1 and 100 (is {w})"));
    }
}

fn validate_affinity_term(field: &str, t: &AffinityTerm, v: &mut Validator) {
    if let Err(crate::Error::Invalid { source, .. }) = t.label_selector.validate(&format!("{field}.labelSelector")) {
        for e in source.errors {
            v.reject(e.field, e.reason);
        }
    }
    v.check_with(|| format!("{field}.topologyKey"), validation::qualified_name(&t.topology_key));
    for (i, ns) in t.namespaces.iter().enumerate() {
        v.check_with(|| format!("{field}.namespaces[{i}]"), validation::dns1123_label(ns));
    }
}

fn validate_workload_affinity(field: &str, a: &WorkloadAffinity, v: &mut Validator) {
    for (i, t) in a.required.iter().enumerate() {
        validate_affinity_term(&format!("{field}.required[{i}]"), t, v);
    }
    for (i, w) in a.preferred.iter().enumerate() {
        validate_weight(format!("{field}.preferred[{i}].weight"), w.weight, v);
        validate_affinity_term(&format!("{field}.preferred[{i}].term"), &w.term, v);
    }
}

impl Resource for Workload {
    const KIND: &'static str = "Workload";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = WorkloadStatus;

    fn validate(&self, v: &mut Validator) {
        if self.containers.is_empty() {
            v.reject("spec.containers", "must have at least one container");
        }
        if let Some(g) = &self.scheduling_group {
            v.check_with(|| "spec.schedulingGroup.name".into(), validation::dns1123_label(&g.name));
            if g.min_members == 0 {
                v.reject("spec.schedulingGroup.minMembers", "must be >= 1");
            }
            if let Some(t) = g.timeout_seconds.filter(|t| !(1..=86_400).contains(t)) {
                v.reject("spec.schedulingGroup.timeoutSeconds", format!("must be between 1 and 86400 (is {t})"));
            }
        }
        if let Some(gpu) = self.requests().get(resource::GPU)
            && *gpu > Quantity::from_units(1)
            && gpu.nanos() % 1_000_000_000 != 0
        {
            v.reject(
                    "spec.containers",
                    format!("the containers' gpu requests add up to {gpu}: a share of one GPU must be below 1, more must be whole"),
                );
        }
        let mut volume_names = HashSet::new();
        for (i, vol) in self.volumes.iter().enumerate() {
            v.check_with(|| format!("spec.volumes[{i}].name"), validation::dns1123_label(&vol.name));
            if !volume_names.insert(vol.name.as_str()) {
                v.reject(format!("spec.volumes[{i}].name"), format!("duplicate volume name {:?}", vol.name));
            }
            match &vol.source {
                VolumeSource::HostPath { path } if !path.starts_with('/') => {
                    v.reject(format!("spec.volumes[{i}].source.hostPath.path"), "must be an absolute path")
                }
                VolumeSource::EmptyDir { size_limit: Some(q) } if q.is_negative() => {
                    v.reject(format!("spec.volumes[{i}].source.emptyDir.sizeLimit"), "must be >= 0")
                }
                VolumeSource::Claim { claim_name } => v.check_with(
                    || format!("spec.volumes[{i}].source.claim.claimName"),
                    validation::dns1123_subdomain(claim_name),
                ),
                _ => {}
            }
        }
        let mut names = HashSet::new();
        let mut port_names = HashSet::new();
        let mut host_ports = HashSet::new();
        for (ci, c) in self.containers.iter().enumerate() {
            let f = format!("spec.containers[{ci}]");
            v.check_with(|| format!("{f}.name"), validation::dns1123_label(&c.name));
            if !names.insert(c.name.as_str()) {
                v.reject(format!("{f}.name"), format!("duplicate container name {:?}", c.name));
            }
            if c.image.as_deref().is_none_or(str::is_empty) && c.command.is_empty() {
                v.reject(format!("{f}.command"), "an image or a command is required");
            }
            if c.command.first().is_some_and(String::is_empty) {
                v.reject(format!("{f}.command[0]"), "must not be empty");
            }
            for (ei, e) in c.env.iter().enumerate() {
                if e.name.is_empty() || e.name.contains('=') || e.name.contains('\0') {
                    v.reject(format!("{f}.env[{ei}].name"), "must be non-empty, without '=' or NUL");
                }
            }
            if let Some(dir) = &c.working_dir
                && !dir.starts_with('/')
            {
                v.reject(format!("{f}.workingDir"), "must be an absolute path");
            }
            validate_resources(&format!("{f}.resources.requests"), &c.resources.requests, v);
            validate_resources(&format!("{f}.resources.limits"), &c.resources.limits, v);
            for (name, req) in &c.resources.requests {
                if let Some(lim) = c.resources.limits.get(name)
                    && req > lim
                {
                    v.reject(
                        format!("{f}.resources.requests.{name}"),
                        format!("must not exceed the limit ({req} > {lim})"),
                    );
                }
            }
            if let Some(gpu) = c.resources.requests.get(resource::GPU)
                && *gpu > Quantity::from_units(1)
                && gpu.nanos() % 1_000_000_000 != 0
            {
                v.reject(
                    format!("{f}.resources.requests.gpu"),
                    format!("a share of one GPU must be below 1; more than one must be whole (is {gpu})"),
                );
            }
            let mut container_ports = HashSet::new();
            for (pi, p) in c.ports.iter().enumerate() {
                let pf = format!("{f}.ports[{pi}]");
                check_port(v, || format!("{pf}.containerPort"), p.container_port);
                if let Some(hp) = p.host_port {
                    check_port(v, || format!("{pf}.hostPort"), hp);
                    if !host_ports.insert((hp, p.protocol)) {
                        v.reject(format!("{pf}.hostPort"), format!("host port {hp}/{:?} is used twice", p.protocol));
                    }
                }
                if !container_ports.insert((p.container_port, p.protocol)) {
                    v.reject(
                        format!("{pf}.containerPort"),
                        format!("port {}/{:?} is listed twice", p.container_port, p.protocol),
                    );
                }
                if let Some(name) = &p.name {
                    v.check_with(|| format!("{pf}.name"), validation::dns1123_label(name));
                    if !port_names.insert(name.as_str()) {
                        v.reject(format!("{pf}.name"), format!("duplicate port name {name:?}"));
                    }
                }
            }
            let mut mount_paths = HashSet::new();
            for (mi, m) in c.volume_mounts.iter().enumerate() {
                if !volume_names.contains(m.name.as_str()) {
                    v.reject(format!("{f}.volumeMounts[{mi}].name"), format!("no volume named {:?}", m.name));
                }
                if !m.mount_path.starts_with('/') {
                    v.reject(format!("{f}.volumeMounts[{mi}].mountPath"), "must be an absolute path");
                } else if !mount_paths.insert(m.mount_path.as_str()) {
                    v.reject(
                        format!("{f}.volumeMounts[{mi}].mountPath"),
                        format!("{:?} is mounted twice", m.mount_path),
                    );
                }
            }
            for (name, probe) in [
                ("livenessProbe", &c.liveness_probe),
                ("readinessProbe", &c.readiness_probe),
                ("startupProbe", &c.startup_probe),
            ] {
                if let Some(p) = probe {
                    validate_probe(&format!("{f}.{name}"), p, v);
                }
            }
        }
        if let Some(node) = &self.node_name {
            v.check_with(|| "spec.nodeName".into(), validation::dns1123_subdomain(node));
        }
        for (k, val) in &self.node_selector {
            v.check_with(|| format!("spec.nodeSelector[{k:?}]"), validation::qualified_name(k));
            v.check_with(|| format!("spec.nodeSelector[{k:?}]"), validation::label_value(val));
        }
        for (i, t) in self.tolerations.iter().enumerate() {
            if t.operator == TolerationOperator::Exists && !t.value.is_empty() {
                v.reject(format!("spec.tolerations[{i}].value"), "must be empty when operator is Exists");
            }
            if t.key.is_empty() && t.operator != TolerationOperator::Exists {
                v.reject(format!("spec.tolerations[{i}].operator"), "must be Exists when key is empty");
            }
            if !t.key.is_empty() {
                v.check_with(|| format!("spec.tolerations[{i}].key"), validation::qualified_name(&t.key));
            }
        }
        if let Some(a) = &self.affinity {
            if let Some(na) = &a.node_affinity {
                for (i, t) in na.required.iter().enumerate() {
                    validate_node_term(&format!("spec.affinity.nodeAffinity.required[{i}]"), t, v);
                }
                for (i, w) in na.preferred.iter().enumerate() {
                    validate_weight(format!("spec.affinity.nodeAffinity.preferred[{i}].weight"), w.weight, v);
                    validate_node_term(&format!("spec.affinity.nodeAffinity.preferred[{i}].term"), &w.term, v);
                }
            }
            if let Some(wa) = &a.workload_affinity {
                validate_workload_affinity("spec.affinity.workloadAffinity", wa, v);
            }
            if let Some(wa) = &a.workload_anti_affinity {
                validate_workload_affinity("spec.affinity.workloadAntiAffinity", wa, v);
            }
        }
        for (i, t) in self.topology_spread_constraints.iter().enumerate() {
            if t.max_skew < 1 {
                v.reject(
                    format!("spec.topologySpreadConstraints[{i}].maxSkew"),
                    format!("must be >= 1 (is {})", t.max_skew),
                );
            }
            v.check_with(
                || format!("spec.topologySpreadConstraints[{i}].topologyKey"),
                validation::qualified_name(&t.topology_key),
            );
        }
    }

    fn validate_status(status: &WorkloadStatus, v: &mut Validator) {
        validate_conditions("status.conditions", &status.conditions, v);
    }

    fn indexers() -> Vec<(String, crate::cache::Indexer<Self>)> {
        vec![(
            crate::cache::NODE_INDEX.to_string(),
            std::sync::Arc::new(|w: &crate::Object<Workload>| w.spec.node_name.iter().cloned().collect()),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::{Taint, TaintEffect};
    use crate::meta::ObjectMeta;
    use crate::object::Object;

    fn req(pairs: &[(&str, &str)]) -> Resources {
        pairs.iter().map(|(k, v)| (k.to_string(), v.parse().unwrap())).collect()
    }

    #[test]
    fn valid_workload_passes() {
        let mut w = Workload::command("main", &["/bin/sleep", "60"]);
        w.containers[0].resources.requests = req(&[("cpu", "100m"), ("memory", "500Mi"), ("gpu", "300m")]);
        w.containers[0].ports =
            vec![ContainerPort { name: Some("http".into()), container_port: 8080, ..Default::default() }];
        w.volumes = vec![Volume { name: "data".into(), source: VolumeSource::EmptyDir { size_limit: None } }];
        w.containers[0].volume_mounts =
            vec![VolumeMount { name: "data".into(), mount_path: "/data".into(), read_only: false }];
        Object::new(ObjectMeta::namespaced("default", "web-0"), w).validate().unwrap();
    }

    #[test]
    fn invalid_workload_names_every_field() {
        let mut w = Workload::command("main", &["/bin/true"]);
        w.containers.push(Container { name: "main".into(), ..Default::default() });
        w.containers[0].resources.requests = req(&[("cpu", "-1"), ("gpu", "1500m"), ("memory", "2Gi")]);
        w.containers[0].resources.limits = req(&[("memory", "1Gi")]);
        w.containers[0].ports = vec![
            ContainerPort { container_port: 0, ..Default::default() },
            ContainerPort { container_port: 80, host_port: Some(80), ..Default::default() },
        ];
        w.containers[1].ports = vec![ContainerPort { container_port: 81, host_port: Some(80), ..Default::default() }];
        w.containers[0].volume_mounts =
            vec![VolumeMount { name: "nope".into(), mount_path: "data".into(), read_only: false }];
        w.tolerations = vec![Toleration {
            operator: TolerationOperator::Exists,
            value: "x".into(),
            key: "k".into(),
            ..Default::default()
        }];
        w.topology_spread_constraints =
            vec![TopologySpreadConstraint { max_skew: 0, topology_key: "zone".into(), ..Default::default() }];
        let e = Object::new(ObjectMeta::namespaced("default", "w"), w).validate().unwrap_err();
        let crate::Error::Invalid { source, .. } = &e else { panic!("{e}") };
        for field in [
            "spec.containers[1].name",
            "spec.containers[1].command",
            "spec.containers[0].resources.requests.cpu",
            "spec.containers[0].resources.requests.gpu",
            "spec.containers[0].resources.requests.memory",
            "spec.containers[0].ports[0].containerPort",
            "spec.containers[1].ports[0].hostPort",
            "spec.containers[0].volumeMounts[0].name",
            "spec.containers[0].volumeMounts[0].mountPath",
            "spec.tolerations[0].value",
            "spec.topologySpreadConstraints[0].maxSkew",
        ] {
            assert!(source.has_field(field), "missing {field} in {e}");
        }
    }

    #[test]
    fn tolerations_and_node_terms() {
        let taint =
            Taint { key: "dedicated".into(), value: "gpu".into(), effect: TaintEffect::NoSchedule, time_added: None };
        let eq = Toleration { key: "dedicated".into(), value: "gpu".into(), ..Default::default() };
        let other = Toleration { key: "dedicated".into(), value: "cpu".into(), ..Default::default() };
        let all = Toleration { operator: TolerationOperator::Exists, ..Default::default() };
        let wrong_effect = Toleration { effect: Some(TaintEffect::NoExecute), ..all.clone() };
        assert!(eq.tolerates(&taint));
        assert!(!other.tolerates(&taint));
        assert!(all.tolerates(&taint));
        assert!(!wrong_effect.tolerates(&taint));

        let labels = Labels::from([("cores", "16")]);
        let gt = NodeSelectorRequirement {
            key: "cores".into(),
            operator: NodeSelectorOperator::Gt,
            values: vec!["8".into()],
        };
        let lt = NodeSelectorRequirement { operator: NodeSelectorOperator::Lt, ..gt.clone() };
        assert!(gt.matches(&labels));
        assert!(!lt.matches(&labels));
    }

    #[test]
    fn requests_sum_over_containers() {
        let mut w = Workload::command("a", &["x"]);
        w.containers.push(Container { name: "b".into(), command: vec!["y".into()], ..Default::default() });
        w.containers[0].resources.requests = req(&[("cpu", "250m")]);
        w.containers[1].resources.requests = req(&[("cpu", "750m"), ("memory", "1Gi")]);
        let total = w.requests();
        assert_eq!(total["cpu"], "1".parse().unwrap());
        assert_eq!(total["memory"].to_string(), "1Gi");
    }
}
