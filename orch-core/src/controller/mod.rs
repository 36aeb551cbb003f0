//! Controllers: the reconcile loop that turns desired state into action.
//!
//! Implement [`Controller`] for your kind, describe what triggers it with a [`ControllerBuilder`],
//! and hand it to a [`Manager`](crate::Manager), which runs it over shared caches with bounded
//! concurrency, timeouts, backoff, panic isolation, metrics and (optionally) leader election.
//!
//! ```no_run
//! use std::sync::Arc;
//! use orch_core::controller::{Action, Context, Controller, ControllerBuilder};
//! use orch_core::{Manager, Object, Store, kinds::Node};
//!
//! struct CountNodes;
//!
//! #[async_trait::async_trait]
//! impl Controller for CountNodes {
//!     type Kind = Node;
//!     type Error = orch_core::Error;
//!     async fn reconcile(&self, node: Arc<Object<Node>>, _ctx: &Context) -> Result<Action, Self::Error> {
//!         println!("node {} is at generation {}", node.metadata.name, node.metadata.generation);
//!         Ok(Action::Done)
//!     }
//! }
//!
//! # async fn run(store: Arc<dyn Store>) -> orch_core::Result<()> {
//! let mut manager = Manager::new(store);
//! manager.add(ControllerBuilder::new("count-nodes", CountNodes));
//! manager.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod finalizer;
pub mod leader;
pub mod predicate;
pub mod queue;

use std::any::Any;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::api::Api;
use crate::cache::{Cache, CacheEvent, CacheRegistry, ObjectRef};
use crate::meta::{Clock, TokioClock};
use crate::object::{Object, Resource, Scope};
use crate::runnable::{Leadership, RunParts, Runnable, stopped};
use crate::store::{Guard, Store};
use predicate::Predicate;
use queue::{QueueConfig, WorkQueue};

/// What to do with a key after reconciling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Converged: reconcile again only when something changes.
    Done,
    /// Reconcile again after this long (clamped by the queue's `max_delay`), even without a
    /// change; the backoff is reset.
    RequeueAfter(Duration),
    /// Try again after the key's backoff delay (which grows with each retry).
    Retry,
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError<E: std::error::Error + 'static> {
    /// The reconciler returned an error.
    #[error("reconciler failed: {0}")]
    Failed(#[source] E),
    /// The reconciler panicked; the panic was caught and the controller kept running.
    #[error("reconciler panicked: {0}")]
    Panicked(String),
    /// The reconciler did not finish within the controller's timeout.
    #[error("reconcile timed out after {0:?}")]
    TimedOut(Duration),
}

/// What every reconcile gets: the store, the shared caches, and the fencing token of the
/// leadership it acts under.
#[derive(Clone)]
pub struct Context {
    store: Arc<dyn Store>,
    caches: CacheRegistry,
    guard: Option<Guard>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").field("guard", &self.guard).finish()
    }
}

impl Context {
    /// A context for tests and one-off calls: no caches, no leadership.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Context {
            store,
            caches: CacheRegistry::default(),
            guard: None,
            clock: Arc::new(TokioClock::from_system_time()),
        }
    }

    /// The manager's clock: use it for every timestamp a reconcile writes.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Typed access to one namespace; under leader election every write carries the leader's
    /// fencing token, so a deposed leader cannot write.
    pub fn api<K: Resource>(&self, namespace: &str) -> Api<K> {
        match K::SCOPE {
            Scope::Namespaced => Api::namespaced(self.store.clone(), namespace),
            Scope::Cluster => Api::all(self.store.clone()),
        }
        .fenced(self.guard.clone())
    }

    /// Typed access across namespaces (or to a cluster-scoped kind), fenced like [`api`](Context::api).
    pub fn api_all<K: Resource>(&self) -> Api<K> {
        Api::all(self.store.clone()).fenced(self.guard.clone())
    }

    /// The shared cache of kind `K`, if one is running in this manager.
    pub fn cache<K: Resource>(&self) -> Option<Cache<K>> {
        self.caches.get::<K>()
    }

    /// The leader's fencing token, when running under leader election.
    pub fn guard(&self) -> Option<&Guard> {
        self.guard.as_ref()
    }
}

/// A reconciler for one kind.
#[async_trait::async_trait]
pub trait Controller: Send + Sync + 'static {
    /// The kind it reconciles.
    type Kind: Resource;
    /// Its error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Brings the world in line with `obj`. Called for each object that exists (an object being
    /// deleted while finalizers hold it still counts; see [`finalizer`]), never twice at once
    /// for the same object, and again whenever it or one of its triggers changes.
    async fn reconcile(&self, obj: Arc<Object<Self::Kind>>, ctx: &Context) -> Result<Action, Self::Error>;

    /// What to do after a failed reconcile; the default retries with backoff.
    fn error_policy(&self, obj: &Object<Self::Kind>, error: &ReconcileError<Self::Error>, ctx: &Context) -> Action {
        let _ = (obj, error, ctx);
        Action::Retry
    }
}

/// Starts one cache in a registry.
type CacheStarter = fn(&CacheRegistry, &Arc<dyn Store>);

type TriggerStarter =
    Box<dyn FnOnce(&CacheRegistry, &Arc<dyn Store>, WorkQueue<ObjectRef>) -> BoxFuture<'static, ()> + Send>;

/// How a controller is wired and bounded.
pub struct ControllerBuilder<C: Controller> {
    name: String,
    controller: Arc<C>,
    triggers: Vec<TriggerStarter>,
    /// Start the caches the triggers read, so the manager waits for them too.
    trigger_caches: Vec<CacheStarter>,
    resync: Option<Duration>,
    concurrency: usize,
    timeout: Duration,
    queue: QueueConfig,
    predicate: Option<Predicate<C::Kind>>,
}

impl<C: Controller> ControllerBuilder<C> {
    /// A controller named `name` (used in metrics and traces). Defaults: concurrency = the
    /// number of CPUs, 60 s reconcile timeout, no resync.
    pub fn new(name: impl Into<String>, controller: C) -> Self {
        ControllerBuilder {
            name: name.into(),
            controller: Arc::new(controller),
            triggers: Vec::new(),
            trigger_caches: Vec::new(),
            resync: None,
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            timeout: Duration::from_secs(60),
            queue: QueueConfig::default(),
            predicate: None,
        }
    }

    /// Reconcile an object of the controller's own kind only for the changes `predicate`
    /// passes (deletions always pass; triggers from owned and watched kinds and resyncs are not
    /// filtered). See [`predicate`] for the rules in the box.
    pub fn predicate(mut self, predicate: Predicate<C::Kind>) -> Self {
        self.predicate = Some(predicate);
        self
    }

    /// Reconcile the owner when an owned `Child` changes (through its controller owner
    /// reference).
    pub fn owns<Child: Resource>(mut self) -> Self {
        self.trigger_caches.push(|caches, store| {
            caches.get_or_start::<Child>(store);
        });
        self.triggers.push(Box::new(|caches, store, queue| {
            let cache = caches.get_or_start::<Child>(store);
            forward(cache, queue, |child: &Object<Child>| {
                child
                    .metadata
                    .owner_references
                    .iter()
                    .filter(|o| o.controller && o.kind == C::Kind::KIND)
                    .map(|o| {
                        let ns = if C::Kind::SCOPE == Scope::Namespaced {
                            child.metadata.namespace.clone()
                        } else {
                            String::new()
                        };
                        ObjectRef::new(ns, o.name.clone())
                    })
                    .collect()
            })
            .boxed()
        }));
        self
    }

    /// Reconcile the objects `map` names whenever an `Other` changes.
    pub fn watches<Other: Resource>(
        mut self,
        map: impl Fn(&Object<Other>) -> Vec<ObjectRef> + Send + Sync + 'static,
    ) -> Self {
        self.trigger_caches.push(|caches, store| {
            caches.get_or_start::<Other>(store);
        });
        self.triggers.push(Box::new(move |caches, store, queue| {
            let cache = caches.get_or_start::<Other>(store);
            forward(cache, queue, map).boxed()
        }));
        self
    }

    /// Start the shared cache of `K` for the reconciler to read (through [`Context::cache`]),
    /// without reconciling on its changes; the manager's readiness waits for it too.
    pub fn reads<K: Resource>(mut self) -> Self {
        self.trigger_caches.push(|caches, store| {
            caches.get_or_start::<K>(store);
        });
        self
    }

    /// Reconcile every object again at this interval, changed or not.
    pub fn resync(mut self, every: Duration) -> Self {
        self.resync = Some(every);
        self
    }

    /// At most `n` reconciles at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// A reconcile that takes longer fails with [`ReconcileError::TimedOut`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Backoff, rate limit and aging of the work queue.
    pub fn queue(mut self, config: QueueConfig) -> Self {
        self.queue = config;
        self
    }
}

/// Enqueues the keys `map` gives for every change in `cache`, until the queue shuts down.
async fn forward<K: Resource>(
    cache: Cache<K>,
    queue: WorkQueue<ObjectRef>,
    map: impl Fn(&Object<K>) -> Vec<ObjectRef> + Send + Sync + 'static,
) {
    let mut events = cache.subscribe();
    cache.ready().await;
    for obj in cache.list() {
        for r in map(&obj) {
            queue.add(r);
        }
    }
    while let Some(event) = recv_until_shutdown(&mut events, &queue).await {
        for r in map(event.object()) {
            queue.add(r);
        }
    }
}

/// Enqueues the objects of `cache` whose changes `predicate` passes (and every deletion),
/// remembering the last state of each it saw.
async fn forward_filtered<K: Resource>(cache: Cache<K>, queue: WorkQueue<ObjectRef>, predicate: Predicate<K>) {
    let mut events = cache.subscribe();
    cache.ready().await;
    let mut seen: std::collections::HashMap<ObjectRef, Arc<Object<K>>> = std::collections::HashMap::new();
    for obj in cache.list() {
        let key = ObjectRef::of(&obj);
        if predicate(None, &obj) {
            queue.add(key.clone());
        }
        seen.insert(key, obj);
    }
    while let Some(event) = recv_until_shutdown(&mut events, &queue).await {
        let key = ObjectRef::of(event.object());
        match event {
            CacheEvent::Applied(new) => {
                let old = seen.insert(key.clone(), new.clone());
                if predicate(old.as_deref(), &new) {
                    queue.add(key);
                }
            }
            CacheEvent::Deleted(_) => {
                seen.remove(&key);
                queue.add(key);
            }
        }
    }
}

async fn recv_until_shutdown<T>(rx: &mut mpsc::UnboundedReceiver<T>, queue: &WorkQueue<ObjectRef>) -> Option<T> {
    loop {
        tokio::select! {
            item = rx.recv() => return item,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if queue.is_shut_down() { return None; }
            }
        }
    }
}

impl<C: Controller> Runnable for ControllerBuilder<C> {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&mut self, caches: &CacheRegistry, store: &Arc<dyn Store>) {
        caches.get_or_start::<C::Kind>(store);
        for start in &self.trigger_caches {
            start(caches, store);
        }
    }

    fn run(self: Box<Self>, parts: RunParts) -> BoxFuture<'static, ()> {
        run_controller(*self, parts).boxed()
    }
}

async fn run_controller<C: Controller>(b: ControllerBuilder<C>, parts: RunParts) {
    let RunParts { store, caches, mut leader, mut shutdown, clock, .. } = parts;
    let name: Arc<str> = Arc::from(b.name.as_str());
    let queue: WorkQueue<ObjectRef> = WorkQueue::with_metrics(b.queue.clone(), &b.name);
    let cache = caches.get_or_start::<C::Kind>(&store);
    let mut feeders = JoinSet::new();
    match b.predicate {
        None => feeders.spawn(forward(cache.clone(), queue.clone(), |o: &Object<C::Kind>| vec![ObjectRef::of(o)])),
        Some(p) => feeders.spawn(forward_filtered(cache.clone(), queue.clone(), p)),
    };
    for start in b.triggers {
        feeders.spawn(start(&caches, &store, queue.clone()));
    }
    if let Some(every) = b.resync {
        let (cache, queue) = (cache.clone(), queue.clone());
        feeders.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            while !queue.is_shut_down() {
                tick.tick().await;
                for o in cache.list() {
                    queue.add(ObjectRef::of(&o));
                }
            }
        });
    }
    let permits = Arc::new(Semaphore::new(b.concurrency));
    let mut in_flight = JoinSet::new();
    let mut was_leader = false;
    // The first time this replica leads, the initial list the feeders enqueue covers everything.
    let mut led_before = false;
    loop {
        // Only the leader reconciles; a standby keeps its caches and queue warm.
        let current = leader.borrow_and_update().clone();
        let guard = match current {
            Leadership::Leading(guard) => guard,
            Leadership::Standby => {
                was_leader = false;
                tokio::select! {
                    changed = leader.changed() => if changed.is_err() { break } else { continue },
                    _ = stopped(&mut shutdown) => break,
                }
            }
        };
        if !was_leader {
            was_leader = true;
            if led_before {
                // Leading again after a spell as standby: take nothing on trust, reconcile all.
                for o in cache.list() {
                    queue.add(ObjectRef::of(&o));
                }
            }
            led_before = true;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stopped(&mut shutdown) => break,
            changed = leader.changed() => if changed.is_err() { break } else { continue },
        };
        let key = tokio::select! {
            k = queue.next() => match k { Some(k) => k, None => break },
            _ = stopped(&mut shutdown) => break,
            changed = leader.changed() => if changed.is_err() { break } else { continue },
        };
        while in_flight.try_join_next().is_some() {}
        let Some(obj) = cache.get(&key) else {
            // Deleted before its turn: nothing to reconcile.
            queue.forget(&key);
            queue.done(&key);
            continue;
        };
        let ctx = Context { store: store.clone(), caches: caches.clone(), guard, clock: clock.clone() };
        let (controller, queue, name, timeout) = (b.controller.clone(), queue.clone(), name.clone(), b.timeout);
        let span =
            tracing::info_span!("reconcile", controller = %name, object = %key, generation = obj.metadata.generation);
        in_flight.spawn(
            async move {
                let _permit = permit;
                let started = tokio::time::Instant::now();
                let outcome = tokio::time::timeout(
                    timeout,
                    AssertUnwindSafe(controller.reconcile(obj.clone(), &ctx)).catch_unwind(),
                )
                .await;
                let result = match outcome {
                    Ok(Ok(Ok(action))) => Ok(action),
                    Ok(Ok(Err(e))) => Err(ReconcileError::Failed(e)),
                    Ok(Err(panic)) => Err(ReconcileError::Panicked(panic_message(&*panic))),
                    Err(_) => Err(ReconcileError::TimedOut(timeout)),
                };
                let label = match &result {
                    Ok(_) => "ok",
                    Err(ReconcileError::Failed(_)) => "error",
                    Err(ReconcileError::Panicked(_)) => "panic",
                    Err(ReconcileError::TimedOut(_)) => "timeout",
                };
                metrics::counter!("orch_reconciles_total", "controller" => name.to_string(), "result" => label)
                    .increment(1);
                metrics::histogram!("orch_reconcile_duration_seconds", "controller" => name.to_string())
                    .record(started.elapsed().as_secs_f64());
                let action = match result {
                    Ok(action) => action,
                    Err(e) => {
                        tracing::warn!(error = %e, "reconcile failed");
                        // A panicking error policy must not strand the key in "processing".
                        std::panic::catch_unwind(AssertUnwindSafe(|| controller.error_policy(&obj, &e, &ctx)))
                            .unwrap_or(Action::Retry)
                    }
                };
                queue.done(&key);
                match action {
                    Action::Done => queue.forget(&key),
                    Action::RequeueAfter(d) => {
                        queue.forget(&key);
                        queue.add_after(key, d);
                    }
                    Action::Retry => {
                        metrics::counter!("orch_reconcile_retries_total", "controller" => name.to_string())
                            .increment(1);
                        queue.add_backoff(key);
                    }
                }
            }
            .instrument(span),
        );
    }
    // Graceful shutdown: take no new work, let what is running finish.
    queue.shut_down();
    while in_flight.join_next().await.is_some() {}
    feeders.shutdown().await;
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_string())
}
