//! The committer thread: makes each decided batch durable, several batches to one redb
//! transaction, and folds the log below the history floor into the objects table.

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use orch_core::LeaseId;
use redb::ReadableTable;

use super::format::{BoxError, LEASES, LOG, META, OBJECTS, Segment, decode_changes};
use super::recovery::panic_message;
use super::writer::{CommitFailed, Op, Prepared, Shared};

/// The committer thread: writes each decided batch in one durable transaction, in order, and
/// reports back. It owns the database: the file closes when it stops.
pub(super) struct Committer {
    pub(super) db: redb::Database,
    pub(super) rx: mpsc::Receiver<Prepared>,
    /// The writer's queue, for reports.
    pub(super) tx: mpsc::Sender<Op>,
    pub(super) shared: Arc<Shared>,
    /// The history floor recorded in the file.
    pub(super) floor: u64,
    /// The objects table holds every change before this revision; the log every later one.
    pub(super) checkpoint: u64,
    /// The commit records in the log, oldest first.
    pub(super) segments: VecDeque<Segment>,
    /// Records wholly below the floor are folded into the objects table once they hold this
    /// many changes: in bulk, so a key written many times meanwhile is written there once.
    pub(super) trim_after: usize,
    /// The next lease id recorded in the file.
    pub(super) next_lease: LeaseId,
    /// The epoch of the last failed commit, and its error: every batch of that epoch was
    /// decided on top of the failed one, and fails with it.
    pub(super) failed: Option<(u64, CommitFailed)>,
}

impl Committer {
    pub(super) fn run(mut self) {
        while let Ok(first) = self.rx.recv() {
            // Every batch decided while the last commit was flushing goes into this one.
            let mut group = vec![first];
            group.extend(self.rx.try_iter());
            // Batches decided on top of a failed commit fail with it.
            if let Some((epoch, failed)) = self.failed.clone() {
                let (doomed, rest): (Vec<_>, Vec<_>) = group.into_iter().partition(|p| p.epoch == epoch);
                group = rest;
                for p in doomed {
                    if self.tx.send(Op::Committed { seq: p.seq, result: Err(failed.clone()) }).is_err() {
                        return;
                    }
                }
            }
            if group.is_empty() {
                continue;
            }
            let result = match std::panic::catch_unwind(AssertUnwindSafe(|| self.commit(&group))) {
                Ok(r) => r,
                Err(panic) => Err(format!("redb failed: {}", panic_message(&*panic)).into()),
            };
            let result = result.map_err(|e| {
                let failed = CommitFailed(Arc::from(e));
                let epoch = group.iter().map(|p| p.epoch).max().unwrap_or_default();
                self.failed = Some((epoch, failed.clone()));
                failed
            });
            for p in &group {
                if self.tx.send(Op::Committed { seq: p.seq, result: result.clone() }).is_err() {
                    return;
                }
            }
        }
    }

    /// Writes a group of batches in one durable transaction: one log record per batch, the
    /// counters, the leases, and, when enough of the log has fallen below the floor, the fold of
    /// that part into the objects table. A group that changes nothing writes nothing.
    fn commit(&mut self, group: &[Prepared]) -> std::result::Result<(), BoxError> {
        let mut records = Vec::new();
        for p in group {
            if let Some(r) = p.record.as_ref().map_err(|e| BoxError::from(e.clone()))? {
                records.push(r);
            }
        }
        let Some(last) = group.last() else { return Ok(()) };
        let floor = group.iter().map(|p| p.floor).max().unwrap_or(self.floor);
        let leases_change = group.iter().any(|p| !p.granted.is_empty() || !p.dropped.is_empty());
        if records.is_empty() && !leases_change && floor <= self.floor {
            return Ok(());
        }
        // The oldest records, if they are all below the floor and hold enough changes to fold.
        let below = self.segments.iter().take_while(|s| s.last < floor);
        let (fold, folded_changes) = below.fold((0, 0), |(n, c), s| (n + 1, c + s.changes));
        // An explicit compaction folds whatever it put below the floor at once; trimming waits
        // until enough has gathered to be worth a fold.
        let compacts = group.iter().any(|p| p.compacts);
        let fold = if folded_changes >= self.trim_after || compacts { fold } else { 0 };
        let checkpoint = match self.segments.get(fold) {
            _ if fold == 0 => self.checkpoint,
            Some(next) => next.first,
            None => records.first().map_or(last.revision + 1, |(s, _)| s.first),
        };

        let txn = self.db.begin_write()?;
        {
            let mut log = txn.open_table(LOG)?;
            let mut meta = txn.open_table(META)?;
            if fold > 0 {
                // The state at the new checkpoint: the last change to each key in what is folded.
                let mut latest: BTreeMap<StoredKey, Option<(u64, Vec<u8>)>> = BTreeMap::new();
                for entry in log.range(..checkpoint)? {
                    let (at, record) = entry?;
                    let at = at.value();
                    let records = decode_changes(record.value())
                        .map_err(|e| format!("its log record at revision {at} is damaged: {e}"))?;
                    for r in records {
                        let key = (r.kind.to_string(), r.namespace.to_string(), r.name.to_string());
                        latest.insert(key, (!r.deleted).then(|| (r.revision, r.json.to_vec())));
                    }
                }
                let mut objects = txn.open_table(OBJECTS)?;
                for ((kind, namespace, name), state) in &latest {
                    let key = (kind.as_str(), namespace.as_str(), name.as_str());
                    match state {
                        Some((rv, json)) => {
                            objects.insert(key, (*rv, json.as_slice()))?;
                        }
                        None => {
                            objects.remove(key)?;
                        }
                    }
                }
                log.retain_in(..checkpoint, |_, _| false)?;
                meta.insert("checkpoint", checkpoint)?;
            }
            for (segment, bytes) in &records {
                log.insert(segment.first, bytes.as_slice())?;
            }
            if floor > self.floor {
                meta.insert("floor", floor)?;
            }
            // Every commit record names its revisions: the counter is needed only once the log
            // may hold none, after a fold. Writing it every time would cost a page per commit.
            if fold > 0 {
                meta.insert("revision", last.revision)?;
            }
            if last.next_lease != self.next_lease {
                meta.insert("next_lease", last.next_lease)?;
            }
            let mut table = txn.open_table(LEASES)?;
            for p in group {
                for (id, ttl) in &p.granted {
                    table.insert(*id, u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))?;
                }
                for id in &p.dropped {
                    table.remove(*id)?;
                }
            }
        }
        txn.commit()?;
        self.segments.drain(..fold);
        self.segments.extend(records.iter().map(|(s, _)| *s));
        self.checkpoint = checkpoint;
        self.floor = self.floor.max(floor);
        self.next_lease = last.next_lease;
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// (kind, namespace, name) as the objects table keys it.
type StoredKey = (String, String, String);
