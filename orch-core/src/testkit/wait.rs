//! Helpers for tests that wait for something to happen: [`wait_until`] and [`eventually`] poll on
//! `tokio::time`, so under a paused clock they wait in virtual time, and [`FlakyStore`] breaks
//! watch streams on demand.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::meta::LeaseId;
use crate::object::{DynamicObject, ObjectKey};
use crate::store::{
    DeleteOptions, DeleteOutcome, LeaseInfo, ListRequest, ListResponse, Store, WatchRequest, WatchStream, WriteOptions,
};

/// How often [`wait_until`] and [`eventually`] look again.
const POLL: Duration = Duration::from_millis(10);

/// What a probe of [`wait_until`] answers: `true` or `Some(value)` once the wait is over.
pub trait Outcome {
    /// What the wait returns.
    type Output;
    /// `Some` once the wait is over.
    fn done(self) -> Option<Self::Output>;
}

impl Outcome for bool {
    type Output = ();
    fn done(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Output = T;
    fn done(self) -> Option<T> {
        self
    }
}

/// Polls `probe` until it answers `true` or `Some(value)`, and returns that value; panics naming
/// `what` when `limit` (on `tokio::time`) passes first.
///
/// ```no_run
/// # async fn demo(api: orch_core::Api<orch_core::kinds::Workload>) {
/// use std::time::Duration;
/// let node = orch_core::testkit::wait_until("web bound", Duration::from_secs(10), async || {
///     api.get("web").await.ok().and_then(|w| w.spec.node_name.clone())
/// })
/// .await;
/// # }
/// ```
pub async fn wait_until<O: Outcome>(what: &str, limit: Duration, mut probe: impl AsyncFnMut() -> O) -> O::Output {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await.done() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `count` workloads that `params` selects through `api` are in `phase` (and no
/// other workload it selects is elsewhere), and returns them; panics saying how many are in which
/// phase when `limit` (on `tokio::time`) passes first.
///
/// ```no_run
/// # async fn demo(api: orch_core::Api<orch_core::kinds::Workload>) {
/// use std::time::Duration;
/// use orch_core::kinds::Phase;
/// let params = orch_core::ListParams { labels: "app=web".parse().unwrap(), ..Default::default() };
/// let running = orch_core::testkit::wait_for_phase(&api, &params, Phase::Running, 3, Duration::from_secs(30)).await;
/// assert_eq!(running.len(), 3);
/// # }
/// ```
pub async fn wait_for_phase(
    api: &crate::Api<crate::kinds::Workload>,
    params: &crate::ListParams,
    phase: crate::kinds::Phase,
    count: usize,
    limit: Duration,
) -> Vec<crate::Object<crate::kinds::Workload>> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let listed = api.list(params).await.map(|l| l.items);
        if let Ok(items) = &listed
            && items.len() == count
            && items.iter().all(|w| w.status.phase == phase)
        {
            return listed.unwrap_or_default();
        }
        if tokio::time::Instant::now() >= deadline {
            let seen = match listed {
                Ok(items) => {
                    let mut by_phase = std::collections::BTreeMap::<String, usize>::new();
                    for w in &items {
                        *by_phase.entry(format!("{:?}", w.status.phase)).or_default() += 1;
                    }
                    format!("{} workloads: {by_phase:?}", items.len())
                }
                Err(e) => format!("the list failed: {e}"),
            };
            panic!("timed out after {limit:?} waiting for {count} workloads {phase:?}; {seen}");
        }
        tokio::time::sleep(POLL * 10).await;
    }
}

/// Polls `cond` until it holds; panics naming `what` when `limit` (on `tokio::time`) passes
/// first.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_until(what, limit, async || cond()).await
}

/// A store whose watch streams can be broken on demand, as a flaky network would: for testing
/// that a cache (or anything else that watches) resumes without losing or repeating an event.
#[derive(Debug, Clone)]
pub struct FlakyStore<S> {
    /// The store every call goes to.
    pub inner: S,
    breaks: Arc<watch::Sender<u64>>,
}

impl<S: Store> FlakyStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        FlakyStore { inner, breaks: Arc::new(watch::channel(0).0) }
    }

    /// Ends every open watch stream with an `Unavailable` error.
    pub fn break_watches(&self) {
        self.breaks.send_modify(|n| *n += 1);
    }
}

#[async_trait]
impl<S: Store> Store for FlakyStore<S> {
    async fn get(&self, key: &ObjectKey) -> Result<Arc<DynamicObject>> {
        self.inner.get(key).await
    }
    async fn list(&self, req: &ListRequest) -> Result<ListResponse> {
        self.inner.list(req).await
    }
    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        self.inner.create(obj, opts).await
    }
    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        self.inner.update(obj, opts).await
    }
    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        self.inner.update_status(obj, opts).await
    }
    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> Result<DeleteOutcome> {
        self.inner.delete(key, opts).await
    }
    async fn watch(&self, req: &WatchRequest) -> Result<WatchStream> {
        let mut rx = self.breaks.subscribe();
        rx.borrow_and_update();
        let inner = self.inner.watch(req).await?;
        let broken = async move {
            let _ = rx.changed().await;
        };
        let cut = futures::stream::once(async {
            Err(Error::Unavailable { message: "watch broken by the test".into(), source: None })
        });
        Ok(inner.take_until(broken).chain(cut).boxed())
    }
    async fn current_revision(&self) -> Result<u64> {
        self.inner.current_revision().await
    }
    async fn compact(&self, revision: u64) -> Result<()> {
        self.inner.compact(revision).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseInfo> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, id: LeaseId) -> Result<LeaseInfo> {
        self.inner.keep_alive(id).await
    }
    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        self.inner.revoke_lease(id).await
    }
    async fn lease(&self, id: LeaseId) -> Result<LeaseInfo> {
        self.inner.lease(id).await
    }
}
