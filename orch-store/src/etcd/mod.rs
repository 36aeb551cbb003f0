//! [`EtcdStore`]: the etcd backend, for control planes that run on more than one machine.
//!
//! # How our semantics map onto etcd's
//!
//! | orch | etcd |
//! |---|---|
//! | global revision | etcd's revision (see below: shared by every prefix of one etcd) |
//! | `resource_version` / `create_revision` | the key's `mod_revision` / `create_revision` |
//! | create | a transaction: `mod_revision(key) == 0`, i.e. absent (plus the guard) → put |
//! | update, status update, delete | read, apply [`semantics`], then a transaction comparing the `mod_revision` read (plus the guard) |
//! | [`Guard`] (fencing token) | one more compare in the same transaction: `mod_revision(lock) == token` |
//! | list at a revision, pages | ranges read at one revision; every page at the first page's revision |
//! | label and field selectors | filtered here, on the decoded objects (etcd only knows keys) |
//! | watch from R | an etcd watch from R with previous values, re-opened from the last delivered revision whenever the connection drops |
//! | `Progress` | etcd progress requests, reported once the watch has stayed quiet a moment longer (see `ProgressState` in the source) |
//! | compaction to R, `Compacted` | etcd compaction at R - 1 (etcd's at R would drop a deletion made at R) plus the prefix's own floor R; etcd's "required revision has been compacted" answers |
//! | leases | etcd leases (whole seconds, at least etcd's minimum TTL); one keep-alive round trip per [`Store::keep_alive`] |
//!
//! Objects live under `{prefix}#o/{kind}/{namespace}!{name}` as JSON (`!` sorts below every
//! character a namespace or name may hold, so etcd's key order is namespace-then-name order).
//! Each orch cluster gets its own prefix, so several can share one etcd; a prefix cannot hold
//! `#`, so no cluster's keys fall inside another's range, even with prefixes like `orch` and
//! `orch/o/Node`.
//!
//! # Revisions are etcd's, and shared
//! etcd has one revision for its whole key space. Several prefixes on one etcd therefore share
//! it: a write in one cluster moves the revision every other cluster sees, so revisions of one
//! cluster have gaps, `current_revision` may be ahead of that cluster's last write, and
//! [`Store::compact`] compacts every prefix at once. Everything orch relies on still holds:
//! revisions only go up, resource versions are compare-and-swap tokens, and a watch from R
//! sees every event of its prefix after R exactly once.
//!
//! # Limits
//! - Plain `http://` endpoints without authentication: TLS and etcd users are not wired up yet.
//! - A compaction made outside this store (etcd's auto-compaction, or another client compacting
//!   at R directly) drops a deletion made exactly at R, as etcd does; compact through
//!   [`Store::compact`] to keep it.
//! - An event whose previous value etcd no longer has (the first one after a compaction point)
//!   is judged on its new value alone by selectors, and a deletion then carries only the
//!   object's identity.
//! - Progress on etcd 3.4 rests on the quiet period described at `ProgressState` (source): a
//!   guess that can only be wrong if etcd holds back queued events for longer than that.
//! - Replaying history is as fast as etcd catches a watcher up: at most 1,000 revisions per
//!   100 ms, each event with a read of its previous value (about 5,000 events/s measured).

use orch_core::backoff::{Attempts, Backoff};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use futures::StreamExt;
use orch_core::store::semantics::{self, Plan};
use orch_core::store::{decode_continue, encode_continue};
use orch_core::{
    Clock, DeleteOptions, DeleteOutcome, DynamicObject, Error, Guard, LeaseId, LeaseInfo, ListRequest, ListResponse,
    ObjectKey, ObjectMeta, Result, Selection, Store, SystemClock, WatchEvent, WatchRequest, WatchStream, WriteOptions,
};
use tokio::time::Instant;

mod watch;
use watch::{ProgressState, Watch};

#[cfg(feature = "local-etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "local-etcd")))]
pub mod local;

#[cfg(feature = "local-etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "local-etcd")))]
pub use local::LocalEtcd;

/// Largest answer accepted from etcd. The client's default (4 MiB) is smaller than one watch
/// message can be: the deletions of a lease with thousands of objects, with their last states,
/// arrive as one message, and a watch that cannot decode it would fail on it forever.
const MAX_MESSAGE: usize = 1 << 30;

/// Longest lease TTL accepted, as for the other backends.
const MAX_LEASE_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Configures an [`EtcdStore`].
#[derive(Debug, Clone)]
pub struct EtcdStoreBuilder {
    endpoints: Vec<String>,
    prefix: String,
    clock: Arc<dyn Clock>,
    connect_timeout: Duration,
    request_timeout: Duration,
    page_size: usize,
}

impl EtcdStoreBuilder {
    /// Settings for a store on `endpoints` (such as `http://127.0.0.1:2379`) under `prefix`.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>, prefix: impl Into<String>) -> Self {
        EtcdStoreBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: prefix.into(),
            clock: Arc::new(SystemClock),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            page_size: 500,
        }
    }

    /// The clock for creation and deletion timestamps (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How long to wait for a connection to an endpoint (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one call may take before it fails with `Unavailable` (default 10 s). Watches are
    /// not limited: they reconnect on their own.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Keys read per etcd range request while listing (default 500).
    pub fn page_size(mut self, keys: usize) -> Self {
        self.page_size = keys;
        self
    }

    /// Checks the settings and connects.
    ///
    /// Fails with `Invalid` (naming the setting) on bad settings, and with `Unavailable` when no
    /// endpoint answers within the connect timeout.
    pub async fn connect(self) -> Result<EtcdStore> {
        let bad = |field: &str, reason: &str| Error::invalid("EtcdStore", field, reason);
        if self.endpoints.is_empty() {
            return Err(bad("endpoints", "must name at least one etcd endpoint"));
        }
        if let Some(i) = self.endpoints.iter().position(|e| e.trim().is_empty()) {
            return Err(bad(&format!("endpoints[{i}]"), "must not be empty"));
        }
        let p = &self.prefix;
        if p.is_empty() || p.len() > 128 {
            return Err(bad("prefix", "must be 1-128 characters"));
        }
        if !p.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c)) || p.ends_with('/') {
            return Err(bad("prefix", "must be letters, digits, '-', '_', '.' and '/', not ending in '/'"));
        }
        if self.page_size == 0 {
            return Err(bad("page_size", "must be >= 1"));
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(bad("timeout", "connect and request timeouts must be > 0"));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let connect = Client::connect(self.endpoints.clone(), Some(options));
        let client = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unavailable(format!("connecting to etcd at {:?}", self.endpoints), e)),
            Err(_) => {
                return Err(Error::Unavailable {
                    message: format!("connecting to etcd at {:?} timed out", self.endpoints),
                    source: None,
                });
            }
        };
        let store = EtcdStore {
            inner: Arc::new(Inner {
                kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
                watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
                client,
                endpoints: self.endpoints,
                prefix: self.prefix,
                clock: self.clock,
                timeout: self.request_timeout,
                page_size: self.page_size,
                lease_ttls: Mutex::new(HashMap::new()),
                dropped: tokio::sync::watch::channel(()).0,
            }),
        };
        // Fail now, not at the first call, when nothing answers.
        store.current_revision().await?;
        Ok(store)
    }
}

/// A [`Store`] on etcd: every orch semantic maps onto etcd's own (see the
/// [module documentation](self)), so any number of control-plane replicas on any machines can
/// share one store.
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// Clients for reads, writes and watches that accept answers as large as etcd sends.
    kv: etcd_client::KvClient,
    watch: etcd_client::WatchClient,
    endpoints: Vec<String>,
    prefix: String,
    clock: Arc<dyn Clock>,
    timeout: Duration,
    page_size: usize,
    /// Granted TTLs of the leases this store granted, so a renewal can say its TTL without a
    /// second round trip.
    lease_ttls: Mutex<HashMap<LeaseId, Duration>>,
    /// Never sent on: dropped with the store, which tells its watches (they hold only a weak
    /// reference) to end.
    dropped: tokio::sync::watch::Sender<()>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (such as `["http://127.0.0.1:2379"]`), keeping this
    /// cluster's objects under `prefix` (such as `orch/prod`), with default settings.
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use orch_core::{Api, Object, ObjectMeta, Store, kinds::Node};
    /// use orch_store::EtcdStore;
    ///
    /// # async fn demo() -> orch_core::Result<()> {
    /// let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(["http://127.0.0.1:2379"], "orch/prod").await?);
    /// let nodes: Api<Node> = Api::all(store);
    /// nodes.create(&Object::new(ObjectMeta::named("node-1"), Node::default())).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        prefix: impl Into<String>,
    ) -> Result<EtcdStore> {
        EtcdStoreBuilder::new(endpoints, prefix).connect().await
    }

    /// Settings for a store; finish with [`EtcdStoreBuilder::connect`].
    pub fn builder(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        prefix: impl Into<String>,
    ) -> EtcdStoreBuilder {
        EtcdStoreBuilder::new(endpoints, prefix)
    }

    /// The key prefix this store keeps its objects under.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and values

impl Inner {
    fn kind_prefix(&self, kind: &str) -> Vec<u8> {
        format!("{}#o/{kind}/", self.prefix).into_bytes()
    }

    fn key(&self, key: &ObjectKey) -> Vec<u8> {
        format!("{}#o/{}/{}!{}", self.prefix, key.kind, key.namespace, key.name).into_bytes()
    }

    /// The key range a selection covers.
    fn selection_prefix(&self, sel: &Selection) -> Vec<u8> {
        let mut p = self.kind_prefix(&sel.kind);
        if let Some(ns) = &sel.namespace {
            p.extend_from_slice(ns.as_bytes());
            p.push(b'!');
        }
        p
    }

    /// A key that never holds an object: current-revision reads and compaction probes use it.
    fn meta_key(&self) -> Vec<u8> {
        format!("{}#m/revision", self.prefix).into_bytes()
    }

    /// The key holding this prefix's compaction floor (see [`Store::compact`] below).
    fn floor_key(&self) -> Vec<u8> {
        format!("{}#m/floor", self.prefix).into_bytes()
    }

    /// The oldest revision this prefix serves lists and watches from (0: never compacted), and
    /// the floor key's `mod_revision` for a compare-and-swap.
    async fn floor(&self) -> Result<(u64, i64)> {
        let resp = self.range("read the compaction floor", self.floor_key(), GetOptions::new()).await;
        let resp = resp.map_err(CallError::into_error)?;
        let Some(kv) = resp.kvs().first() else { return Ok((0, 0)) };
        let floor = std::str::from_utf8(kv.value()).ok().and_then(|v| v.parse::<u64>().ok());
        let floor = floor.ok_or_else(|| Error::Unavailable {
            message: format!("etcd: {:?} holds {:?}, not a revision", self.prefix, String::from_utf8_lossy(kv.value())),
            source: None,
        })?;
        Ok((floor, kv.mod_revision()))
    }

    /// Fails with `Compacted` when `revision` is below this prefix's compaction floor.
    async fn check_floor(&self, revision: u64) -> Result<()> {
        let (floor, _) = self.floor().await?;
        if revision < floor { Err(Error::Compacted { requested: revision, compacted: floor }) } else { Ok(()) }
    }

    /// Runs one etcd call under the request timeout.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> std::result::Result<T, CallError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CallError::Etcd(what.to_string(), e)),
            Err(_) => Err(CallError::Timeout(what.to_string())),
        }
    }
}

/// The first key after `prefix` and everything it starts.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The stored form: the object without the revisions, which etcd keeps on the key itself.
fn encode(obj: &mut DynamicObject) -> Result<Vec<u8>> {
    let (rv, cr) = (obj.metadata.resource_version, obj.metadata.create_revision);
    obj.metadata.resource_version = 0;
    obj.metadata.create_revision = 0;
    let bytes = serde_json::to_vec(&*obj).map_err(|source| Error::Serialization {
        what: format!("{} for etcd", obj.key()),
        path: String::new(),
        source,
    });
    obj.metadata.resource_version = rv;
    obj.metadata.create_revision = cr;
    bytes
}

fn decode(kv: &KeyValue) -> Result<DynamicObject> {
    let mut obj: DynamicObject = serde_json::from_slice(kv.value()).map_err(|source| Error::Serialization {
        what: format!("etcd value at {:?}", String::from_utf8_lossy(kv.key())),
        path: String::new(),
        source,
    })?;
    obj.metadata.resource_version = to_u64(kv.mod_revision());
    obj.metadata.create_revision = to_u64(kv.create_revision());
    Ok(obj)
}

// ---------------------------------------------------------------------------------------------
// Errors

/// What one etcd call did wrong, before it is given an orch meaning.
#[derive(Debug)]
enum CallError {
    Etcd(String, etcd_client::Error),
    Timeout(String),
}

impl CallError {
    fn status_message(&self) -> &str {
        match self {
            CallError::Etcd(_, etcd_client::Error::GRpcStatus(s)) => s.message(),
            _ => "",
        }
    }

    fn is_lease_not_found(&self) -> bool {
        // etcd-client turns a renewal answered with TTL 0 into this error; its other
        // keep-alive errors are a broken stream, not a missing lease.
        matches!(self, CallError::Etcd(_, etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found"))
            || self.status_message().contains("lease not found")
    }

    fn is_compacted(&self) -> bool {
        self.status_message().contains("required revision has been compacted")
    }

    fn is_future_revision(&self) -> bool {
        self.status_message().contains("required revision is a future revision")
    }

    /// True when the request certainly never reached etcd (no connection could be made), so
    /// sending it again cannot apply it twice.
    fn never_sent(&self) -> bool {
        match self {
            CallError::Etcd(_, etcd_client::Error::GRpcStatus(s)) => {
                // 14 is gRPC's UNAVAILABLE (etcd-client does not re-export tonic's `Code`).
                i32::from(s.code()) == 14 && s.message().contains("connect")
            }
            CallError::Etcd(_, etcd_client::Error::TransportError(_)) => true,
            _ => false,
        }
    }

    fn into_error(self) -> Error {
        match self {
            CallError::Etcd(what, e) => unavailable(what, e),
            CallError::Timeout(what) => Error::Unavailable { message: format!("{what} timed out"), source: None },
        }
    }
}

fn unavailable(message: impl Into<String>, e: etcd_client::Error) -> Error {
    Error::Unavailable { message: format!("etcd: {}", message.into()), source: Some(Box::new(e)) }
}

// ---------------------------------------------------------------------------------------------
// Reads and writes

/// What a write found: the object and whether the guard held, read in one snapshot.
struct Found {
    current: Option<KeyValue>,
    guard_ok: bool,
}

/// Retries of a call that never reached etcd, before giving up.
const CONNECT_RETRIES: u32 = 5;

impl Inner {
    /// Sends a transaction, again if it certainly never got there (another endpoint may answer).
    async fn txn(&self, what: &str, txn: Txn) -> std::result::Result<etcd_client::TxnResponse, CallError> {
        let mut attempt = 0;
        loop {
            let mut kv = self.kv.clone();
            match self.call(what, kv.txn(txn.clone())).await {
                Err(e) if e.never_sent() && attempt < CONNECT_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                other => return other,
            }
        }
    }

    /// A range read, retried while no connection can be made (reads are safe to repeat).
    async fn range(
        &self,
        what: &str,
        key: Vec<u8>,
        options: GetOptions,
    ) -> std::result::Result<etcd_client::GetResponse, CallError> {
        let mut attempt = 0;
        loop {
            let mut kv = self.kv.clone();
            match self.call(what, kv.get(key.clone(), Some(options.clone()))).await {
                Err(e) if e.never_sent() && attempt < CONNECT_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                other => return other,
            }
        }
    }

    fn guard_compare(&self, guard: &Guard) -> Compare {
        Compare::mod_revision(self.key(&guard.key), CompareOp::Equal, to_i64(guard.resource_version))
    }

    /// Reads the object and the guard's lock in one snapshot.
    fn reads(&self, key: &[u8], guard: Option<&Guard>) -> Vec<TxnOp> {
        let mut ops = vec![TxnOp::get(key.to_vec(), None)];
        if let Some(g) = guard {
            ops.push(TxnOp::get(self.key(&g.key), None));
        }
        ops
    }

    /// Interprets the answers of [`reads`](Self::reads).
    fn found(responses: Vec<TxnOpResponse>, guard: Option<&Guard>) -> Found {
        let mut gets = responses.into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(mut g) => Some(g.take_kvs().into_iter().next()),
            _ => None,
        });
        let current = gets.next().flatten();
        let guard_ok = match guard {
            None => true,
            Some(g) => gets.next().flatten().is_some_and(|kv| to_u64(kv.mod_revision()) == g.resource_version),
        };
        Found { current, guard_ok }
    }

    async fn read_for_write(&self, key: &[u8], guard: Option<&Guard>) -> Result<Found> {
        let resp = self.txn("read before write", Txn::new().and_then(self.reads(key, guard))).await;
        let resp = resp.map_err(CallError::into_error)?;
        Ok(Self::found(resp.op_responses(), guard))
    }

    /// Commits a planned write if the object is still at `mod_revision` (0: absent) and the guard
    /// holds. `Ok(Err(found))` says what was found instead.
    async fn commit(
        &self,
        key: &[u8],
        mod_revision: i64,
        guard: Option<&Guard>,
        op: TxnOp,
        lease: Option<LeaseId>,
    ) -> Result<std::result::Result<u64, Found>> {
        let mut compares = vec![Compare::mod_revision(key.to_vec(), CompareOp::Equal, mod_revision)];
        if let Some(g) = guard {
            compares.push(self.guard_compare(g));
        }
        let txn = Txn::new().when(compares).and_then(vec![op]).or_else(self.reads(key, guard));
        let mut resp = match self.txn("write", txn).await {
            Ok(r) => r,
            Err(e) if e.is_lease_not_found() => return Err(Error::LeaseNotFound(lease.unwrap_or_default())),
            Err(e) => return Err(e.into_error()),
        };
        if resp.succeeded() {
            let rev = resp.take_header().map(|h| to_u64(h.revision())).unwrap_or_default();
            Ok(Ok(rev))
        } else {
            Ok(Err(Self::found(resp.op_responses(), guard)))
        }
    }

    fn put_op(&self, key: &[u8], obj: &mut DynamicObject) -> Result<TxnOp> {
        let value = encode(obj)?;
        let options = PutOptions::new().with_lease(obj.metadata.lease.map_or(0, to_i64));
        Ok(TxnOp::put(key.to_vec(), value, Some(options)))
    }

    /// Update and status update: read, plan, compare-and-swap.
    async fn update_with(
        &self,
        obj: DynamicObject,
        opts: &WriteOptions,
        plan: fn(&DynamicObject, DynamicObject) -> Result<Plan>,
    ) -> Result<Arc<DynamicObject>> {
        let key = obj.key();
        let k = self.key(&key);
        let expected = obj.metadata.resource_version;
        let guard = opts.guard.as_ref();
        let found = self.read_for_write(&k, guard).await?;
        let cur = self.check(&key, found, guard, Some(expected))?;
        let cur_rev = to_i64(cur.metadata.resource_version);
        let (mut next, removing) = match plan(&cur, obj)? {
            Plan::Unchanged => return Ok(Arc::new(cur)),
            Plan::Put(o) => (o, false),
            Plan::Remove(o) => (o, true),
        };
        let op = if removing { TxnOp::delete(k.clone(), None) } else { self.put_op(&k, &mut next)? };
        match self.commit(&k, cur_rev, guard, op, next.metadata.lease).await? {
            Ok(rev) => {
                next.metadata.resource_version = rev;
                Ok(Arc::new(next))
            }
            Err(found) => Err(self.lost_race(&key, found, guard, expected)),
        }
    }

    /// The object a write is aimed at, after the guard and resource-version checks.
    fn check(
        &self,
        key: &ObjectKey,
        found: Found,
        guard: Option<&Guard>,
        expected: Option<u64>,
    ) -> Result<DynamicObject> {
        if let (false, Some(g)) = (found.guard_ok, guard) {
            return Err(Error::PreconditionFailed { key: g.key.clone(), expected: g.resource_version });
        }
        let cur = decode(&found.current.ok_or_else(|| Error::NotFound(key.clone()))?)?;
        match expected {
            Some(rv) if rv != cur.metadata.resource_version => {
                Err(Error::Conflict { key: key.clone(), expected: rv, current: Some(Arc::new(cur)) })
            }
            _ => Ok(cur),
        }
    }

    /// The error for a compare-and-swap that lost to another write.
    fn lost_race(&self, key: &ObjectKey, found: Found, guard: Option<&Guard>, expected: u64) -> Error {
        if let (false, Some(g)) = (found.guard_ok, guard) {
            return Error::PreconditionFailed { key: g.key.clone(), expected: g.resource_version };
        }
        let current = match found.current.as_ref().map(decode) {
            Some(Ok(o)) => Some(Arc::new(o)),
            Some(Err(e)) => return e,
            None => None,
        };
        Error::Conflict { key: key.clone(), expected, current }
    }

    async fn revision(&self) -> Result<u64> {
        let resp = self.range("read the revision", self.meta_key(), GetOptions::new().with_count_only()).await;
        let resp = resp.map_err(CallError::into_error)?;
        Ok(resp.header().map(|h| to_u64(h.revision())).unwrap_or_default())
    }

    /// Maps a read at `requested` that etcd refused.
    async fn revision_error(&self, requested: u64, e: CallError) -> Error {
        if e.is_compacted() {
            let etcd_floor = self.compaction_floor(requested).await.unwrap_or(requested + 1);
            let own_floor = self.floor().await.map_or(0, |(f, _)| f);
            Error::Compacted { requested, compacted: etcd_floor.max(own_floor) }
        } else if e.is_future_revision() {
            let current = self.revision().await.unwrap_or_default();
            Error::FutureRevision { requested, current }
        } else {
            e.into_error()
        }
    }

    /// The oldest revision still available, learned from a watch that etcd cancels for
    /// starting below it (a range read's error does not say).
    async fn compaction_floor(&self, requested: u64) -> Option<u64> {
        let mut wc = self.watch.clone();
        let probe = async {
            let options = WatchOptions::new().with_start_revision(to_i64(requested));
            let mut stream = wc.watch(self.meta_key(), Some(options)).await.ok()?;
            while let Ok(Some(resp)) = stream.message().await {
                if resp.compact_revision() > 0 {
                    return Some(to_u64(resp.compact_revision()));
                }
                if !resp.created() {
                    return None;
                }
            }
            None
        };
        tokio::time::timeout(Duration::from_secs(2), probe).await.ok().flatten()
    }

    /// Reads one page of `req`: up to `limit` matching objects after `start`, at `revision`
    /// (`None`: now). Returns the items, whether more may follow, and the revision read at.
    async fn list_page(
        &self,
        sel: &Selection,
        revision: Option<u64>,
        start_after: Option<(String, String)>,
        limit: Option<usize>,
    ) -> Result<(Vec<Arc<DynamicObject>>, bool, u64)> {
        let prefix = self.selection_prefix(sel);
        let end = prefix_end(&prefix);
        let mut start = match &start_after {
            Some((ns, name)) => {
                let mut k = self.key(&ObjectKey::new(&sel.kind, ns, name));
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let filtering = !sel.labels.is_empty() || !sel.fields.is_empty();
        if let Some(r) = revision {
            self.check_floor(r).await?;
        }
        let mut revision = revision;
        let mut items = Vec::new();
        loop {
            // Without selectors every key is an item: read no more than the page needs (one
            // extra to learn whether another page follows).
            let batch = match limit {
                Some(l) if !filtering => (l - items.len() + 1).min(self.page_size),
                _ => self.page_size,
            };
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(to_i64(batch as u64));
            if let Some(r) = revision {
                options = options.with_revision(to_i64(r));
            }
            let mut resp = match self.range("list", start.clone(), options).await {
                Ok(r) => r,
                Err(e) => return Err(self.revision_error(revision.unwrap_or_default(), e).await),
            };
            let at = resp.take_header().map(|h| to_u64(h.revision())).unwrap_or_default();
            let revision = *revision.get_or_insert(at);
            let more = resp.more();
            let kvs = resp.take_kvs();
            if let Some(last) = kvs.last() {
                start = last.key().to_vec();
                start.push(0);
            }
            for kv in &kvs {
                let obj = decode(kv)?;
                if !sel.matches(&obj) {
                    continue;
                }
                if limit.is_some_and(|l| items.len() == l) {
                    return Ok((items, true, revision));
                }
                items.push(Arc::new(obj));
            }
            if !more || kvs.is_empty() {
                return Ok((items, false, revision));
            }
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &ObjectKey) -> Result<Arc<DynamicObject>> {
        let resp = self.inner.range("get", self.inner.key(key), GetOptions::new()).await;
        let resp = resp.map_err(CallError::into_error)?;
        let kv = resp.kvs().first().ok_or_else(|| Error::NotFound(key.clone()))?;
        Ok(Arc::new(decode(kv)?))
    }

    async fn list(&self, req: &ListRequest) -> Result<ListResponse> {
        semantics::check_selection(&req.selection)?;
        let limit = match req.limit {
            Some(0) => return Err(Error::invalid("ListRequest", "limit", "must be >= 1 when set")),
            other => other,
        };
        let (revision, start_after) = match &req.continue_token {
            Some(token) => {
                let (rev, ns, name) = decode_continue(token)?;
                (Some(rev), Some((ns, name)))
            }
            None => (req.revision, None),
        };
        if revision == Some(0) {
            return Err(Error::invalid("ListRequest", "revision", "must be >= 1 when set"));
        }
        let (items, more, revision) = self.inner.list_page(&req.selection, revision, start_after, limit).await?;
        let continue_token = match (more, items.last()) {
            (true, Some(last)) => Some(encode_continue(revision, &last.metadata.namespace, &last.metadata.name)),
            _ => None,
        };
        Ok(ListResponse { items, revision, continue_token })
    }

    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        let mut obj = semantics::create(obj, self.inner.clock.now())?;
        let key = obj.key();
        let k = self.inner.key(&key);
        let guard = opts.guard.as_ref();
        let op = self.inner.put_op(&k, &mut obj)?;
        match self.inner.commit(&k, 0, guard, op, obj.metadata.lease).await? {
            Ok(rev) => {
                obj.metadata.resource_version = rev;
                obj.metadata.create_revision = rev;
                Ok(Arc::new(obj))
            }
            Err(found) if !found.guard_ok => {
                let g = guard.cloned().unwrap_or(Guard { key, resource_version: 0 });
                Err(Error::PreconditionFailed { key: g.key, expected: g.resource_version })
            }
            Err(_) => Err(Error::AlreadyExists(key)),
        }
    }

    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        semantics::validate(&obj)?;
        self.inner.update_with(obj, opts, semantics::update).await
    }

    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        self.inner.update_with(obj, opts, semantics::update_status).await
    }

    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> Result<DeleteOutcome> {
        let k = self.inner.key(key);
        let guard = opts.guard.as_ref();
        loop {
            let found = self.inner.read_for_write(&k, guard).await?;
            let cur = self.inner.check(key, found, guard, opts.resource_version)?;
            semantics::check_delete_uid(key, &cur, opts)?;
            let cur_rev = to_i64(cur.metadata.resource_version);
            let (mut next, removing) = match semantics::delete(&cur, self.inner.clock.now(), opts.propagation) {
                Plan::Unchanged => return Ok(DeleteOutcome::Pending(Arc::new(cur))),
                Plan::Put(o) => (o, false),
                Plan::Remove(o) => (o, true),
            };
            let op = if removing { TxnOp::delete(k.clone(), None) } else { self.inner.put_op(&k, &mut next)? };
            match self.inner.commit(&k, cur_rev, guard, op, next.metadata.lease).await? {
                Ok(rev) => {
                    next.metadata.resource_version = rev;
                    let next = Arc::new(next);
                    return Ok(if removing { DeleteOutcome::Deleted(next) } else { DeleteOutcome::Pending(next) });
                }
                Err(found) => match opts.resource_version {
                    Some(rv) => {
                        if found.current.is_none() && found.guard_ok {
                            return Err(Error::NotFound(key.clone()));
                        }
                        return Err(self.inner.lost_race(key, found, guard, rv));
                    }
                    // The caller asked for no particular version: decide again on what is there now.
                    None => continue,
                },
            }
        }
    }

    async fn watch(&self, req: &WatchRequest) -> Result<WatchStream> {
        semantics::check_selection(&req.selection)?;
        if req.progress_interval.is_some_and(|i| i.is_zero()) {
            return Err(Error::invalid("WatchRequest", "progress_interval", "must be > 0 when set"));
        }
        let next = match req.from_revision {
            Some(0) => return Err(Error::invalid("WatchRequest", "from_revision", "must be >= 1 when set")),
            Some(r) => r,
            None => self.inner.revision().await? + 1,
        };
        let mut watch = Watch {
            inner: Arc::downgrade(&self.inner),
            dropped: self.inner.dropped.subscribe(),
            kind_prefix: self.inner.kind_prefix(&req.selection.kind),
            selection: req.selection.clone(),
            prefix: self.inner.selection_prefix(&req.selection),
            next,
            stream: None,
            buffer: VecDeque::new(),
            progress_interval: req.progress_interval,
            last_sent: Instant::now(),
            progress: ProgressState::Idle,
            failed: false,
        };
        // Open now, so an unreachable etcd fails the call instead of a silent retry loop.
        watch.open().await?;
        Ok(futures::stream::unfold(watch, |mut w| async move {
            let item = w.next_event().await?;
            Some((item, w))
        })
        .boxed())
    }

    async fn current_revision(&self) -> Result<u64> {
        self.inner.revision().await
    }

    /// Compacting to R keeps R's events: etcd's compaction at R would also drop a deletion made
    /// at R (its tombstone), so etcd is compacted at R - 1 and the prefix records R as its floor
    /// (under `{prefix}#m/floor`, a write of its own), below which lists and watches answer
    /// `Compacted`. Compaction is etcd's, so it applies to every prefix on the etcd.
    async fn compact(&self, revision: u64) -> Result<()> {
        let current = self.inner.revision().await?;
        if revision > current {
            return Err(Error::FutureRevision { requested: revision, current });
        }
        loop {
            let (floor, floor_rev) = self.inner.floor().await?;
            if revision <= floor {
                return Ok(());
            }
            let set = Txn::new()
                .when(vec![Compare::mod_revision(self.inner.floor_key(), CompareOp::Equal, floor_rev)])
                .and_then(vec![TxnOp::put(self.inner.floor_key(), revision.to_string(), None)]);
            let resp = self.inner.txn("record the compaction floor", set).await.map_err(CallError::into_error)?;
            if resp.succeeded() {
                break;
            }
        }
        if revision < 2 {
            return Ok(());
        }
        let mut kv = self.inner.kv.clone();
        match self.inner.call("compact", kv.compact(to_i64(revision - 1), None)).await {
            // Already compacted at or past it: nothing to do.
            Ok(_) => Ok(()),
            Err(e) if e.is_compacted() => Ok(()),
            Err(e) => Err(e.into_error()),
        }
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseInfo> {
        if ttl.is_zero() {
            return Err(Error::invalid("Lease", "ttl", "must be > 0"));
        }
        if ttl > MAX_LEASE_TTL {
            return Err(Error::invalid("Lease", "ttl", "must be at most ten years"));
        }
        // etcd counts whole seconds: round up, so a lease never lives shorter than asked.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let mut lc = self.inner.client.lease_client();
        let resp =
            self.inner.call("grant a lease", lc.grant(to_i64(secs), None)).await.map_err(CallError::into_error)?;
        let id = to_u64(resp.id());
        let granted = Duration::from_secs(to_u64(resp.ttl()));
        self.inner.lease_ttls.lock().unwrap_or_else(|e| e.into_inner()).insert(id, granted);
        Ok(LeaseInfo { id, ttl: granted, remaining: granted })
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<LeaseInfo> {
        let Ok(etcd_id) = i64::try_from(id) else { return Err(Error::LeaseNotFound(id)) };
        // etcd renews over a stream; one renewal is one stream with one request and its answer,
        // so nothing lingers to break when the connection does.
        let mut lc = self.inner.client.lease_client();
        match self.inner.call("renew a lease", lc.keep_alive(etcd_id)).await {
            Ok(_) => {}
            Err(e) if e.is_lease_not_found() => {
                self.forget_lease(id);
                return Err(Error::LeaseNotFound(id));
            }
            Err(e) => return Err(e.into_error()),
        }
        let known = self.inner.lease_ttls.lock().unwrap_or_else(|e| e.into_inner()).get(&id).copied();
        match known {
            Some(ttl) => Ok(LeaseInfo { id, ttl, remaining: ttl }),
            None => self.lease(id).await,
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        let Ok(etcd_id) = i64::try_from(id) else { return Err(Error::LeaseNotFound(id)) };
        let mut lc = self.inner.client.lease_client();
        let result = self.inner.call("revoke a lease", lc.revoke(etcd_id)).await;
        self.forget_lease(id);
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.is_lease_not_found() => Err(Error::LeaseNotFound(id)),
            Err(e) => Err(e.into_error()),
        }
    }

    async fn lease(&self, id: LeaseId) -> Result<LeaseInfo> {
        let Ok(etcd_id) = i64::try_from(id) else { return Err(Error::LeaseNotFound(id)) };
        let mut lc = self.inner.client.lease_client();
        let resp = match self.inner.call("read a lease", lc.time_to_live(etcd_id, None)).await {
            Ok(r) => r,
            Err(e) if e.is_lease_not_found() => return Err(Error::LeaseNotFound(id)),
            Err(e) => return Err(e.into_error()),
        };
        if resp.ttl() < 0 {
            self.forget_lease(id);
            return Err(Error::LeaseNotFound(id));
        }
        Ok(LeaseInfo {
            id,
            ttl: Duration::from_secs(to_u64(resp.granted_ttl())),
            remaining: Duration::from_secs(to_u64(resp.ttl())),
        })
    }
}

impl EtcdStore {
    fn forget_lease(&self, id: LeaseId) {
        self.inner.lease_ttls.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(ns: &str, name: &str) -> Vec<u8> {
        format!("p#o/Thing/{ns}!{name}").into_bytes()
    }

    proptest::proptest! {
        /// etcd's byte order of our keys is namespace-then-name order, so a range read returns
        /// objects in the order lists promise, and a namespace's keys are one contiguous range.
        #[test]
        fn key_order_is_namespace_then_name_order(
            a in ("[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", "[a-z0-9]([a-z0-9.-]{0,6}[a-z0-9])?"),
            b in ("[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", "[a-z0-9]([a-z0-9.-]{0,6}[a-z0-9])?"),
        ) {
            let (ka, kb) = (key_of(&a.0, &a.1), key_of(&b.0, &b.1));
            proptest::prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            let ns_prefix = format!("p#o/Thing/{}!", a.0).into_bytes();
            let end = prefix_end(&ns_prefix);
            let inside = kb.as_slice() >= ns_prefix.as_slice() && kb.as_slice() < end.as_slice();
            proptest::prop_assert_eq!(inside, a.0 == b.0);
        }
    }

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"a/b"), b"a/c");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn stored_values_leave_the_revisions_to_etcd() {
        let mut obj = DynamicObject::new("Thing", ObjectMeta::namespaced("ns", "a"));
        obj.metadata.resource_version = 7;
        obj.metadata.create_revision = 3;
        let bytes = encode(&mut obj).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert!(!text.contains("esourceVersion") && !text.contains("reateRevision"), "{text}");
        assert_eq!((obj.metadata.resource_version, obj.metadata.create_revision), (7, 3), "the caller's copy is kept");
    }

    #[tokio::test]
    async fn bad_settings_are_refused_naming_the_setting() {
        let cases: [(EtcdStoreBuilder, &str); 5] = [
            (EtcdStore::builder(Vec::<String>::new(), "p"), "endpoints"),
            (EtcdStore::builder([""], "p"), "endpoints[0]"),
            (EtcdStore::builder(["http://127.0.0.1:1"], ""), "prefix"),
            (EtcdStore::builder(["http://127.0.0.1:1"], "a b"), "prefix"),
            (EtcdStore::builder(["http://127.0.0.1:1"], "p").page_size(0), "page_size"),
        ];
        for (builder, field) in cases {
            let e = builder.connect().await.unwrap_err();
            assert!(e.is_invalid() && e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[tokio::test]
    async fn nothing_listening_is_unavailable_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let builder = EtcdStore::builder([format!("http://127.0.0.1:{port}")], "p")
            .connect_timeout(Duration::from_millis(300))
            .request_timeout(Duration::from_millis(300));
        let e = tokio::time::timeout(Duration::from_secs(10), builder.connect()).await.expect("gives up").unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    }
}
