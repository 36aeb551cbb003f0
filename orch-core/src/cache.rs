//! Caches: an in-memory, indexed, always-current copy of one kind, kept by list + watch.
//!
//! A [`Cache<K>`] is a read handle: controllers and schedulers read from it and subscribe to its
//! changes, but only its reflector task writes to it. Objects are held as `Arc`s, decoded once,
//! and shared by every reader in the process.
//!
//! The reflector lists (in pages, all at one revision), then watches from the next revision. A
//! broken watch resumes from the last revision seen; `Compacted` makes it list again, and the new
//! list replaces the contents with a diff, so an object deleted during the gap is dropped (never
//! resurrected) and every change is announced once.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use std::any::{Any, TypeId};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::backoff::{Attempts, Backoff};
use crate::error::{Error, Result};
use crate::object::{DynamicObject, Object, Resource};
use crate::store::{ListRequest, Selection, Store, WatchEvent, WatchRequest};

/// Namespace and name of a cached object (the kind is the cache's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectRef {
    /// A reference from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef { namespace: namespace.into(), name: name.into() }
    }

    /// The reference of an object.
    pub fn of<K: Resource>(obj: &Object<K>) -> Self {
        ObjectRef::new(&obj.metadata.namespace, &obj.metadata.name)
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() { f.write_str(&self.name) } else { write!(f, "{}/{}", self.namespace, self.name) }
    }
}

pub use crate::object::Indexer;

/// Name of the built-in index of labels; values are `key=value`.
pub const LABEL_INDEX: &str = "label";
/// Name of the built-in index of owners; values are owner uids.
pub const OWNER_INDEX: &str = "owner";
/// Name of the index of workloads by the node they are bound to; values are node names.
pub const NODE_INDEX: &str = "node";
/// Name of the index of workloads by the volume claims they use; values are
/// `<namespace>/<claim>`.
pub const CLAIM_INDEX: &str = "claim";

/// A change to a cache, as its subscribers see it.
#[derive(Debug, Clone)]
pub enum CacheEvent<K: Resource> {
    /// Added or changed; the new state.
    Applied(Arc<Object<K>>),
    /// Gone; its last known state.
    Deleted(Arc<Object<K>>),
}

impl<K: Resource> CacheEvent<K> {
    /// The object the event is about.
    pub fn object(&self) -> &Arc<Object<K>> {
        match self {
            CacheEvent::Applied(o) | CacheEvent::Deleted(o) => o,
        }
    }
}

/// How a cache is built.
pub struct CacheConfig<K: Resource> {
    /// Which objects (kind is set from `K`).
    pub selection: Selection,
    /// Extra indexes by name (the label and owner indexes always exist).
    pub indexers: Vec<(String, Indexer<K>)>,
    /// Page size of the initial and recovery lists.
    pub page_size: usize,
    /// First retry delay after a store error; doubles up to `max_backoff`, with full jitter.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl<K: Resource> Default for CacheConfig<K> {
    fn default() -> Self {
        CacheConfig {
            selection: Selection::kind(K::KIND),
            indexers: Vec::new(),
            page_size: 500,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl<K: Resource> CacheConfig<K> {
    /// Adds an index (builder style).
    pub fn index(
        mut self,
        name: impl Into<String>,
        indexer: impl Fn(&Object<K>) -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.indexers.push((name.into(), Arc::new(indexer)));
        self
    }
}

type Index = HashMap<String, HashSet<Arc<ObjectRef>>>;
type Subscriber<K> = mpsc::UnboundedSender<CacheEvent<K>>;
/// Index value → the subscribers to it.
type KeyedSubscribers<K> = HashMap<String, Vec<Subscriber<K>>>;
/// A change and the object's state before it, if it had one.
type Change<K> = (CacheEvent<K>, Option<Arc<Object<K>>>);

struct State<K: Resource> {
    objects: HashMap<Arc<ObjectRef>, Arc<Object<K>>>,
    indexes: HashMap<String, Index>,
    /// Highest revision seen.
    revision: u64,
    /// Every event up to here has been applied: a broken watch resumes after it (a revision's
    /// events may have been cut off halfway).
    complete: u64,
}

struct Shared<K: Resource> {
    state: RwLock<State<K>>,
    indexers: Vec<(String, Indexer<K>)>,
    ready: watch::Sender<bool>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<CacheEvent<K>>>>,
    /// Subscribers to the objects with one index value: index → value → senders.
    keyed: Mutex<HashMap<String, KeyedSubscribers<K>>>,
    decode_errors: std::sync::atomic::AtomicU64,
    /// Full lists taken (the first one, and one after every `Compacted`).
    lists: std::sync::atomic::AtomicU64,
}

/// A read handle on a cache of kind `K`. Clones share the same cache.
pub struct Cache<K: Resource> {
    shared: Arc<Shared<K>>,
}

impl<K: Resource> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Cache { shared: self.shared.clone() }
    }
}

impl<K: Resource> fmt::Debug for Cache<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache").field("kind", &K::KIND).field("objects", &self.len()).finish()
    }
}

fn label_values<K: Resource>(o: &Object<K>) -> Vec<String> {
    o.metadata.labels.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn owner_values<K: Resource>(o: &Object<K>) -> Vec<String> {
    o.metadata.owner_references.iter().map(|r| r.uid.clone()).collect()
}

impl<K: Resource> Cache<K> {
    /// Starts a cache: spawns its reflector on the current tokio runtime and returns the read
    /// handle at once. Wait for [`ready`](Cache::ready) before trusting a miss.
    ///
    /// # Panics
    /// Outside a tokio runtime (it must spawn its reflector somewhere).
    pub fn spawn(store: Arc<dyn Store>, config: CacheConfig<K>) -> Self {
        let cache = Self::detached(&config);
        let writer = cache.clone();
        tokio::spawn(reflect(store, config, writer));
        cache
    }

    /// The empty cache and its indexes, before a reflector is attached.
    fn detached(config: &CacheConfig<K>) -> Self {
        let mut indexers: Vec<(String, Indexer<K>)> =
            vec![(LABEL_INDEX.into(), Arc::new(label_values::<K>)), (OWNER_INDEX.into(), Arc::new(owner_values::<K>))];
        indexers.extend(K::indexers());
        indexers.extend(config.indexers.iter().cloned());
        let indexes = indexers.iter().map(|(n, _)| (n.clone(), Index::new())).collect();
        Cache {
            shared: Arc::new(Shared {
                state: RwLock::new(State { objects: HashMap::new(), indexes, revision: 0, complete: 0 }),
                indexers,
                ready: watch::channel(false).0,
                subscribers: Mutex::new(Vec::new()),
                keyed: Mutex::new(HashMap::new()),
                decode_errors: Default::default(),
                lists: Default::default(),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State<K>> {
        self.shared.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State<K>> {
        self.shared.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// One object.
    pub fn get(&self, r: &ObjectRef) -> Option<Arc<Object<K>>> {
        self.read().objects.get(r).cloned()
    }

    /// Every object (in no particular order).
    pub fn list(&self) -> Vec<Arc<Object<K>>> {
        self.read().objects.values().cloned().collect()
    }

    /// The objects whose index `index` has `value` (e.g. `("label", "app=web")`).
    pub fn by_index(&self, index: &str, value: &str) -> Vec<Arc<Object<K>>> {
        let st = self.read();
        let Some(refs) = st.indexes.get(index).and_then(|i| i.get(value)) else { return Vec::new() };
        refs.iter().filter_map(|r| st.objects.get(r).cloned()).collect()
    }

    /// The objects owned by the object with this uid.
    pub fn owned_by(&self, owner_uid: &str) -> Vec<Arc<Object<K>>> {
        self.by_index(OWNER_INDEX, owner_uid)
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The store revision the cache reflects.
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// Objects of this kind that could not be decoded (skipped, with a warning).
    pub fn decode_errors(&self) -> u64 {
        self.shared.decode_errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Full lists the cache has taken: 1 once ready, one more each time its watch fell so far
    /// behind that the store had compacted the events it still needed (a re-list decodes every
    /// object again; a cache that keeps up never needs one).
    pub fn lists(&self) -> u64 {
        self.shared.lists.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True once the first list is in.
    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Waits until the first list is in.
    pub async fn ready(&self) {
        let mut rx = self.shared.ready.subscribe();
        // The sender lives as long as this handle, so this cannot fail while we wait.
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Every later change, in order. Subscribe before reading the current contents to miss
    /// nothing. The channel is unbounded: a cache never waits for a slow subscriber.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<CacheEvent<K>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    /// Changes to the objects whose index `index` has `value`, before or after the change (a
    /// workload moved off a node is news to that node). This is how a thousand agents share one
    /// cache: each hears about its own node only, at the cost of one lookup per change.
    pub fn subscribe_index(&self, index: &str, value: &str) -> mpsc::UnboundedReceiver<CacheEvent<K>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .keyed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(index.to_string())
            .or_default()
            .entry(value.to_string())
            .or_default()
            .push(tx);
        rx
    }

    /// Sends each change (with the object's previous state, if any) to its subscribers.
    fn announce(&self, events: Vec<Change<K>>) {
        if events.is_empty() {
            return;
        }
        let mut subs = self.shared.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|tx| events.iter().all(|(e, _)| tx.send(e.clone()).is_ok()));
        drop(subs);
        let mut keyed = self.shared.keyed.lock().unwrap_or_else(|e| e.into_inner());
        if keyed.is_empty() {
            return;
        }
        let mut targets: Vec<String> = Vec::new();
        for (event, old) in &events {
            for (name, indexer) in &self.shared.indexers {
                let Some(by_value) = keyed.get_mut(name) else { continue };
                targets.clear();
                for obj in std::iter::once(event.object()).chain(old.iter()) {
                    for value in indexer(obj) {
                        if !targets.contains(&value) {
                            targets.push(value);
                        }
                    }
                }
                for value in &targets {
                    if let Some(senders) = by_value.get_mut(value) {
                        senders.retain(|tx| tx.send(event.clone()).is_ok());
                        if senders.is_empty() {
                            by_value.remove(value);
                        }
                    }
                }
            }
        }
        keyed.retain(|_, by_value| !by_value.is_empty());
    }

    fn decode(&self, obj: &DynamicObject) -> Option<Object<K>> {
        self.decode_after(obj, None)
    }

    /// Decodes `obj`, the next version of `prev`: the same object (uid) at the same generation
    /// has the same spec (stores bump the generation on every spec change), so the decoded spec
    /// is reused and only metadata and status are read. Status writes, the most frequent
    /// writes, cost half the decoding.
    fn decode_after(&self, obj: &DynamicObject, prev: Option<&Object<K>>) -> Option<Object<K>> {
        let decoded = match prev.filter(|p| {
            p.metadata.uid == obj.metadata.uid
                && p.metadata.generation == obj.metadata.generation
                && obj.kind == K::KIND
        }) {
            Some(p) => {
                let status = if obj.status.is_null() {
                    Ok(K::Status::default())
                } else {
                    obj.status.decode().map_err(|e| e.within(obj.key(), "status"))
                };
                status.map_err(Error::from).map(|status| Object {
                    metadata: obj.metadata.clone(),
                    spec: p.spec.clone(),
                    status,
                })
            }
            None => Object::<K>::from_dynamic(obj),
        };
        match decoded {
            Ok(o) => Some(o),
            Err(e) => {
                self.shared.decode_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(kind = K::KIND, object = %obj.key(), error = %e, "skipping an object that does not decode");
                None
            }
        }
    }

    /// Replaces the contents with a full list taken at `revision`, announcing the difference.
    fn replace(&self, items: Vec<Arc<Object<K>>>, revision: u64) {
        let mut events = Vec::new();
        {
            let mut st = self.write();
            let gone: Vec<Arc<ObjectRef>> = {
                let seen: HashSet<(&str, &str)> =
                    items.iter().map(|o| (o.metadata.namespace.as_str(), o.metadata.name.as_str())).collect();
                st.objects
                    .keys()
                    .filter(|r| !seen.contains(&(r.namespace.as_str(), r.name.as_str())))
                    .cloned()
                    .collect()
            };
            for obj in items {
                let r = ObjectRef::of(&obj);
                let unchanged = st
                    .objects
                    .get(&r)
                    .is_some_and(|cur| cur.metadata.resource_version == obj.metadata.resource_version);
                if !unchanged {
                    let old = self.put(&mut st, r, obj.clone());
                    events.push((CacheEvent::Applied(obj), old));
                }
            }
            for r in gone {
                if let Some(old) = self.remove(&mut st, &r) {
                    events.push((CacheEvent::Deleted(old), None));
                }
            }
            st.revision = revision;
            st.complete = revision;
        }
        self.shared.lists.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.announce(events);
        self.shared.ready.send_replace(true);
    }

    /// Applies one watch event. Replayed events (after a resume) change nothing and are not
    /// announced again.
    fn apply(&self, event: &WatchEvent) {
        let mut st = self.write();
        if let Some(o) = event.object() {
            let rev = o.metadata.resource_version;
            // A higher revision means every event of the previous one has arrived.
            if rev > st.revision {
                st.complete = st.revision;
                st.revision = rev;
            }
        }
        let announce = match event {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                let r = ObjectRef::new(&o.metadata.namespace, &o.metadata.name);
                let cur = st.objects.get(&r);
                let same = cur.is_some_and(|c| c.metadata.resource_version == o.metadata.resource_version);
                if same {
                    None
                } else {
                    match self.decode_after(o, cur.map(|c| &**c)) {
                        Some(obj) => {
                            let obj = Arc::new(obj);
                            let old = self.put(&mut st, r, obj.clone());
                            Some((CacheEvent::Applied(obj), old))
                        }
                        // An undecodable new version must not leave the old one looking current;
                        // a re-list would drop it too.
                        None => self.remove(&mut st, &r).map(|old| (CacheEvent::Deleted(old), None)),
                    }
                }
            }
            WatchEvent::Deleted(o) => {
                let r = ObjectRef::new(&o.metadata.namespace, &o.metadata.name);
                self.remove(&mut st, &r).map(|old| {
                    // A deletion keeps the generation, so the cached spec is the last one: a
                    // collected tree decodes metadata only, not a spec per object.
                    let last = self.decode_after(o, Some(&old)).map(Arc::new).unwrap_or_else(|| old.clone());
                    (CacheEvent::Deleted(last), Some(old))
                })
            }
            WatchEvent::Progress(r) => {
                st.revision = st.revision.max(*r);
                st.complete = st.complete.max(*r);
                None
            }
        };
        drop(st);
        if let Some(e) = announce {
            self.announce(vec![e]);
        }
    }

    /// Where a resumed watch starts: after the last revision known to be complete.
    fn resume_from(&self) -> u64 {
        self.read().complete + 1
    }

    /// Stores `obj`, returning what it replaced.
    fn put(&self, st: &mut State<K>, r: ObjectRef, obj: Arc<Object<K>>) -> Option<Arc<Object<K>>> {
        let old = self.remove(st, &r);
        let key = Arc::new(r);
        for (name, indexer) in &self.shared.indexers {
            let index = st.indexes.get_mut(name).expect("every indexer has an index");
            for value in indexer(&obj) {
                index.entry(value).or_default().insert(key.clone());
            }
        }
        st.objects.insert(key, obj);
        old
    }

    fn remove(&self, st: &mut State<K>, r: &ObjectRef) -> Option<Arc<Object<K>>> {
        let (key, old) = st.objects.remove_entry(r)?;
        for (name, indexer) in &self.shared.indexers {
            let index = st.indexes.get_mut(name).expect("every indexer has an index");
            for value in indexer(&old) {
                if let Some(set) = index.get_mut(&value) {
                    set.remove(&*key);
                    if set.is_empty() {
                        index.remove(&value);
                    }
                }
            }
        }
        Some(old)
    }
}

/// Lists every page of a selection at one revision.
async fn list_all<K: Resource>(
    store: &dyn Store,
    selection: &Selection,
    page_size: usize,
    cache: &Cache<K>,
) -> Result<(Vec<Arc<Object<K>>>, u64)> {
    let mut req = ListRequest::new(selection.clone()).limit(page_size.max(1));
    let mut items = Vec::new();
    loop {
        let page = store.list(&req).await?;
        items.reserve(page.items.len());
        items.extend(page.items.iter().filter_map(|o| cache.decode(o).map(Arc::new)));
        match page.continue_token {
            Some(token) => req.continue_token = Some(token),
            None => return Ok((items, page.revision)),
        }
    }
}

/// The reflector: keeps `cache` equal to the store's objects of its selection until every read
/// handle is gone.
async fn reflect<K: Resource>(store: Arc<dyn Store>, config: CacheConfig<K>, cache: Cache<K>) {
    let mut selection = config.selection.clone();
    selection.kind = K::KIND.to_string();
    // Every cache of a process reconnects after the same store outage: jitter spreads them.
    let mut retries = Attempts::new(Backoff::new(config.min_backoff, config.max_backoff).full_jitter());
    let mut need_list = true;
    loop {
        // Stop once nobody but this task holds the cache.
        if Arc::strong_count(&cache.shared) == 1 {
            return;
        }
        if need_list {
            match list_all(&*store, &selection, config.page_size, &cache).await {
                Ok((items, revision)) => {
                    cache.replace(items, revision);
                    need_list = false;
                    retries.succeed();
                }
                Err(e) => {
                    tracing::warn!(kind = K::KIND, error = %e, "list failed; retrying");
                    tokio::time::sleep(retries.fail()).await;
                    continue;
                }
            }
        }
        let from = cache.resume_from();
        let req = WatchRequest {
            selection: selection.clone(),
            from_revision: Some(from),
            progress_interval: Some(Duration::from_secs(10)),
        };
        let mut stream = match store.watch(&req).await {
            Ok(s) => s,
            Err(Error::Compacted { .. }) => {
                need_list = true;
                continue;
            }
            Err(e) => {
                tracing::warn!(kind = K::KIND, error = %e, "watch failed; retrying");
                tokio::time::sleep(retries.fail()).await;
                continue;
            }
        };
        // Whether anyone still reads the cache is checked every 30 s, events or not.
        let check = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(check);
        'watching: loop {
            let mut next = tokio::select! {
                next = stream.next() => next,
                _ = &mut check => {
                    if Arc::strong_count(&cache.shared) == 1 { return; }
                    check.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(30));
                    continue;
                }
            };
            // Every event the stream already holds is applied in this turn. Taking one per turn
            // spends tokio's cooperative budget on every event, and among thousands of busy
            // tasks on one thread the cache would fall behind its store until the events it
            // needs are compacted and it must list everything again.
            let mut taken = 0;
            loop {
                match next {
                    Some(Ok(event)) => {
                        cache.apply(&event);
                        retries.succeed();
                    }
                    Some(Err(Error::Compacted { .. })) => {
                        need_list = true;
                        break 'watching;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(kind = K::KIND, error = %e, "watch broke; resuming");
                        tokio::time::sleep(retries.fail()).await;
                        break 'watching;
                    }
                    None => {
                        tokio::time::sleep(retries.fail()).await;
                        break 'watching;
                    }
                }
                taken += 1;
                if taken == DRAIN_PER_TURN {
                    tokio::task::yield_now().await;
                    break;
                }
                match stream.next().now_or_never() {
                    Some(more) => next = more,
                    None => break,
                }
            }
        }
    }
}

/// Events a reflector applies in one turn at most, so that other tasks on its thread still run.
const DRAIN_PER_TURN: usize = 4096;

/// One cache per kind, shared by everything in a manager (controllers, the scheduler, your own
/// components): a kind is listed and watched once per process, however many read it.
#[derive(Clone, Default)]
pub struct CacheRegistry {
    caches: Arc<Mutex<HashMap<TypeId, Registered>>>,
}

struct Registered {
    cache: Box<dyn Any + Send + Sync>,
    ready: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
    objects: Box<dyn Fn() -> usize + Send + Sync>,
    kind: &'static str,
}

impl Registered {
    fn new<K: Resource>(cache: Cache<K>) -> Self {
        let (c1, c2) = (cache.clone(), cache.clone());
        Registered {
            cache: Box::new(cache),
            ready: Box::new(move || {
                let c = c1.clone();
                async move { c.ready().await }.boxed()
            }),
            objects: Box::new(move || c2.len()),
            kind: K::KIND,
        }
    }
}

impl CacheRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TypeId, Registered>> {
        self.caches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cache of `K`, if one is registered.
    pub fn get<K: Resource>(&self) -> Option<Cache<K>> {
        self.lock().get(&TypeId::of::<K>()).and_then(|r| r.cache.downcast_ref::<Cache<K>>()).cloned()
    }

    /// The cache of `K`, started on first use.
    pub fn get_or_start<K: Resource>(&self, store: &Arc<dyn Store>) -> Cache<K> {
        self.lock()
            .entry(TypeId::of::<K>())
            .or_insert_with(|| Registered::new(Cache::<K>::spawn(store.clone(), CacheConfig::default())))
            .cache
            .downcast_ref::<Cache<K>>()
            .expect("registered under its own type id")
            .clone()
    }

    /// Registers a cache built with a custom config (the first registration of a kind wins).
    pub fn insert<K: Resource>(&self, cache: Cache<K>) -> Cache<K> {
        self.lock()
            .entry(TypeId::of::<K>())
            .or_insert_with(|| Registered::new(cache))
            .cache
            .downcast_ref::<Cache<K>>()
            .expect("registered under its own type id")
            .clone()
    }

    /// Futures that finish when each registered cache has its first list.
    pub fn ready_futures(&self) -> Vec<BoxFuture<'static, ()>> {
        self.lock().values().map(|r| (r.ready)()).collect()
    }

    /// Objects per cached kind, for metrics.
    pub fn sizes(&self) -> Vec<(&'static str, usize)> {
        self.lock().values().map(|r| (r.kind, (r.objects)())).collect()
    }
}

impl std::fmt::Debug for CacheRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<&'static str> = self.lock().values().map(|r| r.kind).collect();
        f.debug_struct("CacheRegistry").field("kinds", &kinds).finish()
    }
}
