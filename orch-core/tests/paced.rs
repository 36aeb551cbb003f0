//! `testkit::Paced` on the embedded store: virtual time stands still while its commit threads work.

use std::sync::Arc;
use std::time::Duration;

use orch_core::Store;
use orch_core::testkit::Paced;

use orch_core::kinds::Workload;
use orch_core::{Api, Object, ObjectMeta, Timestamp, TokioClock};
use orch_store::RedbStore;

/// While the embedded store's commit thread works, a paused clock stands still through a
/// `Paced` wrapper: many writes in a row pass no virtual time at all.
#[test]
fn virtual_time_stands_still_while_the_embedded_store_writes() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("orch-paced-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
        let redb: Arc<dyn Store> = Arc::new(RedbStore::builder().clock(clock).open(dir.join("p.redb")).unwrap());
        let api: Api<Workload> = Api::namespaced(Arc::new(Paced::new(redb)), "default");
        // A timer far ahead that an idle runtime would jump to.
        let far = tokio::spawn(tokio::time::sleep(Duration::from_secs(3600)));
        let began = tokio::time::Instant::now();
        for i in 0..200 {
            let obj = Object::new(ObjectMeta::named(format!("w-{i}")), Workload::command("main", &["sim"]));
            api.create(&obj).await.unwrap();
        }
        assert_eq!(began.elapsed(), Duration::ZERO, "no virtual time passed while writing");
        far.abort();
        let _ = std::fs::remove_dir_all(&dir);
    });
}
