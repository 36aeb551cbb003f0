//! Recording [`Event`]s: why something happened, for the people who run the cluster.
//!
//! A [`Recorder`] is cheap to call from a reconcile: [`Recorder::record`] never waits and never
//! fails. It rate-limits per involved object (a burst, then one event per interval), hands the
//! event to a background writer through a bounded queue (a full queue drops the event and counts
//! it), and the writer folds repeats of the same event (same object, type, reason and message)
//! into one stored event whose `count` grows and whose `last_timestamp` moves.
//!
//! Old events expire by themselves: every write attaches the event to a store lease that lives
//! [`RecorderConfig::ttl`] (plus at most a tenth of it) from that write, so an event nobody
//! repeats disappears on every store, after restarts too, without a collector.
//!
//! ```no_run
//! use std::sync::Arc;
//! use orch_core::events::{Recorder, RecorderConfig};
//! use orch_core::kinds::{EventType, ObjectReference};
//! use orch_core::Store;
//!
//! # async fn run(store: Arc<dyn Store>) {
//! let recorder = Recorder::new(store, "my-controller", RecorderConfig::default());
//! let web = ObjectReference { kind: "Deployment".into(), namespace: "default".into(), name: "web".into(), uid: String::new() };
//! recorder.record(&web, EventType::Normal, "ScalingRevision", "scaled web-6f9c up to 3");
//! recorder.flush().await; // only tests need to wait
//! # }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::api::Api;
use crate::error::Error;
use crate::hash::{short_name, stable_hash_parts};
use crate::kinds::{EVENT_MESSAGE_LIMIT, Event, EventType, ObjectReference};
use crate::meta::{Clock, LeaseId, ObjectMeta, Timestamp, TokioClock};
use crate::object::Object;
use crate::store::Store;

/// Where events about cluster-scoped objects (nodes) are kept.
pub const CLUSTER_EVENTS_NAMESPACE: &str = "default";

/// How a [`Recorder`] limits and keeps events.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// An event disappears this long after its last write (default 1 h).
    pub ttl: Duration,
    /// Events one object may get at once after a quiet spell (default 25).
    pub burst: u32,
    /// After the burst, one event per object per this interval (default 10 s).
    pub refill_every: Duration,
    /// Events waiting for the writer; beyond this they are dropped (default 4,096).
    pub queue: usize,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig { ttl: Duration::from_secs(3600), burst: 25, refill_every: Duration::from_secs(10), queue: 4096 }
    }
}

/// Records events for one component (see the [module docs](self)). Clones share the queue,
/// the writer and the limits.
#[derive(Clone)]
pub struct Recorder {
    source: Arc<str>,
    tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("source", &self.source).finish()
    }
}

struct Shared {
    config: RecorderConfig,
    buckets: Mutex<HashMap<ObjectReference, Bucket>>,
    limited: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

/// A token bucket on the tokio clock.
struct Bucket {
    tokens: f64,
    at: Instant,
}

enum Message {
    Record(Record),
    Flush(oneshot::Sender<()>),
}

struct Record {
    involved: ObjectReference,
    type_: EventType,
    reason: String,
    message: String,
    at: Timestamp,
}

impl Recorder {
    /// A recorder whose events say they come from `source`, on a clock that follows
    /// `tokio::time` (virtual time on a paused runtime). Spawns its writer: call it inside a
    /// tokio runtime. The writer ends when the last clone of the recorder is dropped.
    pub fn new(store: Arc<dyn Store>, source: impl Into<String>, config: RecorderConfig) -> Self {
        Recorder::with_clock(store, source, config, Arc::new(TokioClock::from_system_time()))
    }

    /// Like [`new`](Recorder::new), with the clock that stamps events (use the manager's).
    pub fn with_clock(
        store: Arc<dyn Store>,
        source: impl Into<String>,
        config: RecorderConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let shared = Arc::new(Shared {
            config,
            buckets: Mutex::new(HashMap::new()),
            limited: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let source: Arc<str> = Arc::from(source.into());
        let writer =
            Writer { store, source: source.clone(), shared: shared.clone(), known: HashMap::new(), lease: None };
        tokio::spawn(writer.run(rx));
        Recorder { source, tx, shared, clock }
    }

    /// Records that something happened to `involved`. Never waits and never fails: an event
    /// over the object's rate limit, or one that finds the writer's queue full, is dropped and
    /// counted ([`limited`](Recorder::limited), [`dropped`](Recorder::dropped)). A message
    /// longer than [`EVENT_MESSAGE_LIMIT`] is cut; a reason that is not CamelCase is recorded
    /// as `Unspecified` rather than lost.
    pub fn record(&self, involved: &ObjectReference, type_: EventType, reason: &str, message: impl Into<String>) {
        if !self.take_token(involved) {
            self.shared.limited.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("orch_events_limited_total", "source" => self.source.to_string()).increment(1);
            return;
        }
        let mut message = message.into();
        if message.len() > EVENT_MESSAGE_LIMIT {
            let mut cut = EVENT_MESSAGE_LIMIT;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let reason = if crate::kinds::is_camel_case(reason) { reason.to_string() } else { "Unspecified".to_string() };
        let record = Record { involved: involved.clone(), type_, reason, message, at: self.clock.now() };
        if self.tx.try_send(Message::Record(record)).is_err() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("orch_events_dropped_total", "source" => self.source.to_string()).increment(1);
        }
    }

    /// Waits until every event recorded before this call has been written (or has failed).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Events refused by the per-object rate limit so far.
    pub fn limited(&self) -> u64 {
        self.shared.limited.load(Ordering::Relaxed)
    }

    /// Events dropped because the writer's queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Event writes the store refused (logged; the event is lost).
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    fn take_token(&self, involved: &ObjectReference) -> bool {
        let config = &self.shared.config;
        let burst = f64::from(config.burst.max(1));
        let refill = config.refill_every.as_secs_f64();
        let now = Instant::now();
        let mut buckets = self.shared.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= 16_384 {
            // Forget objects whose bucket has refilled: they would start full anyway.
            let full_after = config.refill_every.saturating_mul(config.burst.max(1));
            buckets.retain(|_, b| now.saturating_duration_since(b.at) < full_after);
        }
        let b = buckets.entry(involved.clone()).or_insert(Bucket { tokens: burst, at: now });
        if refill > 0.0 {
            b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() / refill).min(burst);
        } else {
            b.tokens = burst;
        }
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What identifies "the same event": repeats of it are folded into one stored event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EventKey {
    involved: ObjectReference,
    type_: EventType,
    reason: String,
    message: String,
}

impl EventKey {
    /// Where the event is stored: the involved object's namespace, under a name derived from
    /// the key, so that every recorder (and this one after a restart) folds into the same event.
    fn location(&self, source: &str) -> (String, String) {
        let namespace = if self.involved.namespace.is_empty() {
            CLUSTER_EVENTS_NAMESPACE.to_string()
        } else {
            self.involved.namespace.clone()
        };
        let type_ = format!("{:?}", self.type_);
        let hash = stable_hash_parts([
            self.involved.kind.as_bytes(),
            self.involved.name.as_bytes(),
            self.involved.uid.as_bytes(),
            type_.as_bytes(),
            self.reason.as_bytes(),
            self.message.as_bytes(),
            source.as_bytes(),
        ]);
        let mut prefix: String = self.involved.name.chars().take(200).collect();
        while prefix.ends_with(['.', '-']) {
            prefix.pop();
        }
        (namespace, format!("{prefix}.{}", short_name(hash)))
    }
}

/// What the writer knows of an event it wrote.
struct Known {
    object: Object<Event>,
    written: Instant,
}

struct Writer {
    store: Arc<dyn Store>,
    source: Arc<str>,
    shared: Arc<Shared>,
    known: HashMap<EventKey, Known>,
    /// The lease new writes attach to, and when it was granted.
    lease: Option<(LeaseId, Instant)>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        while let Some(first) = rx.recv().await {
            // Take whatever else is waiting, and fold repeats before writing anything.
            let mut batch: Vec<(EventKey, u32, Timestamp, Timestamp)> = Vec::new();
            let mut index: HashMap<EventKey, usize> = HashMap::new();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Flush(done) => flushes.push(done),
                    Message::Record(r) => {
                        let key =
                            EventKey { involved: r.involved, type_: r.type_, reason: r.reason, message: r.message };
                        match index.get(&key) {
                            Some(&i) => {
                                batch[i].1 += 1;
                                batch[i].3 = r.at;
                            }
                            None => {
                                index.insert(key.clone(), batch.len());
                                batch.push((key, 1, r.at, r.at));
                            }
                        }
                    }
                }
                if batch.len() < 1024 {
                    next = rx.try_recv().ok();
                }
            }
            for (key, count, first, last) in batch {
                if let Err(e) = self.write(key, count, first, last).await {
                    self.shared.failed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("orch_events_failed_total", "source" => self.source.to_string()).increment(1);
                    tracing::warn!(error = %e, "an event could not be written");
                }
            }
            self.forget_expired();
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// The lease to attach a write to: a new one every tenth of the TTL, living TTL + a tenth.
    async fn lease(&mut self) -> Result<LeaseId, Error> {
        let ttl = self.shared.config.ttl.max(Duration::from_secs(1));
        let width = ttl / 10;
        match self.lease {
            Some((id, granted)) if granted.elapsed() < width => Ok(id),
            _ => {
                let info = self.store.grant_lease(ttl + width).await?;
                self.lease = Some((info.id, Instant::now()));
                Ok(info.id)
            }
        }
    }

    async fn write(&mut self, key: EventKey, count: u32, first: Timestamp, last: Timestamp) -> Result<(), Error> {
        let (namespace, name) = key.location(&self.source);
        let api: Api<Event> = Api::namespaced(self.store.clone(), namespace.clone());
        let lease = self.lease().await?;
        // A few rounds: a conflict means another recorder folded into the same event meanwhile.
        for _ in 0..4 {
            let current = match self.known.get(&key) {
                Some(k) => Some(k.object.clone()),
                None => api.get_opt(&name).await?,
            };
            let result = match current {
                Some(mut obj) => {
                    obj.spec.count = obj.spec.count.saturating_add(count);
                    obj.spec.last_timestamp = Some(last.max(obj.spec.last_timestamp.unwrap_or(last)));
                    obj.metadata.lease = Some(lease);
                    api.replace(&obj).await
                }
                None => {
                    let mut meta = ObjectMeta::namespaced(namespace.clone(), name.clone());
                    meta.lease = Some(lease);
                    let spec = Event {
                        involved_object: key.involved.clone(),
                        type_: key.type_,
                        reason: key.reason.clone(),
                        message: key.message.clone(),
                        count,
                        first_timestamp: Some(first),
                        last_timestamp: Some(last),
                        source: self.source.to_string(),
                    };
                    api.create(&Object::new(meta, spec)).await
                }
            };
            match result {
                Ok(stored) => {
                    self.known.insert(key, Known { object: stored, written: Instant::now() });
                    return Ok(());
                }
                Err(Error::Conflict { .. } | Error::NotFound(_) | Error::AlreadyExists(_)) => {
                    self.known.remove(&key);
                }
                Err(Error::LeaseNotFound(_)) => {
                    self.lease = None;
                    return Box::pin(self.write(key, count, first, last)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable {
            message: format!("event {namespace}/{name} kept changing under the recorder"),
            source: None,
        })
    }

    /// Forgets events whose lease has lapsed: the store has deleted them.
    fn forget_expired(&mut self) {
        let ttl = self.shared.config.ttl;
        self.known.retain(|_, k| k.written.elapsed() < ttl);
    }
}
