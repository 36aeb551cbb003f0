//! [`SchedulingCore`]: the queue, the snapshot and a [`Scheduler`], wired together without any
//! I/O. The [`SchedulerService`](crate::SchedulerService) feeds it store events and binds what
//! it decides; benchmarks, property tests and trace replays drive it directly.

use std::collections::HashMap;
use std::sync::Arc;

use crate::framework::{Diagnosis, Framework};
use crate::queue::{Events, SchedulingQueue};
use crate::snapshot::{Placed, Placement, Snapshot, WorkloadInfo};
use crate::{Decision, Scheduler};
use orch_core::cache::ObjectRef;
use orch_core::kinds::{Node, Phase, Workload};
use orch_core::object::Object;

/// What happened to one workload in a scheduling step.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The workload.
    pub workload: Arc<WorkloadInfo>,
    /// What happened.
    pub kind: OutcomeKind,
}

/// The kinds of [`Outcome`].
#[derive(Debug, Clone)]
pub enum OutcomeKind {
    /// Placed (assumed in the snapshot): bind it.
    Bound(Placement),
    /// Placed after evicting `victims` (already out of the snapshot): delete them, then bind.
    Preempted {
        /// The placement.
        placement: Placement,
        /// The evicted workloads.
        victims: Vec<Placed>,
    },
    /// Held for its gang (resources reserved); nothing to write yet.
    Waiting(Placement),
    /// Fits nowhere; parked until an event may help.
    Unschedulable(Diagnosis),
    /// The scheduler's decision broke an invariant (overcommit, bad victim) and was refused;
    /// the workload retries after a backoff.
    Refused(String),
    /// A held gang member was let go (gang timed out or a member fit nowhere) and requeued.
    Released,
}

struct Held {
    info: Arc<WorkloadInfo>,
    placement: Placement,
    deadline_ms: u64,
}

/// The scheduling queue, the cluster snapshot and a scheduler, with the rules that apply
/// decisions: every placement is checked against the snapshot before it counts; gangs are held
/// until complete and rolled back together; preemption victims leave the snapshot before the
/// preemptor is placed.
///
/// A placement counts at once as *assumed*; call [`bound`](Self::bound) when its write lands
/// (the [`SchedulerService`](crate::SchedulerService) does). Only bound workloads are
/// preemption victims, so a driver that never confirms gets no preemption.
pub struct SchedulingCore<S: Scheduler = Framework> {
    scheduler: S,
    snapshot: Snapshot,
    queue: SchedulingQueue,
    held: HashMap<String, Vec<Held>>,
    /// Bound workloads whose node the snapshot does not know yet, by node name.
    orphans: HashMap<String, Vec<Arc<Object<Workload>>>>,
    /// Failed binds in a row, per workload, so their backoff grows.
    bind_failures: HashMap<ObjectRef, u32>,
    seq: u64,
    now_ms: u64,
    batch: usize,
}

impl<S: Scheduler> std::fmt::Debug for SchedulingCore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulingCore")
            .field("scheduler", &self.scheduler.name())
            .field("nodes", &self.snapshot.node_count())
            .field("placed", &self.snapshot.placed_count())
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl<S: Scheduler> SchedulingCore<S> {
    /// A core around `scheduler` with an empty cluster.
    pub fn new(scheduler: S) -> Self {
        SchedulingCore {
            scheduler,
            snapshot: Snapshot::new(),
            queue: SchedulingQueue::new(),
            held: HashMap::new(),
            orphans: HashMap::new(),
            bind_failures: HashMap::new(),
            seq: 0,
            now_ms: 0,
            batch: 1,
        }
    }

    /// Uses `queue` (for its timing settings).
    pub fn with_queue(mut self, queue: SchedulingQueue) -> Self {
        self.queue = queue;
        self
    }

    /// Offers up to `n` workloads at a time to [`Scheduler::schedule_batch`].
    pub fn with_batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// The cluster as scheduled so far.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The queue.
    pub fn queue(&self) -> &SchedulingQueue {
        &self.queue
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &S {
        &self.scheduler
    }

    /// The scheduler, to change its settings.
    pub fn scheduler_mut(&mut self) -> &mut S {
        &mut self.scheduler
    }

    /// Current time, milliseconds on the driver's clock.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Moves the clock (backoffs, gang timeouts). Returns what timed out.
    pub fn set_time(&mut self, now_ms: u64) -> Vec<Outcome> {
        self.now_ms = self.now_ms.max(now_ms);
        self.expire_gangs()
    }

    /// Held gang members (resources reserved, not bound).
    pub fn held(&self) -> usize {
        self.held.values().map(Vec::len).sum()
    }

    /// Adds or updates a node.
    pub fn upsert_node(&mut self, node: &Object<Node>) {
        let known = self.snapshot.node_id(&node.metadata.name).is_some();
        self.snapshot.upsert_node(node);
        for w in self.orphans.remove(&node.metadata.name).unwrap_or_default() {
            self.upsert_workload(w);
        }
        let ev = if known { Events::NODE_UPDATED } else { Events::NODE_ADDED };
        self.queue.on_event(ev, self.now_ms);
    }

    /// Tells the queue that something outside nodes and workloads changed (volume claims, for
    /// instance): workloads waiting for one of `events` are retried.
    pub fn on_event(&mut self, events: Events) {
        self.queue.on_event(events, self.now_ms);
    }

    /// Removes a node; returns the workloads that were placed on it (now out of the snapshot).
    pub fn remove_node(&mut self, name: &str) -> Vec<Placed> {
        let gone = self.snapshot.remove_node(name);
        for p in &gone {
            if self.drop_held(&p.info.key) {
                // Held for its gang: it goes back to waiting, as if never placed.
                self.requeue(p.info.clone());
            } else if !p.assumed {
                // Bound there: it counts again if the node comes back.
                self.orphans.entry(name.to_string()).or_default().push(p.info.object.clone());
            }
        }
        if !gone.is_empty() {
            self.queue.on_event(Events::WORKLOAD_DELETED, self.now_ms);
        }
        gone
    }

    /// Takes in a workload as the store has it: unbound ones are queued (or their queue entry
    /// updated), bound ones count on their node, finished ones free their node.
    pub fn upsert_workload(&mut self, object: Arc<Object<Workload>>) {
        let key = ObjectRef::of(&object);
        let finished = matches!(object.status.phase, Phase::Succeeded | Phase::Failed);
        if object.metadata.deletion_timestamp.is_some() && object.spec.node_name.is_none() {
            self.delete_workload(&key);
            return;
        }
        match &object.spec.node_name {
            Some(node) => {
                if let Some(info) = self.queue.remove(&key) {
                    self.snapshot.note_pending(&info, -1);
                }
                // Bound (by us or by another scheduler): no longer held for a gang.
                self.drop_held(&key);
                self.bind_failures.remove(&key);
                if finished {
                    if self.snapshot.forget(&key).is_some() {
                        self.queue.on_event(Events::WORKLOAD_DELETED, self.now_ms);
                    }
                    return;
                }
                match self.snapshot.placed(&key) {
                    Some(p) if &*p.placement.node_name == node.as_str() => {
                        if p.info.object.metadata.resource_version == object.metadata.resource_version {
                            self.snapshot.confirm(&key);
                        } else {
                            // A newer version (the bound one, or new labels): refresh what the
                            // snapshot knows, keeping the placement and its devices.
                            match p.info.refreshed(object.clone()) {
                                Some(info) => self.snapshot.refresh(Arc::new(info)),
                                None => {
                                    let placement = p.placement.clone();
                                    let info = Arc::new(WorkloadInfo::new(object.clone(), p.info.seq));
                                    self.snapshot.place(info, placement, false);
                                }
                            }
                        }
                    }
                    _ => {
                        let Some(id) = self.snapshot.node_id(node) else {
                            // Its node is not known yet: count it when the node arrives.
                            let parked = self.orphans.entry(node.clone()).or_default();
                            parked.retain(|o| ObjectRef::of(o) != key);
                            parked.push(object);
                            return;
                        };
                        self.seq += 1;
                        let info = Arc::new(WorkloadInfo::new(object.clone(), self.seq));
                        // Bound by someone else (or by us before a restart): it counts as it
                        // is, on the devices its annotation names (or re-picked when absent).
                        let devices = self
                            .snapshot
                            .node(id)
                            .and_then(|n| {
                                crate::parse_devices(n, &object, info.request(crate::snapshot::GPU))
                                    .or_else(|| n.pick_devices(info.request(crate::snapshot::GPU)))
                            })
                            .unwrap_or_default();
                        let placement = Placement { node: id, node_name: Arc::from(node.as_str()), devices };
                        self.snapshot.place(info, placement, false);
                        self.queue.on_event(Events::WORKLOAD_ADDED, self.now_ms);
                    }
                }
            }
            None => {
                for parked in self.orphans.values_mut() {
                    parked.retain(|o| ObjectRef::of(o) != key);
                }
                if self.snapshot.placed(&key).is_some() {
                    // Assumed by us; the bind is in flight.
                    return;
                }
                if self.held.values().any(|h| h.iter().any(|x| x.info.key == key)) {
                    return;
                }
                if let Some(queued) = self.queue.get(&key) {
                    let info = Arc::new(WorkloadInfo::new(object, queued.seq));
                    if info.class == queued.class {
                        // Nothing that placement reads changed (a status write, say): keep its
                        // place, its backoff and what it waits for.
                        self.queue.refresh(info);
                        return;
                    }
                    let order = self.scheduler.sort_key(&info);
                    self.queue.add(info, order);
                    return;
                }
                self.seq += 1;
                let info = Arc::new(WorkloadInfo::new(object, self.seq));
                self.snapshot.note_pending(&info, 1);
                let order = self.scheduler.sort_key(&info);
                self.queue.add(info, order);
                self.queue.on_event(Events::WORKLOAD_PENDING, self.now_ms);
            }
        }
    }

    /// A workload is gone from the store.
    pub fn delete_workload(&mut self, key: &ObjectRef) {
        if let Some(info) = self.queue.remove(key) {
            self.snapshot.note_pending(&info, -1);
        }
        for parked in self.orphans.values_mut() {
            parked.retain(|o| &ObjectRef::of(o) != key);
        }
        self.orphans.retain(|_, p| !p.is_empty());
        self.bind_failures.remove(key);
        self.drop_held(key);
        if self.snapshot.forget(key).is_some() {
            self.queue.on_event(Events::WORKLOAD_DELETED, self.now_ms);
        }
    }

    /// Stops holding a gang member; true when it was held.
    fn drop_held(&mut self, key: &ObjectRef) -> bool {
        let mut found = false;
        for h in self.held.values_mut() {
            let before = h.len();
            h.retain(|x| &x.info.key != key);
            found |= h.len() != before;
        }
        self.held.retain(|_, h| !h.is_empty());
        found
    }

    /// Puts a workload whose placement was rolled back in line again, after a backoff.
    fn requeue(&mut self, info: Arc<WorkloadInfo>) {
        self.snapshot.note_pending(&info, 1);
        let order = self.scheduler.sort_key(&info);
        let key = info.key.clone();
        self.queue.add(info, order);
        self.queue.backoff(&key, self.now_ms);
    }

    /// The store accepted the binding.
    pub fn bound(&mut self, key: &ObjectRef) {
        self.bind_failures.remove(key);
        self.snapshot.confirm(key);
    }

    /// The binding failed (conflict, or the workload changed): roll the assumption back and
    /// retry after a backoff, with `latest` when the caller has a newer version.
    pub fn bind_failed(&mut self, key: &ObjectRef, latest: Option<Arc<Object<Workload>>>) {
        let Some(p) = self.snapshot.forget(key) else { return };
        self.scheduler.unreserve(&p.info, &p.placement);
        self.queue.on_event(Events::WORKLOAD_DELETED, self.now_ms);
        let info = match latest {
            Some(obj) if obj.spec.node_name.is_some() => {
                self.upsert_workload(obj);
                return;
            }
            Some(obj) => {
                self.seq += 1;
                Arc::new(WorkloadInfo::new(obj, self.seq))
            }
            None => p.info,
        };
        let failures = self.bind_failures.entry(key.clone()).or_default();
        *failures += 1;
        let failures = *failures;
        self.snapshot.note_pending(&info, 1);
        let order = self.scheduler.sort_key(&info);
        self.queue.add(info, order);
        // The backoff grows with the failures in a row.
        self.queue.set_attempts(key, failures - 1);
        self.queue.backoff(key, self.now_ms);
    }

    /// Schedules the next workload (or batch). `None` when nothing is ready.
    pub fn schedule_next(&mut self) -> Option<Vec<Outcome>> {
        let mut out = self.expire_gangs();
        if self.batch > 1 {
            let mut batch = Vec::new();
            while batch.len() < self.batch {
                match self.queue.pop(self.now_ms) {
                    Some(w) => batch.push(w),
                    None => break,
                }
            }
            if batch.is_empty() {
                return if out.is_empty() { None } else { Some(out) };
            }
            match self.scheduler.schedule_batch(&self.snapshot, &batch) {
                Some(decisions) if decisions.len() == batch.len() => {
                    for (w, d) in batch.into_iter().zip(decisions) {
                        self.apply(w, d, &mut out);
                    }
                }
                _ => {
                    for w in batch {
                        let d = self.scheduler.schedule(&self.snapshot, &w);
                        self.apply(w, d, &mut out);
                    }
                }
            }
            return Some(out);
        }
        let Some(w) = self.queue.pop(self.now_ms) else {
            return if out.is_empty() { None } else { Some(out) };
        };
        let d = self.scheduler.schedule(&self.snapshot, &w);
        self.apply(w, d, &mut out);
        Some(out)
    }

    /// Schedules until no workload is ready; returns every outcome.
    pub fn run_until_idle(&mut self) -> Vec<Outcome> {
        let mut all = Vec::new();
        while let Some(out) = self.schedule_next() {
            all.extend(out);
        }
        all
    }

    fn refuse(&mut self, w: Arc<WorkloadInfo>, why: String, out: &mut Vec<Outcome>) {
        self.queue.backoff(&w.key, self.now_ms);
        out.push(Outcome { workload: w, kind: OutcomeKind::Refused(why) });
    }

    fn checked(&self, w: &WorkloadInfo, placement: &Placement) -> Result<Placement, String> {
        let shares = self.snapshot.check_fit(w, placement.node)?;
        let node = self.snapshot.node(placement.node).ok_or("node removed")?;
        let devices = if placement.devices.is_empty() {
            shares
        } else {
            // Devices the scheduler chose itself must exist and have room.
            let mut free: Vec<i64> = node.devices.iter().map(|d| d.free).collect();
            let mut total = 0;
            for s in &placement.devices {
                let f = free.get_mut(s.device as usize).ok_or("device index out of range")?;
                if s.milli <= 0 || *f < s.milli {
                    return Err(format!("device {} on node {} has no room", s.device, node.name));
                }
                *f -= s.milli;
                total += s.milli;
            }
            if total != w.request(crate::snapshot::GPU) {
                return Err("device shares do not add up to the gpu request".into());
            }
            placement.devices.clone()
        };
        Ok(Placement { node: placement.node, node_name: node.name.clone(), devices })
    }

    fn apply(&mut self, w: Arc<WorkloadInfo>, decision: Decision, out: &mut Vec<Outcome>) {
        match decision {
            Decision::Place(pl) => {
                let pl = match self.checked(&w, &pl) {
                    Ok(pl) => pl,
                    Err(why) => return self.refuse(w, why, out),
                };
                self.commit(&w, pl.clone());
                let group = w.group_key();
                out.push(Outcome { workload: w, kind: OutcomeKind::Bound(pl) });
                if let Some(g) = group {
                    for h in self.held.remove(&g).unwrap_or_default() {
                        out.push(Outcome { workload: h.info, kind: OutcomeKind::Bound(h.placement) });
                    }
                }
            }
            Decision::Wait { placement, group, timeout } => {
                let pl = match self.checked(&w, &placement) {
                    Ok(pl) => pl,
                    Err(why) => return self.refuse(w, why, out),
                };
                self.commit(&w, pl.clone());
                let deadline_ms = self.now_ms.saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
                self.held.entry(group).or_default().push(Held { info: w.clone(), placement: pl.clone(), deadline_ms });
                out.push(Outcome { workload: w, kind: OutcomeKind::Waiting(pl) });
            }
            Decision::Preempt { placement, victims } => {
                let mut gone = Vec::new();
                for v in &victims {
                    match self.snapshot.placed(v) {
                        Some(p) if p.placement.node == placement.node && p.info.priority() < w.priority() => {}
                        _ => {
                            return self.refuse(
                                w,
                                format!("victim {v} is not a lower-priority workload on that node"),
                                out,
                            );
                        }
                    }
                }
                for v in &victims {
                    self.drop_held(v);
                    if let Some(p) = self.snapshot.forget(v) {
                        gone.push(p);
                    }
                }
                self.queue.on_event(Events::WORKLOAD_DELETED, self.now_ms);
                let pl = match self.checked(&w, &placement) {
                    Ok(pl) => pl,
                    Err(why) => {
                        // Put the victims back: the preemption did not make room.
                        for p in gone {
                            self.snapshot.place(p.info, p.placement, p.assumed);
                        }
                        return self.refuse(w, why, out);
                    }
                };
                self.commit(&w, pl.clone());
                out.push(Outcome { workload: w, kind: OutcomeKind::Preempted { placement: pl, victims: gone } });
            }
            Decision::Unschedulable(d) => {
                self.queue.unschedulable(&w.key, d.wake_on, self.now_ms);
                if let Some(g) = w.group_key() {
                    // One member fits nowhere: the gang cannot complete now; let the others go.
                    self.release_group(&g, out);
                }
                out.push(Outcome { workload: w, kind: OutcomeKind::Unschedulable(d) });
            }
        }
    }

    fn commit(&mut self, w: &Arc<WorkloadInfo>, pl: Placement) {
        self.queue.done(&w.key);
        self.snapshot.note_pending(w, -1);
        self.snapshot.place(w.clone(), pl, true);
        self.queue.on_event(Events::WORKLOAD_ADDED, self.now_ms);
    }

    fn release_group(&mut self, group: &str, out: &mut Vec<Outcome>) {
        let held = self.held.remove(group).unwrap_or_default();
        if held.is_empty() {
            return;
        }
        for h in held {
            self.snapshot.forget(&h.info.key);
            self.scheduler.unreserve(&h.info, &h.placement);
            self.requeue(h.info.clone());
            out.push(Outcome { workload: h.info, kind: OutcomeKind::Released });
        }
        self.queue.on_event(Events::WORKLOAD_DELETED, self.now_ms);
    }

    fn expire_gangs(&mut self) -> Vec<Outcome> {
        let now = self.now_ms;
        let expired: Vec<String> =
            self.held.iter().filter(|(_, h)| h.iter().any(|x| x.deadline_ms <= now)).map(|(g, _)| g.clone()).collect();
        let mut out = Vec::new();
        for g in expired {
            self.release_group(&g, &mut out);
        }
        out
    }
}
