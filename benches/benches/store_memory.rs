//! Heap bytes per stored object, counted by dhat's allocator (not estimated).
//!
//! `cargo bench -p orch-benches --bench store_memory`
//!
//! Fills a memory store with 100,000 objects whose spec is 1 KiB of JSON and reports the heap
//! growth per object, with and without the (bounded) history that the store keeps for watches.

use orch_benches::{filled_memory_store, spec_of_size};
use orch_core::Store;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // criterion-style discovery by `cargo bench -- --list`: nothing to list.
        return;
    }
    // `cargo bench -- --test` (as CI runs it) only checks that the measurement works.
    let n = if std::env::args().any(|a| a == "--test") { 1_000 } else { 100_000 };
    let size = 1024;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let _profiler = dhat::Profiler::builder().testing().build();
    let spec_len = spec_of_size(size, 0).len();
    let before = dhat::HeapStats::get().curr_bytes;
    let store = rt.block_on(filled_memory_store(n, size));
    let with_history = dhat::HeapStats::get().curr_bytes - before;
    // Compacting to the current revision drops the history: what remains is the objects alone.
    rt.block_on(async {
        let rev = store.current_revision().await.expect("revision");
        store.compact(rev).await.expect("compact");
    });
    let objects_only = dhat::HeapStats::get().curr_bytes - before;
    println!("memory_store/bytes_per_object spec_json={spec_len}B objects={n}");
    println!("  with history (one create event each): {:.0} B/object", with_history as f64 / n as f64);
    println!("  objects only (history compacted):     {:.0} B/object", objects_only as f64 / n as f64);
    println!(
        "  overhead beyond the spec text:        {:.0} B/object",
        objects_only as f64 / n as f64 - spec_len as f64
    );
    drop(store);
}
