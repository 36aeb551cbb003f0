//! Test helpers shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use orch_core::{
    DeleteOptions, DeleteOutcome, DynamicObject, Error, LeaseId, LeaseInfo, ListRequest, ListResponse, ObjectKey,
    Result, Store, WatchRequest, WatchStream, WriteOptions,
};
use orch_store::MemoryStore;
use tokio::sync::watch;

/// A memory store whose watch streams can be broken on demand, as a flaky network would.
#[derive(Debug, Clone)]
pub struct FlakyStore {
    pub inner: MemoryStore,
    breaks: Arc<watch::Sender<u64>>,
}

impl FlakyStore {
    pub fn new(inner: MemoryStore) -> Self {
        FlakyStore { inner, breaks: Arc::new(watch::channel(0).0) }
    }

    /// Ends every open watch stream with an `Unavailable` error.
    pub fn break_watches(&self) {
        self.breaks.send_modify(|n| *n += 1);
    }
}

#[async_trait]
impl Store for FlakyStore {
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

/// Polls `cond` every 10 ms (virtual time under a paused clock) until it holds, for at most
/// `limit`; panics with `what` otherwise.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A directory for this test process's store files: `<target tmp>/<suite>/<pid>`. Every test
/// runs in its own process under nextest, so each gets its own directory; the directories of
/// processes that have ended are removed here, so runs do not pile up files.
pub fn scratch_dir(suite: &str) -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let parent = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(suite);
        for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let ended = match entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                Some(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                None => true,
            };
            if ended {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = parent.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the store files");
        dir
    })
    .clone()
}
