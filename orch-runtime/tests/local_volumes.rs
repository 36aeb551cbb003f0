//! `LocalVolumes` on a real directory: the volume provider suite, capacity accounting, and what a
//! restarted agent finds.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use orch_core::testkit::volume::{request, suite};
use orch_core::{Quantity, VolumeError, VolumeProvider};
use orch_runtime::LocalVolumes;

/// A fresh, empty directory for one provider (removed by the test that made it, when it passes).
fn fresh_root(test: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let root = std::env::temp_dir().join(format!("orch-local-volumes-{test}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    root
}

fn q(s: &str) -> Quantity {
    s.parse().unwrap()
}

#[tokio::test]
async fn local_volumes_pass_the_volume_provider_suite() {
    let roots = Arc::new(std::sync::Mutex::new(Vec::new()));
    let made = roots.clone();
    suite(
        move || {
            let root = fresh_root("suite");
            made.lock().unwrap().push(root.clone());
            async move { Arc::new(LocalVolumes::open(root, "n1", q("1Gi")).await.unwrap()) as Arc<dyn VolumeProvider> }
        },
        "n1",
    )
    .await;
    for root in roots.lock().unwrap().iter() {
        let _ = std::fs::remove_dir_all(root);
    }
}

#[tokio::test]
async fn capacity_is_accounted_and_a_volume_that_does_not_fit_is_refused_with_what_is_left() {
    let root = fresh_root("capacity");
    let p = LocalVolumes::open(&root, "n1", q("10Gi")).await.unwrap();
    assert!(!p.capabilities().enforces_size, "sizes are accounted, not enforced");
    p.create(&request("a", "6Gi", "n1")).await.unwrap();
    assert_eq!(p.available().await, q("4Gi"));
    let err = p.create(&request("b", "5Gi", "n1")).await.unwrap_err();
    match &err {
        VolumeError::InsufficientCapacity { volume, requested, available, .. } => {
            assert_eq!((volume.as_str(), *requested, *available), ("b", q("5Gi"), q("4Gi")));
        }
        other => panic!("expected InsufficientCapacity, got {other}"),
    }
    assert_eq!(
        err.to_string(),
        "volume \"b\" needs 5Gi but node \"n1\" (local capacity 10Gi) has only 4Gi left",
        "the error says what is left"
    );
    assert!(!root.join("b").exists(), "a refused volume leaves nothing behind");
    // A repeated create of an existing volume takes no more room; exactly what is left fits.
    p.create(&request("a", "6Gi", "n1")).await.unwrap();
    p.create(&request("c", "4Gi", "n1")).await.unwrap();
    assert_eq!(p.available().await, Quantity::ZERO);
    // Deleting gives the room back.
    p.delete("a").await.unwrap();
    assert_eq!(p.available().await, q("6Gi"));
    p.create(&request("b", "5Gi", "n1")).await.unwrap();
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_overcommit() {
    let root = fresh_root("concurrent");
    let p = Arc::new(LocalVolumes::open(&root, "n1", q("10Gi")).await.unwrap());
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.create(&request(&format!("v{i}"), "1Gi", "n1")).await })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => created += 1,
            Err(VolumeError::InsufficientCapacity { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(created, 10, "exactly as many 1Gi volumes as fit in 10Gi");
    assert_eq!(p.available().await, Quantity::ZERO);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn another_node_is_refused_naming_where_the_volume_lives() {
    let root = fresh_root("node");
    let p = LocalVolumes::open(&root, "n1", q("1Gi")).await.unwrap();
    let err = p.create(&request("a", "1Mi", "n2")).await.unwrap_err();
    assert!(matches!(err, VolumeError::Refused { .. }), "{err}");
    p.create(&request("a", "1Mi", "n1")).await.unwrap();
    let err = p.publish("a", "n2", "c1").await.unwrap_err();
    assert_eq!(err.to_string(), "volume \"a\": it lives on node \"n1\", not \"n2\"");
    // Unpublishing on another node withdraws nothing: the publication on n1 stays.
    p.publish("a", "n1", "c1").await.unwrap();
    p.unpublish("a", "n2", "c1").await.unwrap();
    assert!(matches!(p.delete("a").await, Err(VolumeError::InUse { .. })));
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn a_reopened_provider_finds_its_volumes_their_sizes_data_and_consumers() {
    let root = fresh_root("reopen");
    let p = LocalVolumes::open(&root, "n1", q("10Gi")).await.unwrap();
    p.create(&request("db", "3Gi", "n1")).await.unwrap();
    let path = p.publish("db", "n1", "db-0").await.unwrap().path;
    std::fs::write(path.join("counter"), "7").unwrap();
    drop(p);
    // A delete interrupted by a crash leaves a renamed directory: it is finished on open.
    std::fs::create_dir_all(root.join(".deleting-old-0000000000000001").join("data")).unwrap();
    // A create interrupted before its record counts for nothing.
    std::fs::create_dir_all(root.join("half").join("data")).unwrap();

    let p = LocalVolumes::open(&root, "n1", q("10Gi")).await.unwrap();
    assert_eq!(p.available().await, q("7Gi"), "the volume's size is still accounted");
    assert!(!root.join(".deleting-old-0000000000000001").exists());
    match p.delete("db").await {
        Err(VolumeError::InUse { consumers, .. }) => assert_eq!(consumers, ["db-0"]),
        other => panic!("the consumer must survive the restart: {other:?}"),
    }
    let again = p.publish("db", "n1", "db-0").await.unwrap().path;
    assert_eq!(std::fs::read_to_string(again.join("counter")).unwrap(), "7");
    assert!(matches!(p.publish("half", "n1", "c").await, Err(VolumeError::NotFound { .. })));
    p.create(&request("half", "1Gi", "n1")).await.unwrap();
    assert_eq!(p.available().await, q("6Gi"));
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn a_bad_node_capacity_is_refused() {
    let root = fresh_root("bad-capacity");
    let err = LocalVolumes::open(&root, "n1", q("-1")).await.unwrap_err();
    assert!(matches!(&err, VolumeError::Invalid { field, .. } if field == "capacity"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

#[derive(Debug, Clone)]
enum Op {
    Create { volume: usize, mib: i64 },
    Delete { volume: usize },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0..4usize, 1..8i64).prop_map(|(volume, mib)| Op::Create { volume, mib }),
        1 => (0..4usize).prop_map(|volume| Op::Delete { volume }),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]

    /// Whatever the sequence of creates and deletes, the volumes never hold more than the node's
    /// capacity, a create succeeds exactly when it fits (or repeats an existing volume), and a
    /// reopened provider accounts the same.
    #[test]
    fn capacity_is_never_overcommitted(ops in proptest::collection::vec(op(), 1..16)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            const MIB: i64 = 1 << 20;
            let root = fresh_root("prop");
            let p = LocalVolumes::open(&root, "n1", Quantity::from_bytes(16 * MIB)).await.unwrap();
            let mut model = std::collections::BTreeMap::<usize, i64>::new();
            for op in ops {
                match op {
                    Op::Create { volume, mib } => {
                        let req = request(&format!("v{volume}"), &format!("{mib}Mi"), "n1");
                        let got = p.create(&req).await;
                        let used: i64 = model.values().sum();
                        match model.get(&volume) {
                            Some(&have) if have == mib => assert!(got.is_ok(), "a repeated create: {got:?}"),
                            Some(_) => assert!(matches!(got, Err(VolumeError::Refused { .. })), "{got:?}"),
                            None if used + mib <= 16 => {
                                got.unwrap();
                                model.insert(volume, mib);
                            }
                            None => assert!(matches!(got, Err(VolumeError::InsufficientCapacity { .. })), "{got:?}"),
                        }
                    }
                    Op::Delete { volume } => {
                        p.delete(&format!("v{volume}")).await.unwrap();
                        model.remove(&volume);
                    }
                }
                let used: i64 = model.values().sum();
                assert!(used <= 16);
                assert_eq!(p.available().await, Quantity::from_bytes((16 - used) * MIB));
            }
            drop(p);
            let reopened = LocalVolumes::open(&root, "n1", Quantity::from_bytes(16 * MIB)).await.unwrap();
            let used: i64 = model.values().sum();
            assert_eq!(reopened.available().await, Quantity::from_bytes((16 - used) * MIB));
            let _ = std::fs::remove_dir_all(&root);
        });
    }
}

mod readme {
    use std::path::{Path, PathBuf};

    use orch_core::storage::CreateVolume;
    use orch_core::{VolumeError, VolumeProvider, kinds::AccessMode};
    use orch_runtime::LocalVolumes;

    async fn provide(root: &Path) -> Result<PathBuf, VolumeError> {
        let volumes = LocalVolumes::open(root, "node-1", "100Gi".parse().unwrap()).await?;
        let req = CreateVolume {
            name: "db-data".into(),
            capacity: "10Gi".parse().unwrap(),
            access_mode: AccessMode::ReadWriteOnce,
            node: Some("node-1".into()),
        };
        volumes.create(&req).await?;
        volumes.create(&req).await?; // again: the same volume, data and all
        let huge = CreateVolume { name: "huge".into(), capacity: "200Gi".parse().unwrap(), ..req };
        let refused = volumes.create(&huge).await.unwrap_err();
        assert!(refused.to_string().ends_with("has only 90Gi left"));
        Ok(volumes.publish("db-data", "node-1", "db-0").await?.path)
    }

    #[tokio::test]
    async fn the_readme_snippet_runs() {
        let root = super::fresh_root("readme");
        let path = provide(&root).await.unwrap();
        assert_eq!(path, root.join("db-data").join("data"));
        assert!(path.is_dir());
        let _ = std::fs::remove_dir_all(&root);
    }
}
