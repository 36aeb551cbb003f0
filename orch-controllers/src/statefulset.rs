//! The stateful set controller: keeps the replicas of a [`StatefulSet`] as workloads with
//! stable names, `<set>-0` … `<set>-<replicas-1>`, each owned by the set and labelled with the
//! set's template labels, its revision ([`TEMPLATE_HASH_LABEL`]) and its ordinal
//! ([`ORDINAL_LABEL`]).
//!
//! - Before replica `i` is created, each of its claims (`<template>-<set>-<i>`, one per
//!   [`VolumeClaimTemplate`](orch_core::kinds::VolumeClaimTemplate)) is created; the claims are
//!   not owned by the set, so they are kept when it scales down or is deleted, and a replica
//!   created again under its name finds its data. A claim being deleted is waited for.
//! - A replica that is deleted, fails or finishes comes back under the same name.
//! - `OrderedReady` creates replica `i` only once `0..i` are running and available, and scales
//!   down from the highest ordinal, one at a time, each gone before the next goes (and, as in
//!   Kubernetes, only while the replicas below are available, unless the one to go is the
//!   first that is not). `Parallel` creates and removes them all at once.
//! - `RollingUpdate` replaces the replicas whose ordinal is at least the partition and whose
//!   revision is not the template's, from the highest ordinal down, one at a time, each waiting
//!   for the one above to be replaced and available. A replica below the partition that must be
//!   created again gets the current (old) revision, from the template the status records for it
//!   (`currentTemplate`, written whenever a revision becomes current), even when no replica
//!   runs it any more. `OnDelete` replaces only the replicas someone deletes.
//!
//! Workloads have no hostname or subdomain, so `serviceName` gives replicas no DNS names.

use std::sync::Arc;
use std::time::Duration;

use orch_core::api::Deleted;
use orch_core::cache::ObjectRef;
use orch_core::controller::{Action, Context, Controller, ControllerBuilder};
use orch_core::error::Error;
use orch_core::kinds::{
    Condition, ConditionStatus, EventType, ORDINAL_LABEL, ObjectReference, Phase, PodManagementPolicy, StatefulSet,
    StatefulSetStatus, StatefulSetUpdate, TEMPLATE_HASH_LABEL, TemplateMeta, VolumeClaim, VolumeSource, Workload,
    WorkloadTemplate, set_condition, stateful_set_condition,
};
use orch_core::meta::{ObjectMeta, Timestamp};
use orch_core::object::Object;
use orch_core::store::DeleteOptions;

use crate::workloads::{LazyRecorder, WriteGate, available_at, is_active, is_ready};

/// How long a replica waiting for a claim that is being deleted waits before the next look
/// (claims are read, not watched).
const CLAIM_RECHECK: Duration = Duration::from_secs(5);

/// The controller (register it with [`StatefulSetController::builder`]).
#[derive(Debug)]
pub struct StatefulSetController {
    gate: WriteGate,
    recorder: LazyRecorder,
}

impl StatefulSetController {
    /// The controller wired to its triggers: stateful sets and the workloads they own; it reads
    /// volume claims through the shared cache.
    pub fn builder() -> ControllerBuilder<StatefulSetController> {
        ControllerBuilder::new(
            "statefulset",
            StatefulSetController { gate: WriteGate::default(), recorder: LazyRecorder::new("statefulset-controller") },
        )
        .owns::<Workload>()
        .reads::<VolumeClaim>()
    }
}

/// The ordinal of a workload of set `set`, from its name `<set>-<ordinal>`; `None` for any other
/// name (such a workload is left alone).
pub fn ordinal_of(set: &str, workload: &str) -> Option<u32> {
    let digits = workload.strip_prefix(set)?.strip_prefix('-')?;
    let n: u32 = digits.parse().ok()?;
    (n.to_string() == digits).then_some(n)
}

/// The name of replica `ordinal` of set `set`.
pub fn replica_name(set: &str, ordinal: u32) -> String {
    format!("{set}-{ordinal}")
}

fn hash_of(w: &Object<Workload>) -> &str {
    w.metadata.labels.get(TEMPLATE_HASH_LABEL).map_or("", String::as_str)
}

/// What one reconcile sees and does.
struct Pass<'a> {
    ctl: &'a StatefulSetController,
    ctx: &'a Context,
    set: &'a Object<StatefulSet>,
    key: ObjectRef,
    me: ObjectReference,
    now: Timestamp,
    min_ready: Duration,
    update_hash: String,
    current_hash: String,
    /// The template of the current revision, when known.
    current_template: Option<WorkloadTemplate>,
    /// Every workload the set owns, for copying the current revision.
    owned: Vec<Arc<Object<Workload>>>,
    claims: orch_core::Cache<VolumeClaim>,
    /// Set when a replica waits for a claim being deleted.
    claim_wait: Option<String>,
    /// What the pass stopped to wait for, for people (`db-1 to be available`).
    waiting: Option<String>,
    /// The earliest time a ready replica becomes available.
    next_available: Option<Timestamp>,
}

impl Pass<'_> {
    fn available(&mut self, w: &Object<Workload>) -> bool {
        match available_at(w, self.min_ready) {
            Some(t) if t <= self.now => true,
            Some(t) => {
                self.next_available = Some(self.next_available.map_or(t, |n| n.min(t)));
                false
            }
            None => false,
        }
    }

    /// Makes sure every claim of replica `ordinal` exists; false while one is being deleted
    /// (the replica must not start on the old claim, nor without one).
    async fn ensure_claims(&mut self, ordinal: u32) -> Result<bool, Error> {
        let set = self.set;
        let ns = &set.metadata.namespace;
        let api = self.ctx.api::<VolumeClaim>(ns);
        let mut ready = true;
        for t in &set.spec.volume_claim_templates {
            let name = t.claim_name(&set.metadata.name, ordinal);
            match self.claims.get(&ObjectRef::new(ns, &name)) {
                Some(c) if c.metadata.is_being_deleted() => {
                    self.claim_wait = Some(name);
                    ready = false;
                }
                Some(_) => {}
                None => {
                    let mut meta = ObjectMeta::namespaced(ns.clone(), name.clone());
                    meta.labels = set.spec.template.metadata.labels.clone();
                    meta.labels.insert(ORDINAL_LABEL, ordinal.to_string());
                    match api.create(&Object::new(meta, t.spec.clone())).await {
                        Ok(_) => self.ctl.recorder.get(self.ctx).record(
                            &self.me,
                            EventType::Normal,
                            "SuccessfulCreate",
                            format!("created claim {name} for replica {}", replica_name(&set.metadata.name, ordinal)),
                        ),
                        // Created by an earlier pass the cache has not shown yet.
                        Err(Error::AlreadyExists(_)) => {}
                        Err(e) => {
                            self.ctl.recorder.get(self.ctx).record(
                                &self.me,
                                EventType::Warning,
                                "FailedCreate",
                                format!("creating claim {name}: {e}"),
                            );
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(ready)
    }

    /// The workload of replica `ordinal`: the current revision when a rolling update's
    /// partition keeps this ordinal on it (from the recorded template, or copied from a sibling
    /// that runs it when none is recorded), else the template's.
    fn replica(&self, ordinal: u32) -> Object<Workload> {
        let set = self.set;
        let name = &set.metadata.name;
        let keep_current = matches!(set.spec.update_strategy, StatefulSetUpdate::RollingUpdate(r) if ordinal < r.partition)
            && self.current_hash != self.update_hash;
        let recorded = self.current_template.as_ref().filter(|_| keep_current);
        let sibling = (keep_current && recorded.is_none())
            .then(|| {
                self.owned
                    .iter()
                    .filter(|w| hash_of(w) == self.current_hash)
                    .max_by_key(|w| (is_active(w), w.metadata.create_revision))
            })
            .flatten();
        let mut meta = ObjectMeta::namespaced(set.metadata.namespace.clone(), replica_name(name, ordinal));
        let mut spec = match (recorded, sibling) {
            (Some(t), _) => {
                meta.labels = t.metadata.labels.clone();
                meta.labels.insert(TEMPLATE_HASH_LABEL, self.current_hash.clone());
                meta.annotations = t.metadata.annotations.clone();
                t.spec.clone()
            }
            (None, Some(w)) => {
                meta.labels = w.metadata.labels.clone();
                meta.annotations = w.metadata.annotations.clone();
                let mut spec = w.spec.clone();
                spec.node_name = None;
                spec
            }
            (None, None) => {
                meta.labels = set.spec.template.metadata.labels.clone();
                meta.labels.insert(TEMPLATE_HASH_LABEL, self.update_hash.clone());
                meta.annotations = set.spec.template.metadata.annotations.clone();
                set.spec.template.spec.clone()
            }
        };
        meta.labels.insert(ORDINAL_LABEL, ordinal.to_string());
        meta.owner_references = vec![set.controller_ref()];
        for t in &set.spec.volume_claim_templates {
            let volume = t.volume(name, ordinal);
            match spec.volumes.iter_mut().find(|v| v.name == t.name) {
                Some(v) if matches!(v.source, VolumeSource::Claim { .. }) => *v = volume,
                Some(_) => {}
                None => spec.volumes.push(volume),
            }
        }
        Object::new(meta, spec)
    }

    async fn create(&mut self, ordinal: u32) -> Result<(), Error> {
        let w = self.replica(ordinal);
        let api = self.ctx.api::<Workload>(&self.set.metadata.namespace);
        match api.create(&w).await {
            Ok(created) => {
                self.ctl.gate.wrote(&self.key, created.metadata.resource_version);
                let revision = hash_of(&created).to_string();
                self.ctl.recorder.get(self.ctx).record(
                    &self.me,
                    EventType::Normal,
                    "SuccessfulCreate",
                    format!("created workload {} (revision {})", w.metadata.name, revision),
                );
                Ok(())
            }
            Err(e) => {
                self.ctl.recorder.get(self.ctx).record(
                    &self.me,
                    EventType::Warning,
                    "FailedCreate",
                    format!("creating workload {}: {e}", w.metadata.name),
                );
                Err(e)
            }
        }
    }

    async fn delete(&mut self, w: &Object<Workload>, why: &str) -> Result<(), Error> {
        let api = self.ctx.api::<Workload>(&self.set.metadata.namespace);
        match api.delete(&w.metadata.name, &DeleteOptions::default()).await {
            Ok(Deleted::Gone(o) | Deleted::Pending(o)) => {
                self.ctl.gate.wrote(&self.key, o.metadata.resource_version);
                let (type_, reason) = if why == "failed" {
                    (EventType::Warning, "RecreatingFailedWorkload")
                } else {
                    (EventType::Normal, "SuccessfulDelete")
                };
                self.ctl.recorder.get(self.ctx).record(
                    &self.me,
                    type_,
                    reason,
                    format!("deleted workload {} ({why})", w.metadata.name),
                );
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[async_trait::async_trait]
impl Controller for StatefulSetController {
    type Kind = StatefulSet;
    type Error = Error;

    async fn reconcile(&self, set: Arc<Object<StatefulSet>>, ctx: &Context) -> Result<Action, Error> {
        let key = ObjectRef::of(&set);
        if set.metadata.is_being_deleted() {
            self.gate.forget(&key);
            return Ok(Action::Done);
        }
        let workloads = ctx.cache::<Workload>().expect("registered by the builder");
        let claims = ctx.cache::<VolumeClaim>().expect("registered by the builder");
        if !self.gate.caught_up(&key, workloads.revision()) {
            return Ok(Action::RequeueAfter(Duration::from_millis(100)));
        }
        let name = set.metadata.name.clone();
        let update_hash = set.spec.template.hash();
        let update_revision = format!("{name}-{update_hash}");
        let current_revision = if set.status.current_revision.is_empty() {
            update_revision.clone()
        } else {
            set.status.current_revision.clone()
        };
        let current_hash = current_revision.strip_prefix(&format!("{name}-")).unwrap_or_default().to_string();
        let owned: Vec<Arc<Object<Workload>>> = workloads
            .owned_by(&set.metadata.uid)
            .into_iter()
            .filter(|w| w.metadata.controller_owner().is_some_and(|o| o.uid == set.metadata.uid))
            .collect();
        let current_template = if current_hash == update_hash {
            Some(set.spec.template.clone())
        } else {
            // Recorded when the revision became current; a status written without it (by an
            // earlier controller) gets it from a replica that still runs that revision.
            set.status.current_template.clone().filter(|t| t.hash() == current_hash).or_else(|| {
                owned
                    .iter()
                    .filter(|w| hash_of(w) == current_hash)
                    .map(|w| template_of(w, &set.spec))
                    .find(|t| t.hash() == current_hash)
            })
        };
        let n = set.spec.replicas;
        let mut replicas: Vec<Option<Arc<Object<Workload>>>> = vec![None; n as usize];
        let mut condemned: Vec<(u32, Arc<Object<Workload>>)> = Vec::new();
        for w in &owned {
            match ordinal_of(&name, &w.metadata.name) {
                Some(i) if i < n => replicas[i as usize] = Some(w.clone()),
                Some(i) => condemned.push((i, w.clone())),
                None => {}
            }
        }
        condemned.sort_by_key(|(i, _)| *i);
        let mut pass = Pass {
            ctl: self,
            ctx,
            set: &set,
            key: key.clone(),
            me: ObjectReference::of(&*set),
            now: ctx.clock().now(),
            min_ready: Duration::from_secs(u64::from(set.spec.min_ready_seconds)),
            update_hash: update_hash.clone(),
            current_hash: current_hash.clone(),
            current_template: current_template.clone(),
            owned: owned.clone(),
            claims,
            claim_wait: None,
            waiting: None,
            next_available: None,
        };
        let ordered = set.spec.pod_management_policy == PodManagementPolicy::OrderedReady;
        let result = self.converge(&mut pass, &replicas, &condemned, ordered).await;

        // Status, from what the cache showed (the next pass reports the writes just made).
        let mut status = StatefulSetStatus {
            observed_generation: set.metadata.generation,
            update_revision: update_revision.clone(),
            current_revision,
            current_template,
            conditions: set.status.conditions.clone(),
            ..Default::default()
        };
        for w in owned.iter().filter(|w| is_active(w)) {
            status.replicas += 1;
            status.ready_replicas += u32::from(is_ready(w));
            status.available_replicas += u32::from(pass.available(w));
            status.current_replicas += u32::from(hash_of(w) == current_hash);
            status.updated_replicas += u32::from(hash_of(w) == update_hash);
        }
        let complete = status.replicas == n && status.updated_replicas == n && status.ready_replicas == n;
        if complete {
            status.current_revision = update_revision;
            status.current_template = Some(set.spec.template.clone());
            status.current_replicas = status.updated_replicas;
        }
        let now = pass.now;
        let mut updated = updated_condition(&set, &replicas, &status, &update_hash);
        if let (ConditionStatus::False, Some(w)) = (updated.status, &pass.waiting) {
            updated.message = format!("{}; waiting for {w}", updated.message);
        }
        set_condition(&mut status.conditions, updated, now);
        let failure = match (&result, &pass.claim_wait) {
            (Err(e), _) => Some(Condition {
                message: e.to_string(),
                ..Condition::new(stateful_set_condition::REPLICA_FAILURE, ConditionStatus::True, "FailedCreate")
            }),
            (Ok(_), Some(claim)) => Some(Condition {
                message: format!("claim {claim} is being deleted; its replica waits until it is gone"),
                ..Condition::new(stateful_set_condition::REPLICA_FAILURE, ConditionStatus::True, "ClaimTerminating")
            }),
            (Ok(_), None) => None,
        };
        match failure {
            Some(c) => set_condition(&mut status.conditions, c, now),
            None => status.conditions.retain(|c| c.type_ != stateful_set_condition::REPLICA_FAILURE),
        }
        if status != set.status {
            match ctx.api::<StatefulSet>(&set.metadata.namespace).write_status(&set.metadata, &status).await {
                Ok(_) => {}
                // Changed meanwhile: the change brings it back here.
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        result?;
        let mut wake = pass.next_available.map(|t| t.since(now).max(Duration::from_millis(1)));
        if pass.claim_wait.is_some() {
            wake = Some(wake.map_or(CLAIM_RECHECK, |w| w.min(CLAIM_RECHECK)));
        }
        Ok(wake.map_or(Action::Done, Action::RequeueAfter))
    }
}

impl StatefulSetController {
    /// One step towards the spec: replicas created or restored in order, excess replicas
    /// removed from the highest ordinal, then the rolling update.
    async fn converge(
        &self,
        pass: &mut Pass<'_>,
        replicas: &[Option<Arc<Object<Workload>>>],
        condemned: &[(u32, Arc<Object<Workload>>)],
        ordered: bool,
    ) -> Result<(), Error> {
        // Replicas 0..n: missing ones are created (claims first), failed or finished ones
        // deleted to come back under their name. In order, the first one that is not available
        // stops the pass.
        let name = |i: u32| replica_name(&pass.set.metadata.name, i);
        let mut first_unhealthy: Option<u32> = None;
        for (i, slot) in replicas.iter().enumerate() {
            let i = i as u32;
            match slot {
                None => {
                    if pass.ensure_claims(i).await? {
                        pass.create(i).await?;
                    }
                    if ordered {
                        pass.waiting = Some(format!("{} to be created and available", name(i)));
                        return Ok(());
                    }
                }
                Some(w) if w.metadata.is_being_deleted() => {
                    if ordered {
                        pass.waiting = Some(format!("{} to be gone and created again", name(i)));
                        return Ok(());
                    }
                }
                Some(w) if matches!(w.status.phase, Phase::Failed | Phase::Succeeded) => {
                    pass.delete(w, if w.status.phase == Phase::Failed { "failed" } else { "finished" }).await?;
                    if ordered {
                        pass.waiting = Some(format!("{} to be created again", name(i)));
                        return Ok(());
                    }
                }
                Some(w) => {
                    // A claim deleted under a running replica comes back for its next start.
                    pass.ensure_claims(i).await?;
                    if !pass.available(w) {
                        first_unhealthy.get_or_insert(i);
                        if ordered {
                            pass.waiting = Some(format!("{} to be available", name(i)));
                            return Ok(());
                        }
                    }
                }
            }
        }
        // Excess replicas, highest first.
        for (i, w) in condemned {
            if !w.metadata.is_being_deleted() && !pass.available(w) {
                first_unhealthy.get_or_insert(*i);
            }
        }
        for (i, w) in condemned.iter().rev() {
            if w.metadata.is_being_deleted() {
                if ordered {
                    pass.waiting = Some(format!("{} to be gone", name(*i)));
                    return Ok(());
                }
                continue;
            }
            if ordered && !pass.available(w) && first_unhealthy != Some(*i) {
                let lowest = first_unhealthy.map_or_else(String::new, name);
                pass.waiting = Some(format!("{lowest} to be available before {} goes", name(*i)));
                return Ok(());
            }
            pass.delete(w, "scaled down").await?;
            if ordered {
                pass.waiting = Some(format!("{} to be gone", name(*i)));
                return Ok(());
            }
        }
        // The rolling update: the highest replica at or above the partition on another revision
        // goes (it comes back on the template's); one at a time, each waiting for the one above.
        if let StatefulSetUpdate::RollingUpdate(r) = pass.set.spec.update_strategy {
            for i in (r.partition..replicas.len() as u32).rev() {
                let Some(w) = &replicas[i as usize] else {
                    pass.waiting = Some(format!("{} to be created", name(i)));
                    return Ok(());
                };
                if w.metadata.is_being_deleted() {
                    pass.waiting = Some(format!("{} to be gone and created again", name(i)));
                    return Ok(());
                }
                if hash_of(w) != pass.update_hash {
                    pass.delete(w, "rolling update").await?;
                    pass.waiting = Some(format!("{} to come back on the new revision", name(i)));
                    return Ok(());
                }
                if !pass.available(w) {
                    pass.waiting = Some(format!("{} to be available", name(i)));
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The template `w` was made from, as far as `w` tells: its labels and annotations without the
/// ones the controller adds, its spec without its node and the claim volumes the controller
/// adds. The caller checks it against the revision's hash.
fn template_of(w: &Object<Workload>, set: &StatefulSet) -> WorkloadTemplate {
    let mut labels = w.metadata.labels.clone();
    labels.remove(TEMPLATE_HASH_LABEL);
    labels.remove(ORDINAL_LABEL);
    let mut spec = w.spec.clone();
    spec.node_name = None;
    spec.volumes.retain(|v| {
        !(matches!(v.source, VolumeSource::Claim { .. }) && set.volume_claim_templates.iter().any(|t| t.name == v.name))
    });
    WorkloadTemplate { metadata: TemplateMeta { labels, annotations: w.metadata.annotations.clone() }, spec }
}

/// The `Updated` condition: whether every replica runs the template and is available, or what
/// the set waits for.
fn updated_condition(
    set: &Object<StatefulSet>,
    replicas: &[Option<Arc<Object<Workload>>>],
    status: &StatefulSetStatus,
    update_hash: &str,
) -> Condition {
    let n = set.spec.replicas;
    let outdated: Vec<u32> = replicas
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.as_ref().filter(|w| hash_of(w) != update_hash).map(|_| i as u32))
        .collect();
    let (ok, reason, message) = if status.replicas != n {
        (false, "Scaling", format!("{} replicas exist, {n} wanted", status.replicas))
    } else if outdated.is_empty() && status.available_replicas == n {
        (true, "RolloutComplete", format!("{n} replicas run revision {}", status.update_revision))
    } else if outdated.is_empty() {
        (false, "WaitingForAvailable", format!("{} of {n} replicas available", status.available_replicas))
    } else {
        let list = outdated.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        match set.spec.update_strategy {
            StatefulSetUpdate::OnDelete => {
                (false, "WaitingForDeletes", format!("replicas {list} run an old revision until deleted (OnDelete)"))
            }
            StatefulSetUpdate::RollingUpdate(r) if outdated.iter().all(|i| *i < r.partition) => (
                false,
                "PartitionedUpdate",
                format!(
                    "replicas {list} are below the partition {} and keep revision {}",
                    r.partition, status.current_revision
                ),
            ),
            StatefulSetUpdate::RollingUpdate(_) => {
                (false, "RollingUpdate", format!("replicas {list} wait to be replaced, highest first"))
            }
        }
    };
    let status_ = if ok { ConditionStatus::True } else { ConditionStatus::False };
    Condition { message, ..Condition::new(stateful_set_condition::UPDATED, status_, reason) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_come_only_from_canonical_names() {
        assert_eq!(ordinal_of("db", "db-0"), Some(0));
        assert_eq!(ordinal_of("db", "db-12"), Some(12));
        assert_eq!(ordinal_of("db", "db-012"), None, "not a name the controller makes");
        assert_eq!(ordinal_of("db", "db-x"), None);
        assert_eq!(ordinal_of("db", "dbx-1"), None);
        assert_eq!(ordinal_of("db", "db-"), None);
        assert_eq!(ordinal_of("db-1", "db-1-3"), Some(3));
        assert_eq!(replica_name("db", 4), "db-4");
    }
}
