//! The writer thread: decides each batch of queued writes (checks, revisions, the log record) on
//! top of the batches still in flight, hands it to the committer, and publishes and answers it
//! once it is durable.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use orch_core::store::semantics::{self, Plan};
use orch_core::{
    DeleteOptions, DeleteOutcome, DynamicObject, Error, Guard, LeaseId, LeaseInfo, ObjectKey, Result, Timestamp,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::format::{BoxError, Segment, encode_changes};
use super::leases::{Lease, Leases};
use crate::memory::MemoryStore;
use crate::memory::index::{Change, State};

/// Most writes one commit takes; more wait for the next one.
const MAX_BATCH: usize = 4096;

/// What the writer thread and the store handles share.
pub(super) struct Shared {
    /// Current objects and recent history, as of the last commit.
    pub(super) index: MemoryStore,
    pub(super) leases: Mutex<Leases>,
    /// Wakes the lease expiry task when a lease is granted.
    pub(super) lease_changed: Arc<Notify>,
    /// Durable commits made since the store was opened.
    pub(super) commits: AtomicU64,
    /// Set when the store is closed or its last handle is dropped: every call is refused, and
    /// the lease task stops.
    pub(super) closed: AtomicBool,
}

impl Shared {
    pub(super) fn leases(&self) -> MutexGuard<'_, Leases> {
        // Every change to the lease table is prepared before it is applied: a panic elsewhere
        // cannot leave it half-written.
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) type Reply<T> = oneshot::Sender<Result<T>>;

/// A write queued for the writer thread. `now` is the caller's time (the tokio clock, which the
/// writer thread cannot read), used for lease deadlines.
pub(super) enum Op {
    Create {
        obj: Box<DynamicObject>,
        guard: Option<Guard>,
        now: Instant,
        reply: Reply<Arc<DynamicObject>>,
    },
    Update {
        obj: Box<DynamicObject>,
        guard: Option<Guard>,
        status: bool,
        now: Instant,
        reply: Reply<Arc<DynamicObject>>,
    },
    Delete {
        key: ObjectKey,
        opts: DeleteOptions,
        wall: Timestamp,
        now: Instant,
        reply: Reply<DeleteOutcome>,
    },
    Compact {
        revision: u64,
        now: Instant,
        reply: Reply<()>,
    },
    Grant {
        ttl: Duration,
        now: Instant,
        reply: Reply<LeaseInfo>,
    },
    Revoke {
        id: LeaseId,
        now: Instant,
        reply: Reply<()>,
    },
    /// Expire due leases (a batch always does; this only makes sure a batch runs).
    Expire {
        now: Instant,
        reply: Reply<()>,
    },
    /// The store is closed or dropped: commit what came before, close the file and stop, then
    /// say so on `done`. Sent by [`RedbStore::close`](super::RedbStore::close) and by the
    /// handle's drop, so the file is closed when the last handle is gone even while the lease
    /// task still holds a sender.
    Close {
        done: Option<oneshot::Sender<()>>,
    },
    /// From the committer: the batch `seq` is durable, or failed.
    Committed {
        seq: u64,
        result: std::result::Result<(), CommitFailed>,
    },
}

impl Op {
    fn now(&self) -> Instant {
        match self {
            Op::Create { now, .. }
            | Op::Update { now, .. }
            | Op::Delete { now, .. }
            | Op::Compact { now, .. }
            | Op::Grant { now, .. }
            | Op::Revoke { now, .. }
            | Op::Expire { now, .. } => *now,
            Op::Close { .. } | Op::Committed { .. } => Instant::now(),
        }
    }
}

/// An answer held back until its batch is durable.
enum Answer {
    Object(Reply<Arc<DynamicObject>>, Result<Arc<DynamicObject>>),
    Delete(Reply<DeleteOutcome>, Result<DeleteOutcome>),
    Unit(Reply<()>, Result<()>),
    Lease(Reply<LeaseInfo>, Result<LeaseInfo>),
}

impl Answer {
    fn send(self) {
        // A caller that stopped waiting (its future was dropped) still had its write applied.
        let _ = match self {
            Answer::Object(tx, r) => tx.send(r).map_err(drop),
            Answer::Delete(tx, r) => tx.send(r).map_err(drop),
            Answer::Unit(tx, r) => tx.send(r).map_err(drop),
            Answer::Lease(tx, r) => tx.send(r).map_err(drop),
        };
    }

    fn fail(self, err: impl Fn() -> Error) {
        let _ = match self {
            Answer::Object(tx, _) => tx.send(Err(err())).map_err(drop),
            Answer::Delete(tx, _) => tx.send(Err(err())).map_err(drop),
            Answer::Unit(tx, _) => tx.send(Err(err())).map_err(drop),
            Answer::Lease(tx, _) => tx.send(Err(err())).map_err(drop),
        };
    }
}

/// A commit failure shared by every write of the batch (redb's errors are not `Clone`).
#[derive(Debug, Clone)]
pub(super) struct CommitFailed(pub(super) Arc<dyn std::error::Error + Send + Sync>);

impl fmt::Display for CommitFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for CommitFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The writer: decides queued writes in batches (checks, revisions, encoding) on its own thread
/// and hands each batch to the [`Committer`](super::committer::Committer), which makes it durable
/// on another. The two overlap: while one batch is being committed the next is decided on top of
/// it, through [`Pending`]. A batch is published to the index and answered only once the
/// committer reports it durable, strictly in order.
pub(super) struct Writer {
    /// Writes from the handles, and the committer's reports.
    pub(super) rx: mpsc::Receiver<Op>,
    pub(super) shared: Arc<Shared>,
    pub(super) name: String,
    /// The next lease id to hand out, and the one recorded by the last durable batch.
    pub(super) next_lease: LeaseId,
    pub(super) durable_next_lease: LeaseId,
    /// The last revision decided (published or not).
    pub(super) revision: u64,
    /// Sequence number of the next batch.
    pub(super) seq: u64,
    /// Bumped once the batches that followed a failed commit are all answered.
    pub(super) epoch: u64,
    pub(super) pending: Pending,
    /// Batches handed to the committer and not yet reported, oldest first.
    pub(super) in_flight: VecDeque<InFlight>,
    /// Writes received and not yet decided.
    pub(super) queued: Vec<Op>,
    /// A commit failed: no batch is decided until every batch in flight has been answered.
    pub(super) failing: bool,
    pub(super) to_commit: Option<mpsc::Sender<Prepared>>,
    pub(super) committer: Option<JoinHandle<()>>,
}

/// Most batches in flight: the committer takes every batch decided while it was flushing into
/// its next commit, so this only bounds the memory of a stalled disk.
const MAX_IN_FLIGHT: usize = 64;

/// What batches in flight have written and readers cannot see yet.
#[derive(Default)]
pub(super) struct Pending {
    /// The newest state of each key written in flight (`None`: deleted), with its batch.
    objects: HashMap<ObjectKey, (u64, Option<Arc<DynamicObject>>)>,
    /// Leases granted in flight.
    leases: HashMap<LeaseId, PendingLease>,
}

struct PendingLease {
    ttl: Duration,
    granted_at: Instant,
    /// The batch that revokes it, if one in flight does.
    revoked_in: Option<u64>,
    /// Its grant is durable (it stays here only because a batch in flight revokes it).
    durable: bool,
}

/// A batch handed to the committer, kept to be published or failed when it reports.
pub(super) struct InFlight {
    seq: u64,
    changes: Vec<Change>,
    granted: Vec<LeaseId>,
    /// Leases this batch removes, with their entries to put back if the commit fails (`None`
    /// for one granted by a batch in flight).
    dropped: Vec<(LeaseId, Option<Lease>)>,
    compact_to: Option<u64>,
    revision: u64,
    next_lease: LeaseId,
    answers: Vec<Answer>,
}

/// A decided batch, as the committer writes it.
pub(super) struct Prepared {
    pub(super) seq: u64,
    pub(super) epoch: u64,
    /// The log record of its changes, or why it could not be encoded.
    pub(super) record: std::result::Result<Option<(Segment, Vec<u8>)>, String>,
    pub(super) granted: Vec<(LeaseId, Duration)>,
    pub(super) dropped: Vec<LeaseId>,
    pub(super) next_lease: LeaseId,
    pub(super) floor: u64,
    /// It compacts explicitly: the log below the new floor leaves the file in this commit.
    pub(super) compacts: bool,
    pub(super) revision: u64,
}

/// A batch being decided: its writes, and those of the batches in flight, are seen through
/// `pending`, on top of the index.
struct Batch<'a> {
    st: &'a State,
    pending: &'a mut Pending,
    seq: u64,
    revision: u64,
    changes: Vec<Change>,
    granted: Vec<(LeaseId, Duration)>,
    dropped: Vec<(LeaseId, Option<Lease>)>,
    next_lease: LeaseId,
    compact_to: Option<u64>,
    answers: Vec<Answer>,
}

impl Batch<'_> {
    fn lookup(&self, key: &ObjectKey) -> Option<Arc<DynamicObject>> {
        match self.pending.objects.get(key) {
            Some((_, o)) => o.clone(),
            None => self.st.get(key).cloned(),
        }
    }

    fn check_guard(&self, guard: Option<&Guard>) -> Result<()> {
        if let Some(g) = guard
            && self.lookup(&g.key).map(|o| o.metadata.resource_version) != Some(g.resource_version)
        {
            return Err(Error::PreconditionFailed { key: g.key.clone(), expected: g.resource_version });
        }
        Ok(())
    }

    fn check_lease(&self, leases: &Leases, lease: Option<LeaseId>) -> Result<()> {
        match lease {
            Some(id)
                if !leases.live.contains_key(&id)
                    && self.pending.leases.get(&id).is_none_or(|p| p.revoked_in.is_some()) =>
            {
                Err(Error::LeaseNotFound(id))
            }
            _ => Ok(()),
        }
    }

    fn current(&self, key: &ObjectKey, guard: Option<&Guard>, expected: Option<u64>) -> Result<Arc<DynamicObject>> {
        self.check_guard(guard)?;
        let cur = self.lookup(key).ok_or_else(|| Error::NotFound(key.clone()))?;
        match expected {
            Some(rv) if rv != cur.metadata.resource_version => {
                Err(Error::Conflict { key: key.clone(), expected: rv, current: Some(cur) })
            }
            _ => Ok(cur),
        }
    }

    fn push(
        &mut self,
        key: ObjectKey,
        prev: Option<Arc<DynamicObject>>,
        obj: DynamicObject,
        deleted: bool,
    ) -> Arc<DynamicObject> {
        let obj = Arc::new(obj);
        self.pending.objects.insert(key, (self.seq, (!deleted).then(|| obj.clone())));
        self.changes.push(Change { revision: obj.metadata.resource_version, object: obj.clone(), prev, deleted });
        obj
    }

    /// Stamps a planned write with the next revision.
    fn apply(&mut self, key: ObjectKey, prev: Option<Arc<DynamicObject>>, plan: Plan) -> Option<Arc<DynamicObject>> {
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
        Some(self.push(key, prev, obj, deleted))
    }

    /// Deletes every object attached to a lease that is going away, all at one revision.
    fn drop_lease(&mut self, id: LeaseId, committed: Option<&HashSet<ObjectKey>>) {
        let in_flight =
            self.pending.objects.iter().filter(|(_, (_, o))| o.as_ref().is_some_and(|o| o.metadata.lease == Some(id)));
        let mut keys: Vec<ObjectKey> =
            committed.into_iter().flatten().cloned().chain(in_flight.map(|(k, _)| k.clone())).collect();
        keys.sort();
        keys.dedup();
        let targets: Vec<_> =
            keys.iter().filter_map(|k| self.lookup(k)).filter(|o| o.metadata.lease == Some(id)).collect();
        if targets.is_empty() {
            return;
        }
        self.revision += 1;
        for cur in targets {
            let mut last = (*cur).clone();
            last.metadata.version += 1;
            last.metadata.resource_version = self.revision;
            self.push(cur.key(), Some(cur), last, true);
        }
    }

    fn revoke(&mut self, leases: &mut Leases, id: LeaseId) -> bool {
        if let Some(p) = self.pending.leases.get_mut(&id)
            && p.revoked_in.is_none()
        {
            p.revoked_in = Some(self.seq);
            self.dropped.push((id, None));
            self.drop_lease(id, None);
            return true;
        }
        let Some(lease) = leases.take(id) else { return false };
        self.drop_lease(id, Some(&lease.keys));
        self.dropped.push((id, Some(lease)));
        true
    }

    fn decide(&mut self, leases: &mut Leases, op: Op) {
        let answer = match op {
            Op::Create { obj, guard, reply, .. } => {
                let r = (|| {
                    self.check_guard(guard.as_ref())?;
                    let key = obj.key();
                    if self.lookup(&key).is_some() {
                        return Err(Error::AlreadyExists(key));
                    }
                    self.check_lease(leases, obj.metadata.lease)?;
                    Ok(self.apply(key, None, Plan::Put(*obj)).expect("a put always writes"))
                })();
                Answer::Object(reply, r)
            }
            Op::Update { obj, guard, status, reply, .. } => {
                let r = (|| {
                    let key = obj.key();
                    let cur = self.current(&key, guard.as_ref(), Some(obj.metadata.resource_version))?;
                    let plan =
                        if status { semantics::update_status(&cur, *obj)? } else { semantics::update(&cur, *obj)? };
                    if let Plan::Put(o) = &plan
                        && o.metadata.lease != cur.metadata.lease
                    {
                        self.check_lease(leases, o.metadata.lease)?;
                    }
                    Ok(self.apply(key, Some(cur.clone()), plan).unwrap_or(cur))
                })();
                Answer::Object(reply, r)
            }
            Op::Delete { key, opts, wall, reply, .. } => {
                let r = (|| {
                    let cur = self.current(&key, opts.guard.as_ref(), opts.resource_version)?;
                    semantics::check_delete_uid(&key, &cur, &opts)?;
                    let plan = semantics::delete(&cur, wall, opts.propagation);
                    let removing = matches!(plan, Plan::Remove(_));
                    let obj = self.apply(key, Some(cur.clone()), plan).unwrap_or(cur);
                    Ok(if removing { DeleteOutcome::Deleted(obj) } else { DeleteOutcome::Pending(obj) })
                })();
                Answer::Delete(reply, r)
            }
            Op::Compact { revision, reply, .. } => {
                let r = if revision > self.revision {
                    Err(Error::FutureRevision { requested: revision, current: self.revision })
                } else {
                    self.compact_to = self.compact_to.max(Some(revision));
                    Ok(())
                };
                Answer::Unit(reply, r)
            }
            Op::Grant { ttl, now, reply } => {
                let id = self.next_lease;
                self.next_lease += 1;
                self.pending.leases.insert(id, PendingLease { ttl, granted_at: now, revoked_in: None, durable: false });
                self.granted.push((id, ttl));
                Answer::Lease(reply, Ok(LeaseInfo { id, ttl, remaining: ttl }))
            }
            Op::Revoke { id, reply, .. } => {
                let r = if self.revoke(leases, id) { Ok(()) } else { Err(Error::LeaseNotFound(id)) };
                Answer::Unit(reply, r)
            }
            Op::Expire { reply, .. } => Answer::Unit(reply, Ok(())),
            Op::Close { .. } | Op::Committed { .. } => return,
        };
        self.answers.push(answer);
    }
}

impl Writer {
    pub(super) fn run(mut self) {
        let mut closing = Vec::new();
        loop {
            if !self.can_decide() {
                if !closing.is_empty() && self.queued.is_empty() && self.in_flight.is_empty() {
                    break;
                }
                match self.rx.recv() {
                    Ok(msg) => self.take(msg, &mut closing),
                    Err(_) => break,
                }
            }
            while self.queued.len() < MAX_BATCH
                && let Ok(msg) = self.rx.try_recv()
            {
                self.take(msg, &mut closing);
            }
            if self.can_decide() {
                let rest = self.queued.split_off(self.queued.len().min(MAX_BATCH));
                let ops = std::mem::replace(&mut self.queued, rest);
                self.decide(ops);
            }
        }
        // Stopping the committer closes the file.
        self.to_commit = None;
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
        for done in closing.into_iter().flatten() {
            let _ = done.send(());
        }
    }

    /// Writes are waiting, and a batch of them may be decided now.
    fn can_decide(&self) -> bool {
        !self.failing && self.in_flight.len() < MAX_IN_FLIGHT && !self.queued.is_empty()
    }

    /// Queues a write, or records a report or a request to close (with whom to tell when the
    /// file is closed).
    fn take(&mut self, msg: Op, closing: &mut Vec<Option<oneshot::Sender<()>>>) {
        match msg {
            Op::Close { done } => closing.push(done),
            Op::Committed { seq, result } => self.committed(seq, result),
            op => self.queued.push(op),
        }
    }

    /// Decides a batch on top of the index and the batches in flight, and hands it over.
    fn decide(&mut self, ops: Vec<Op>) {
        let Some(now) = ops.iter().map(Op::now).max() else { return };
        let shared = self.shared.clone();
        let mut leases = shared.leases();
        let st = shared.index.inner.read();
        let seq = self.seq;
        self.seq += 1;
        let mut b = Batch {
            st: &st,
            pending: &mut self.pending,
            seq,
            revision: self.revision,
            changes: Vec::new(),
            granted: Vec::new(),
            dropped: Vec::new(),
            next_lease: self.next_lease,
            compact_to: None,
            answers: Vec::with_capacity(ops.len()),
        };
        // Due leases go first, so no write of this batch can attach to one.
        for id in leases.due(now) {
            b.revoke(&mut leases, id);
        }
        for op in ops {
            b.decide(&mut leases, op);
        }
        drop(leases);
        let floor = st.floor.max(b.compact_to.unwrap_or(0));
        let Batch { changes, granted, dropped, next_lease, compact_to, answers, revision, .. } = b;
        drop(st);
        self.revision = revision;
        self.next_lease = next_lease;

        let record = match (changes.first(), changes.last()) {
            (Some(f), Some(l)) => encode_changes(&changes)
                .map(|bytes| Some((Segment { first: f.revision, last: l.revision, changes: changes.len() }, bytes)))
                .map_err(|e| e.to_string()),
            _ => Ok(None),
        };
        let prepared = Prepared {
            seq,
            epoch: self.epoch,
            record,
            granted: granted.clone(),
            dropped: dropped.iter().map(|(id, _)| *id).collect(),
            next_lease,
            floor,
            compacts: compact_to.is_some(),
            revision,
        };
        let granted = granted.into_iter().map(|(id, _)| id).collect();
        self.in_flight.push_back(InFlight {
            seq,
            changes,
            granted,
            dropped,
            compact_to,
            revision,
            next_lease,
            answers,
        });
        let sent = self.to_commit.as_ref().is_some_and(|tx| tx.send(prepared).is_ok());
        if !sent {
            let failed = CommitFailed(Arc::from(BoxError::from("the committer thread has stopped")));
            self.committed(seq, Err(failed));
        }
    }

    /// The committer's report on the oldest batch in flight.
    fn committed(&mut self, seq: u64, result: std::result::Result<(), CommitFailed>) {
        if self.in_flight.front().is_none_or(|b| b.seq != seq) {
            return;
        }
        let Some(batch) = self.in_flight.pop_front() else { return };
        match result {
            Ok(()) => self.publish(batch),
            Err(failed) => {
                self.failing = true;
                self.fail(batch, failed);
            }
        }
        if self.failing && self.in_flight.is_empty() {
            // Every batch decided on top of the failed one has failed too: start again from
            // what is durable.
            self.pending = Pending::default();
            self.revision = self.shared.index.inner.read().revision;
            self.next_lease = self.durable_next_lease;
            self.epoch += 1;
            self.failing = false;
        }
    }

    fn fail(&mut self, batch: InFlight, failed: CommitFailed) {
        tracing::error!(path = %self.name, error = %failed, "store commit failed");
        // The leases this batch revoked live on. Objects attached to one by a batch published
        // while the revocation was in flight were linked to nothing, so each lease is linked
        // again to every object the index holds for it (the index is what is durable now: the
        // batches after this one fail too).
        let revived: HashSet<LeaseId> = batch
            .dropped
            .iter()
            .filter(|(id, lease)| lease.is_some() || self.pending.leases.get(id).is_some_and(|p| p.durable))
            .map(|(id, _)| *id)
            .collect();
        let attached =
            if revived.is_empty() { Vec::new() } else { self.shared.index.inner.read().attached_to(&revived) };
        let mut leases = self.shared.leases();
        for (id, lease) in batch.dropped {
            match lease {
                Some(lease) => leases.restore(id, lease),
                // Granted by an earlier batch that is durable: it lives on.
                None => {
                    if let Some(p) = self.pending.leases.remove(&id)
                        && p.durable
                    {
                        leases.insert(id, p.ttl, p.granted_at + p.ttl);
                    }
                }
            }
        }
        for id in &revived {
            if let Some(lease) = leases.live.get_mut(id) {
                lease.keys.clear();
            }
        }
        for (id, key) in attached {
            if let Some(lease) = leases.live.get_mut(&id) {
                lease.keys.insert(key);
            }
        }
        drop(leases);
        for a in batch.answers {
            a.fail(|| Error::Unavailable {
                message: format!(
                    "store file {}: the write is not known to be durable (its commit failed; if the flush failed \
                     after writing, it may be there, whole, once the store is reopened)",
                    self.name
                ),
                source: Some(Box::new(failed.clone())),
            });
        }
    }

    /// A durable batch: publish it to readers, then answer.
    fn publish(&mut self, batch: InFlight) {
        let InFlight { seq, changes, granted, dropped, compact_to, revision, next_lease, answers } = batch;
        self.durable_next_lease = next_lease;
        let mut relinks: Vec<(ObjectKey, Option<LeaseId>, Option<LeaseId>)> = Vec::new();
        for c in &changes {
            let key = c.object.key();
            let old = c.prev.as_ref().and_then(|p| p.metadata.lease);
            let new = if c.deleted { None } else { c.object.metadata.lease };
            if self.pending.objects.get(&key).is_some_and(|(s, _)| *s == seq) {
                self.pending.objects.remove(&key);
            }
            if old != new {
                relinks.push((key, old, new));
            }
        }
        let shared = &self.shared;
        if !changes.is_empty() || compact_to.is_some() {
            let mut st = shared.index.inner.write();
            for c in changes {
                st.record(c, true);
            }
            if let Some(r) = compact_to {
                st.compact(r);
            }
            st.trim(shared.index.inner.history_limit);
            drop(st);
            shared.index.inner.notify(revision);
        }
        if !granted.is_empty() || !relinks.is_empty() || !dropped.is_empty() {
            let mut leases = shared.leases();
            for id in &granted {
                match self.pending.leases.get_mut(id) {
                    Some(p) if p.revoked_in.is_none() => {
                        leases.insert(*id, p.ttl, p.granted_at + p.ttl);
                        self.pending.leases.remove(id);
                    }
                    Some(p) => p.durable = true,
                    None => {}
                }
            }
            for (id, lease) in &dropped {
                if lease.is_none() {
                    self.pending.leases.remove(id);
                }
            }
            for (key, old, new) in relinks {
                if let Some(l) = old.and_then(|id| leases.live.get_mut(&id)) {
                    l.keys.remove(&key);
                }
                if let Some(l) = new.and_then(|id| leases.live.get_mut(&id)) {
                    l.keys.insert(key);
                }
            }
            drop(leases);
            if !granted.is_empty() {
                shared.lease_changed.notify_one();
            }
        }
        for a in answers {
            a.send();
        }
    }
}
