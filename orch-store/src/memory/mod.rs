//! [`MemoryStore`]: the in-memory backend. Fast, many concurrent readers, bounded history, and
//! watchers that read the shared history themselves so a slow one never holds up a writer.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, RwLockWriteGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use orch_core::store::semantics::{self, Plan};
use orch_core::store::{decode_continue, encode_continue};
use orch_core::{
    Clock, DeleteOptions, DeleteOutcome, DynamicObject, Error, Guard, LeaseId, LeaseInfo, ListRequest, ListResponse,
    ObjectKey, Result, Store, SystemClock, WatchRequest, WatchStream, WriteOptions,
};
use tokio::sync::Notify;
use tokio::time::Instant;

pub(crate) mod index;
mod watch;

use index::{Change, Inner, Lease, State};
use watch::Watcher;

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    history_limit: usize,
    clock: Arc<dyn Clock>,
    indexed_fields: Vec<(String, String)>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder {
            history_limit: 100_000,
            clock: Arc::new(SystemClock),
            indexed_fields: index::DEFAULT_FIELD_INDEXES.iter().map(|(k, p)| (k.to_string(), p.to_string())).collect(),
        }
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

    /// Also index objects of `kind` by the field at `path` (`spec.x.y`, `status.x`), so a list
    /// or watch with an equality field selector on it (`path=value`) reads its matches instead of
    /// every object of the kind. A workload's `spec.nodeName` is indexed by default.
    pub fn index_field(mut self, kind: impl Into<String>, path: impl Into<String>) -> Self {
        self.indexed_fields.push((kind.into(), path.into()));
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
        let inner = Arc::new(Inner::new(self.clock, self.history_limit, &self.indexed_fields));
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

/// How a [`MemoryStore`] checks and applies its own writes and runs its leases on the index (the
/// embedded store decides its writes itself and only records them).
impl State {
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

/// A write takes a unit of its task's cooperative budget (yielding when it is spent), so a task
/// that writes in a tight loop lets the store's watchers run between its writes. Without it,
/// 100,000 creates from one task on one thread leave every watcher on that thread behind the
/// history, to be told `Compacted` and list everything again.
async fn writer_turn() {
    tokio::task::consume_budget().await;
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &ObjectKey) -> Result<Arc<DynamicObject>> {
        self.inner.read().get(key).cloned().ok_or_else(|| Error::NotFound(key.clone()))
    }

    async fn list(&self, req: &ListRequest) -> Result<ListResponse> {
        semantics::check_selection(&req.selection)?;
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
        writer_turn().await;
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
        writer_turn().await;
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

    async fn update_many(&self, objs: Vec<DynamicObject>, opts: &WriteOptions) -> Vec<Result<Arc<DynamicObject>>> {
        writer_turn().await;
        // Checked before the lock, applied under one lock, watchers woken once.
        let checked: Vec<Result<DynamicObject>> =
            objs.into_iter().map(|o| semantics::validate(&o).map(|()| o)).collect();
        let (mut st, expired) = self.write_state();
        let mut last = None;
        let results: Vec<Result<Arc<DynamicObject>>> = checked
            .into_iter()
            .map(|obj| {
                let obj = obj?;
                let key = obj.key();
                let cur = st.current(&key, opts.guard.as_ref(), Some(obj.metadata.resource_version))?;
                let plan = semantics::update(&cur, obj)?;
                if let Plan::Put(o) = &plan
                    && o.metadata.lease != cur.metadata.lease
                {
                    st.check_lease(o.metadata.lease)?;
                }
                let written = st.apply(&key, Some(cur.clone()), plan).unwrap_or(cur);
                last = last.max(Some(written.metadata.resource_version));
                Ok(written)
            })
            .collect();
        st.trim(self.inner.history_limit);
        drop(st);
        if let Some(rev) = last.or(expired) {
            self.inner.notify(rev);
        }
        results
    }

    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        writer_turn().await;
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
        writer_turn().await;
        let now = self.inner.clock.now();
        self.write(
            |st| {
                let cur = st.current(key, opts.guard.as_ref(), opts.resource_version)?;
                semantics::check_delete_uid(key, &cur, opts)?;
                let plan = semantics::delete(&cur, now, opts.propagation);
                let removing = matches!(plan, Plan::Remove(_));
                let obj = st.apply(key, Some(cur.clone()), plan).unwrap_or(cur);
                Ok(if removing { DeleteOutcome::Deleted(obj) } else { DeleteOutcome::Pending(obj) })
            },
            |outcome| outcome.object().metadata.resource_version,
        )
    }

    async fn watch(&self, req: &WatchRequest) -> Result<WatchStream> {
        semantics::check_selection(&req.selection)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::{ObjectMeta, RawJson, Selection, WatchEvent};

    /// A namespaced object of kind `Thing`, for the tests of this module and its children.
    pub(super) fn obj(name: &str) -> DynamicObject {
        DynamicObject::new("Thing", ObjectMeta::namespaced("ns", name))
            .with_spec(RawJson::from_value(&serde_json::json!(1)))
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_lease_ttls_are_refused() {
        let s = MemoryStore::new();
        let e = s.grant_lease(Duration::MAX).await.unwrap_err();
        assert!(e.is_invalid() && e.to_string().contains("ttl"), "{e}");
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
