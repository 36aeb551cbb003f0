//! Bringing one workload's instances in line with its spec, in two steps (as kubelet's
//! `computePodActions` and `SyncPod`):
//!
//! - [`plan_container`] is pure: from a container's spec, the agent's record of its instance,
//!   the state the runtime reports and what its probes concluded, it computes the [`Step`]s to
//!   take and the status to report. Every rule of restart policies, crash-loop backoff,
//!   replacement of outdated instances and probe failures lives there, testable without a
//!   runtime or a clock.
//! - [`Agent::sync`] observes (reads each instance's state), plans, and applies the steps in
//!   order through the runtime, then writes the workload's status.

use std::sync::Arc;
use std::time::Duration;

use orch_core::backoff::Backoff;
use orch_core::controller::queue::WorkQueue;
use orch_core::kinds::{Condition, ConditionStatus, Container, PortStatus};
use orch_core::kinds::{
    ContainerState, ContainerStatus, PRE_STOP_FINALIZER, Phase, RestartPolicy, Workload, WorkloadStatus, set_condition,
};
use orch_core::runtime::{ExitStatus, Handle, HostVolume, InstanceSpec, InstanceState, RuntimeError};
use orch_core::{Api, Object, ObjectRef, Timestamp};
use tokio::time::Instant;

use super::ports;
use super::probes::Health;
use super::volumes;
use super::{Agent, AgentError, instance_id, uid_tag};

/// One container's instance as the agent tracks it.
#[derive(Debug, Clone)]
pub(super) struct Tracked {
    /// Shared, so the per-pass copy of the record is cheap.
    pub(super) handle: Arc<Handle>,
    pub(super) attempt: u32,
    pub(super) restarts: u32,
    pub(super) started: Instant,
    /// Consecutive crashes, for the backoff.
    pub(super) crashes: u32,
    /// Not before this may the next attempt start.
    pub(super) not_before: Option<Instant>,
    pub(super) last_exit: Option<ExitStatus>,
    /// The uid tag of the workload it was started for.
    pub(super) uid_tag: String,
    /// A hash of the container spec it was started from ([`spec_hash`], as kubelet keeps one):
    /// a copy per instance would cost more than the rest of the record. `None` when adopted
    /// (taken as current then).
    pub(super) spec: Option<u64>,
    /// Stopped by the agent for failing its liveness or startup probe: its exit is a failure,
    /// whatever its code.
    pub(super) unhealthy_kill: bool,
    /// The workload's generation `spec` was last found current at: while it is unchanged the
    /// spec needs no comparing.
    pub(super) generation: u64,
    /// The runtime's state of the instance when a sync last looked (the resync compares).
    pub(super) seen: Option<InstanceState>,
}

/// What a new instance starts with: its attempt number, the restart and crash counts to record,
/// and the workload's volumes on this node.
#[derive(Debug)]
struct NewInstance<'a> {
    attempt: u32,
    restarts: u32,
    crashes: u32,
    volumes: Vec<HostVolume>,
    /// The workload's host ports.
    ports: &'a [PortStatus],
}

/// The crash-loop settings a plan needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct CrashLoop {
    /// Delay before the next attempt by crashes in a row (exact, as kubelet's: users read it).
    pub(super) backoff: Backoff,
    /// A crash-free spell this long resets the count.
    pub(super) reset: Duration,
}

/// What a plan reads about one container.
#[derive(Debug)]
pub(super) struct Observed<'a> {
    /// The container as the workload specifies it now.
    pub(super) container: &'a Container,
    /// The workload's generation, uid tag and restart policy.
    pub(super) generation: u64,
    pub(super) uid_tag: &'a str,
    pub(super) restart_policy: RestartPolicy,
    /// The agent's record of the container's current instance, if it has one.
    pub(super) tracked: Option<Tracked>,
    /// The runtime's state of that instance (`Lost` when there is none).
    pub(super) state: InstanceState,
    /// What its probes concluded, if their loops run.
    pub(super) health: Option<Health>,
    /// Now, on the agent's timer clock and on its wall clock.
    pub(super) now: Instant,
    pub(super) wall_now: Timestamp,
    pub(super) crash_loop: CrashLoop,
}

/// One thing to do for a container, in order.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    /// Write this record for the container (the resync and the next sync read it).
    Record(Box<Tracked>),
    /// Stop the instance (polite, then kill after the grace period); with `remove`, also
    /// remove it and forget its probe results. A failed stop ends the sync with an error, so
    /// nothing after it runs: a second copy never starts beside one that may still run.
    Stop { handle: Arc<Handle>, why: &'static str, remove: bool },
    /// Forget the container's record (its instance was replaced).
    Forget,
    /// Start the probe loops of the (adopted) running instance.
    StartProbes { handle: Arc<Handle> },
    /// Start a new instance: attempt number, restart count and crash count to record.
    Start { attempt: u32, restarts: u32, crashes: u32 },
}

impl PartialEq for Tracked {
    fn eq(&self, other: &Self) -> bool {
        self.handle.id == other.handle.id
            && self.attempt == other.attempt
            && self.restarts == other.restarts
            && self.started == other.started
            && self.crashes == other.crashes
            && self.not_before == other.not_before
            && self.last_exit == other.last_exit
            && self.uid_tag == other.uid_tag
            && self.spec == other.spec
            && self.unhealthy_kill == other.unhealthy_kill
            && self.generation == other.generation
            && self.seen == other.seen
    }
}

/// What to do for one container, and what to report.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    /// In order.
    pub(super) steps: Vec<Step>,
    /// The container's status; `None` when a [`Step::Start`] decides it (running, or why the
    /// start failed).
    pub(super) status: Option<ContainerStatus>,
    /// Look again after this long, even without an event.
    pub(super) look_after: Option<Duration>,
}

/// A hash of a container spec (of its JSON form): equal specs hash alike; a changed one, but
/// for a 64-bit collision, does not.
pub(super) fn spec_hash(c: &Container) -> u64 {
    use std::hash::Hasher;
    struct HashWriter<'a>(&'a mut std::hash::DefaultHasher);
    impl std::io::Write for HashWriter<'_> {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.write(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hasher = std::hash::DefaultHasher::new();
    // A container always serializes.
    if serde_json::to_writer(HashWriter(&mut hasher), c).is_err() {
        return 0;
    }
    hasher.finish()
}

/// Decides what one container needs (pure: no runtime, no clock, no store).
pub(super) fn plan_container(o: Observed<'_>) -> Plan {
    let c = o.container;
    let mut steps = Vec::new();
    let mut record = o.tracked;
    let mut dirty = false;
    // An instance of another spec, or of an earlier workload with this name, is replaced (that
    // is an update, not a crash).
    let outdated = record.as_ref().is_some_and(|t| {
        t.uid_tag != o.uid_tag || (t.generation != o.generation && t.spec.is_some_and(|hash| hash != spec_hash(c)))
    });
    let mut replaced_attempt = None;
    if let Some(t) = record.as_ref().filter(|_| outdated) {
        steps.push(Step::Stop { handle: t.handle.clone(), why: "stopping an outdated instance", remove: true });
        steps.push(Step::Forget);
        // The replacement continues the attempt count, so its id is new.
        replaced_attempt = Some(t.attempt + 1);
        record = None;
    } else if let Some(t) = record.as_mut()
        && (t.generation != o.generation || t.seen != Some(o.state))
    {
        // Current at this generation; and what the resync compares against.
        t.generation = o.generation;
        t.seen = Some(o.state);
        dirty = true;
    }
    let flush = |steps: &mut Vec<Step>, record: &Option<Tracked>, dirty: &mut bool| {
        if std::mem::take(dirty)
            && let Some(t) = record
        {
            steps.push(Step::Record(Box::new(t.clone())));
        }
    };
    let exited = match (record.as_mut(), o.state) {
        (Some(t), InstanceState::Running { started_at }) => {
            if t.spec.is_none() {
                // Adopted: it runs the current spec from now on.
                t.spec = Some(spec_hash(c));
                dirty = true;
            }
            let probed = c.startup_probe.is_some() || c.readiness_probe.is_some() || c.liveness_probe.is_some();
            let mut health = o.health;
            if health.is_none() && probed {
                // Adopted after an agent restart: its probes start now.
                steps.push(Step::StartProbes { handle: t.handle.clone() });
                health = Some(Health::initial(c));
            }
            if health.is_some_and(|h| h.failed) {
                // Failed its liveness or startup probe: stop it; the next pass restarts it as a
                // failure.
                t.unhealthy_kill = true;
                let (handle, restarts) = (t.handle.clone(), t.restarts);
                dirty = true;
                flush(&mut steps, &record, &mut dirty);
                steps.push(Step::Stop { handle, why: "stopping an unhealthy instance", remove: false });
                let status = waiting(c, "Unhealthy", restarts);
                return Plan { steps, status: Some(status), look_after: Some(Duration::ZERO) };
            }
            let status = ContainerStatus {
                name: c.name.clone(),
                state: ContainerState::Running { started_at },
                ready: health.is_none_or(|h| h.ready && h.started),
                restart_count: t.restarts,
            };
            // A crash-free spell resets the backoff.
            if t.crashes > 0 && o.now.saturating_duration_since(t.started) >= o.crash_loop.reset {
                t.crashes = 0;
                dirty = true;
            }
            flush(&mut steps, &record, &mut dirty);
            return Plan { steps, status: Some(status), look_after: None };
        }
        (Some(_), InstanceState::Exited(e)) => Some(e),
        (Some(t), InstanceState::Lost) => {
            // Gone without a record: invent its exit once, so it stays the same exit on every
            // pass (and status does not churn).
            let e = t.last_exit.unwrap_or(ExitStatus {
                code: None,
                signal: None,
                oom_killed: false,
                finished_at: o.wall_now,
            });
            if t.last_exit.is_none() {
                t.last_exit = Some(e);
                dirty = true;
            }
            Some(e)
        }
        (None, _) => None,
    };
    let unhealthy = record.as_ref().is_some_and(|t| t.unhealthy_kill);
    let restart = match (exited, o.restart_policy) {
        (None, _) => true, // never started (or just replaced)
        (Some(_), RestartPolicy::Always) => true,
        (Some(e), RestartPolicy::OnFailure) => !e.success() || unhealthy,
        (Some(_), RestartPolicy::Never) => false,
    };
    let restarts = record.as_ref().map_or(0, |t| t.restarts);
    let exited_and_kept = match exited {
        Some(e) if !restart => Some(e),
        _ => None,
    };
    if let Some(e) = exited_and_kept {
        flush(&mut steps, &record, &mut dirty);
        return Plan { steps, status: Some(terminated(c.name.clone(), &e, restarts)), look_after: None };
    }
    // Crash-loop backoff before a restart.
    if let (Some(t), Some(e)) = (record.as_mut(), exited) {
        let crashes = if t.last_exit == Some(e) {
            t.crashes
        } else if o.now.saturating_duration_since(t.started) >= o.crash_loop.reset {
            // It ran a crash-free spell first: the count starts over.
            1
        } else {
            t.crashes + 1
        };
        let not_before = t
            .not_before
            .filter(|_| t.last_exit == Some(e))
            .unwrap_or_else(|| o.now + o.crash_loop.backoff.delay(crashes));
        t.crashes = crashes;
        t.not_before = Some(not_before);
        t.last_exit = Some(e);
        let handle = t.handle.clone();
        dirty = true;
        flush(&mut steps, &record, &mut dirty);
        if o.now < not_before {
            let status = waiting(c, "CrashLoopBackOff", restarts);
            return Plan { steps, status: Some(status), look_after: Some(not_before - o.now) };
        }
        // Never start the next attempt while the last one might still run.
        steps.push(Step::Stop { handle, why: "stopping an exited instance", remove: true });
    }
    flush(&mut steps, &record, &mut dirty);
    let (attempt, restarts, crashes) = match &record {
        Some(t) => (t.attempt + 1, restarts + 1, t.crashes),
        None => (replaced_attempt.unwrap_or(0), 0, 0),
    };
    steps.push(Step::Start { attempt, restarts, crashes });
    Plan { steps, status: None, look_after: None }
}

fn waiting(c: &Container, reason: &str, restarts: u32) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        state: ContainerState::Waiting { reason: reason.into() },
        ready: false,
        restart_count: restarts,
    }
}

/// Whether the agent evicted the workload, for using more than a size limit or for being bound
/// away from its volume's node (it never runs on its node again).
pub(super) fn is_evicted(status: &WorkloadStatus) -> bool {
    status.phase == Phase::Failed && [volumes::EVICTED, volumes::VOLUME_NODE_CONFLICT].contains(&status.reason.as_str())
}

/// The status of a container whose instance exited and stays so.
pub(super) fn terminated(name: String, e: &ExitStatus, restarts: u32) -> ContainerStatus {
    let code = e.code.unwrap_or_else(|| e.signal.map_or(-1, |s| 128 + s));
    ContainerStatus {
        name,
        state: ContainerState::Terminated {
            exit_code: code,
            reason: if e.oom_killed {
                "OOMKilled"
            } else if code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .into(),
            finished_at: e.finished_at,
        },
        ready: false,
        restart_count: restarts,
    }
}

impl Agent {
    /// Keeps the last lines of an instance about to be removed (an exited attempt, or one a
    /// changed spec replaces), for `orch logs --previous`.
    async fn keep_previous_logs(&self, key: &ObjectRef, container: &str, handle: &Handle) {
        use futures::StreamExt;
        let options = orch_core::runtime::LogOptions { tail: Some(super::PREVIOUS_LOG_LINES), follow: false };
        let Ok(stream) = self.runtime.logs(handle, options).await else { return };
        let text: String = stream.map(|l| format!("{}\n", l.line)).collect::<Vec<_>>().await.concat();
        let path = super::previous_logs_path(&self.config.data_root, &key.namespace, &key.name, container);
        if let Some(dir) = path.parent() {
            let _ = tokio::fs::create_dir_all(dir).await;
        }
        if let Err(e) = tokio::fs::write(&path, text).await {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the previous instance's logs");
        }
    }

    /// Removes the kept logs of a workload that is gone.
    fn forget_previous_logs(&self, key: &ObjectRef) {
        let dir = self.config.data_root.join("previous-logs").join(&key.namespace).join(&key.name);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn crash_loop(&self) -> CrashLoop {
        CrashLoop {
            backoff: Backoff::new(self.config.backoff_base, self.config.backoff_max),
            reset: self.config.backoff_reset,
        }
    }

    fn runtime_error(&self, what: String) -> impl FnOnce(RuntimeError) -> AgentError + '_ {
        move |source| AgentError::Runtime { runtime: self.runtime.name().to_string(), what, source }
    }

    /// Brings one workload's instances in line; returns when to look again, if on a timer.
    pub(super) async fn sync(
        self: &Arc<Self>,
        key: &ObjectRef,
        desired: Option<Arc<Object<Workload>>>,
        queue: &WorkQueue<ObjectRef>,
    ) -> Result<Option<Duration>, AgentError> {
        let mine = |w: &Object<Workload>| w.spec.node_name.as_deref() == Some(self.config.node_name.as_str());
        // Deleted while it holds this agent's pre-stop finalizer: it keeps running (terminating
        // in its endpoints) for the delay, then stops, then the finalizer goes.
        if let Some(w) = desired.as_ref().filter(|w| {
            w.metadata.is_being_deleted() && mine(w) && w.metadata.finalizers.iter().any(|f| f == PRE_STOP_FINALIZER)
        }) {
            let since = *self
                .terminating
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key.clone())
                .or_insert_with(Instant::now);
            // Nothing of it runs (it never started here): no one to wait for.
            let running = self.instances.lock().unwrap_or_else(|e| e.into_inner()).keys().any(|(r, _)| r == key);
            let delay = if running { self.pre_stop_delay(&w.spec) } else { Duration::ZERO };
            let left = delay.saturating_sub(since.elapsed());
            if !left.is_zero() {
                return Ok(Some(left));
            }
            let grace = w.spec.termination_grace_period_seconds.map_or(self.config.stop_grace, Duration::from_secs);
            self.tear_down(key, grace).await;
            let api: Api<Workload> = Api::namespaced(self.store.clone(), &key.namespace);
            let dropped = api
                .retry_on_conflict(&key.name, |o| {
                    o.metadata.finalizers.retain(|f| f != PRE_STOP_FINALIZER);
                    Ok(())
                })
                .await;
            match dropped {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            self.terminating.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
            return Ok(None);
        }
        let wanted = desired.filter(|w| !w.metadata.is_being_deleted() && mine(w));
        let Some(workload) = wanted else {
            // Not (or no longer) ours: stop and remove its instances.
            self.tear_down(key, self.config.stop_grace).await;
            self.terminating.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
            return Ok(None);
        };
        if !self.pre_stop_delay(&workload.spec).is_zero()
            && !workload.metadata.finalizers.iter().any(|f| f == PRE_STOP_FINALIZER)
        {
            // Before anything runs: a delete then waits for this agent to stop it.
            let api: Api<Workload> = Api::namespaced(self.store.clone(), &key.namespace);
            let added = api
                .retry_on_conflict(&key.name, |o| {
                    if !o.metadata.is_being_deleted() && !o.metadata.finalizers.iter().any(|f| f == PRE_STOP_FINALIZER)
                    {
                        o.metadata.finalizers.push(PRE_STOP_FINALIZER.to_string());
                    }
                    Ok(())
                })
                .await;
            match added {
                // Its event brings the workload back, with the finalizer.
                Ok(_) => return Ok(None),
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        let grace = workload.spec.termination_grace_period_seconds.map_or(self.config.stop_grace, Duration::from_secs);
        if is_evicted(&workload.status) {
            // Evicted: it never runs here again; what it held goes (once).
            let holds = self.instances.lock().unwrap_or_else(|e| e.into_inner()).keys().any(|(r, _)| r == key)
                || !self.publications.get(key).is_empty()
                || self.dirs.has(key);
            if holds {
                self.release(key, grace, false).await;
            }
            self.evictions.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
            return Ok(None);
        }
        let eviction = self
            .evictions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .filter(|e| e.uid == workload.metadata.uid)
            .cloned();
        if let Some(eviction) = eviction {
            return self.evict(key, &workload, eviction, grace).await;
        }
        let tag = uid_tag(&workload.metadata.uid);
        // Instances of containers no longer in the spec go.
        let dropped: Vec<Tracked> = {
            let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<_> = instances
                .keys()
                .filter(|(r, name)| r == key && !workload.spec.containers.iter().any(|c| &c.name == name))
                .cloned()
                .collect();
            gone.into_iter().filter_map(|k| instances.remove(&k)).collect()
        };
        for t in dropped {
            self.runtime
                .stop(&t.handle, grace)
                .await
                .map_err(self.runtime_error(format!("stopping a dropped container for {key}")))?;
            self.runtime.remove(&t.handle).await.ok();
        }
        let mut next_look: Option<Duration> = None;
        let mut statuses = Vec::new();
        // The workload's host ports (held from its first start until it is gone); a start needs
        // them, a running instance keeps what it has.
        let ports = self.ports.assign(key, &tag, &workload.spec);
        let held = match &ports {
            Ok(p) => p.clone(),
            Err(_) => self.ports.held(key),
        };
        // Resolved at the first start this pass needs.
        let mut host_volumes: Option<Result<Vec<HostVolume>, volumes::Unavailable>> = None;
        // Why the workload waits for its volumes, if it does.
        let mut note: Option<volumes::Unavailable> = None;
        // Its volume lives on another node: it can never run here.
        let mut conflict: Option<volumes::Unavailable> = None;
        for c in &workload.spec.containers {
            let slot = (key.clone(), c.name.clone());
            let tracked = self.instances.lock().unwrap_or_else(|e| e.into_inner()).get(&slot).cloned();
            let state = match &tracked {
                Some(t) => match self.runtime.status(&t.handle).await {
                    Ok(state) => state,
                    Err(RuntimeError::NotFound(_)) => InstanceState::Lost,
                    // Unknown is not gone: starting another copy now could run two.
                    Err(e) => return Err(self.runtime_error(format!("reading an instance's state for {key}"))(e)),
                },
                None => InstanceState::Lost,
            };
            let health = tracked
                .as_ref()
                .and_then(|t| self.health.lock().unwrap_or_else(|e| e.into_inner()).get(&t.handle.id).copied());
            let plan = plan_container(Observed {
                container: c,
                generation: workload.metadata.generation,
                uid_tag: &tag,
                restart_policy: workload.spec.restart_policy,
                tracked,
                state,
                health,
                now: Instant::now(),
                wall_now: self.clock.now(),
                crash_loop: self.crash_loop(),
            });
            if let Some(after) = plan.look_after {
                next_look = Some(next_look.map_or(after, |n| n.min(after)));
            }
            if let Some(status) = plan.status {
                statuses.push(status);
            }
            for step in plan.steps {
                match step {
                    Step::Record(t) => {
                        self.instances.lock().unwrap_or_else(|e| e.into_inner()).insert(slot.clone(), *t);
                    }
                    Step::Forget => {
                        self.instances.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
                    }
                    Step::Stop { handle, why, remove } => {
                        self.runtime
                            .stop(&handle, grace)
                            .await
                            .map_err(self.runtime_error(format!("{why} for {key}")))?;
                        if remove {
                            self.keep_previous_logs(key, &c.name, &handle).await;
                            self.runtime.remove(&handle).await.ok();
                            self.health.lock().unwrap_or_else(|e| e.into_inner()).remove(&handle.id);
                        }
                    }
                    Step::StartProbes { handle } => self.watch_health(key, c, &handle, queue),
                    Step::Start { attempt, restarts, crashes } => {
                        let resolved = match host_volumes.take() {
                            Some(resolved) => resolved,
                            None => self.resolve_volumes(key, &workload, &tag).await,
                        };
                        let volumes = resolved.clone();
                        host_volumes = Some(resolved);
                        let volumes = match volumes {
                            Ok(v) => v,
                            Err(why) if why.reason == volumes::VOLUME_NODE_CONFLICT => {
                                conflict = Some(why);
                                continue;
                            }
                            Err(why) => {
                                // Never run without its data: wait, saying why.
                                statuses.push(waiting(c, &format!("{}: {}", why.reason, why.message), restarts));
                                note = Some(why);
                                let after = self.config.backoff_base;
                                next_look = Some(next_look.map_or(after, |n| n.min(after)));
                                continue;
                            }
                        };
                        if let Err(reason) = &ports {
                            // Never start without the ports it is reached at: wait, saying why.
                            statuses.push(waiting(c, &format!("PortsUnavailable: {reason}"), restarts));
                            let after = self.config.backoff_base;
                            next_look = Some(next_look.map_or(after, |n| n.min(after)));
                            continue;
                        }
                        let new = NewInstance { attempt, restarts, crashes, volumes, ports: &held };
                        let (status, look) = self.start(key, c, &workload, &tag, new, queue).await;
                        statuses.push(status);
                        if let Some(after) = look {
                            next_look = Some(next_look.map_or(after, |n| n.min(after)));
                        }
                    }
                }
            }
        }
        if let Some(why) = conflict {
            // Bound by hand away from its volume: refused for good, as an eviction (a
            // controller's replacement is placed by the scheduler, on the volume's node).
            let eviction = super::Eviction {
                uid: workload.metadata.uid.clone(),
                reason: volumes::VOLUME_NODE_CONFLICT,
                message: why.message,
                statuses: None,
            };
            self.evictions.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), eviction.clone());
            return self.evict(key, &workload, eviction, grace).await;
        }
        if !self.report(&workload, statuses, held, note.as_ref()).await? {
            // The status write lost a race with a newer version (possibly the echo of this
            // agent's own last write, which is not synced): look again once the cache has it.
            let soon = Duration::from_millis(10);
            next_look = Some(next_look.map_or(soon, |n| n.min(soon)));
        }
        Ok(next_look)
    }

    /// How long a deleted `spec` runs on, terminating, before it is stopped.
    fn pre_stop_delay(&self, spec: &Workload) -> Duration {
        match spec.pre_stop_delay_seconds {
            Some(s) => Duration::from_secs(s),
            None if spec.containers.iter().any(|c| !c.ports.is_empty()) => self.config.pre_stop_delay,
            None => Duration::ZERO,
        }
    }

    /// Stops and removes every instance of `key`, and frees its volumes and ports (it is gone
    /// from this node).
    async fn tear_down(&self, key: &ObjectRef, grace: Duration) {
        self.written.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        self.evictions.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        self.release(key, grace, true).await;
    }

    /// Stops and removes every instance of `key` (keeping their last lines unless
    /// `forget_logs`), removes its `emptyDir`s, unpublishes its claim volumes and frees its
    /// ports; answers, by container, each stopped instance's record and (when its logs are kept,
    /// for an eviction) its last state.
    async fn release(
        &self,
        key: &ObjectRef,
        grace: Duration,
        forget_logs: bool,
    ) -> Vec<(String, Tracked, InstanceState)> {
        let gone: Vec<(String, Tracked)> = {
            let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<_> = instances.keys().filter(|(r, _)| r == key).cloned().collect();
            keys.into_iter().filter_map(|k| instances.remove(&k).map(|t| (k.1, t))).collect()
        };
        let mut last = Vec::with_capacity(gone.len());
        for (container, t) in gone {
            self.runtime.stop(&t.handle, grace).await.ok();
            // Only an eviction reports how its instances ended.
            let state = if forget_logs {
                InstanceState::Lost
            } else {
                self.keep_previous_logs(key, &container, &t.handle).await;
                self.runtime.status(&t.handle).await.unwrap_or(InstanceState::Lost)
            };
            self.runtime.remove(&t.handle).await.ok();
            self.health.lock().unwrap_or_else(|e| e.into_inner()).remove(&t.handle.id);
            last.push((container, t, state));
        }
        volumes::remove(&self.config.data_root, &self.dirs, key);
        self.unpublish_all(key).await;
        if forget_logs {
            self.forget_previous_logs(key);
        }
        self.ports.release(key);
        last
    }

    /// Evicts the workload `key` as kubelet does: its instances are stopped, what it held on the
    /// node goes, and its status turns `Failed` with the eviction's reason (`Evicted`, or
    /// `VolumeNodeConflict`) and message (and an event says so). It never runs here again.
    async fn evict(
        &self,
        key: &ObjectRef,
        workload: &Object<Workload>,
        mut eviction: super::Eviction,
        grace: Duration,
    ) -> Result<Option<Duration>, AgentError> {
        let statuses = match eviction.statuses.take() {
            Some(statuses) => statuses,
            None => {
                let last = self.release(key, grace, false).await;
                let now = self.clock.now();
                let statuses: Vec<ContainerStatus> = workload
                    .spec
                    .containers
                    .iter()
                    .map(|c| {
                        let stopped = last.iter().find(|(name, _, _)| *name == c.name);
                        let restarts = stopped.map_or(0, |(_, t, _)| t.restarts);
                        let exit = match stopped {
                            Some((_, _, InstanceState::Exited(e))) => *e,
                            Some((_, t, _)) => t.last_exit.unwrap_or(ExitStatus {
                                code: None,
                                signal: Some(9),
                                oom_killed: false,
                                finished_at: now,
                            }),
                            None => ExitStatus { code: None, signal: Some(9), oom_killed: false, finished_at: now },
                        };
                        terminated(c.name.clone(), &exit, restarts)
                    })
                    .collect();
                // Kept until the status is written (a lost race retries with them).
                self.evictions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key.clone(), super::Eviction { statuses: Some(statuses.clone()), ..eviction.clone() });
                self.recorder().record(
                    &orch_core::kinds::ObjectReference::of(workload),
                    orch_core::kinds::EventType::Warning,
                    eviction.reason,
                    eviction.message.clone(),
                );
                statuses
            }
        };
        let now = self.clock.now();
        let mut status = WorkloadStatus {
            phase: Phase::Failed,
            restart_count: statuses.iter().map(|s| s.restart_count).sum(),
            start_time: workload.status.start_time.or(Some(now)),
            conditions: workload.status.conditions.clone(),
            container_statuses: statuses,
            reason: eviction.reason.into(),
            message: eviction.message,
            address: self.config.address.to_string(),
            ..Default::default()
        };
        set_condition(&mut status.conditions, Condition::new("Ready", ConditionStatus::False, eviction.reason), now);
        if self.write_status(workload, &status).await? {
            self.evictions.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
            Ok(None)
        } else {
            Ok(Some(Duration::from_millis(10)))
        }
    }

    /// Starts a new instance of `c`; returns its status, and when to look again if it failed.
    async fn start(
        self: &Arc<Self>,
        key: &ObjectRef,
        c: &Container,
        workload: &Object<Workload>,
        tag: &str,
        new: NewInstance<'_>,
        queue: &WorkQueue<ObjectRef>,
    ) -> (ContainerStatus, Option<Duration>) {
        let NewInstance { attempt, restarts, crashes, volumes, ports } = new;
        // The runtime sees each port's host port (a publishing runtime maps it) and the program
        // learns its ports from its environment; its own settings come last and win.
        let mut container = c.clone();
        for p in &mut container.ports {
            if let Some(held) = ports
                .iter()
                .find(|h| h.container == c.name && h.container_port == p.container_port && h.protocol == p.protocol)
            {
                p.host_port = Some(held.host_port);
            }
        }
        let published = self.runtime.capabilities().published_ports;
        let mut env = ports::env(&c.name, ports, self.config.address, published);
        env.append(&mut container.env);
        container.env = env;
        let spec = InstanceSpec {
            id: instance_id(key, &c.name, &workload.metadata.uid, attempt),
            container,
            volumes,
            labels: [
                ("orch.dev/node", self.config.node_name.as_str()),
                ("orch.dev/namespace", key.namespace.as_str()),
                ("orch.dev/workload", key.name.as_str()),
            ]
            .into(),
        };
        match self.runtime.start(&spec).await {
            Ok(handle) => {
                let handle = Arc::new(handle);
                let started_at = self.clock.now();
                // What the next resync compares against (without it, every new instance would
                // look changed to it once).
                let seen = self.runtime.status(&handle).await.ok();
                let t = Tracked {
                    handle: handle.clone(),
                    attempt,
                    restarts,
                    started: Instant::now(),
                    crashes,
                    not_before: None,
                    last_exit: None,
                    uid_tag: tag.to_string(),
                    spec: Some(spec_hash(c)),
                    unhealthy_kill: false,
                    generation: workload.metadata.generation,
                    seen,
                };
                self.instances.lock().unwrap_or_else(|e| e.into_inner()).insert((key.clone(), c.name.clone()), t);
                self.watch_health(key, c, &handle, queue);
                // Wake this workload when the instance exits.
                let (runtime, queue, key) = (self.runtime.clone(), queue.clone(), key.clone());
                self.spawn(async move {
                    let _ = runtime.wait(&handle).await;
                    queue.add(key);
                });
                let status = ContainerStatus {
                    name: c.name.clone(),
                    state: ContainerState::Running { started_at },
                    // Not ready until its probes say so.
                    ready: c.readiness_probe.is_none() && c.startup_probe.is_none(),
                    restart_count: restarts,
                };
                (status, None)
            }
            Err(e) => (waiting(c, &format!("StartFailed: {e}"), restarts), Some(self.config.backoff_base)),
        }
    }

    /// Writes the status if it changed; false when the write lost a race with a newer version.
    async fn report(
        &self,
        workload: &Object<Workload>,
        statuses: Vec<ContainerStatus>,
        ports: Vec<PortStatus>,
        note: Option<&volumes::Unavailable>,
    ) -> Result<bool, AgentError> {
        let now = self.clock.now();
        let running = statuses.iter().any(|s| matches!(s.state, ContainerState::Running { .. }));
        let all_done = statuses.iter().all(|s| matches!(s.state, ContainerState::Terminated { .. }));
        let all_ok = statuses.iter().all(|s| matches!(s.state, ContainerState::Terminated { exit_code: 0, .. }));
        let phase = if running {
            Phase::Running
        } else if all_done && all_ok {
            Phase::Succeeded
        } else if all_done {
            Phase::Failed
        } else {
            Phase::Pending
        };
        let ready = statuses.iter().all(|s| s.ready);
        let mut status = WorkloadStatus {
            phase,
            restart_count: statuses.iter().map(|s| s.restart_count).sum(),
            start_time: workload.status.start_time.or(Some(now)),
            conditions: workload.status.conditions.clone(),
            container_statuses: statuses,
            address: self.config.address.to_string(),
            ports,
            reason: note.map(|n| n.reason.to_string()).unwrap_or_default(),
            message: note.map(|n| n.message.clone()).unwrap_or_default(),
        };
        let cond = if ready { ConditionStatus::True } else { ConditionStatus::False };
        set_condition(
            &mut status.conditions,
            Condition::new("Ready", cond, if ready { "Running" } else { "NotReady" }),
            now,
        );
        if status == workload.status {
            return Ok(true);
        }
        // A container newly waiting out a crash-loop backoff, or stopped for failing its
        // liveness or startup probe: say so once per restart.
        for c in &status.container_statuses {
            let ContainerState::Waiting { reason } = &c.state else { continue };
            let (event, message) = match reason.as_str() {
                "CrashLoopBackOff" => (
                    "BackOff",
                    format!(
                        "container {} exited; restarting it after a backoff ({} restarts)",
                        c.name, c.restart_count
                    ),
                ),
                "Unhealthy" => (
                    "Unhealthy",
                    format!(
                        "container {} failed its liveness or startup probe; stopping it to restart it ({} restarts)",
                        c.name, c.restart_count
                    ),
                ),
                _ => continue,
            };
            let before = workload.status.container_statuses.iter().find(|p| p.name == c.name);
            let was = before.is_some_and(|p| {
                matches!(&p.state, ContainerState::Waiting { reason: r } if r == reason)
                    && p.restart_count == c.restart_count
            });
            if !was {
                self.recorder().record(
                    &orch_core::kinds::ObjectReference::of(workload),
                    orch_core::kinds::EventType::Warning,
                    event,
                    message,
                );
            }
        }
        // A workload newly waiting for its volumes, or for another reason: say so once.
        if let Some(n) = note
            && (workload.status.reason != n.reason || workload.status.message != n.message)
        {
            self.recorder().record(
                &orch_core::kinds::ObjectReference::of(workload),
                orch_core::kinds::EventType::Warning,
                n.reason,
                n.message.clone(),
            );
        }
        self.write_status(workload, &status).await
    }

    /// Writes `status` (only the status goes out, and only the new resource version comes back);
    /// false when the write lost a race with a newer version.
    async fn write_status(&self, workload: &Object<Workload>, status: &WorkloadStatus) -> Result<bool, AgentError> {
        let api: Api<Workload> = Api::namespaced(self.store.clone(), &workload.metadata.namespace);
        match api.write_status(&workload.metadata, status).await {
            Ok(written) => {
                self.written
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(ObjectRef::of(workload), written.resource_version);
                Ok(true)
            }
            Err(e) if e.is_conflict() => {
                self.written.lock().unwrap_or_else(|e| e.into_inner()).remove(&ObjectRef::of(workload));
                Ok(false)
            }
            // Deleted meanwhile: its deletion event syncs it.
            Err(e) if e.is_not_found() => Ok(true),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::kinds::Probe;

    const CRASH_LOOP: CrashLoop = CrashLoop {
        backoff: Backoff::new(Duration::from_secs(10), Duration::from_secs(300)),
        reset: Duration::from_secs(600),
    };

    fn container(args: &[&str]) -> Container {
        Container { name: "main".into(), command: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn a_spec_hash_is_the_same_for_equal_specs_and_another_for_any_change() {
        let c = container(&["serve", "--port", "80"]);
        assert_eq!(spec_hash(&c), spec_hash(&c.clone()));
        let mut changes = vec![container(&["serve", "--port", "81"]), container(&["serve", "--port"])];
        let mut env = c.clone();
        env.env.push(orch_core::kinds::EnvVar { name: "MODE".into(), value: "fast".into() });
        changes.push(env);
        let mut cpu = c.clone();
        cpu.resources.requests.insert("cpu".into(), "100m".parse().unwrap());
        changes.push(cpu);
        for changed in &changes {
            assert_ne!(spec_hash(changed), spec_hash(&c), "{changed:?}");
        }
    }

    fn record(c: &Container, attempt: u32, started: Instant) -> Tracked {
        Tracked {
            handle: Arc::new(Handle {
                runtime: "test".into(),
                version: 1,
                id: format!("default.web.main.tag-{attempt}"),
                data: serde_json::Value::Null,
            }),
            attempt,
            restarts: attempt,
            started,
            crashes: 0,
            not_before: None,
            last_exit: None,
            uid_tag: "tag".into(),
            spec: Some(spec_hash(c)),
            unhealthy_kill: false,
            generation: 1,
            seen: None,
        }
    }

    fn tcp_probe() -> Probe {
        serde_json::from_value(serde_json::json!({"action": {"tcp": {"port": 80}}})).unwrap()
    }

    fn exit(code: i32) -> ExitStatus {
        ExitStatus { code: Some(code), signal: None, oom_killed: false, finished_at: Timestamp(5) }
    }

    fn observe(c: &Container, tracked: Option<Tracked>, state: InstanceState, now: Instant) -> Observed<'_> {
        Observed {
            container: c,
            generation: 1,
            uid_tag: "tag",
            restart_policy: RestartPolicy::Always,
            tracked,
            state,
            health: None,
            now,
            wall_now: Timestamp(9),
            crash_loop: CRASH_LOOP,
        }
    }

    #[test]
    fn a_container_with_no_instance_is_started_as_attempt_zero() {
        let c = container(&["sleep", "60"]);
        let plan = plan_container(observe(&c, None, InstanceState::Lost, Instant::now()));
        assert_eq!(plan.steps, vec![Step::Start { attempt: 0, restarts: 0, crashes: 0 }]);
        assert_eq!(plan.status, None, "the start decides the status");
    }

    #[test]
    fn a_running_instance_is_kept_and_reported_ready_and_seen() {
        let (c, now) = (container(&["sleep", "60"]), Instant::now());
        let running = InstanceState::Running { started_at: Timestamp(1) };
        let plan = plan_container(observe(&c, Some(record(&c, 0, now)), running, now));
        let Some(Step::Record(t)) = plan.steps.first() else { panic!("expected a record update: {:?}", plan.steps) };
        assert_eq!(t.seen, Some(running), "the resync compares against what this sync saw");
        assert_eq!(plan.steps.len(), 1);
        let status = plan.status.unwrap();
        assert!(status.ready);
        assert_eq!(status.state, ContainerState::Running { started_at: Timestamp(1) });
    }

    #[test]
    fn a_crash_waits_out_the_backoff_then_stops_the_old_attempt_before_starting_the_next() {
        let (c, now) = (container(&["false"]), Instant::now());
        let first = plan_container(observe(&c, Some(record(&c, 0, now)), InstanceState::Exited(exit(1)), now));
        let Some(Step::Record(after)) = first.steps.last() else { panic!("{:?}", first.steps) };
        assert_eq!((after.crashes, after.not_before), (1, Some(now + Duration::from_secs(10))));
        assert_eq!(first.look_after, Some(Duration::from_secs(10)));
        assert!(
            matches!(first.status.unwrap().state, ContainerState::Waiting { ref reason } if reason == "CrashLoopBackOff")
        );
        assert!(!first.steps.iter().any(|s| matches!(s, Step::Start { .. } | Step::Stop { .. })));

        let later = now + Duration::from_secs(10);
        let second = plan_container(observe(&c, Some((**after).clone()), InstanceState::Exited(exit(1)), later));
        let kinds: Vec<_> = second.steps.iter().filter(|s| !matches!(s, Step::Record(_))).collect();
        assert!(matches!(kinds[0], Step::Stop { why: "stopping an exited instance", remove: true, .. }), "{kinds:?}");
        assert_eq!(kinds[1], &Step::Start { attempt: 1, restarts: 1, crashes: 1 });
    }

    #[test]
    fn the_backoff_doubles_per_crash_up_to_its_cap() {
        assert_eq!(CRASH_LOOP.backoff.delay(1), Duration::from_secs(10));
        assert_eq!(CRASH_LOOP.backoff.delay(2), Duration::from_secs(20));
        assert_eq!(CRASH_LOOP.backoff.delay(5), Duration::from_secs(160));
        assert_eq!(CRASH_LOOP.backoff.delay(6), Duration::from_secs(300));
        assert_eq!(CRASH_LOOP.backoff.delay(60), Duration::from_secs(300));
    }

    #[test]
    fn an_exit_under_restart_policy_never_stays_terminated_and_starts_nothing() {
        let (c, now) = (container(&["true"]), Instant::now());
        let mut o = observe(&c, Some(record(&c, 0, now)), InstanceState::Exited(exit(0)), now);
        o.restart_policy = RestartPolicy::Never;
        let plan = plan_container(o);
        assert!(!plan.steps.iter().any(|s| matches!(s, Step::Start { .. } | Step::Stop { .. })));
        assert!(
            matches!(plan.status.unwrap().state, ContainerState::Terminated { exit_code: 0, ref reason, .. } if reason == "Completed")
        );
    }

    #[test]
    fn a_changed_spec_replaces_the_instance_continuing_the_attempt_count() {
        let (old, now) = (container(&["sleep", "60"]), Instant::now());
        let new = container(&["sleep", "61"]);
        let running = InstanceState::Running { started_at: Timestamp(1) };
        let mut o = observe(&new, Some(record(&old, 3, now)), running, now);
        o.generation = 2;
        let plan = plan_container(o);
        assert!(matches!(plan.steps[0], Step::Stop { why: "stopping an outdated instance", remove: true, .. }));
        assert_eq!(plan.steps[1], Step::Forget);
        assert_eq!(plan.steps[2], Step::Start { attempt: 4, restarts: 0, crashes: 0 }, "an update is not a crash");
    }

    #[test]
    fn a_failed_liveness_probe_stops_the_instance_and_looks_again_at_once() {
        let now = Instant::now();
        let mut c = container(&["sleep", "60"]);
        c.liveness_probe = Some(tcp_probe());
        let running = InstanceState::Running { started_at: Timestamp(1) };
        let mut o = observe(&c, Some(record(&c, 0, now)), running, now);
        o.health = Some(Health { started: true, ready: true, failed: true });
        let plan = plan_container(o);
        let Some(Step::Record(t)) = plan.steps.first() else { panic!("{:?}", plan.steps) };
        assert!(t.unhealthy_kill, "its exit counts as a failure");
        assert!(matches!(plan.steps[1], Step::Stop { why: "stopping an unhealthy instance", remove: false, .. }));
        assert_eq!(plan.look_after, Some(Duration::ZERO));
        assert!(matches!(plan.status.unwrap().state, ContainerState::Waiting { ref reason } if reason == "Unhealthy"));
    }

    #[test]
    fn an_adopted_instance_with_probes_starts_them_and_is_not_ready_until_they_pass() {
        let now = Instant::now();
        let mut c = container(&["sleep", "60"]);
        c.readiness_probe = Some(tcp_probe());
        let mut adopted = record(&c, 2, now);
        adopted.spec = None;
        let running = InstanceState::Running { started_at: Timestamp(1) };
        let plan = plan_container(observe(&c, Some(adopted), running, now));
        assert!(plan.steps.iter().any(|s| matches!(s, Step::StartProbes { .. })));
        let Some(Step::Record(t)) = plan.steps.iter().find(|s| matches!(s, Step::Record(_))) else { panic!() };
        assert!(t.spec.is_some(), "adopted: it runs the current spec from now on");
        assert!(!plan.status.unwrap().ready);
    }

    #[test]
    fn a_lost_instance_gets_one_invented_exit() {
        let (c, now) = (container(&["sleep", "60"]), Instant::now());
        let mut o = observe(&c, Some(record(&c, 0, now)), InstanceState::Lost, now);
        o.restart_policy = RestartPolicy::Never;
        let plan = plan_container(o);
        let Some(Step::Record(t)) = plan.steps.iter().find(|s| matches!(s, Step::Record(_))) else { panic!() };
        assert_eq!(t.last_exit.map(|e| e.finished_at), Some(Timestamp(9)), "invented once, at the wall clock");
        assert!(matches!(plan.status.unwrap().state, ContainerState::Terminated { exit_code: -1, .. }));
    }
}
