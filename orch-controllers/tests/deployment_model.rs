//! Random sequences of template changes, scales, paused changes, bad rollouts (rolled back by
//! themselves) and rollbacks, on simulated nodes in virtual time. At every watch event of every
//! step, no more than `max(replicas before, after) + maxSurge` workloads exist and no fewer than
//! `min(replicas before, after) - maxUnavailable` are ready; after every step the deployment
//! converges to the last wanted template and replica count, and a rollback restores the exact
//! earlier template.

mod common;

use std::time::Duration;

use common::*;
use orch_controllers::deployment::{self, FAILED_ANNOTATION, history};
use orch_core::kinds::{Deployment, IntOrPercent, RollingUpdate, Workload, deployment_condition, find_condition};
use orch_core::{Api, ListParams, Object, ObjectMeta, testkit};
use proptest::prelude::*;

const SURGE: u32 = 2;
const UNAVAILABLE: u32 = 1;
const LIMIT: Duration = Duration::from_secs(4 * 3600);

#[derive(Debug, Clone)]
enum Op {
    /// A good template, version v (a version seen before brings its revision back).
    Change(u8),
    Scale(u32),
    /// Paused: change the template and scale; nothing rolls out until resumed.
    PausedChange(u8, u32),
    /// A template whose workloads crash: the deployment rolls itself back.
    Bad,
    /// Back to the previous revision.
    Rollback,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4).prop_map(Op::Change),
        2 => (1u32..7).prop_map(Op::Scale),
        1 => ((0u8..4), (1u32..7)).prop_map(|(v, n)| Op::PausedChange(v, n)),
        1 => Just(Op::Bad),
        2 => Just(Op::Rollback),
    ]
}

fn version(v: u8) -> Workload {
    service(&v.to_string())
}

async fn settle(plane: &Plane, watcher: &Watcher, replicas: u32) -> Object<Deployment> {
    let api = plane.deployments();
    let d = wait_complete(&api, "web", LIMIT).await;
    // The watcher has seen everything up to here.
    testkit::wait_until("the watcher caught up", LIMIT, async || {
        let s = watcher.seen.lock().unwrap().clone();
        (s.total == replicas as usize && s.ready == replicas as usize).then_some(())
    })
    .await;
    d
}

async fn run(backend: Backend, ops: Vec<Op>) {
    let plane = Plane::start(backend, "model", 3, deployment_controllers()).await;
    let api = plane.deployments();
    let mut spec = Deployment::new("web", 3, version(0));
    spec.strategy = orch_core::kinds::Strategy::RollingUpdate(RollingUpdate {
        max_surge: IntOrPercent::Count(SURGE),
        max_unavailable: IntOrPercent::Count(UNAVAILABLE),
    });
    spec.rollback.on_failure = true;
    spec.rollback.failure_threshold = 2;
    spec.min_ready_seconds = 2;
    api.create(&Object::new(ObjectMeta::named("web"), spec)).await.unwrap();
    let watcher = watch_workloads(plane.store.clone()).await;
    let mut replicas = 3;
    settle(&plane, &watcher, replicas).await;
    watcher.take();
    for (step, op) in ops.iter().enumerate() {
        let before = api.get("web").await.unwrap();
        let mut next_replicas = replicas;
        let expected = match op {
            Op::Change(v) => {
                api.retry_on_conflict("web", |d| {
                    d.spec.template.spec = version(*v);
                    Ok(())
                })
                .await
                .unwrap()
                .spec
                .template
            }
            Op::Scale(n) => {
                next_replicas = *n;
                api.retry_on_conflict("web", |d| {
                    d.spec.replicas = *n;
                    Ok(())
                })
                .await
                .unwrap()
                .spec
                .template
            }
            Op::PausedChange(v, n) => {
                next_replicas = *n;
                let revisions = history(plane.store.clone(), "default", "web").await.unwrap().len();
                let changed = api
                    .retry_on_conflict("web", |d| {
                        d.spec.paused = true;
                        d.spec.template.spec = version(*v);
                        d.spec.replicas = *n;
                        Ok(())
                    })
                    .await
                    .unwrap();
                testkit::wait_until("paused and scaled", LIMIT, async || {
                    let d = api.get("web").await.ok()?;
                    let p = find_condition(&d.status.conditions, deployment_condition::PROGRESSING)?;
                    (p.reason == "DeploymentPaused" && d.status.available_replicas == *n && d.status.replicas == *n)
                        .then_some(())
                })
                .await;
                assert_eq!(
                    history(plane.store.clone(), "default", "web").await.unwrap().len(),
                    revisions,
                    "step {step}: no revision while paused"
                );
                api.retry_on_conflict("web", |d| {
                    d.spec.paused = false;
                    Ok(())
                })
                .await
                .unwrap();
                changed.spec.template
            }
            Op::Bad => {
                api.retry_on_conflict("web", |d| {
                    d.spec.template.spec = sim(sim(version(9), "SIM_RUN", "1"), "SIM_EXIT_CODE", "1");
                    Ok(())
                })
                .await
                .unwrap();
                before.spec.template.clone()
            }
            Op::Rollback => {
                let h = history(plane.store.clone(), "default", "web").await.unwrap();
                let current = before.status.current_revision;
                let previous = h.iter().rev().find(|(n, _)| *n < current);
                match previous {
                    None => {
                        let e = deployment::rollback(plane.store.clone(), "default", "web", None).await.unwrap_err();
                        assert!(e.is_invalid(), "{e}");
                        before.spec.template.clone()
                    }
                    Some((_, rs)) => {
                        let back = deployment::rollback(plane.store.clone(), "default", "web", None).await.unwrap();
                        let mut t = rs.spec.template.clone();
                        t.metadata.labels.remove(orch_core::kinds::TEMPLATE_HASH_LABEL);
                        assert_eq!(back.spec.template, t, "step {step}: the exact earlier template");
                        if rs.metadata.annotations.contains_key(FAILED_ANNOTATION) {
                            // It fails again, and the deployment comes back by itself.
                            before.spec.template.clone()
                        } else {
                            t
                        }
                    }
                }
            }
        };
        let d = settle(&plane, &watcher, next_replicas).await;
        assert_eq!(d.spec.template, expected, "step {step} ({op:?}): converged to the wanted template");
        assert_eq!(d.spec.replicas, next_replicas);
        let workloads: Api<Workload> = plane.workloads();
        let list = workloads.list(&ListParams::default()).await.unwrap().items;
        assert_eq!(list.len(), next_replicas as usize, "step {step} ({op:?})");
        let hash = expected.hash();
        assert!(
            list.iter().all(|w| w.metadata.labels.get(orch_core::kinds::TEMPLATE_HASH_LABEL) == Some(&hash)),
            "step {step} ({op:?}): every workload runs the wanted template"
        );
        let seen = watcher.take();
        let (lo, hi) = (replicas.min(next_replicas), replicas.max(next_replicas));
        assert!(seen.max_total <= (hi + SURGE) as usize, "step {step} ({op:?}): surge broken: {seen:?}, {lo}..{hi}");
        assert!(
            seen.min_ready >= lo.saturating_sub(UNAVAILABLE) as usize,
            "step {step} ({op:?}): unavailability broken: {seen:?}, {lo}..{hi}"
        );
        replicas = next_replicas;
    }
}

fn check(backend: Backend, cases: u32) {
    let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(ops in proptest::collection::vec(op(), 3..7))| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(run(backend, ops));
    });
}

#[test]
fn random_operations_keep_the_bounds_and_converge_on_the_memory_store() {
    check(Backend::Memory, 32);
}

#[test]
fn random_operations_keep_the_bounds_and_converge_on_the_embedded_store() {
    check(Backend::Embedded, 8);
}
