//! Load through the API: 64 writers and 1,000 watchers at once, over `RemoteStore`. Every
//! watcher sees every write exactly once, in revision order.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use orch_core::{DynamicObject, ObjectMeta, RawJson, Selection, Store, WatchEvent, WatchRequest, WriteOptions};
use orch_store::MemoryStore;
use orch_store::api::{ApiServer, RemoteStore};

const WRITERS: usize = 64;
const WRITES_EACH: usize = 20;
const WATCHERS: usize = 1_000;
/// Watchers share connections as a process's components would: 100 streams on each.
const CONNECTIONS: usize = 10;

#[test]
fn sixty_four_writers_and_a_thousand_watchers_lose_and_reorder_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let server = ApiServer::new(store).spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let clients: Vec<RemoteStore> = (0..CONNECTIONS).map(|_| RemoteStore::new(server.url()).unwrap()).collect();
        let from = clients[0].current_revision().await.unwrap() + 1;
        let sel = Selection::kind("Thing").in_namespace("load");
        let mut watches = Vec::new();
        for i in 0..WATCHERS {
            watches.push(clients[i % CONNECTIONS].watch(&WatchRequest::from(sel.clone(), from)).await.unwrap());
        }
        let total = WRITERS * WRITES_EACH;
        let watchers: Vec<_> = watches
            .into_iter()
            .map(|mut w| {
                tokio::spawn(async move {
                    let mut revs = Vec::with_capacity(total);
                    while revs.len() < total {
                        match tokio::time::timeout(Duration::from_secs(60), w.next()).await {
                            Ok(Some(Ok(WatchEvent::Progress(_)))) => {}
                            Ok(Some(Ok(e))) => revs.push(e.revision()),
                            other => panic!("watch ended after {} events: {other:?}", revs.len()),
                        }
                    }
                    revs
                })
            })
            .collect();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let client = clients[w % CONNECTIONS].clone();
                tokio::spawn(async move {
                    let mut written = Vec::new();
                    let mut obj = DynamicObject::new("Thing", ObjectMeta::namespaced("load", format!("w{w}")));
                    let mut cur = client.create(obj.clone(), &WriteOptions::default()).await.unwrap();
                    written.push(cur.metadata.resource_version);
                    for i in 1..WRITES_EACH {
                        obj = (*cur).clone();
                        obj.spec = RawJson::from_value(&serde_json::json!({ "i": i }));
                        cur = client.update(obj, &WriteOptions::default()).await.unwrap();
                        written.push(cur.metadata.resource_version);
                    }
                    written
                })
            })
            .collect();
        let mut written = BTreeSet::new();
        for w in writers {
            written.extend(w.await.unwrap());
        }
        assert_eq!(written.len(), total, "every write got its own revision");
        let expected: Vec<u64> = written.into_iter().collect();
        for (i, w) in watchers.into_iter().enumerate() {
            let seen = w.await.unwrap();
            assert_eq!(seen, expected, "watcher {i} saw every write once, in revision order");
        }
        server.shutdown().await.unwrap();
    });
}
