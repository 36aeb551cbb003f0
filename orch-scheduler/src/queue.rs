//! The scheduling queue: active, backoff and unschedulable sets.
//!
//! Workloads wait in `active` in the scheduler's order. One that failed for a transient reason
//! (a bind conflict) waits in `backoff` (1 s doubling to 10 s per attempt). One that fit nowhere
//! waits in `unschedulable` until a cluster event that could change that arrives (a node added,
//! a workload deleted…: each plugin names the events that may turn its "no" into a "yes"), not
//! by polling; as a safety net, it is retried after five minutes anyway. If such an event
//! arrived while the workload was being scheduled, it goes to backoff instead, so the event is
//! not lost.
//!
//! Time is passed in (milliseconds on any monotonic clock) so the queue runs the same under a
//! simulation as under a real clock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;

use crate::snapshot::WorkloadInfo;
use orch_core::backoff::Backoff;
use orch_core::cache::ObjectRef;

/// Cluster events that can make an unschedulable workload fit (a bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Events(pub u32);

impl Events {
    /// No event.
    pub const NONE: Events = Events(0);
    /// A node joined.
    pub const NODE_ADDED: Events = Events(1);
    /// A node's labels, taints, capacity or cordon changed.
    pub const NODE_UPDATED: Events = Events(2);
    /// A workload was placed (it may satisfy an affinity, or complete a gang).
    pub const WORKLOAD_ADDED: Events = Events(4);
    /// A workload left a node (resources freed, anti-affinity lifted).
    pub const WORKLOAD_DELETED: Events = Events(8);
    /// A workload waiting to be scheduled arrived (gangs wait for members).
    pub const WORKLOAD_PENDING: Events = Events(16);
    /// A volume claim or a provided volume changed (created, bound, deleted).
    pub const STORAGE: Events = Events(32);
    /// Every event.
    pub const ALL: Events = Events(63);

    /// Whether the two sets share an event.
    pub fn intersects(self, other: Events) -> bool {
        self.0 & other.0 != 0
    }
}

/// How many kinds of events there are (bits of [`Events::ALL`]).
const EVENT_KINDS: usize = Events::ALL.0.count_ones() as usize;

impl std::ops::BitOr for Events {
    type Output = Events;
    fn bitor(self, rhs: Events) -> Events {
        Events(self.0 | rhs.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Active,
    Backoff(u64),
    Unschedulable(u64),
    InFlight,
}

#[derive(Debug)]
struct Item {
    info: Arc<WorkloadInfo>,
    order: (i64, u64),
    id: u64,
    attempts: u32,
    wake_on: Events,
    place: Place,
    /// Event counter when it was popped; events after it send a failure to backoff.
    popped_at: u64,
}

/// The queue of workloads waiting for a placement.
#[derive(Debug)]
pub struct SchedulingQueue {
    // hashbrown's default hasher (foldhash): these maps take every workload event.
    items: HashMap<ObjectRef, Item>,
    ids: HashMap<u64, ObjectRef>,
    active: BTreeSet<((i64, u64), u64)>,
    backoff: BTreeSet<(u64, u64)>,
    unschedulable: BTreeSet<(u64, u64)>,
    next_id: u64,
    events: u64,
    /// Unschedulable workloads waiting on each event bit, so events nobody waits for cost nothing.
    waiting_on: [usize; EVENT_KINDS],
    /// The latest events with their counter, to tell whether one that matters to a failed
    /// workload happened while it was being scheduled.
    recent: std::collections::VecDeque<(u64, Events)>,
    /// Backoff of a workload after a transient failure (exact: the queue's schedule is what
    /// kube-scheduler users expect).
    retry: Backoff,
    flush_ms: u64,
}

impl Default for SchedulingQueue {
    fn default() -> Self {
        SchedulingQueue::new()
    }
}

impl SchedulingQueue {
    /// An empty queue: backoff 1 s doubling to 10 s, unschedulable retried after 5 min.
    pub fn new() -> Self {
        SchedulingQueue {
            items: HashMap::new(),
            ids: HashMap::new(),
            active: BTreeSet::new(),
            backoff: BTreeSet::new(),
            unschedulable: BTreeSet::new(),
            next_id: 0,
            events: 0,
            waiting_on: [0; EVENT_KINDS],
            recent: std::collections::VecDeque::new(),
            retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(10)),
            flush_ms: 300_000,
        }
    }

    /// Changes the backoff bounds and the unschedulable safety-net interval.
    pub fn with_timing(mut self, initial_backoff: Duration, max_backoff: Duration, flush: Duration) -> Self {
        self.retry = Backoff::new(initial_backoff, max_backoff.max(initial_backoff));
        self.flush_ms = flush.as_millis() as u64;
        self
    }

    fn unlink(&mut self, key: &ObjectRef) -> Option<Item> {
        let item = self.items.remove(key)?;
        self.ids.remove(&item.id);
        match item.place {
            Place::Active => {
                self.active.remove(&(item.order, item.id));
            }
            Place::Backoff(t) => {
                self.backoff.remove(&(t, item.id));
            }
            Place::Unschedulable(t) => {
                self.unschedulable.remove(&(t, item.id));
                self.count_waiting(item.wake_on, false);
            }
            Place::InFlight => {}
        }
        Some(item)
    }

    fn link(&mut self, key: ObjectRef, item: Item) {
        match item.place {
            Place::Active => {
                self.active.insert((item.order, item.id));
            }
            Place::Backoff(t) => {
                self.backoff.insert((t, item.id));
            }
            Place::Unschedulable(t) => {
                self.unschedulable.insert((t, item.id));
                self.count_waiting(item.wake_on, true);
            }
            Place::InFlight => {}
        }
        self.ids.insert(item.id, key.clone());
        self.items.insert(key, item);
    }

    /// Adds a workload, or replaces its info when it is queued already (an update may make it
    /// fit, so it becomes active). One being scheduled right now just gets the new info.
    pub fn add(&mut self, info: Arc<WorkloadInfo>, order: (i64, u64)) {
        let key = info.key.clone();
        match self.unlink(&key) {
            Some(mut item) => {
                item.info = info;
                item.order = order;
                if item.place != Place::InFlight {
                    item.place = Place::Active;
                }
                self.link(key, item);
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let item =
                    Item { info, order, id, attempts: 0, wake_on: Events::NONE, place: Place::Active, popped_at: 0 };
                self.link(key, item);
            }
        }
    }

    /// The queued info of a workload.
    pub fn get(&self, key: &ObjectRef) -> Option<&Arc<WorkloadInfo>> {
        self.items.get(key).map(|i| &i.info)
    }

    /// Replaces a queued workload's info without moving it (its order, set and attempts stay).
    /// Returns false when it is not queued.
    pub fn refresh(&mut self, info: Arc<WorkloadInfo>) -> bool {
        match self.items.get_mut(&info.key) {
            Some(item) => {
                item.info = info;
                true
            }
            None => false,
        }
    }

    /// Sets the attempt count (which the backoff grows with).
    pub fn set_attempts(&mut self, key: &ObjectRef, attempts: u32) {
        if let Some(item) = self.items.get_mut(key) {
            item.attempts = attempts;
        }
    }

    /// Removes a workload (deleted, or bound by someone else).
    pub fn remove(&mut self, key: &ObjectRef) -> Option<Arc<WorkloadInfo>> {
        self.unlink(key).map(|i| i.info)
    }

    /// Whether the workload is in the queue (any set, or being scheduled).
    pub fn contains(&self, key: &ObjectRef) -> bool {
        self.items.contains_key(key)
    }

    fn count_waiting(&mut self, events: Events, add: bool) {
        for (bit, n) in self.waiting_on.iter_mut().enumerate() {
            if events.0 & (1 << bit) != 0 {
                if add {
                    *n += 1;
                } else {
                    *n -= 1;
                }
            }
        }
    }

    fn flush(&mut self, now_ms: u64) {
        while let Some(&(t, id)) = self.backoff.first() {
            if t > now_ms {
                break;
            }
            self.backoff.pop_first();
            self.activate(id);
        }
        while let Some(&(t, id)) = self.unschedulable.first() {
            if t + self.flush_ms > now_ms {
                break;
            }
            self.unschedulable.pop_first();
            if let Some(item) = self.ids.get(&id).and_then(|k| self.items.get(k)) {
                let wake_on = item.wake_on;
                self.count_waiting(wake_on, false);
            }
            self.activate(id);
        }
    }

    fn activate(&mut self, id: u64) {
        let Some(key) = self.ids.get(&id) else { return };
        if let Some(item) = self.items.get_mut(key) {
            item.place = Place::Active;
            self.active.insert((item.order, item.id));
        }
    }

    /// Takes the next workload to schedule; it stays known to the queue (in flight) until
    /// [`done`](Self::done) or a requeue.
    pub fn pop(&mut self, now_ms: u64) -> Option<Arc<WorkloadInfo>> {
        self.flush(now_ms);
        let (_, id) = self.active.pop_first()?;
        let key = self.ids.get(&id)?;
        let item = self.items.get_mut(key)?;
        item.place = Place::InFlight;
        item.popped_at = self.events;
        Some(item.info.clone())
    }

    /// The next workload in order without taking it.
    pub fn peek(&self) -> Option<&Arc<WorkloadInfo>> {
        let (_, id) = self.active.first()?;
        self.items.get(self.ids.get(id)?).map(|i| &i.info)
    }

    /// The workload was placed: forget it.
    pub fn done(&mut self, key: &ObjectRef) {
        self.unlink(key);
    }

    /// It fit nowhere: park it until one of `wake_on` happens (or backoff, if one already did
    /// while it was being scheduled).
    pub fn unschedulable(&mut self, key: &ObjectRef, wake_on: Events, now_ms: u64) {
        let Some(mut item) = self.unlink(key) else { return };
        item.attempts += 1;
        item.wake_on = wake_on;
        item.place = if self.event_since(item.popped_at, wake_on) {
            Place::Backoff(now_ms + self.backoff_ms(item.attempts))
        } else {
            Place::Unschedulable(now_ms)
        };
        self.link(key.clone(), item);
    }

    /// Whether an event in `mask` happened after the counter was at `since` (when in doubt, yes).
    fn event_since(&self, since: u64, mask: Events) -> bool {
        if since >= self.events {
            return false;
        }
        match self.recent.front() {
            Some((first, _)) if *first <= since + 1 => {
                self.recent.iter().any(|(n, e)| *n > since && e.intersects(mask))
            }
            _ => true,
        }
    }

    /// A transient failure: retry after a backoff that grows with the attempts.
    pub fn backoff(&mut self, key: &ObjectRef, now_ms: u64) {
        let Some(mut item) = self.unlink(key) else { return };
        item.attempts += 1;
        item.place = Place::Backoff(now_ms + self.backoff_ms(item.attempts));
        self.link(key.clone(), item);
    }

    fn backoff_ms(&self, attempts: u32) -> u64 {
        u64::try_from(self.retry.delay(attempts).as_millis()).unwrap_or(u64::MAX)
    }

    /// A cluster event: wakes the unschedulable workloads it may help. Returns how many woke.
    pub fn on_event(&mut self, event: Events, now_ms: u64) -> usize {
        self.events += 1;
        self.recent.push_back((self.events, event));
        if self.recent.len() > 4096 {
            self.recent.pop_front();
        }
        let waiting = self.waiting_on.iter().enumerate().any(|(bit, n)| *n > 0 && event.0 & (1 << bit) != 0);
        if !waiting {
            return 0;
        }
        let woken: Vec<(u64, u64)> = self
            .unschedulable
            .iter()
            .filter(|(_, id)| {
                self.ids.get(id).and_then(|k| self.items.get(k)).is_some_and(|i| i.wake_on.intersects(event))
            })
            .copied()
            .collect();
        for (t, id) in &woken {
            self.unschedulable.remove(&(*t, *id));
            let Some(key) = self.ids.get(id).cloned() else { continue };
            let Some(mut item) = self.unlink_detached(&key) else { continue };
            self.count_waiting(item.wake_on, false);
            // Respect the backoff it earned; an event does not let it skip the line.
            let ready = t + self.backoff_ms(item.attempts);
            item.place = if ready > now_ms { Place::Backoff(ready) } else { Place::Active };
            self.link(key, item);
        }
        woken.len()
    }

    fn unlink_detached(&mut self, key: &ObjectRef) -> Option<Item> {
        let item = self.items.remove(key)?;
        self.ids.remove(&item.id);
        Some(item)
    }

    /// Workloads known to the queue (all sets, and in flight).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sizes of the active, backoff and unschedulable sets.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.active.len(), self.backoff.len(), self.unschedulable.len())
    }

    /// When the earliest backoff or safety-net retry is due, if any.
    pub fn next_due(&self) -> Option<u64> {
        let b = self.backoff.first().map(|(t, _)| *t);
        let u = self.unschedulable.first().map(|(t, _)| t + self.flush_ms);
        match (b, u) {
            (Some(b), Some(u)) => Some(b.min(u)),
            (b, u) => b.or(u),
        }
    }

    /// Attempts so far for a workload.
    pub fn attempts(&self, key: &ObjectRef) -> u32 {
        self.items.get(key).map_or(0, |i| i.attempts)
    }

    /// Every queued workload.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<WorkloadInfo>> + '_ {
        self.items.values().map(|i| &i.info)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use orch_core::kinds::Workload;
    use orch_core::meta::ObjectMeta;
    use orch_core::object::Object;

    fn info(i: u8) -> Arc<WorkloadInfo> {
        let obj = Object::new(ObjectMeta::namespaced("ns", format!("w{i}")), Workload::command("c", &["x"]));
        Arc::new(WorkloadInfo::new(Arc::new(obj), i as u64))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8, i64),
        Pop,
        Done,
        Unschedulable(u32),
        Backoff,
        Event(u32),
        Remove(u8),
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, -3i64..3).prop_map(|(k, p)| Op::Add(k, p)),
            Just(Op::Pop),
            Just(Op::Done),
            (1u32..32).prop_map(Op::Unschedulable),
            Just(Op::Backoff),
            (1u32..32).prop_map(Op::Event),
            (0u8..12).prop_map(Op::Remove),
            (0u64..20_000).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// The queue never loses or duplicates a workload: whatever is added and not removed or
        /// done is popped exactly once per time it is made ready, in priority order, and
        /// everything parked comes back once time passes the safety net.
        #[test]
        fn never_loses_or_duplicates(ops in prop::collection::vec(op(), 1..200)) {
            let mut q = SchedulingQueue::new();
            let mut model: BTreeMap<String, i64> = BTreeMap::new();
            let mut in_flight: Option<ObjectRef> = None;
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Add(k, p) => {
                        let w = info(k);
                        model.insert(w.key.name.clone(), p);
                        q.add(w, (-p, k as u64));
                    }
                    Op::Pop => {
                        if in_flight.is_none()
                            && let Some(w) = q.pop(now) {
                                prop_assert!(model.contains_key(&w.key.name), "popped an unknown workload");
                                in_flight = Some(w.key.clone());
                            }
                    }
                    Op::Done => {
                        if let Some(k) = in_flight.take() {
                            q.done(&k);
                            model.remove(&k.name);
                        }
                    }
                    Op::Unschedulable(mask) => {
                        if let Some(k) = in_flight.take() {
                            q.unschedulable(&k, Events(mask), now);
                        }
                    }
                    Op::Backoff => {
                        if let Some(k) = in_flight.take() {
                            q.backoff(&k, now);
                        }
                    }
                    Op::Event(mask) => {
                        q.on_event(Events(mask), now);
                    }
                    Op::Remove(k) => {
                        let key = info(k).key.clone();
                        q.remove(&key);
                        model.remove(&key.name);
                        if in_flight.as_ref() == Some(&key) {
                            in_flight = None;
                        }
                    }
                    Op::Tick(ms) => now += ms,
                }
                prop_assert_eq!(q.len(), model.len());
                let (a, b, u) = q.sizes();
                prop_assert_eq!(a + b + u + in_flight.is_some() as usize, model.len());
            }
            // Finish the one in flight, then let every timer pass: each remaining workload pops
            // exactly once, highest priority first.
            if let Some(k) = in_flight.take() {
                q.backoff(&k, now);
            }
            now += 1_000_000;
            let mut popped = Vec::new();
            while let Some(w) = q.pop(now) {
                popped.push((w.key.name.clone(), -model[&w.key.name], w.seq));
                q.done(&w.key);
            }
            let mut names: Vec<_> = popped.iter().map(|p| p.0.clone()).collect();
            names.sort();
            prop_assert_eq!(names, model.keys().cloned().collect::<Vec<_>>());
            let order: Vec<_> = popped.iter().map(|p| (p.1, p.2)).collect();
            let mut sorted = order.clone();
            sorted.sort();
            prop_assert_eq!(order, sorted);
            prop_assert!(q.is_empty());
        }
    }

    #[test]
    fn events_wake_only_those_waiting_for_them() {
        let mut q = SchedulingQueue::new();
        q.add(info(1), (0, 1));
        q.add(info(2), (0, 2));
        let a = q.pop(0).unwrap();
        q.unschedulable(&a.key, Events::NODE_ADDED, 0);
        let b = q.pop(0).unwrap();
        q.unschedulable(&b.key, Events::WORKLOAD_DELETED, 0);
        assert_eq!(q.sizes(), (0, 0, 2));
        assert_eq!(q.on_event(Events::WORKLOAD_ADDED, 5_000), 0);
        assert_eq!(q.on_event(Events::NODE_ADDED, 5_000), 1);
        assert_eq!(q.pop(5_000).unwrap().key, a.key);
        assert!(q.pop(5_000).is_none());
        // An event during scheduling sends the failure to backoff, not to the parked set.
        let mut q = SchedulingQueue::new();
        q.add(info(3), (0, 3));
        let c = q.pop(0).unwrap();
        q.on_event(Events::NODE_UPDATED, 0);
        q.unschedulable(&c.key, Events::NODE_UPDATED, 0);
        assert_eq!(q.sizes(), (0, 1, 0));
        assert!(q.pop(999).is_none());
        assert_eq!(q.pop(1_000).unwrap().key, c.key);
        // An unrelated event during scheduling does not: it parks.
        q.on_event(Events::WORKLOAD_ADDED, 1_000);
        q.unschedulable(&c.key, Events::NODE_UPDATED, 1_000);
        assert_eq!(q.sizes(), (0, 0, 1));
    }
}
