//! The in-memory index that [`MemoryStore`](super::MemoryStore) serves from and the embedded
//! store (`RedbStore`) loads into: current objects hashed and in order, label sets per kind, the
//! bounded history of changes, and lists at past revisions read from that history.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use hashbrown::{DefaultHashBuilder, HashTable};
use orch_core::selector::field_value;
use orch_core::{Clock, DynamicObject, Labels, LeaseId, ObjectKey, Requirement, Selection};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub(crate) struct Inner {
    state: RwLock<State>,
    /// Bumped after each write so idle watchers wake up.
    pub(super) rev_tx: watch::Sender<u64>,
    /// Wakes the lease task when a lease is granted or renewed.
    pub(super) lease_changed: Arc<Notify>,
    pub(super) clock: Arc<dyn Clock>,
    pub(crate) history_limit: usize,
    /// Set when the store that owns this index is closed: its watches end.
    closed: AtomicBool,
}

type Names = BTreeMap<String, Arc<DynamicObject>>;
type Namespaces = BTreeMap<String, Names>;
/// (label key, label value) → the objects of one kind that carry it.
type LabelIndex = hashbrown::HashMap<(String, String), KeySet>;

/// The fields every store built on this index indexes by default: a workload's node (what an
/// agent and the node lifecycle controller ask for, as the Kubernetes API server's watch cache
/// indexes pods by node).
pub(crate) const DEFAULT_FIELD_INDEXES: &[(&str, &str)] = &[("Workload", "spec.nodeName")];

/// The objects of one kind by the value of one field (as `FieldSelector` reads it), so an
/// equality field selector on it reads its matches instead of every object.
struct FieldIndex {
    path: String,
    values: hashbrown::HashMap<String, KeySet>,
}

impl FieldIndex {
    fn add(&mut self, value: String, hash: u64, key: Arc<ObjectKey>) {
        self.values.entry(value).or_default().insert(hash, key);
    }

    fn drop_key(&mut self, value: &str, hash: u64, key: &ObjectKey) {
        if let Some(set) = self.values.get_mut(value) {
            set.remove(hash, key);
            if set.is_empty() {
                self.values.remove(value);
            }
        }
    }
}

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
    pub(super) objects: hashbrown::HashMap<String, Namespaces>,
    /// The same objects hashed by key: one probe per get instead of a walk down a B-tree whose
    /// every string comparison is a cache miss.
    by_key: HashTable<Arc<DynamicObject>>,
    hasher: DefaultHashBuilder,
    /// kind → label index, so an equality selector reads its matches instead of every object.
    labels: hashbrown::HashMap<String, LabelIndex>,
    /// kind → the indexes of its indexed fields.
    fields: hashbrown::HashMap<String, Vec<FieldIndex>>,
    pub(super) history: VecDeque<Change>,
    /// History entries dropped from the front so far: watchers keep absolute positions, so
    /// finding their place is a subtraction, not a search.
    pub(super) popped: u64,
    pub(super) leases: HashMap<LeaseId, Lease>,
    /// Lease deadlines in order, so finding the due ones costs nothing until one is due. Each
    /// lease is here once, at its `queued` time, which a renewal does not move: the entry is
    /// moved to the real deadline when it comes due (so a renewal costs no reordering).
    pub(super) deadlines: std::collections::BTreeSet<(Instant, LeaseId)>,
    pub(super) next_lease: LeaseId,
}

pub(crate) struct Change {
    pub(crate) revision: u64,
    /// The new state, or for a delete the final state stamped with the deletion revision.
    pub(crate) object: Arc<DynamicObject>,
    /// The state before, `None` for a create.
    pub(crate) prev: Option<Arc<DynamicObject>>,
    pub(crate) deleted: bool,
}

/// A lease of the [`MemoryStore`](super::MemoryStore) backend. It lives in the state so that its
/// expiry, and the deletions that come with it, happen under the lock every write takes; the
/// backend runs it (see `impl State` in the parent module). The embedded store keeps its own.
pub(super) struct Lease {
    pub(super) ttl: Duration,
    pub(super) deadline: Instant,
    /// Where the lease sits in `deadlines` (at or before `deadline`).
    pub(super) queued: Instant,
    pub(super) keys: HashSet<ObjectKey>,
}

impl Inner {
    /// An empty index at revision 0.
    pub(super) fn new(clock: Arc<dyn Clock>, history_limit: usize, indexed_fields: &[(String, String)]) -> Inner {
        let (rev_tx, _) = watch::channel(0u64);
        let mut fields: hashbrown::HashMap<String, Vec<FieldIndex>> = hashbrown::HashMap::new();
        for (kind, path) in indexed_fields {
            let of_kind = fields.entry(kind.clone()).or_default();
            if !of_kind.iter().any(|f| &f.path == path) {
                of_kind.push(FieldIndex { path: path.clone(), values: hashbrown::HashMap::new() });
            }
        }
        Inner {
            state: RwLock::new(State {
                revision: 0,
                floor: 1,
                objects: hashbrown::HashMap::new(),
                by_key: HashTable::new(),
                hasher: DefaultHashBuilder::default(),
                labels: hashbrown::HashMap::new(),
                fields,
                history: VecDeque::new(),
                popped: 0,
                leases: HashMap::new(),
                deadlines: std::collections::BTreeSet::new(),
                next_lease: 1,
            }),
            rev_tx,
            lease_changed: Arc::new(Notify::new()),
            clock,
            history_limit,
            closed: AtomicBool::new(false),
        }
    }

    /// Ends every watch of this index (after the events it already holds): for a store that is
    /// closed while handles to it remain.
    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.rev_tx.send_modify(|_| {});
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

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
    pub(super) fn reindex(&mut self, key: &ObjectKey, old: Option<&Labels>, new: Option<&Labels>) {
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
    /// Keys that may match `sel`, from the most selective index one of its requirements can
    /// use (a label requirement, or an equality on an indexed field); `None` when none can.
    fn candidates(&self, sel: &Selection) -> Option<Vec<&ObjectKey>> {
        // `Some(None)`: the field is indexed and no object has that value.
        let by_field: Option<Option<&KeySet>> = self.fields.get(&sel.kind).and_then(|indexes| {
            indexes
                .iter()
                .filter_map(|f| sel.fields.equality_on(&f.path).map(|v| f.values.get(v)))
                .min_by_key(|set| set.map_or(0, KeySet::len))
        });
        let by_label = self.label_candidates(sel);
        match (by_field, by_label) {
            (Some(field), Some(labels)) if field.map_or(0, KeySet::len) >= labels.len() => Some(labels),
            (Some(field), _) => Some(field.into_iter().flat_map(KeySet::iter).collect()),
            (None, labels) => labels,
        }
    }

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

    pub(super) fn insert(&mut self, obj: Arc<DynamicObject>) {
        let m = &obj.metadata;
        let hash = self.hash(&obj.kind, &m.namespace, &m.name);
        let hasher = &self.hasher;
        let old = match self.by_key.entry(
            hash,
            |o| o.kind == obj.kind && o.metadata.namespace == m.namespace && o.metadata.name == m.name,
            |o| hasher.hash_one((o.kind.as_str(), o.metadata.namespace.as_str(), o.metadata.name.as_str())),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut e) => Some(std::mem::replace(e.get_mut(), obj.clone())),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(obj.clone());
                None
            }
        };
        if let Some(indexes) = self.fields.get_mut(&obj.kind) {
            let mut shared: Option<Arc<ObjectKey>> = None;
            for index in indexes {
                let new = field_value(&obj, &index.path);
                let old = old.as_deref().map(|o| field_value(o, &index.path));
                if old.as_deref() == Some(new.as_str()) {
                    continue;
                }
                let key = shared.get_or_insert_with(|| Arc::new(obj.key())).clone();
                if let Some(old) = old {
                    index.drop_key(&old, hash, &key);
                }
                index.add(new, hash, key);
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

    pub(super) fn remove(&mut self, key: &ObjectKey) {
        let hash = self.hash(&key.kind, &key.namespace, &key.name);
        if let Ok(e) = self.by_key.find_entry(hash, |o| is_key(o, key)) {
            let (old, _) = e.remove();
            if let Some(indexes) = self.fields.get_mut(&key.kind) {
                for index in indexes {
                    index.drop_key(&field_value(&old, &index.path), hash, key);
                }
            }
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
        let (hasher, by_key, labels, fields) = (&self.hasher, &mut self.by_key, &mut self.labels, &mut self.fields);
        let hashed = || {
            let hash = |o: &Arc<DynamicObject>| hasher.hash_one(key_of(o));
            by_key.reserve(objects.len(), hash);
            for obj in &objects {
                let h = hash(obj);
                by_key.insert_unique(h, obj.clone(), hash);
                if let Some(indexes) = fields.get_mut(&obj.kind) {
                    let key = Arc::new(obj.key());
                    for index in indexes {
                        index.add(field_value(obj, &index.path), h, key.clone());
                    }
                }
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

    /// The objects of `sel` at `revision`, after `start_after`, by undoing newer history.
    pub(super) fn list_at(
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
        if let Some(candidates) = self.candidates(sel).filter(|_| use_index) {
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

#[cfg(test)]
mod tests {
    use crate::memory::MemoryStore;
    use crate::memory::tests::obj;
    use orch_core::{DeleteOptions, ObjectKey, Selection, Store, WriteOptions};

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

    proptest::proptest! {
        /// Lists answered from a field index equal full scans, at every past revision and for
        /// every page size, whatever creates, moves between values and deletes came before.
        #[test]
        fn field_indexed_lists_equal_scans(
            writes in proptest::collection::vec((0..12usize, 0..4u8, 0..3u8), 1..80),
            limit in 1..6usize,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let s = MemoryStore::builder().index_field("Thing", "spec.node").build();
                let spec = |node: u8| match node {
                    3 => orch_core::RawJson::from_value(&serde_json::json!({"other": 1})),
                    n => orch_core::RawJson::from_value(&serde_json::json!({"node": format!("n{n}"), "x": [1]})),
                };
                for (i, node, action) in writes {
                    let name = format!("o{i:02}");
                    let key = ObjectKey::new("Thing", "ns", &name);
                    match (s.get(&key).await, action) {
                        (Ok(_), 0) => { s.delete(&key, &DeleteOptions::default()).await.unwrap(); }
                        (Ok(cur), _) => {
                            let mut next = (*cur).clone();
                            next.spec = spec(node);
                            s.update(next, &WriteOptions::default()).await.unwrap();
                        }
                        (Err(_), _) => {
                            s.create(obj(&name).with_spec(spec(node)), &WriteOptions::default()).await.unwrap();
                        }
                    }
                }
                let st = s.inner.read();
                for revision in 0..=st.revision {
                    for selector in ["spec.node=n1", "spec.node=n2,metadata.name!=o03", "spec.node=", "spec.node=n9"] {
                        let sel = Selection::kind("Thing").with_fields(selector.parse().unwrap());
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
}
