use serde::{Deserialize, Serialize};

use super::{Condition, Resources, validate_conditions, validate_resources};
use crate::meta::Timestamp;
use crate::object::{Resource, Scope};
use crate::quantity::Quantity;
use crate::validation::{self, Validator};

/// A machine that runs workloads. The spec is what operators set (cordon, taints); the status is
/// what the node's agent reports (capacity, devices, conditions, addresses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Node {
    /// Cordoned: the scheduler places nothing new here.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    /// Repel workloads that do not tolerate them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// The machine's id at its provider (cloud instance id), for autoscalers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
}

/// What a node's agent observes about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeStatus {
    /// Total resources of the machine.
    pub capacity: Resources,
    /// The part of `capacity` workloads may use.
    pub allocatable: Resources,
    /// Individual devices (GPUs), so schedulers can place by model and share each one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
    /// `Ready` and friends.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How to reach the node.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
    /// The volume classes whose volumes this node's agent provides, with the room for them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<NodeStorage>,
}

/// Node-local storage of one volume class that a node's agent provides: volumes of the class are
/// created on this node, up to `capacity` in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeStorage {
    /// The volume class (`local`, `docker`).
    pub volume_class: String,
    /// Room for all volumes of the class on this node, in bytes.
    pub capacity: crate::quantity::Quantity,
    /// The access modes its volumes offer.
    pub access_modes: Vec<super::AccessMode>,
}

/// One device on a node, tracked individually (a GPU, for example).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Device {
    /// Unique on the node, e.g. `gpu0`.
    pub id: String,
    /// The resource it counts towards, e.g. `gpu`.
    pub resource: String,
    /// The model, e.g. `V100M32`, for workloads that ask for one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model: String,
}

/// An address of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`…
    #[serde(rename = "type")]
    pub type_: String,
    /// The address.
    pub address: String,
}

/// What a taint does to workloads that do not tolerate it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaintEffect {
    /// Do not place new workloads here.
    #[default]
    NoSchedule,
    /// Avoid placing new workloads here if possible.
    PreferNoSchedule,
    /// Also evict workloads already running here.
    NoExecute,
}

/// A mark on a node that repels workloads without a matching toleration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Taint {
    /// A qualified name, e.g. `dedicated` or `orch.dev/unreachable`.
    pub key: String,
    /// Optional value.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// What it does.
    pub effect: TaintEffect,
    /// When it was added (set for `NoExecute` taints, which time evictions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_added: Option<Timestamp>,
}

impl Resource for Node {
    const KIND: &'static str = "Node";
    const SCOPE: Scope = Scope::Cluster;
    type Status = NodeStatus;

    fn validate(&self, v: &mut Validator) {
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.taints.iter().enumerate() {
            v.check_with(|| format!("spec.taints[{i}].key"), validation::qualified_name(&t.key));
            v.check_with(|| format!("spec.taints[{i}].value"), validation::label_value(&t.value));
            if !seen.insert((&t.key, t.effect)) {
                v.reject(
                    format!("spec.taints[{i}]"),
                    format!("duplicate taint {:?} with effect {:?}", t.key, t.effect),
                );
            }
        }
    }

    fn validate_status(status: &NodeStatus, v: &mut Validator) {
        validate_resources("status.capacity", &status.capacity, v);
        validate_resources("status.allocatable", &status.allocatable, v);
        for (name, q) in &status.allocatable {
            if let Some(cap) = status.capacity.get(name)
                && q > cap
            {
                v.reject(format!("status.allocatable.{name}"), format!("must not exceed capacity ({q} > {cap})"));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, d) in status.devices.iter().enumerate() {
            if d.id.is_empty() {
                v.reject(format!("status.devices[{i}].id"), "must not be empty");
            } else if !ids.insert(&d.id) {
                v.reject(format!("status.devices[{i}].id"), format!("duplicate device id {:?}", d.id));
            }
            v.check_with(|| format!("status.devices[{i}].resource"), validation::qualified_name(&d.resource));
        }
        for (res, q) in &status.capacity {
            let devices = status.devices.iter().filter(|d| &d.resource == res).count();
            if devices > 0 && *q != Quantity::from_units(devices as i64) {
                v.reject(format!("status.capacity.{res}"), format!("is {q} but {devices} devices of it are listed"));
            }
        }
        for (i, st) in status.storage.iter().enumerate() {
            if st.volume_class.is_empty() {
                v.reject(format!("status.storage[{i}].volumeClass"), "must name a volume class");
            } else {
                v.check_with(
                    || format!("status.storage[{i}].volumeClass"),
                    validation::dns1123_subdomain(&st.volume_class),
                );
                if status.storage[..i].iter().any(|o| o.volume_class == st.volume_class) {
                    v.reject(
                        format!("status.storage[{i}].volumeClass"),
                        format!("{:?} is listed twice", st.volume_class),
                    );
                }
            }
            if st.capacity.is_negative() {
                v.reject(format!("status.storage[{i}].capacity"), format!("must not be negative (is {})", st.capacity));
            }
            if st.access_modes.is_empty() {
                v.reject(format!("status.storage[{i}].accessModes"), "must offer at least one access mode");
            }
        }
        validate_conditions("status.conditions", &status.conditions, v);
    }
}

/// Namespace of node heartbeat leases.
pub const NODE_LEASE_NAMESPACE: &str = "orch-node-lease";

/// A node's heartbeat: it exists while the node's agent keeps its store lease alive (the
/// object is bound to that lease), so the node lifecycle controller sees a silent node as one
/// whose `NodeLease` is gone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeLease {
    /// The node.
    pub holder: String,
}

impl Resource for NodeLease {
    const KIND: &'static str = "NodeLease";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = ();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::ObjectMeta;
    use crate::object::Object;

    #[test]
    fn node_validation_names_fields() {
        let mut n = Object::new(
            ObjectMeta::named("n1"),
            Node {
                taints: vec![
                    Taint { key: "dedicated".into(), value: "gpu".into(), ..Default::default() },
                    Taint { key: "dedicated".into(), value: "other".into(), ..Default::default() },
                ],
                ..Default::default()
            },
        );
        n.status.capacity.insert("cpu".into(), "4".parse().unwrap());
        n.status.capacity.insert("gpu".into(), "2".parse().unwrap());
        n.status.allocatable.insert("cpu".into(), "8".parse().unwrap());
        n.status.allocatable.insert("memory".into(), "-1Gi".parse().unwrap());
        n.status.devices = vec![Device { id: "gpu0".into(), resource: "gpu".into(), model: "V100".into() }];
        let e = n.validate().unwrap_err().to_string();
        for field in ["spec.taints[1]", "status.allocatable.cpu", "status.allocatable.memory", "status.capacity.gpu"] {
            assert!(e.contains(&format!("{field}:")), "missing {field} in {e}");
        }
    }
}
