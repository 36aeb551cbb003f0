//! The etcd store through failures: an etcd restarted under a watch, a three-member cluster that
//! loses its leader, a lease with thousands of objects, clusters sharing one etcd. Each test
//! starts its own etcd on loopback; without an `etcd` binary on `PATH` they say they are skipped
//! and return (with `ORCH_REQUIRE_ETCD` set, as CI does, they fail instead).

#![cfg(feature = "etcd")]

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use orch_core::{
    DynamicObject, Error, ObjectMeta, RawJson, Selection, Store, WatchEvent, WatchRequest, WatchStream, WriteOptions,
};
use orch_store::EtcdStore;
use orch_store::etcd::LocalEtcd;

fn skip() -> bool {
    !LocalEtcd::available_for_test()
}

fn thing(name: &str, i: usize) -> DynamicObject {
    DynamicObject::new("Thing", ObjectMeta::namespaced("ns", name))
        .with_spec(RawJson::from_value(&serde_json::json!(i)))
}

/// Creates `names`, retrying while etcd is unreachable; returns the acknowledged revisions.
async fn create_all(store: &EtcdStore, names: impl IntoIterator<Item = String>) -> Vec<u64> {
    let mut revs = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match store.create(thing(&name, i), &WriteOptions::default()).await {
                Ok(o) => {
                    revs.push(o.metadata.resource_version);
                    break;
                }
                // A failure may have been applied all the same (the answer was lost): then the
                // object is there, and it counts.
                Err(Error::AlreadyExists(_)) => {
                    let o = store.get(&thing(&name, i).key()).await.expect("the object that exists");
                    revs.push(o.metadata.resource_version);
                    break;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("create {name}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("create {name}: {e}"),
            }
        }
    }
    revs
}

/// Reads `n` change events (progress notifications skipped) and returns their revisions.
async fn read_changes(watch: &mut WatchStream, n: usize) -> Vec<u64> {
    let mut revs = Vec::new();
    while revs.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), watch.next()).await {
            Ok(Some(Ok(WatchEvent::Progress(_)))) => {}
            Ok(Some(Ok(e))) => revs.push(e.revision()),
            other => panic!("after {} events: {other:?}", revs.len()),
        }
    }
    revs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_survives_an_etcd_restart_without_losing_or_repeating_an_event() {
    if skip() {
        return;
    }
    let mut etcd = LocalEtcd::start().unwrap();
    etcd.wait_ready(Duration::from_secs(20)).await.unwrap();
    let store = EtcdStore::builder(etcd.endpoints(), "restart")
        .request_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let start = store.current_revision().await.unwrap() + 1;
    let mut req = WatchRequest::from(Selection::kind("Thing"), start);
    req.progress_interval = Some(Duration::from_millis(500));
    let mut watch = store.watch(&req).await.unwrap();

    // Some events read before the crash, some written but not yet read.
    let mut acknowledged = create_all(&store, (0..30).map(|i| format!("before-{i}"))).await;
    let mut seen = read_changes(&mut watch, 10).await;

    etcd.kill(0);
    let down = store.create(thing("while-down", 0), &WriteOptions::default()).await.unwrap_err();
    assert!(matches!(down, Error::Unavailable { .. }), "{down}");
    // Reading on while etcd is down: the watch waits (and retries) instead of ending.
    seen.extend(read_changes(&mut watch, 5).await);
    etcd.restart(0).unwrap();
    acknowledged.extend(create_all(&store, (0..30).map(|i| format!("after-{i}"))).await);

    seen.extend(read_changes(&mut watch, acknowledged.len() - seen.len()).await);
    assert!(seen.windows(2).all(|p| p[0] < p[1]), "events out of order or repeated: {seen:?}");
    assert_eq!(seen, acknowledged, "every acknowledged write seen exactly once, in order");

    // A second restart while the watch is idle: it resumes from where it was, and a progress
    // notification afterwards shows it is live again.
    etcd.restart(0).unwrap();
    let late = create_all(&store, ["late".to_string()]).await;
    assert_eq!(read_changes(&mut watch, 1).await, late);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Ok(WatchEvent::Progress(r)))) if r >= late[0] => break,
            Ok(Some(Ok(WatchEvent::Progress(_)))) => {}
            other => panic!("expected a progress notification, got {other:?}"),
        }
    }
}

/// Which member leads now, by asking each.
async fn leader_index(etcd: &LocalEtcd) -> usize {
    for i in 0..3 {
        let mut c = etcd_client::Client::connect([etcd.endpoint(i)], None).await.unwrap();
        let status = c.status().await.unwrap();
        if status.header().map(|h| h.member_id()) == Some(status.leader()) {
            return i;
        }
    }
    panic!("no member says it leads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_keeps_taking_writes_with_a_member_down() {
    if skip() {
        return;
    }
    let mut etcd = LocalEtcd::start_cluster(3).unwrap();
    etcd.wait_ready(Duration::from_secs(30)).await.unwrap();
    let store = EtcdStore::builder(etcd.endpoints(), "cluster")
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let start = store.current_revision().await.unwrap() + 1;
    let mut watch = store.watch(&WatchRequest::from(Selection::kind("Thing"), start)).await.unwrap();
    let mut acknowledged = create_all(&store, (0..20).map(|i| format!("three-{i}"))).await;

    // Kill the leader, the member every write goes through: the other two elect a new one and
    // the writes go on.
    let leader = leader_index(&etcd).await;
    etcd.kill(leader);
    let timer = tokio::time::Instant::now();
    acknowledged.extend(create_all(&store, (0..40).map(|i| format!("two-{i}"))).await);
    eprintln!("40 writes with the leader (member {leader}) down took {:?}", timer.elapsed());
    let listed = store.list(&orch_core::ListRequest::new(Selection::kind("Thing"))).await.unwrap();
    assert_eq!(listed.items.len(), 60);

    // The watch saw every write exactly once, whichever member it was on.
    let seen = read_changes(&mut watch, acknowledged.len()).await;
    assert_eq!(seen, acknowledged);
    assert_eq!(acknowledged.iter().collect::<BTreeSet<_>>().len(), 60);

    // The member comes back and catches up.
    etcd.restart(leader).unwrap();
    let mut restarted = etcd_client::Client::connect([etcd.endpoint(leader)], None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let prefix = "cluster#o/Thing/";
        let n = restarted.get(prefix, Some(etcd_client::GetOptions::new().with_prefix().with_count_only())).await;
        match n {
            Ok(r) if r.count() == 60 => break,
            _ if tokio::time::Instant::now() > deadline => panic!("the restarted member did not catch up"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_lease_with_thousands_of_objects_reaches_the_watch_in_one_revision() {
    if skip() {
        return;
    }
    let etcd = LocalEtcd::start().unwrap();
    etcd.wait_ready(Duration::from_secs(20)).await.unwrap();
    let store = EtcdStore::connect(etcd.endpoints(), "big-lease").await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    // 6,000 objects of 1 KiB: their last states come as one watch message of about 7 MB, past
    // the gRPC client's default 4 MiB limit.
    let n = 6_000;
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in (w..n).step_by(16) {
                    let mut o = DynamicObject::new("Thing", ObjectMeta::namespaced("ns", format!("o{i}")))
                        .with_spec(RawJson::from_value(&serde_json::json!({ "pad": "x".repeat(1024) })));
                    o.metadata.lease = Some(lease.id);
                    store.create(o, &WriteOptions::default()).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let from = store.current_revision().await.unwrap() + 1;
    let mut watch = store.watch(&WatchRequest::from(Selection::kind("Thing"), from)).await.unwrap();
    store.revoke_lease(lease.id).await.unwrap();
    let mut revisions = BTreeSet::new();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(30), watch.next()).await {
            Ok(Some(Ok(WatchEvent::Deleted(o)))) => {
                assert_eq!(o.spec.to_value()["pad"].as_str().map(str::len), Some(1024), "the last state");
                revisions.insert(o.metadata.resource_version);
            }
            other => panic!("expected a deletion, got {other:?}"),
        }
    }
    assert_eq!(revisions.len(), 1, "one revision for the whole lease");
    let left = store.list(&orch_core::ListRequest::new(Selection::kind("Thing"))).await.unwrap();
    assert!(left.items.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_on_one_etcd_do_not_see_each_other_even_with_nested_prefixes() {
    if skip() {
        return;
    }
    let etcd = LocalEtcd::start().unwrap();
    etcd.wait_ready(Duration::from_secs(20)).await.unwrap();
    let outer = EtcdStore::connect(etcd.endpoints(), "orch").await.unwrap();
    // A prefix that spells out where the outer cluster keeps its `Thing`s.
    let inner = EtcdStore::connect(etcd.endpoints(), "orch/o/Thing").await.unwrap();
    let from = outer.current_revision().await.unwrap() + 1;
    let mut outer_watch = outer.watch(&WatchRequest::from(Selection::kind("Thing"), from)).await.unwrap();
    inner.create(thing("intruder", 0), &WriteOptions::default()).await.unwrap();
    let mine = outer.create(thing("mine", 1), &WriteOptions::default()).await.unwrap();
    let listed = outer.list(&orch_core::ListRequest::new(Selection::kind("Thing"))).await.unwrap();
    assert_eq!(listed.items.iter().map(|o| o.metadata.name.as_str()).collect::<Vec<_>>(), ["mine"]);
    assert!(outer.get(&thing("intruder", 0).key()).await.unwrap_err().is_not_found());
    assert_eq!(read_changes(&mut outer_watch, 1).await, [mine.metadata.resource_version]);
}
