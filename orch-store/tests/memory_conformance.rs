//! The in-memory store against the store conformance suite.

orch_core::store_conformance!(orch_store::MemoryStore::new(), paused_time = true);

/// The suite again with history trimmed automatically as it goes (the suite needs a few thousand
/// events of history; trimming below that is covered by the unit tests in `memory.rs`).
mod small_history {
    orch_core::store_conformance!(orch_store::MemoryStore::builder().history_limit(4096).build(), paused_time = true);
}
