//! The [`Workload`] kind: what runs (containers and volumes), where it may run (scheduling
//! constraints), its status, and the validation of its spec.

use serde::{Deserialize, Serialize};

use super::{Condition, Resources, validate_conditions};
use crate::labels::Labels;
use crate::meta::Timestamp;
use crate::object::{Resource, Scope};
use crate::validation::Validator;

mod container;
mod scheduling;
mod validate;

pub use container::*;
pub use scheduling::*;

/// The unit that is scheduled onto a node and run there, like a Kubernetes pod: one or more
/// containers (or plain processes) sharing a node, volumes and a lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Workload {
    /// What runs; at least one.
    #[serde(deserialize_with = "crate::json::exact_vec")]
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
    /// How long a deleted workload keeps running, marked terminating in its services'
    /// endpoints, before it is signalled: the time proxies and resolvers need to stop sending
    /// it new traffic (0-3600). Unset: the node agent's default for workloads with ports (none
    /// for workloads without).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pre_stop_delay_seconds: Option<u64>,
    /// How to spread matching workloads across topology domains.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// A gang this workload belongs to: the scheduler binds its members all together or none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduling_group: Option<SchedulingGroup>,
}

/// The finalizer a node agent puts on a workload it runs with a pre-stop delay: a deleted
/// workload then stays (terminating) until the agent has waited out the delay and stopped it.
pub const PRE_STOP_FINALIZER: &str = "orch.dev/pre-stop";

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
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::json::exact_vec")]
    pub conditions: Vec<Condition>,
    /// Restarts across all containers.
    pub restart_count: u32,
    /// Per-container state.
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::json::exact_vec")]
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
    /// The address of its node that its ports are reached at (the node's `--address`), set by
    /// the node agent once it runs.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Where each of its containers' ports is reached at `address`: the host port the node
    /// agent allocated (or the one the spec fixed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortStatus>,
}

/// One container port of a running workload and the host port it is reached at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortStatus {
    /// The container that declares it.
    pub container: String,
    /// The port's name, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port in the spec (`containerPort`).
    pub container_port: u32,
    /// The port on the node's address that reaches it.
    pub host_port: u32,
    /// TCP or UDP.
    pub protocol: Protocol,
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

impl Resource for Workload {
    const KIND: &'static str = "Workload";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = WorkloadStatus;

    fn validate(&self, v: &mut Validator) {
        validate::validate_spec(self, v);
    }

    fn validate_status(status: &WorkloadStatus, v: &mut Validator) {
        validate_conditions("status.conditions", &status.conditions, v);
        if !status.address.is_empty() && status.address.parse::<std::net::IpAddr>().is_err() {
            v.reject("status.address", format!("{:?} is not an IP address", status.address));
        }
        for (i, p) in status.ports.iter().enumerate() {
            for (field, port) in [("containerPort", p.container_port), ("hostPort", p.host_port)] {
                if !(1..=65535).contains(&port) {
                    v.reject(format!("status.ports[{i}].{field}"), format!("must be 1-65535 (is {port})"));
                }
            }
        }
    }

    fn indexers() -> Vec<(String, crate::cache::Indexer<Self>)> {
        vec![
            (
                crate::cache::NODE_INDEX.to_string(),
                std::sync::Arc::new(|w: &crate::Object<Workload>| w.spec.node_name.iter().cloned().collect()),
            ),
            (
                crate::cache::CLAIM_INDEX.to_string(),
                std::sync::Arc::new(|w: &crate::Object<Workload>| {
                    w.spec
                        .volumes
                        .iter()
                        .filter_map(|v| match &v.source {
                            VolumeSource::Claim { claim_name } => {
                                Some(format!("{}/{claim_name}", w.metadata.namespace))
                            }
                            _ => None,
                        })
                        .collect()
                }),
            ),
        ]
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
        w.pre_stop_delay_seconds = Some(3601);
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
            "spec.preStopDelaySeconds",
        ] {
            assert!(source.has_field(field), "missing {field} in {e}");
        }
    }

    #[test]
    fn a_working_dir_is_absolute_or_the_whole_variable_of_one_of_its_volumes() {
        let with_dir = |dir: &str| {
            let mut w = Workload::command("main", &["/bin/true"]);
            w.volumes = vec![Volume { name: "db-data".into(), source: VolumeSource::EmptyDir { size_limit: None } }];
            w.containers[0].working_dir = Some(dir.into());
            Object::new(ObjectMeta::namespaced("default", "w"), w).validate()
        };
        with_dir("/srv").unwrap();
        with_dir("$(ORCH_VOLUME_DB_DATA)").unwrap();
        assert_eq!(Volume::env_var("db-data"), "ORCH_VOLUME_DB_DATA");
        for (dir, says) in [
            ("srv", "must be an absolute path or $(ORCH_VOLUME_<NAME>)"),
            (
                "$(ORCH_VOLUME_LOGS)",
                "$(ORCH_VOLUME_LOGS) names none of the workload's volumes (it has: ORCH_VOLUME_DB_DATA)",
            ),
            ("$(HOME)", "only the whole of $(ORCH_VOLUME_<NAME>) is expanded"),
            ("$(ORCH_VOLUME_DB_DATA)/sub", "only the whole of $(ORCH_VOLUME_<NAME>) is expanded"),
        ] {
            let e = with_dir(dir).unwrap_err();
            let crate::Error::Invalid { source, .. } = &e else { panic!("{e}") };
            assert!(source.has_field("spec.containers[0].workingDir"), "{dir}: {e}");
            assert!(e.to_string().contains(says), "{dir}: {e}");
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
