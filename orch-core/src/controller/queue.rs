//! [`WorkQueue`]: the keyed queue between events and reconciles.
//!
//! What it promises (each property is tested below):
//! - a key waits in the queue at most once (adds of a waiting key merge);
//! - a key is never handed to two workers at once: adding it while it is being processed marks
//!   it dirty, and it comes back once the worker calls [`done`](WorkQueue::done);
//! - a delayed add never comes out before its time; of several delays for one key the earliest
//!   wins, and delays past `max_delay` are clamped;
//! - per-key exponential backoff that [`forget`](WorkQueue::forget) resets;
//! - optional global rate limit ([`RateLimiter`]);
//! - priorities with aging: a waiting key gains one level per `aging` interval, so low-priority
//!   work is never starved by a steady stream of high-priority work;
//! - adds never block and nothing is bounded that could deadlock a producer.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::backoff::Backoff;
use crate::rate::RateLimiter;
use tokio::time::Instant;

/// Settings of a [`WorkQueue`].
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// First backoff delay after a failure (default 5 ms); each further failure doubles it.
    pub base_backoff: Duration,
    /// Longest backoff delay (default 5 min).
    pub max_backoff: Duration,
    /// Longest delay any add may ask for (default 1 h): a far-future requeue is clamped to it.
    pub max_delay: Duration,
    /// Draw each backoff uniformly below its exponential delay (full jitter), so keys that
    /// failed together do not come back together (default off: the delays are exact).
    pub jitter: bool,
    /// Global rate limit: at most `per_second` keys handed out per second, with bursts of
    /// `burst`. `None` (the default) for no limit.
    pub rate_limit: Option<RateLimit>,
    /// A waiting key counts one priority level higher per this much waiting (default 1 s).
    pub aging: Duration,
}

/// A global rate limit (GCRA, through [`RateLimiter`]).
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Sustained keys per second.
    pub per_second: f64,
    /// Keys that may go out at once after a quiet spell.
    pub burst: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            base_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_secs(300),
            max_delay: Duration::from_secs(3600),
            jitter: false,
            rate_limit: None,
            aging: Duration::from_secs(1),
        }
    }
}

/// A deduplicating, delaying, rate-limiting priority work queue keyed by `K`.
#[derive(Debug)]
pub struct WorkQueue<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for WorkQueue<K> {
    fn clone(&self) -> Self {
        WorkQueue { inner: self.inner.clone() }
    }
}

#[derive(Debug)]
struct Inner<K> {
    state: Mutex<State<K>>,
    /// Signalled when a key may have become available.
    wake: Notify,
    config: QueueConfig,
    /// Label of this queue's metrics (`queue="…"`), if it reports any.
    metrics_name: Option<Arc<str>>,
}

#[derive(Debug)]
struct State<K> {
    /// Ready keys by priority level, oldest first within a level.
    levels: BTreeMap<i32, VecDeque<(K, Instant)>>,
    /// Every key in `levels`, with its level.
    queued: HashMap<K, i32>,
    /// Keys handed out and not yet done.
    processing: HashSet<K>,
    /// Keys added while processing: they go back in on `done`, at this priority.
    dirty: HashMap<K, i32>,
    /// Delayed keys, soonest first; stale entries are skipped against `due`.
    delayed: BinaryHeap<Reverse<Delayed<K>>>,
    due: HashMap<K, Instant>,
    seq: u64,
    failures: HashMap<K, u32>,
    limiter: Option<RateLimiter>,
    shut_down: bool,
}

/// Counters a queue keeps for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Keys ready to be handed out.
    pub ready: usize,
    /// Keys waiting out a delay.
    pub delayed: usize,
    /// Keys being processed.
    pub processing: usize,
}

impl<K: Hash + Eq + Clone + Send + 'static> Default for WorkQueue<K> {
    fn default() -> Self {
        Self::new(QueueConfig::default())
    }
}

impl<K: Hash + Eq + Clone + Send + 'static> WorkQueue<K> {
    /// An empty queue.
    pub fn new(config: QueueConfig) -> Self {
        let limiter = config.rate_limit.map(|r| RateLimiter::clamped(r.per_second, r.burst));
        WorkQueue {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    levels: BTreeMap::new(),
                    queued: HashMap::new(),
                    processing: HashSet::new(),
                    dirty: HashMap::new(),
                    delayed: BinaryHeap::new(),
                    due: HashMap::new(),
                    seq: 0,
                    failures: HashMap::new(),
                    limiter,
                    shut_down: false,
                }),
                wake: Notify::new(),
                config,
                metrics_name: None,
            }),
        }
    }

    /// An empty queue that reports `orch_queue_adds_total`, `orch_queue_depth` and
    /// `orch_queue_processing` under the label `queue=name` through the `metrics` facade.
    pub fn with_metrics(config: QueueConfig, name: &str) -> Self {
        let q = Self::new(config);
        let inner = Arc::try_unwrap(q.inner).unwrap_or_else(|_| unreachable!("a new queue has one owner"));
        WorkQueue { inner: Arc::new(Inner { metrics_name: Some(Arc::from(name)), ..inner }) }
    }

    fn report(&self, st: &State<K>, added: bool) {
        if let Some(name) = &self.inner.metrics_name {
            if added {
                metrics::counter!("orch_queue_adds_total", "queue" => name.to_string()).increment(1);
            }
            metrics::gauge!("orch_queue_depth", "queue" => name.to_string())
                .set((st.queued.len() + st.due.len()) as f64);
            metrics::gauge!("orch_queue_processing", "queue" => name.to_string()).set(st.processing.len() as f64);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // The state is updated in small, complete steps: a panic elsewhere cannot leave it torn.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `key` at priority 0.
    pub fn add(&self, key: K) {
        self.add_with_priority(key, 0);
    }

    /// Queues `key` at `priority` (higher first). A key already waiting keeps its place; a key
    /// being processed comes back once it is done.
    pub fn add_with_priority(&self, key: K, priority: i32) {
        let mut st = self.lock();
        if st.shut_down {
            return;
        }
        let newly_ready = st.push(key, priority);
        self.report(&st, true);
        if newly_ready {
            drop(st);
            self.inner.wake.notify_one();
        }
    }

    /// Queues `key` once `delay` has passed (clamped to `max_delay`). An earlier pending delay
    /// for the same key wins; a key that is already ready stays ready.
    pub fn add_after(&self, key: K, delay: Duration) {
        self.add_after_with_priority(key, delay, 0);
    }

    /// [`add_after`](WorkQueue::add_after) at a priority.
    pub fn add_after_with_priority(&self, key: K, delay: Duration, priority: i32) {
        if delay.is_zero() {
            return self.add_with_priority(key, priority);
        }
        let delay = delay.min(self.inner.config.max_delay);
        let due = Instant::now() + delay;
        let mut st = self.lock();
        if st.shut_down || st.queued.contains_key(&key) {
            return;
        }
        if st.due.get(&key).is_some_and(|d| *d <= due) {
            return;
        }
        st.due.insert(key.clone(), due);
        st.seq += 1;
        let seq = st.seq;
        st.delayed.push(Reverse(Delayed { due, seq, key, priority }));
        self.report(&st, true);
        drop(st);
        // A waiting worker may need to sleep less now.
        self.inner.wake.notify_one();
    }

    /// Queues `key` after its backoff delay: `base_backoff` doubled per failure since the last
    /// [`forget`](WorkQueue::forget), at most `max_backoff`. Returns the delay used.
    pub fn add_backoff(&self, key: K) -> Duration {
        let delay = {
            let mut st = self.lock();
            let n = st.failures.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            backoff(&self.inner.config, *n)
        };
        self.add_after(key, delay);
        delay
    }

    /// Failures counted for `key` since the last `forget`.
    pub fn failures(&self, key: &K) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// Resets `key`'s backoff (after a success).
    pub fn forget(&self, key: &K) {
        self.lock().failures.remove(key);
    }

    /// Marks `key` as processed. If it was added meanwhile, it is queued again.
    pub fn done(&self, key: &K) {
        let mut st = self.lock();
        st.processing.remove(key);
        self.report(&st, false);
        if let Some(priority) = st.dirty.remove(key)
            && !st.shut_down
            && st.push(key.clone(), priority)
        {
            drop(st);
            self.inner.wake.notify_one();
        }
    }

    /// Stops handing out keys once the ready ones are gone; pending adds are dropped. Every
    /// waiting [`next`](WorkQueue::next) returns `None`.
    pub fn shut_down(&self) {
        let mut st = self.lock();
        st.shut_down = true;
        st.levels.clear();
        st.queued.clear();
        st.delayed.clear();
        st.due.clear();
        st.dirty.clear();
        drop(st);
        self.inner.wake.notify_waiters();
    }

    /// True after [`shut_down`](WorkQueue::shut_down).
    pub fn is_shut_down(&self) -> bool {
        self.lock().shut_down
    }

    /// Current counts.
    pub fn stats(&self) -> QueueStats {
        let st = self.lock();
        QueueStats { ready: st.queued.len(), delayed: st.due.len(), processing: st.processing.len() }
    }

    /// Hands out the next key without waiting, if one is ready now.
    pub fn try_next(&self) -> Option<K> {
        let mut st = self.lock();
        let now = Instant::now();
        st.promote_due(now);
        st.take(now, &self.inner.config).ok()
    }

    /// Waits for the next key: the ready key of highest aged priority, subject to the rate
    /// limit. `None` once the queue is shut down.
    pub async fn next(&self) -> Option<K> {
        loop {
            let notified = self.inner.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait_until = {
                let mut st = self.lock();
                if st.shut_down {
                    return None;
                }
                let now = Instant::now();
                st.promote_due(now);
                match st.take(now, &self.inner.config) {
                    Ok(key) => {
                        let more = !st.queued.is_empty();
                        drop(st);
                        if more {
                            // Let another worker pick up the rest.
                            self.inner.wake.notify_one();
                        }
                        return Some(key);
                    }
                    Err(until) => until,
                }
            };
            match wait_until {
                Some(t) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// A delayed key, ordered by due time then insertion order (the key itself needs no order).
#[derive(Debug)]
struct Delayed<K> {
    due: Instant,
    seq: u64,
    key: K,
    priority: i32,
}

impl<K> PartialEq for Delayed<K> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl<K> Eq for Delayed<K> {}
impl<K> PartialOrd for Delayed<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K> Ord for Delayed<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

fn backoff(config: &QueueConfig, failures: u32) -> Duration {
    let backoff = Backoff::new(config.base_backoff, config.max_backoff);
    if config.jitter { backoff.full_jitter() } else { backoff }.delay(failures)
}

impl<K: Hash + Eq + Clone> State<K> {
    /// Puts a key in the ready set (or marks it dirty); true when it became newly ready.
    fn push(&mut self, key: K, priority: i32) -> bool {
        if self.processing.contains(&key) {
            let p = self.dirty.entry(key).or_insert(priority);
            *p = (*p).max(priority);
            return false;
        }
        if self.queued.contains_key(&key) {
            return false;
        }
        self.due.remove(&key);
        self.queued.insert(key.clone(), priority);
        self.levels.entry(priority).or_default().push_back((key, Instant::now()));
        true
    }

    /// Moves delayed keys whose time has come into the ready set.
    fn promote_due(&mut self, now: Instant) {
        while let Some(Reverse(d)) = self.delayed.peek() {
            if d.due > now {
                break;
            }
            let Some(Reverse(Delayed { due, key, priority, .. })) = self.delayed.pop() else { break };
            // Skip entries superseded by an earlier delay or by a plain add.
            if self.due.get(&key) == Some(&due) {
                self.due.remove(&key);
                self.push(key, priority);
            }
        }
    }

    /// Takes the next ready key, or says until when nothing can come out (`None`: until an add).
    fn take(&mut self, now: Instant, config: &QueueConfig) -> Result<K, Option<Instant>> {
        let next_delayed = self.delayed.peek().map(|Reverse(d)| d.due);
        if self.queued.is_empty() {
            return Err(next_delayed);
        }
        if let Some(limiter) = &self.limiter
            && let Err(next) = limiter.check()
        {
            return Err(Some(next));
        }
        // Highest aged priority wins; ties go to the higher base priority.
        let aging = config.aging.as_secs_f64().max(1e-9);
        let level = self
            .levels
            .iter()
            .filter_map(|(p, q)| q.front().map(|(_, t)| (*p, t)))
            .max_by(|(pa, ta), (pb, tb)| {
                let age = |t: &Instant| (now.saturating_duration_since(*t).as_secs_f64() / aging).floor();
                let ea = f64::from(*pa) + age(ta);
                let eb = f64::from(*pb) + age(tb);
                ea.total_cmp(&eb).then(pa.cmp(pb))
            })
            .map(|(p, _)| p)
            .expect("queued keys are in some level");
        let q = self.levels.get_mut(&level).expect("level exists");
        let (key, _) = q.pop_front().expect("level is not empty");
        if q.is_empty() {
            self.levels.remove(&level);
        }
        self.queued.remove(&key);
        self.processing.insert(key.clone());
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn advance(d: Duration) {
        tokio::time::advance(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn adds_merge_and_a_key_is_never_out_twice() {
        let q = WorkQueue::default();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.stats().ready, 2);
        let first = q.next().await.unwrap();
        assert_eq!(first, "a");
        q.add("a"); // while processing: held back
        assert_eq!(q.try_next(), Some("b"));
        assert_eq!(q.try_next(), None, "a is being processed");
        q.done(&"a");
        assert_eq!(q.try_next(), Some("a"), "the add during processing is kept");
        q.done(&"a");
        q.done(&"b");
        assert_eq!(q.try_next(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn delays_are_honoured_and_the_earliest_wins() {
        let q = WorkQueue::default();
        q.add_after("k", Duration::from_secs(10));
        q.add_after("k", Duration::from_secs(5));
        q.add_after("k", Duration::from_secs(8));
        advance(Duration::from_millis(4_999)).await;
        assert_eq!(q.try_next(), None);
        advance(Duration::from_millis(1)).await;
        assert_eq!(q.try_next(), Some("k"));
        q.done(&"k");
        advance(Duration::from_secs(10)).await;
        assert_eq!(q.try_next(), None, "superseded delays do not fire again");
        // A plain add makes a delayed key ready at once.
        q.add_after("j", Duration::from_secs(60));
        q.add("j");
        assert_eq!(q.try_next(), Some("j"));
    }

    #[tokio::test(start_paused = true)]
    async fn far_future_requeues_are_clamped() {
        let q = WorkQueue::new(QueueConfig { max_delay: Duration::from_secs(60), ..Default::default() });
        q.add_after("k", Duration::from_secs(86_400 * 365));
        let start = Instant::now();
        assert_eq!(q.next().await, Some("k"));
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_caps_and_resets() {
        let q = WorkQueue::new(QueueConfig {
            base_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..Default::default()
        });
        let delays: Vec<_> = (0..5).map(|_| q.add_backoff("k").as_millis()).collect();
        assert_eq!(delays, [10, 20, 40, 50, 50]);
        assert_eq!(q.failures(&"k"), 5);
        q.forget(&"k");
        assert_eq!(q.add_backoff("k"), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_keys_out() {
        let q = WorkQueue::new(QueueConfig {
            rate_limit: Some(RateLimit { per_second: 10.0, burst: 2 }),
            ..Default::default()
        });
        for k in 0..6 {
            q.add(k);
        }
        let start = Instant::now();
        for _ in 0..6 {
            let k = q.next().await.unwrap();
            q.done(&k);
        }
        // Two go at once (the burst), four more at 10/s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(399) && took <= Duration::from_millis(420), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn priorities_age_so_nothing_starves() {
        let q = WorkQueue::new(QueueConfig { aging: Duration::from_secs(1), ..Default::default() });
        q.add_with_priority(-5, -5);
        // A steady stream of priority-0 work, one new key every 100 ms.
        let mut served_low_at = None;
        for i in 0..200 {
            q.add_with_priority(i, 0);
            let k = q.next().await.unwrap();
            q.done(&k);
            if k == -5 {
                served_low_at = Some(i);
                break;
            }
            advance(Duration::from_millis(100)).await;
        }
        let at = served_low_at.expect("the low-priority key was starved");
        assert!((50..=70).contains(&at), "served after {at} rounds");
        // Without waiting, higher priority goes first.
        q.add_with_priority(1, 1);
        q.add_with_priority(2, 2);
        assert_eq!(q.try_next(), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn shut_down_wakes_waiters() {
        let q: WorkQueue<u32> = WorkQueue::default();
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.next().await }
        });
        tokio::task::yield_now().await;
        q.shut_down();
        assert_eq!(waiter.await.unwrap(), None);
        q.add(1);
        assert_eq!(q.try_next(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8),
        AddAfter(u8, u16),
        Take,
        Done(usize),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..6u8).prop_map(Op::Add),
            2 => (0..6u8, 1..500u16).prop_map(|(k, d)| Op::AddAfter(k, d)),
            3 => Just(Op::Take),
            2 => (0..4usize).prop_map(Op::Done),
            2 => (1..300u16).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Never loses a key, never hands out a key twice at once, never early.
        #[test]
        fn never_loses_duplicates_or_hurries(ops in proptest::collection::vec(op(), 1..120)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
            rt.block_on(async {
                let q = WorkQueue::default();
                let mut out: Vec<u8> = Vec::new();
                // Earliest time each key may come out, and whether it is owed to us.
                let mut owed: HashMap<u8, Instant> = HashMap::new();
                for op in ops {
                    match op {
                        Op::Add(k) => {
                            q.add(k);
                            owed.insert(k, Instant::now());
                        }
                        Op::AddAfter(k, ms) => {
                            let due = Instant::now() + Duration::from_millis(u64::from(ms));
                            q.add_after(k, Duration::from_millis(u64::from(ms)));
                            let e = owed.entry(k).or_insert(due);
                            *e = (*e).min(due);
                        }
                        Op::Take => {
                            if let Some(k) = q.try_next() {
                                assert!(!out.contains(&k), "{k} handed out while still processing");
                                let due = owed.remove(&k).expect("a key came out that nobody added");
                                assert!(due <= Instant::now(), "{k} came out early");
                                out.push(k);
                            }
                        }
                        Op::Done(i) => {
                            if i < out.len() {
                                let k = out.remove(i);
                                q.done(&k);
                            }
                        }
                        Op::Advance(ms) => advance(Duration::from_millis(u64::from(ms))).await,
                    }
                }
                for k in out.drain(..) {
                    q.done(&k);
                }
                // Drain: every key still owed comes out (once each), none more.
                advance(Duration::from_secs(1)).await;
                while let Some(k) = q.try_next() {
                    assert!(owed.remove(&k).is_some(), "{k} came out twice");
                    q.done(&k);
                }
                assert!(owed.is_empty(), "lost keys: {owed:?}");
            });
        }
    }
}
