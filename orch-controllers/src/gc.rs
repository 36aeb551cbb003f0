//! The garbage collector: deletes objects whose owners are gone, following owner references
//! across the kinds it is given.
//!
//! - **Background** (a plain delete of the owner): once the owner is gone, each object whose
//!   every owner is gone is deleted; an object with some owners left only loses the references
//!   to the missing ones.
//! - **Foreground** ([`Propagation::Foreground`]): the owner stays, marked with
//!   [`FOREGROUND_FINALIZER`], while the collector deletes its dependents (those that have
//!   dependents of their own in the foreground too); it removes the finalizer once no dependent
//!   with `blockOwnerDeletion` is left, and the store then removes the owner.
//! - **Orphan** ([`Propagation::Orphan`]): the collector removes the owner's references from its
//!   dependents, then the finalizer; the dependents stay.
//!
//! The collector keeps no state of its own that matters: at start it looks at every object of
//! its kinds, so owners that disappeared while it was down (a crash in the middle of a cascade)
//! are found too. Whether an owner exists is asked of the store, never assumed from a cache that
//! may lag, and an owner uid found missing is remembered (uids are never reused).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use orch_core::cache::{CacheEvent, CacheRegistry};
use orch_core::controller::queue::{QueueConfig, WorkQueue};
use orch_core::error::Error;
use orch_core::kinds::{
    DaemonSet, Deployment, EndpointSlice, Job, ReplicaSet, Service, StatefulSet, Workflow, Workload,
};
use orch_core::meta::{ObjectMeta, OwnerReference};
use orch_core::object::{ObjectKey, Resource};
use orch_core::runnable::{Leadership, RunParts, Runnable, stopped};
use orch_core::store::{
    DeleteOptions, DeleteOutcome, FOREGROUND_FINALIZER, Guard, ORPHAN_FINALIZER, Propagation, Store, WriteOptions,
};

/// The garbage collector (add it to a [`Manager`](orch_core::Manager)).
pub struct GarbageCollector {
    kinds: Vec<Arc<dyn Kind>>,
    concurrency: usize,
}

impl std::fmt::Debug for GarbageCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<&str> = self.kinds.iter().map(|k| k.name()).collect();
        f.debug_struct("GarbageCollector").field("kinds", &kinds).finish()
    }
}

impl Default for GarbageCollector {
    fn default() -> Self {
        GarbageCollector::new()
    }
}

impl GarbageCollector {
    /// A collector of no kinds yet (add them with [`kind`](GarbageCollector::kind)); 64 objects
    /// handled at once.
    pub fn new() -> Self {
        GarbageCollector { kinds: Vec::new(), concurrency: 64 }
    }

    /// A collector of the built-in kinds that own or are owned: deployments, replica sets, daemon
    /// sets, stateful sets, jobs, workflows, workloads, services and endpoint slices.
    pub fn builtin() -> Self {
        GarbageCollector::new()
            .kind::<Deployment>()
            .kind::<ReplicaSet>()
            .kind::<DaemonSet>()
            .kind::<StatefulSet>()
            .kind::<Job>()
            .kind::<Workflow>()
            .kind::<Workload>()
            .kind::<Service>()
            .kind::<EndpointSlice>()
    }

    /// Also collects objects of kind `K` (and finds their dependents among the other kinds).
    pub fn kind<K: Resource>(mut self) -> Self {
        if !self.kinds.iter().any(|k| k.name() == K::KIND) {
            self.kinds.push(Arc::new(Typed::<K>(std::marker::PhantomData)));
        }
        self
    }

    /// At most `n` objects handled at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
}

/// An object as a cache holds it, seen through its metadata only (shared, never copied).
trait Meta: Send + Sync {
    fn meta(&self) -> &ObjectMeta;
}

impl<K: Resource> Meta for orch_core::Object<K> {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

/// What the collector needs of an object: its kind and metadata.
#[derive(Clone)]
struct Seen {
    kind: &'static str,
    obj: Arc<dyn Meta>,
}

impl Seen {
    fn meta(&self) -> &ObjectMeta {
        self.obj.meta()
    }

    fn key(&self) -> ObjectKey {
        let m = self.meta();
        ObjectKey::new(self.kind, m.namespace.clone(), m.name.clone())
    }
}

enum Change {
    Applied(Seen),
    Deleted(Seen),
}

/// One kind the collector knows (bound to its shared cache when the collector runs).
trait Kind: Send + Sync {
    fn name(&self) -> &'static str;
    fn start(&self, caches: &CacheRegistry, store: &Arc<dyn Store>);
    fn bind(&self, caches: &CacheRegistry, store: &Arc<dyn Store>) -> Box<dyn Bound>;
}

/// One kind, seen through its shared cache.
trait Bound: Send + Sync {
    fn all(&self) -> Vec<Seen>;
    fn owned_by(&self, uid: &str) -> Vec<Seen>;
    /// Subscribes at once, and returns the future that forwards every change until the
    /// receiver is gone.
    fn feed(&self, tx: mpsc::UnboundedSender<Change>) -> BoxFuture<'static, ()>;
    /// Resolves once the kind's cache holds everything.
    fn ready(&self) -> BoxFuture<'static, ()>;
}

struct Typed<K>(std::marker::PhantomData<fn() -> K>);

fn seen<K: Resource>(o: Arc<orch_core::Object<K>>) -> Seen {
    Seen { kind: K::KIND, obj: o }
}

impl<K: Resource> Kind for Typed<K> {
    fn name(&self) -> &'static str {
        K::KIND
    }
    fn start(&self, caches: &CacheRegistry, store: &Arc<dyn Store>) {
        caches.get_or_start::<K>(store);
    }
    fn bind(&self, caches: &CacheRegistry, store: &Arc<dyn Store>) -> Box<dyn Bound> {
        Box::new(caches.get_or_start::<K>(store))
    }
}

impl<K: Resource> Bound for orch_core::Cache<K> {
    fn all(&self) -> Vec<Seen> {
        self.list().into_iter().map(seen).collect()
    }
    fn owned_by(&self, uid: &str) -> Vec<Seen> {
        orch_core::Cache::owned_by(self, uid).into_iter().map(seen).collect()
    }
    fn feed(&self, tx: mpsc::UnboundedSender<Change>) -> BoxFuture<'static, ()> {
        let mut events = self.subscribe();
        async move {
            while let Some(e) = events.recv().await {
                let change = match e {
                    CacheEvent::Applied(o) => Change::Applied(seen(o)),
                    CacheEvent::Deleted(o) => Change::Deleted(seen(o)),
                };
                if tx.send(change).is_err() {
                    return;
                }
            }
        }
        .boxed()
    }
    fn ready(&self) -> BoxFuture<'static, ()> {
        let cache = self.clone();
        async move { cache.ready().await }.boxed()
    }
}

fn holds_gc_finalizer(meta: &ObjectMeta) -> bool {
    meta.is_being_deleted() && meta.finalizers.iter().any(|f| f == FOREGROUND_FINALIZER || f == ORPHAN_FINALIZER)
}

/// Where the collector acts from: the store, its kinds' caches, what it knows is gone.
struct Shared {
    store: Arc<dyn Store>,
    kinds: Vec<Box<dyn Bound>>,
    /// Uids known to be gone for good (uids are never reused): owners found missing, and
    /// objects the store said it removed, which the caches may still show for a while.
    gone: Mutex<HashSet<String>>,
}

/// What to do with a key after handling it.
enum Next {
    Done,
    Again(Duration),
}

impl Shared {
    fn is_gone(&self, uid: &str) -> bool {
        self.gone.lock().unwrap_or_else(|e| e.into_inner()).contains(uid)
    }

    fn mark_gone(&self, uid: &str) {
        let mut gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        if !gone.contains(uid) {
            gone.insert(uid.to_string());
        }
    }

    /// How a collected object goes: in the foreground when it owns something (its dependents
    /// go first), else in the background.
    fn propagation(&self, uid: &str) -> Propagation {
        let owns = self
            .kinds
            .iter()
            .any(|k| k.owned_by(uid).iter().any(|d| d.meta().owner_references.iter().any(|o| o.uid == uid)));
        if owns && !self.dependents(uid).is_empty() { Propagation::Foreground } else { Propagation::Background }
    }

    /// The cached objects that name `uid` among their owners, except those known to be gone.
    fn dependents(&self, uid: &str) -> Vec<Seen> {
        let mut out = Vec::new();
        for k in &self.kinds {
            out.extend(k.owned_by(uid).into_iter().filter(|d| d.meta().owner_references.iter().any(|o| o.uid == uid)));
        }
        if !out.is_empty() {
            let gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
            out.retain(|d| !gone.contains(&d.meta().uid));
        }
        out
    }

    /// Whether the owner a reference names still exists (as that very object), and whether it
    /// is being deleted in the foreground.
    async fn owner(&self, o: &OwnerReference, namespace: &str) -> Result<Option<bool>, Error> {
        if self.is_gone(&o.uid) {
            return Ok(None);
        }
        let mut keys = vec![ObjectKey::new(o.kind.clone(), namespace, o.name.clone())];
        if !namespace.is_empty() {
            // A cluster-scoped owner.
            keys.push(ObjectKey::new(o.kind.clone(), "", o.name.clone()));
        }
        for key in keys {
            match self.store.get(&key).await {
                Ok(found) if found.metadata.uid == o.uid => {
                    let fg = found.metadata.is_being_deleted()
                        && found.metadata.finalizers.iter().any(|f| f == FOREGROUND_FINALIZER);
                    return Ok(Some(fg));
                }
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.mark_gone(&o.uid);
        Ok(None)
    }

    /// Handles one object: the cascade it is marked for, or owners it has lost.
    async fn handle(&self, key: &ObjectKey, guard: Option<Guard>) -> Result<Next, Error> {
        let obj = match self.store.get(key).await {
            Ok(o) => o,
            Err(Error::NotFound(_)) => return Ok(Next::Done),
            Err(e) => return Err(e),
        };
        let meta = &obj.metadata;
        let write = WriteOptions { guard: guard.clone() };
        if meta.is_being_deleted() {
            let foreground = meta.finalizers.iter().any(|f| f == FOREGROUND_FINALIZER);
            let orphan = meta.finalizers.iter().any(|f| f == ORPHAN_FINALIZER);
            if !foreground && !orphan {
                return Ok(Next::Done);
            }
            let dependents = self.dependents(&meta.uid);
            if orphan {
                for d in &dependents {
                    self.release(&d.key(), &meta.uid, &write).await?;
                }
            } else {
                let mut removed = HashSet::new();
                for d in dependents.iter().filter(|d| !d.meta().is_being_deleted()) {
                    // The dependent the cache holds, not another object given its name since.
                    let opts = DeleteOptions {
                        uid: Some(d.meta().uid.clone()),
                        guard: guard.clone(),
                        propagation: self.propagation(&d.meta().uid),
                        ..Default::default()
                    };
                    match self.store.delete(&d.key(), &opts).await {
                        // Nothing is left at its key: this dependent is gone, whatever the
                        // caches say yet.
                        Ok(DeleteOutcome::Deleted(_)) | Err(Error::NotFound(_)) => {
                            self.mark_gone(&d.meta().uid);
                            removed.insert(&d.meta().uid);
                        }
                        Ok(DeleteOutcome::Pending(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                let blocking = dependents.iter().any(|d| {
                    !removed.contains(&d.meta().uid)
                        && d.meta().owner_references.iter().any(|o| o.uid == meta.uid && o.block_owner_deletion)
                });
                if blocking {
                    // Each dependent's deletion brings the owner back here; this is a backstop.
                    return Ok(Next::Again(Duration::from_secs(5)));
                }
            }
            let finalizer = if orphan { ORPHAN_FINALIZER } else { FOREGROUND_FINALIZER };
            let mut next = (*obj).clone();
            next.metadata.finalizers.retain(|f| f != finalizer);
            // Without finalizers, the update is the object's removal.
            let last = next.metadata.finalizers.is_empty();
            return match self.store.update(next, &write).await {
                Ok(_) | Err(Error::NotFound(_)) => {
                    if last {
                        self.mark_gone(&meta.uid);
                    }
                    Ok(Next::Done)
                }
                Err(e) if e.is_conflict() => Ok(Next::Again(Duration::ZERO)),
                Err(e) => Err(e),
            };
        }
        if meta.owner_references.is_empty() {
            return Ok(Next::Done);
        }
        let mut missing = Vec::new();
        for o in &meta.owner_references {
            if self.owner(o, &meta.namespace).await?.is_none() {
                missing.push(o.uid.clone());
            }
        }
        if missing.is_empty() {
            return Ok(Next::Done);
        }
        if missing.len() == meta.owner_references.len() {
            // Every owner is gone: so goes the object (unless it changed meanwhile).
            let opts = DeleteOptions {
                resource_version: Some(meta.resource_version),
                uid: Some(meta.uid.clone()),
                guard,
                propagation: self.propagation(&meta.uid),
            };
            return match self.store.delete(key, &opts).await {
                Ok(DeleteOutcome::Deleted(_)) | Err(Error::NotFound(_)) => {
                    self.mark_gone(&meta.uid);
                    Ok(Next::Done)
                }
                Ok(DeleteOutcome::Pending(_)) => Ok(Next::Done),
                Err(e) if e.is_conflict() => Ok(Next::Again(Duration::ZERO)),
                Err(e) => Err(e),
            };
        }
        // Some owners are left: only the references to the missing ones go.
        let mut next = (*obj).clone();
        next.metadata.owner_references.retain(|o| !missing.contains(&o.uid));
        match self.store.update(next, &write).await {
            Ok(_) | Err(Error::NotFound(_)) => Ok(Next::Done),
            Err(e) if e.is_conflict() => Ok(Next::Again(Duration::ZERO)),
            Err(e) => Err(e),
        }
    }

    /// Removes the references to `owner_uid` from a dependent (an orphaning delete).
    async fn release(&self, key: &ObjectKey, owner_uid: &str, write: &WriteOptions) -> Result<(), Error> {
        for _ in 0..8 {
            let cur = match self.store.get(key).await {
                Ok(o) => o,
                Err(Error::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            if !cur.metadata.owner_references.iter().any(|o| o.uid == owner_uid) {
                return Ok(());
            }
            let mut next = (*cur).clone();
            next.metadata.owner_references.retain(|o| o.uid != owner_uid);
            match self.store.update(next, write).await {
                Ok(_) | Err(Error::NotFound(_)) => return Ok(()),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable { message: format!("{key} kept changing while it was released"), source: None })
    }
}

impl Runnable for GarbageCollector {
    fn name(&self) -> &str {
        "garbage-collector"
    }

    fn prepare(&mut self, caches: &CacheRegistry, store: &Arc<dyn Store>) {
        for k in &self.kinds {
            k.start(caches, store);
        }
    }

    fn run(self: Box<Self>, parts: RunParts) -> BoxFuture<'static, ()> {
        run(*self, parts).boxed()
    }
}

/// A cheap summary of an object's owners and cascade state: a change of it is worth a look.
fn fingerprint(meta: &ObjectMeta) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for o in &meta.owner_references {
        o.uid.hash(&mut h);
    }
    holds_gc_finalizer(meta).hash(&mut h);
    h.finish()
}

async fn run(gc: GarbageCollector, parts: RunParts) {
    let RunParts { store, caches, mut leader, mut shutdown, .. } = parts;
    let kinds = gc.kinds.iter().map(|k| k.bind(&caches, &store)).collect();
    let shared = Arc::new(Shared { store, kinds, gone: Mutex::new(HashSet::new()) });
    let (tx, rx) = mpsc::unbounded_channel();
    let mut feeders = JoinSet::new();
    for k in &shared.kinds {
        feeders.spawn(k.feed(tx.clone()));
    }
    drop(tx);
    for k in &shared.kinds {
        k.ready().await;
    }
    let queue: WorkQueue<ObjectKey> = WorkQueue::with_metrics(QueueConfig::default(), "garbage-collector");
    // Everything there is, once: owners that vanished while no collector ran are found here.
    let mut fingerprints: HashMap<String, u64> = HashMap::new();
    for k in &shared.kinds {
        for s in k.all() {
            let meta = s.meta();
            if !meta.owner_references.is_empty() || holds_gc_finalizer(meta) {
                queue.add(s.key());
            }
            fingerprints.insert(meta.uid.clone(), fingerprint(meta));
        }
    }
    let changes = tokio::spawn(follow(rx, shared.clone(), queue.clone(), fingerprints));
    let permits = Arc::new(Semaphore::new(gc.concurrency));
    let mut in_flight = JoinSet::new();
    loop {
        let current = leader.borrow_and_update().clone();
        let guard = match current {
            Leadership::Leading(g) => g,
            Leadership::Standby => {
                tokio::select! {
                    changed = leader.changed() => if changed.is_err() { break } else { continue },
                    _ = stopped(&mut shutdown) => break,
                }
            }
        };
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
        let (shared, queue) = (shared.clone(), queue.clone());
        in_flight.spawn(async move {
            let _permit = permit;
            let result = shared.handle(&key, guard).await;
            queue.done(&key);
            match result {
                Ok(Next::Done) => queue.forget(&key),
                Ok(Next::Again(d)) => {
                    queue.forget(&key);
                    queue.add_after(key, d);
                }
                Err(e) => {
                    tracing::warn!(object = %key, error = %e, "garbage collection failed; retrying");
                    queue.add_backoff(key);
                }
            }
        });
    }
    queue.shut_down();
    changes.abort();
    while in_flight.join_next().await.is_some() {}
    feeders.shutdown().await;
}

/// Turns the caches' changes into keys to look at.
async fn follow(
    mut rx: mpsc::UnboundedReceiver<Change>,
    shared: Arc<Shared>,
    queue: WorkQueue<ObjectKey>,
    mut fingerprints: HashMap<String, u64>,
) {
    while let Some(change) = rx.recv().await {
        match change {
            Change::Applied(s) => {
                let meta = s.meta();
                let f = fingerprint(meta);
                let before = fingerprints.insert(meta.uid.clone(), f);
                let worth = holds_gc_finalizer(meta) || !meta.owner_references.is_empty();
                if worth && before != Some(f) {
                    queue.add(s.key());
                }
            }
            Change::Deleted(s) => {
                let meta = s.meta();
                fingerprints.remove(&meta.uid);
                shared.mark_gone(&meta.uid);
                for d in shared.dependents(&meta.uid) {
                    queue.add(d.key());
                }
                // An owner waiting in the foreground looks again (one known to be gone has
                // nothing left to wait for).
                for o in meta.owner_references.iter().filter(|o| !shared.is_gone(&o.uid)) {
                    queue.add(ObjectKey::new(o.kind.clone(), meta.namespace.clone(), o.name.clone()));
                    if !meta.namespace.is_empty() {
                        queue.add(ObjectKey::new(o.kind.clone(), "", o.name.clone()));
                    }
                }
            }
        }
    }
}
