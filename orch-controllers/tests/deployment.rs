//! The deployment and replica set controllers on simulated nodes in virtual time, on the memory
//! and embedded stores: rolling updates within their bounds, recreate, proportional scaling,
//! pause, rollback by hand and by itself, history, restart.

mod common;

use std::time::Duration;

use common::*;
use orch_controllers::deployment::{self, history};
use orch_core::kinds::{Deployment, Event, IntOrPercent, RollingUpdate, Strategy};
use orch_core::{Api, ListParams, Object, ObjectMeta};

const LIMIT: Duration = Duration::from_secs(3600);

fn web(replicas: u32, surge: u32, unavailable: u32) -> Deployment {
    let mut d = Deployment::new("web", replicas, service("1"));
    d.strategy = Strategy::RollingUpdate(RollingUpdate {
        max_surge: IntOrPercent::Count(surge),
        max_unavailable: IntOrPercent::Count(unavailable),
    });
    d
}

#[tokio::test(start_paused = true)]
async fn a_rolling_update_stays_within_its_bounds_and_rolls_back_exactly() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "rolling", 4, deployment_controllers()).await;
        let api = plane.deployments();
        let created = api.create(&Object::new(ObjectMeta::named("web"), web(10, 2, 1))).await.unwrap();
        let original = created.spec.template.clone();
        let v1 = wait_complete(&api, "web", LIMIT).await;
        assert_eq!(v1.status.current_revision, 1);
        assert_eq!(hashes(&plane.workloads()).await.len(), 1);

        let watcher = watch_workloads(plane.store.clone()).await;
        api.retry_on_conflict("web", |d| {
            d.spec.template.spec = service("2");
            Ok(())
        })
        .await
        .unwrap();
        let v2 = wait_complete(&api, "web", LIMIT).await;
        assert_eq!(v2.status.current_revision, 2);
        let seen = watcher.seen.lock().unwrap().clone();
        assert!(seen.events > 20, "the watcher saw the rollout: {seen:?}");
        assert!(seen.max_total <= 12, "max surge 2 over 10 replicas broken: {seen:?} ({backend:?})");
        assert!(seen.min_ready >= 9, "max unavailable 1 broken: {seen:?} ({backend:?})");
        let now = hashes(&plane.workloads()).await;
        assert_eq!(now.len(), 1);
        assert_eq!(now.get(&v2.spec.template.hash()), Some(&10));

        // Back to the previous revision: the exact earlier template, as revision 3.
        let back = deployment::rollback(plane.store.clone(), "default", "web", None).await.unwrap();
        assert_eq!(back.spec.template, original);
        let v3 = wait_complete(&api, "web", LIMIT).await;
        assert_eq!(v3.spec.template, original);
        assert_eq!(v3.status.current_revision, 3);
        assert_eq!(hashes(&plane.workloads()).await.get(&original.hash()), Some(&10));
        let revisions: Vec<u64> =
            history(plane.store.clone(), "default", "web").await.unwrap().iter().map(|(n, _)| *n).collect();
        assert_eq!(revisions, vec![2, 3], "revision 1 came back as 3 ({backend:?})");

        // A revision that is not in the history is refused, naming the field and what is kept.
        let e = deployment::rollback(plane.store.clone(), "default", "web", Some(7)).await.unwrap_err();
        assert!(
            e.to_string().contains("rollback.revision: revision 7 is not in the history of web (kept: 2, 3)"),
            "{e}"
        );
        // Rolling back to a revision by number.
        deployment::rollback(plane.store.clone(), "default", "web", Some(2)).await.unwrap();
        let v4 = wait_complete(&api, "web", LIMIT).await;
        assert_eq!(v4.spec.template, v2.spec.template);
        assert_eq!(v4.status.current_revision, 4);
        let events: Api<Event> = Api::namespaced(plane.store.clone(), "default");
        let reasons: Vec<String> =
            events.list(&ListParams::default()).await.unwrap().items.into_iter().map(|e| e.spec.reason).collect();
        for r in ["NewRevision", "ScalingRevision", "RevisionRestored", "RolloutComplete"] {
            assert!(reasons.iter().any(|x| x == r), "no {r} event in {reasons:?}");
        }
    }
}
