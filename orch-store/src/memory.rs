//! [`MemoryStore`]: the in-memory backend. Fast, many concurrent readers, bounded history, and
//! watchers that read the shared history themselves so a slow one never holds up a writer.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::ops::Bound;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use std::hash::BuildHasher;

use async_trait::async_trait;
use futures::StreamExt;
use hashbrown::{DefaultHashBuilder, HashTable};
use orch_core::store::semantics::{self, Plan};
use orch_core::store::{decode_continue, encode_continue};
use orch_core::{
    Clock, DeleteOptions, DeleteOutcome, DynamicObject, Error, Guard, Labels, LeaseId, LeaseInfo, ListRequest,
    ListResponse, ObjectKey, Requirement, Result, Selection, Store, SystemClock, WatchEvent, WatchRequest, WatchStream,
    WriteOptions,
};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Events a watcher takes from the history in one go, so it holds the read lock only briefly.
const WATCH_BATCH: usize = 1024;

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    history_limit: usize,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder { history_limit: 100_000, clock: Arc::new(SystemClock) }
    }
}

impl MemoryStoreBuilder {
    /// Keep at most this many events of history (default 100,000). Older events are compacted
    /// away: a watcher or a paged list that needs them gets `Compacted`.
    pub fn history_limit(mut self, events: usize) -> Self {
        self.history_limit = events.max(1);
        self
    }

    /// The clock for creation and deletion timestamps (default: the system clock). Use
    /// `TokioClock` to make them follow a paused runtime's virtual time.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the store. Inside a tokio runtime, a background task expires leases on time;
    /// without one, leases expire at the next write or lease call after their deadline.
    pub fn build(self) -> MemoryStore {
        let store = self.build_index();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let inner = &store.inner;
            handle.spawn(expire_leases(Arc::downgrade(inner), inner.lease_changed.clone()));
        }
        store
    }

    /// Builds the store without its lease expiry task: an index whose writes a durable backend
    /// decides and stamps itself, then records with [`State::record`] once they are committed.
    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    pub(crate) fn build_index(self) -> MemoryStore {
        let (rev_tx, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            state: RwLock::new(State {
                revision: 0,
                floor: 1,
                objects: hashbrown::HashMap::new(),
                by_key: HashTable::new(),
                hasher: DefaultHashBuilder::default(),
                labels: hashbrown::HashMap::new(),
                history: VecDeque::new(),
                popped: 0,
                leases: HashMap::new(),
                deadlines: std::collections::BTreeSet::new(),
                next_lease: 1,
            }),
            rev_tx,
            lease_changed: Arc::new(Notify::new()),
            clock: self.clock,
            history_limit: self.history_limit,
        });
        MemoryStore { inner }
    }
}

/// A [`Store`] that keeps everything in memory.
///
/// All objects live in one map behind a reader-writer lock: reads run in parallel, writes are
/// short critical sections. Every write appends to a bounded history; watchers read that history
/// at their own pace, and one that falls behind its end gets `Compacted` (as with etcd) instead
/// of slowing anyone down.
#[derive(Clone)]
pub struct MemoryStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    state: RwLock<State>,
    /// Bumped after each write so idle watchers wake up.
    rev_tx: watch::Sender<u64>,
    /// Wakes the lease task when a lease is granted or renewed.
    lease_changed: Arc<Notify>,
    clock: Arc<dyn Clock>,
    pub(crate) history_limit: usize,
}

type Names = BTreeMap<String, Arc<DynamicObject>>;
type Namespaces = BTreeMap<String, Names>;
/// (label key, label value) → the objects of one kind that carry it.
type LabelIndex = hashbrown::HashMap<(String, String), KeySet>;

/// The keys of the objects that carry one label, each beside its hash (the hash `by_key` uses):
/// growing the set moves entries without hashing a key again.
#[derive(Default)]
struct KeySet(HashTable<(u64, Arc<ObjectKey>)>);

impl KeySet {
    fn insert(&mut self, hash: u64, key: Arc<ObjectKey>) {
        if let hashbrown::hash_table::Entry::Vacant(e) =
            self.0.entry(hash, |(h, k)| *h == hash && **k == *key, |(h, _)| *h)
        {
            e.insert((hash, key));
        }
    }

    /// Adds a key known not to be in the set.
    fn insert_new(&mut self, hash: u64, key: Arc<ObjectKey>) {
        self.0.insert_unique(hash, (hash, key), |(h, _)| *h);
    }

    fn remove(&mut self, hash: u64, key: &ObjectKey) {
        if let Ok(e) = self.0.find_entry(hash, |(h, k)| *h == hash && **k == *key) {
            e.remove();
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &ObjectKey> {
        self.0.iter().map(|(_, k)| &**k)
    }
}

/// Looks up a `(String, String)` index key from borrowed parts without allocating.
#[derive(Hash)]
struct PairRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(String, String)> for PairRef<'_> {
    fn equivalent(&self, key: &(String, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// Runs `add` on the set of the label `(k, v)` in `index`, making the set (and cloning the
/// label's strings) only when the label is new.
fn with_label_set(index: &mut LabelIndex, k: &str, v: &str, add: impl FnOnce(&mut KeySet)) {
    match index.get_mut(&PairRef(k, v)) {
        Some(set) => add(set),
        None => {
            let mut set = KeySet::default();
            add(&mut set);
            index.insert((k.to_string(), v.to_string()), set);
        }
    }
}

/// The key of `obj` as borrowed parts, which compare in the order of [`ObjectKey`] and hash as
/// `by_key` hashes.
pub(crate) fn key_of(obj: &DynamicObject) -> (&str, &str, &str) {
    (&obj.kind, &obj.metadata.namespace, &obj.metadata.name)
}

pub(crate) struct State {
    pub(crate) revision: u64,
    /// Oldest revision whose events are all still in `history`.
    pub(crate) floor: u64,
    /// kind → namespace → name → object: the ordered index that lists walk.
    objects: hashbrown::HashMap<String, Namespaces>,
    /// The same objects hashed by key: one probe per get instead of a walk down a B-tree whose
    /// every string comparison is a cache miss.
    by_key: HashTable<Arc<DynamicObject>>,
    hasher: DefaultHashBuilder,
    /// kind → label index, so an equality selector reads its matches instead of every object.
    labels: hashbrown::HashMap<String, LabelIndex>,
    history: VecDeque<Change>,
    /// History entries dropped from the front so far: watchers keep absolute positions, so
    /// finding their place is a subtraction, not a search.
    popped: u64,
    leases: HashMap<LeaseId, Lease>,
    /// Lease deadlines in order, so finding the due ones costs nothing until one is due. Each
    /// lease is here once, at its `queued` time, which a renewal does not move: the entry is
    /// moved to the real deadline when it comes due (so a renewal costs no reordering).
    deadlines: std::collections::BTreeSet<(Instant, LeaseId)>,
    next_lease: LeaseId,
}

pub(crate) struct Change {
    pub(crate) revision: u64,
    /// The new state, or for a delete the final state stamped with the deletion revision.
    pub(crate) object: Arc<DynamicObject>,
    /// The state before, `None` for a create.
    pub(crate) prev: Option<Arc<DynamicObject>>,
    pub(crate) deleted: bool,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    /// Where the lease sits in `deadlines` (at or before `deadline`).
    queued: Instant,
    keys: HashSet<ObjectKey>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.read();
        f.debug_struct("MemoryStore")
            .field("revision", &st.revision)
            .field("history", &st.history.len())
            .field("leases", &st.leases.len())
            .finish()
    }
}

impl MemoryStore {
    /// A store with default settings.
    pub fn new() -> Self {
        MemoryStoreBuilder::default().build()
    }

    /// Settings for a new store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// Number of objects stored (all kinds).
    pub fn len(&self) -> usize {
        self.inner.read().objects.values().flat_map(|ns| ns.values()).map(BTreeMap::len).sum()
    }

    /// True when no object is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written: every write
        // prepares its change before touching the maps.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn notify(&self, revision: u64) {
        self.rev_tx.send_modify(|r| *r = (*r).max(revision));
    }
}

impl State {
    fn hash(&self, kind: &str, namespace: &str, name: &str) -> u64 {
        self.hasher.hash_one((kind, namespace, name))
    }

    /// Every object attached to one of `leases`, with its lease.
    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    pub(crate) fn attached_to(&self, leases: &HashSet<LeaseId>) -> Vec<(LeaseId, ObjectKey)> {
        self.by_key
            .iter()
            .filter_map(|o| o.metadata.lease.filter(|id| leases.contains(id)).map(|id| (id, o.key())))
            .collect()
    }

    pub(crate) fn get(&self, key: &ObjectKey) -> Option<&Arc<DynamicObject>> {
        self.get_parts(&key.kind, &key.namespace, &key.name)
    }

    fn get_parts(&self, kind: &str, namespace: &str, name: &str) -> Option<&Arc<DynamicObject>> {
        let hash = self.hash(kind, namespace, name);
        self.by_key.find(hash, |o| o.metadata.name == name && o.metadata.namespace == namespace && o.kind == kind)
    }

    /// Moves `key` in the label index from its `old` labels to its `new` ones.
    fn reindex(&mut self, key: &ObjectKey, old: Option<&Labels>, new: Option<&Labels>) {
        let empty = Labels::new();
        let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
        if old == new {
            return;
        }
        let hash = self.hash(&key.kind, &key.namespace, &key.name);
        // The kind's name is cloned only the first time it is seen.
        let index = self.labels.entry_ref(&key.kind).or_default();
        for (k, v) in old.iter().filter(|(k, v)| new.get(k) != Some(v)) {
            if let Some(set) = index.get_mut(&PairRef(k, v)) {
                set.remove(hash, key);
                if set.is_empty() {
                    index.remove(&PairRef(k, v));
                }
            }
        }
        let mut shared: Option<Arc<ObjectKey>> = None;
        for (k, v) in new.iter().filter(|(k, v)| old.get(k) != Some(v)) {
            let entry = shared.get_or_insert_with(|| Arc::new(key.clone())).clone();
            with_label_set(index, k, v, |set| set.insert(hash, entry));
        }
    }

    /// Keys that may match `sel`'s label selector, from the index of its most selective
    /// equality or set requirement; `None` when no requirement can use the index.
    fn label_candidates(&self, sel: &Selection) -> Option<Vec<&ObjectKey>> {
        let index = self.labels.get(&sel.kind);
        let sets = |r: &Requirement| -> Option<Vec<Option<&KeySet>>> {
            match r {
                Requirement::Equals(k, v) => Some(vec![index.and_then(|i| i.get(&PairRef(k, v)))]),
                Requirement::In(k, vs) => Some(vs.iter().map(|v| index.and_then(|i| i.get(&PairRef(k, v)))).collect()),
                _ => None,
            }
        };
        let size = |s: &[Option<&KeySet>]| s.iter().flatten().map(|s| s.len()).sum::<usize>();
        let best = sel.labels.requirements().iter().filter_map(sets).min_by_key(|s| size(s))?;
        Some(best.into_iter().flatten().flat_map(KeySet::iter).collect())
    }

    /// The object a write is aimed at, after the guard and resource-version checks.
    fn current(&self, key: &ObjectKey, guard: Option<&Guard>, expected: Option<u64>) -> Result<Arc<DynamicObject>> {
        self.check_guard(guard)?;
        let cur = self.get(key).cloned().ok_or_else(|| Error::NotFound(key.clone()))?;
        match expected {
            Some(rv) if rv != cur.metadata.resource_version => {
                Err(Error::Conflict { key: key.clone(), expected: rv, current: Some(cur) })
            }
            _ => Ok(cur),
        }
    }

    fn check_guard(&self, guard: Option<&Guard>) -> Result<()> {
        if let Some(g) = guard
            && self.get(&g.key).map(|o| o.metadata.resource_version) != Some(g.resource_version)
        {
            return Err(Error::PreconditionFailed { key: g.key.clone(), expected: g.resource_version });
        }
        Ok(())
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<()> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(Error::LeaseNotFound(id)),
            _ => Ok(()),
        }
    }

    fn insert(&mut self, obj: Arc<DynamicObject>) {
        let m = &obj.metadata;
        let hash = self.hash(&obj.kind, &m.namespace, &m.name);
        let hasher = &self.hasher;
        match self.by_key.entry(
            hash,
            |o| o.kind == obj.kind && o.metadata.namespace == m.namespace && o.metadata.name == m.name,
            |o| hasher.hash_one((o.kind.as_str(), o.metadata.namespace.as_str(), o.metadata.name.as_str())),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = obj.clone(),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(obj.clone());
            }
        }
        // Kinds and namespaces are few and already there: look them up before cloning their names.
        let namespaces = self.objects.entry_ref(&obj.kind).or_default();
        if !namespaces.contains_key(&m.namespace) {
            namespaces.insert(m.namespace.clone(), Names::new());
        }
        if let Some(names) = namespaces.get_mut(&m.namespace) {
            names.insert(m.name.clone(), obj.clone());
        }
    }

    fn remove(&mut self, key: &ObjectKey) {
        let hash = self.hash(&key.kind, &key.namespace, &key.name);
        if let Ok(e) = self.by_key.find_entry(hash, |o| is_key(o, key)) {
            e.remove();
        }
        if let Some(namespaces) = self.objects.get_mut(&key.kind)
            && let Some(names) = namespaces.get_mut(&key.namespace)
        {
            names.remove(&key.name);
            if names.is_empty() {
                namespaces.remove(&key.namespace);
            }
        }
    }

    fn relink_lease(&mut self, key: &ObjectKey, old: Option<LeaseId>, new: Option<LeaseId>) {
        if old == new {
            return;
        }
        if let Some(l) = old.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.remove(key);
        }
        if let Some(l) = new.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.insert(key.clone());
        }
    }

    /// Applies a prepared write at the next revision and records it.
    fn apply(&mut self, key: &ObjectKey, prev: Option<Arc<DynamicObject>>, plan: Plan) -> Option<Arc<DynamicObject>> {
        let old_lease = prev.as_ref().and_then(|p| p.metadata.lease);
        let (mut obj, deleted) = match plan {
            Plan::Unchanged => return None,
            Plan::Put(o) => (o, false),
            Plan::Remove(o) => (o, true),
        };
        self.revision += 1;
        obj.metadata.resource_version = self.revision;
        if prev.is_none() {
            obj.metadata.create_revision = self.revision;
        }
        let obj = Arc::new(obj);
        let old_labels = prev.as_deref().map(|p| &p.metadata.labels);
        if deleted {
            self.remove(key);
            self.relink_lease(key, old_lease, None);
            self.reindex(key, old_labels, None);
        } else {
            self.insert(obj.clone());
            self.relink_lease(key, old_lease, obj.metadata.lease);
            self.reindex(key, old_labels, Some(&obj.metadata.labels));
        }
        self.history.push_back(Change { revision: self.revision, object: obj.clone(), prev, deleted });
        Some(obj)
    }

    /// Stores objects as they are, without history: how a durable backend loads its state.
    /// Into an empty index and given in key order (as a backend reads them), the maps are built
    /// in one pass each instead of with a search per object, the hashed ones beside the ordered
    /// ones on a second core.
    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    pub(crate) fn restore(&mut self, objects: Vec<Arc<DynamicObject>>) {
        if !self.by_key.is_empty() || !objects.is_sorted_by(|a, b| key_of(a) < key_of(b)) {
            for obj in objects {
                self.reindex(&obj.key(), None, Some(&obj.metadata.labels));
                self.insert(obj);
            }
            return;
        }
        let (hasher, by_key, labels) = (&self.hasher, &mut self.by_key, &mut self.labels);
        let hashed = || {
            let hash = |o: &Arc<DynamicObject>| hasher.hash_one(key_of(o));
            by_key.reserve(objects.len(), hash);
            for obj in &objects {
                let h = hash(obj);
                by_key.insert_unique(h, obj.clone(), hash);
                if obj.metadata.labels.is_empty() {
                    continue;
                }
                let index = labels.entry_ref(&obj.kind).or_default();
                let key = Arc::new(obj.key());
                for (k, v) in obj.metadata.labels.iter() {
                    with_label_set(index, k, v, |set| set.insert_new(h, key.clone()));
                }
            }
        };
        // Each (kind, namespace) is one run of the sorted list: one bulk-built map per run.
        let ordered = |maps: &mut hashbrown::HashMap<String, Namespaces>| {
            let mut rest = &objects[..];
            while let Some(first) = rest.first() {
                let run =
                    rest.partition_point(|o| o.kind == first.kind && o.metadata.namespace == first.metadata.namespace);
                let names: Names = rest[..run].iter().map(|o| (o.metadata.name.clone(), o.clone())).collect();
                maps.entry_ref(&first.kind).or_default().insert(first.metadata.namespace.clone(), names);
                rest = &rest[run..];
            }
        };
        let maps = &mut self.objects;
        std::thread::scope(|scope| {
            let hashed = scope.spawn(hashed);
            ordered(maps);
            hashed.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        });
    }

    /// Applies a change that was decided, stamped and made durable elsewhere, in revision order,
    /// and appends it to the history (or only to the history, for entries reloaded from a log).
    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    pub(crate) fn record(&mut self, change: Change, apply: bool) {
        if apply {
            let key = change.object.key();
            let old_labels = change.prev.as_deref().map(|p| &p.metadata.labels);
            if change.deleted {
                self.remove(&key);
                self.reindex(&key, old_labels, None);
            } else {
                self.insert(change.object.clone());
                self.reindex(&key, old_labels, Some(&change.object.metadata.labels));
            }
        }
        self.revision = self.revision.max(change.revision);
        self.history.push_back(change);
    }

    /// Drops history past the limit, whole revisions at a time.
    pub(crate) fn trim(&mut self, limit: usize) {
        while self.history.len() > limit {
            let Some(first) = self.history.pop_front() else { break };
            self.popped += 1;
            while self.history.front().is_some_and(|c| c.revision == first.revision) {
                self.history.pop_front();
                self.popped += 1;
            }
            self.floor = first.revision + 1;
        }
    }

    pub(crate) fn compact(&mut self, revision: u64) {
        while self.history.front().is_some_and(|c| c.revision < revision) {
            self.history.pop_front();
            self.popped += 1;
        }
        self.floor = self.floor.max(revision);
        // Give back the memory of a burst once it has been compacted away.
        if self.history.capacity() > 1024 && self.history.len() < self.history.capacity() / 4 {
            self.history.shrink_to_fit();
        }
    }

    /// Deletes a lease and every object attached to it, all at one revision.
    fn drop_lease(&mut self, id: LeaseId) -> Option<u64> {
        let lease = self.leases.remove(&id)?;
        self.deadlines.remove(&(lease.queued, id));
        if lease.keys.is_empty() {
            return None;
        }
        let mut keys: Vec<_> = lease.keys.into_iter().collect();
        keys.sort();
        let revision = self.revision + 1;
        for key in keys {
            let Some(cur) = self.get(&key).cloned() else { continue };
            let mut last = (*cur).clone();
            last.metadata.version += 1;
            last.metadata.resource_version = revision;
            self.remove(&key);
            self.reindex(&key, Some(&cur.metadata.labels), None);
            self.history.push_back(Change { revision, object: Arc::new(last), prev: Some(cur), deleted: true });
        }
        self.revision = revision;
        Some(revision)
    }

    /// Expires every lease whose deadline has passed; returns the last revision written.
    fn expire_due(&mut self, now: Instant) -> Option<u64> {
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            match self.leases.get_mut(&id) {
                // Renewed since it was queued: queue it at its real deadline.
                Some(l) if l.deadline > now => {
                    l.queued = l.deadline;
                    self.deadlines.insert((l.deadline, id));
                }
                Some(_) => due.push(id),
                None => {}
            }
        }
        let mut last = None;
        for id in due {
            last = self.drop_lease(id).or(last);
        }
        last
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    fn lease_info(&self, id: LeaseId, now: Instant) -> Result<LeaseInfo> {
        let l = self.leases.get(&id).ok_or(Error::LeaseNotFound(id))?;
        Ok(LeaseInfo { id, ttl: l.ttl, remaining: l.deadline.saturating_duration_since(now) })
    }

    /// The objects of `sel` at `revision`, after `start_after`, by undoing newer history.
    fn list_at(
        &self,
        sel: &Selection,
        revision: u64,
        start_after: Option<&(String, String)>,
        limit: usize,
        use_index: bool,
    ) -> (Vec<Arc<DynamicObject>>, bool) {
        // State at `revision` of every key written since: the `prev` of its first later change.
        let mut overlay: BTreeMap<(&str, &str), Option<&Arc<DynamicObject>>> = BTreeMap::new();
        if revision < self.revision {
            let start = self.history.partition_point(|c| c.revision <= revision);
            for c in self.history.range(start..) {
                let m = &c.object.metadata;
                if c.object.kind != sel.kind || sel.namespace.as_ref().is_some_and(|ns| *ns != m.namespace) {
                    continue;
                }
                overlay.entry((m.namespace.as_str(), m.name.as_str())).or_insert(c.prev.as_ref());
            }
        }
        let after = |k: &(&str, &str)| start_after.is_none_or(|(ns, n)| (ns.as_str(), n.as_str()) < *k);
        if let Some(candidates) = self.label_candidates(sel).filter(|_| use_index) {
            // Indexed: the candidates now, plus every key changed since `revision` (its older
            // state may match), resolved at `revision` and put in order.
            let mut keys: Vec<(&str, &str)> = candidates
                .iter()
                .map(|k| (k.namespace.as_str(), k.name.as_str()))
                .chain(overlay.keys().copied())
                .filter(|(ns, _)| sel.namespace.as_ref().is_none_or(|want| want == ns))
                .filter(|k| after(k))
                .collect();
            keys.sort_unstable();
            keys.dedup();
            let mut items = Vec::new();
            for k in keys {
                let obj = match overlay.get(&k) {
                    Some(at_revision) => *at_revision,
                    None => self.get_parts(&sel.kind, k.0, k.1),
                };
                let Some(obj) = obj else { continue };
                if sel.labels.matches(&obj.metadata.labels) && sel.fields.matches(obj) {
                    if items.len() == limit {
                        return (items, true);
                    }
                    items.push(obj.clone());
                }
            }
            return (items, false);
        }
        let current = self.objects.get(&sel.kind).into_iter().flat_map(|namespaces| {
            let range: Box<dyn Iterator<Item = (&String, &Names)>> = match &sel.namespace {
                Some(ns) => Box::new(namespaces.get_key_value(ns).into_iter()),
                None => match start_after {
                    Some((ns, _)) => Box::new(namespaces.range::<String, _>((Bound::Included(ns), Bound::Unbounded))),
                    None => Box::new(namespaces.iter()),
                },
            };
            range.flat_map(move |(ns, names)| {
                let iter: Box<dyn Iterator<Item = (&String, &Arc<DynamicObject>)>> = match start_after {
                    Some((sns, sname)) if sns == ns => {
                        Box::new(names.range::<String, _>((Bound::Excluded(sname), Bound::Unbounded)))
                    }
                    _ => Box::new(names.iter()),
                };
                iter.map(move |(name, o)| ((ns.as_str(), name.as_str()), o))
            })
        });
        let mut current = current.filter(|(k, _)| after(k)).peekable();
        let mut older = overlay.into_iter().filter(|(k, _)| after(k)).peekable();
        let mut items = Vec::new();
        loop {
            // Merge the two sorted sequences; the overlay wins on equal keys.
            let next = match (current.peek(), older.peek()) {
                (None, None) => break,
                (Some(_), None) => current.next().map(|(_, o)| Some(o)),
                (None, Some(_)) => older.next().map(|(_, o)| o),
                (Some((ck, _)), Some((ok, _))) => {
                    if ck < ok {
                        current.next().map(|(_, o)| Some(o))
                    } else {
                        if ck == ok {
                            current.next();
                        }
                        older.next().map(|(_, o)| o)
                    }
                }
            };
            let Some(Some(obj)) = next else { continue };
            if sel.labels.matches(&obj.metadata.labels) && sel.fields.matches(obj) {
                if items.len() == limit {
                    return (items, true);
                }
                items.push(obj.clone());
            }
        }
        (items, false)
    }
}

fn is_key(o: &DynamicObject, key: &ObjectKey) -> bool {
    o.metadata.name == key.name && o.metadata.namespace == key.namespace && o.kind == key.kind
}

/// Background task: expires leases when their deadline passes.
async fn expire_leases(inner: Weak<Inner>, changed: Arc<Notify>) {
    loop {
        let notified = changed.notified();
        let deadline = {
            let Some(inner) = inner.upgrade() else { return };
            let now = Instant::now();
            let mut st = inner.write();
            if let Some(rev) = st.expire_due(now) {
                inner.notify(rev);
            }
            st.next_deadline()
        };
        match deadline {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(d) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

impl MemoryStore {
    /// Expires due leases before a write; the caller notifies watchers after unlocking.
    fn write_state(&self) -> (RwLockWriteGuard<'_, State>, Option<u64>) {
        let mut st = self.inner.write();
        let expired = if st.leases.is_empty() { None } else { st.expire_due(Instant::now()) };
        (st, expired)
    }

    /// Wakes watchers for deletions made by lease expiry.
    fn finish(&self, expired: Option<u64>) {
        if let Some(rev) = expired {
            self.inner.notify(rev);
        }
    }

    /// Runs one object write under the write lock: expires due leases first, trims history
    /// after, and wakes watchers once the lock is released.
    fn write<T>(&self, op: impl FnOnce(&mut State) -> Result<T>, revision: impl FnOnce(&T) -> u64) -> Result<T> {
        let (mut st, expired) = self.write_state();
        let result = op(&mut st);
        st.trim(self.inner.history_limit);
        drop(st);
        if let Some(rev) = result.as_ref().ok().map(revision).or(expired) {
            self.inner.notify(rev);
        }
        result
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &ObjectKey) -> Result<Arc<DynamicObject>> {
        self.inner.read().get(key).cloned().ok_or_else(|| Error::NotFound(key.clone()))
    }

    async fn list(&self, req: &ListRequest) -> Result<ListResponse> {
        req.selection.fields.validate()?;
        let st = self.inner.read();
        let (revision, start_after) = match &req.continue_token {
            Some(token) => {
                let (rev, ns, name) = decode_continue(token)?;
                (rev, Some((ns, name)))
            }
            None => (req.revision.unwrap_or(st.revision), None),
        };
        if revision > st.revision {
            return Err(Error::FutureRevision { requested: revision, current: st.revision });
        }
        if revision < st.revision && revision < st.floor {
            return Err(Error::Compacted { requested: revision, compacted: st.floor });
        }
        let limit = match req.limit {
            Some(0) => return Err(Error::invalid("ListRequest", "limit", "must be >= 1 when set")),
            Some(n) => n,
            None => usize::MAX,
        };
        let (items, more) = st.list_at(&req.selection, revision, start_after.as_ref(), limit, true);
        let continue_token = more.then(|| {
            let last = &items[items.len() - 1].metadata;
            encode_continue(revision, &last.namespace, &last.name)
        });
        Ok(ListResponse { items, revision, continue_token })
    }

    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        let obj = semantics::create(obj, self.inner.clock.now())?;
        let key = obj.key();
        self.write(
            |st| {
                st.check_guard(opts.guard.as_ref())?;
                if st.get(&key).is_some() {
                    return Err(Error::AlreadyExists(key.clone()));
                }
                st.check_lease(obj.metadata.lease)?;
                Ok(st.apply(&key, None, Plan::Put(obj)).expect("a put always writes"))
            },
            |o| o.metadata.resource_version,
        )
    }

    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        semantics::validate(&obj)?;
        let key = obj.key();
        self.write(
            |st| {
                let cur = st.current(&key, opts.guard.as_ref(), Some(obj.metadata.resource_version))?;
                let plan = semantics::update(&cur, obj)?;
                if let Plan::Put(o) = &plan
                    && o.metadata.lease != cur.metadata.lease
                {
                    st.check_lease(o.metadata.lease)?;
                }
                Ok(st.apply(&key, Some(cur.clone()), plan).unwrap_or(cur))
            },
            |o| o.metadata.resource_version,
        )
    }

    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        let key = obj.key();
        self.write(
            |st| {
                let cur = st.current(&key, opts.guard.as_ref(), Some(obj.metadata.resource_version))?;
                let plan = semantics::update_status(&cur, obj)?;
                Ok(st.apply(&key, Some(cur.clone()), plan).unwrap_or(cur))
            },
            |o| o.metadata.resource_version,
        )
    }

    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> Result<DeleteOutcome> {
        let now = self.inner.clock.now();
        self.write(
            |st| {
                let cur = st.current(key, opts.guard.as_ref(), opts.resource_version)?;
                let plan = semantics::delete(&cur, now);
                let removing = matches!(plan, Plan::Remove(_));
                let obj = st.apply(key, Some(cur.clone()), plan).unwrap_or(cur);
                Ok(if removing { DeleteOutcome::Deleted(obj) } else { DeleteOutcome::Pending(obj) })
            },
            |outcome| outcome.object().metadata.resource_version,
        )
    }

    async fn watch(&self, req: &WatchRequest) -> Result<WatchStream> {
        req.selection.fields.validate()?;
        let mut rx = self.inner.rev_tx.subscribe();
        rx.borrow_and_update();
        let (cursor, next_index) = {
            let st = self.inner.read();
            let from = req.from_revision.unwrap_or(st.revision + 1);
            if from < st.floor {
                return Err(Error::Compacted { requested: from, compacted: st.floor });
            }
            (from, st.popped + st.history.partition_point(|c| c.revision < from) as u64)
        };
        let watcher = Watcher {
            inner: Arc::downgrade(&self.inner),
            selection: req.selection.clone(),
            cursor,
            next_index,
            rx,
            buffer: VecDeque::new(),
            progress_interval: req.progress_interval,
            last_sent: Instant::now(),
            caught_up: false,
            failed: false,
        };
        Ok(futures::stream::unfold(watcher, |mut w| async move {
            let item = w.next_event().await?;
            Some((item, w))
        })
        .boxed())
    }

    async fn current_revision(&self) -> Result<u64> {
        Ok(self.inner.read().revision)
    }

    async fn compact(&self, revision: u64) -> Result<()> {
        let mut st = self.inner.write();
        if revision > st.revision {
            return Err(Error::FutureRevision { requested: revision, current: st.revision });
        }
        st.compact(revision);
        Ok(())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseInfo> {
        if ttl.is_zero() {
            return Err(Error::invalid("Lease", "ttl", "must be > 0"));
        }
        if Instant::now().checked_add(ttl).is_none() || ttl > Duration::from_secs(10 * 365 * 86_400) {
            return Err(Error::invalid("Lease", "ttl", "must be at most ten years"));
        }
        let (mut st, expired) = self.write_state();
        let id = st.next_lease;
        st.next_lease += 1;
        let now = Instant::now();
        st.leases.insert(id, Lease { ttl, deadline: now + ttl, queued: now + ttl, keys: HashSet::new() });
        st.deadlines.insert((now + ttl, id));
        let info = st.lease_info(id, now);
        drop(st);
        self.finish(expired);
        self.inner.lease_changed.notify_one();
        info
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<LeaseInfo> {
        let (mut st, expired) = self.write_state();
        let now = Instant::now();
        let info = match st.leases.get_mut(&id) {
            Some(l) => {
                // Only later: its place in `deadlines` stays (see there).
                l.deadline = now + l.ttl;
                st.lease_info(id, now)
            }
            None => Err(Error::LeaseNotFound(id)),
        };
        drop(st);
        self.finish(expired);
        // A renewal only moves a deadline later: the expiry task, asleep until the earliest
        // deadline, wakes early at worst and finds nothing due. No need to wake it now.
        info
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        let (mut st, expired) = self.write_state();
        if !st.leases.contains_key(&id) {
            drop(st);
            self.finish(expired);
            return Err(Error::LeaseNotFound(id));
        }
        let rev = st.drop_lease(id);
        st.trim(self.inner.history_limit);
        drop(st);
        if let Some(rev) = rev.or(expired) {
            self.inner.notify(rev);
        }
        Ok(())
    }

    async fn lease(&self, id: LeaseId) -> Result<LeaseInfo> {
        let (st, expired) = self.write_state();
        let info = st.lease_info(id, Instant::now());
        drop(st);
        self.finish(expired);
        info
    }
}

/// One watch: a cursor into the shared history.
struct Watcher {
    inner: Weak<Inner>,
    selection: Selection,
    /// Next revision to deliver.
    cursor: u64,
    /// Absolute position (counting dropped entries) of the next history entry to look at.
    next_index: u64,
    rx: watch::Receiver<u64>,
    buffer: VecDeque<WatchEvent>,
    progress_interval: Option<Duration>,
    /// When the last event (or progress notification) went out.
    last_sent: Instant,
    /// The last `fill` read everything there was (it did not stop at the batch limit).
    caught_up: bool,
    failed: bool,
}

impl Watcher {
    /// Moves events from the history into the buffer; false when the store is gone.
    fn fill(&mut self) -> Result<bool> {
        let Some(inner) = self.inner.upgrade() else { return Ok(false) };
        self.rx.borrow_and_update();
        let st = inner.read();
        if self.next_index < st.popped {
            // Entries this watcher still needed were dropped.
            return Err(Error::Compacted { requested: self.cursor, compacted: st.floor });
        }
        let start = (self.next_index - st.popped) as usize;
        let mut last_rev = None;
        let mut examined = 0;
        self.caught_up = true;
        for c in st.history.range(start..) {
            if examined >= WATCH_BATCH && last_rev != Some(c.revision) {
                self.caught_up = false;
                break;
            }
            examined += 1;
            // A watch from a future revision skips what comes before it.
            if c.revision < self.cursor {
                continue;
            }
            last_rev = Some(c.revision);
            if c.object.kind != self.selection.kind {
                continue;
            }
            let now = !c.deleted && self.selection.matches(&c.object);
            let before = c.prev.as_ref().is_some_and(|p| self.selection.matches(p));
            let event = match (before, now) {
                (false, true) => WatchEvent::Added(c.object.clone()),
                (true, true) => WatchEvent::Modified(c.object.clone()),
                (true, false) => WatchEvent::Deleted(c.object.clone()),
                (false, false) => continue,
            };
            self.buffer.push_back(event);
        }
        self.next_index += examined as u64;
        match last_rev {
            Some(rev) => self.cursor = rev + 1,
            // Nothing newer: everything up to the current revision has been seen. (Not when the
            // batch ended early on entries before a future start: those are not all examined.)
            None if self.caught_up => self.cursor = self.cursor.max(st.revision + 1),
            None => {}
        }
        Ok(true)
    }

    async fn next_event(&mut self) -> Option<Result<WatchEvent>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(e) = self.buffer.pop_front() {
                self.last_sent = Instant::now();
                return Some(Ok(e));
            }
            // `fill` marks the notification as seen before it reads the history, so once it has
            // caught up nothing new can arrive without `changed` firing: wait before reading
            // again. This halves the work per event when a thousand watchers wake together.
            if self.caught_up {
                match self.progress_interval {
                    Some(interval) => {
                        match tokio::time::timeout_at(self.last_sent + interval, self.rx.changed()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return None,
                            Err(_) => {
                                // Quiet for a whole interval: catch up, and if there is still
                                // nothing for this watcher, say how far it has got.
                                if let Err(e) = self.fill() {
                                    self.failed = true;
                                    return Some(Err(e));
                                }
                                if self.buffer.is_empty() {
                                    self.last_sent = Instant::now();
                                    return Some(Ok(WatchEvent::Progress(self.cursor - 1)));
                                }
                                continue;
                            }
                        }
                    }
                    None => {
                        if self.rx.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::{ObjectMeta, RawJson};

    fn obj(name: &str) -> DynamicObject {
        DynamicObject::new("Thing", ObjectMeta::namespaced("ns", name))
            .with_spec(RawJson::from_value(&serde_json::json!(1)))
    }

    #[tokio::test(start_paused = true)]
    async fn watcher_behind_trimmed_history_gets_compacted_then_relists() {
        let s = MemoryStore::builder().history_limit(8).build();
        let sel = Selection::kind("Thing");
        let mut slow = s.watch(&WatchRequest::from(sel.clone(), 1)).await.unwrap();
        for i in 0..20 {
            s.create(obj(&format!("o{i:02}")), &WriteOptions::default()).await.unwrap();
        }
        match slow.next().await {
            Some(Err(Error::Compacted { requested: 1, compacted })) => assert!(compacted > 1),
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(slow.next().await.is_none(), "the stream ends after its error");
        // Re-list and re-watch from the list's revision: every object once, then live events.
        let page = s.list(&ListRequest::new(sel.clone())).await.unwrap();
        assert_eq!(page.items.len(), 20);
        let mut again = s.watch(&WatchRequest::from(sel, page.revision + 1)).await.unwrap();
        let c = s.create(obj("late"), &WriteOptions::default()).await.unwrap();
        match again.next().await {
            Some(Ok(WatchEvent::Added(o))) => assert_eq!(o.metadata.resource_version, c.metadata.resource_version),
            other => panic!("expected the live event, got {other:?}"),
        }
    }

    proptest::proptest! {
        /// Lists answered from the label index equal full scans, at every past revision and
        /// for every page size, whatever writes came before.
        #[test]
        fn indexed_lists_equal_scans(
            writes in proptest::collection::vec((0..12usize, 0..4u8, 0..3u8), 1..80),
            limit in 1..6usize,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let s = MemoryStore::new();
                for (i, label, action) in writes {
                    let name = format!("o{i:02}");
                    let key = ObjectKey::new("Thing", "ns", &name);
                    match (s.get(&key).await, action) {
                        (Ok(cur), 0) => { s.delete(&key, &DeleteOptions::default()).await.unwrap(); drop(cur); }
                        (Ok(cur), _) => {
                            let mut next = (*cur).clone();
                            next.metadata.labels.insert("app", format!("a{label}"));
                            if label == 3 { next.metadata.labels.remove("app"); }
                            s.update(next, &WriteOptions::default()).await.unwrap();
                        }
                        (Err(_), _) => {
                            let mut o = obj(&name);
                            o.metadata.labels.insert("app", format!("a{label}"));
                            s.create(o, &WriteOptions::default()).await.unwrap();
                        }
                    }
                }
                let st = s.inner.read();
                for revision in 0..=st.revision {
                    for selector in ["app=a1", "app in (a0,a2)", "app=a9"] {
                        let sel = Selection::kind("Thing").with_labels(selector.parse().unwrap());
                        let (mut fast, mut slow) = (Vec::new(), Vec::new());
                        for (use_index, out) in [(true, &mut fast), (false, &mut slow)] {
                            let mut after: Option<(String, String)> = None;
                            loop {
                                let (items, more) = st.list_at(&sel, revision, after.as_ref(), limit, use_index);
                                after = items.last().map(|o| (o.metadata.namespace.clone(), o.metadata.name.clone()));
                                out.extend(items.into_iter().map(|o| (o.metadata.name.clone(), o.metadata.resource_version)));
                                if !more { break; }
                            }
                        }
                        assert_eq!(fast, slow, "revision {revision}, selector {selector}");
                    }
                }
            });
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_from_a_future_revision_misses_nothing_after_it() {
        let s = MemoryStore::new();
        let mut w = s.watch(&WatchRequest::from(Selection::kind("Thing"), 2000)).await.unwrap();
        for i in 0..3000 {
            s.create(obj(&format!("o{i}")), &WriteOptions::default()).await.unwrap();
        }
        let mut revs = Vec::new();
        while revs.len() < 1001 {
            match w.next().await {
                Some(Ok(e)) => revs.push(e.revision()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(revs.first(), Some(&2000));
        assert_eq!(revs.last(), Some(&3000));
        assert!(revs.windows(2).all(|p| p[1] == p[0] + 1), "a gap or a repeat");
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_lease_ttls_are_refused() {
        let s = MemoryStore::new();
        let e = s.grant_lease(Duration::MAX).await.unwrap_err();
        assert!(e.is_invalid() && e.to_string().contains("ttl"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn history_stays_bounded() {
        let s = MemoryStore::builder().history_limit(100).build();
        for i in 0..1000 {
            s.create(obj(&format!("o{i}")), &WriteOptions::default()).await.unwrap();
        }
        let st = s.inner.read();
        assert!(st.history.len() <= 100);
        assert_eq!(st.floor, st.history.front().unwrap().revision);
        drop(st);
        assert_eq!(s.len(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_store_ends_watches() {
        let s = MemoryStore::new();
        let mut w = s.watch(&WatchRequest::from(Selection::kind("Thing"), 1)).await.unwrap();
        drop(s);
        assert!(w.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_without_any_other_call() {
        let s = MemoryStore::new();
        let lease = s.grant_lease(Duration::from_secs(5)).await.unwrap();
        let mut o = obj("a");
        o.metadata.lease = Some(lease.id);
        let c = s.create(o, &WriteOptions::default()).await.unwrap();
        let mut w =
            s.watch(&WatchRequest::from(Selection::kind("Thing"), c.metadata.resource_version + 1)).await.unwrap();
        // Only the background task can produce this event: nothing else touches the store.
        let e = tokio::time::timeout(Duration::from_secs(6), w.next()).await.expect("expired on time");
        assert!(matches!(e, Some(Ok(WatchEvent::Deleted(_)))), "{e:?}");
    }
}
