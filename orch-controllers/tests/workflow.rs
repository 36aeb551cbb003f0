//! The workflow controller: a DAG on simulated nodes (order, per-step status, retries,
//! fail-fast and continue-on-failure) on the memory and embedded stores, and a random DAG of
//! 10,000 steps run by a stand-in agent: each step once, after all its dependencies, never more
//! than the parallelism at a time.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use orch_controllers::{GarbageCollector, WorkflowController};
use orch_core::kinds::{
    EnvVar, FailurePolicy, Phase, RestartPolicy, STEP_ANNOTATION, StepPhase, Workflow, WorkflowStep, Workload,
    WorkloadStatus, WorkloadTemplate,
};
use orch_core::{Api, Event, ListParams, Object, ObjectMeta, Store, testkit};

const LIMIT: Duration = Duration::from_secs(4 * 3600);

fn controllers() -> Vec<Component> {
    vec![with(WorkflowController::builder), with(GarbageCollector::builtin)]
}

fn step(name: &str, deps: &[&str], run: &str, exit: &str) -> WorkflowStep {
    let mut w = Workload::command("main", &["work"]);
    w.restart_policy = RestartPolicy::Never;
    w.containers[0].env = vec![
        EnvVar { name: "SIM_RUN".into(), value: run.into() },
        EnvVar { name: "SIM_EXIT_CODE".into(), value: exit.into() },
    ];
    WorkflowStep {
        name: name.into(),
        template: WorkloadTemplate::new(Default::default(), w),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        retries: 0,
    }
}

async fn finished(api: &Api<Workflow>, name: &str) -> Object<Workflow> {
    testkit::wait_until("the workflow finished", LIMIT, async || {
        let wf = api.get(name).await.ok()?;
        matches!(wf.status.phase, StepPhase::Succeeded | StepPhase::Failed).then_some(wf)
    })
    .await
}

fn phases(wf: &Object<Workflow>) -> HashMap<String, StepPhase> {
    wf.status.steps.iter().map(|(n, s)| (n.clone(), s.phase)).collect()
}

#[tokio::test(start_paused = true)]
async fn a_diamond_runs_in_dependency_order_and_reports_each_step() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "wf-diamond", 2, controllers()).await;
        let api: Api<Workflow> = Api::namespaced(plane.store.clone(), "default");
        let wf = Workflow {
            steps: vec![
                step("fetch", &[], "5", "0"),
                step("left", &["fetch"], "5", "0"),
                step("right", &["fetch"], "7", "0"),
                step("join", &["left", "right"], "5", "0"),
            ],
            parallelism: Some(2),
            ..Default::default()
        };
        api.create(&Object::new(ObjectMeta::named("diamond"), wf)).await.unwrap();
        let done = finished(&api, "diamond").await;
        assert_eq!(done.status.phase, StepPhase::Succeeded, "{:?}", done.status);
        assert!(phases(&done).values().all(|p| *p == StepPhase::Succeeded));
        // fetch (5 s), then left and right side by side (7 s), then join (5 s): 17 s in all.
        let took = done.status.completion_time.unwrap().since(done.status.start_time.unwrap());
        assert!(took >= Duration::from_secs(17) && took < Duration::from_secs(21), "{took:?} ({backend:?})");
        let workloads = plane.workloads().list(&ListParams::default()).await.unwrap().items;
        let start = |s: &str| {
            workloads
                .iter()
                .find(|w| w.metadata.annotations.get(STEP_ANNOTATION).map(String::as_str) == Some(s))
                .unwrap()
                .metadata
                .create_revision
        };
        assert!(start("fetch") < start("left") && start("left").max(start("right")) < start("join"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_step_is_retried_then_fails_fast_or_lets_the_rest_continue() {
    for backend in BACKENDS {
        for policy in [FailurePolicy::FailFast, FailurePolicy::Continue] {
            let plane = Plane::start(backend, &format!("wf-fail-{policy:?}"), 2, controllers()).await;
            let api: Api<Workflow> = Api::namespaced(plane.store.clone(), "default");
            let mut flaky = step("flaky", &[], "2", "1");
            flaky.retries = 1;
            let wf = Workflow {
                steps: vec![
                    flaky,
                    step("after", &["flaky"], "1", "0"),
                    step("slow", &[], "10", "0"),
                    step("later", &["slow"], "1", "0"),
                ],
                failure_policy: policy,
                ..Default::default()
            };
            api.create(&Object::new(ObjectMeta::named("wf"), wf)).await.unwrap();
            let done = finished(&api, "wf").await;
            assert_eq!(done.status.phase, StepPhase::Failed);
            assert_eq!(done.status.message, "steps failed: flaky");
            let flaky = &done.status.steps["flaky"];
            assert_eq!((flaky.phase, flaky.attempts), (StepPhase::Failed, 2), "one try and one retry");
            assert!(flaky.message.contains("failed 2 times (retries: 1)"), "{}", flaky.message);
            let p = phases(&done);
            assert_eq!(p["after"], StepPhase::Skipped);
            assert!(done.status.steps["after"].message.contains("step flaky did not succeed"));
            assert_eq!(p["slow"], StepPhase::Succeeded, "a running step finishes ({policy:?})");
            let later = if policy == FailurePolicy::FailFast { StepPhase::Skipped } else { StepPhase::Succeeded };
            assert_eq!(p["later"], later, "({policy:?}, {backend:?})");
        }
    }
}

/// Plays the node agents for a workflow: runs each step's workload for a while, checking that
/// it was started once, after its dependencies, within the parallelism.
struct StandIn {
    violations: Mutex<Vec<String>>,
    running: Mutex<HashSet<String>>,
    done: Mutex<HashSet<String>>,
    started: Mutex<HashSet<String>>,
    max_running: Mutex<usize>,
}

#[tokio::test(start_paused = true)]
async fn a_random_dag_of_ten_thousand_steps_runs_each_step_once_in_order_within_the_parallelism() {
    const STEPS: usize = 10_000;
    const PARALLELISM: u32 = 256;
    let mut rng = fastrand::Rng::with_seed(19);
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(STEPS);
    let mut steps = Vec::with_capacity(STEPS);
    for i in 0..STEPS {
        let mut d: Vec<usize> =
            if i == 0 { Vec::new() } else { (0..rng.usize(0..4)).map(|_| rng.usize(0..i)).collect() };
        d.sort();
        d.dedup();
        let names: Vec<String> = d.iter().map(|j| format!("s{j}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        steps.push(step(&format!("s{i}"), &names, "1", "0"));
        deps.push(d);
    }
    let dependencies: HashMap<String, Vec<String>> =
        deps.iter().enumerate().map(|(i, d)| (format!("s{i}"), d.iter().map(|j| format!("s{j}")).collect())).collect();
    let store: Arc<dyn Store> = Arc::new(orch_store::MemoryStore::new());
    let mut manager = orch_core::Manager::new(store.clone());
    manager.add(WorkflowController::builder());
    let _manager = tokio::spawn(manager.run(std::future::pending()));
    let stand_in = Arc::new(StandIn {
        violations: Mutex::default(),
        running: Mutex::default(),
        done: Mutex::default(),
        started: Mutex::default(),
        max_running: Mutex::default(),
    });
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    let mut events = workloads.watch(&ListParams::default(), None).await.unwrap();
    let agent = {
        let s = stand_in.clone();
        let workloads = workloads.clone();
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(7);
            while let Some(Ok(e)) = events.next().await {
                let Event::Added(w) = e else { continue };
                let step = w.metadata.annotations.get(STEP_ANNOTATION).cloned().unwrap();
                {
                    let done = s.done.lock().unwrap();
                    let mut v = s.violations.lock().unwrap();
                    if !s.started.lock().unwrap().insert(step.clone()) {
                        v.push(format!("{step} started twice"));
                    }
                    if let Some(d) = dependencies[&step].iter().find(|d| !done.contains(*d)) {
                        v.push(format!("{step} started before its dependency {d} finished"));
                    }
                    let mut running = s.running.lock().unwrap();
                    running.insert(step.clone());
                    let mut max = s.max_running.lock().unwrap();
                    *max = (*max).max(running.len());
                }
                let (s, workloads, run) = (s.clone(), workloads.clone(), Duration::from_secs(rng.u64(1..6)));
                tokio::spawn(async move {
                    tokio::time::sleep(run).await;
                    // Finished: no longer running, then reported, so the controller's next start
                    // sees it done.
                    s.running.lock().unwrap().remove(&step);
                    s.done.lock().unwrap().insert(step.clone());
                    let status = WorkloadStatus { phase: Phase::Succeeded, ..Default::default() };
                    workloads.write_status(&w.metadata, &status).await.unwrap();
                });
            }
        })
    };
    let api: Api<Workflow> = Api::namespaced(store.clone(), "default");
    // Followed by a watch, not by polling: each read of a 10,000-step status costs.
    let mut changes = api.watch(&ListParams::default(), None).await.unwrap();
    let wf = Workflow { steps, parallelism: Some(PARALLELISM), ..Default::default() };
    api.create(&Object::new(ObjectMeta::named("big"), wf)).await.unwrap();
    let done = loop {
        match tokio::time::timeout(LIMIT, changes.next()).await {
            Ok(Some(Ok(Event::Modified(wf))))
                if matches!(wf.status.phase, StepPhase::Succeeded | StepPhase::Failed) =>
            {
                break wf;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("the workflow did not finish: {other:?}"),
        }
    };
    assert_eq!(done.status.phase, StepPhase::Succeeded);
    let v = stand_in.violations.lock().unwrap().clone();
    assert!(v.is_empty(), "{} violations, first: {:?}", v.len(), v.first());
    assert_eq!(stand_in.started.lock().unwrap().len(), STEPS, "every step ran once");
    let max = *stand_in.max_running.lock().unwrap();
    assert!(
        max <= PARALLELISM as usize && max >= PARALLELISM as usize / 2,
        "at most {PARALLELISM} at once, and the limit was used: {max}"
    );
    assert_eq!(workloads.list(&ListParams::default()).await.unwrap().items.len(), STEPS);
    agent.abort();
}
