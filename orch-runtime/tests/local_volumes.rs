//! `LocalVolumes` on a real directory: the volume provider suite with sizes accounted and with
//! sizes enforced (loop-mounted file systems), capacity accounting, enforcement, and what a
//! restarted agent finds.
//!
//! The tests of enforcement need loop mounts (root, loop devices, `mkfs.ext4`): where they do not
//! work they are skipped, saying why, unless `ORCH_REQUIRE_LOOP=1`, which makes that a failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use orch_core::testkit::volume::{request, suite};
use orch_core::{Quantity, VolumeError, VolumeProvider};
use orch_runtime::{Enforcement, LocalVolumes};

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

/// A provider that only accounts sizes.
async fn accounting(root: &Path, capacity: &str) -> LocalVolumes {
    LocalVolumes::builder(root, "n1", q(capacity)).enforcement(Enforcement::Off).open().await.unwrap()
}

#[tokio::test]
async fn accounted_local_volumes_pass_the_volume_provider_suite() {
    let roots = Arc::new(std::sync::Mutex::new(Vec::new()));
    let made = roots.clone();
    suite(
        move || {
            let root = fresh_root("suite");
            made.lock().unwrap().push(root.clone());
            async move { Arc::new(accounting(&root, "1Gi").await) as Arc<dyn VolumeProvider> }
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
    let p = accounting(&root, "10Gi").await;
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
    let p = Arc::new(accounting(&root, "10Gi").await);
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
    let p = accounting(&root, "1Gi").await;
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
    let p = accounting(&root, "10Gi").await;
    p.create(&request("db", "3Gi", "n1")).await.unwrap();
    let path = p.publish("db", "n1", "db-0").await.unwrap().path;
    std::fs::write(path.join("counter"), "7").unwrap();
    drop(p);
    // A delete interrupted by a crash leaves a renamed directory: it is finished on open.
    std::fs::create_dir_all(root.join(".deleting-old-0000000000000001").join("data")).unwrap();
    // A create interrupted before its record counts for nothing.
    std::fs::create_dir_all(root.join("half").join("data")).unwrap();

    let p = accounting(&root, "10Gi").await;
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
async fn a_volume_with_a_damaged_record_is_left_untouched_and_the_others_serve() {
    let root = fresh_root("damaged");
    let p = accounting(&root, "10Gi").await;
    for name in ["good", "bad"] {
        p.create(&request(name, "1Gi", "n1")).await.unwrap();
        let path = p.publish(name, "n1", "c").await.unwrap().path;
        std::fs::write(path.join("precious"), name).unwrap();
    }
    drop(p);
    let record = std::fs::read_dir(root.join("bad"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_file())
        .expect("the volume's record");
    std::fs::write(&record, "{ not json").unwrap();

    let p = accounting(&root, "10Gi").await;
    let good = p.publish("good", "n1", "c").await.unwrap().path;
    assert_eq!(std::fs::read_to_string(good.join("precious")).unwrap(), "good");
    for refused in [
        p.publish("bad", "n1", "c").await.map(|_| ()),
        p.create(&request("bad", "1Gi", "n1")).await.map(|_| ()),
        p.delete("bad").await,
    ] {
        match refused {
            Err(VolumeError::Refused { volume, reason }) => {
                assert_eq!(volume, "bad");
                assert!(reason.starts_with("damaged and left untouched: its record"), "{reason}");
            }
            other => panic!("a damaged volume is refused: {other:?}"),
        }
    }
    let kept = root.join("bad").join("data").join("precious");
    assert_eq!(std::fs::read_to_string(kept).unwrap(), "bad", "its data is kept for an operator");
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
            let p = accounting(&root, "16Mi").await;
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
            let reopened = accounting(&root, "16Mi").await;
            let used: i64 = model.values().sum();
            assert_eq!(reopened.available().await, Quantity::from_bytes((16 - used) * MIB));
            let _ = std::fs::remove_dir_all(&root);
        });
    }
}

/// Many providers opening at once on one file system (the agents of simulated nodes) probe loop
/// mounts once between them and all get its answer; another `mkfs` program is probed anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_mounts_are_probed_once_per_file_system_and_program() {
    use std::os::unix::fs::PermissionsExt;
    let dir = fresh_root("probe-once");
    std::fs::create_dir_all(&dir).unwrap();
    // A formatter that records each run and fails, so that no loop mount is tried.
    let counting = |name: &str| {
        let (program, runs) = (dir.join(name), dir.join(format!("{name}.runs")));
        std::fs::write(&program, format!("#!/bin/sh\necho run >> '{}'\nexit 3\n", runs.display())).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        (program, runs)
    };
    let runs_of = |runs: &Path| std::fs::read_to_string(runs).unwrap_or_default().lines().count();
    let (first, first_runs) = counting("mkfs-a");
    let opens = (0..8).map(|i| {
        let root = dir.join(format!("node-{i}"));
        let program = first.clone();
        tokio::spawn(async move { LocalVolumes::builder(root, "n1", q("1Gi")).mkfs_program(program).open().await })
    });
    for open in futures::future::join_all(opens).await {
        let p = open.unwrap().expect("auto opens without enforcement when the probe fails");
        assert!(!p.capabilities().enforces_size);
    }
    assert_eq!(runs_of(&first_runs), 1, "one probe for eight providers on one file system");
    let required = LocalVolumes::builder(dir.join("node-r"), "n1", q("1Gi"))
        .enforcement(Enforcement::Required)
        .mkfs_program(&first)
        .open()
        .await
        .unwrap_err();
    let source = std::error::Error::source(&required).map(|s| s.to_string()).unwrap_or_default();
    assert!(source.contains("exit status: 3"), "the probe's answer names what failed: {source}");
    assert_eq!(runs_of(&first_runs), 1, "the answer is kept");

    let (second, second_runs) = counting("mkfs-b");
    LocalVolumes::builder(dir.join("node-b"), "n1", q("1Gi")).mkfs_program(&second).open().await.unwrap();
    assert_eq!(runs_of(&second_runs), 1, "another program is probed on its own");
    let _ = std::fs::remove_dir_all(&dir);
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
        LocalVolumes::unmount_all(&root).await.unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }
}

mod enforced {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::sync::Arc;

    use orch_core::testkit::volume::{request, suite};
    use orch_core::{VolumeError, VolumeProvider};
    use orch_runtime::{Enforcement, LocalVolumes};

    use super::{fresh_root, q};

    const MIB: usize = 1 << 20;

    /// Whether loop-mounted file systems work here (checked with a `Required` open); else
    /// prints why the test is skipped, or fails when `ORCH_REQUIRE_LOOP=1`.
    async fn loop_mounts(test: &str) -> bool {
        let root = fresh_root("loop-check");
        let got = LocalVolumes::builder(&root, "n1", q("1Gi")).enforcement(Enforcement::Required).open().await;
        let _ = std::fs::remove_dir_all(&root);
        match got {
            Ok(_) => true,
            Err(e) => {
                let why = format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
                if std::env::var("ORCH_REQUIRE_LOOP").as_deref() == Ok("1") {
                    panic!("{test}: ORCH_REQUIRE_LOOP=1 but loop mounts do not work here: {why}");
                }
                eprintln!("{test}: skipped, loop mounts do not work here (set ORCH_REQUIRE_LOOP=1 to fail): {why}");
                false
            }
        }
    }

    async fn enforcing(root: &Path, capacity: &str) -> LocalVolumes {
        LocalVolumes::builder(root, "n1", q(capacity)).enforcement(Enforcement::Required).open().await.unwrap()
    }

    /// The mount points under `root`, from `/proc/self/mountinfo`.
    fn mounts_under(root: &Path) -> Vec<String> {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let root = root.to_string_lossy().into_owned();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|m| m.replace("\\040", " "))
            .filter(|m| m.starts_with(&root))
            .collect()
    }

    /// The loop devices whose backing file is under `root`, from `losetup -a`.
    fn loop_devices_under(root: &Path) -> Vec<String> {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let out = std::process::Command::new("losetup").arg("-a").output().unwrap();
        assert!(out.status.success(), "losetup -a: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(root.to_string_lossy().as_ref()))
            .map(str::to_string)
            .collect()
    }

    /// The loop devices still backed by files under `root` once their file systems are
    /// unmounted: each detaches with its unmount (autoclear), which a kernel may finish a
    /// moment later, so they are given a while (5 s), not forever.
    async fn loop_devices_left(root: &Path) -> Vec<String> {
        for _ in 0..50 {
            if loop_devices_under(root).is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        loop_devices_under(root)
    }

    /// Unmounts and removes `root`; fails the test if anything stays mounted.
    async fn clean(root: &Path) {
        LocalVolumes::unmount_all(root).await.unwrap();
        assert_eq!(mounts_under(root), Vec::<String>::new(), "nothing stays mounted");
        assert_eq!(loop_devices_left(root).await, Vec::<String>::new(), "no loop device stays");
        std::fs::remove_dir_all(root).unwrap();
    }

    /// Writes `len` bytes to a new file `path`, through to the disk.
    fn write_file(path: &Path, len: usize) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        let chunk = vec![0x5a_u8; MIB];
        let mut left = len;
        while left > 0 {
            let n = left.min(MIB);
            f.write_all(&chunk[..n])?;
            left -= n;
        }
        f.sync_all()
    }

    #[tokio::test]
    async fn enforced_local_volumes_pass_the_volume_provider_suite() {
        if !loop_mounts("enforced suite").await {
            return;
        }
        let roots = Arc::new(std::sync::Mutex::new(Vec::new()));
        let made = roots.clone();
        suite(
            move || {
                let root = fresh_root("enforced-suite");
                made.lock().unwrap().push(root.clone());
                async move {
                    let p = enforcing(&root, "1Gi").await;
                    assert!(p.capabilities().enforces_size);
                    Arc::new(p) as Arc<dyn VolumeProvider>
                }
            },
            "n1",
        )
        .await;
        let roots = roots.lock().unwrap().clone();
        for root in roots {
            clean(&root).await;
        }
    }

    #[tokio::test]
    async fn a_volume_holds_its_capacity_and_not_a_mebibyte_more() {
        if !loop_mounts("capacity enforced").await {
            return;
        }
        let root = fresh_root("enforced-capacity");
        let p = enforcing(&root, "1Gi").await;
        assert!(p.capabilities().enforces_size);
        p.create(&request("small", "16Mi", "n1")).await.unwrap();
        let path = p.publish("small", "n1", "c1").await.unwrap().path;
        assert_eq!(path, root.join("small").join("data"), "consumers get the same directory as without enforcement");
        assert_eq!(mounts_under(&path), [std::fs::canonicalize(&path).unwrap().to_string_lossy()]);
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0, "a new volume is empty");
        // The image counts for the capacity only.
        assert_eq!(p.available().await, q("1008Mi"));
        let image = std::fs::metadata(root.join("small").join("image")).unwrap();
        assert!(image.len() >= 16 * MIB as u64, "the image is at least the capacity: {}", image.len());
        assert!(image.blocks() * 512 < image.len(), "the image is sparse");

        write_file(&path.join("full"), 16 * MIB).expect("the capacity can be written");
        std::fs::remove_file(path.join("full")).unwrap();
        let err = write_file(&path.join("over"), 17 * MIB).expect_err("a mebibyte past the capacity must fail");
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC), "{err}");
        std::fs::remove_file(path.join("over")).unwrap();
        p.unpublish("small", "n1", "c1").await.unwrap();
        p.delete("small").await.unwrap();
        clean(&root).await;
    }

    /// The sizing rule of the documentation: a volume of capacity C offers (statvfs f_bavail)
    /// from C + 64 KiB + C/1024 to that plus 64 KiB + C/256, whatever its size.
    #[tokio::test]
    async fn each_file_system_offers_its_capacity_within_the_documented_window() {
        if !loop_mounts("sizing").await {
            return;
        }
        let root = fresh_root("enforced-sizing");
        let p = enforcing(&root, "8Gi").await;
        for (name, size) in [("a", "1Mi"), ("b", "16Mi"), ("c", "300Mi"), ("d", "2Gi")] {
            p.create(&request(name, size, "n1")).await.unwrap();
            let path = p.publish(name, "n1", "c1").await.unwrap().path;
            let st = nix::sys::statvfs::statvfs(&path).unwrap();
            let offered = st.blocks_available() as u64 * st.fragment_size() as u64;
            let c = q(size).nanos() as u64 / 1_000_000_000;
            let low = c + 64 * 1024 + c / 1024;
            let high = low + 64 * 1024 + c / 256;
            assert!((low..=high).contains(&offered), "{size}: offers {offered}, not within {low}..={high}");
            p.unpublish(name, "n1", "c1").await.unwrap();
            p.delete(name).await.unwrap();
        }
        clean(&root).await;
    }

    #[tokio::test]
    async fn data_and_consumers_survive_a_reopen_and_a_reboot() {
        if !loop_mounts("reopen enforced").await {
            return;
        }
        let root = fresh_root("enforced-reopen");
        let p = enforcing(&root, "1Gi").await;
        p.create(&request("db", "8Mi", "n1")).await.unwrap();
        let path = p.publish("db", "n1", "db-0").await.unwrap().path;
        std::fs::write(path.join("counter"), "7").unwrap();
        drop(p);

        // Re-opened while mounted: the same file system, mounted once.
        let p = enforcing(&root, "1Gi").await;
        assert_eq!(mounts_under(&root).len(), 1, "mounted once: {:?}", mounts_under(&root));
        assert_eq!(std::fs::read_to_string(path.join("counter")).unwrap(), "7");
        drop(p);

        // After a reboot nothing is mounted: open mounts it again, data and consumers found.
        LocalVolumes::unmount_all(&root).await.unwrap();
        assert!(mounts_under(&root).is_empty());
        assert!(!path.join("counter").exists(), "unmounted, the data is in the image only");
        let p = enforcing(&root, "1Gi").await;
        assert_eq!(std::fs::read_to_string(path.join("counter")).unwrap(), "7");
        assert_eq!(p.available().await, q("1016Mi"));
        match p.delete("db").await {
            Err(VolumeError::InUse { consumers, .. }) => assert_eq!(consumers, ["db-0"]),
            other => panic!("the consumer must survive the restart: {other:?}"),
        }
        // Unmounted behind its back: publishing mounts it again rather than answer an empty directory.
        LocalVolumes::unmount_all(&root).await.unwrap();
        let again = p.publish("db", "n1", "db-0").await.unwrap().path;
        assert_eq!(std::fs::read_to_string(again.join("counter")).unwrap(), "7");
        clean(&root).await;
    }

    #[tokio::test]
    async fn delete_unmounts_leaves_no_loop_device_and_keeps_a_busy_volume() {
        if !loop_mounts("delete enforced").await {
            return;
        }
        let root = fresh_root("enforced-delete");
        let p = enforcing(&root, "1Gi").await;
        p.create(&request("v", "4Mi", "n1")).await.unwrap();
        let path = p.publish("v", "n1", "c1").await.unwrap().path;
        std::fs::write(path.join("file"), "x").unwrap();
        p.unpublish("v", "n1", "c1").await.unwrap();
        assert_eq!(loop_devices_under(&root).len(), 1, "one loop device: {:?}", loop_devices_under(&root));

        // Something still has a file open in it: the delete fails and the volume is kept.
        let busy = std::fs::File::open(path.join("file")).unwrap();
        let err = p.delete("v").await.unwrap_err();
        assert!(matches!(err, VolumeError::Backend { .. }), "{err}");
        assert!(err.to_string().contains("unmounting"), "{err}");
        assert_eq!(std::fs::read_to_string(path.join("file")).unwrap(), "x", "a busy volume keeps its data");
        assert_eq!(p.publish("v", "n1", "c2").await.unwrap().path, path);
        p.unpublish("v", "n1", "c2").await.unwrap();
        drop(busy);

        p.delete("v").await.unwrap();
        assert!(mounts_under(&root).is_empty(), "no mount left: {:?}", mounts_under(&root));
        assert_eq!(loop_devices_left(&root).await, Vec::<String>::new(), "no loop device left");
        assert!(!root.join("v").exists());
        assert_eq!(p.available().await, q("1Gi"));
        clean(&root).await;
    }

    #[tokio::test]
    async fn a_create_or_delete_cut_short_leaves_nothing_mounted_nor_looking_like_a_volume() {
        if !loop_mounts("crash enforced").await {
            return;
        }
        let root = fresh_root("enforced-crash");
        let p = enforcing(&root, "1Gi").await;
        for name in ["half", "gone"] {
            p.create(&request(name, "2Mi", "n1")).await.unwrap();
        }
        drop(p);
        // A create that crashed after mounting, before its record; a delete that crashed after
        // its rename (before the unmount that comes first would have allowed it).
        std::fs::remove_file(root.join("half").join("volume.json")).unwrap();
        std::fs::rename(root.join("gone"), root.join(".deleting-gone-0000000000000001")).unwrap();
        assert_eq!(mounts_under(&root).len(), 2);

        let p = enforcing(&root, "1Gi").await;
        assert!(mounts_under(&root).is_empty(), "the leftovers are unmounted: {:?}", mounts_under(&root));
        assert_eq!(loop_devices_left(&root).await, Vec::<String>::new(), "no loop device left");
        assert!(!root.join("half").exists() && !root.join(".deleting-gone-0000000000000001").exists());
        assert_eq!(p.available().await, q("1Gi"));
        assert!(matches!(p.publish("half", "n1", "c").await, Err(VolumeError::NotFound { .. })));
        clean(&root).await;
    }

    #[tokio::test]
    async fn required_fails_open_naming_what_does_not_work_and_auto_falls_back_to_accounting() {
        let root = fresh_root("enforced-missing");
        let err = LocalVolumes::builder(&root, "n1", q("1Gi"))
            .enforcement(Enforcement::Required)
            .mkfs_program("/nonexistent/mkfs.ext4")
            .open()
            .await
            .unwrap_err();
        let source = std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default();
        assert!(err.to_string().contains("size enforcement is required"), "{err}");
        assert!(source.contains("cannot run /nonexistent/mkfs.ext4"), "{source}");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "the probe leaves nothing behind");

        let auto = LocalVolumes::builder(&root, "n1", q("1Gi")).mkfs_program("/nonexistent/mkfs.ext4").open().await;
        let auto = auto.expect("auto opens without enforcement");
        assert!(!auto.capabilities().enforces_size);
        auto.create(&request("plain", "1Mi", "n1")).await.unwrap();
        assert!(!root.join("plain").join("image").exists(), "an accounted volume is a plain directory");

        let off = LocalVolumes::builder(&root, "n1", q("1Gi")).enforcement(Enforcement::Off).open().await.unwrap();
        assert!(!off.capabilities().enforces_size);
        // An enforcing provider over a volume made without enforcement does not claim to enforce.
        if loop_mounts("mixed roots").await {
            assert!(!enforcing(&root, "1Gi").await.capabilities().enforces_size, "a plain volume is not enforced");
        }
        assert_eq!("required".parse::<Enforcement>(), Ok(Enforcement::Required));
        assert_eq!("sometimes".parse::<Enforcement>().unwrap_err(), "must be auto, required or off (is \"sometimes\")");
        clean(&root).await;
    }
}
