//! The [`Store`] trait: a revisioned, watchable object store with leases, and the types its calls
//! take and return.
//!
//! A store is the etcd of an orch control plane. Every backend keeps the same semantics, checked
//! by `testkit::store` (feature `testkit`):
//!
//! 1. One global revision that only goes up; every write gets the next one.
//! 2. Create fails with `AlreadyExists`; update and delete compare the resource version and fail
//!    with `Conflict` (carrying the current object) when it moved.
//! 3. List returns the revision it was taken at; pages stay pinned to the first page's revision.
//! 4. Watch from revision R delivers every later event in order, once each.
//! 5. Compacted history answers `Compacted`.
//! 6. Leases expire and delete the objects attached to them.
//! 7. A delete of an object with finalizers only marks it; it goes when the last one is removed.
//! 8. A list or watch with an invalid selector fails with `Invalid` naming it
//!    ([`semantics::check_selection`]), never answers "nothing matches".

pub mod semantics;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;

use crate::error::Result;
use crate::meta::LeaseId;
use crate::object::{DynamicObject, ObjectKey};
use crate::selector::{FieldSelector, LabelSelector};

/// A guard on a write: it applies only while another object (typically a leader-election lock)
/// is still at the given resource version. This is the fencing token that keeps a deposed
/// leader's writes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// The guarding object.
    pub key: ObjectKey,
    /// The resource version it must still have.
    pub resource_version: u64,
}

/// Options for create, update and status update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Refuse the write with `PreconditionFailed` unless the guard holds.
    pub guard: Option<Guard>,
}

/// Options for delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    /// Delete only if the object is at this resource version (`Conflict` otherwise).
    pub resource_version: Option<u64>,
    /// Delete only the object with this uid: another object at the key (the one meant was
    /// deleted and its name taken again) is left as it is and the delete answers `NotFound`, as
    /// the object meant is gone. What a garbage collector deleting from a cache needs.
    pub uid: Option<String>,
    /// Refuse the delete with `PreconditionFailed` unless the guard holds.
    pub guard: Option<Guard>,
    /// What becomes of the objects it owns (through their owner references).
    pub propagation: Propagation,
}

impl DeleteOptions {
    /// A delete with this propagation (builder style).
    pub fn propagation(mut self, propagation: Propagation) -> Self {
        self.propagation = propagation;
        self
    }
}

/// The finalizer a foreground delete puts on its object: a garbage collector deletes the
/// object's dependents, then removes it.
pub const FOREGROUND_FINALIZER: &str = "orch.dev/foreground-deletion";
/// The finalizer an orphaning delete puts on its object: a garbage collector removes the owner
/// reference from each dependent, then removes it.
pub const ORPHAN_FINALIZER: &str = "orch.dev/orphan";

/// What a delete does to the objects the deleted one owns. A store carries it out by marking the
/// object; a garbage collector (`orch_controllers::GarbageCollector`) does the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Propagation {
    /// The object goes at once (as its finalizers allow); its dependents are deleted after it.
    #[default]
    Background,
    /// The object is marked with [`FOREGROUND_FINALIZER`] and stays until its dependents that
    /// block owner deletion are gone.
    Foreground,
    /// The object is marked with [`ORPHAN_FINALIZER`]; its dependents stay, released from it.
    Orphan,
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq)]
pub enum DeleteOutcome {
    /// The object is gone; this is its last state, at the deletion revision.
    Deleted(Arc<DynamicObject>),
    /// Finalizers remain: the object was marked with a deletion timestamp and stays until they
    /// are removed.
    Pending(Arc<DynamicObject>),
}

impl DeleteOutcome {
    /// The object as the delete left it.
    pub fn object(&self) -> &Arc<DynamicObject> {
        match self {
            DeleteOutcome::Deleted(o) | DeleteOutcome::Pending(o) => o,
        }
    }
}

/// Which objects a list or watch covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The kind.
    pub kind: String,
    /// One namespace, or `None` for all namespaces (and for cluster-scoped kinds).
    pub namespace: Option<String>,
    /// Label conditions; empty selects all.
    pub labels: LabelSelector,
    /// Field conditions; empty selects all.
    pub fields: FieldSelector,
}

impl Selection {
    /// Every object of a kind.
    pub fn kind(kind: impl Into<String>) -> Self {
        Selection { kind: kind.into(), ..Default::default() }
    }

    /// Restricts to one namespace (builder style).
    pub fn in_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Adds a label selector (builder style).
    pub fn with_labels(mut self, labels: LabelSelector) -> Self {
        self.labels = labels;
        self
    }

    /// Adds a field selector (builder style).
    pub fn with_fields(mut self, fields: FieldSelector) -> Self {
        self.fields = fields;
        self
    }

    /// True when the object is of this kind and namespace and matches both selectors.
    pub fn matches(&self, obj: &DynamicObject) -> bool {
        obj.kind == self.kind
            && self.namespace.as_ref().is_none_or(|ns| *ns == obj.metadata.namespace)
            && self.labels.matches(&obj.metadata.labels)
            && self.fields.matches(obj)
    }
}

/// A list call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListRequest {
    /// Which objects.
    pub selection: Selection,
    /// At most this many items per page; `None` for all.
    pub limit: Option<usize>,
    /// The `continue_token` of the previous page.
    pub continue_token: Option<String>,
    /// Read at this exact revision instead of the current one (`Compacted` if it is gone).
    /// Ignored when a continue token is given: the token carries the first page's revision.
    pub revision: Option<u64>,
}

impl ListRequest {
    /// Lists everything the selection covers, in one page.
    pub fn new(selection: Selection) -> Self {
        ListRequest { selection, ..Default::default() }
    }

    /// Pages of at most `limit` items (builder style).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct ListResponse {
    /// Matching objects, ordered by namespace then name.
    pub items: Vec<Arc<DynamicObject>>,
    /// The revision the list reflects: watch from `revision + 1` to follow on without a gap.
    pub revision: u64,
    /// Pass back to get the next page; `None` on the last page.
    pub continue_token: Option<String>,
}

/// Encodes a continue token; backends should treat the token as opaque text.
pub fn encode_continue(revision: u64, namespace: &str, name: &str) -> String {
    format!("{revision}/{namespace}/{name}")
}

/// Decodes a continue token into `(revision, namespace, name)` of the last item returned.
pub fn decode_continue(token: &str) -> Result<(u64, String, String)> {
    let bad = || crate::Error::invalid("ListRequest", "continue", format!("malformed continue token {token:?}"));
    let mut parts = token.splitn(3, '/');
    let rev = parts.next().and_then(|r| r.parse::<u64>().ok()).ok_or_else(bad)?;
    let ns = parts.next().ok_or_else(bad)?;
    let name = parts.next().ok_or_else(bad)?;
    Ok((rev, ns.to_string(), name.to_string()))
}

/// A watch call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchRequest {
    /// Which objects. With selectors, an object that stops matching arrives as `Deleted` and
    /// one that starts matching as `Added`.
    pub selection: Selection,
    /// Deliver events from this revision on, inclusive; `None` for "after the current revision".
    /// A revision that has been compacted fails with `Compacted`.
    pub from_revision: Option<u64>,
    /// When set, a `Progress` event is sent after this long without events, so a watcher of a
    /// quiet kind still learns how far the store has moved (and can resume from there).
    pub progress_interval: Option<Duration>,
}

impl WatchRequest {
    /// Watches the selection from a revision (inclusive).
    pub fn from(selection: Selection, revision: u64) -> Self {
        WatchRequest { selection, from_revision: Some(revision), progress_interval: None }
    }
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// The object was created (or started matching the selectors).
    Added(Arc<DynamicObject>),
    /// The object changed; this is its new state.
    Modified(Arc<DynamicObject>),
    /// The object was deleted (or stopped matching); its `resource_version` is the deletion's
    /// revision.
    Deleted(Arc<DynamicObject>),
    /// Every event up to and including this revision has been delivered.
    Progress(u64),
}

impl WatchEvent {
    /// The revision of this event: the object's `resource_version` (for `Deleted`, the
    /// deletion's revision), or the revision a `Progress` vouches for.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => o.metadata.resource_version,
            WatchEvent::Progress(r) => *r,
        }
    }

    /// The object the event is about, for every variant that has one: the new state for
    /// `Added` and `Modified`, the last state for `Deleted`; `None` for `Progress`. It is the
    /// store's shared `Arc` (it derefs to [`DynamicObject`]), so keeping it costs no copy.
    pub fn object(&self) -> Option<&Arc<DynamicObject>> {
        match self {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => Some(o),
            WatchEvent::Progress(_) => None,
        }
    }

    /// The key of the object the event is about (`Deleted` included); `None` for `Progress`.
    pub fn key(&self) -> Option<ObjectKey> {
        self.object().map(|o| o.key())
    }
}

/// The stream a watch returns. It never ends silently: it ends after yielding an error, such as
/// `Compacted` when the watcher fell so far behind that the events it needed were dropped
/// (re-list, then watch again), or `Unavailable` ("store closed") once its store is dropped or
/// closed.
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Its id, to attach objects (`metadata.lease`) and to keep it alive.
    pub id: LeaseId,
    /// Its time to live, renewed in full by each keep-alive.
    pub ttl: Duration,
    /// Time left before it expires.
    pub remaining: Duration,
}

/// A revisioned, watchable object store with leases: the single source of truth of a control
/// plane.
///
/// Every method is safe to call concurrently. Implementations are checked by
/// `testkit::store`.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Reads one object.
    ///
    /// # To ensure correctness
    /// Fails with `NotFound` when the object does not exist. Never returns an object older than
    /// a write this store has acknowledged.
    async fn get(&self, key: &ObjectKey) -> Result<Arc<DynamicObject>>;

    /// Lists the objects a selection covers, in namespace/name order.
    ///
    /// # To ensure correctness
    /// The page reflects exactly the state at `revision`. Every later page of the same list
    /// (through `continue_token`) is read at that same revision, or fails with `Compacted` when
    /// it is no longer available. A malformed token fails with `Invalid`, and so does an invalid
    /// label or field selector (checked with [`semantics::check_selection`], the same on every
    /// backend), never an empty page.
    async fn list(&self, req: &ListRequest) -> Result<ListResponse>;

    /// Creates an object.
    ///
    /// # To ensure correctness
    /// Fails with `Invalid` (naming the field) on bad metadata, `AlreadyExists` when the key is
    /// taken, `LeaseNotFound` when `metadata.lease` names no live lease, `PreconditionFailed`
    /// when the guard does not hold. On success the object gets the next revision as
    /// `resource_version` and `create_revision`, a fresh `uid`, `generation` and `version` 1, a
    /// creation timestamp and no deletion timestamp, and one `Added` event.
    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>>;

    /// Replaces metadata and spec, compare-and-swap on `obj.metadata.resource_version`. The
    /// stored status is kept, whatever `obj.status` says.
    ///
    /// # To ensure correctness
    /// Fails with `NotFound`, with `Conflict` (carrying the current object) when the stored
    /// resource version differs, and never overwrites a newer object. `generation` grows only
    /// when the spec changes. A write that changes nothing is not a write: it returns the stored
    /// object and bumps no revision. Removing the last finalizer of an object marked for deletion
    /// deletes it (one `Deleted` event): the event and the returned object show it as it was last
    /// stored, at the deletion's revision, as every deletion does. Finalizers cannot be added to
    /// such an object.
    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>>;

    /// Several [`update`](Store::update)s in one call, each with its own precondition (its
    /// object's resource version): what a scheduler binding many workloads at once needs. The
    /// default runs them concurrently; a backend that can apply many writes under one lock or in
    /// one commit overrides it.
    ///
    /// # To ensure correctness
    /// Each update succeeds or fails on its own, exactly as `update` would (a conflict on one
    /// never stops the others), and the answer has one result per object, in order. Every
    /// successful update gets its own revision and its own event, as if written one by one, and
    /// a guard in `opts` fences every one of them.
    async fn update_many(&self, objs: Vec<DynamicObject>, opts: &WriteOptions) -> Vec<Result<Arc<DynamicObject>>> {
        futures::future::join_all(objs.into_iter().map(|o| self.update(o, opts))).await
    }

    /// Replaces the status only, compare-and-swap on `obj.metadata.resource_version`; stored
    /// metadata and spec are kept, whatever `obj` says.
    ///
    /// # To ensure correctness
    /// Same errors as [`update`](Store::update); never changes the spec or `generation`.
    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>>;

    /// Deletes an object, or marks it for deletion while finalizers remain.
    ///
    /// # To ensure correctness
    /// Fails with `NotFound`, or `Conflict` when `opts.resource_version` is set and differs.
    /// With finalizers, only sets `deletion_timestamp` (one `Modified` event; a repeated delete
    /// changes nothing); without, removes the object (one `Deleted` event). A `Foreground` or
    /// `Orphan` propagation first adds its finalizer ([`FOREGROUND_FINALIZER`],
    /// [`ORPHAN_FINALIZER`]), so the object is marked, not removed, in the same write (as
    /// [`semantics::delete`] plans it); on an object already marked it changes nothing.
    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> Result<DeleteOutcome>;

    /// Streams changes to the selected objects.
    ///
    /// # To ensure correctness
    /// Delivers every event from `from_revision` on, in revision order, exactly once, and the
    /// events of one revision back to back. A `Progress(r)` comes only after every event up to
    /// `r`. Fails with `Compacted` (at once, or later in the stream if the watcher falls too far
    /// behind) rather than skip an event. A slow watcher never stalls writers. An invalid
    /// selector fails the call with `Invalid`, as for [`list`](Store::list). The stream ends
    /// only after an error item: once the store is dropped (its last handle) or closed, it
    /// ends with `Unavailable` ("store closed"), after the events it had already received.
    async fn watch(&self, req: &WatchRequest) -> Result<WatchStream>;

    /// The current revision: that of the last write.
    async fn current_revision(&self) -> Result<u64>;

    /// Drops the history before `revision`: lists and watches from older revisions then fail
    /// with `Compacted`. Compacting to an already compacted revision is a no-op.
    ///
    /// # To ensure correctness
    /// Fails with `FutureRevision` past the current revision. Never changes current state.
    async fn compact(&self, revision: u64) -> Result<()>;

    /// Grants a lease that expires after `ttl` unless kept alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseInfo>;

    /// Renews a lease for another full `ttl`.
    ///
    /// # To ensure correctness
    /// Fails with `LeaseNotFound` once it has expired or been revoked: an expired lease never
    /// comes back to life.
    async fn keep_alive(&self, id: LeaseId) -> Result<LeaseInfo>;

    /// Revokes a lease at once, deleting every object attached to it (their `Deleted` events
    /// share one revision).
    async fn revoke_lease(&self, id: LeaseId) -> Result<()>;

    /// Reads a lease's time to live.
    async fn lease(&self, id: LeaseId) -> Result<LeaseInfo>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ObjectMeta;

    #[test]
    fn watch_events_give_their_object_and_key() {
        let mut obj = DynamicObject::new("Thing", ObjectMeta::namespaced("ns", "a"));
        obj.metadata.resource_version = 7;
        let obj = Arc::new(obj);
        let key = ObjectKey::new("Thing", "ns", "a");
        for event in
            [WatchEvent::Added(obj.clone()), WatchEvent::Modified(obj.clone()), WatchEvent::Deleted(obj.clone())]
        {
            assert!(Arc::ptr_eq(event.object().unwrap(), &obj), "{event:?}");
            assert_eq!(event.key(), Some(key.clone()));
            assert_eq!(event.revision(), 7);
        }
        let progress = WatchEvent::Progress(9);
        assert!(progress.object().is_none());
        assert_eq!(progress.key(), None);
        assert_eq!(progress.revision(), 9);
    }
}
