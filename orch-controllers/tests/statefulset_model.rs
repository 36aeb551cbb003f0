//! Random sequences of scales and readiness changes on an `OrderedReady` stateful set, in
//! virtual time, with the readiness written by the test. A watcher of every workload checks, at
//! the store revision each replica is created at, that every replica below it exists and is ready
//! (the ordered start); after the sequence, the set converges to its replicas, `0..n`, all ready.
//!
//! The test only ever makes replicas ready (never unready, never deletes one itself), so a replica
//! the controller saw ready stays ready: a creation after a lower replica lost its readiness can
//! only be the controller's fault.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use orch_controllers::StatefulSetController;
use orch_controllers::statefulset::ordinal_of;
use orch_core::kinds::{Condition, ConditionStatus, Phase, StatefulSet, Workload, set_condition};
use orch_core::{Api, Event, ListParams, Manager, Object, ObjectMeta, Timestamp, TokioClock, testkit};
use proptest::prelude::*;

const LIMIT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
enum Op {
    /// Set the replicas.
    Scale(u32),
    /// Make the n-th (modulo) replica that is not ready yet ready.
    Ready(usize),
    /// Let virtual time pass.
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u32..6).prop_map(Op::Scale),
        4 => (0usize..6).prop_map(Op::Ready),
        1 => (1u64..20).prop_map(Op::Wait),
    ]
}

fn is_ready(w: &Object<Workload>) -> bool {
    w.status.phase == Phase::Running
        && orch_core::kinds::find_condition(&w.status.conditions, "Ready")
            .is_some_and(|c| c.status == ConditionStatus::True)
}

async fn make_ready(api: &Api<Workload>, name: &str) {
    loop {
        let Ok(w) = api.get(name).await else { return };
        let mut status = w.status.clone();
        status.phase = Phase::Running;
        set_condition(&mut status.conditions, Condition::new("Ready", ConditionStatus::True, "Test"), Timestamp(1));
        match api.write_status(&w.metadata, &status).await {
            Ok(_) => return,
            Err(e) if e.is_conflict() => continue,
            Err(e) if e.is_not_found() => return,
            Err(e) => panic!("{e}"),
        }
    }
}

async fn not_ready(api: &Api<Workload>) -> Vec<String> {
    let mut names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|w| !is_ready(w) && !w.metadata.is_being_deleted())
        .map(|w| w.metadata.name)
        .collect();
    names.sort();
    names
}

async fn run(ops: Vec<Op>) {
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
    let store = common::store(common::Backend::Memory, "sts-model", clock.clone());
    let mut manager = Manager::new(store.clone()).with_clock(clock);
    manager.add(StatefulSetController::builder());
    let running = tokio::spawn(manager.run(std::future::pending()));
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    let sets: Api<StatefulSet> = Api::namespaced(store.clone(), "default");

    // The watcher: the state of every replica (ready or not) at each revision, and every
    // creation that came before a lower replica was ready.
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let created: Arc<Mutex<usize>> = Arc::default();
    let listed = workloads.list(&ListParams::default()).await.unwrap();
    let mut stream = workloads.watch(&ListParams::default(), Some(listed.revision + 1)).await.unwrap();
    let (seen, count) = (violations.clone(), created.clone());
    let watcher = tokio::spawn(async move {
        let mut state: BTreeMap<u32, bool> = BTreeMap::new();
        while let Some(Ok(e)) = stream.next().await {
            match e {
                Event::Added(w) => {
                    let i = ordinal_of("db", &w.metadata.name).expect("a replica name");
                    let below: Vec<(u32, bool)> =
                        (0..i).map(|j| (j, state.get(&j).copied().unwrap_or(false))).collect();
                    if below.iter().any(|(_, ready)| !ready) {
                        seen.lock().unwrap().push(format!("db-{i} created while replicas below were {below:?}"));
                    }
                    *count.lock().unwrap() += 1;
                    state.insert(i, is_ready(&w));
                }
                Event::Modified(w) => {
                    let i = ordinal_of("db", &w.metadata.name).expect("a replica name");
                    state.insert(i, is_ready(&w) && !w.metadata.is_being_deleted());
                }
                Event::Deleted(w) => {
                    state.remove(&ordinal_of("db", &w.metadata.name).expect("a replica name"));
                }
                Event::Progress(_) => {}
            }
        }
    });

    let mut spec = StatefulSet::new("db", 2, Workload::command("main", &["/bin/db"]));
    spec.replicas = 2;
    sets.create(&Object::new(ObjectMeta::named("db"), spec)).await.unwrap();
    let mut replicas = 2;
    for op in &ops {
        match op {
            Op::Scale(n) => {
                replicas = *n;
                sets.retry_on_conflict("db", |s| {
                    s.spec.replicas = *n;
                    Ok(())
                })
                .await
                .unwrap();
            }
            Op::Ready(k) => {
                let waiting = not_ready(&workloads).await;
                if !waiting.is_empty() {
                    make_ready(&workloads, &waiting[k % waiting.len()]).await;
                }
            }
            Op::Wait(s) => tokio::time::sleep(Duration::from_secs(*s)).await,
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Converges: everything made ready, the set ends with exactly 0..replicas, all ready.
    let want: Vec<String> = (0..replicas).map(|i| format!("db-{i}")).collect();
    testkit::wait_until(&format!("replicas {want:?} ready"), LIMIT, async || {
        for name in not_ready(&workloads).await {
            make_ready(&workloads, &name).await;
        }
        let list = workloads.list(&ListParams::default()).await.ok()?.items;
        let mut names: Vec<String> = list.iter().map(|w| w.metadata.name.clone()).collect();
        names.sort_by_key(|n| ordinal_of("db", n));
        (names == want && list.iter().all(is_ready)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.abort();
    watcher.abort();
    let violations = violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "ordered start broken after {ops:?}: {violations:?}");
    assert!(*created.lock().unwrap() >= replicas as usize, "the watcher saw the creations");
}

#[test]
fn ordered_ready_never_creates_a_replica_before_the_ones_below_are_ready() {
    let config = ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(ops in proptest::collection::vec(op(), 3..12))| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(run(ops));
    });
}
