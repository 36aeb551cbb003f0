//! The embedded durable store against the store conformance suite, on a fresh file per case.
//!
//! The suite runs in real time on a multi-thread runtime: commits happen on the store's own
//! writer thread, which a paused tokio clock would not wait for.

#![cfg(feature = "redb")]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;

fn fresh_file() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path =
        common::scratch_dir("redb-conformance").join(format!("case-{}.redb", NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_file(&path);
    path
}

orch_core::store_conformance!(orch_store::RedbStore::open(fresh_file()).expect("a fresh store"), paused_time = false);

/// The suite again with history trimmed as it goes, so the file's log is trimmed too.
mod small_history {
    orch_core::store_conformance!(
        orch_store::RedbStore::builder().history_limit(4096).open(super::fresh_file()).expect("a fresh store"),
        paused_time = false
    );
}
