//! Shared fixtures for orch's benchmarks: object shapes and pre-filled stores, so each bench
//! measures the same thing the README reports.

pub mod scale;

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

/// The files of the openb trace a bench reads: where they are, or why the bench cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trace {
    /// Both files are there.
    Found {
        /// The node list.
        nodes: std::path::PathBuf,
        /// The task list.
        pods: std::path::PathBuf,
    },
    /// Nothing was asked for and the default folder is not there: skip, saying so.
    Absent(std::path::PathBuf),
}

/// Locates the openb trace: the folder `dir` (from `$ORCH_OPENB_DIR`, else `default_dir`) and
/// the task list `pods` (from `$ORCH_OPENB_PODS`, else the default list). A trace that was asked
/// for (either variable set) and is missing is an error naming the file looked for; with neither
/// set, a missing default folder means "skip".
pub fn locate_openb(
    dir: Option<std::path::PathBuf>,
    pods: Option<String>,
    default_dir: &std::path::Path,
) -> Result<Trace, String> {
    let asked = dir.is_some() || pods.is_some();
    let dir = dir.unwrap_or_else(|| default_dir.to_path_buf());
    if !asked && !dir.is_dir() {
        return Ok(Trace::Absent(dir));
    }
    let nodes = dir.join("openb_node_list_all_node.csv");
    let pods = dir.join(pods.unwrap_or_else(|| "openb_pod_list_default.csv".into()));
    for file in [&nodes, &pods] {
        if !file.is_file() {
            return Err(format!("openb trace: {} not found", file.display()));
        }
    }
    Ok(Trace::Found { nodes, pods })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_has_requested_size() {
        let s = spec_of_size(1024, 3);
        assert!((1020..=1030).contains(&s.len()), "{}", s.len());
    }

    #[test]
    fn a_trace_asked_for_must_be_there_and_one_not_asked_for_is_skipped() {
        let root = std::env::temp_dir().join(format!("orch-openb-locate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let absent = root.join("absent");
        assert_eq!(locate_openb(None, None, &absent), Ok(Trace::Absent(absent.clone())));
        let e = locate_openb(Some(absent.clone()), None, &absent).unwrap_err();
        assert!(e.contains("absent/openb_node_list_all_node.csv not found"), "{e}");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("openb_node_list_all_node.csv"), "").unwrap();
        std::fs::write(root.join("openb_pod_list_default.csv"), "").unwrap();
        // A misspelt task list names the file it looked for, even in the default folder.
        let e = locate_openb(None, Some("openb_pod_list_gpushare2O.csv".into()), &root).unwrap_err();
        assert!(e.contains("openb_pod_list_gpushare2O.csv not found"), "{e}");
        assert_eq!(
            locate_openb(None, None, &root),
            Ok(Trace::Found {
                nodes: root.join("openb_node_list_all_node.csv"),
                pods: root.join("openb_pod_list_default.csv")
            })
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
