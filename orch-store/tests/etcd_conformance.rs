//! The etcd store against the store conformance suite, on a real etcd started by the test.
//!
//! One etcd serves the whole file; every store the suite asks for gets a fresh key prefix, so
//! cases start empty. Cases run one at a time: several suite cases compare the global revision
//! before and after, and etcd's revision is shared by every prefix (see `orch_store::etcd`).
//! Without an `etcd` binary on `PATH` each case says it is skipped and returns (with
//! `ORCH_REQUIRE_ETCD` set, as CI does, it fails instead).

#![cfg(feature = "etcd")]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::etcd::{one_at_a_time, shared_etcd};
use orch_store::EtcdStore;

async fn fresh_store(endpoints: Vec<String>, case: &'static str) -> EtcdStore {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = format!("conformance/{case}/{}", NEXT.fetch_add(1, Ordering::Relaxed));
    EtcdStore::connect(endpoints, prefix).await.expect("connect to the test etcd")
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
                    move || fresh_store(endpoints.clone(), stringify!($name)),
                    false,
                );
            }
        )*
    };
}

orch_core::__store_cases!(etcd_cases, ());
