//! One etcd per test file, started on first use, and cases run one at a time on it.

use std::sync::{Mutex, MutexGuard, OnceLock};

use orch_store::etcd::LocalEtcd;

/// The file's etcd, started on first use; `None` when etcd is not installed.
pub fn shared_etcd() -> Option<&'static LocalEtcd> {
    static ETCD: OnceLock<Option<LocalEtcd>> = OnceLock::new();
    ETCD.get_or_init(|| {
        if !LocalEtcd::available_for_test() {
            return None;
        }
        let etcd = LocalEtcd::start().expect("start etcd");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(etcd.wait_ready(std::time::Duration::from_secs(20))).expect("etcd ready");
        Some(etcd)
    })
    .as_ref()
}

/// Holds the file's cases to one at a time: etcd's revision is shared by every key prefix, and
/// several cases compare it before and after.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
