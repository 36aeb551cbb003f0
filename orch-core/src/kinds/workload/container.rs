//! What runs: a [`Container`] (command, image, env, ports, resources, probes) and the volumes it
//! mounts.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::kinds::Resources;
use crate::quantity::Quantity;

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
    /// Working directory: an absolute path, or `$(ORCH_VOLUME_<NAME>)` for the directory of
    /// the workload's volume `<name>` on a runtime that gives volumes to programs by directory
    /// (the process runtime), so a program can run inside its volume.
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

impl Volume {
    /// The environment variable a runtime that gives volumes to programs by directory (the
    /// process runtime) names this volume's directory by: `ORCH_VOLUME_<NAME>`, the name upper
    /// case with every other character than a letter or digit as `_` (`scratch-1` gives
    /// `ORCH_VOLUME_SCRATCH_1`).
    pub fn env_var(name: &str) -> String {
        let var: String =
            name.chars().map(|ch| if ch.is_ascii_alphanumeric() { ch.to_ascii_uppercase() } else { '_' }).collect();
        format!("ORCH_VOLUME_{var}")
    }
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
