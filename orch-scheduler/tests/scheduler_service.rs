//! The scheduler service against a store: binds through compare-and-swap, explains what does
//! not fit, wakes on new nodes, survives bind conflicts without undoing the writes it lost to,
//! evicts preemption victims, and schedules only while its manager leads.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_core::controller::leader::LeaderElectionConfig;
use orch_core::kinds::{Node, ResourceRequirements, Workload, find_condition};
use orch_core::testkit::wait_until;
use orch_core::{
    Api, DeleteOptions, DeleteOutcome, DynamicObject, LeaseId, LeaseInfo, ListParams, ListRequest, ListResponse,
    Manager, Object, ObjectKey, ObjectMeta, Quantity, Store, WatchRequest, WatchStream, WriteOptions,
};
use orch_scheduler::Profile;
use orch_scheduler::SchedulerService;
use orch_scheduler::{SCHEDULED_CONDITION, SchedulerConfig};
use orch_store::MemoryStore;

fn node(name: &str, cpu: i64) -> Object<Node> {
    let mut n = Object::new(ObjectMeta::named(name), Node::default());
    n.status.allocatable.insert("cpu".into(), Quantity::from_units(cpu));
    n.status.allocatable.insert("memory".into(), "8Gi".parse().unwrap());
    n
}

fn workload(name: &str, cpu: &str, priority: i32) -> Object<Workload> {
    let mut w = Workload::command("main", &["sleep", "1"]);
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), cpu.parse().unwrap());
    w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
    w.priority = priority;
    Object::new(ObjectMeta::named(name), w)
}

async fn bound_to(api: &Api<Workload>, name: &str) -> Option<String> {
    api.get(name).await.ok().and_then(|w| w.spec.node_name)
}

fn fast() -> SchedulerConfig {
    SchedulerConfig {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..SchedulerConfig::default()
    }
}

#[tokio::test]
async fn binds_explains_and_wakes_on_new_nodes() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let nodes: Api<Node> = Api::all(store.clone());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    nodes.create(&node("n1", 2)).await.unwrap();
    for i in 0..6 {
        api.create(&workload(&format!("w{i}"), "300m", 0)).await.unwrap();
    }
    api.create(&workload("big", "3", 0)).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let svc =
        tokio::spawn(SchedulerService::new(Profile::default_profile()).config(fast()).run(store.clone(), async {
            let _ = stopped.await;
        }));

    wait_until("six bound", Duration::from_secs(10), || async {
        let list = api.list(&ListParams::default()).await.unwrap();
        list.items.iter().filter(|w| w.spec.node_name.as_deref() == Some("n1")).count() == 6
    })
    .await;
    wait_until("big explained", Duration::from_secs(10), || async {
        let w = api.get("big").await.unwrap();
        find_condition(&w.status.conditions, SCHEDULED_CONDITION)
            .is_some_and(|c| c.message == "0/1 nodes fit: 1 insufficient cpu" && c.reason == "Unschedulable")
    })
    .await;
    assert_eq!(bound_to(&api, "big").await, None);
    // And an event of the workload says so.
    let events: Api<orch_core::kinds::Event> = Api::namespaced(store.clone(), "default");
    wait_until("a FailedScheduling event", Duration::from_secs(10), || async {
        events.list(&ListParams::default()).await.unwrap().items.iter().any(|e| {
            e.spec.reason == "FailedScheduling"
                && e.spec.involved_object.name == "big"
                && e.spec.message == "0/1 nodes fit: 1 insufficient cpu"
                && e.spec.source == "scheduler"
        })
    })
    .await;

    nodes.create(&node("n2", 4)).await.unwrap();
    wait_until("big bound after a node joined", Duration::from_secs(10), || async {
        bound_to(&api, "big").await.as_deref() == Some("n2")
    })
    .await;
    let _ = stop.send(());
    svc.await.unwrap();
}

/// A store where another writer adds a label to a workload just before the scheduler's first
/// batched bind of it (`raced-batch`) and just before its first single bind (`raced-single`),
/// so both bind paths lose their compare-and-swap at least once, every run.
#[derive(Debug, Default)]
struct RacingStore {
    inner: MemoryStore,
    raced: Mutex<HashSet<(String, &'static str)>>,
}

impl RacingStore {
    async fn race(&self, obj: &DynamicObject, label: &'static str) {
        if obj.kind != "Workload" || !self.raced.lock().unwrap().insert((obj.metadata.name.clone(), label)) {
            return;
        }
        // The test's own writers touch the same workloads: retry as any writer would.
        loop {
            let mut theirs = (*self.inner.get(&obj.key()).await.unwrap()).clone();
            theirs.metadata.labels.insert(label, "yes");
            match self.inner.update(theirs, &WriteOptions::default()).await {
                Err(orch_core::Error::Conflict { .. }) => continue,
                other => {
                    other.unwrap();
                    return;
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for RacingStore {
    async fn get(&self, key: &ObjectKey) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.get(key).await
    }
    async fn list(&self, req: &ListRequest) -> orch_core::Result<ListResponse> {
        self.inner.list(req).await
    }
    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.create(obj, opts).await
    }
    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> orch_core::Result<Arc<DynamicObject>> {
        if obj.spec.to_value().get("nodeName").is_some_and(|n| !n.is_null()) {
            self.race(&obj, "raced-single").await;
        }
        self.inner.update(obj, opts).await
    }
    async fn update_many(
        &self,
        objs: Vec<DynamicObject>,
        opts: &WriteOptions,
    ) -> Vec<orch_core::Result<Arc<DynamicObject>>> {
        for obj in &objs {
            self.race(obj, "raced-batch").await;
        }
        self.inner.update_many(objs, opts).await
    }
    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.update_status(obj, opts).await
    }
    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> orch_core::Result<DeleteOutcome> {
        self.inner.delete(key, opts).await
    }
    async fn watch(&self, req: &WatchRequest) -> orch_core::Result<WatchStream> {
        self.inner.watch(req).await
    }
    async fn current_revision(&self) -> orch_core::Result<u64> {
        self.inner.current_revision().await
    }
    async fn compact(&self, revision: u64) -> orch_core::Result<()> {
        self.inner.compact(revision).await
    }
    async fn grant_lease(&self, ttl: Duration) -> orch_core::Result<LeaseInfo> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, id: LeaseId) -> orch_core::Result<LeaseInfo> {
        self.inner.keep_alive(id).await
    }
    async fn revoke_lease(&self, id: LeaseId) -> orch_core::Result<()> {
        self.inner.revoke_lease(id).await
    }
    async fn lease(&self, id: LeaseId) -> orch_core::Result<LeaseInfo> {
        self.inner.lease(id).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_conflicts_are_retried_and_changes_respected() {
    let store: Arc<dyn Store> = Arc::new(RacingStore::default());
    let nodes: Api<Node> = Api::all(store.clone());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    nodes.create(&node("n1", 8)).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let svc =
        tokio::spawn(SchedulerService::new(Profile::default_profile()).config(fast()).run(store.clone(), async {
            let _ = stopped.await;
        }));
    // Many concurrent label writes race the binds. Each label write is retried until it lands,
    // so every one of them is acknowledged; a bind must never undo one (a lost update).
    let mut writers = Vec::new();
    for i in 0..40 {
        let created = api.create(&workload(&format!("w{i}"), "100m", 0)).await.unwrap();
        let api = api.clone();
        writers.push(tokio::spawn(async move {
            let mut w = created;
            for k in 0..3 {
                loop {
                    w.metadata.labels.insert(format!("touch{k}"), "yes");
                    tokio::task::yield_now().await;
                    match api.replace(&w).await {
                        Ok(next) => {
                            w = next;
                            break;
                        }
                        Err(e) if e.is_conflict() => w = api.get(&w.metadata.name).await.unwrap(),
                        Err(e) => panic!("label write on {}: {e}", w.metadata.name),
                    }
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // Every workload ends up bound once, and every acknowledged label write survived the binds.
    wait_until("all bound", Duration::from_secs(10), || async {
        let list = api.list(&ListParams::default()).await.unwrap();
        list.items.len() == 40 && list.items.iter().all(|w| w.spec.node_name.as_deref() == Some("n1"))
    })
    .await;
    for w in api.list(&ListParams::default()).await.unwrap().items {
        for label in ["touch0", "touch1", "touch2", "raced-batch", "raced-single"] {
            assert_eq!(
                w.metadata.labels.get(label).map(String::as_str),
                Some("yes"),
                "{}: the label write {label} was lost to a bind: {:?}",
                w.metadata.name,
                w.metadata.labels
            );
        }
    }
    let _ = stop.send(());
    svc.await.unwrap();
}

#[tokio::test]
async fn preemption_deletes_victims_then_binds() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let nodes: Api<Node> = Api::all(store.clone());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    nodes.create(&node("n1", 2)).await.unwrap();
    for i in 0..2 {
        api.create(&workload(&format!("low{i}"), "1", 1)).await.unwrap();
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let svc =
        tokio::spawn(SchedulerService::new(Profile::default_profile()).config(fast()).run(store.clone(), async {
            let _ = stopped.await;
        }));
    wait_until("lows bound", Duration::from_secs(10), || async {
        bound_to(&api, "low0").await.is_some() && bound_to(&api, "low1").await.is_some()
    })
    .await;
    api.create(&workload("high", "1500m", 10)).await.unwrap();
    wait_until("high bound", Duration::from_secs(10), || async {
        bound_to(&api, "high").await.as_deref() == Some("n1")
    })
    .await;
    let left = api.list(&ListParams::default()).await.unwrap().items;
    let names: Vec<_> = left.iter().map(|w| w.metadata.name.as_str()).collect();
    assert_eq!(names, vec!["high"], "both lows had to go to make room for 1.5 cpu");
    let _ = stop.send(());
    svc.await.unwrap();
}

/// On the paused clock: the standby gets the same five retry periods to misbehave however
/// loaded the machine is.
#[tokio::test(start_paused = true)]
async fn a_standby_manager_does_not_schedule() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let nodes: Api<Node> = Api::all(store.clone());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    nodes.create(&node("n1", 4)).await.unwrap();
    let lock = || LeaderElectionConfig {
        retry_period: Duration::from_millis(100),
        ..LeaderElectionConfig::new("default", "scheduler", "holder")
    };
    // The lock is taken by someone else first.
    let mut other =
        Manager::new(store.clone()).with_leader_election(LeaderElectionConfig { identity: "other".into(), ..lock() });
    other.add(SchedulerService::new(Profile::new("nobody")));
    let mut leadership = other.leadership();
    let (stop_other, other_stopped) = tokio::sync::oneshot::channel::<()>();
    let other = tokio::spawn(other.run(async move {
        let _ = other_stopped.await;
    }));
    leadership.wait_for(|l| matches!(l, orch_core::Leadership::Leading(_))).await.unwrap();

    let mut mine =
        Manager::new(store.clone()).with_leader_election(LeaderElectionConfig { identity: "mine".into(), ..lock() });
    mine.add(SchedulerService::new(Profile::default_profile()).config(fast()));
    let (stop_mine, mine_stopped) = tokio::sync::oneshot::channel::<()>();
    let mine = tokio::spawn(mine.run(async move {
        let _ = mine_stopped.await;
    }));
    api.create(&workload("w", "1", 0)).await.unwrap();
    // Five of the standby's retry periods, in virtual time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bound_to(&api, "w").await, None, "a standby must not bind");

    // The leader steps down; the standby takes over and binds.
    let _ = stop_other.send(());
    other.await.unwrap().unwrap();
    wait_until("bound by the new leader", Duration::from_secs(10), || async {
        bound_to(&api, "w").await.as_deref() == Some("n1")
    })
    .await;
    let _ = stop_mine.send(());
    mine.await.unwrap().unwrap();
}
