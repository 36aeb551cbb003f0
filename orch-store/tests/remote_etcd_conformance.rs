//! `RemoteStore` against the store conformance suite, through an `ApiServer` backed by the etcd
//! store on a real etcd started by the test (as in `etcd_conformance.rs`: one etcd for the file,
//! a fresh key prefix per case, cases one at a time; skipped, saying so, without an `etcd`
//! binary unless `ORCH_REQUIRE_ETCD` is set).

#![cfg(feature = "etcd")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::etcd::{one_at_a_time, shared_etcd};
use orch_store::EtcdStore;
use orch_store::api::{ApiServer, RemoteStore};

async fn fresh_remote(endpoints: Vec<String>, case: &'static str) -> RemoteStore {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = format!("remote-conformance/{case}/{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let store = EtcdStore::connect(endpoints, prefix).await.expect("connect to the test etcd");
    let server = ApiServer::new(Arc::new(store)).spawn("127.0.0.1:0".parse().unwrap()).await.expect("bind loopback");
    let url = server.url();
    // The server lives as long as the case's runtime.
    std::mem::forget(server);
    RemoteStore::new(url).expect("a remote store")
}

macro_rules! etcd_cases {
    (() $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let Some(etcd) = shared_etcd() else {
                    eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
                    return;
                };
                let _serial = one_at_a_time();
                let endpoints = etcd.endpoints();
                orch_core::testkit::store::run_case(
                    stringify!($name),
                    move || fresh_remote(endpoints.clone(), stringify!($name)),
                    false,
                );
            }
        )*
    };
}

orch_core::__store_cases!(etcd_cases, ());
