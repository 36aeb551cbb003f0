//! Opening a store file: telling redb's refusals and panics apart, then loading the index from
//! the checkpoint and replaying the log on top of it, checking every change as it goes.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use orch_core::{DynamicObject, Error, LeaseId, ObjectKey};
use redb::{DatabaseError, ReadableDatabase, ReadableTable, StorageError};
use tokio::time::Instant;

use super::format::{BoxError, LEASES, LOG, META, OBJECTS, Segment, decode_changes, decode_object};
use super::leases::Leases;
use crate::memory::MemoryStore;
use crate::memory::index::{Change, key_of};

/// An open that failed inside redb, or panicked there (redb may panic on a file damaged outside
/// it; that must be an error, never a crash of the caller).
pub(super) enum OpenError {
    Redb(DatabaseError),
    Panic(String),
}

impl OpenError {
    pub(super) fn refuse(self, refuse: &dyn Fn(String, Option<BoxError>) -> Error) -> Error {
        match self {
            OpenError::Redb(DatabaseError::DatabaseAlreadyOpen) => {
                refuse("it is already open (in this or another process)".into(), None)
            }
            OpenError::Redb(DatabaseError::RepairAborted) => {
                refuse("it was not closed cleanly and needs the recovery a writable open does".into(), None)
            }
            OpenError::Redb(e @ DatabaseError::Storage(StorageError::Corrupted(_))) => {
                refuse("it is damaged".into(), Some(Box::new(e)))
            }
            OpenError::Redb(e) => refuse(format!("redb cannot open it ({e})"), Some(Box::new(e))),
            OpenError::Panic(msg) => refuse(format!("it is damaged (redb failed reading it: {msg})"), None),
        }
    }
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

pub(super) fn guarded<T>(
    open: impl FnOnce() -> std::result::Result<T, DatabaseError>,
) -> std::result::Result<T, OpenError> {
    match std::panic::catch_unwind(AssertUnwindSafe(open)) {
        Ok(r) => r.map_err(OpenError::Redb),
        Err(panic) => Err(OpenError::Panic(panic_message(&*panic))),
    }
}

pub(super) fn is_read_only_error(e: &DatabaseError) -> bool {
    use std::io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem};
    matches!(e, DatabaseError::Storage(StorageError::Io(io)) if matches!(io.kind(), PermissionDenied | ReadOnlyFilesystem))
}

pub(super) struct Loaded {
    pub(super) floor: u64,
    pub(super) checkpoint: u64,
    pub(super) segments: VecDeque<Segment>,
    pub(super) next_lease: LeaseId,
    pub(super) leases: Leases,
}

/// Reads the whole store into the index; leases restart their TTL at `now`. The objects table
/// gives the state at the checkpoint and the log replays every later change on top of it,
/// checking that each change follows the state it replaced. Decoding runs on every core: it is
/// what bounds the time to reopen a large store.
pub(super) fn load(
    db: &(impl ReadableDatabase + Sync),
    index: &MemoryStore,
    now: Instant,
) -> std::result::Result<Loaded, (String, Option<BoxError>)> {
    let io = |e: redb::Error| ("redb cannot read it".to_string(), Some(Box::new(e) as BoxError));
    let txn = db.begin_read().map_err(|e| io(e.into()))?;
    let meta = txn.open_table(META).map_err(|e| io(e.into()))?;
    let counter = |name: &str| -> std::result::Result<u64, (String, Option<BoxError>)> {
        meta.get(name)
            .map_err(|e| io(e.into()))?
            .map(|v| v.value())
            .ok_or_else(|| (format!("its orch.meta table has no {name:?} entry"), None))
    };
    // The revision is stored only when the log cannot tell it (see `Committer::commit`).
    let (stored_revision, floor, checkpoint, next_lease) =
        (counter("revision")?, counter("floor")?, counter("checkpoint")?, counter("next_lease")?);
    let mut leases = Leases::default();
    for entry in txn.open_table(LEASES).map_err(|e| io(e.into()))?.iter().map_err(|e| io(e.into()))? {
        let (id, ttl) = entry.map_err(|e| io(e.into()))?;
        let ttl = Duration::from_nanos(ttl.value());
        leases.insert(id.value(), ttl, now + ttl);
    }

    // The state at the checkpoint, in key order (as redb keeps the table).
    let mut stored = Vec::new();
    for entry in txn.open_table(OBJECTS).map_err(|e| io(e.into()))?.iter().map_err(|e| io(e.into()))? {
        let (key, value) = entry.map_err(|e| io(e.into()))?;
        let (kind, namespace, name) = key.value();
        let (rv, json) = value.value();
        stored.push((ObjectKey::new(kind, namespace, name), rv, json.to_vec()));
    }
    let decoded = on_every_core(&stored, |(key, rv, json)| -> std::result::Result<_, BoxError> {
        let obj = decode_object(json)?;
        if obj.metadata.resource_version != *rv || key_of(&obj) != (&key.kind, &key.namespace, &key.name) {
            return Err("it does not match its key".into());
        }
        Ok(Arc::new(obj))
    });
    let mut checkpoint_state = Vec::with_capacity(stored.len());
    for ((key, _, _), obj) in stored.iter().zip(decoded) {
        checkpoint_state.push(obj.map_err(|e| (format!("its record of {key} is damaged"), Some(e)))?);
    }
    drop(stored);
    if !checkpoint_state.is_sorted_by(|a, b| key_of(a) < key_of(b)) {
        checkpoint_state.sort_unstable_by(|a, b| key_of(a).cmp(&key_of(b)));
    }

    // Every later change, each checked on its own as it is read.
    let (segments, rows) = read_log(db, checkpoint).map_err(|(revision, e)| match revision {
        Some(r) => (format!("its log record at revision {r} is damaged"), Some(e)),
        None => ("redb cannot read it".to_string(), Some(e)),
    })?;
    let revision = stored_revision.max(segments.back().map_or(0, |s| s.last));
    let damaged = |revision: u64, why: String| {
        (format!("its log entry at revision {revision} is damaged"), Some(BoxError::from(why)))
    };
    let mut last = checkpoint.saturating_sub(1);
    for row in &rows {
        if row.revision < last || row.revision > revision {
            let why = format!("it is out of order (after {last}, store revision {revision})");
            return Err(damaged(row.revision, why));
        }
        last = row.revision;
    }
    // Then each key's changes together, in revision order, beside its state at the checkpoint
    // (both lists are in key order): every change must follow the state before it, and the
    // last one is the key's state now. The index is built in key order too.
    let order = by_key(&rows);
    let mut prevs: Vec<Option<Arc<DynamicObject>>> = vec![None; rows.len()];
    let mut current = Vec::with_capacity(checkpoint_state.len() + rows.len());
    let mut unchanged = checkpoint_state.into_iter().peekable();
    let mut broken: Option<u64> = None;
    for group in order.chunk_by(|&a, &b| key_of(&rows[a].object) == key_of(&rows[b].object)) {
        let key = key_of(&rows[group[0]].object);
        while let Some(obj) = unchanged.next_if(|o| key_of(o) < key) {
            current.push(obj);
        }
        let mut state = unchanged.next_if(|o| key_of(o) == key);
        for &i in group {
            let row = &rows[i];
            if state.as_ref().map_or(0, |p| p.metadata.resource_version) != row.prev_rv {
                broken = Some(broken.map_or(row.revision, |b| b.min(row.revision)));
            }
            prevs[i] = std::mem::replace(&mut state, (!row.deleted).then(|| row.object.clone()));
        }
        current.extend(state);
    }
    current.extend(unchanged);
    if let Some(revision) = broken {
        return Err(damaged(revision, "it does not follow the state before it".into()));
    }
    let changes: Vec<Change> = rows
        .into_iter()
        .zip(prevs)
        .filter(|(row, _)| row.revision >= floor)
        .map(|(row, prev)| Change { revision: row.revision, object: row.object, prev, deleted: row.deleted })
        .collect();
    for obj in &current {
        if let Some(lease) = obj.metadata.lease.and_then(|id| leases.live.get_mut(&id)) {
            lease.keys.insert(obj.key());
        }
    }
    let mut st = index.inner.write();
    st.restore(current);
    for change in changes {
        st.record(change, false);
    }
    st.revision = revision;
    st.floor = floor;
    st.trim(index.inner.history_limit);
    Ok(Loaded { floor: st.floor, checkpoint, segments, next_lease, leases })
}

/// One change of the log, checked on its own (it decodes, and matches its key and revision),
/// waiting to be checked against the state before it.
struct Replayed {
    revision: u64,
    deleted: bool,
    /// Resource version of the state it replaced (0 for a create).
    prev_rv: u64,
    object: Arc<DynamicObject>,
}

/// Positions of `rows` in key order, each key's rows in their own order. Kinds and namespaces
/// are few, so each row is sorted by their ranks and the first 16 bytes of its name, which
/// compare as integers without a trip to the strings; only rows whose names share those bytes
/// compare the names themselves. Parts are sorted on every core, then merged.
fn by_key(rows: &[Replayed]) -> Vec<usize> {
    let rank = |of: &dyn Fn(&Replayed) -> &str| -> Vec<u32> {
        let mut ids: hashbrown::HashMap<&str, u32> = hashbrown::HashMap::new();
        let mut last: Option<(&str, u32)> = None;
        let mut row_ids = Vec::with_capacity(rows.len());
        for row in rows {
            let name = of(row);
            let id = match last {
                Some((n, id)) if n == name => id,
                _ => {
                    let next = ids.len() as u32;
                    *ids.entry(name).or_insert(next)
                }
            };
            last = Some((name, id));
            row_ids.push(id);
        }
        let mut names: Vec<(&str, u32)> = ids.into_iter().collect();
        names.sort_unstable();
        let mut rank_of = vec![0; names.len()];
        for (rank, (_, id)) in names.into_iter().enumerate() {
            rank_of[id as usize] = rank as u32;
        }
        row_ids.into_iter().map(|id| rank_of[id as usize]).collect()
    };
    let kinds = rank(&|r| r.object.kind.as_str());
    let namespaces = rank(&|r| r.object.metadata.namespace.as_str());
    let prefix = |name: &str| {
        let mut bytes = [0u8; 16];
        let n = name.len().min(16);
        bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        u128::from_be_bytes(bytes)
    };
    let mut order: Vec<(u64, u128, usize)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| ((u64::from(kinds[i]) << 32) | u64::from(namespaces[i]), prefix(&r.object.metadata.name), i))
        .collect();
    // Zero padding sorts a name before any longer one it begins; equal prefixes fall through to
    // the whole names, then to the order of the rows.
    let compare = |a: &(u64, u128, usize), b: &(u64, u128, usize)| {
        (a.0, a.1)
            .cmp(&(b.0, b.1))
            .then_with(|| rows[a.2].object.metadata.name.cmp(&rows[b.2].object.metadata.name))
            .then(a.2.cmp(&b.2))
    };
    let threads = cores();
    if threads == 1 || order.len() < 16_384 {
        order.sort_unstable_by(compare);
    } else {
        let chunk = order.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for part in order.chunks_mut(chunk) {
                scope.spawn(move || part.sort_unstable_by(compare));
            }
        });
        // Sorted runs: the stable sort finds them and merges them.
        order.sort_by(compare);
    }
    order.into_iter().map(|(_, _, i)| i).collect()
}

/// A log that cannot be read: the revision of the damaged record, if that is the reason.
type LogError = (Option<u64>, BoxError);

/// Reads and decodes the log from `checkpoint` on, in revision order: each core takes a
/// contiguous range of records in its own read transaction, so reading and decoding both run in
/// parallel.
fn read_log<D: ReadableDatabase + Sync>(
    db: &D,
    checkpoint: u64,
) -> std::result::Result<(VecDeque<Segment>, Vec<Replayed>), LogError> {
    let io = |e: redb::Error| (None, Box::new(e) as BoxError);
    let (first, end) = {
        let txn = db.begin_read().map_err(|e| io(e.into()))?;
        let table = txn.open_table(LOG).map_err(|e| io(e.into()))?;
        let first = table.first().map_err(|e| io(e.into()))?.map(|(k, _)| k.value());
        let last = table.last().map_err(|e| io(e.into()))?.map(|(k, _)| k.value());
        match (first, last) {
            (Some(f), Some(l)) => (f, l + 1),
            _ => return Ok((VecDeque::new(), Vec::new())),
        }
    };
    if first < checkpoint {
        return Err((Some(first), "it comes before the checkpoint".into()));
    }
    let span = end - first;
    let parts = if span < 4096 { 1 } else { cores() as u64 };
    let read = |part: u64| -> std::result::Result<(Vec<Segment>, Vec<Replayed>), LogError> {
        let txn = db.begin_read().map_err(|e| io(e.into()))?;
        let table = txn.open_table(LOG).map_err(|e| io(e.into()))?;
        let range = (first + span * part / parts)..(first + span * (part + 1) / parts);
        let (mut segments, mut rows) = (Vec::new(), Vec::new());
        for entry in table.range(range).map_err(|e| io(e.into()))? {
            let (key, value) = entry.map_err(|e| io(e.into()))?;
            let at = key.value();
            let records = decode_changes(value.value()).map_err(|e| (Some(at), e.into()))?;
            match (records.first(), records.last()) {
                (Some(f), Some(l)) if f.revision == at => {
                    segments.push(Segment { first: at, last: l.revision, changes: records.len() })
                }
                _ => return Err((Some(at), "it does not start at its own revision".into())),
            }
            for r in records {
                let object = decode_object(r.json).map_err(|e| (Some(r.revision), e.into()))?;
                if object.metadata.resource_version != r.revision || key_of(&object) != (r.kind, r.namespace, r.name) {
                    return Err((Some(r.revision), "it does not match its key and revision".into()));
                }
                let (revision, deleted, prev_rv) = (r.revision, r.deleted, r.prev_rv);
                rows.push(Replayed { revision, deleted, prev_rv, object: Arc::new(object) });
            }
        }
        Ok((segments, rows))
    };
    let parts: Vec<_> = if parts == 1 {
        vec![read(0)]
    } else {
        let read = &read;
        std::thread::scope(|scope| {
            let parts: Vec<_> = (0..parts).map(|part| scope.spawn(move || read(part))).collect();
            // A panic while reading is passed on to the open, which turns it into an error.
            parts.into_iter().map(|p| p.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        })
    };
    let (mut segments, mut rows) = (VecDeque::new(), Vec::new());
    for part in parts {
        let (s, r) = part?;
        segments.extend(s);
        rows.extend(r);
    }
    Ok((segments, rows))
}

/// How many threads a reopen spreads its work over: every core, up to 16.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(16)
}

/// `f` of every item, on every available core, in order.
fn on_every_core<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = cores();
    if threads == 1 || items.len() < 2048 {
        return items.iter().map(f).collect();
    }
    let f = &f;
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<_>>()))
            .collect();
        // A panic while decoding is passed on to the open, which turns it into an error.
        parts.into_iter().flat_map(|p| p.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}
