//! The deployment and replica set controllers on simulated nodes in virtual time, on the memory
//! and embedded stores: rolling updates within their bounds, recreate, proportional scaling,
//! pause, rollback by hand and by itself, history, restart.

mod common;

use std::time::Duration;

use common::*;
use orch_controllers::deployment::{self, history};
use orch_core::kinds::{
    Deployment, Event, IntOrPercent, ReplicaSet, RollingUpdate, Strategy, deployment_condition, find_condition,
};
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
        let mut spec = web(10, 2, 1);
        spec.min_ready_seconds = 3;
        let created = api.create(&Object::new(ObjectMeta::named("web"), spec)).await.unwrap();
        let original = created.spec.template.clone();
        let v1 = wait_complete(&api, "web", LIMIT).await;
        assert_eq!(v1.status.current_revision, 1);
        assert_eq!(hashes(&plane.workloads()).await.len(), 1);

        let watcher = watch_workloads(plane.store.clone()).await;
        // The new version takes 5 s to start; each counts as available 3 s after it is ready.
        api.retry_on_conflict("web", |d| {
            d.spec.template.spec = sim(service("2"), "SIM_START_DELAY", "5");
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

async fn set(api: &Api<Deployment>, f: impl Fn(&mut Deployment)) {
    api.retry_on_conflict("web", |d| {
        f(&mut d.spec);
        Ok(())
    })
    .await
    .unwrap();
}

async fn revisions(plane: &Plane) -> Vec<u64> {
    history(plane.store.clone(), "default", "web").await.unwrap().iter().map(|(n, _)| *n).collect()
}

async fn event_reasons(plane: &Plane) -> Vec<(String, String)> {
    let events: Api<Event> = Api::namespaced(plane.store.clone(), "default");
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| (e.spec.reason, e.spec.message))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn recreate_stops_every_old_workload_before_starting_new_ones() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "recreate", 3, deployment_controllers()).await;
        let api = plane.deployments();
        let mut d = web(6, 1, 1);
        d.strategy = Strategy::Recreate;
        api.create(&Object::new(ObjectMeta::named("web"), d)).await.unwrap();
        wait_complete(&api, "web", LIMIT).await;
        let watcher = watch_workloads(plane.store.clone()).await;
        set(&api, |d| d.template.spec = service("2")).await;
        let v2 = wait_complete(&api, "web", LIMIT).await;
        let seen = watcher.seen.lock().unwrap().clone();
        assert!(seen.events >= 12, "{seen:?}");
        assert_eq!(seen.overlaps, 0, "old and new workloads existed at once: {seen:?} ({backend:?})");
        assert_eq!(hashes(&plane.workloads()).await.get(&v2.spec.template.hash()), Some(&6));
    }
}

#[tokio::test(start_paused = true)]
async fn a_scale_during_a_rollout_is_spread_over_the_revisions() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "proportional", 4, deployment_controllers()).await;
        let api = plane.deployments();
        api.create(&Object::new(ObjectMeta::named("web"), web(10, 3, 0))).await.unwrap();
        wait_complete(&api, "web", LIMIT).await;
        // The new version never becomes ready: the rollout stops after the surge.
        set(&api, |d| d.template.spec = sim(service("2"), "SIM_START_DELAY", "100000")).await;
        let sets: Api<ReplicaSet> = Api::namespaced(plane.store.clone(), "default");
        orch_core::testkit::wait_until("the surge", LIMIT, async || {
            let h = history(plane.store.clone(), "default", "web").await.unwrap();
            (h.len() == 2 && h[1].1.spec.replicas == 3).then_some(())
        })
        .await;
        set(&api, |d| d.replicas = 20).await;
        let split = orch_core::testkit::wait_until("the scale spread", LIMIT, async || {
            let h = history(plane.store.clone(), "default", "web").await.unwrap();
            let specs: Vec<u32> = h.iter().map(|(_, rs)| rs.spec.replicas).collect();
            (specs.iter().sum::<u32>() == 23).then_some(specs)
        })
        .await;
        // 10 old + 3 new scaled to 20 + 3 surge: 23 in proportion 10:3 (the remainder to the new).
        assert_eq!(split, vec![17, 6], "({backend:?})");
        let list = sets.list(&ListParams::default()).await.unwrap();
        assert!(
            list.items
                .iter()
                .all(|rs| rs.metadata.annotations.get("orch.dev/desired-replicas").map(String::as_str) == Some("20"))
        );
        // A good template again: the rollout completes at the new size.
        set(&api, |d| d.template.spec = service("3")).await;
        let done = wait_complete(&api, "web", LIMIT).await;
        assert_eq!(done.status.replicas, 20);
    }
}

#[tokio::test(start_paused = true)]
async fn a_paused_deployment_scales_but_does_not_roll_out() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "paused", 3, deployment_controllers()).await;
        let api = plane.deployments();
        api.create(&Object::new(ObjectMeta::named("web"), web(4, 1, 1))).await.unwrap();
        let v1 = wait_complete(&api, "web", LIMIT).await;
        set(&api, |d| {
            d.paused = true;
            d.template.spec = service("2");
            d.replicas = 6;
        })
        .await;
        let paused = orch_core::testkit::wait_until("paused and scaled", LIMIT, async || {
            let d = api.get("web").await.ok()?;
            let p = find_condition(&d.status.conditions, deployment_condition::PROGRESSING)?;
            (p.reason == "DeploymentPaused" && d.status.available_replicas == 6).then_some(d)
        })
        .await;
        assert_eq!(paused.status.observed_generation, paused.metadata.generation);
        assert_eq!(revisions(&plane).await, vec![1], "no new revision while paused ({backend:?})");
        assert_eq!(hashes(&plane.workloads()).await.get(&v1.spec.template.hash()), Some(&6));
        set(&api, |d| d.paused = false).await;
        let v2 = wait_complete(&api, "web", LIMIT).await;
        assert_eq!(v2.status.current_revision, 2);
        assert_eq!(hashes(&plane.workloads()).await.get(&v2.spec.template.hash()), Some(&6));
    }
}

#[tokio::test(start_paused = true)]
async fn failing_workloads_roll_the_deployment_back_by_itself() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "auto-rollback", 3, deployment_controllers()).await;
        let api = plane.deployments();
        let mut d = web(4, 1, 1);
        d.rollback.on_failure = true;
        d.rollback.failure_threshold = 3;
        // A workload that crashes after a second never counts as available.
        d.min_ready_seconds = 5;
        let original = api.create(&Object::new(ObjectMeta::named("web"), d)).await.unwrap().spec.template;
        wait_complete(&api, "web", LIMIT).await;
        let watcher = watch_workloads(plane.store.clone()).await;
        // Version 2 crashes a second after it starts, every time.
        set(&api, |d| d.template.spec = sim(sim(service("2"), "SIM_RUN", "1"), "SIM_EXIT_CODE", "1")).await;
        let back = orch_core::testkit::wait_until("rolled back", LIMIT, async || {
            let d = api.get("web").await.ok()?;
            find_condition(&d.status.conditions, deployment_condition::ROLLED_BACK).is_some().then_some(d)
        })
        .await;
        assert_eq!(back.spec.template, original, "the exact earlier template ({backend:?})");
        let c = find_condition(&back.status.conditions, deployment_condition::ROLLED_BACK).unwrap();
        assert_eq!(c.reason, "WorkloadsFailing");
        assert!(c.message.contains("rolled back to revision 1"), "{}", c.message);
        let done = wait_complete(&api, "web", LIMIT).await;
        assert_eq!(done.status.current_revision, 3);
        assert_eq!(hashes(&plane.workloads()).await.get(&original.hash()), Some(&4));
        let seen = watcher.seen.lock().unwrap().clone();
        assert!(seen.min_ready >= 3, "max unavailable held through the failure: {seen:?}");
        let events = event_reasons(&plane).await;
        assert!(events.iter().any(|(r, m)| r == "RolledBack" && m.contains("failed or restarted")), "{events:?}");
        let h = history(plane.store.clone(), "default", "web").await.unwrap();
        let bad = h.iter().find(|(n, _)| *n == 2).expect("the failed revision is kept");
        assert_eq!(
            bad.1.metadata.annotations.get("orch.dev/rollout-failed").map(String::as_str),
            Some("WorkloadsFailing")
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_missed_progress_deadline_is_reported_and_rolled_back_when_asked() {
    for backend in BACKENDS {
        for auto in [false, true] {
            let plane = Plane::start(backend, &format!("deadline-{auto}"), 3, deployment_controllers()).await;
            let api = plane.deployments();
            let mut d = web(3, 1, 0);
            d.progress_deadline_seconds = 60;
            d.rollback.on_failure = auto;
            let original = api.create(&Object::new(ObjectMeta::named("web"), d)).await.unwrap().spec.template;
            wait_complete(&api, "web", LIMIT).await;
            // Version 2 never gets ready.
            set(&api, |d| d.template.spec = sim(service("2"), "SIM_START_DELAY", "100000")).await;
            let stalled = orch_core::testkit::wait_until("deadline", LIMIT, async || {
                let d = api.get("web").await.ok()?;
                let p = find_condition(&d.status.conditions, deployment_condition::PROGRESSING)?;
                let rb = find_condition(&d.status.conditions, deployment_condition::ROLLED_BACK);
                (p.reason == "ProgressDeadlineExceeded" || rb.is_some()).then_some(d)
            })
            .await;
            if auto {
                let rb = find_condition(&stalled.status.conditions, deployment_condition::ROLLED_BACK).unwrap();
                assert_eq!(rb.reason, "ProgressDeadlineExceeded");
                assert_eq!(stalled.spec.template, original);
                let done = wait_complete(&api, "web", LIMIT).await;
                assert_eq!(done.status.current_revision, 3);
            } else {
                let p = find_condition(&stalled.status.conditions, deployment_condition::PROGRESSING).unwrap();
                assert_eq!(p.status, orch_core::kinds::ConditionStatus::False);
                assert!(p.message.contains("made no progress for 60s"), "{}", p.message);
                assert_ne!(stalled.spec.template, original, "no rollback unless asked");
                assert_eq!(stalled.status.available_replicas, 3, "the old revision keeps serving");
                let events = event_reasons(&plane).await;
                assert!(events.iter().any(|(r, _)| r == "ProgressDeadlineExceeded"), "{events:?}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn restarts_make_revisions_and_the_history_is_bounded() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "restart", 2, deployment_controllers()).await;
        let api = plane.deployments();
        let mut d = web(2, 1, 0);
        d.revision_history_limit = 1;
        api.create(&Object::new(ObjectMeta::named("web"), d)).await.unwrap();
        let mut names = std::collections::HashSet::new();
        for i in 0..3 {
            let before = wait_complete(&api, "web", LIMIT).await;
            names.extend(
                plane
                    .workloads()
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .map(|w| w.metadata.name),
            );
            let now = orch_core::Timestamp(1_900_000_000_000 + i);
            let after = deployment::restart(plane.store.clone(), "default", "web", now).await.unwrap();
            assert_eq!(after.spec.template.spec, before.spec.template.spec, "same spec");
            assert_ne!(after.spec.template.hash(), before.spec.template.hash(), "a new revision");
        }
        let done = wait_complete(&api, "web", LIMIT).await;
        assert_eq!(done.status.current_revision, 4);
        let fresh = plane.workloads().list(&ListParams::default()).await.unwrap().items;
        assert!(fresh.iter().all(|w| !names.contains(&w.metadata.name)), "every workload was replaced");
        assert_eq!(revisions(&plane).await, vec![3, 4], "one old revision kept ({backend:?})");
    }
}

#[tokio::test]
async fn a_bad_deployment_is_refused_naming_the_field() {
    let store: std::sync::Arc<dyn orch_core::Store> = std::sync::Arc::new(orch_store::MemoryStore::new());
    let api: Api<Deployment> = Api::namespaced(store, "default");
    let mut d = web(3, 0, 0);
    d.template.metadata.labels.insert("app", "other");
    let e = api.create(&Object::new(ObjectMeta::named("web"), d)).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("spec.strategy.maxUnavailable: must not be 0 when maxSurge is 0"), "{text}");
    assert!(text.contains("spec.template.metadata.labels: must match spec.selector"), "{text}");
}
