//! [`SchedulerService`]: a scheduler running against a store, inside a
//! [`Manager`](orch_core::Manager) (or on its own).
//!
//! It keeps a [`SchedulingCore`] fed from the shared Node and Workload caches, schedules
//! whenever work is ready, and binds asynchronously: a decision counts in the snapshot at once
//! (assume), while the write (a compare-and-swap on the workload's resource version, carrying
//! the leader's fencing token) happens in the background, many in flight at a time, so store
//! latency never limits scheduling throughput. A failed bind rolls the assumption back and
//! requeues the workload. Workloads that fit nowhere get a `Scheduled=False` condition saying
//! why.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::core::{Outcome, OutcomeKind, SchedulingCore};
use crate::framework::{Framework, Profile};
use crate::queue::SchedulingQueue;
use crate::snapshot::Placement;
use crate::{DEFAULT_SCHEDULER, DEVICES_ANNOTATION, SCHEDULED_CONDITION, Scheduler};
use orch_core::api::Api;
use orch_core::cache::CacheRegistry;
use orch_core::cache::{Cache, CacheEvent, ObjectRef};
use orch_core::error::Error;
use orch_core::kinds::{Condition, ConditionStatus, Node, Workload, find_condition, set_condition};
use orch_core::meta::{Clock, TokioClock};
use orch_core::object::Object;
use orch_core::runnable::{Leadership, RunParts, Runnable};
use orch_core::store::{DeleteOptions, Guard, Store, WriteOptions};

/// Settings of a [`SchedulerService`].
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Bind writes in flight at most. The binds one pass decides go to the store together, as
    /// one [`Store::update_many`].
    pub bind_concurrency: usize,
    /// Workloads scheduled between two looks at new events.
    pub burst: usize,
    /// First retry delay after a failed bind (doubling to `max_backoff`).
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Unschedulable workloads are retried after this long even without an event.
    pub unschedulable_flush: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            bind_concurrency: 64,
            burst: 256,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            unschedulable_flush: Duration::from_secs(300),
        }
    }
}

/// A scheduler running against a store. Add it to a [`Manager`](orch_core::Manager) with
/// [`Manager::add`](orch_core::Manager::add) (it then schedules only while the
/// manager leads), or run it alone with [`SchedulerService::run`].
pub struct SchedulerService<S: Scheduler + 'static = Framework> {
    core: SchedulingCore<S>,
    /// Victims of preemptions whose bind is in flight: put back if it fails.
    victims: std::collections::HashMap<ObjectRef, Vec<ObjectRef>>,
    /// Binds decided in this pass, written together at its end.
    pending: Vec<PendingBind>,
    config: SchedulerConfig,
    name: String,
    /// Set by `clock`; otherwise the manager's (or, run alone, the system's time on tokio's).
    clock: Option<Arc<dyn Clock>>,
    /// Tells people why a workload waits (`FailedScheduling` events); made when it starts.
    recorder: Option<orch_core::events::Recorder>,
    /// Other caches whose changes wake waiting workloads, with the events they stand for.
    wakers: Vec<Waker>,
}

/// Forwards a cache's changes as scheduling events, until the receiver is gone.
type Waker = Box<dyn FnOnce(mpsc::UnboundedSender<crate::queue::Events>) -> BoxFuture<'static, ()> + Send>;

impl<S: Scheduler + 'static> std::fmt::Debug for SchedulerService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerService").field("name", &self.name).field("config", &self.config).finish()
    }
}

impl SchedulerService<Framework> {
    /// The default scheduler with a profile.
    pub fn new(profile: Profile) -> Self {
        SchedulerService::with_scheduler(Framework::new(profile))
    }

    /// The scheduler with `profile` plus [`VolumeBinding`](crate::plugins::VolumeBinding)
    /// reading these caches, retrying waiting workloads whenever a claim or a volume changes.
    /// In a manager: `SchedulerService::with_volumes(profile, manager.cache(), manager.cache())`.
    pub fn with_volumes(
        profile: Profile,
        claims: Cache<orch_core::kinds::VolumeClaim>,
        volumes: Cache<orch_core::kinds::PersistentVolume>,
    ) -> Self {
        let plugin = crate::plugins::VolumeBinding::new(claims.clone(), volumes.clone());
        SchedulerService::new(profile.with(plugin, 0))
            .wake_on(&claims, crate::queue::Events::STORAGE)
            .wake_on(&volumes, crate::queue::Events::STORAGE)
    }
}

impl<S: Scheduler + 'static> SchedulerService<S> {
    /// Runs a custom scheduler.
    pub fn with_scheduler(scheduler: S) -> Self {
        let name = scheduler.name().to_string();
        SchedulerService {
            core: SchedulingCore::new(scheduler),
            victims: std::collections::HashMap::new(),
            pending: Vec::new(),
            config: SchedulerConfig::default(),
            name,
            clock: None,
            recorder: None,
            wakers: Vec::new(),
        }
    }

    /// Changes the settings.
    pub fn config(mut self, config: SchedulerConfig) -> Self {
        self.core = self.core.with_queue(SchedulingQueue::new().with_timing(
            config.initial_backoff,
            config.max_backoff,
            config.unschedulable_flush,
        ));
        self.config = config;
        self
    }

    /// Uses `clock` for condition timestamps (default: the manager's clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Retries workloads waiting for `events` whenever an object of `cache` changes: plugins that
    /// read other kinds (as [`VolumeBinding`](crate::plugins::VolumeBinding) reads claims and
    /// volumes) name here what should wake the workloads they turned away.
    pub fn wake_on<K: orch_core::object::Resource>(mut self, cache: &Cache<K>, events: crate::queue::Events) -> Self {
        let mut changes = cache.subscribe();
        self.wakers.push(Box::new(move |tx| {
            async move {
                while changes.recv().await.is_some() {
                    if tx.send(events).is_err() {
                        break;
                    }
                }
            }
            .boxed()
        }));
        self
    }

    fn mine(&self, w: &Object<Workload>) -> bool {
        match &w.spec.scheduler_name {
            None => self.name == DEFAULT_SCHEDULER,
            Some(n) => *n == self.name,
        }
    }

    /// Runs on its own (no manager, no leader election) until `shutdown` resolves.
    pub async fn run(mut self, store: Arc<dyn Store>, shutdown: impl std::future::Future<Output = ()> + Send) {
        self.clock.get_or_insert_with(|| Arc::new(TokioClock::from_system_time()));
        let nodes = Cache::<Node>::spawn(store.clone(), Default::default());
        let workloads = Cache::<Workload>::spawn(store.clone(), Default::default());
        let (_tx, leader) = watch::channel(Leadership::Leading(None));
        let (stop_tx, stop) = watch::channel(false);
        let run = self.serve(store, nodes, workloads, leader, stop);
        tokio::pin!(run);
        tokio::select! {
            _ = &mut run => {}
            _ = shutdown => {
                stop_tx.send_replace(true);
                run.await;
            }
        }
    }

    async fn serve(
        mut self,
        store: Arc<dyn Store>,
        nodes: Cache<Node>,
        workloads: Cache<Workload>,
        mut leader: watch::Receiver<Leadership>,
        mut stop: watch::Receiver<bool>,
    ) {
        let clock = self.clock.clone().unwrap_or_else(|| Arc::new(TokioClock::from_system_time()));
        self.recorder =
            Some(orch_core::events::Recorder::with_clock(store.clone(), "scheduler", Default::default(), clock));
        let mut node_events = nodes.subscribe();
        let mut workload_events = workloads.subscribe();
        let (wake_tx, mut wakes) = mpsc::unbounded_channel();
        let mut wakers = JoinSet::new();
        for w in self.wakers.drain(..) {
            wakers.spawn(w(wake_tx.clone()));
        }
        drop(wake_tx);
        tokio::select! {
            _ = nodes.ready() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::select! {
            _ = workloads.ready() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // By name: node slots (and so the tie-break between equal scores) do not depend on the
        // cache's hash order, and a restarted scheduler sees the nodes as a replay does.
        let mut listed = nodes.list();
        listed.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for n in listed {
            self.core.upsert_node(&n);
        }
        for w in workloads.list() {
            if self.mine(&w) || w.spec.node_name.is_some() {
                self.core.upsert_workload(w);
            }
        }
        let start = tokio::time::Instant::now();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(ObjectRef, BindResult)>();
        let permits = Arc::new(Semaphore::new(self.config.bind_concurrency.max(1)));
        let mut binds = JoinSet::new();
        loop {
            if *stop.borrow() {
                break;
            }
            let now_ms = start.elapsed().as_millis() as u64;
            let mut outcomes = self.core.set_time(now_ms);
            // Take in everything that happened.
            while let Ok(ev) = node_events.try_recv() {
                match ev {
                    CacheEvent::Applied(n) => self.core.upsert_node(&n),
                    CacheEvent::Deleted(n) => drop(self.core.remove_node(&n.metadata.name)),
                }
            }
            while let Ok(ev) = workload_events.try_recv() {
                self.workload_event(ev);
            }
            while let Ok(ev) = wakes.try_recv() {
                self.core.on_event(ev);
            }
            while let Ok((key, result)) = done_rx.try_recv() {
                self.bind_done(key, result, &workloads);
            }
            let guard = match &*leader.borrow() {
                Leadership::Leading(g) => Some(g.clone()),
                Leadership::Standby => None,
            };
            let leading = guard.is_some();
            if let Some(guard) = guard {
                for _ in 0..self.config.burst {
                    match self.core.schedule_next() {
                        Some(out) => outcomes.extend(out),
                        None => break,
                    }
                }
                for o in outcomes {
                    self.act(o, &store, &guard, &permits, &mut binds, &done_tx, &workloads);
                }
                self.flush_binds(&store, &guard, &permits, &mut binds, &done_tx);
                while binds.try_join_next().is_some() {}
                if self.core.queue().sizes().0 > 0 {
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            // A standby does not pop, so due timers would stay due: it waits for events only.
            let wait = match self.core.queue().next_due() {
                Some(t) if leading => Duration::from_millis(t.saturating_sub(now_ms)),
                _ => Duration::from_secs(1),
            }
            .clamp(Duration::from_millis(1), Duration::from_secs(1));
            tokio::select! {
                Some(ev) = node_events.recv() => match ev {
                    CacheEvent::Applied(n) => self.core.upsert_node(&n),
                    CacheEvent::Deleted(n) => drop(self.core.remove_node(&n.metadata.name)),
                },
                Some(ev) = workload_events.recv() => self.workload_event(ev),
                Some(ev) = wakes.recv() => self.core.on_event(ev),
                Some((key, result)) = done_rx.recv() => self.bind_done(key, result, &workloads),
                // Whoever reported leadership or shutdown is gone: stop.
                changed = leader.changed() => if changed.is_err() { break },
                changed = stop.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Let in-flight binds finish: they were decided under a valid lease.
        while binds.join_next().await.is_some() {}
    }

    fn workload_event(&mut self, ev: CacheEvent<Workload>) {
        match ev {
            CacheEvent::Applied(w) => {
                if self.mine(&w) || w.spec.node_name.is_some() {
                    self.core.upsert_workload(w);
                }
            }
            CacheEvent::Deleted(w) => self.core.delete_workload(&ObjectRef::of(&w)),
        }
    }

    fn bind_done(&mut self, key: ObjectRef, result: BindResult, cache: &Cache<Workload>) {
        let victims = self.victims.remove(&key).unwrap_or_default();
        match result {
            BindResult::Bound => self.core.bound(&key),
            BindResult::Failed(latest) => {
                metrics::counter!("orch_scheduler_bind_failures_total").increment(1);
                self.core.bind_failed(&key, latest);
                // Victims that are still there count again.
                for v in victims {
                    if let Some(obj) = cache.get(&v) {
                        self.core.upsert_workload(obj);
                    }
                }
            }
        }
    }

    /// Writes the binds of this pass as one batch of compare-and-swap updates (bounded by
    /// `bind_concurrency` binds in flight); a bind that conflicts is retried on its own.
    fn flush_binds(
        &mut self,
        store: &Arc<dyn Store>,
        guard: &Option<Guard>,
        permits: &Arc<Semaphore>,
        binds: &mut JoinSet<()>,
        done: &mpsc::UnboundedSender<(ObjectRef, BindResult)>,
    ) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        let (store, guard, permits, done) = (store.clone(), guard.clone(), permits.clone(), done.clone());
        let limit = self.config.bind_concurrency.max(1);
        binds.spawn(async move {
            for chunk in batch.chunks(limit) {
                let Ok(_permits) = permits.clone().acquire_many_owned(chunk.len() as u32).await else { return };
                bind_many(&store, &guard, chunk, &done).await;
            }
        });
    }

    fn devices_text(&self, placement: &Placement) -> Option<String> {
        if placement.devices.is_empty() {
            return None;
        }
        self.core.snapshot().node(placement.node).map(|n| crate::devices_annotation(n, &placement.devices))
    }

    #[allow(clippy::too_many_arguments)]
    fn act(
        &mut self,
        o: Outcome,
        store: &Arc<dyn Store>,
        guard: &Option<Guard>,
        permits: &Arc<Semaphore>,
        binds: &mut JoinSet<()>,
        done: &mpsc::UnboundedSender<(ObjectRef, BindResult)>,
        cache: &Cache<Workload>,
    ) {
        let api = Api::<Workload>::all(store.clone()).fenced(guard.clone());
        match o.kind {
            OutcomeKind::Bound(placement) => {
                metrics::counter!("orch_scheduler_scheduled_total").increment(1);
                let obj = cache.get(&o.workload.key).unwrap_or_else(|| o.workload.object.clone());
                let devices = self.devices_text(&placement);
                self.pending.push(PendingBind { obj, placement, devices });
            }
            OutcomeKind::Preempted { placement, victims } => {
                metrics::counter!("orch_scheduler_preemptions_total").increment(1);
                let obj = cache.get(&o.workload.key).unwrap_or_else(|| o.workload.object.clone());
                self.victims.insert(o.workload.key.clone(), victims.iter().map(|v| v.info.key.clone()).collect());
                // Delete the version the cache has now (the snapshot's may predate the bind).
                let victims = victims
                    .into_iter()
                    .map(|v| cache.get(&v.info.key).unwrap_or_else(|| v.info.object.clone()))
                    .collect();
                let devices = self.devices_text(&placement);
                spawn_bind(binds, permits, done, api, obj, placement, devices, victims);
            }
            OutcomeKind::Unschedulable(diagnosis) => {
                metrics::counter!("orch_scheduler_unschedulable_total").increment(1);
                let message = diagnosis.message();
                let Some(obj) = cache.get(&o.workload.key) else { return };
                let same = find_condition(&obj.status.conditions, SCHEDULED_CONDITION)
                    .is_some_and(|c| c.status == ConditionStatus::False && c.message == message);
                if same {
                    return;
                }
                let mut next = (*obj).clone();
                if let Some(r) = &self.recorder {
                    r.record(
                        &orch_core::kinds::ObjectReference::of(&*obj),
                        orch_core::kinds::EventType::Warning,
                        "FailedScheduling",
                        message.clone(),
                    );
                }
                let mut c = Condition::new(SCHEDULED_CONDITION, ConditionStatus::False, "Unschedulable");
                c.message = message;
                let now = self.clock.as_ref().map_or_else(|| TokioClock::from_system_time().now(), |c| c.now());
                set_condition(&mut next.status.conditions, c, now);
                binds.spawn(async move {
                    // A conflict means the workload changed; the next attempt reports again.
                    let _ = api.replace_status(&next).await;
                });
            }
            OutcomeKind::Refused(why) => {
                tracing::warn!(workload = %o.workload.key, %why, "scheduler decision refused");
            }
            OutcomeKind::Waiting(_) | OutcomeKind::Released => {}
        }
    }
}

enum BindResult {
    Bound,
    Failed(Option<Arc<Object<Workload>>>),
}

/// A bind decided in this pass, not yet written.
struct PendingBind {
    obj: Arc<Object<Workload>>,
    placement: Placement,
    devices: Option<String>,
}

/// The bound form of a workload: its node (and its devices) set.
fn bound_form(obj: &Object<Workload>, placement: &Placement, devices: &Option<String>) -> Object<Workload> {
    let mut next = obj.clone();
    next.spec.node_name = Some(placement.node_name.to_string());
    if let Some(text) = devices {
        next.metadata.annotations.insert(DEVICES_ANNOTATION, text.clone());
    }
    next
}

/// Binds `chunk` in one store call. Only `spec.nodeName` (and the devices annotation) change, on
/// objects the store already validated, so the typed validation of a full write is skipped. A
/// conflict goes through [`bind`], which retries on the current version when it is still unbound
/// and unchanged in spec.
async fn bind_many(
    store: &Arc<dyn Store>,
    guard: &Option<Guard>,
    chunk: &[PendingBind],
    done: &mpsc::UnboundedSender<(ObjectRef, BindResult)>,
) {
    let mut objs = Vec::with_capacity(chunk.len());
    let mut sent = Vec::with_capacity(chunk.len());
    for b in chunk {
        if b.obj.spec.node_name.is_some() {
            let _ = done.send((ObjectRef::of(&*b.obj), BindResult::Failed(Some(b.obj.clone()))));
            continue;
        }
        match bound_form(&b.obj, &b.placement, &b.devices).to_dynamic() {
            Ok(d) => {
                objs.push(d);
                sent.push(b);
            }
            Err(e) => {
                tracing::debug!(error = %e, "bind failed");
                let _ = done.send((ObjectRef::of(&*b.obj), BindResult::Failed(None)));
            }
        }
    }
    let opts = WriteOptions { guard: guard.clone() };
    let results = store.update_many(objs, &opts).await;
    for (b, result) in sent.into_iter().zip(results) {
        let key = ObjectRef::of(&*b.obj);
        let outcome = match result {
            Ok(_) => BindResult::Bound,
            Err(Error::Conflict { .. }) => {
                let api = Api::<Workload>::all(store.clone()).fenced(guard.clone());
                bind(&api, &b.obj, &b.placement, b.devices.clone(), &[]).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "bind failed");
                BindResult::Failed(None)
            }
        };
        let _ = done.send((key, outcome));
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_bind(
    binds: &mut JoinSet<()>,
    permits: &Arc<Semaphore>,
    done: &mpsc::UnboundedSender<(ObjectRef, BindResult)>,
    api: Api<Workload>,
    obj: Arc<Object<Workload>>,
    placement: Placement,
    devices: Option<String>,
    victims: Vec<Arc<Object<Workload>>>,
) {
    let permits = permits.clone();
    let done = done.clone();
    binds.spawn(async move {
        let Ok(_permit) = permits.acquire_owned().await else { return };
        let key = ObjectRef::of(&obj);
        let result = bind(&api, &obj, &placement, devices, &victims).await;
        let _ = done.send((key, result));
    });
}

/// Evicts the victims, then writes `spec.nodeName` with compare-and-swap. On a conflict with a
/// version that is still unbound and unchanged in spec, it retries once on that version.
async fn bind(
    api: &Api<Workload>,
    obj: &Object<Workload>,
    placement: &Placement,
    devices: Option<String>,
    victims: &[Arc<Object<Workload>>],
) -> BindResult {
    for v in victims {
        let opts = DeleteOptions { resource_version: Some(v.metadata.resource_version), ..Default::default() };
        let vapi =
            Api::<Workload>::namespaced(api.store().clone(), v.metadata.namespace.clone()).fenced(api_guard(api));
        match vapi.delete(&v.metadata.name, &opts).await {
            Ok(_) | Err(Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::info!(victim = %v.metadata.name, error = %e, "preemption victim not evicted");
                return BindResult::Failed(None);
            }
        }
    }
    let mut attempt = obj.clone();
    for _ in 0..2 {
        if attempt.spec.node_name.is_some() {
            return BindResult::Failed(Some(Arc::new(attempt)));
        }
        let next = bound_form(&attempt, placement, &devices);
        match api.replace(&next).await {
            Ok(_) => return BindResult::Bound,
            Err(Error::Conflict { current: Some(cur), .. }) => {
                let Ok(cur) = Object::<Workload>::from_dynamic(&cur) else { return BindResult::Failed(None) };
                if cur.spec != obj.spec {
                    return BindResult::Failed(Some(Arc::new(cur)));
                }
                attempt = cur;
            }
            Err(e) => {
                tracing::debug!(error = %e, "bind failed");
                return BindResult::Failed(None);
            }
        }
    }
    BindResult::Failed(None)
}

fn api_guard(api: &Api<Workload>) -> Option<Guard> {
    api.guard().cloned()
}

impl<S: Scheduler + 'static> Runnable for SchedulerService<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&mut self, caches: &CacheRegistry, store: &Arc<dyn Store>) {
        caches.get_or_start::<Node>(store);
        caches.get_or_start::<Workload>(store);
    }

    fn run(self: Box<Self>, parts: RunParts) -> BoxFuture<'static, ()> {
        let RunParts { store, caches, leader, shutdown, clock, .. } = parts;
        let mut this = *self;
        this.clock.get_or_insert(clock);
        let (nodes, workloads) = (caches.get_or_start::<Node>(&store), caches.get_or_start::<Workload>(&store));
        this.serve(store, nodes, workloads, leader, shutdown).boxed()
    }
}
