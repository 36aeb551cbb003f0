//! `RemoteStore` against the store conformance suite, through an `ApiServer` on loopback backed
//! by the memory store and by the embedded store (the etcd backend is in
//! `remote_etcd_conformance.rs`), and over https with an admin's client certificate and the
//! built-in rules.
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

/// As [`served`], over TLS: the server's certificate and the client's (an admin) signed by a
/// fresh cluster CA, every request authorized by the built-in rules.
async fn served_tls(store: Arc<dyn Store>) -> RemoteStore {
    use orch_store::api::{Authorizer, ClusterCa, Tokens, auth::ADMINS};
    let ca = ClusterCa::generate("conformance").expect("a CA");
    let cert = ca.server_certificate(&["127.0.0.1".into()]).expect("a server certificate");
    let tls = ca.server_config(&cert).expect("a TLS configuration");
    let admin = ca.client_certificate("admin", &[ADMINS], std::time::Duration::from_secs(3600)).expect("an admin");
    let api =
        ApiServer::builder(store).authentication(Tokens::new()).authorization(Authorizer::with_builtin_roles()).build();
    let server = api.spawn_tls("127.0.0.1:0".parse().unwrap(), tls).await.expect("bind loopback");
    let url = server.url();
    std::mem::forget(server);
    RemoteStore::builder(url)
        .ca_pem(ca.cert_pem())
        .client_identity(admin.cert_pem, admin.key_pem.expect("the CA made the key"))
        .build()
        .expect("a remote store")
}

mod memory_tls {
    orch_core::store_conformance!(
        async { super::served_tls(std::sync::Arc::new(orch_store::MemoryStore::new())).await },
        paused_time = false
    );
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
