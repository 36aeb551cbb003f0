//! The job controller: runs a [`Job`]'s template until `completions` workloads succeeded (or
//! each index did, for an indexed job), `parallelism` at a time; retries failures after a delay
//! that doubles with each one; fails the job, saying why, past its backoff limit or its active
//! deadline; deletes it `ttlSecondsAfterFinished` after it finished.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use orch_core::cache::ObjectRef;
use orch_core::controller::{Action, Context, Controller, ControllerBuilder};
use orch_core::error::Error;
use orch_core::kinds::{
    COMPLETION_INDEX_ANNOTATION, CompletionMode, Condition, ConditionStatus, ContainerState, EnvVar, EventType, Job,
    JobStatus, ObjectReference, Phase, Workload, find_condition, format_indexes, job_condition, set_condition,
};
use orch_core::meta::{ObjectMeta, Timestamp};
use orch_core::object::Object;
use orch_core::store::DeleteOptions;

use crate::workloads::{LazyRecorder, WriteGate, name_prefix, random_suffix};

/// The longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(360);

/// The controller (register it with [`JobController::builder`]).
#[derive(Debug)]
pub struct JobController {
    gate: WriteGate,
    recorder: LazyRecorder,
}

impl JobController {
    /// The controller wired to its triggers: jobs and the workloads they own.
    pub fn builder() -> ControllerBuilder<JobController> {
        ControllerBuilder::new(
            "job",
            JobController { gate: WriteGate::default(), recorder: LazyRecorder::new("job-controller") },
        )
        .owns::<Workload>()
    }
}

/// The retry delay after `failures` failures with base `base`: base, 2·base, 4·base… at most
/// six minutes.
pub fn retry_delay(base: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    base.saturating_mul(1u32 << (failures - 1).min(20)).min(MAX_BACKOFF)
}

fn index_of(w: &Object<Workload>) -> Option<u32> {
    w.metadata.annotations.get(COMPLETION_INDEX_ANNOTATION).and_then(|v| v.parse().ok())
}

fn finished(job: &Object<Job>) -> Option<&Condition> {
    [job_condition::COMPLETE, job_condition::FAILED]
        .iter()
        .filter_map(|t| find_condition(&job.status.conditions, t))
        .find(|c| c.status == ConditionStatus::True)
}

/// Why a workload failed, in words.
fn failure_of(w: &Object<Workload>) -> String {
    let exit = w.status.container_statuses.iter().find_map(|c| match &c.state {
        ContainerState::Terminated { exit_code, reason, .. } if *exit_code != 0 => Some((*exit_code, reason.clone())),
        _ => None,
    });
    match exit {
        Some((code, reason)) => format!("workload {} failed: exit code {code} ({reason})", w.metadata.name),
        None if w.status.phase == Phase::Failed => format!("workload {} failed: {}", w.metadata.name, w.status.reason),
        None => format!("workload {} restarted {} times", w.metadata.name, w.status.restart_count),
    }
}

impl JobController {
    async fn delete_active(
        &self,
        ctx: &Context,
        job: &Object<Job>,
        active: &[Arc<Object<Workload>>],
    ) -> Result<(), Error> {
        let api = ctx.api::<Workload>(&job.metadata.namespace);
        let opts = DeleteOptions::default();
        for r in join_all(active.iter().map(|w| api.delete(&w.metadata.name, &opts))).await {
            match r {
                Ok(orch_core::api::Deleted::Gone(o) | orch_core::api::Deleted::Pending(o)) => {
                    self.gate.wrote(&ObjectRef::of(job), o.metadata.resource_version)
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // one call per outcome; a struct would only rename them
    async fn finish(
        &self,
        ctx: &Context,
        job: &Object<Job>,
        mut status: JobStatus,
        type_: &str,
        reason: &str,
        message: String,
        now: Timestamp,
    ) -> Result<Action, Error> {
        let mut c = Condition::new(type_, ConditionStatus::True, reason);
        c.message = message.clone();
        set_condition(&mut status.conditions, c, now);
        status.completion_time = Some(now);
        status.active = 0;
        let kind = if type_ == job_condition::FAILED { EventType::Warning } else { EventType::Normal };
        self.recorder.get(ctx).record(&ObjectReference::of(job), kind, reason, message);
        write_status(ctx, job, status).await?;
        Ok(match job.spec.ttl_seconds_after_finished {
            Some(ttl) => Action::RequeueAfter(Duration::from_secs(ttl)),
            None => Action::Done,
        })
    }
}

async fn write_status(ctx: &Context, job: &Object<Job>, status: JobStatus) -> Result<(), Error> {
    if status == job.status {
        return Ok(());
    }
    match ctx.api::<Job>(&job.metadata.namespace).write_status(&job.metadata, &status).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_conflict() || e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

#[async_trait::async_trait]
impl Controller for JobController {
    type Kind = Job;
    type Error = Error;

    async fn reconcile(&self, job: Arc<Object<Job>>, ctx: &Context) -> Result<Action, Error> {
        let key = ObjectRef::of(&job);
        if job.metadata.is_being_deleted() {
            self.gate.forget(&key);
            return Ok(Action::Done);
        }
        let now = ctx.clock().now();
        let api = ctx.api::<Job>(&job.metadata.namespace);
        if let Some(done) = finished(&job) {
            let Some(ttl) = job.spec.ttl_seconds_after_finished else { return Ok(Action::Done) };
            let since = job.status.completion_time.or(done.last_transition_time).unwrap_or(now);
            let at = since.plus(Duration::from_secs(ttl));
            if now < at {
                return Ok(Action::RequeueAfter(at.since(now)));
            }
            // Its workloads go with it, through the garbage collector.
            match api.delete(&job.metadata.name, &DeleteOptions::default()).await {
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            self.gate.forget(&key);
            return Ok(Action::Done);
        }
        let cache = ctx.cache::<Workload>().expect("registered by the builder");
        if !self.gate.caught_up(&key, cache.revision()) {
            return Ok(Action::RequeueAfter(Duration::from_millis(100)));
        }
        let owned: Vec<Arc<Object<Workload>>> = cache
            .owned_by(&job.metadata.uid)
            .into_iter()
            .filter(|w| w.metadata.controller_owner().is_some_and(|o| o.uid == job.metadata.uid))
            .collect();
        let mut status = job.status.clone();
        let start = *status.start_time.get_or_insert(now);
        let active: Vec<Arc<Object<Workload>>> = owned
            .iter()
            .filter(|w| !w.metadata.is_being_deleted() && !matches!(w.status.phase, Phase::Succeeded | Phase::Failed))
            .cloned()
            .collect();
        let failed_workloads: Vec<&Arc<Object<Workload>>> =
            owned.iter().filter(|w| w.status.phase == Phase::Failed).collect();
        let failures = failed_workloads.len() as u32 + owned.iter().map(|w| w.status.restart_count).sum::<u32>();
        if failures > status.failed {
            status.last_failure_time = Some(now);
        }
        status.failed = failures.max(status.failed);
        let last_failure =
            failed_workloads.iter().max_by_key(|w| w.metadata.create_revision).map(|w| failure_of(w)).or_else(|| {
                owned
                    .iter()
                    .filter(|w| w.status.restart_count > 0)
                    .max_by_key(|w| w.metadata.create_revision)
                    .map(|w| failure_of(w))
            });
        let succeeded: Vec<&Arc<Object<Workload>>> =
            owned.iter().filter(|w| w.status.phase == Phase::Succeeded).collect();
        let done_indexes: BTreeSet<u32> = succeeded.iter().filter_map(|w| index_of(w)).collect();
        let completions = job.spec.completions;
        status.succeeded = match job.spec.completion_mode {
            CompletionMode::NonIndexed => succeeded.len() as u32,
            CompletionMode::Indexed => done_indexes.len() as u32,
        };
        if job.spec.completion_mode == CompletionMode::Indexed {
            status.completed_indexes = format_indexes(&done_indexes.iter().copied().collect::<Vec<_>>());
        }
        status.active = active.len() as u32;

        if let Some(deadline) = job.spec.active_deadline_seconds {
            let ends = start.plus(Duration::from_secs(deadline));
            if now >= ends {
                self.delete_active(ctx, &job, &active).await?;
                let message = format!(
                    "the job ran longer than its active deadline of {deadline}s ({} of {completions} succeeded)",
                    status.succeeded
                );
                return self.finish(ctx, &job, status, job_condition::FAILED, "DeadlineExceeded", message, now).await;
            }
        }
        if status.failed > job.spec.backoff_limit {
            self.delete_active(ctx, &job, &active).await?;
            let message = format!(
                "{} failures, more than the backoff limit of {}; last: {}",
                status.failed,
                job.spec.backoff_limit,
                last_failure.unwrap_or_else(|| "unknown".into())
            );
            return self.finish(ctx, &job, status, job_condition::FAILED, "BackoffLimitExceeded", message, now).await;
        }
        if status.succeeded >= completions {
            self.delete_active(ctx, &job, &active).await?;
            let message = format!("{completions} of {completions} completions succeeded");
            return self.finish(ctx, &job, status, job_condition::COMPLETE, "Completed", message, now).await;
        }

        // Start what is missing, once the retry delay after the last failure has passed.
        let delay = retry_delay(Duration::from_secs(u64::from(job.spec.backoff_seconds)), status.failed);
        let retry_at = status.last_failure_time.map(|t| t.plus(delay));
        let mut wake: Option<Duration> = job
            .spec
            .active_deadline_seconds
            .map(|d| start.plus(Duration::from_secs(d)).since(now).max(Duration::from_millis(1)));
        let to_start: Vec<Option<u32>> = match job.spec.completion_mode {
            CompletionMode::NonIndexed => {
                let remaining = completions - status.succeeded;
                let n = remaining.min(job.spec.parallelism).saturating_sub(active.len() as u32);
                vec![None; n as usize]
            }
            CompletionMode::Indexed => {
                let running: HashMap<u32, ()> = active.iter().filter_map(|w| index_of(w)).map(|i| (i, ())).collect();
                let room = job.spec.parallelism.saturating_sub(active.len() as u32) as usize;
                (0..completions)
                    .filter(|i| !done_indexes.contains(i) && !running.contains_key(i))
                    .take(room)
                    .map(Some)
                    .collect()
            }
        };
        if !to_start.is_empty() {
            if let Some(at) = retry_at.filter(|at| *at > now) {
                let d = at.since(now);
                wake = Some(wake.map_or(d, |w| w.min(d)));
            } else {
                let wapi = ctx.api::<Workload>(&job.metadata.namespace);
                let prefix = name_prefix(&job.metadata.name, 220);
                let creates = to_start.iter().map(|index| {
                    let name = match index {
                        Some(i) => format!("{prefix}-{i}-{}", random_suffix(5)),
                        None => format!("{prefix}-{}", random_suffix(5)),
                    };
                    let mut meta = ObjectMeta::namespaced(job.metadata.namespace.clone(), name);
                    meta.labels = job.spec.template.metadata.labels.clone();
                    meta.annotations = job.spec.template.metadata.annotations.clone();
                    meta.owner_references = vec![job.controller_ref()];
                    let mut spec = job.spec.template.spec.clone();
                    if let Some(i) = index {
                        meta.annotations.insert(COMPLETION_INDEX_ANNOTATION, i.to_string());
                        for c in &mut spec.containers {
                            c.env.push(EnvVar { name: "JOB_COMPLETION_INDEX".into(), value: i.to_string() });
                        }
                    }
                    let w = Object::new(meta, spec);
                    let wapi = wapi.clone();
                    async move { wapi.create(&w).await }
                });
                for r in join_all(creates).await {
                    match r {
                        Ok(w) => {
                            self.gate.wrote(&key, w.metadata.resource_version);
                            status.active += 1;
                        }
                        Err(Error::AlreadyExists(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        write_status(ctx, &job, status).await?;
        Ok(wake.map_or(Action::Done, Action::RequeueAfter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_six_minutes() {
        let base = Duration::from_secs(10);
        let delays: Vec<u64> = (0..8).map(|f| retry_delay(base, f).as_secs()).collect();
        assert_eq!(delays, vec![0, 10, 20, 40, 80, 160, 320, 360]);
        assert_eq!(retry_delay(base, 200), MAX_BACKOFF);
    }
}
