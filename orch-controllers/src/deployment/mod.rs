//! The deployment controller: turns a [`Deployment`] into revisions ([`ReplicaSet`]s named by
//! the hash of their template) and moves workloads from the old revisions to the new one
//! within the strategy's bounds, counting only available workloads; spreads a scale over the
//! revisions of a rollout in proportion; reports progress and availability; keeps
//! `revisionHistoryLimit` old revisions for [`rollback`]; and, with `rollback.onFailure`, rolls
//! back by itself when a rollout misses its progress deadline or its workloads keep failing.
//!
//! Register it together with the [`ReplicaSetController`](crate::ReplicaSetController), which
//! runs each revision's workloads.

pub mod rollout;

use std::sync::Arc;
use std::time::Duration;

use orch_core::api::Api;
use orch_core::cache::ObjectRef;
use orch_core::controller::{Action, Context, Controller, ControllerBuilder};
use orch_core::error::Error;
use orch_core::kinds::{
    Condition, ConditionStatus, Deployment, DeploymentStatus, EventType, ObjectReference, RESTARTED_AT_ANNOTATION,
    REVISION_ANNOTATION, ReplicaSet, Strategy, TEMPLATE_HASH_LABEL, Workload, WorkloadTemplate, deployment_condition,
    find_condition, set_condition,
};
use orch_core::meta::{ObjectMeta, Timestamp};
use orch_core::object::Object;
use orch_core::selector::Requirement;
use orch_core::store::DeleteOptions;
use orch_core::{ListParams, Store};

use crate::workloads::{LazyRecorder, WriteGate, available_at, is_active, is_ready, name_prefix};
use rollout::Counts;

/// On each revision: the deployment's replicas when the revision was last scaled, so a change
/// of replicas in the middle of a rollout is recognised and spread in proportion.
pub const DESIRED_REPLICAS_ANNOTATION: &str = "orch.dev/desired-replicas";
/// On a revision whose rollout failed (the value says why): automatic rollback never returns
/// to it. Cleared when a rollout of it completes.
pub const FAILED_ANNOTATION: &str = "orch.dev/rollout-failed";

/// The controller (register it with [`DeploymentController::builder`]).
#[derive(Debug)]
pub struct DeploymentController {
    gate: WriteGate,
    recorder: LazyRecorder,
}

impl DeploymentController {
    /// The controller wired to its triggers: deployments, their revisions, and the workloads
    /// of those (read through the shared cache).
    pub fn builder() -> ControllerBuilder<DeploymentController> {
        ControllerBuilder::new(
            "deployment",
            DeploymentController { gate: WriteGate::default(), recorder: LazyRecorder::new("deployment-controller") },
        )
        .owns::<ReplicaSet>()
        .reads::<Workload>()
    }
}

/// The revision number of a replica set (0 when it has none).
pub fn revision_of(rs: &Object<ReplicaSet>) -> u64 {
    rs.metadata.annotations.get(REVISION_ANNOTATION).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The template a revision runs, as a deployment would declare it (without the hash label).
fn declared_template(rs: &Object<ReplicaSet>) -> WorkloadTemplate {
    let mut t = rs.spec.template.clone();
    t.metadata.labels.remove(TEMPLATE_HASH_LABEL);
    t
}

/// The name of the revision of `deployment` running `template`.
pub fn revision_name(deployment: &str, template: &WorkloadTemplate) -> String {
    format!("{}-{}", name_prefix(deployment, 200), template.hash())
}

/// One revision and what its workloads are doing.
struct Rev {
    rs: Arc<Object<ReplicaSet>>,
    counts: Counts,
    ready: u32,
    /// Restarts and failures of its workloads.
    failures: u32,
    /// The earliest time one of its ready workloads becomes available.
    next_available: Option<Timestamp>,
}

fn observe(rs: Arc<Object<ReplicaSet>>, workloads: &orch_core::Cache<Workload>, now: Timestamp) -> Rev {
    let min_ready = Duration::from_secs(u64::from(rs.spec.min_ready_seconds));
    let mut rev = Rev {
        counts: Counts { spec: rs.spec.replicas, ..Default::default() },
        ready: 0,
        failures: rs.status.replaced,
        next_available: None,
        rs,
    };
    for w in workloads.owned_by(&rev.rs.metadata.uid) {
        if w.metadata.controller_owner().is_none_or(|o| o.uid != rev.rs.metadata.uid) {
            continue;
        }
        rev.failures += w.status.restart_count;
        if w.status.phase == orch_core::kinds::Phase::Failed {
            rev.failures += 1;
        }
        if !is_active(&w) {
            continue;
        }
        rev.counts.actual += 1;
        rev.ready += u32::from(is_ready(&w));
        match available_at(&w, min_ready) {
            Some(t) if t <= now => rev.counts.available += 1,
            Some(t) => rev.next_available = Some(rev.next_available.map_or(t, |n: Timestamp| n.min(t))),
            None => {}
        }
    }
    rev
}

/// The revision's spec with new replicas and the deployment's current replicas noted.
fn scaled(rs: &Object<ReplicaSet>, replicas: u32, desired: u32) -> Object<ReplicaSet> {
    let mut next = rs.clone();
    next.spec.replicas = replicas;
    next.metadata.annotations.insert(DESIRED_REPLICAS_ANNOTATION, desired.to_string());
    next
}

fn desired_of(rs: &Object<ReplicaSet>) -> Option<u32> {
    rs.metadata.annotations.get(DESIRED_REPLICAS_ANNOTATION).and_then(|v| v.parse().ok())
}

impl DeploymentController {
    /// Writes revision specs that changed; returns whether any did.
    async fn write_scales(
        &self,
        ctx: &Context,
        d: &Object<Deployment>,
        changes: Vec<Object<ReplicaSet>>,
        current: &[Rev],
    ) -> Result<bool, Error> {
        let api = ctx.api::<ReplicaSet>(&d.metadata.namespace);
        let key = ObjectRef::of(d);
        let me = ObjectReference::of(d);
        let mut wrote = false;
        for next in changes {
            let Some(before) = current.iter().find(|r| r.rs.metadata.uid == next.metadata.uid) else { continue };
            if before.rs.spec == next.spec && before.rs.metadata.annotations == next.metadata.annotations {
                continue;
            }
            let written = api.replace(&next).await?;
            self.gate.wrote(&key, written.metadata.resource_version);
            wrote = true;
            if before.rs.spec.replicas != next.spec.replicas {
                let verb = if next.spec.replicas > before.rs.spec.replicas { "up" } else { "down" };
                self.recorder.get(ctx).record(
                    &me,
                    EventType::Normal,
                    "ScalingRevision",
                    format!(
                        "scaled {verb} revision {} ({}) from {} to {}",
                        revision_of(&next),
                        next.metadata.name,
                        before.rs.spec.replicas,
                        next.spec.replicas
                    ),
                );
            }
        }
        Ok(wrote)
    }
}

#[async_trait::async_trait]
impl Controller for DeploymentController {
    type Kind = Deployment;
    type Error = Error;

    async fn reconcile(&self, d: Arc<Object<Deployment>>, ctx: &Context) -> Result<Action, Error> {
        let key = ObjectRef::of(&d);
        if d.metadata.is_being_deleted() {
            self.gate.forget(&key);
            return Ok(Action::Done);
        }
        let sets = ctx.cache::<ReplicaSet>().expect("registered by the builder");
        let workloads = ctx.cache::<Workload>().expect("registered by the builder");
        if !self.gate.caught_up(&key, sets.revision()) {
            return Ok(Action::RequeueAfter(Duration::from_millis(100)));
        }
        let now = ctx.clock().now();
        let ns = d.metadata.namespace.clone();
        let me = ObjectReference::of(&*d);
        let recorder = self.recorder.get(ctx);
        let mut revs: Vec<Rev> = sets
            .owned_by(&d.metadata.uid)
            .into_iter()
            .filter(|rs| rs.metadata.controller_owner().is_some_and(|o| o.uid == d.metadata.uid))
            .filter(|rs| !rs.metadata.is_being_deleted())
            .map(|rs| observe(rs, &workloads, now))
            .collect();
        revs.sort_by_key(|r| (revision_of(&r.rs), r.rs.metadata.create_revision));
        let replicas = d.spec.replicas;
        let (surge, unavailable) = match d.spec.strategy {
            Strategy::RollingUpdate(r) => r.resolve(replicas),
            Strategy::Recreate => (0, replicas),
        };
        let rs_api = ctx.api::<ReplicaSet>(&ns);
        let new_name = revision_name(&d.metadata.name, &d.spec.template);
        let max_revision = revs.iter().map(|r| revision_of(&r.rs)).max().unwrap_or(0);
        let mut progressed = false;
        let mut created_now = false;

        if d.spec.paused {
            // Scaling still applies, over the revisions that have workloads.
            let active: Vec<&Rev> = revs.iter().rev().filter(|r| r.counts.spec > 0).collect();
            let changes: Vec<Object<ReplicaSet>> = match active.as_slice() {
                [] => Vec::new(),
                [only] => vec![scaled(&only.rs, replicas, replicas)],
                many => {
                    if desired_of(&many[0].rs) == Some(replicas) {
                        Vec::new()
                    } else {
                        let specs: Vec<u32> = many.iter().map(|r| r.counts.spec).collect();
                        rollout::proportional(replicas, surge, &specs)
                            .into_iter()
                            .zip(many)
                            .map(|(n, r)| scaled(&r.rs, n, replicas))
                            .collect()
                    }
                }
            };
            self.write_scales(ctx, &d, changes, &revs).await?;
            let status = self.status(&d, &revs, None, now, false, false);
            self.write_status(ctx, &d, status).await?;
            return Ok(Action::Done);
        }

        // The current revision: found, brought back (a rollback), or created.
        let new_idx = match revs.iter().position(|r| r.rs.metadata.name == new_name) {
            Some(i) => {
                if declared_template(&revs[i].rs) != d.spec.template {
                    recorder.record(
                        &me,
                        EventType::Warning,
                        "HashCollision",
                        format!("revision {new_name} runs another template; change the template to go on"),
                    );
                    return Err(Error::invalid(
                        "Deployment",
                        "spec.template",
                        format!("its hash collides with revision {new_name}, which runs another template"),
                    ));
                }
                let rev = revision_of(&revs[i].rs);
                if rev < max_revision || rev == 0 {
                    // Back to an older template: it becomes the newest revision again.
                    let mut next = (*revs[i].rs).clone();
                    next.metadata.annotations.insert(REVISION_ANNOTATION, (max_revision + 1).to_string());
                    next.metadata.annotations.remove(FAILED_ANNOTATION);
                    let written = rs_api.replace(&next).await?;
                    self.gate.wrote(&key, written.metadata.resource_version);
                    recorder.record(
                        &me,
                        EventType::Normal,
                        "RevisionRestored",
                        format!("revision {rev} ({new_name}) is current again, as revision {}", max_revision + 1),
                    );
                    progressed = true;
                    created_now = true;
                    revs[i].rs = Arc::new(written);
                    let r = revs.remove(i);
                    revs.push(r);
                    revs.len() - 1
                } else {
                    i
                }
            }
            None => {
                let has_old = revs.iter().any(|r| r.counts.size() > 0);
                let initial = if has_old { 0 } else { replicas };
                let hash = d.spec.template.hash();
                let mut template = d.spec.template.clone();
                template.metadata.labels.insert(TEMPLATE_HASH_LABEL, hash.clone());
                let mut meta = ObjectMeta::namespaced(ns.clone(), new_name.clone());
                meta.labels = template.metadata.labels.clone();
                meta.annotations.insert(REVISION_ANNOTATION, (max_revision + 1).to_string());
                meta.annotations.insert(DESIRED_REPLICAS_ANNOTATION, replicas.to_string());
                meta.owner_references = vec![d.controller_ref()];
                let spec = ReplicaSet {
                    replicas: initial,
                    selector: d.spec.selector.clone().and(Requirement::Equals(TEMPLATE_HASH_LABEL.into(), hash)),
                    template,
                    min_ready_seconds: d.spec.min_ready_seconds,
                };
                let created = rs_api.create(&Object::new(meta, spec)).await?;
                self.gate.wrote(&key, created.metadata.resource_version);
                recorder.record(
                    &me,
                    EventType::Normal,
                    "NewRevision",
                    format!("created revision {} ({new_name}) with {initial} replicas", max_revision + 1),
                );
                progressed = true;
                created_now = true;
                revs.push(observe(Arc::new(created), &workloads, now));
                revs.len() - 1
            }
        };
        // From here: `revs[new_idx]` is the current revision, every other one is old.
        let new = &revs[new_idx];
        let old: Vec<&Rev> = revs.iter().enumerate().filter(|(i, _)| *i != new_idx).map(|(_, r)| r).collect();
        let mut changes = Vec::new();
        let active: Vec<&Rev> =
            std::iter::once(new).chain(old.iter().rev().copied()).filter(|r| r.counts.spec > 0).collect();
        let min_ready_changed = new.rs.spec.min_ready_seconds != d.spec.min_ready_seconds;
        if active.len() > 1
            && desired_of(&new.rs) != Some(replicas)
            && matches!(d.spec.strategy, Strategy::RollingUpdate(_))
        {
            // A scale in the middle of a rollout: in proportion, then the rollout goes on.
            let specs: Vec<u32> = active.iter().map(|r| r.counts.spec).collect();
            for (n, r) in rollout::proportional(replicas, surge, &specs).into_iter().zip(&active) {
                changes.push(scaled(&r.rs, n, replicas));
            }
        } else {
            let old_counts: Vec<Counts> = old.iter().map(|r| r.counts).collect();
            let (n, o) = match d.spec.strategy {
                Strategy::RollingUpdate(_) => rollout::rolling(replicas, surge, unavailable, new.counts, &old_counts),
                Strategy::Recreate => rollout::recreate(replicas, new.counts, &old_counts),
            };
            let mut next = scaled(&new.rs, n, replicas);
            if min_ready_changed {
                next.spec.min_ready_seconds = d.spec.min_ready_seconds;
            }
            changes.push(next);
            for (t, r) in o.into_iter().zip(&old) {
                changes.push(scaled(&r.rs, t, replicas));
            }
        }
        progressed |= self.write_scales(ctx, &d, changes, &revs).await?;

        // History: old revisions without workloads beyond the limit go, oldest first.
        let idle: Vec<&Rev> = old.iter().filter(|r| r.counts.spec == 0 && r.counts.actual == 0).copied().collect();
        let excess = idle.len().saturating_sub(d.spec.revision_history_limit as usize);
        for r in idle.iter().take(excess) {
            match rs_api.delete(&r.rs.metadata.name, &DeleteOptions::default()).await {
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }

        let new = &revs[new_idx];
        let status = self.status(&d, &revs, Some(new_idx), now, progressed, created_now);
        let deadline = Duration::from_secs(u64::from(d.spec.progress_deadline_seconds));
        let complete = is_complete(replicas, &revs, new_idx);
        let exceeded = find_condition(&status.conditions, deployment_condition::PROGRESSING)
            .is_some_and(|c| c.reason == "ProgressDeadlineExceeded");
        if complete && new.rs.metadata.annotations.contains_key(FAILED_ANNOTATION) {
            let mut next = (*new.rs).clone();
            next.metadata.annotations.remove(FAILED_ANNOTATION);
            let written = rs_api.replace(&next).await?;
            self.gate.wrote(&key, written.metadata.resource_version);
        }
        if d.spec.rollback.on_failure && !complete {
            let failing = new.failures >= d.spec.rollback.failure_threshold;
            if exceeded || failing {
                let why = if exceeded { "ProgressDeadlineExceeded" } else { "WorkloadsFailing" };
                let detail = if exceeded {
                    format!("made no progress for {}s", deadline.as_secs())
                } else {
                    format!("its workloads failed or restarted {} times", new.failures)
                };
                return self.roll_back(ctx, &d, &revs, new_idx, status, why, &detail, now).await;
            }
        }
        let status_changed = self.write_status(ctx, &d, status.clone()).await?;
        if exceeded && status_changed {
            recorder.record(
                &me,
                EventType::Warning,
                "ProgressDeadlineExceeded",
                format!(
                    "revision {} ({}) made no progress for {}s",
                    revision_of(&new.rs),
                    new.rs.metadata.name,
                    deadline.as_secs()
                ),
            );
        }
        if complete {
            if status_changed
                && find_condition(&d.status.conditions, deployment_condition::PROGRESSING)
                    .is_none_or(|c| c.reason != "NewRevisionAvailable")
            {
                recorder.record(
                    &me,
                    EventType::Normal,
                    "RolloutComplete",
                    format!("revision {} ({}) is available", revision_of(&new.rs), new.rs.metadata.name),
                );
            }
            return Ok(Action::Done);
        }
        // Come back when a workload becomes available, or when the deadline passes.
        let mut wake = status.last_progress_time.map(|t| t.plus(deadline).since(now).max(Duration::from_millis(1)));
        for r in &revs {
            if let Some(t) = r.next_available {
                let d = t.since(now).max(Duration::from_millis(1));
                wake = Some(wake.map_or(d, |w| w.min(d)));
            }
        }
        Ok(wake.map_or(Action::Done, Action::RequeueAfter))
    }
}

/// True when the current revision has every replica, all available, and no old one has any.
fn is_complete(replicas: u32, revs: &[Rev], new_idx: usize) -> bool {
    let new = &revs[new_idx];
    new.counts.spec == replicas
        && new.counts.actual == replicas
        && new.counts.available == replicas
        && revs.iter().enumerate().all(|(i, r)| i == new_idx || r.counts.size() == 0)
}

impl DeploymentController {
    /// The status the deployment should show.
    fn status(
        &self,
        d: &Object<Deployment>,
        revs: &[Rev],
        new_idx: Option<usize>,
        now: Timestamp,
        progressed: bool,
        created_now: bool,
    ) -> DeploymentStatus {
        let replicas = d.spec.replicas;
        let mut s = DeploymentStatus {
            observed_generation: d.metadata.generation,
            conditions: d.status.conditions.clone(),
            last_progress_time: d.status.last_progress_time,
            current_revision: d.status.current_revision,
            ..Default::default()
        };
        for r in revs {
            s.replicas += r.counts.actual;
            s.ready_replicas += r.ready;
            s.available_replicas += r.counts.available;
        }
        s.unavailable_replicas = replicas.saturating_sub(s.available_replicas);
        let unavailable = match d.spec.strategy {
            Strategy::RollingUpdate(r) => r.resolve(replicas).1,
            Strategy::Recreate => 0,
        };
        let available = if s.available_replicas >= replicas.saturating_sub(unavailable) {
            Condition {
                message: format!("{} of {replicas} workloads available", s.available_replicas),
                ..Condition::new(deployment_condition::AVAILABLE, ConditionStatus::True, "MinimumReplicasAvailable")
            }
        } else {
            Condition {
                message: format!(
                    "{} of {replicas} workloads available; at least {} needed",
                    s.available_replicas,
                    replicas.saturating_sub(unavailable)
                ),
                ..Condition::new(deployment_condition::AVAILABLE, ConditionStatus::False, "MinimumReplicasUnavailable")
            }
        };
        set_condition(&mut s.conditions, available, now);
        let Some(new_idx) = new_idx else {
            let mut c = Condition::new(deployment_condition::PROGRESSING, ConditionStatus::Unknown, "DeploymentPaused");
            c.message = "the deployment is paused: template changes wait until it resumes".into();
            set_condition(&mut s.conditions, c, now);
            // The deadline does not run while paused.
            s.last_progress_time = None;
            return s;
        };
        let new = &revs[new_idx];
        s.updated_replicas = new.counts.actual;
        s.current_revision = revision_of(&new.rs);
        let moved = progressed
            || s.updated_replicas != d.status.updated_replicas
            || s.available_replicas != d.status.available_replicas
            || s.replicas != d.status.replicas
            || s.last_progress_time.is_none();
        if moved {
            s.last_progress_time = Some(now);
        }
        let deadline = Duration::from_secs(u64::from(d.spec.progress_deadline_seconds));
        let name = &new.rs.metadata.name;
        let rev = revision_of(&new.rs);
        let progressing = if is_complete(replicas, revs, new_idx) {
            Condition {
                message: format!("revision {rev} ({name}) is available"),
                ..Condition::new(deployment_condition::PROGRESSING, ConditionStatus::True, "NewRevisionAvailable")
            }
        } else if s.last_progress_time.is_some_and(|t| now.since(t) >= deadline) {
            Condition {
                message: format!("revision {rev} ({name}) made no progress for {}s", deadline.as_secs()),
                ..Condition::new(deployment_condition::PROGRESSING, ConditionStatus::False, "ProgressDeadlineExceeded")
            }
        } else if created_now {
            Condition {
                message: format!("revision {rev} ({name}) is rolling out"),
                ..Condition::new(deployment_condition::PROGRESSING, ConditionStatus::True, "NewRevisionCreated")
            }
        } else {
            Condition {
                message: format!("revision {rev} ({name}): {} of {replicas} updated", s.updated_replicas),
                ..Condition::new(deployment_condition::PROGRESSING, ConditionStatus::True, "RevisionUpdated")
            }
        };
        set_condition(&mut s.conditions, progressing, now);
        s
    }

    /// Writes the status when it changed; true when it did.
    async fn write_status(
        &self,
        ctx: &Context,
        d: &Object<Deployment>,
        status: DeploymentStatus,
    ) -> Result<bool, Error> {
        if status == d.status {
            return Ok(false);
        }
        match ctx.api::<Deployment>(&d.metadata.namespace).write_status(&d.metadata, &status).await {
            Ok(_) => Ok(true),
            // Changed meanwhile: the change brings it back here.
            Err(e) if e.is_conflict() || e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Marks the current revision failed and makes the last good one current again.
    #[allow(clippy::too_many_arguments)]
    async fn roll_back(
        &self,
        ctx: &Context,
        d: &Object<Deployment>,
        revs: &[Rev],
        new_idx: usize,
        mut status: DeploymentStatus,
        why: &str,
        detail: &str,
        now: Timestamp,
    ) -> Result<Action, Error> {
        let new = &revs[new_idx];
        let me = ObjectReference::of(d);
        let recorder = self.recorder.get(ctx);
        let rs_api = ctx.api::<ReplicaSet>(&d.metadata.namespace);
        let from = revision_of(&new.rs);
        if !new.rs.metadata.annotations.contains_key(FAILED_ANNOTATION) {
            let mut marked = (*new.rs).clone();
            marked.metadata.annotations.insert(FAILED_ANNOTATION, why);
            let written = rs_api.replace(&marked).await?;
            self.gate.wrote(&ObjectRef::of(d), written.metadata.resource_version);
        }
        let target = revs
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                *i != new_idx && revision_of(&r.rs) < from && !r.rs.metadata.annotations.contains_key(FAILED_ANNOTATION)
            })
            .max_by_key(|(_, r)| revision_of(&r.rs))
            .map(|(_, r)| r);
        let Some(target) = target else {
            recorder.record(
                &me,
                EventType::Warning,
                "RollbackImpossible",
                format!(
                    "revision {from} ({}) {detail}; no earlier revision that did not fail is left",
                    new.rs.metadata.name
                ),
            );
            self.write_status(ctx, d, status).await?;
            return Ok(Action::Done);
        };
        let to = revision_of(&target.rs);
        let message = format!(
            "revision {from} ({}) {detail}; rolled back to revision {to} ({})",
            new.rs.metadata.name, target.rs.metadata.name
        );
        let mut next = d.clone();
        next.spec.template = declared_template(&target.rs);
        let written = ctx.api::<Deployment>(&d.metadata.namespace).replace(&next).await?;
        let mut c = Condition::new(deployment_condition::ROLLED_BACK, ConditionStatus::True, why);
        c.message = message.clone();
        set_condition(&mut status.conditions, c, now);
        let mut p = Condition::new(deployment_condition::PROGRESSING, ConditionStatus::True, "RolledBack");
        p.message = message.clone();
        set_condition(&mut status.conditions, p, now);
        status.last_progress_time = Some(now);
        match ctx.api::<Deployment>(&d.metadata.namespace).write_status(&written.metadata, &status).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() || e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        recorder.record(&me, EventType::Warning, "RolledBack", message);
        Ok(Action::Done)
    }
}

/// Makes an earlier revision's template current again: revision `to`, or with `None` the one
/// before the current revision. Returns the updated deployment; the controller then rolls it
/// out like any change. Fails with `Invalid` naming `rollback.revision` when the history has
/// no such revision (it says which it has).
pub async fn rollback(
    store: Arc<dyn Store>,
    namespace: &str,
    name: &str,
    to: Option<u64>,
) -> Result<Object<Deployment>, Error> {
    let deployments: Api<Deployment> = Api::namespaced(store.clone(), namespace);
    let sets: Api<ReplicaSet> = Api::namespaced(store, namespace);
    let d = deployments.get(name).await?;
    let mut history: Vec<Object<ReplicaSet>> = sets
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|rs| rs.metadata.controller_owner().is_some_and(|o| o.uid == d.metadata.uid))
        .collect();
    history.sort_by_key(revision_of);
    let current_name = revision_name(&d.metadata.name, &d.spec.template);
    let current = history.iter().find(|rs| rs.metadata.name == current_name).map(revision_of);
    let target = match to {
        Some(n) => history.iter().find(|rs| revision_of(rs) == n),
        None => {
            history.iter().rfind(|rs| rs.metadata.name != current_name && current.is_none_or(|c| revision_of(rs) < c))
        }
    };
    let Some(target) = target else {
        let kept: Vec<String> = history.iter().map(|rs| revision_of(rs).to_string()).collect();
        let wanted = to.map_or_else(|| "an earlier revision".to_string(), |n| format!("revision {n}"));
        return Err(Error::invalid(
            "Deployment",
            "rollback.revision",
            format!(
                "{wanted} is not in the history of {name} (kept: {})",
                if kept.is_empty() { "none".into() } else { kept.join(", ") }
            ),
        ));
    };
    let template = declared_template(target);
    deployments
        .retry_on_conflict(name, |d| {
            d.spec.template = template.clone();
            Ok(())
        })
        .await
}

/// Rolls every workload of the deployment over to a fresh copy (a new revision with the same
/// spec), by stamping the template with the time of the restart.
pub async fn restart(
    store: Arc<dyn Store>,
    namespace: &str,
    name: &str,
    now: Timestamp,
) -> Result<Object<Deployment>, Error> {
    let deployments: Api<Deployment> = Api::namespaced(store, namespace);
    deployments
        .retry_on_conflict(name, |d| {
            d.spec.template.metadata.annotations.insert(RESTARTED_AT_ANNOTATION, now.to_string());
            Ok(())
        })
        .await
}

/// The revisions of a deployment, oldest first, with their numbers.
pub async fn history(
    store: Arc<dyn Store>,
    namespace: &str,
    name: &str,
) -> Result<Vec<(u64, Object<ReplicaSet>)>, Error> {
    let deployments: Api<Deployment> = Api::namespaced(store.clone(), namespace);
    let sets: Api<ReplicaSet> = Api::namespaced(store, namespace);
    let d = deployments.get(name).await?;
    let mut out: Vec<(u64, Object<ReplicaSet>)> = sets
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|rs| rs.metadata.controller_owner().is_some_and(|o| o.uid == d.metadata.uid))
        .map(|rs| (revision_of(&rs), rs))
        .collect();
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}
