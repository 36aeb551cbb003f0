//! Caches (reflectors) against a real store: contents, indexes, events, and recovery from
//! broken watches and compaction.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use orch_core::kinds::Workload;
use orch_core::testkit::{FlakyStore, eventually};
use orch_core::{
    Api, Cache, CacheConfig, CacheEvent, DeleteOptions, ListParams, Object, ObjectMeta, ObjectRef, OwnerReference,
    Store,
};
use orch_store::MemoryStore;
use proptest::prelude::*;

fn workload(name: &str, app: &str) -> Object<Workload> {
    Object::new(ObjectMeta::named(name).with_label("app", app), Workload::command("main", &["/bin/true"]))
}

#[tokio::test(start_paused = true)]
async fn reads_indexes_and_events() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&workload("before", "web")).await.unwrap();
    let config = CacheConfig::<Workload>::default()
        .index("zone", |w: &Object<Workload>| w.spec.node_selector.get("zone").cloned().into_iter().collect());
    let cache = Cache::spawn(store.clone(), config);
    let mut events = cache.subscribe();
    cache.ready().await;
    assert!(cache.is_ready());
    assert_eq!(cache.len(), 1);

    let mut owned = workload("child", "db");
    owned.metadata.owner_references = vec![OwnerReference {
        kind: "Echo".into(),
        name: "e".into(),
        uid: "owner-uid".into(),
        controller: true,
        ..Default::default()
    }];
    owned.spec.node_name = Some("node-1".into());
    owned.spec.node_selector.insert("zone", "z1");
    let child = api.create(&owned).await.unwrap();
    eventually(Duration::from_secs(5), "the cache sees the child", || cache.len() == 2).await;
    assert_eq!(cache.by_index("label", "app=web").len(), 1);
    assert_eq!(cache.by_index("label", "app=db")[0].metadata.name, "child");
    assert_eq!(cache.owned_by("owner-uid")[0].metadata.uid, child.metadata.uid);
    assert_eq!(cache.by_index("node", "node-1").len(), 1, "workloads are indexed by node out of the box");
    assert_eq!(cache.by_index("zone", "z1").len(), 1, "user-defined index");
    assert_eq!(cache.revision(), store.current_revision().await.unwrap());

    // Relabeling moves the object between index entries.
    let mut relabeled = child.clone();
    relabeled.metadata.labels.insert("app", "web");
    api.replace(&relabeled).await.unwrap();
    eventually(Duration::from_secs(5), "relabel seen", || cache.by_index("label", "app=web").len() == 2).await;
    assert!(cache.by_index("label", "app=db").is_empty());
    api.delete("child", &DeleteOptions::default()).await.unwrap();
    eventually(Duration::from_secs(5), "delete seen", || cache.len() == 1).await;
    assert!(cache.owned_by("owner-uid").is_empty());
    assert!(cache.by_index("node", "node-1").is_empty());

    // Subscribers saw the initial list and every change, in order.
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(match e {
            CacheEvent::Applied(o) => format!("applied {}", o.metadata.name),
            CacheEvent::Deleted(o) => format!("deleted {}", o.metadata.name),
        });
    }
    assert_eq!(seen, ["applied before", "applied child", "applied child", "deleted child"]);
}

#[tokio::test(start_paused = true)]
async fn objects_that_do_not_decode_are_skipped_and_counted() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let bad = orch_core::DynamicObject::new("Workload", ObjectMeta::namespaced("default", "bad"))
        .with_spec(orch_core::RawJson::parse(r#"{"containers": "not a list"}"#).unwrap());
    store.create(bad, &Default::default()).await.unwrap();
    Api::<Workload>::namespaced(store.clone(), "default").create(&workload("good", "x")).await.unwrap();
    let cache: Cache<Workload> = Cache::spawn(store, CacheConfig::default());
    cache.ready().await;
    assert_eq!(cache.len(), 1);
    assert_eq!(cache.decode_errors(), 1);
}

#[derive(Debug, Clone)]
enum Op {
    Create(u8),
    Relabel(u8),
    Delete(u8),
    BreakWatch,
    Compact,
    Settle,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..10u8).prop_map(Op::Create),
        3 => (0..10u8).prop_map(Op::Relabel),
        2 => (0..10u8).prop_map(Op::Delete),
        1 => Just(Op::BreakWatch),
        1 => Just(Op::Compact),
        1 => Just(Op::Settle),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After any writes, broken watches and compactions, the cache equals the store, and its
    /// event stream replayed from empty gives the same contents: nothing lost, duplicated or
    /// resurrected.
    #[test]
    fn cache_converges_to_store(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let flaky = FlakyStore::new(MemoryStore::new());
            let store: Arc<dyn Store> = Arc::new(flaky.clone());
            let api: Api<Workload> = Api::namespaced(store.clone(), "default");
            let cache: Cache<Workload> = Cache::spawn(store.clone(), CacheConfig {
                min_backoff: Duration::from_millis(10),
                page_size: 3,
                ..CacheConfig::default()
            });
            let mut events = cache.subscribe();
            let mut replay: BTreeMap<String, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Create(i) => { let _ = api.create(&workload(&format!("w{i}"), "a")).await; }
                    Op::Relabel(i) => {
                        if let Ok(mut w) = api.get(&format!("w{i}")).await {
                            let next = if w.metadata.labels.get("app").map(String::as_str) == Some("a") { "b" } else { "a" };
                            w.metadata.labels.insert("app", next);
                            api.replace(&w).await.unwrap();
                        }
                    }
                    Op::Delete(i) => { let _ = api.delete(&format!("w{i}"), &DeleteOptions::default()).await; }
                    Op::BreakWatch => flaky.break_watches(),
                    Op::Compact => {
                        let rev = store.current_revision().await.unwrap();
                        store.compact(rev).await.unwrap();
                    }
                    Op::Settle => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            let rev = store.current_revision().await.unwrap();
            eventually(Duration::from_secs(30), "cache catches up", || cache.revision() >= rev).await;
            let truth: BTreeMap<String, u64> = api
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|w| (w.metadata.name, w.metadata.resource_version))
                .collect();
            let cached: BTreeMap<String, u64> =
                cache.list().iter().map(|w| (w.metadata.name.clone(), w.metadata.resource_version)).collect();
            assert_eq!(cached, truth, "cache contents");
            while let Ok(e) = events.try_recv() {
                match e {
                    CacheEvent::Applied(o) => {
                        let prev = replay.insert(o.metadata.name.clone(), o.metadata.resource_version);
                        assert!(prev.is_none_or(|p| p < o.metadata.resource_version), "an event went backwards");
                    }
                    CacheEvent::Deleted(o) => {
                        assert!(replay.remove(&o.metadata.name).is_some(), "deleted {} that was never added", o.metadata.name);
                    }
                }
            }
            assert_eq!(replay, truth, "events replayed");
            assert!(cache.get(&ObjectRef::new("default", "nope")).is_none());
        });
    }
}

#[tokio::test(start_paused = true)]
async fn index_subscribers_hear_only_their_value_including_moves() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let cache: Cache<Workload> = Cache::spawn(store.clone(), CacheConfig::default());
    let mut n1 = cache.subscribe_index("node", "node-1");
    let mut n2 = cache.subscribe_index("node", "node-2");
    cache.ready().await;
    let mut w = workload("mover", "x");
    w.spec.node_name = Some("node-1".into());
    let w = api.create(&w).await.unwrap();
    api.create(&workload("unbound", "x")).await.unwrap();
    let mut moved = w.clone();
    moved.spec.node_name = Some("node-2".into());
    api.replace(&moved).await.unwrap();
    api.delete("mover", &DeleteOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let drain = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<CacheEvent<Workload>>| {
        let mut seen = Vec::new();
        while let Ok(e) = rx.try_recv() {
            seen.push(match e {
                CacheEvent::Applied(o) => format!("applied {} on {:?}", o.metadata.name, o.spec.node_name),
                CacheEvent::Deleted(o) => format!("deleted {}", o.metadata.name),
            });
        }
        seen
    };
    assert_eq!(
        drain(&mut n1),
        ["applied mover on Some(\"node-1\")", "applied mover on Some(\"node-2\")"],
        "node-1 hears the arrival and the move away, nothing else"
    );
    assert_eq!(drain(&mut n2), ["applied mover on Some(\"node-2\")", "deleted mover"]);
}

/// On one thread among many busy tasks, a writer that writes in bursts (as an in-process store
/// lets it) must not leave the cache so far behind that the events it needs are compacted: the
/// reflector takes in every event its watch already holds in one turn, and never lists again.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_cache_keeps_up_with_bursts_among_busy_tasks() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().history_limit(1_500).build());
    let cache = Cache::<Workload>::spawn(store.clone(), CacheConfig::default());
    cache.ready().await;
    assert_eq!(cache.lists(), 1);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy: Vec<_> = (0..200)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    // A task like the others, writing in bursts of 1,000, each far more than tokio's budget of
    // 128 a turn.
    tokio::spawn(async move {
        for burst in 0..10 {
            for i in 0..1_000 {
                api.create(&workload(&format!("w-{burst}-{i}"), "web")).await.unwrap();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    // The busy tasks stop first: a paused clock moves only once every task waits.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in busy {
        b.await.unwrap();
    }
    eventually(Duration::from_secs(10), "every object in the cache", || cache.len() == 10_000).await;
    assert_eq!(cache.lists(), 1, "the cache fell behind the compaction of its store and listed again");
}

/// A task that writes to an in-process store in one long loop, never waiting on anything else,
/// must still let the watchers on its thread run: every write takes a unit of the task's
/// cooperative budget, so the writer yields before its watchers fall behind the history.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_writer_that_never_waits_still_lets_the_cache_keep_up() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().history_limit(1_000).build());
    let cache = Cache::<Workload>::spawn(store.clone(), CacheConfig::default());
    cache.ready().await;
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    // Five times the history in one loop, on the test's own task.
    for i in 0..5_000 {
        api.create(&workload(&format!("w-{i}"), "web")).await.unwrap();
    }
    eventually(Duration::from_secs(10), "every object in the cache", || cache.len() == 5_000).await;
    assert_eq!(cache.lists(), 1, "the writer starved the cache until its events were compacted");
}
