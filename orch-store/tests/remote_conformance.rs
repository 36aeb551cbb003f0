//! `RemoteStore` against the store conformance suite, through an `ApiServer` on loopback backed
//! by the memory store and by the embedded store (the etcd backend is in
//! `remote_etcd_conformance.rs`).
//!
//! Each case gets a fresh server on its own port in the case's runtime. The suite runs in real
//! time: the calls cross a real socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use orch_core::Store;
use orch_store::api::{ApiServer, RemoteStore};

mod common;

/// Serves `store` on a loopback port (for the rest of the case's runtime) and answers a
/// `RemoteStore` speaking to it.
async fn served(store: Arc<dyn Store>) -> RemoteStore {
    let server = ApiServer::new(store).spawn("127.0.0.1:0".parse().unwrap()).await.expect("bind loopback");
    let url = server.url();
    // The server lives as long as the case's runtime.
    std::mem::forget(server);
    RemoteStore::new(url).expect("a remote store")
}

mod memory {
    orch_core::store_conformance!(
        async { super::served(std::sync::Arc::new(orch_store::MemoryStore::new())).await },
        paused_time = false
    );
}

fn fresh_file() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = common::scratch_dir("remote-redb-conformance")
        .join(format!("case-{}.redb", NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_file(&path);
    path
}

mod embedded {
    orch_core::store_conformance!(
        async {
            let store = orch_store::RedbStore::open(super::fresh_file()).expect("a fresh store");
            super::served(std::sync::Arc::new(store)).await
        },
        paused_time = false
    );
}
