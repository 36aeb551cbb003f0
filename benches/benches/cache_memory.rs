//! Heap bytes a cache spends per object beyond the decoded object itself, counted by dhat.
//!
//! `cargo bench -p orch-benches --bench cache_memory`
//!
//! Decoding 100,000 objects into a plain vector gives the objects' own cost; a cache of the same
//! objects (with its label, owner and node indexes) costs that plus its overhead. Every index has
//! entries: each workload has two labels, is bound to one of 500 nodes and is owned (as a
//! controller) by one of 1,000 owners, 100 workloads each, as a replica set owns its replicas.

use std::sync::Arc;

use orch_core::kinds::Workload;
use orch_core::{Api, Cache, CacheConfig, ListParams, Object, ObjectMeta, OwnerReference, Store};
use orch_store::MemoryStore;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = if std::env::args().any(|a| a == "--test") { 1_000 } else { 100_000 };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    rt.block_on(async {
        let api: Api<Workload> = Api::namespaced(store.clone(), "default");
        for i in 0..n {
            let mut w = Workload::command("main", &["/bin/sleep", "3600"]);
            w.node_name = Some(format!("node-{}", i % 500));
            let mut meta = ObjectMeta::named(format!("web-{i:06}"))
                .with_label("app", "web")
                .with_label("shard", format!("s{}", i % 16));
            let owner = i % 1_000;
            meta.owner_references.push(OwnerReference {
                kind: "ReplicaSet".into(),
                name: format!("web-{owner:04}"),
                uid: format!("00000000-0000-4000-8000-{owner:012}"),
                controller: true,
                block_owner_deletion: true,
            });
            api.create(&Object::new(meta, w)).await.expect("create");
        }
    });
    let _profiler = dhat::Profiler::builder().testing().build();

    // The objects' own cost: decoded once into a vector of Arcs.
    let before = dhat::HeapStats::get().curr_bytes;
    let decoded: Vec<Arc<Object<Workload>>> = rt.block_on(async {
        let api: Api<Workload> = Api::namespaced(store.clone(), "default");
        api.list(&ListParams::default()).await.expect("list").items.into_iter().map(Arc::new).collect()
    });
    let objects = dhat::HeapStats::get().curr_bytes - before;
    let vector = decoded.capacity() * std::mem::size_of::<Arc<Object<Workload>>>();
    drop(decoded);

    let before = dhat::HeapStats::get().curr_bytes;
    let cache: Cache<Workload> = rt.block_on(async {
        let cache = Cache::spawn(store.clone(), CacheConfig::default());
        cache.ready().await;
        cache
    });
    let cached = dhat::HeapStats::get().curr_bytes - before;
    assert_eq!(cache.len(), n);
    // The owner index is in use: every owner finds its workloads through it.
    assert_eq!(cache.owned_by("00000000-0000-4000-8000-000000000007").len(), n / 1_000);
    let own = (objects - vector) as f64 / n as f64;
    println!("cache_memory/workloads objects={n}");
    println!("  decoded object itself:        {own:.0} B/object");
    println!("  in a cache (object + cache):  {:.0} B/object", cached as f64 / n as f64);
    println!("  cache overhead beyond object: {:.0} B/object", cached as f64 / n as f64 - own);
    drop(cache);
}
