//! A store wrapper that keeps virtual time still while a call is in flight.
//!
//! Simulations and tests run on a paused single-threaded tokio runtime, whose clock jumps to the
//! next timer whenever no task is ready. The embedded store commits on its own threads, so while
//! a write waits for the disk the runtime looks idle and the clock would leap: leases would lapse
//! and deadlines pass that no real cluster would see. [`Paced`] holds tokio's auto-advance back
//! while any call is in flight (through one blocking task per busy period, which is what tokio
//! inhibits auto-advance for), so virtual time passes only when the whole cluster is idle, as it
//! does on the in-memory store.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::Result;
use crate::meta::LeaseId;
use crate::object::{DynamicObject, ObjectKey};
use crate::store::{
    DeleteOptions, DeleteOutcome, LeaseInfo, ListRequest, ListResponse, Store, WatchRequest, WatchStream, WriteOptions,
};

/// See the module documentation.
#[derive(Debug)]
pub struct Paced {
    inner: Arc<dyn Store>,
    busy: Arc<(Mutex<usize>, Condvar)>,
}

impl Paced {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Paced { inner, busy: Arc::new((Mutex::new(0), Condvar::new())) }
    }

    /// Marks a call in flight until the guard drops. The first call of a busy period starts a
    /// blocking task that lasts until the last one ends; tokio does not advance a paused clock
    /// while a blocking task exists.
    fn enter(&self) -> InFlight {
        let first = {
            let mut n = self.busy.0.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n == 1
        };
        if first && tokio::runtime::Handle::try_current().is_ok() {
            let busy = self.busy.clone();
            tokio::task::spawn_blocking(move || {
                let mut n = busy.0.lock().unwrap_or_else(|e| e.into_inner());
                while *n > 0 {
                    n = busy.1.wait(n).unwrap_or_else(|e| e.into_inner());
                }
            });
        }
        InFlight(self.busy.clone())
    }
}

struct InFlight(Arc<(Mutex<usize>, Condvar)>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut n = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.1.notify_all();
        }
    }
}

#[async_trait::async_trait]
impl Store for Paced {
    async fn get(&self, key: &ObjectKey) -> Result<Arc<DynamicObject>> {
        let _busy = self.enter();
        self.inner.get(key).await
    }
    async fn list(&self, req: &ListRequest) -> Result<ListResponse> {
        let _busy = self.enter();
        self.inner.list(req).await
    }
    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        let _busy = self.enter();
        self.inner.create(obj, opts).await
    }
    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        let _busy = self.enter();
        self.inner.update(obj, opts).await
    }
    async fn update_many(&self, objs: Vec<DynamicObject>, opts: &WriteOptions) -> Vec<Result<Arc<DynamicObject>>> {
        let _busy = self.enter();
        self.inner.update_many(objs, opts).await
    }
    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        let _busy = self.enter();
        self.inner.update_status(obj, opts).await
    }
    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> Result<DeleteOutcome> {
        let _busy = self.enter();
        self.inner.delete(key, opts).await
    }
    async fn watch(&self, req: &WatchRequest) -> Result<WatchStream> {
        let _busy = self.enter();
        self.inner.watch(req).await
    }
    async fn current_revision(&self) -> Result<u64> {
        let _busy = self.enter();
        self.inner.current_revision().await
    }
    async fn compact(&self, revision: u64) -> Result<()> {
        let _busy = self.enter();
        self.inner.compact(revision).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseInfo> {
        let _busy = self.enter();
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, id: LeaseId) -> Result<LeaseInfo> {
        let _busy = self.enter();
        self.inner.keep_alive(id).await
    }
    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        let _busy = self.enter();
        self.inner.revoke_lease(id).await
    }
    async fn lease(&self, id: LeaseId) -> Result<LeaseInfo> {
        let _busy = self.enter();
        self.inner.lease(id).await
    }
}
