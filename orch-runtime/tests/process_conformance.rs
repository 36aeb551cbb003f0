//! The process runtime against the runtime conformance suite, each case in a fresh directory.

use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn fresh_root() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "orch-process-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

orch_core::runtime_conformance!(
    || {
        let root = fresh_root();
        move || orch_runtime::ProcessRuntime::new(&root).expect("runtime root")
    },
    orch_core::testkit::runtime::Fixture::host_shell()
);
