//! The garbage collector on the memory and embedded stores: background, foreground and orphan
//! deletes of an owner tree, references to a missing owner among several, a collector crash in
//! the middle of a cascade that the next collector finishes, and a cascade from a cache behind
//! the store that spares an object given a dependent's name.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{BACKENDS, Backend};
use futures::StreamExt;
use orch_controllers::GarbageCollector;
use orch_core::kinds::{Deployment, ReplicaSet, Workload, WorkloadTemplate};
use orch_core::store::{FOREGROUND_FINALIZER, Propagation};
use orch_core::{
    Api, DeleteOptions, DeleteOutcome, DynamicObject, LabelSelector, LeaseId, LeaseInfo, ListParams, ListRequest,
    ListResponse, Manager, Object, ObjectKey, ObjectMeta, Result, Store, Timestamp, TokioClock, WatchEvent,
    WatchRequest, WatchStream, WriteOptions, testkit,
};

const LIMIT: Duration = Duration::from_secs(600);

/// A deployment owning `sets` replica sets of `per_set` workloads each (no controller runs
/// them: they are just objects).
async fn tree(store: &Arc<dyn Store>, sets: usize, per_set: usize) -> Object<Deployment> {
    let deployments: Api<Deployment> = Api::namespaced(store.clone(), "default");
    let rs_api: Api<ReplicaSet> = Api::namespaced(store.clone(), "default");
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    let spec = Workload::command("main", &["serve"]);
    let root = deployments
        .create(&Object::new(ObjectMeta::named("root"), Deployment::new("web", 1, spec.clone())))
        .await
        .unwrap();
    for s in 0..sets {
        let mut meta = ObjectMeta::named(format!("root-{s}"));
        meta.owner_references = vec![root.controller_ref()];
        let rs = ReplicaSet {
            replicas: per_set as u32,
            selector: LabelSelector::from_labels([("app", "web")]),
            template: WorkloadTemplate::new([("app", "web")].into(), spec.clone()),
            min_ready_seconds: 0,
        };
        let rs = rs_api.create(&Object::new(meta, rs)).await.unwrap();
        for w in 0..per_set {
            let mut meta = ObjectMeta::named(format!("root-{s}-{w}"));
            meta.owner_references = vec![rs.controller_ref()];
            workloads.create(&Object::new(meta, spec.clone())).await.unwrap();
        }
    }
    root
}

async fn counts(store: &Arc<dyn Store>) -> (usize, usize, usize) {
    let d: Api<Deployment> = Api::namespaced(store.clone(), "default");
    let r: Api<ReplicaSet> = Api::namespaced(store.clone(), "default");
    let w: Api<Workload> = Api::namespaced(store.clone(), "default");
    let p = ListParams::default();
    (
        d.list(&p).await.unwrap().items.len(),
        r.list(&p).await.unwrap().items.len(),
        w.list(&p).await.unwrap().items.len(),
    )
}

fn start_gc(store: Arc<dyn Store>) -> tokio::task::JoinHandle<Result<()>> {
    let mut manager = Manager::new(store).with_clock(Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000))));
    manager.add(GarbageCollector::builtin());
    tokio::spawn(manager.run(std::future::pending()))
}

fn fresh(backend: Backend, name: &str) -> Arc<dyn Store> {
    common::store(backend, name, Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000))))
}

#[tokio::test(start_paused = true)]
async fn a_background_delete_takes_the_whole_tree() {
    for backend in BACKENDS {
        let store = fresh(backend, "gc-background");
        tree(&store, 5, 4).await;
        let gc = start_gc(store.clone());
        let d: Api<Deployment> = Api::namespaced(store.clone(), "default");
        assert!(matches!(d.delete("root", &DeleteOptions::default()).await.unwrap(), orch_core::Deleted::Gone(_)));
        testkit::wait_until("the tree collected", LIMIT, async || (counts(&store).await == (0, 0, 0)).then_some(()))
            .await;
        gc.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_foreground_delete_keeps_the_owner_until_its_dependents_are_gone() {
    for backend in BACKENDS {
        let store = fresh(backend, "gc-foreground");
        tree(&store, 4, 3).await;
        let gc = start_gc(store.clone());
        let from = store.current_revision().await.unwrap() + 1;
        let mut deletions = Vec::new();
        for kind in ["Deployment", "ReplicaSet", "Workload"] {
            deletions.push(store.watch(&WatchRequest::from(orch_core::Selection::kind(kind), from)).await.unwrap());
        }
        let d: Api<Deployment> = Api::namespaced(store.clone(), "default");
        let marked = d.delete("root", &DeleteOptions::default().propagation(Propagation::Foreground)).await.unwrap();
        let orch_core::Deleted::Pending(marked) = marked else { panic!("a foreground delete only marks the owner") };
        assert!(marked.metadata.finalizers.iter().any(|f| f == FOREGROUND_FINALIZER));
        testkit::wait_until("the tree collected", LIMIT, async || (counts(&store).await == (0, 0, 0)).then_some(()))
            .await;
        // Every dependent went before the owner.
        let mut last_dependent = 0;
        let mut owner_gone = 0;
        for (i, w) in deletions.iter_mut().enumerate() {
            while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(10), w.next()).await {
                if let WatchEvent::Deleted(o) = e {
                    if i == 0 {
                        owner_gone = o.metadata.resource_version;
                    } else {
                        last_dependent = last_dependent.max(o.metadata.resource_version);
                    }
                }
            }
        }
        assert!(
            owner_gone > last_dependent && last_dependent > 0,
            "owner at {owner_gone}, dependents until {last_dependent} ({backend:?})"
        );
        gc.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn an_orphaning_delete_releases_the_dependents() {
    for backend in BACKENDS {
        let store = fresh(backend, "gc-orphan");
        let root = tree(&store, 3, 2).await;
        let gc = start_gc(store.clone());
        let d: Api<Deployment> = Api::namespaced(store.clone(), "default");
        d.delete("root", &DeleteOptions::default().propagation(Propagation::Orphan)).await.unwrap();
        testkit::wait_until("the owner gone", LIMIT, async || d.get_opt("root").await.unwrap().is_none().then_some(()))
            .await;
        // Given time, nothing else goes, and nothing points at the owner any more.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(counts(&store).await, (0, 3, 6), "({backend:?})");
        let r: Api<ReplicaSet> = Api::namespaced(store.clone(), "default");
        for rs in r.list(&ListParams::default()).await.unwrap().items {
            assert!(rs.metadata.owner_references.iter().all(|o| o.uid != root.metadata.uid), "{rs:?}");
        }
        gc.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_reference_to_a_missing_owner_among_several_is_removed() {
    for backend in BACKENDS {
        let store = fresh(backend, "gc-several");
        let root = tree(&store, 1, 1).await;
        let rs_api: Api<ReplicaSet> = Api::namespaced(store.clone(), "default");
        let w_api: Api<Workload> = Api::namespaced(store.clone(), "default");
        let rs = rs_api.get("root-0").await.unwrap();
        let mut second = root.controller_ref();
        second.controller = false;
        w_api
            .retry_on_conflict("root-0-0", |w| {
                w.metadata.owner_references.push(second.clone());
                Ok(())
            })
            .await
            .unwrap();
        let gc = start_gc(store.clone());
        // Release the replica set from the deployment, then delete the deployment: the
        // workload keeps its replica set and loses only the reference to the deployment.
        rs_api
            .retry_on_conflict("root-0", |r| {
                r.metadata.owner_references.clear();
                Ok(())
            })
            .await
            .unwrap();
        Api::<Deployment>::namespaced(store.clone(), "default")
            .delete("root", &DeleteOptions::default())
            .await
            .unwrap();
        let w = testkit::wait_until("the dangling reference removed", LIMIT, async || {
            let w = w_api.get("root-0-0").await.ok()?;
            (w.metadata.owner_references.len() == 1).then_some(w)
        })
        .await;
        assert_eq!(w.metadata.owner_references[0].uid, rs.metadata.uid);
        assert_eq!(counts(&store).await, (0, 1, 1), "({backend:?})");
        gc.abort();
    }
}

/// A store slowed down: each delete takes `delete_delay` (so a cascade can be caught half done),
/// and its watches deliver each event `watch_lag` late (so a cache is behind the store).
#[derive(Debug)]
struct Slowed {
    inner: Arc<dyn Store>,
    delete_delay: Duration,
    watch_lag: Duration,
}

#[async_trait::async_trait]
impl Store for Slowed {
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
        tokio::time::sleep(self.delete_delay).await;
        self.inner.delete(key, opts).await
    }
    async fn watch(&self, req: &WatchRequest) -> Result<WatchStream> {
        let (events, lag) = (self.inner.watch(req).await?, self.watch_lag);
        Ok(events
            .then(move |e| async move {
                tokio::time::sleep(lag).await;
                e
            })
            .boxed())
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

#[tokio::test(start_paused = true)]
async fn a_collector_crash_mid_cascade_leaves_nothing_orphaned_after_restart() {
    for backend in BACKENDS {
        let inner = fresh(backend, "gc-crash");
        tree(&inner, 10, 20).await;
        let store: Arc<dyn Store> = Arc::new(Slowed {
            inner: inner.clone(),
            delete_delay: Duration::from_millis(100),
            watch_lag: Duration::ZERO,
        });
        let gc = start_gc(store.clone().clone());
        Api::<Deployment>::namespaced(inner.clone(), "default")
            .delete("root", &DeleteOptions::default())
            .await
            .unwrap();
        let midway = testkit::wait_until("half the cascade", LIMIT, async || {
            let c = counts(&inner).await;
            (c.2 < 200 && c.2 > 0).then_some(c)
        })
        .await;
        gc.abort();
        let _ = gc.await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let after_crash = counts(&inner).await;
        assert!(after_crash.1 + after_crash.2 > 0, "the crash left work: {midway:?} -> {after_crash:?}");
        // A new collector (after a restart) finds the objects whose owners are gone.
        let again = start_gc(inner.clone());
        testkit::wait_until("the rest collected", LIMIT, async || (counts(&inner).await == (0, 0, 0)).then_some(()))
            .await;
        again.abort();
    }
}

/// The collector deletes dependents from its cache, which may be behind the store: a dependent
/// deleted and created again under its name (now owned by nobody) after its owner was marked for
/// a foreground delete is not the one the cache holds, and the cascade leaves it alone.
#[tokio::test(start_paused = true)]
async fn a_cascade_spares_an_object_that_took_a_dependents_name() {
    for backend in BACKENDS {
        let inner = fresh(backend, "gc-reused-name");
        tree(&inner, 1, 1).await;
        let lagging = Slowed { inner: inner.clone(), delete_delay: Duration::ZERO, watch_lag: Duration::from_secs(5) };
        let gc = start_gc(Arc::new(lagging));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let rs_api: Api<ReplicaSet> = Api::namespaced(inner.clone(), "default");
        let w_api: Api<Workload> = Api::namespaced(inner.clone(), "default");
        let first = w_api.get("root-0-0").await.unwrap();
        rs_api.delete("root-0", &DeleteOptions::default().propagation(Propagation::Foreground)).await.unwrap();
        // Before the collector's cache sees any of it: the dependent goes, and an object owned
        // by nobody takes its name.
        tokio::time::sleep(Duration::from_secs(1)).await;
        w_api.delete("root-0-0", &DeleteOptions::default()).await.unwrap();
        let second = w_api
            .create(&Object::new(ObjectMeta::named("root-0-0"), Workload::command("main", &["serve"])))
            .await
            .unwrap();
        assert_ne!(first.metadata.uid, second.metadata.uid);
        testkit::wait_until("the replica set collected", LIMIT, async || {
            rs_api.get("root-0").await.is_err_and(|e| e.is_not_found())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        let kept = w_api.get("root-0-0").await.expect("the object that took the name is kept");
        assert_eq!(kept.metadata.uid, second.metadata.uid, "({backend:?})");
        gc.abort();
    }
}
