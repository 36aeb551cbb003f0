//! The event recorder on the memory and embedded stores: repeats fold into one event, the
//! per-object rate limit holds, bad input is mended rather than lost, and events expire.

use std::sync::Arc;
use std::time::Duration;

use orch_core::events::{CLUSTER_EVENTS_NAMESPACE, Recorder, RecorderConfig};
use orch_core::kinds::{EVENT_MESSAGE_LIMIT, Event, EventType, ObjectReference};
use orch_core::{Api, ListParams, Store, Timestamp, TokioClock};
use orch_store::{MemoryStore, RedbStore};

fn web() -> ObjectReference {
    ObjectReference { kind: "Deployment".into(), namespace: "default".into(), name: "web".into(), uid: "u1".into() }
}

fn stores(name: &str) -> Vec<Arc<dyn Store>> {
    let dir = std::env::temp_dir().join(format!("orch-core-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.redb"));
    let _ = std::fs::remove_file(&path);
    vec![Arc::new(MemoryStore::new()), Arc::new(RedbStore::open(&path).unwrap())]
}

async fn events(store: &Arc<dyn Store>, ns: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(store.clone(), ns);
    api.list(&ListParams::default()).await.unwrap().items.into_iter().map(|e| e.spec).collect()
}

#[tokio::test]
async fn repeats_fold_into_one_event_with_a_count() {
    for store in stores("fold") {
        let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
        let r = Recorder::with_clock(store.clone(), "test", RecorderConfig::default(), clock);
        for _ in 0..3 {
            r.record(&web(), EventType::Normal, "ScalingRevision", "scaled web-1 to 3");
        }
        r.flush().await;
        r.record(&web(), EventType::Normal, "ScalingRevision", "scaled web-1 to 3");
        r.record(&web(), EventType::Warning, "ProgressDeadlineExceeded", "web-2 made no progress");
        r.flush().await;
        let mut got = events(&store, "default").await;
        got.sort_by_key(|e| e.count);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            (got[0].reason.as_str(), got[0].count, got[0].type_),
            ("ProgressDeadlineExceeded", 1, EventType::Warning)
        );
        assert_eq!((got[1].reason.as_str(), got[1].count), ("ScalingRevision", 4));
        assert_eq!(got[1].involved_object, web());
        assert_eq!(got[1].source, "test");
        assert!(got[1].first_timestamp.unwrap() <= got[1].last_timestamp.unwrap());
        assert_eq!(r.failed(), 0);

        // A second recorder (a restarted component) folds into the same stored event.
        let again = Recorder::new(store.clone(), "test", RecorderConfig::default());
        again.record(&web(), EventType::Normal, "ScalingRevision", "scaled web-1 to 3");
        again.flush().await;
        let got = events(&store, "default").await;
        assert_eq!(got.len(), 2);
        assert!(got.iter().any(|e| e.reason == "ScalingRevision" && e.count == 5), "{got:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn each_object_is_rate_limited_on_its_own() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let config = RecorderConfig { burst: 3, refill_every: Duration::from_secs(10), ..Default::default() };
    let r = Recorder::new(store.clone(), "test", config);
    for i in 0..10 {
        r.record(&web(), EventType::Normal, "Tick", format!("tick {i}"));
    }
    let other = ObjectReference { name: "db".into(), ..web() };
    r.record(&other, EventType::Normal, "Tick", "tick");
    r.flush().await;
    assert_eq!(r.limited(), 7);
    let got = events(&store, "default").await;
    assert_eq!(got.iter().filter(|e| e.involved_object.name == "web").count(), 3);
    assert_eq!(got.iter().filter(|e| e.involved_object.name == "db").count(), 1, "another object has its own burst");

    tokio::time::advance(Duration::from_secs(10)).await;
    r.record(&web(), EventType::Normal, "Tick", "after the refill");
    r.record(&web(), EventType::Normal, "Tick", "one too many");
    r.flush().await;
    assert_eq!(r.limited(), 8);
    let got = events(&store, "default").await;
    assert!(got.iter().any(|e| e.message == "after the refill"));
    assert!(!got.iter().any(|e| e.message == "one too many"));
}

#[tokio::test]
async fn bad_input_is_mended_not_lost() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let r = Recorder::new(store.clone(), "test", RecorderConfig::default());
    let node = ObjectReference { kind: "Node".into(), name: "n1".into(), ..Default::default() };
    r.record(&node, EventType::Warning, "not camel case", "é".repeat(EVENT_MESSAGE_LIMIT));
    r.flush().await;
    let got = events(&store, CLUSTER_EVENTS_NAMESPACE).await;
    assert_eq!(got.len(), 1, "events about cluster-scoped objects live in {CLUSTER_EVENTS_NAMESPACE}");
    assert_eq!(got[0].reason, "Unspecified");
    assert!(got[0].message.len() <= EVENT_MESSAGE_LIMIT && got[0].message.len() >= EVENT_MESSAGE_LIMIT - 1);
    assert_eq!(r.failed(), 0);
}

#[tokio::test(start_paused = true)]
async fn events_expire_after_their_ttl_and_repeats_keep_them() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let config = RecorderConfig { ttl: Duration::from_secs(100), ..Default::default() };
    let r = Recorder::new(store.clone(), "test", config);
    r.record(&web(), EventType::Normal, "Once", "happens once");
    r.record(&web(), EventType::Normal, "Often", "happens often");
    r.flush().await;
    assert_eq!(events(&store, "default").await.len(), 2);
    // Repeat one of them every 30 s for 150 s: it outlives its first lease.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        r.record(&web(), EventType::Normal, "Often", "happens often");
        r.flush().await;
    }
    let got = events(&store, "default").await;
    assert_eq!(got.len(), 1, "the event written once expired: {got:?}");
    assert_eq!((got[0].reason.as_str(), got[0].count), ("Often", 6));
    tokio::time::sleep(Duration::from_secs(111)).await;
    assert!(events(&store, "default").await.is_empty(), "every event expires after its TTL (+ a tenth)");
}
