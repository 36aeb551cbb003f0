//! [`StatefulSet`]: replicas with stable names (`db-0`, `db-1`, …) and a [`VolumeClaim`] of
//! their own each, started in order and updated from the highest ordinal down.

use serde::{Deserialize, Serialize};

use super::deployment::validate_template_for;
use super::{Condition, TEMPLATE_HASH_LABEL, Volume, VolumeClaim, VolumeSource, WorkloadTemplate, validate_conditions};
use crate::meta::ObjectMeta;
use crate::object::{Resource, Scope};
use crate::selector::LabelSelector;
use crate::validation::{self, MAX_SUBDOMAIN_LEN, Validator};

/// The label holding a stateful set replica's ordinal (`0`, `1`, …); set by the controller on
/// each workload and on each claim it makes.
pub const ORDINAL_LABEL: &str = "orch.dev/ordinal";

/// The most replicas a stateful set may ask for (`spec.replicas`); each one is a workload and
/// claims of its own, made in order.
pub const MAX_REPLICAS: u32 = 100_000;

/// How a stateful set starts and stops its replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PodManagementPolicy {
    /// One at a time: replica `i` is created only once `0..i` are running and available, and
    /// removed (scaling down) only once every replica above it is gone and every one below it is
    /// available.
    #[default]
    OrderedReady,
    /// All at once: every missing replica is created and every excess one removed without
    /// waiting. Updates still go one at a time.
    Parallel,
}

/// How a stateful set replaces its workloads when its template changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum StatefulSetUpdate {
    /// Replace the workloads whose ordinal is at least `partition`, from the highest ordinal
    /// down, one at a time, each waiting for the one before to be replaced and available.
    RollingUpdate(StatefulRollingUpdate),
    /// Replace a workload only when someone deletes it.
    OnDelete,
}

impl Default for StatefulSetUpdate {
    fn default() -> Self {
        StatefulSetUpdate::RollingUpdate(StatefulRollingUpdate::default())
    }
}

/// The bound of a stateful set's rolling update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatefulRollingUpdate {
    /// Only ordinals `>= partition` are updated; the others keep the current revision, even
    /// when deleted and created again (a canary or a staged rollout). Default 0: all of them.
    /// It may exceed the replicas (then nothing is updated), as in Kubernetes.
    pub partition: u32,
}

/// A claim each replica gets: replica `i` of set `s` gets the claim `<name>-<s>-<i>` (made
/// before its workload and kept when the set scales down or is deleted), mounted through the
/// workload volume `<name>`, which the controller adds to each workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VolumeClaimTemplate {
    /// A DNS-1123 label, unique among the set's claim templates; the name of the volume the
    /// template's containers mount (the template itself must not declare a volume of this name).
    pub name: String,
    /// What each claim asks for.
    pub spec: VolumeClaim,
}

impl VolumeClaimTemplate {
    /// The name of the claim of replica `ordinal` of the set `set`.
    pub fn claim_name(&self, set: &str, ordinal: u32) -> String {
        format!("{}-{set}-{ordinal}", self.name)
    }

    /// The workload volume through which replica `ordinal` of `set` mounts its claim.
    pub fn volume(&self, set: &str, ordinal: u32) -> Volume {
        Volume { name: self.name.clone(), source: VolumeSource::Claim { claim_name: self.claim_name(set, ordinal) } }
    }
}

/// Keep `replicas` workloads named `<set>-0` … `<set>-<replicas-1>` running, each with its own
/// claims from `volumeClaimTemplates`; a replica that is deleted or fails comes back under the
/// same name with the same claims.
///
/// Those names are object names, so a set is refused when the name of its last replica or of
/// that replica's claims would be longer than an object name may be (253 characters).
///
/// `serviceName` names the headless service that governs the set, as in Kubernetes; orch's
/// workloads have no hostname or subdomain, so no per-replica DNS name is provided: select the
/// replicas with a service, or one replica by its [`ORDINAL_LABEL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatefulSet {
    /// How many replicas should run (default 1, at most [`MAX_REPLICAS`]).
    pub replicas: u32,
    /// Which workloads belong to it; must match the template's labels and not be empty.
    pub selector: LabelSelector,
    /// What each replica looks like (without its claim volumes, which the controller adds).
    pub template: WorkloadTemplate,
    /// A claim per replica for each entry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volume_claim_templates: Vec<VolumeClaimTemplate>,
    /// Ordered or parallel start and stop.
    pub pod_management_policy: PodManagementPolicy,
    /// How a changed template rolls out.
    pub update_strategy: StatefulSetUpdate,
    /// The headless service that governs the set (a DNS-1123 label); recorded, no DNS is
    /// provided per replica (see the type's docs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// A replica counts as available only once it has been ready this long; ordered start and
    /// the rolling update wait for availability.
    pub min_ready_seconds: u32,
}

impl Default for StatefulSet {
    fn default() -> Self {
        StatefulSet {
            replicas: 1,
            selector: LabelSelector::default(),
            template: WorkloadTemplate::default(),
            volume_claim_templates: Vec::new(),
            pod_management_policy: PodManagementPolicy::default(),
            update_strategy: StatefulSetUpdate::default(),
            service_name: None,
            min_ready_seconds: 0,
        }
    }
}

impl StatefulSet {
    /// A set of `replicas` copies of `spec`, selected and labelled by `app=<app>`.
    pub fn new(app: &str, replicas: u32, spec: super::Workload) -> Self {
        StatefulSet {
            replicas,
            selector: LabelSelector::from_labels([("app", app)]),
            template: WorkloadTemplate::new([("app", app)].into(), spec),
            ..Default::default()
        }
    }

    /// The name of the revision running `template` in set `set`: `<set>-<template hash>`.
    pub fn revision_name(set: &str, template: &WorkloadTemplate) -> String {
        format!("{set}-{}", template.hash())
    }
}

/// Condition types of a stateful set.
pub mod stateful_set_condition {
    /// Whether every replica runs the current template and is available: reasons
    /// `RolloutComplete`, `RollingUpdate` (replacing), `PartitionedUpdate` (replicas below the
    /// partition keep the old template), `WaitingForDeletes` (`OnDelete`), `Scaling`,
    /// `WaitingForAvailable`; the message ends with what the controller waits for.
    pub const UPDATED: &str = "Updated";
    /// Whether the controller could create what it needs: reasons `Created`, `FailedCreate`,
    /// `ClaimTerminating` (a replica waits for its claim, being deleted, to go).
    pub const REPLICA_FAILURE: &str = "ReplicaFailure";
}

/// What the stateful set controller observes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatefulSetStatus {
    /// The generation of the spec this status reflects.
    pub observed_generation: u64,
    /// Its workloads (not being deleted, not finished).
    pub replicas: u32,
    /// Those passing their readiness probe.
    pub ready_replicas: u32,
    /// Those running `currentRevision`.
    pub current_replicas: u32,
    /// Those running `updateRevision`.
    pub updated_replicas: u32,
    /// Those ready for at least `minReadySeconds`.
    pub available_replicas: u32,
    /// The revision (`<set>-<hash>`) the replicas ran before the update in progress; equal to
    /// `updateRevision` once a rolling update is complete.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub current_revision: String,
    /// The revision of the current template.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub update_revision: String,
    /// The template of `currentRevision`, recorded when a revision becomes current: a replica
    /// below a rolling update's partition that is created again gets it, even when no replica
    /// runs it any more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_template: Option<WorkloadTemplate>,
    /// `Updated` and `ReplicaFailure` (see [`stateful_set_condition`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl Resource for StatefulSet {
    const KIND: &'static str = "StatefulSet";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = StatefulSetStatus;

    fn validate(&self, v: &mut Validator) {
        if self.replicas > MAX_REPLICAS {
            v.reject("spec.replicas", format!("must be at most {MAX_REPLICAS} (is {})", self.replicas));
        }
        // The template is checked as each replica sees it: with its claim volumes, so mounts of
        // a claim template's volume are known.
        let mut template = self.template.clone();
        let declared: Vec<String> = template.spec.volumes.iter().map(|vol| vol.name.clone()).collect();
        for (i, t) in self.volume_claim_templates.iter().enumerate() {
            let f = format!("spec.volumeClaimTemplates[{i}]");
            v.check_with(|| format!("{f}.name"), validation::dns1123_label(&t.name));
            let mut inner = Validator::new();
            t.spec.validate(&mut inner);
            if let Err(e) = inner.finish() {
                for fe in e.errors {
                    let rest = fe.field.strip_prefix("spec").unwrap_or(&fe.field);
                    v.reject(format!("{f}.spec{rest}"), fe.reason);
                }
            }
            if self.volume_claim_templates[..i].iter().any(|o| o.name == t.name) {
                v.reject(format!("{f}.name"), format!("duplicate claim template name {:?}", t.name));
            } else if let Some(j) = declared.iter().position(|n| *n == t.name) {
                v.reject(
                    format!("spec.template.spec.volumes[{j}].name"),
                    format!(
                        "{:?} is the name of volumeClaimTemplates[{i}]: the controller adds that volume to each \
                         replica; remove it from the template",
                        t.name
                    ),
                );
            } else if !t.name.is_empty() {
                template.spec.volumes.push(t.volume("set", 0));
            }
        }
        validate_template_for("spec.template", &self.selector, &template, true, v);
        for label in [TEMPLATE_HASH_LABEL, ORDINAL_LABEL] {
            if self.template.metadata.labels.contains_key(label) {
                v.reject(
                    format!("spec.template.metadata.labels[{label:?}]"),
                    "is set by the controller on each replica; remove it from the template",
                );
            }
        }
        if let Some(s) = &self.service_name {
            v.check_with(|| "spec.serviceName".into(), validation::dns1123_label(s));
        }
    }

    /// The replicas (`<set>-<ordinal>`) and their claims (`<template>-<set>-<ordinal>`) must be
    /// valid object names up to the last ordinal, or that replica could never be created.
    fn validate_with_metadata(&self, meta: &ObjectMeta, v: &mut Validator) {
        let Some(last) = self.replicas.checked_sub(1) else { return };
        // A bad set name is reported under `metadata.name` by the metadata's own checks.
        if validation::dns1123_subdomain(&meta.name).is_err() {
            return;
        }
        let replica = format!("{}-{last}", meta.name);
        if replica.len() > MAX_SUBDOMAIN_LEN {
            v.reject(
                "metadata.name",
                format!("replica name {replica:?} would be longer than {MAX_SUBDOMAIN_LEN} characters"),
            );
            // Every claim name contains the replica's: the set's name is what must be shorter.
            return;
        }
        for (i, t) in self.volume_claim_templates.iter().enumerate() {
            let claim = t.claim_name(&meta.name, last);
            if validation::dns1123_label(&t.name).is_ok() && claim.len() > MAX_SUBDOMAIN_LEN {
                v.reject(
                    format!("spec.volumeClaimTemplates[{i}].name"),
                    format!("claim name {claim:?} would be longer than {MAX_SUBDOMAIN_LEN} characters"),
                );
            }
        }
    }

    fn validate_status(status: &StatefulSetStatus, v: &mut Validator) {
        validate_conditions("status.conditions", &status.conditions, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::{AccessMode, ReclaimPolicy, VolumeMount, Workload};
    use crate::object::Object;

    fn claim(size: &str) -> VolumeClaim {
        VolumeClaim {
            size: size.parse().unwrap(),
            access_mode: AccessMode::ReadWriteOnce,
            volume_class: "local".into(),
            reclaim_policy: ReclaimPolicy::Retain,
        }
    }

    fn db() -> StatefulSet {
        let mut w = Workload::command("main", &["/bin/db", "--data", "/data"]);
        w.containers[0].volume_mounts =
            vec![VolumeMount { name: "data".into(), mount_path: "/data".into(), read_only: false }];
        let mut s = StatefulSet::new("db", 3, w);
        s.volume_claim_templates = vec![VolumeClaimTemplate { name: "data".into(), spec: claim("1Gi") }];
        s.service_name = Some("db".into());
        s
    }

    fn invalid(s: StatefulSet) -> (String, crate::validation::ValidationError) {
        let err = Object::new(ObjectMeta::namespaced("default", "db"), s).validate().unwrap_err();
        let crate::Error::Invalid { source, .. } = &err else { panic!("{err}") };
        (err.to_string(), source.clone())
    }

    #[test]
    fn a_valid_set_passes_and_round_trips() {
        let s = Object::new(ObjectMeta::namespaced("default", "db"), db());
        s.validate().unwrap();
        let json = serde_json::to_value(&s.spec).unwrap();
        assert_eq!(json["podManagementPolicy"], "OrderedReady");
        assert_eq!(json["updateStrategy"], serde_json::json!({"type": "RollingUpdate", "partition": 0}));
        assert_eq!(json["volumeClaimTemplates"][0]["name"], "data");
        assert_eq!(json["volumeClaimTemplates"][0]["spec"]["size"], "1Gi");
        assert_eq!(json["serviceName"], "db");
        let back: StatefulSet = serde_json::from_value(json).unwrap();
        assert_eq!(back, s.spec);

        let parsed: StatefulSet = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "db"}},
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete"},
        }))
        .unwrap();
        assert_eq!(parsed.replicas, 1, "one replica by default");
        assert_eq!(parsed.pod_management_policy, PodManagementPolicy::Parallel);
        assert_eq!(parsed.update_strategy, StatefulSetUpdate::OnDelete);
        let partitioned: StatefulSetUpdate =
            serde_json::from_value(serde_json::json!({"type": "RollingUpdate", "partition": 7})).unwrap();
        assert_eq!(partitioned, StatefulSetUpdate::RollingUpdate(StatefulRollingUpdate { partition: 7 }));
        let mut status = StatefulSetStatus { current_revision: "db-abc".into(), ..Default::default() };
        status.update_revision = "db-def".into();
        assert!(serde_json::to_value(&status).unwrap().get("currentTemplate").is_none(), "none: left out");
        status.current_template = Some(s.spec.template.clone());
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["currentRevision"], "db-abc");
        assert_eq!(json["currentTemplate"], serde_json::to_value(&s.spec.template).unwrap());
        assert_eq!(serde_json::from_value::<StatefulSetStatus>(json).unwrap(), status);
    }

    #[test]
    fn a_partition_above_the_replicas_is_allowed() {
        let mut s = db();
        s.update_strategy = StatefulSetUpdate::RollingUpdate(StatefulRollingUpdate { partition: 10 });
        Object::new(ObjectMeta::namespaced("default", "db"), s).validate().unwrap();
    }

    #[test]
    fn negative_numbers_and_unknown_policies_are_refused_when_decoding() {
        for bad in [
            serde_json::json!({"replicas": -1}),
            serde_json::json!({"minReadySeconds": -5}),
            serde_json::json!({"updateStrategy": {"type": "RollingUpdate", "partition": -1}}),
            serde_json::json!({"podManagementPolicy": "Sometimes"}),
            serde_json::json!({"updateStrategy": {"type": "Recreate"}}),
        ] {
            assert!(serde_json::from_value::<StatefulSet>(bad.clone()).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut s = db();
        s.selector = LabelSelector::from_labels([("app", "other")]);
        s.template.spec.restart_policy = crate::kinds::RestartPolicy::OnFailure;
        s.template.spec.containers[0].volume_mounts.push(VolumeMount {
            name: "logs".into(),
            mount_path: "/logs".into(),
            read_only: false,
        });
        s.template.metadata.labels.insert(ORDINAL_LABEL, "1");
        s.volume_claim_templates.push(VolumeClaimTemplate { name: "data".into(), spec: claim("1Gi") });
        s.volume_claim_templates.push(VolumeClaimTemplate { name: "Bad_Name".into(), spec: claim("0") });
        s.service_name = Some("not a name".into());
        let (text, errors) = invalid(s);
        for field in [
            "spec.template.metadata.labels",
            "spec.template.spec.restartPolicy",
            "spec.template.spec.containers[0].volumeMounts[1].name",
            "spec.template.metadata.labels[\"orch.dev/ordinal\"]",
            "spec.volumeClaimTemplates[1].name",
            "spec.volumeClaimTemplates[2].name",
            "spec.volumeClaimTemplates[2].spec.size",
            "spec.serviceName",
        ] {
            assert!(errors.has_field(field), "missing {field} in {text}");
        }
        assert!(text.contains("duplicate claim template name \"data\""), "{text}");
        assert!(
            !errors.has_field("spec.template.spec.containers[0].volumeMounts[0].name"),
            "the claim template's volume is known to the mounts: {text}"
        );
    }

    #[test]
    fn a_template_volume_named_like_a_claim_template_is_refused() {
        let mut s = db();
        s.template
            .spec
            .volumes
            .push(Volume { name: "data".into(), source: VolumeSource::EmptyDir { size_limit: None } });
        let (text, errors) = invalid(s);
        assert!(errors.has_field("spec.template.spec.volumes[0].name"), "{text}");
        assert!(text.contains("the controller adds that volume"), "{text}");
    }

    #[test]
    fn more_than_max_replicas_is_refused() {
        let mut s = db();
        s.replicas = MAX_REPLICAS;
        Object::new(ObjectMeta::namespaced("default", "db"), s.clone()).validate().unwrap();
        s.replicas = MAX_REPLICAS + 1;
        let (text, errors) = invalid(s);
        assert!(errors.has_field("spec.replicas"), "{text}");
        assert!(text.contains("spec.replicas: must be at most 100000 (is 100001)"), "{text}");
    }

    /// The longest set name whose replicas `0..replicas` still have valid names.
    fn longest_name(replicas: u32) -> String {
        let digits = (replicas - 1).to_string().len();
        "d".repeat(MAX_SUBDOMAIN_LEN - 1 - digits)
    }

    #[test]
    fn a_name_too_long_for_the_last_replica_is_refused() {
        let mut s = db();
        s.volume_claim_templates.clear();
        s.template.spec.containers[0].volume_mounts.clear();
        s.replicas = 10;
        let name = longest_name(10);
        Object::new(ObjectMeta::namespaced("default", &name), s.clone()).validate().unwrap();

        // One more replica: `<name>-10` has one character too many; `<name>-9` would fit.
        s.replicas = 11;
        let err = Object::new(ObjectMeta::namespaced("default", &name), s.clone()).validate().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("metadata.name: replica name \"{name}-10\" would be longer than 253 characters")),
            "{text}"
        );
        s.replicas = 0;
        Object::new(ObjectMeta::namespaced("default", &name), s).validate().unwrap();
    }

    #[test]
    fn a_claim_name_too_long_for_the_last_replica_is_refused() {
        let mut s = db();
        s.replicas = 10;
        // `data-<name>-9` is 5 characters longer than `<name>-9`.
        let name = "d".repeat(MAX_SUBDOMAIN_LEN - "data-".len() - "-9".len());
        Object::new(ObjectMeta::namespaced("default", &name), s.clone()).validate().unwrap();
        s.volume_claim_templates[0].name = "datas".into();
        for m in &mut s.template.spec.containers[0].volume_mounts {
            m.name = "datas".into();
        }
        let err = Object::new(ObjectMeta::namespaced("default", &name), s).validate().unwrap_err();
        let crate::Error::Invalid { source, .. } = &err else { panic!("{err}") };
        assert!(source.has_field("spec.volumeClaimTemplates[0].name"), "{err}");
        assert!(!source.has_field("metadata.name"), "the replica's own name fits: {err}");
        assert!(
            err.to_string().contains(&format!("claim name \"datas-{name}-9\" would be longer than 253 characters")),
            "{err}"
        );
    }

    #[test]
    fn claim_names_follow_the_set_and_ordinal() {
        let t = VolumeClaimTemplate { name: "data".into(), spec: claim("1Gi") };
        assert_eq!(t.claim_name("db", 2), "data-db-2");
        assert_eq!(t.volume("db", 2).source, VolumeSource::Claim { claim_name: "data-db-2".into() });
        let s = db();
        assert_eq!(StatefulSet::revision_name("db", &s.template), format!("db-{}", s.template.hash()));
    }
}
