//! [`RedbStore`]: the embedded durable backend, one file on local disk, built on
//! [redb](https://www.redb.org) (feature `redb`, on by default).
//!
//! # How it keeps the store contract
//! - **One record per commit.** Every change of a commit goes into one log record (table
//!   `orch.commits`, keyed by the commit's first revision), written in the same redb transaction
//!   as the counters (`orch.meta`) and the leases (`orch.leases`). A crash leaves the file at the
//!   last commit: never half a batch. The objects table (`orch.objects`) is a checkpoint: it holds
//!   every object as of the `checkpoint` revision, and the log holds everything after it. When
//!   enough of the log has fallen below the history floor, that part is folded into the objects
//!   table (the last state of each key it touched) and removed, in the same transaction as a
//!   commit. Each state is written once when it happens and at most once more when it is folded;
//!   a key rewritten many times before the fold is folded once.
//! - **Group commit, in two stages.** A writer thread decides each batch of queued writes
//!   (preconditions, revisions, the JSON of the log record) while a commit thread makes the
//!   previous ones durable: every batch decided during a commit's flush goes into the next
//!   commit, so one fsync covers all of them and throughput grows with the number of concurrent
//!   writers. A batch is decided on top of the batches still in flight, and is published to
//!   readers and answered only once its commit is durable, in order: every acknowledged write
//!   survives a crash, and no reader ever sees a write that could still be lost.
//! - **Reads from memory.** Current objects and the recent log live in an in-memory index (the
//!   one [`MemoryStore`] uses), updated after each commit. Gets, lists at
//!   past revisions and watches never touch the disk; watches replay from the log after a
//!   restart. History beyond the limit (or a [`compact`](Store::compact)) answers `Compacted`
//!   at once, also after a restart (the floor is recorded in the next commit). A `compact`
//!   folds the log below it into the objects table in its own commit; history trimmed by the
//!   limit leaves the file at the next fold.
//! - **Leases** are stored with their TTL. On open every lease restarts its full TTL from the
//!   time of opening (the downtime is not held against it), and an expiry or revocation deletes
//!   the lease and its objects in one commit, so an expired lease never comes back.
//! - **Failures.** A file that is not an orch store (another program's file, a damaged header)
//!   is refused with an error naming the path and the reason, and left untouched. A failed
//!   commit (disk full, I/O error) answers `Unavailable` with redb's error as the source and
//!   changes nothing in memory; so do the batches decided on top of it. `Unavailable` means not
//!   known to be durable: when the flush failed after the commit's pages were written, the
//!   commit may be in the file after a reopen, whole, never in part (as with any store that
//!   fsyncs). redb refuses further writes after a failed flush until the store is reopened. A
//!   file that cannot be opened for writing is served read-only: reads work, writes fail with
//!   `Unavailable`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use orch_core::store::semantics::{self, Plan};
use orch_core::{
    Clock, DeleteOptions, DeleteOutcome, DynamicObject, Error, Guard, LeaseId, LeaseInfo, ListRequest, ListResponse,
    ObjectKey, Result, Store, SystemClock, Timestamp, WatchRequest, WatchStream, WriteOptions,
};
use redb::{DatabaseError, ReadableDatabase, ReadableTable, StorageError, TableDefinition, TableError};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::memory::{Change, MemoryStore, MemoryStoreBuilder, State, key_of};

/// Store-wide counters: `format`, `revision`, `floor` (oldest revision of the history),
/// `checkpoint` (the objects table holds every change before it) and `next_lease`.
const META: TableDefinition<&str, u64> = TableDefinition::new("orch.meta");
/// (kind, namespace, name) → (its resource version, the object as JSON): every object as of the
/// checkpoint, that is with every change before the `checkpoint` revision applied. Later changes
/// are in the log; the objects table catches up when the log is trimmed.
const OBJECTS: TableDefinition<(&str, &str, &str), (u64, &[u8])> = TableDefinition::new("orch.objects");
/// First revision of a commit → every change of that commit, in order, as one record (see
/// [`encode_changes`]): a commit costs one insert, however many writes it carries.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("orch.commits");
/// Lease id → its time to live in nanoseconds.
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("orch.leases");

/// Version of the layout above, checked on open.
const FORMAT: u64 = 3;
/// The first bytes of every redb file (redb's file header), checked before redb sees the file so
/// a foreign file is refused without being touched.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
/// Most writes one commit takes; more wait for the next one.
const MAX_BATCH: usize = 4096;

/// Configures and opens a [`RedbStore`].
#[derive(Debug, Clone)]
pub struct RedbStoreBuilder {
    history_limit: usize,
    clock: Arc<dyn Clock>,
    read_only: bool,
    cache_size: usize,
}

impl Default for RedbStoreBuilder {
    fn default() -> Self {
        RedbStoreBuilder {
            history_limit: 100_000,
            clock: Arc::new(SystemClock),
            read_only: false,
            cache_size: 64 << 20,
        }
    }
}

impl RedbStoreBuilder {
    /// Keep at most this many events of history, in memory and in the file's log (default
    /// 100,000). Older events are trimmed: a watch or a list that needs them gets `Compacted`.
    pub fn history_limit(mut self, events: usize) -> Self {
        self.history_limit = events.max(1);
        self
    }

    /// The clock for creation and deletion timestamps (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Bytes of redb's page cache (default 64 MiB). Reads are served from the store's own
    /// in-memory index, so redb's cache only speeds up the B-tree pages writes touch; redb's own
    /// default (1 GiB) would mostly hold a second copy of the data.
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = bytes;
        self
    }

    /// Open the file read-only: reads work, every write fails with `Unavailable`, the file is
    /// never modified. A file that was not closed cleanly cannot be opened this way (it needs the
    /// recovery a writable open does).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Opens (or creates) the store file at `path` and loads it into memory. This blocks while it
    /// reads the file (well under a second for 100,000 objects); from async code, call it at
    /// startup or inside `spawn_blocking`.
    ///
    /// Fails with `Unavailable`, naming the path and the reason, when the file is not an orch
    /// store (another program's file, a damaged header), is already open in another process, or
    /// cannot be read; such a file is left as it was. A file that exists but cannot be opened for
    /// writing is opened read-only (see [`RedbStore::is_read_only`]).
    ///
    /// Inside a tokio runtime a background task expires leases on time; without one, due leases
    /// expire with the next write. Use a real-time runtime: commits happen on the store's own
    /// thread, and a paused tokio clock jumps ahead (expiring leases early) while it waits for one.
    pub fn open(self, path: impl AsRef<Path>) -> Result<RedbStore> {
        let path = path.as_ref();
        guard_panics(&path.display().to_string(), || self.open_file(path))
    }

    fn redb(&self) -> redb::Builder {
        let mut b = redb::Builder::new();
        b.set_cache_size(self.cache_size);
        b
    }

    fn open_file(self, path: &Path) -> Result<RedbStore> {
        let name = path.display().to_string();
        let refuse = |reason: String, source: Option<BoxError>| Error::Unavailable {
            message: format!("cannot open store file {name}: {reason}; the file was left untouched"),
            source,
        };
        if self.read_only {
            let db = guarded(|| self.redb().open_read_only(path)).map_err(|e| e.refuse(&refuse))?;
            return self.start(name, Db::ReadOnly(db), Some(ReadOnlyReason::Asked));
        }
        // Look at the file before redb does: redb initializes an empty file and repairs one that
        // was not closed cleanly, and neither must happen to a file that is not ours.
        match std::fs::File::open(path) {
            Ok(mut file) => {
                let meta = file.metadata().map_err(|e| refuse("cannot read its length".into(), Some(Box::new(e))))?;
                if meta.is_dir() {
                    return Err(refuse("it is a directory; give the path of a file in it".into(), None));
                }
                if meta.len() > 0 {
                    let mut head = [0u8; REDB_MAGIC.len()];
                    if file.read_exact(&mut head).is_err() || head != REDB_MAGIC {
                        return Err(refuse("it is not a redb database (a foreign or damaged file)".into(), None));
                    }
                    match guarded(|| self.redb().open_read_only(path)) {
                        Ok(db) => {
                            check_format(&db).map_err(|reason| refuse(reason, None))?;
                        }
                        // Not closed cleanly (a crash): the writable open below recovers it.
                        Err(OpenError::Redb(DatabaseError::RepairAborted)) => {}
                        Err(e) => return Err(e.refuse(&refuse)),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(refuse("cannot read it".into(), Some(Box::new(e)))),
        }
        match guarded(|| self.redb().create(path)) {
            Ok(db) => self.start(name, Db::Writable(db), None),
            Err(OpenError::Redb(e)) if is_read_only_error(&e) => {
                tracing::warn!(path = %name, error = %e, "store file is not writable: serving it read-only");
                let db = guarded(|| self.redb().open_read_only(path)).map_err(|e| e.refuse(&refuse))?;
                self.start(name, Db::ReadOnly(db), Some(ReadOnlyReason::Refused(Arc::new(e))))
            }
            Err(e) => Err(e.refuse(&refuse)),
        }
    }

    /// Opens a store on any redb storage backend (an in-memory one for tests, or one of your
    /// own); `name` stands for the file in errors. The file checks of [`open`](Self::open) that
    /// need a path are skipped; the format check is not.
    pub fn open_backend(self, name: &str, backend: impl redb::StorageBackend) -> Result<RedbStore> {
        guard_panics(name, || {
            let db = guarded(|| self.redb().create_with_backend(backend)).map_err(|e| {
                e.refuse(&|reason, source| Error::Unavailable {
                    message: format!("cannot open store {name}: {reason}"),
                    source,
                })
            })?;
            self.start(name.to_string(), Db::Writable(db), None)
        })
    }

    fn start(self, name: String, db: Db, read_only: Option<ReadOnlyReason>) -> Result<RedbStore> {
        let unavailable = |reason: String, source: Option<BoxError>| Error::Unavailable {
            message: format!("cannot open store file {name}: {reason}"),
            source,
        };
        if let Db::Writable(db) = &db {
            match check_format(db) {
                Ok(Format::Empty) => init(db).map_err(|e| unavailable("cannot initialize it".into(), Some(e)))?,
                Ok(Format::Orch) => {}
                Ok(Format::Orch2) => upgrade_from_2(db).map_err(|e| {
                    unavailable("cannot upgrade it from format 2; it was left as it was".into(), Some(e))
                })?,
                Err(reason) => return Err(unavailable(format!("{reason}; the file was left untouched"), None)),
            }
        } else if let Db::ReadOnly(db) = &db {
            match check_format(db).map_err(|reason| unavailable(reason, None))? {
                Format::Empty => return Err(unavailable("it holds no orch store and is read-only".into(), None)),
                Format::Orch2 => {
                    return Err(unavailable(
                        format!("it has orch store format 2; open it writable once to upgrade it to format {FORMAT}"),
                        None,
                    ));
                }
                Format::Orch => {}
            }
        }
        let index =
            MemoryStoreBuilder::default().history_limit(self.history_limit).clock(self.clock.clone()).build_index();
        let now = Instant::now();
        let loaded = match &db {
            Db::Writable(db) => load(db, &index, now),
            Db::ReadOnly(db) => load(db, &index, now),
        }
        .map_err(|(reason, source)| match source {
            // Say what is wrong, not only where.
            Some(why) => unavailable(format!("{reason}: {why}"), Some(why)),
            None => unavailable(reason, None),
        })?;
        let shared = Arc::new(Shared {
            index,
            leases: Mutex::new(loaded.leases),
            lease_changed: Arc::new(Notify::new()),
            commits: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let (tx, writer) = match db {
            Db::Writable(db) => {
                let (tx, rx) = mpsc::channel();
                let (to_commit, prepared) = mpsc::channel();
                let committer = Committer {
                    db,
                    rx: prepared,
                    tx: tx.clone(),
                    shared: shared.clone(),
                    floor: loaded.floor,
                    checkpoint: loaded.checkpoint,
                    segments: loaded.segments,
                    trim_after: (self.history_limit / 32).max(1),
                    next_lease: loaded.next_lease,
                    failed: None,
                };
                let committer = std::thread::Builder::new()
                    .name("orch-redb-commit".into())
                    .spawn(move || committer.run())
                    .map_err(|e| unavailable("cannot start its commit thread".into(), Some(Box::new(e))))?;
                let revision = shared.index.inner.read().revision;
                let writer = Writer {
                    rx,
                    shared: shared.clone(),
                    name: name.clone(),
                    next_lease: loaded.next_lease,
                    durable_next_lease: loaded.next_lease,
                    revision,
                    seq: 0,
                    epoch: 0,
                    pending: Pending::default(),
                    in_flight: VecDeque::new(),
                    queued: Vec::new(),
                    failing: false,
                    to_commit: Some(to_commit),
                    committer: Some(committer),
                };
                let thread = std::thread::Builder::new()
                    .name("orch-redb-writer".into())
                    .spawn(move || writer.run())
                    .map_err(|e| unavailable("cannot start its writer thread".into(), Some(Box::new(e))))?;
                (Some(tx), Some(thread))
            }
            Db::ReadOnly(_) => (None, None),
        };
        let handle = Arc::new(Handle { shared, tx, writer, name, read_only, clock: self.clock });
        if let Some(tx) = &handle.tx
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(expire_leases(Arc::downgrade(&handle.shared), tx.clone()));
        }
        Ok(RedbStore { inner: handle })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Db {
    Writable(redb::Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

/// Why a store refuses writes.
#[derive(Debug, Clone)]
enum ReadOnlyReason {
    Asked,
    Refused(Arc<DatabaseError>),
}

/// An open that failed inside redb, or panicked there (redb may panic on a file damaged outside
/// it; that must be an error, never a crash of the caller).
enum OpenError {
    Redb(DatabaseError),
    Panic(String),
}

impl OpenError {
    fn refuse(self, refuse: &dyn Fn(String, Option<BoxError>) -> Error) -> Error {
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

/// Runs a whole open (redb's and our own reading of the file) so that a panic inside redb on a
/// damaged file becomes an error.
fn guard_panics(name: &str, open: impl FnOnce() -> Result<RedbStore>) -> Result<RedbStore> {
    match std::panic::catch_unwind(AssertUnwindSafe(open)) {
        Ok(r) => r,
        Err(panic) => Err(Error::Unavailable {
            message: format!(
                "cannot open store file {name}: it is damaged (redb failed reading it: {}); the file was left untouched",
                panic_message(&*panic)
            ),
            source: None,
        }),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn guarded<T>(open: impl FnOnce() -> std::result::Result<T, DatabaseError>) -> std::result::Result<T, OpenError> {
    match std::panic::catch_unwind(AssertUnwindSafe(open)) {
        Ok(r) => r.map_err(OpenError::Redb),
        Err(panic) => Err(OpenError::Panic(panic_message(&*panic))),
    }
}

fn is_read_only_error(e: &DatabaseError) -> bool {
    use std::io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem};
    matches!(e, DatabaseError::Storage(StorageError::Io(io)) if matches!(io.kind(), PermissionDenied | ReadOnlyFilesystem))
}

#[derive(Debug, PartialEq, Eq)]
enum Format {
    /// A new, empty database: ours to initialize.
    Empty,
    /// An orch store of the current format.
    Orch,
    /// An orch store of format 2 (objects and a log entry per change), upgraded on a writable
    /// open.
    Orch2,
}

/// Tells an orch store from an empty database and from anything else, without writing.
fn check_format(db: &impl ReadableDatabase) -> std::result::Result<Format, String> {
    let txn = db.begin_read().map_err(|e| format!("redb cannot read it: {e}"))?;
    match txn.open_table(META) {
        Ok(meta) => match meta.get("format").map_err(|e| format!("redb cannot read it: {e}"))? {
            Some(v) if v.value() == FORMAT => Ok(Format::Orch),
            Some(v) if v.value() == 2 => Ok(Format::Orch2),
            Some(v) => Err(format!("it has orch store format {}, this version reads format {FORMAT}", v.value())),
            None => Err("it is not an orch store (no format marker)".into()),
        },
        Err(TableError::TableDoesNotExist(_)) => {
            let tables = txn.list_tables().map_err(|e| format!("redb cannot read it: {e}"))?.count();
            let multimaps = txn.list_multimap_tables().map_err(|e| format!("redb cannot read it: {e}"))?.count();
            if tables + multimaps == 0 {
                Ok(Format::Empty)
            } else {
                Err("it is a redb database of another program (no orch.meta table)".into())
            }
        }
        Err(e) => Err(format!("it is not an orch store ({e})")),
    }
}

fn init(db: &redb::Database) -> std::result::Result<(), BoxError> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert("format", FORMAT)?;
        meta.insert("revision", 0)?;
        meta.insert("floor", 1)?;
        meta.insert("checkpoint", 1)?;
        meta.insert("next_lease", 1)?;
        txn.open_table(OBJECTS)?;
        txn.open_table(LOG)?;
        txn.open_table(LEASES)?;
    }
    txn.commit()?;
    Ok(())
}

/// Upgrades a format-2 store in place, in one transaction: its objects table (which held every
/// object at the current revision, as this format's checkpoint does) is kept, and its per-change
/// log is dropped, so the revisions before the upgrade answer `Compacted` from then on.
fn upgrade_from_2(db: &redb::Database) -> std::result::Result<(), BoxError> {
    /// Format 2's log: (revision, index) → (deleted, previous version, state, previous state).
    type OldEntry = (bool, u64, &'static [u8], &'static [u8]);
    const OLD_LOG: TableDefinition<(u64, u32), OldEntry> = TableDefinition::new("orch.log");
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let revision = meta.get("revision")?.map(|v| v.value()).ok_or("its orch.meta table has no revision")?;
        meta.insert("format", FORMAT)?;
        meta.insert("checkpoint", revision + 1)?;
        meta.insert("floor", revision + 1)?;
        txn.open_table(LOG)?;
    }
    txn.delete_table(OLD_LOG)?;
    txn.commit()?;
    tracing::info!("upgraded an orch store from format 2 to format {FORMAT}; its history before the upgrade is gone");
    Ok(())
}

struct Loaded {
    floor: u64,
    checkpoint: u64,
    segments: VecDeque<Segment>,
    next_lease: LeaseId,
    leases: Leases,
}

/// What the writer remembers of one commit record in the log.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Its first and last revision.
    first: u64,
    last: u64,
    /// How many changes it holds.
    changes: usize,
}

/// Reads the whole store into the index; leases restart their TTL at `now`. The objects table
/// gives the state at the checkpoint and the log replays every later change on top of it,
/// checking that each change follows the state it replaced. Decoding runs on every core: it is
/// what bounds the time to reopen a large store.
fn load(
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

/// One change as stored in a commit record.
#[derive(Debug, PartialEq)]
struct Record<'a> {
    revision: u64,
    deleted: bool,
    prev_rv: u64,
    kind: &'a str,
    namespace: &'a str,
    name: &'a str,
    /// The new state as JSON (for a delete, the final state stamped with the deletion revision).
    json: &'a [u8],
}

/// Encodes the changes of one commit as one record: for each change its revision (u64), deleted
/// (u8), the resource version it replaced (u64), then kind, namespace, name and the state as
/// JSON, each with its length (u32) first; integers little-endian.
fn encode_changes(changes: &[Change]) -> std::result::Result<Vec<u8>, BoxError> {
    fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(changes.len() * 1280);
    for c in changes {
        let o = &c.object;
        out.extend_from_slice(&c.revision.to_le_bytes());
        out.push(u8::from(c.deleted));
        out.extend_from_slice(&c.prev.as_ref().map_or(0, |p| p.metadata.resource_version).to_le_bytes());
        put(&mut out, o.kind.as_bytes());
        put(&mut out, o.metadata.namespace.as_bytes());
        put(&mut out, o.metadata.name.as_bytes());
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut out, &**o)?;
        let len = u32::try_from(out.len() - at - 4).map_err(|_| format!("{} is too large to store", o.key()))?;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    Ok(out)
}

/// Decodes a record written by [`encode_changes`]; anything short, too long or not UTF-8 where
/// text belongs is an error saying what.
fn decode_changes(mut bytes: &[u8]) -> std::result::Result<Vec<Record<'_>>, String> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if bytes.len() < n {
            return Err(format!("it ends inside a change's {what}"));
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    fn u64_of(bytes: &mut &[u8], what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(take(bytes, 8, what)?.try_into().map_err(|_| what.to_string())?))
    }
    fn sized<'a>(bytes: &mut &'a [u8], what: &str) -> std::result::Result<&'a [u8], String> {
        let len = u32::from_le_bytes(take(bytes, 4, what)?.try_into().map_err(|_| what.to_string())?);
        take(bytes, len as usize, what)
    }
    fn text<'a>(bytes: &mut &'a [u8], what: &str) -> std::result::Result<&'a str, String> {
        std::str::from_utf8(sized(bytes, what)?).map_err(|_| format!("a change's {what} is not UTF-8"))
    }
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let revision = u64_of(&mut bytes, "revision")?;
        let deleted = match take(&mut bytes, 1, "deleted flag")?[0] {
            0 => false,
            1 => true,
            other => return Err(format!("a change's deleted flag is {other}")),
        };
        let prev_rv = u64_of(&mut bytes, "previous version")?;
        let (kind, namespace, name) =
            (text(&mut bytes, "kind")?, text(&mut bytes, "namespace")?, text(&mut bytes, "name")?);
        let json = sized(&mut bytes, "state")?;
        records.push(Record { revision, deleted, prev_rv, kind, namespace, name, json });
    }
    Ok(records)
}

fn decode_object(bytes: &[u8]) -> serde_json::Result<DynamicObject> {
    serde_json::from_slice(bytes)
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

/// A [`Store`] in one file on local disk, durable across crashes: the default backend.
///
/// See the [module documentation](self) for how it works. Cloning is cheap and shares the store;
/// the file is closed when the last clone is dropped (which waits for the commit in flight).
///
/// ```no_run
/// use std::sync::Arc;
/// use orch_core::{Api, Object, ObjectMeta, Store, kinds::Node};
/// use orch_store::RedbStore;
///
/// # #[tokio::main] async fn main() -> orch_core::Result<()> {
/// let store: Arc<dyn Store> = Arc::new(RedbStore::open("/var/lib/orch/store.redb")?);
/// let nodes: Api<Node> = Api::all(store);
/// nodes.create(&Object::new(ObjectMeta::named("node-1"), Node::default())).await?; // on disk now
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    /// The writer's queue; `None` when the store is read-only.
    tx: Option<mpsc::Sender<Op>>,
    writer: Option<JoinHandle<()>>,
    name: String,
    read_only: Option<ReadOnlyReason>,
    clock: Arc<dyn Clock>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The writer finishes what is queued and closes the file; waiting for it means the file
        // can be opened again as soon as the store is dropped. The lease task is told to stop.
        self.shared.closed.store(true, Ordering::Release);
        self.shared.lease_changed.notify_one();
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Op::Close);
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// What the writer thread and the store handles share.
struct Shared {
    /// Current objects and recent history, as of the last commit.
    index: MemoryStore,
    leases: Mutex<Leases>,
    /// Wakes the lease expiry task when a lease is granted.
    lease_changed: Arc<Notify>,
    /// Durable commits made since the store was opened.
    commits: AtomicU64,
    /// Set when the last handle is dropped: the lease task stops.
    closed: AtomicBool,
}

impl Shared {
    fn leases(&self) -> MutexGuard<'_, Leases> {
        // Every change to the lease table is prepared before it is applied: a panic elsewhere
        // cannot leave it half-written.
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Live leases. A lease leaves this table as soon as a batch decides to revoke or expire it
/// (and comes back only if that batch fails to commit).
#[derive(Default)]
struct Leases {
    live: HashMap<LeaseId, Lease>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    /// Objects attached to the lease, as of the last commit.
    keys: HashSet<ObjectKey>,
}

impl Leases {
    fn insert(&mut self, id: LeaseId, ttl: Duration, deadline: Instant) {
        self.deadlines.insert((deadline, id));
        self.live.insert(id, Lease { ttl, deadline, keys: HashSet::new() });
    }

    fn restore(&mut self, id: LeaseId, lease: Lease) {
        self.deadlines.insert((lease.deadline, id));
        self.live.insert(id, lease);
    }

    fn take(&mut self, id: LeaseId) -> Option<Lease> {
        let lease = self.live.remove(&id)?;
        self.deadlines.remove(&(lease.deadline, id));
        Some(lease)
    }

    fn due(&self, now: Instant) -> Vec<LeaseId> {
        self.deadlines.range(..=(now, LeaseId::MAX)).map(|(_, id)| *id).collect()
    }

    fn info(&self, id: LeaseId, now: Instant) -> Option<LeaseInfo> {
        let l = self.live.get(&id)?;
        Some(LeaseInfo { id, ttl: l.ttl, remaining: l.deadline.saturating_duration_since(now) })
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// A write queued for the writer thread. `now` is the caller's time (the tokio clock, which the
/// writer thread cannot read), used for lease deadlines.
enum Op {
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
    /// The store is dropped: commit what came before, close the file and stop. Sent by the
    /// handle's drop, so the file is closed when the last handle is gone even while the lease
    /// task still holds a sender.
    Close,
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
            Op::Close | Op::Committed { .. } => Instant::now(),
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
struct CommitFailed(Arc<dyn std::error::Error + Send + Sync>);

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
/// and hands each batch to the [`Committer`], which makes it durable on another. The two
/// overlap: while one batch is being committed the next is decided on top of it, through
/// [`Pending`]. A batch is published to the index and answered only once the committer reports
/// it durable, strictly in order.
struct Writer {
    /// Writes from the handles, and the committer's reports.
    rx: mpsc::Receiver<Op>,
    shared: Arc<Shared>,
    name: String,
    /// The next lease id to hand out, and the one recorded by the last durable batch.
    next_lease: LeaseId,
    durable_next_lease: LeaseId,
    /// The last revision decided (published or not).
    revision: u64,
    /// Sequence number of the next batch.
    seq: u64,
    /// Bumped once the batches that followed a failed commit are all answered.
    epoch: u64,
    pending: Pending,
    /// Batches handed to the committer and not yet reported, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Writes received and not yet decided.
    queued: Vec<Op>,
    /// A commit failed: no batch is decided until every batch in flight has been answered.
    failing: bool,
    to_commit: Option<mpsc::Sender<Prepared>>,
    committer: Option<JoinHandle<()>>,
}

/// Most batches in flight: the committer takes every batch decided while it was flushing into
/// its next commit, so this only bounds the memory of a stalled disk.
const MAX_IN_FLIGHT: usize = 64;

/// What batches in flight have written and readers cannot see yet.
#[derive(Default)]
struct Pending {
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
struct InFlight {
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
struct Prepared {
    seq: u64,
    epoch: u64,
    /// The log record of its changes, or why it could not be encoded.
    record: std::result::Result<Option<(Segment, Vec<u8>)>, String>,
    granted: Vec<(LeaseId, Duration)>,
    dropped: Vec<LeaseId>,
    next_lease: LeaseId,
    floor: u64,
    /// It compacts explicitly: the log below the new floor leaves the file in this commit.
    compacts: bool,
    revision: u64,
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
                    let plan = semantics::delete(&cur, wall);
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
            Op::Close | Op::Committed { .. } => return,
        };
        self.answers.push(answer);
    }
}

impl Writer {
    fn run(mut self) {
        let mut closing = false;
        loop {
            if !self.can_decide() {
                if closing && self.queued.is_empty() && self.in_flight.is_empty() {
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
    }

    /// Writes are waiting, and a batch of them may be decided now.
    fn can_decide(&self) -> bool {
        !self.failing && self.in_flight.len() < MAX_IN_FLIGHT && !self.queued.is_empty()
    }

    fn take(&mut self, msg: Op, closing: &mut bool) {
        match msg {
            Op::Close => *closing = true,
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

/// The committer thread: writes each decided batch in one durable transaction, in order, and
/// reports back. It owns the database: the file closes when it stops.
struct Committer {
    db: redb::Database,
    rx: mpsc::Receiver<Prepared>,
    /// The writer's queue, for reports.
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
    /// The history floor recorded in the file.
    floor: u64,
    /// The objects table holds every change before this revision; the log every later one.
    checkpoint: u64,
    /// The commit records in the log, oldest first.
    segments: VecDeque<Segment>,
    /// Records wholly below the floor are folded into the objects table once they hold this
    /// many changes: in bulk, so a key written many times meanwhile is written there once.
    trim_after: usize,
    /// The next lease id recorded in the file.
    next_lease: LeaseId,
    /// The epoch of the last failed commit, and its error: every batch of that epoch was
    /// decided on top of the failed one, and fails with it.
    failed: Option<(u64, CommitFailed)>,
}

impl Committer {
    fn run(mut self) {
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

/// Background task: asks the writer to expire leases when their deadline passes. It holds no
/// handle (so dropping the last handle closes the file at once), and stops when the store is
/// closed.
async fn expire_leases(shared: Weak<Shared>, tx: mpsc::Sender<Op>) {
    let Some(changed) = shared.upgrade().map(|s| s.lease_changed.clone()) else { return };
    loop {
        let notified = changed.notified();
        let next = {
            let Some(shared) = shared.upgrade() else { return };
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            shared.leases().deadlines.first().map(|(d, _)| *d)
        };
        match next {
            Some(d) if d <= Instant::now() => {
                let (reply, done) = oneshot::channel();
                if tx.send(Op::Expire { now: Instant::now(), reply }).is_err() {
                    return;
                }
                match done.await {
                    Ok(Ok(())) => {}
                    // The disk is failing: try again later rather than spin.
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
                    // The writer has stopped.
                    Err(_) => return,
                }
            }
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

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.inner;
        f.debug_struct("RedbStore")
            .field("path", &h.name)
            .field("revision", &h.shared.index.inner.read().revision)
            .field("read_only", &h.read_only.is_some())
            .finish()
    }
}

impl RedbStore {
    /// Opens (or creates) a store file with default settings; see [`RedbStoreBuilder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<RedbStore> {
        RedbStoreBuilder::default().open(path)
    }

    /// Settings for opening a store.
    pub fn builder() -> RedbStoreBuilder {
        RedbStoreBuilder::default()
    }

    /// The file (or the name given to [`RedbStoreBuilder::open_backend`]).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.inner.name)
    }

    /// True when the store refuses writes: opened with
    /// [`read_only`](RedbStoreBuilder::read_only), or its file could not be opened for writing.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only.is_some()
    }

    /// Number of objects stored (all kinds).
    pub fn len(&self) -> usize {
        self.inner.shared.index.len()
    }

    /// Durable commits (one fsync each) made since the store was opened: fewer than the writes
    /// when concurrent writers shared commits.
    pub fn commits(&self) -> u64 {
        self.inner.shared.commits.load(Ordering::Relaxed)
    }

    /// True when no object is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read_only_error(&self) -> Error {
        let h = &self.inner;
        match &h.read_only {
            Some(ReadOnlyReason::Refused(e)) => Error::Unavailable {
                message: format!("store file {} is read-only (it could not be opened for writing)", h.name),
                source: Some(Box::new(CommitFailed(e.clone()))),
            },
            _ => Error::Unavailable { message: format!("store file {} was opened read-only", h.name), source: None },
        }
    }

    async fn submit<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let Some(tx) = &self.inner.tx else { return Err(self.read_only_error()) };
        let stopped = || Error::Unavailable {
            message: format!("store file {}: the writer has stopped", self.inner.name),
            source: None,
        };
        let (reply, rx) = oneshot::channel();
        tx.send(op(reply)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Expires due leases now, durably.
    async fn expire(&self) -> Result<()> {
        let now = Instant::now();
        self.submit(|reply| Op::Expire { now, reply }).await
    }

    /// A lease that is live now; one past its deadline is expired (durably) first, so that no
    /// one is told it is gone while the file could still bring it back.
    async fn live_lease(&self, id: LeaseId, renew: bool) -> Result<LeaseInfo> {
        let now = Instant::now();
        {
            let mut leases = self.inner.shared.leases();
            let Some(l) = leases.live.get_mut(&id) else { return Err(Error::LeaseNotFound(id)) };
            if l.deadline > now {
                if renew {
                    let old = l.deadline;
                    l.deadline = now + l.ttl;
                    let new = l.deadline;
                    leases.deadlines.remove(&(old, id));
                    leases.deadlines.insert((new, id));
                }
                return leases.info(id, now).ok_or(Error::LeaseNotFound(id));
            }
        }
        if self.inner.tx.is_some() {
            self.expire().await?;
        }
        Err(Error::LeaseNotFound(id))
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &ObjectKey) -> Result<Arc<DynamicObject>> {
        self.inner.shared.index.get(key).await
    }

    async fn list(&self, req: &ListRequest) -> Result<ListResponse> {
        self.inner.shared.index.list(req).await
    }

    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        let obj = Box::new(semantics::create(obj, self.inner.clock.now())?);
        let (guard, now) = (opts.guard.clone(), Instant::now());
        self.submit(|reply| Op::Create { obj, guard, now, reply }).await
    }

    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        semantics::validate(&obj)?;
        let (obj, guard, now) = (Box::new(obj), opts.guard.clone(), Instant::now());
        self.submit(|reply| Op::Update { obj, guard, status: false, now, reply }).await
    }

    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        let (obj, guard, now) = (Box::new(obj), opts.guard.clone(), Instant::now());
        self.submit(|reply| Op::Update { obj, guard, status: true, now, reply }).await
    }

    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> Result<DeleteOutcome> {
        let (key, opts, wall, now) = (key.clone(), opts.clone(), self.inner.clock.now(), Instant::now());
        self.submit(|reply| Op::Delete { key, opts, wall, now, reply }).await
    }

    async fn watch(&self, req: &WatchRequest) -> Result<WatchStream> {
        self.inner.shared.index.watch(req).await
    }

    async fn current_revision(&self) -> Result<u64> {
        self.inner.shared.index.current_revision().await
    }

    async fn compact(&self, revision: u64) -> Result<()> {
        let now = Instant::now();
        self.submit(|reply| Op::Compact { revision, now, reply }).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseInfo> {
        if ttl.is_zero() {
            return Err(Error::invalid("Lease", "ttl", "must be > 0"));
        }
        let now = Instant::now();
        if now.checked_add(ttl).is_none() || ttl > Duration::from_secs(10 * 365 * 86_400) {
            return Err(Error::invalid("Lease", "ttl", "must be at most ten years"));
        }
        self.submit(|reply| Op::Grant { ttl, now, reply }).await
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<LeaseInfo> {
        if self.inner.tx.is_none() {
            return Err(self.read_only_error());
        }
        self.live_lease(id, true).await
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        let now = Instant::now();
        self.submit(|reply| Op::Revoke { id, now, reply }).await
    }

    async fn lease(&self, id: LeaseId) -> Result<LeaseInfo> {
        self.live_lease(id, false).await
    }
}
