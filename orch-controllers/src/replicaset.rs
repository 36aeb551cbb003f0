//! The replica set controller: keeps `replicas` workloads of a [`ReplicaSet`]'s template
//! running, replaces those that finished or failed, removes the least useful first when there
//! are too many (unscheduled, then pending, not ready, not yet available, then the youngest),
//! and reports how many are ready and available.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use orch_core::cache::ObjectRef;
use orch_core::controller::{Action, Context, Controller, ControllerBuilder};
use orch_core::error::Error;
use orch_core::kinds::{EventType, ObjectReference, Phase, ReplicaSet, ReplicaSetStatus, Workload};
use orch_core::meta::ObjectMeta;
use orch_core::object::Object;
use orch_core::store::DeleteOptions;

use crate::workloads::{LazyRecorder, WriteGate, available_at, is_active, is_ready, name_prefix, random_suffix};

/// At most this many workload writes per reconcile; the rest come on the next one.
const BATCH: usize = 500;

/// The controller (register it with [`ReplicaSetController::builder`]).
#[derive(Debug)]
pub struct ReplicaSetController {
    gate: WriteGate,
    recorder: LazyRecorder,
}

impl ReplicaSetController {
    /// The controller wired to its triggers: replica sets and the workloads they own.
    pub fn builder() -> ControllerBuilder<ReplicaSetController> {
        ControllerBuilder::new(
            "replicaset",
            ReplicaSetController { gate: WriteGate::default(), recorder: LazyRecorder::new("replicaset-controller") },
        )
        .owns::<Workload>()
    }
}

/// Orders workloads so that the ones to remove first come first.
fn removal_rank(w: &Object<Workload>, now: orch_core::Timestamp, min_ready: Duration) -> impl Ord {
    let available = available_at(w, min_ready).is_some_and(|t| t <= now);
    (
        w.spec.node_name.is_some(),
        w.status.phase != Phase::Pending,
        is_ready(w),
        available,
        std::cmp::Reverse(w.metadata.create_revision),
    )
}

#[async_trait::async_trait]
impl Controller for ReplicaSetController {
    type Kind = ReplicaSet;
    type Error = Error;

    async fn reconcile(&self, rs: Arc<Object<ReplicaSet>>, ctx: &Context) -> Result<Action, Error> {
        let key = ObjectRef::of(&rs);
        if rs.metadata.is_being_deleted() {
            self.gate.forget(&key);
            return Ok(Action::Done);
        }
        let cache = ctx.cache::<Workload>().expect("registered by the builder");
        if !self.gate.caught_up(&key, cache.revision()) {
            return Ok(Action::RequeueAfter(Duration::from_millis(100)));
        }
        let now = ctx.clock().now();
        let min_ready = Duration::from_secs(u64::from(rs.spec.min_ready_seconds));
        let ns = &rs.metadata.namespace;
        let api = ctx.api::<Workload>(ns);
        let owned: Vec<Arc<Object<Workload>>> = cache
            .owned_by(&rs.metadata.uid)
            .into_iter()
            .filter(|w| w.metadata.controller_owner().is_some_and(|o| o.uid == rs.metadata.uid))
            .collect();
        let mut last_write = 0u64;
        let mut status = ReplicaSetStatus {
            observed_generation: rs.metadata.generation,
            replaced: rs.status.replaced,
            ..Default::default()
        };
        let recorder = self.recorder.get(ctx);
        let me = ObjectReference::of(&*rs);

        // Finished workloads are replaced: a replica set's workloads run until it stops them.
        let finished: Vec<_> = owned
            .iter()
            .filter(|w| !w.metadata.is_being_deleted() && matches!(w.status.phase, Phase::Succeeded | Phase::Failed))
            .collect();
        for w in &finished {
            match api.delete(&w.metadata.name, &DeleteOptions::default()).await {
                Ok(d) => {
                    let o = match &d {
                        orch_core::api::Deleted::Gone(o) | orch_core::api::Deleted::Pending(o) => o,
                    };
                    last_write = last_write.max(o.metadata.resource_version);
                    status.replaced += 1;
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        if !finished.is_empty() {
            recorder.record(
                &me,
                EventType::Warning,
                "WorkloadsReplaced",
                format!("{} workloads finished or failed and are replaced", finished.len()),
            );
        }

        let mut active: Vec<&Arc<Object<Workload>>> = owned.iter().filter(|w| is_active(w)).collect();
        let want = rs.spec.replicas as usize;
        if active.len() < want {
            let n = (want - active.len()).min(BATCH);
            let prefix = name_prefix(&rs.metadata.name, 240);
            let creates = (0..n).map(|_| {
                let mut meta = ObjectMeta::namespaced(ns.clone(), format!("{prefix}-{}", random_suffix(5)));
                meta.labels = rs.spec.template.metadata.labels.clone();
                meta.annotations = rs.spec.template.metadata.annotations.clone();
                meta.owner_references = vec![rs.controller_ref()];
                let w = Object::new(meta, rs.spec.template.spec.clone());
                let api = api.clone();
                async move { api.create(&w).await }
            });
            let mut created = 0;
            for result in join_all(creates).await {
                match result {
                    Ok(w) => {
                        last_write = last_write.max(w.metadata.resource_version);
                        created += 1;
                    }
                    // A name taken by chance: the next reconcile makes up for it.
                    Err(Error::AlreadyExists(_)) => {}
                    Err(e) => {
                        self.gate.wrote(&key, last_write);
                        recorder.record(&me, EventType::Warning, "FailedCreate", format!("creating a workload: {e}"));
                        return Err(e);
                    }
                }
            }
            recorder.record(&me, EventType::Normal, "SuccessfulCreate", format!("created {created} workloads"));
        } else if active.len() > want {
            active.sort_by_cached_key(|w| removal_rank(w, now, min_ready));
            let excess: Vec<_> = active.drain(..active.len() - want).take(BATCH).collect();
            let opts = DeleteOptions::default();
            let deletes = excess.iter().map(|w| api.delete(&w.metadata.name, &opts));
            let mut deleted = 0;
            for result in join_all(deletes).await {
                match result {
                    Ok(orch_core::api::Deleted::Gone(o) | orch_core::api::Deleted::Pending(o)) => {
                        last_write = last_write.max(o.metadata.resource_version);
                        deleted += 1;
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        self.gate.wrote(&key, last_write);
                        return Err(e);
                    }
                }
            }
            recorder.record(&me, EventType::Normal, "SuccessfulDelete", format!("deleted {deleted} workloads"));
        }
        self.gate.wrote(&key, last_write);

        // Status, from what the cache showed (the next reconcile reports the writes just made).
        let mut next_available: Option<orch_core::Timestamp> = None;
        for w in owned.iter().filter(|w| is_active(w)) {
            status.replicas += 1;
            status.ready_replicas += u32::from(is_ready(w));
            status.failures += w.status.restart_count;
            match available_at(w, min_ready) {
                Some(t) if t <= now => status.available_replicas += 1,
                Some(t) => next_available = Some(next_available.map_or(t, |n| n.min(t))),
                None => {}
            }
        }
        status.failures += status.replaced;
        if status != rs.status {
            match ctx.api::<ReplicaSet>(ns).write_status(&rs.metadata, &status).await {
                Ok(_) => {}
                // Changed meanwhile (a new scale): the change brings it back here.
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(match next_available {
            Some(t) => Action::RequeueAfter(t.since(now).max(Duration::from_millis(1))),
            None => Action::Done,
        })
    }
}
