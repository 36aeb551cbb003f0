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
//!   one [`MemoryStore`](crate::MemoryStore) uses), updated after each commit. Gets, lists at
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

use std::collections::VecDeque;
use std::fmt;
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use orch_core::store::semantics;
use orch_core::{
    Clock, DeleteOptions, DeleteOutcome, DynamicObject, Error, LeaseId, LeaseInfo, ListRequest, ListResponse,
    ObjectKey, Result, Store, SystemClock, WatchRequest, WatchStream, WriteOptions,
};
use redb::DatabaseError;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

mod committer;
mod format;
mod leases;
mod recovery;
mod writer;

use committer::Committer;
use format::{BoxError, FORMAT, Format, REDB_MAGIC, check_format, init, upgrade_from_2};
use recovery::{OpenError, guarded, is_read_only_error, load, panic_message};
use writer::{CommitFailed, Op, Pending, Reply, Shared, Writer};

use crate::memory::MemoryStoreBuilder;

/// Configures and opens a [`RedbStore`].
#[derive(Debug, Clone)]
pub struct RedbStoreBuilder {
    history_limit: usize,
    clock: Arc<dyn Clock>,
    read_only: bool,
    cache_size: usize,
    /// Fields indexed beyond the defaults (see [`MemoryStoreBuilder::index_field`]).
    extra_indexed_fields: Vec<(String, String)>,
}

impl Default for RedbStoreBuilder {
    fn default() -> Self {
        RedbStoreBuilder {
            history_limit: 100_000,
            clock: Arc::new(SystemClock),
            read_only: false,
            cache_size: 64 << 20,
            extra_indexed_fields: Vec::new(),
        }
    }
}

impl RedbStoreBuilder {
    /// Also index objects of `kind` by the field at `path` in memory, so a list or watch with an
    /// equality field selector on it reads its matches instead of every object of the kind. A
    /// workload's `spec.nodeName` is indexed by default.
    pub fn index_field(mut self, kind: impl Into<String>, path: impl Into<String>) -> Self {
        self.extra_indexed_fields.push((kind.into(), path.into()));
        self
    }

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
        let index = self
            .extra_indexed_fields
            .iter()
            .fold(MemoryStoreBuilder::default(), |b, (kind, path)| b.index_field(kind.clone(), path.clone()))
            .history_limit(self.history_limit)
            .clock(self.clock.clone())
            .build_index();
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

/// A [`Store`] in one file on local disk, durable across crashes: the default backend.
///
/// See the [module documentation](self) for how it works. Cloning is cheap and shares the store;
/// the file is closed when the last clone is dropped (which waits for the commit in flight), or
/// at once by [`close`](RedbStore::close), whatever clones remain.
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
            let _ = tx.send(Op::Close { done: None });
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

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

    /// Closes the store for every clone of this handle: commits the writes already queued
    /// (their callers get their answers as usual), closes the file and releases its lock, so the
    /// same path can be opened again at once, here or by another process, while clones of this
    /// handle still exist.
    ///
    /// Afterwards every call on any clone fails with `Unavailable` ("store file … is closed"),
    /// writes and reads alike (the file may have moved on under another opener), and open
    /// watches end with `Unavailable` ("store closed") once they have delivered the events
    /// committed before the close. Closing a closed store does nothing. Dropping the last
    /// handle closes the store too; `close` is for when you cannot be sure it is the last.
    ///
    /// ```no_run
    /// # async fn demo() -> orch_core::Result<()> {
    /// use orch_store::RedbStore;
    /// let store = RedbStore::open("/var/lib/orch/store.redb")?;
    /// let in_use_elsewhere = store.clone();
    /// store.close().await;
    /// let reopened = RedbStore::open("/var/lib/orch/store.redb")?; // the file is free
    /// # drop((in_use_elsewhere, reopened)); Ok(()) }
    /// ```
    pub async fn close(&self) {
        let h = &self.inner;
        h.shared.closed.store(true, Ordering::Release);
        h.shared.lease_changed.notify_one();
        if let Some(tx) = &h.tx {
            let (done, closed) = oneshot::channel();
            if tx.send(Op::Close { done: Some(done) }).is_ok() {
                // Without an answer, the writer stopped anyway, and closed the file as it did.
                let _ = closed.await;
            }
        }
        h.shared.index.inner.close();
    }

    /// True once [`close`](RedbStore::close) was called (on this handle or a clone).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed.load(Ordering::Acquire)
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() { Err(self.closed_error()) } else { Ok(()) }
    }

    fn closed_error(&self) -> Error {
        Error::Unavailable { message: format!("store file {} is closed", self.inner.name), source: None }
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
        self.check_open()?;
        let Some(tx) = &self.inner.tx else { return Err(self.read_only_error()) };
        let stopped = || {
            if self.is_closed() {
                return self.closed_error();
            }
            Error::Unavailable {
                message: format!("store file {}: the writer has stopped", self.inner.name),
                source: None,
            }
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
        self.check_open()?;
        self.inner.shared.index.get(key).await
    }

    async fn list(&self, req: &ListRequest) -> Result<ListResponse> {
        self.check_open()?;
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
        self.check_open()?;
        self.inner.shared.index.watch(req).await
    }

    async fn current_revision(&self) -> Result<u64> {
        self.check_open()?;
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
        self.check_open()?;
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
        self.check_open()?;
        self.live_lease(id, false).await
    }
}
