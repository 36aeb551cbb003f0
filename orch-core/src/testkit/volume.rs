//! The conformance suite of [`VolumeProvider`]s: the promises of its "To ensure correctness"
//! sections, checked on a fresh provider per case.
//!
//! ```no_run
//! use std::sync::Arc;
//! use orch_core::VolumeProvider;
//!
//! // A provider's test: each case gets a fresh provider serving node `n1`, made by `fresh`.
//! async fn conformance(fresh: impl Fn() -> Arc<dyn VolumeProvider>) {
//!     orch_core::testkit::volume::suite(|| std::future::ready(fresh()), "n1").await;
//! }
//! ```
//!
//! The suite writes and reads files in published paths, so it runs where the provider publishes
//! (on the node itself).

use std::future::Future;
use std::sync::Arc;

use crate::kinds::AccessMode;
use crate::storage::{CreateVolume, VolumeError, VolumeProvider};

/// A request for a `ReadWriteOnce` volume of `capacity` on `node`.
pub fn request(name: &str, capacity: &str, node: &str) -> CreateVolume {
    CreateVolume {
        name: name.into(),
        capacity: capacity.parse().expect("a quantity"),
        access_mode: AccessMode::ReadWriteOnce,
        node: Some(node.into()),
    }
}

/// Runs every case, each on a fresh provider from `make`, serving node `node`; panics naming the
/// case and the broken promise.
pub async fn suite<F, Fut>(make: F, node: &str)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn VolumeProvider>>,
{
    create_is_idempotent_and_refuses_other_parameters(make().await, node).await;
    malformed_requests_are_invalid_naming_the_field(make().await, node).await;
    unsupported_access_modes_are_refused(make().await, node).await;
    publish_of_an_unknown_volume_is_not_found(make().await, node).await;
    data_survives_unpublish_and_publish(make().await, node).await;
    delete_waits_for_the_last_consumer_and_removes_the_data(make().await, node).await;
    unpublish_and_delete_are_idempotent(make().await, node).await;
}

async fn create_is_idempotent_and_refuses_other_parameters(p: Arc<dyn VolumeProvider>, node: &str) {
    let req = request("vol-a", "1Mi", node);
    let first = p.create(&req).await.expect("create_is_idempotent: first create");
    let again = p.create(&req).await.expect("create_is_idempotent: second create of the same volume");
    assert_eq!(first, again, "create_is_idempotent: a repeated create answers the same volume");
    assert_eq!(first.capacity, req.capacity, "create_is_idempotent: the volume has the size asked for");
    let bigger = CreateVolume { capacity: "2Mi".parse().expect("a quantity"), ..req };
    let err = p.create(&bigger).await.expect_err("create_is_idempotent: other parameters must be refused");
    assert!(matches!(err, VolumeError::Refused { .. }), "create_is_idempotent: expected Refused, got {err}");
}

async fn malformed_requests_are_invalid_naming_the_field(p: Arc<dyn VolumeProvider>, node: &str) {
    for (req, field) in [
        (request("Not/A/Name", "1Mi", node), "name"),
        (request("vol-zero", "0", node), "capacity"),
        (request("vol-negative", "-1Mi", node), "capacity"),
        (request("vol-fraction", "0.5", node), "capacity"),
    ] {
        match p.create(&req).await {
            Err(VolumeError::Invalid { field: f, .. }) if f == field => {}
            other => panic!("malformed_requests_are_invalid: {req:?} must be Invalid on {field}, got {other:?}"),
        }
    }
}

async fn unsupported_access_modes_are_refused(p: Arc<dyn VolumeProvider>, node: &str) {
    let supported = p.capabilities().access_modes;
    for mode in [AccessMode::ReadWriteOnce, AccessMode::ReadOnlyMany, AccessMode::ReadWriteMany] {
        let req = CreateVolume { access_mode: mode, ..request(&format!("vol-{}", mode as u8), "1Mi", node) };
        let got = p.create(&req).await;
        if supported.contains(&mode) {
            got.unwrap_or_else(|e| panic!("unsupported_access_modes: {mode} is declared supported: {e}"));
        } else {
            let err = got.expect_err("unsupported_access_modes: an undeclared mode must be refused");
            assert!(matches!(err, VolumeError::Refused { .. }), "unsupported_access_modes: {mode}: got {err}");
        }
    }
}

async fn publish_of_an_unknown_volume_is_not_found(p: Arc<dyn VolumeProvider>, node: &str) {
    match p.publish("vol-missing", node, "c1").await {
        Err(VolumeError::NotFound { volume }) => assert_eq!(volume, "vol-missing"),
        other => panic!("publish_of_an_unknown_volume: expected NotFound, got {other:?}"),
    }
}

async fn data_survives_unpublish_and_publish(p: Arc<dyn VolumeProvider>, node: &str) {
    p.create(&request("vol-data", "1Mi", node)).await.expect("data_survives: create");
    let first = p.publish("vol-data", node, "c1").await.expect("data_survives: publish");
    let again = p.publish("vol-data", node, "c1").await.expect("data_survives: publish again");
    assert_eq!(first, again, "data_survives: a repeated publish answers the same path");
    std::fs::write(first.path.join("counter"), "41").expect("data_survives: write into the published path");
    p.unpublish("vol-data", node, "c1").await.expect("data_survives: unpublish");
    let second = p.publish("vol-data", node, "c2").await.expect("data_survives: publish for another consumer");
    let read = std::fs::read_to_string(second.path.join("counter")).expect("data_survives: the file is still there");
    assert_eq!(read, "41", "data_survives: the data is the volume's");
}

async fn delete_waits_for_the_last_consumer_and_removes_the_data(p: Arc<dyn VolumeProvider>, node: &str) {
    let req = request("vol-del", "1Mi", node);
    p.create(&req).await.expect("delete: create");
    let path = p.publish("vol-del", node, "c1").await.expect("delete: publish c1").path;
    p.publish("vol-del", node, "c2").await.expect("delete: publish c2");
    std::fs::write(path.join("file"), "x").expect("delete: write");
    p.unpublish("vol-del", node, "c1").await.expect("delete: unpublish c1");
    match p.delete("vol-del").await {
        Err(VolumeError::InUse { consumers, .. }) => assert_eq!(consumers, ["c2"], "delete: the remaining consumer"),
        other => panic!("delete: a published volume must be InUse, got {other:?}"),
    }
    assert!(path.join("file").exists(), "delete: a volume in use keeps its data");
    p.unpublish("vol-del", node, "c2").await.expect("delete: unpublish c2");
    p.delete("vol-del").await.expect("delete: once unpublished");
    assert!(
        matches!(p.publish("vol-del", node, "c1").await, Err(VolumeError::NotFound { .. })),
        "delete: a deleted volume is NotFound"
    );
    p.create(&req).await.expect("delete: create again under the same name");
    let path = p.publish("vol-del", node, "c1").await.expect("delete: publish the new volume").path;
    assert!(!path.join("file").exists(), "delete: a volume created again is empty");
}

async fn unpublish_and_delete_are_idempotent(p: Arc<dyn VolumeProvider>, node: &str) {
    p.delete("vol-never").await.expect("idempotent: deleting an unknown volume succeeds");
    p.unpublish("vol-never", node, "c1").await.expect("idempotent: unpublishing an unknown volume succeeds");
    p.create(&request("vol-idem", "1Mi", node)).await.expect("idempotent: create");
    p.unpublish("vol-idem", node, "c9").await.expect("idempotent: unpublishing a consumer never published");
    p.delete("vol-idem").await.expect("idempotent: delete");
    p.delete("vol-idem").await.expect("idempotent: delete again");
}
