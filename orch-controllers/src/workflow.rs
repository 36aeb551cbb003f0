//! The workflow controller: runs a [`Workflow`]'s steps as workloads, each once its
//! dependencies have succeeded, never more than `parallelism` at once; retries a failed step up
//! to its `retries`; on a step that fails for good, fails fast (starts nothing more) or goes on
//! with everything that does not depend on it; reports each step's phase.
//!
//! A step's tries are named `<workflow>-<step>-<try>`, so a restarted controller never starts
//! a try twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use orch_core::cache::ObjectRef;
use orch_core::controller::{Action, Context, Controller, ControllerBuilder};
use orch_core::error::Error;
use orch_core::kinds::{
    EventType, FailurePolicy, ObjectReference, Phase, STEP_ANNOTATION, StepPhase, StepStatus, Workflow, Workload,
};
use orch_core::meta::ObjectMeta;
use orch_core::object::Object;

use crate::workloads::{LazyRecorder, WriteGate, name_prefix};

/// The controller (register it with [`WorkflowController::builder`]).
#[derive(Debug)]
pub struct WorkflowController {
    gate: WriteGate,
    recorder: LazyRecorder,
}

impl WorkflowController {
    /// The controller wired to its triggers: workflows and the workloads they own.
    pub fn builder() -> ControllerBuilder<WorkflowController> {
        ControllerBuilder::new(
            "workflow",
            WorkflowController { gate: WriteGate::default(), recorder: LazyRecorder::new("workflow-controller") },
        )
        .owns::<Workload>()
    }
}

/// The name of try `attempt` (from 1) of a step.
pub fn step_workload_name(workflow: &str, step: &str, attempt: u32) -> String {
    format!("{}-{step}-{attempt}", name_prefix(workflow, 180))
}

/// What the workloads of one step say.
#[derive(Default)]
struct Tries {
    running: u32,
    succeeded: bool,
    failed: u32,
    attempts: u32,
    last_failure: String,
}

#[async_trait::async_trait]
impl Controller for WorkflowController {
    type Kind = Workflow;
    type Error = Error;

    async fn reconcile(&self, wf: Arc<Object<Workflow>>, ctx: &Context) -> Result<Action, Error> {
        let key = ObjectRef::of(&wf);
        if wf.metadata.is_being_deleted() || matches!(wf.status.phase, StepPhase::Succeeded | StepPhase::Failed) {
            self.gate.forget(&key);
            return Ok(Action::Done);
        }
        let cache = ctx.cache::<Workload>().expect("registered by the builder");
        if !self.gate.caught_up(&key, cache.revision()) {
            return Ok(Action::RequeueAfter(Duration::from_millis(100)));
        }
        let now = ctx.clock().now();
        let mut tries: HashMap<String, Tries> = HashMap::new();
        for w in cache.owned_by(&wf.metadata.uid) {
            if w.metadata.controller_owner().is_none_or(|o| o.uid != wf.metadata.uid) {
                continue;
            }
            let Some(step) = w.metadata.annotations.get(STEP_ANNOTATION) else { continue };
            let t = tries.entry(step.clone()).or_default();
            t.attempts += 1;
            match w.status.phase {
                Phase::Succeeded => t.succeeded = true,
                Phase::Failed => {
                    t.failed += 1;
                    t.last_failure = format!("workload {} failed: {}", w.metadata.name, w.status.reason);
                }
                _ if w.metadata.is_being_deleted() => {}
                _ => t.running += 1,
            }
        }
        let spec = &wf.spec;
        let mut status = wf.status.clone();
        status.start_time.get_or_insert(now);
        status.phase = StepPhase::Running;
        // Each step's phase from its workloads (a final phase never changes).
        for s in &spec.steps {
            let st = status.steps.entry(s.name.clone()).or_default();
            if st.phase.is_final() {
                continue;
            }
            let t = tries.get(&s.name);
            st.attempts = st.attempts.max(t.map_or(0, |t| t.attempts));
            st.phase = match t {
                Some(t) if t.succeeded => StepPhase::Succeeded,
                Some(t) if t.running > 0 => StepPhase::Running,
                Some(t) if t.failed > s.retries => {
                    st.message =
                        format!("failed {} times (retries: {}); last: {}", t.failed, s.retries, t.last_failure);
                    StepPhase::Failed
                }
                _ => StepPhase::Pending,
            };
        }
        let failed_any = spec.steps.iter().any(|s| status.steps[&s.name].phase == StepPhase::Failed);
        // Skip what can no longer run, in dependency order (one pass in topological order).
        let (graph, _) = spec.graph();
        let order = petgraph::algo::toposort(&graph, None).map_err(|_| {
            Error::invalid("Workflow", "spec.steps", "dependency cycle (refused at admission; the spec changed since?)")
        })?;
        for n in &order {
            let s = &spec.steps[graph[*n]];
            if status.steps[&s.name].phase != StepPhase::Pending {
                continue;
            }
            let blocked = s.depends_on.iter().find(|d| {
                matches!(status.steps.get(d.as_str()).map(|x| x.phase), Some(StepPhase::Failed | StepPhase::Skipped))
            });
            let message = if let Some(d) = blocked {
                Some(format!("step {d} did not succeed"))
            } else if failed_any && spec.failure_policy == FailurePolicy::FailFast {
                Some("a step failed and the workflow fails fast".to_string())
            } else {
                None
            };
            if let Some(message) = message {
                let st = status.steps.get_mut(&s.name).expect("every step has a status");
                st.phase = StepPhase::Skipped;
                st.message = message;
            }
        }
        // Start what may start, in dependency order, within the parallelism.
        let running = status.steps.values().filter(|s| s.phase == StepPhase::Running).count() as u32;
        let mut room = spec.parallelism.map_or(u32::MAX, |p| p.saturating_sub(running));
        let mut starts = Vec::new();
        for n in &order {
            if room == 0 {
                break;
            }
            let s = &spec.steps[graph[*n]];
            let st = &status.steps[&s.name];
            if st.phase != StepPhase::Pending {
                continue;
            }
            let ready = s
                .depends_on
                .iter()
                .all(|d| status.steps.get(d.as_str()).is_some_and(|x| x.phase == StepPhase::Succeeded));
            if ready {
                starts.push((graph[*n], st.attempts + 1));
                room -= 1;
            }
        }
        let api = ctx.api::<Workload>(&wf.metadata.namespace);
        let creates = starts.iter().map(|(i, attempt)| {
            let s = &spec.steps[*i];
            let mut meta = ObjectMeta::namespaced(
                wf.metadata.namespace.clone(),
                step_workload_name(&wf.metadata.name, &s.name, *attempt),
            );
            meta.labels = s.template.metadata.labels.clone();
            meta.annotations = s.template.metadata.annotations.clone();
            meta.annotations.insert(STEP_ANNOTATION, s.name.clone());
            meta.owner_references = vec![wf.controller_ref()];
            let w = Object::new(meta, s.template.spec.clone());
            let api = api.clone();
            async move { api.create(&w).await }
        });
        for ((i, attempt), r) in starts.iter().zip(join_all(creates).await) {
            match r {
                Ok(w) => self.gate.wrote(&key, w.metadata.resource_version),
                // Made by an earlier reconcile whose write the cache has not shown yet.
                Err(Error::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
            let st = status.steps.get_mut(&spec.steps[*i].name).expect("every step has a status");
            st.phase = StepPhase::Running;
            st.attempts = *attempt;
        }
        if status.steps.values().all(|s| s.phase.is_final()) {
            let failed: Vec<&String> =
                status.steps.iter().filter(|(_, s)| s.phase == StepPhase::Failed).map(|(n, _)| n).collect();
            status.completion_time = Some(now);
            let me = ObjectReference::of(&*wf);
            if failed.is_empty() {
                status.phase = StepPhase::Succeeded;
                self.recorder.get(ctx).record(&me, EventType::Normal, "Succeeded", "every step succeeded");
            } else {
                status.phase = StepPhase::Failed;
                let names: Vec<&str> = failed.iter().map(|s| s.as_str()).collect();
                status.message = format!("steps failed: {}", names.join(", "));
                self.recorder.get(ctx).record(&me, EventType::Warning, "Failed", status.message.clone());
            }
        }
        if status != wf.status {
            match ctx.api::<Workflow>(&wf.metadata.namespace).write_status(&wf.metadata, &status).await {
                Ok(_) => {}
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Action::Done)
    }
}

/// A step's status, for tests and tools: its phase and tries.
pub fn step_status<'a>(wf: &'a Object<Workflow>, step: &str) -> Option<&'a StepStatus> {
    wf.status.steps.get(step)
}
