//! Storage that outlives workloads: a [`VolumeClaim`] is a namespaced request for storage (how
//! much, how it is shared, of which class); a [`PersistentVolume`] is the cluster-scoped volume a
//! [`VolumeProvider`](crate::storage::VolumeProvider) provided for it, bound to at most one claim.
//!
//! The Rust type of the provided volume is `PersistentVolume` because [`Volume`](super::Volume)
//! already names a workload's volume entry.

use serde::{Deserialize, Serialize};

use super::{Condition, validate_conditions};
use crate::object::{Resource, Scope};
use crate::quantity::Quantity;
use crate::validation::{self, Validator};

/// The finalizer the volume binder keeps on a claim while workloads use it, and until its volume
/// is deleted or released as the claim's reclaim policy says.
pub const CLAIM_PROTECTION_FINALIZER: &str = "orch.dev/claim-protection";

/// The finalizer on a provided volume until the provider that holds its data has deleted it
/// (for a node-local volume: the agent of its node).
pub const VOLUME_RECLAIM_FINALIZER: &str = "orch.dev/volume-reclaim";

/// The finalizer the volume binder keeps on a provided volume while its claim exists: deleting a
/// bound volume waits for its claim to go, so its data is never deleted under a claim.
pub const VOLUME_PROTECTION_FINALIZER: &str = "orch.dev/volume-protection";

/// The name of the volume provided for the claim with uid `claim_uid`: `pvc-<uid>`, so a claim
/// deleted and created again under its name never finds the old one's data.
pub fn volume_name_for_claim(claim_uid: &str) -> String {
    format!("pvc-{claim_uid}")
}

/// How a volume may be shared between nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AccessMode {
    /// Read-write from one node at a time (any number of workloads on that node).
    #[default]
    ReadWriteOnce,
    /// Read-only from any number of nodes.
    ReadOnlyMany,
    /// Read-write from any number of nodes.
    ReadWriteMany,
}

impl AccessMode {
    /// Whether it lets more than one node use the volume at once.
    pub fn is_multi_node(self) -> bool {
        !matches!(self, AccessMode::ReadWriteOnce)
    }
}

impl std::fmt::Display for AccessMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// What becomes of a volume when its claim is deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReclaimPolicy {
    /// The volume and its data are deleted.
    #[default]
    Delete,
    /// The volume and its data are kept (the volume turns `Released`) until an operator deletes it.
    Retain,
}

/// A request for storage by workloads of one namespace, named by their `claim` volumes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VolumeClaim {
    /// How much storage, in bytes (`10Gi`); more than zero.
    pub size: Quantity,
    /// How the volume may be shared between nodes.
    pub access_mode: AccessMode,
    /// The class of storage (which provider and how), a DNS-1123 subdomain such as `local`.
    pub volume_class: String,
    /// What becomes of the volume when this claim is deleted (copied onto the volume).
    pub reclaim_policy: ReclaimPolicy,
}

/// Where a claim stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClaimPhase {
    /// Not bound to a volume yet.
    #[default]
    Pending,
    /// Bound to the volume named in `status.volumeName`.
    Bound,
    /// Its volume is gone: the data is lost.
    Lost,
}

/// What the volume binder observes about a claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VolumeClaimStatus {
    /// Where it stands.
    pub phase: ClaimPhase,
    /// The volume it is bound to (set when `Bound`, kept when `Lost`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    /// Why it waits, and other observations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The claim a volume is bound to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClaimReference {
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name.
    pub name: String,
    /// The claim's uid, so a claim deleted and created again under the same name is told apart.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// A provided piece of storage (cluster-scoped), bound to at most one [`VolumeClaim`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PersistentVolume {
    /// Its size in bytes; more than zero.
    pub capacity: Quantity,
    /// The ways it may be shared; not empty, no repeats. A node-local volume offers only
    /// `ReadWriteOnce`.
    pub access_modes: Vec<AccessMode>,
    /// The class of storage it belongs to (a DNS-1123 subdomain).
    pub volume_class: String,
    /// What becomes of it when its claim is deleted.
    pub reclaim_policy: ReclaimPolicy,
    /// The node its data lives on, for node-local storage; workloads using it run only there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The claim it is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_ref: Option<ClaimReference>,
}

/// Where a volume stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VolumePhase {
    /// Provided and bound to no claim.
    #[default]
    Available,
    /// Bound to the claim in `spec.claimRef`.
    Bound,
    /// Its claim was deleted and its policy is `Retain`: the data is kept, no new claim binds it.
    Released,
    /// The provider could not reclaim it; the conditions say why.
    Failed,
}

/// What the volume binder observes about a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PersistentVolumeStatus {
    /// Where it stands.
    pub phase: VolumePhase,
    /// Why it failed, and other observations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

const NANOS_PER_BYTE: i128 = 1_000_000_000;

/// Checks a size in bytes: more than zero and whole.
fn validate_bytes(field: &str, q: &Quantity, v: &mut Validator) {
    if q.is_negative() || q.is_zero() {
        v.reject(field, format!("must be more than 0 bytes (is {q})"));
    } else if q.nanos() % NANOS_PER_BYTE != 0 {
        v.reject(field, format!("must be a whole number of bytes (is {q})"));
    }
}

fn validate_class(field: &str, class: &str, v: &mut Validator) {
    if class.is_empty() {
        v.reject(field, "must name a volume class (for instance `local`)");
    } else {
        v.check_with(|| field.to_string(), validation::dns1123_subdomain(class));
    }
}

impl PersistentVolume {
    /// Whether this volume can serve `claim`: same class, the claim's access mode offered, at
    /// least the claim's size; otherwise why not, for people.
    pub fn fits(&self, claim: &VolumeClaim) -> Result<(), String> {
        if self.volume_class != claim.volume_class {
            return Err(format!("class {:?} is not the claim's {:?}", self.volume_class, claim.volume_class));
        }
        if !self.access_modes.contains(&claim.access_mode) {
            return Err(format!("it does not offer {}", claim.access_mode));
        }
        if self.capacity < claim.size {
            return Err(format!("its capacity {} is less than the claim's {}", self.capacity, claim.size));
        }
        Ok(())
    }
}

impl Resource for VolumeClaim {
    const KIND: &'static str = "VolumeClaim";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = VolumeClaimStatus;

    fn validate(&self, v: &mut Validator) {
        validate_bytes("spec.size", &self.size, v);
        validate_class("spec.volumeClass", &self.volume_class, v);
    }

    fn validate_status(status: &VolumeClaimStatus, v: &mut Validator) {
        match &status.volume_name {
            Some(name) => v.check_with(|| "status.volumeName".into(), validation::dns1123_subdomain(name)),
            None if status.phase == ClaimPhase::Bound => {
                v.reject("status.volumeName", "must name the volume of a Bound claim")
            }
            None => {}
        }
        validate_conditions("status.conditions", &status.conditions, v);
    }
}

impl Resource for PersistentVolume {
    const KIND: &'static str = "PersistentVolume";
    const SCOPE: Scope = Scope::Cluster;
    type Status = PersistentVolumeStatus;

    fn validate(&self, v: &mut Validator) {
        validate_bytes("spec.capacity", &self.capacity, v);
        validate_class("spec.volumeClass", &self.volume_class, v);
        if self.access_modes.is_empty() {
            v.reject("spec.accessModes", "must offer at least one access mode");
        }
        for (i, mode) in self.access_modes.iter().enumerate() {
            if self.access_modes[..i].contains(mode) {
                v.reject(format!("spec.accessModes[{i}]"), format!("{mode} is listed twice"));
            } else if let (Some(node), true) = (&self.node_name, mode.is_multi_node()) {
                v.reject(
                    format!("spec.accessModes[{i}]"),
                    format!("{mode} needs storage reachable from many nodes; this volume lives on node {node:?}"),
                );
            }
        }
        if let Some(node) = &self.node_name {
            v.check_with(|| "spec.nodeName".into(), validation::dns1123_subdomain(node));
        }
        if let Some(c) = &self.claim_ref {
            v.check_with(|| "spec.claimRef.namespace".into(), validation::dns1123_label(&c.namespace));
            v.check_with(|| "spec.claimRef.name".into(), validation::dns1123_subdomain(&c.name));
        }
    }

    fn validate_status(status: &PersistentVolumeStatus, v: &mut Validator) {
        validate_conditions("status.conditions", &status.conditions, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::ConditionStatus;
    use crate::meta::ObjectMeta;
    use crate::object::Object;

    fn fields(err: crate::Error) -> crate::validation::ValidationError {
        match err {
            crate::Error::Invalid { source, .. } => source,
            other => panic!("not Invalid: {other}"),
        }
    }

    fn claim(size: &str) -> VolumeClaim {
        VolumeClaim { size: size.parse().unwrap(), volume_class: "local".into(), ..Default::default() }
    }

    fn local_volume(capacity: &str) -> PersistentVolume {
        PersistentVolume {
            capacity: capacity.parse().unwrap(),
            access_modes: vec![AccessMode::ReadWriteOnce],
            volume_class: "local".into(),
            node_name: Some("n1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_good_claim_and_volume_pass_and_round_trip_through_json() {
        let c = Object::new(ObjectMeta::namespaced("default", "web-data"), claim("10Gi"));
        c.validate().unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["kind"], "VolumeClaim");
        assert_eq!(json["spec"]["size"], "10Gi");
        assert_eq!(json["spec"]["accessMode"], "ReadWriteOnce");
        assert_eq!(json["spec"]["reclaimPolicy"], "Delete");
        assert_eq!(serde_json::from_value::<Object<VolumeClaim>>(json).unwrap(), c);

        let mut pv = local_volume("10Gi");
        pv.claim_ref = Some(ClaimReference { namespace: "default".into(), name: "web-data".into(), uid: "u1".into() });
        let v = Object::new(ObjectMeta::named("web-data-1"), pv);
        v.validate().unwrap();
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["spec"]["claimRef"]["name"], "web-data");
        assert_eq!(json["status"]["phase"], "Available");
        assert_eq!(serde_json::from_value::<Object<PersistentVolume>>(json).unwrap(), v);
    }

    #[test]
    fn claim_validation_names_every_bad_field() {
        let bad = VolumeClaim { size: Quantity::ZERO, volume_class: "Not_A_Class".into(), ..Default::default() };
        let err = fields(Object::new(ObjectMeta::namespaced("default", "d"), bad).validate().unwrap_err());
        assert!(err.has_field("spec.size") && err.has_field("spec.volumeClass"), "{err}");

        let fractional = VolumeClaim { size: "0.5".parse().unwrap(), ..claim("1") };
        let err = fields(Object::new(ObjectMeta::namespaced("default", "d"), fractional).validate().unwrap_err());
        assert!(err.to_string().contains("whole number of bytes"), "{err}");

        let negative = claim("-1Gi");
        let err = fields(Object::new(ObjectMeta::namespaced("default", "d"), negative).validate().unwrap_err());
        assert!(err.has_field("spec.size"), "{err}");

        let no_class = VolumeClaim { volume_class: String::new(), ..claim("1Gi") };
        let err = fields(Object::new(ObjectMeta::namespaced("default", "d"), no_class).validate().unwrap_err());
        assert!(err.to_string().contains("must name a volume class"), "{err}");
    }

    #[test]
    fn an_unknown_access_mode_is_refused_naming_the_field() {
        let json = serde_json::json!({"spec": {"size": "1Gi", "volumeClass": "local", "accessMode": "ReadWriteSome"}});
        let err = crate::json::RawJson::from_value(&json).decode::<Object<VolumeClaim>>().unwrap_err();
        assert!(err.to_string().contains("spec.accessMode"), "{err}");
    }

    #[test]
    fn volume_validation_names_every_bad_field() {
        let bad = PersistentVolume {
            capacity: Quantity::ZERO,
            access_modes: vec![AccessMode::ReadWriteOnce, AccessMode::ReadWriteMany, AccessMode::ReadWriteOnce],
            volume_class: String::new(),
            reclaim_policy: ReclaimPolicy::Retain,
            node_name: Some("Bad Node".into()),
            claim_ref: Some(ClaimReference { namespace: "NS".into(), name: String::new(), uid: String::new() }),
        };
        let err = fields(Object::new(ObjectMeta::named("v"), bad).validate().unwrap_err());
        for f in [
            "spec.capacity",
            "spec.volumeClass",
            "spec.accessModes[1]",
            "spec.accessModes[2]",
            "spec.nodeName",
            "spec.claimRef.namespace",
            "spec.claimRef.name",
        ] {
            assert!(err.has_field(f), "missing {f} in {err}");
        }
        assert!(err.to_string().contains("lives on node"), "{err}");

        let none = PersistentVolume { access_modes: Vec::new(), ..local_volume("1Gi") };
        let err = fields(Object::new(ObjectMeta::named("v"), none).validate().unwrap_err());
        assert!(err.has_field("spec.accessModes"), "{err}");
    }

    #[test]
    fn a_shared_volume_may_offer_many_node_modes() {
        let shared = PersistentVolume {
            access_modes: vec![AccessMode::ReadWriteMany, AccessMode::ReadOnlyMany],
            node_name: None,
            volume_class: "nfs".into(),
            ..local_volume("1Ti")
        };
        Object::new(ObjectMeta::named("shared"), shared).validate().unwrap();
    }

    #[test]
    fn status_validation_requires_the_volume_of_a_bound_claim() {
        let mut o = Object::new(ObjectMeta::namespaced("default", "d"), claim("1Gi"));
        o.status.phase = ClaimPhase::Bound;
        let mut v = Validator::new();
        VolumeClaim::validate_status(&o.status, &mut v);
        assert!(v.finish().unwrap_err().has_field("status.volumeName"));

        o.status.volume_name = Some("pv-1".into());
        o.status.conditions = vec![
            Condition::new("Waiting", ConditionStatus::True, "WaitForFirstConsumer"),
            Condition::new("Waiting", ConditionStatus::False, "Bound"),
        ];
        let mut v = Validator::new();
        VolumeClaim::validate_status(&o.status, &mut v);
        assert!(v.finish().unwrap_err().has_field("status.conditions[1].type"));
    }

    #[test]
    fn fits_checks_class_mode_and_size() {
        let pv = local_volume("10Gi");
        pv.fits(&claim("10Gi")).unwrap();
        assert!(pv.fits(&claim("11Gi")).unwrap_err().contains("less than"));
        let rwx = VolumeClaim { access_mode: AccessMode::ReadWriteMany, ..claim("1Gi") };
        assert!(pv.fits(&rwx).unwrap_err().contains("ReadWriteMany"));
        let other = VolumeClaim { volume_class: "fast".into(), ..claim("1Gi") };
        assert!(pv.fits(&other).unwrap_err().contains("class"));
    }
}
