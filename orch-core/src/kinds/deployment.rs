//! [`Deployment`] (keep N copies of a workload template running and roll changes out gradually)
//! and [`ReplicaSet`] (one revision of a deployment: N copies of one exact template).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Condition, Workload, validate_conditions};
use crate::hash::{short_name, stable_hash};
use crate::labels::Labels;
use crate::meta::Timestamp;
use crate::object::{Resource, Scope};
use crate::selector::LabelSelector;
use crate::validation::{self, Validator};

/// The label every workload and revision of a deployment carries: the hash of its template.
pub const TEMPLATE_HASH_LABEL: &str = "orch.dev/template-hash";
/// The annotation holding a revision's number in its deployment's history (1, 2, …).
pub const REVISION_ANNOTATION: &str = "orch.dev/revision";
/// The annotation a restart puts on the template: a new revision with the same spec.
pub const RESTARTED_AT_ANNOTATION: &str = "orch.dev/restartedAt";

/// What a deployment (or a job, a daemon set…) stamps out: labels and annotations for each
/// workload, and its spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadTemplate {
    /// Labels and annotations of each workload.
    pub metadata: TemplateMeta,
    /// The workload's spec.
    pub spec: Workload,
}

/// The metadata a template gives each workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TemplateMeta {
    /// Labels; the owner's selector must match them.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Annotations.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub annotations: Labels,
}

impl WorkloadTemplate {
    /// A template of `spec` with these labels.
    pub fn new(labels: Labels, spec: Workload) -> Self {
        WorkloadTemplate { metadata: TemplateMeta { labels, annotations: Labels::new() }, spec }
    }

    /// Ten characters naming this exact template (labels, annotations and spec), the same in
    /// every build and on every machine; the hash label itself is left out, so a revision's
    /// template hashes to its own name.
    pub fn hash(&self) -> String {
        let mut t = self.clone();
        t.metadata.labels.remove(TEMPLATE_HASH_LABEL);
        let bytes = serde_json::to_vec(&t).unwrap_or_default();
        short_name(stable_hash(&bytes))
    }

    /// Checks the template for an owner of kind `owner`: labels, the workload spec (its errors
    /// named under `{field}.spec`), and no node binding (the scheduler places each copy).
    pub fn validate_under(&self, field: &str, v: &mut Validator) {
        for (k, val) in self.metadata.labels.iter() {
            v.check_with(|| format!("{field}.metadata.labels[{k:?}]"), validation::qualified_name(k));
            v.check_with(|| format!("{field}.metadata.labels[{k:?}]"), validation::label_value(val));
        }
        for (k, _) in self.metadata.annotations.iter() {
            v.check_with(|| format!("{field}.metadata.annotations[{k:?}]"), validation::qualified_name(k));
        }
        let mut inner = Validator::new();
        self.spec.validate(&mut inner);
        if let Err(e) = inner.finish() {
            for fe in e.errors {
                let rest = fe.field.strip_prefix("spec").unwrap_or(&fe.field);
                v.reject(format!("{field}.spec{rest}"), fe.reason);
            }
        }
        if self.spec.node_name.is_some() {
            v.reject(format!("{field}.spec.nodeName"), "must be empty: the scheduler places each copy");
        }
    }
}

/// A number of workloads, or a percentage of the desired replicas (`"25%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntOrPercent {
    /// So many workloads.
    Count(u32),
    /// This percentage of the desired replicas.
    Percent(u32),
}

impl IntOrPercent {
    /// The number of workloads it means out of `total`; a percentage rounds up or down.
    pub fn resolve(self, total: u32, round_up: bool) -> u32 {
        match self {
            IntOrPercent::Count(n) => n,
            IntOrPercent::Percent(p) => {
                let scaled = u64::from(total) * u64::from(p);
                let n = if round_up { scaled.div_ceil(100) } else { scaled / 100 };
                u32::try_from(n).unwrap_or(u32::MAX)
            }
        }
    }

    fn is_zero(self) -> bool {
        matches!(self, IntOrPercent::Count(0) | IntOrPercent::Percent(0))
    }
}

impl fmt::Display for IntOrPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrPercent::Count(n) => write!(f, "{n}"),
            IntOrPercent::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for IntOrPercent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrPercent::Count(n) => s.serialize_u32(*n),
            IntOrPercent::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrPercent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = IntOrPercent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of workloads >= 0 or a percentage such as \"25%\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrPercent, E> {
                u32::try_from(v).map(IntOrPercent::Count).map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrPercent, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("must be >= 0 (is {v})")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrPercent, E> {
                v.strip_suffix('%')
                    .and_then(|p| p.parse::<u32>().ok())
                    .map(IntOrPercent::Percent)
                    .ok_or_else(|| E::custom(format!("{v:?} is not a percentage such as \"25%\"")))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// How a deployment replaces the workloads of an old revision with those of a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Strategy {
    /// Replace them a few at a time, within bounds.
    RollingUpdate(RollingUpdate),
    /// Stop every old workload, then start the new ones (for workloads that cannot run two
    /// versions side by side).
    Recreate,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::RollingUpdate(RollingUpdate::default())
    }
}

/// The bounds of a rolling update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RollingUpdate {
    /// How many workloads may exist above the desired replicas (a percentage rounds up;
    /// default 25%).
    pub max_surge: IntOrPercent,
    /// How many of the desired replicas may be unavailable (a percentage rounds down; default
    /// 25%). When both resolve to zero, one may be unavailable, or nothing could move.
    pub max_unavailable: IntOrPercent,
}

impl Default for RollingUpdate {
    fn default() -> Self {
        RollingUpdate { max_surge: IntOrPercent::Percent(25), max_unavailable: IntOrPercent::Percent(25) }
    }
}

impl RollingUpdate {
    /// `(max surge, max unavailable)` in workloads for `replicas` desired.
    pub fn resolve(&self, replicas: u32) -> (u32, u32) {
        let surge = self.max_surge.resolve(replicas, true);
        let unavailable = self.max_unavailable.resolve(replicas, false).min(replicas);
        if surge == 0 && unavailable == 0 { (0, 1) } else { (surge, unavailable) }
    }
}

/// When a deployment rolls itself back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RollbackPolicy {
    /// Roll back to the last revision that did not fail when a rollout misses its progress
    /// deadline or its new workloads keep failing.
    pub on_failure: bool,
    /// "Keep failing": this many restarts or failures, summed over the new revision's
    /// workloads during its rollout (default 5; at least 1).
    pub failure_threshold: u32,
}

impl Default for RollbackPolicy {
    fn default() -> Self {
        RollbackPolicy { on_failure: false, failure_threshold: 5 }
    }
}

/// Keep `replicas` copies of a template running; roll a changed template out gradually, keep
/// the revisions for rollback, and (optionally) roll back by itself when a rollout fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Deployment {
    /// How many workloads should run.
    pub replicas: u32,
    /// Which workloads belong to it; must match the template's labels and not be empty.
    pub selector: LabelSelector,
    /// What each workload looks like; a change makes a new revision.
    pub template: WorkloadTemplate,
    /// How a new revision replaces the old.
    pub strategy: Strategy,
    /// A workload counts as available only once it has been ready this long.
    pub min_ready_seconds: u32,
    /// A rollout that makes no progress for this long is reported `ProgressDeadlineExceeded`
    /// (and rolled back, with `rollback.onFailure`). Default 600; must exceed `minReadySeconds`.
    pub progress_deadline_seconds: u32,
    /// Old revisions kept (scaled to zero) for rollback; default 10.
    pub revision_history_limit: u32,
    /// While paused, template changes make no new revision (scaling still applies).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Automatic rollback.
    pub rollback: RollbackPolicy,
}

impl Default for Deployment {
    fn default() -> Self {
        Deployment {
            replicas: 1,
            selector: LabelSelector::default(),
            template: WorkloadTemplate::default(),
            strategy: Strategy::default(),
            min_ready_seconds: 0,
            progress_deadline_seconds: 600,
            revision_history_limit: 10,
            paused: false,
            rollback: RollbackPolicy::default(),
        }
    }
}

impl Deployment {
    /// A deployment of `replicas` copies of `spec`, selected and labelled by `app=<app>`.
    pub fn new(app: &str, replicas: u32, spec: Workload) -> Self {
        let labels = Labels::from([("app", app)]);
        Deployment {
            replicas,
            selector: LabelSelector::from_labels([("app", app)]),
            template: WorkloadTemplate::new(labels, spec),
            ..Default::default()
        }
    }
}

/// Condition types of a deployment.
pub mod deployment_condition {
    /// Whether the rollout moves (or completed): reasons `NewRevisionCreated`,
    /// `RevisionUpdated`, `NewRevisionAvailable`, `ProgressDeadlineExceeded`,
    /// `DeploymentPaused`, `RolledBack`.
    pub const PROGRESSING: &str = "Progressing";
    /// Whether at least `replicas - maxUnavailable` workloads are available: reasons
    /// `MinimumReplicasAvailable`, `MinimumReplicasUnavailable`.
    pub const AVAILABLE: &str = "Available";
    /// Set when the controller rolled the deployment back by itself; the reason says why
    /// (`ProgressDeadlineExceeded`, `WorkloadsFailing`), the message from which revision to which.
    pub const ROLLED_BACK: &str = "RolledBack";
}

/// What the deployment controller observes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeploymentStatus {
    /// The generation of the spec this status reflects.
    pub observed_generation: u64,
    /// Workloads of every revision (not being deleted).
    pub replicas: u32,
    /// Workloads of the current revision.
    pub updated_replicas: u32,
    /// Workloads passing their readiness probe.
    pub ready_replicas: u32,
    /// Workloads ready for at least `minReadySeconds`.
    pub available_replicas: u32,
    /// Desired replicas not available: `replicas - available` (at least 0).
    pub unavailable_replicas: u32,
    /// The current revision's number.
    pub current_revision: u64,
    /// `Progressing`, `Available`, `RolledBack` (see [`deployment_condition`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the current rollout last moved (the progress deadline counts from here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Timestamp>,
}

pub(super) fn validate_template_for(
    field: &str,
    selector: &LabelSelector,
    template: &WorkloadTemplate,
    restart_always: bool,
    v: &mut Validator,
) {
    if selector.is_empty() {
        v.reject("spec.selector", "must not be empty: it would claim every workload in the namespace");
    } else if let Err(crate::Error::Invalid { source, .. }) = selector.validate("spec.selector") {
        for e in source.errors {
            v.reject(e.field, e.reason);
        }
    } else if !selector.matches(&template.metadata.labels) {
        v.reject(format!("{field}.metadata.labels"), "must match spec.selector");
    }
    template.validate_under(field, v);
    if restart_always && template.spec.restart_policy != super::RestartPolicy::Always {
        v.reject(
            format!("{field}.spec.restartPolicy"),
            format!("must be Always: its workloads run until replaced (is {:?})", template.spec.restart_policy),
        );
    }
}

impl Resource for Deployment {
    const KIND: &'static str = "Deployment";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = DeploymentStatus;

    fn validate(&self, v: &mut Validator) {
        validate_template_for("spec.template", &self.selector, &self.template, true, v);
        if let Strategy::RollingUpdate(r) = &self.strategy {
            if let IntOrPercent::Percent(p) = r.max_unavailable
                && p > 100
            {
                v.reject("spec.strategy.maxUnavailable", format!("must be at most 100% (is {p}%)"));
            }
            if r.max_surge.is_zero() && r.max_unavailable.is_zero() {
                v.reject("spec.strategy.maxUnavailable", "must not be 0 when maxSurge is 0: nothing could be replaced");
            }
        }
        if self.progress_deadline_seconds <= self.min_ready_seconds {
            v.reject(
                "spec.progressDeadlineSeconds",
                format!(
                    "must be greater than minReadySeconds ({} <= {})",
                    self.progress_deadline_seconds, self.min_ready_seconds
                ),
            );
        }
        if self.rollback.failure_threshold == 0 {
            v.reject("spec.rollback.failureThreshold", "must be >= 1");
        }
    }

    fn validate_status(status: &DeploymentStatus, v: &mut Validator) {
        validate_conditions("status.conditions", &status.conditions, v);
    }
}

/// One revision of a deployment: keeps `replicas` copies of one exact template running. Named
/// `<deployment>-<template hash>`, owned by its deployment, numbered by the
/// [`REVISION_ANNOTATION`]. Usable on its own too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReplicaSet {
    /// How many workloads should run.
    pub replicas: u32,
    /// Which workloads belong to it; must match the template's labels and not be empty.
    pub selector: LabelSelector,
    /// What each workload looks like.
    pub template: WorkloadTemplate,
    /// A workload counts as available only once it has been ready this long.
    pub min_ready_seconds: u32,
}

/// What the replica set controller observes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReplicaSetStatus {
    /// The generation of the spec this status reflects.
    pub observed_generation: u64,
    /// Its workloads (not being deleted).
    pub replicas: u32,
    /// Those passing their readiness probe.
    pub ready_replicas: u32,
    /// Those ready for at least `minReadySeconds`.
    pub available_replicas: u32,
    /// Restarts summed over its workloads, plus `replaced`.
    pub failures: u32,
    /// Workloads that finished or failed and were replaced.
    pub replaced: u32,
}

impl Resource for ReplicaSet {
    const KIND: &'static str = "ReplicaSet";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = ReplicaSetStatus;

    fn validate(&self, v: &mut Validator) {
        validate_template_for("spec.template", &self.selector, &self.template, false, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::ObjectMeta;
    use crate::object::Object;

    fn web() -> Deployment {
        Deployment::new("web", 3, Workload::command("main", &["/bin/sleep", "1000"]))
    }

    #[test]
    fn a_valid_deployment_passes_and_round_trips() {
        let d = Object::new(ObjectMeta::namespaced("default", "web"), web());
        d.validate().unwrap();
        let json = serde_json::to_value(&d.spec).unwrap();
        assert_eq!(json["strategy"]["type"], "RollingUpdate");
        assert_eq!(json["strategy"]["maxSurge"], "25%");
        let back: Deployment = serde_json::from_value(json).unwrap();
        assert_eq!(back, d.spec);
        let recreate: Deployment =
            serde_json::from_value(serde_json::json!({"replicas": 2, "strategy": {"type": "Recreate"}})).unwrap();
        assert_eq!(recreate.strategy, Strategy::Recreate);
        let counts: Strategy = serde_json::from_value(
            serde_json::json!({"type": "RollingUpdate", "maxSurge": 2, "maxUnavailable": "10%"}),
        )
        .unwrap();
        assert_eq!(
            counts,
            Strategy::RollingUpdate(RollingUpdate {
                max_surge: IntOrPercent::Count(2),
                max_unavailable: IntOrPercent::Percent(10)
            })
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut d = web();
        d.selector = LabelSelector::from_labels([("app", "other")]);
        d.template.spec.restart_policy = crate::kinds::RestartPolicy::Never;
        d.template.spec.node_name = Some("n1".into());
        d.template.spec.containers[0].command.clear();
        d.strategy = Strategy::RollingUpdate(RollingUpdate {
            max_surge: IntOrPercent::Count(0),
            max_unavailable: IntOrPercent::Percent(0),
        });
        d.min_ready_seconds = 700;
        d.rollback.failure_threshold = 0;
        let err = Object::new(ObjectMeta::namespaced("default", "web"), d).validate().unwrap_err();
        let crate::Error::Invalid { source, .. } = &err else { panic!("{err}") };
        for field in [
            "spec.template.metadata.labels",
            "spec.template.spec.restartPolicy",
            "spec.template.spec.nodeName",
            "spec.template.spec.containers[0].command",
            "spec.strategy.maxUnavailable",
            "spec.progressDeadlineSeconds",
            "spec.rollback.failureThreshold",
        ] {
            assert!(source.has_field(field), "missing {field} in {err}");
        }
        let mut empty = web();
        empty.selector = LabelSelector::default();
        let err = Object::new(ObjectMeta::namespaced("default", "web"), empty).validate().unwrap_err();
        assert!(err.to_string().contains("spec.selector: must not be empty"), "{err}");
        let big: Result<Strategy, _> =
            serde_json::from_value(serde_json::json!({"type": "RollingUpdate", "maxUnavailable": "ten"}));
        assert!(big.unwrap_err().to_string().contains("\"ten\" is not a percentage"));
        let neg: Result<Deployment, _> = serde_json::from_value(serde_json::json!({"replicas": -1}));
        assert!(neg.is_err());
    }

    #[test]
    fn percentages_resolve_like_kubernetes() {
        let r = RollingUpdate::default();
        assert_eq!(r.resolve(10), (3, 2), "surge rounds up, unavailable down");
        assert_eq!(r.resolve(1), (1, 0));
        let zero = RollingUpdate { max_surge: IntOrPercent::Percent(10), max_unavailable: IntOrPercent::Percent(10) };
        assert_eq!(zero.resolve(0), (0, 1), "both zero: one may be unavailable");
        assert_eq!(IntOrPercent::Percent(150).resolve(10, true), 15);
    }

    #[test]
    fn template_hash_is_stable_and_ignores_its_own_label() {
        let t = web().template;
        let h = t.hash();
        let mut labelled = t.clone();
        labelled.metadata.labels.insert(TEMPLATE_HASH_LABEL, h.clone());
        assert_eq!(labelled.hash(), h);
        let mut changed = t.clone();
        changed.spec.containers[0].command.push("x".into());
        assert_ne!(changed.hash(), h);
        assert_eq!(t.clone().hash(), h);
    }
}
