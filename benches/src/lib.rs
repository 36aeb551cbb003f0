//! Shared fixtures for orch's benchmarks: object shapes and pre-filled stores, so each bench
//! measures the same thing the README reports.

use std::sync::Arc;

use orch_core::{DynamicObject, ObjectMeta, RawJson, Store, WriteOptions};
use orch_store::MemoryStore;

/// Kind used by the store benchmarks.
pub const KIND: &str = "Blob";
/// Namespace used by the store benchmarks.
pub const NAMESPACE: &str = "bench";
/// Number of label groups: a selector on one group matches 1% of the objects.
pub const GROUPS: usize = 100;

/// Name of the `i`-th benchmark object.
pub fn name(i: usize) -> String {
    format!("obj-{i:06}")
}

/// A spec whose canonical JSON text is `bytes` long (give or take a few), shaped like a real
/// spec: a handful of scalar fields, a small list, a map and a payload string.
pub fn spec_of_size(bytes: usize, seed: usize) -> RawJson {
    let fixed = serde_json::json!({
        "image": "registry.local/app:1.2.3",
        "replicas": seed % 7,
        "ports": [8080, 8443],
        "env": {"MODE": "bench", "SEED": seed.to_string()},
        "payload": "",
    });
    let base = RawJson::from_value(&fixed).len();
    let mut v = fixed;
    v["payload"] = serde_json::Value::String("x".repeat(bytes.saturating_sub(base)));
    RawJson::from_value(&v)
}

/// The `i`-th benchmark object: two labels (one of [`GROUPS`] groups) and a spec of `bytes`.
pub fn object(i: usize, bytes: usize) -> DynamicObject {
    let meta = ObjectMeta::namespaced(NAMESPACE, name(i))
        .with_label("group", format!("g{}", i % GROUPS))
        .with_label("app", "bench");
    DynamicObject::new(KIND, meta).with_spec(spec_of_size(bytes, i))
}

/// A memory store holding `n` objects of `bytes` each.
pub async fn filled_memory_store(n: usize, bytes: usize) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    for i in 0..n {
        store.create(object(i, bytes), &WriteOptions::default()).await.expect("create");
    }
    store
}

/// Cheap deterministic pseudo-random indexes (xorshift), so benches do not measure an RNG.
#[derive(Debug, Clone)]
pub struct Indexes(u64);

impl Indexes {
    /// A sequence from a fixed seed.
    pub fn new(seed: u64) -> Self {
        Indexes(seed.max(1))
    }

    /// The next index below `n`.
    pub fn next_below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_has_requested_size() {
        let s = spec_of_size(1024, 3);
        assert!((1020..=1030).contains(&s.len()), "{}", s.len());
    }
}
