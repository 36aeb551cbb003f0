//! The job controller on simulated nodes in virtual time, on the memory and embedded stores:
//! completions within parallelism, retries with a doubling delay up to the backoff limit, the
//! active deadline, indexed completion, and deletion after the TTL.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use orch_controllers::{GarbageCollector, JobController};
use orch_core::kinds::{
    CompletionMode, EnvVar, Job, Phase, RestartPolicy, Workload, WorkloadTemplate, find_condition, job_condition,
};
use orch_core::{Api, Event, ListParams, Object, ObjectMeta, testkit};

const LIMIT: Duration = Duration::from_secs(4 * 3600);

fn job_controllers() -> Vec<Component> {
    vec![with(JobController::builder), with(GarbageCollector::builtin)]
}

fn task(run: &str, exit: &str) -> WorkloadTemplate {
    let mut w = Workload::command("main", &["work"]);
    w.restart_policy = RestartPolicy::Never;
    w.containers[0].env = vec![
        EnvVar { name: "SIM_RUN".into(), value: run.into() },
        EnvVar { name: "SIM_EXIT_CODE".into(), value: exit.into() },
    ];
    WorkloadTemplate::new([("app", "batch")].into(), w)
}

async fn finished(api: &Api<Job>, name: &str) -> Object<Job> {
    testkit::wait_until("the job finished", LIMIT, async || {
        let j = api.get(name).await.ok()?;
        [job_condition::COMPLETE, job_condition::FAILED]
            .iter()
            .any(|t| find_condition(&j.status.conditions, t).is_some())
            .then_some(j)
    })
    .await
}

/// The most workloads seen running at once (not finished), and every workload seen.
type Seen = Arc<Mutex<(usize, Vec<Object<Workload>>)>>;

/// Watches the workloads: see [`Seen`].
fn watch_active(store: Arc<dyn orch_core::Store>) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new((0usize, Vec::new())));
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let api: Api<Workload> = Api::namespaced(store, "default");
        let mut stream = api.watch(&ListParams::default(), None).await.unwrap();
        let mut active: HashMap<String, bool> = HashMap::new();
        while let Some(Ok(e)) = stream.next().await {
            let mut s = out.lock().unwrap();
            match e {
                Event::Added(w) | Event::Modified(w) => {
                    let running = !matches!(w.status.phase, Phase::Succeeded | Phase::Failed);
                    active.insert(w.metadata.name.clone(), running);
                    if !s.1.iter().any(|x: &Object<Workload>| x.metadata.name == w.metadata.name) {
                        s.1.push(w);
                    }
                }
                Event::Deleted(w) => {
                    active.remove(&w.metadata.name);
                }
                Event::Progress(_) => {}
            }
            s.0 = s.0.max(active.values().filter(|v| **v).count());
        }
    });
    (seen, task)
}

#[tokio::test(start_paused = true)]
async fn a_job_completes_its_completions_within_its_parallelism() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "job-complete", 3, job_controllers()).await;
        let api: Api<Job> = Api::namespaced(plane.store.clone(), "default");
        let (seen, watcher) = watch_active(plane.store.clone());
        let job = Job { template: task("10", "0"), completions: 5, parallelism: 2, ..Default::default() };
        api.create(&Object::new(ObjectMeta::named("batch"), job)).await.unwrap();
        let done = finished(&api, "batch").await;
        let c = find_condition(&done.status.conditions, job_condition::COMPLETE).expect("complete");
        assert_eq!(c.reason, "Completed");
        assert_eq!((done.status.succeeded, done.status.failed, done.status.active), (5, 0, 0));
        let (max_active, all) = seen.lock().unwrap().clone();
        assert_eq!(max_active, 2, "never more than the parallelism at once ({backend:?})");
        assert_eq!(all.len(), 5, "one workload per completion");
        watcher.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_with_a_doubling_delay_until_the_backoff_limit() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "job-backoff", 2, job_controllers()).await;
        let api: Api<Job> = Api::namespaced(plane.store.clone(), "default");
        let (seen, watcher) = watch_active(plane.store.clone());
        let job = Job { template: task("1", "3"), backoff_limit: 3, backoff_seconds: 10, ..Default::default() };
        api.create(&Object::new(ObjectMeta::named("flaky"), job)).await.unwrap();
        let done = finished(&api, "flaky").await;
        let c = find_condition(&done.status.conditions, job_condition::FAILED).expect("failed");
        assert_eq!(c.reason, "BackoffLimitExceeded");
        assert!(c.message.contains("4 failures, more than the backoff limit of 3"), "{}", c.message);
        assert!(c.message.contains("exit code 3"), "the failed job says why: {}", c.message);
        let mut created: Vec<i64> =
            seen.lock().unwrap().1.iter().map(|w| w.metadata.creation_timestamp.unwrap().as_millis()).collect();
        created.sort();
        assert_eq!(created.len(), 4, "one try and three retries ({backend:?})");
        // Each try runs 1 s; the retries wait 10, 20 and 40 s after a failure.
        let gaps: Vec<i64> = created.windows(2).map(|w| (w[1] - w[0]) / 1000).collect();
        for (gap, delay) in gaps.iter().zip([10, 20, 40]) {
            assert!(*gap > delay && *gap <= delay + 3, "gaps {gaps:?} ({backend:?})");
        }
        watcher.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_job_past_its_active_deadline_fails_and_stops_its_workloads() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "job-deadline", 2, job_controllers()).await;
        let api: Api<Job> = Api::namespaced(plane.store.clone(), "default");
        let job = Job {
            template: task("1000", "0"),
            parallelism: 2,
            completions: 2,
            active_deadline_seconds: Some(30),
            ..Default::default()
        };
        api.create(&Object::new(ObjectMeta::named("slow"), job)).await.unwrap();
        let done = finished(&api, "slow").await;
        let c = find_condition(&done.status.conditions, job_condition::FAILED).expect("failed");
        assert_eq!(c.reason, "DeadlineExceeded");
        assert!(c.message.contains("active deadline of 30s"), "{}", c.message);
        let ran = done.status.completion_time.unwrap().since(done.status.start_time.unwrap());
        assert!(ran >= Duration::from_secs(30) && ran < Duration::from_secs(33), "{ran:?}");
        testkit::wait_until("workloads stopped", LIMIT, async || {
            plane.workloads().list(&ListParams::default()).await.unwrap().items.is_empty().then_some(())
        })
        .await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_indexed_job_gives_each_workload_its_index_and_is_deleted_after_its_ttl() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "job-indexed", 3, job_controllers()).await;
        let api: Api<Job> = Api::namespaced(plane.store.clone(), "default");
        let (seen, watcher) = watch_active(plane.store.clone());
        let job = Job {
            template: task("5", "0"),
            completions: 4,
            parallelism: 3,
            completion_mode: CompletionMode::Indexed,
            ttl_seconds_after_finished: Some(60),
            ..Default::default()
        };
        api.create(&Object::new(ObjectMeta::named("shards"), job)).await.unwrap();
        let done = finished(&api, "shards").await;
        assert_eq!(done.status.completed_indexes, "0-3");
        assert_eq!(done.status.succeeded, 4);
        let all = seen.lock().unwrap().1.clone();
        let indexes: HashSet<String> = all
            .iter()
            .map(|w| w.spec.containers[0].env.iter().find(|e| e.name == "JOB_COMPLETION_INDEX").unwrap().value.clone())
            .collect();
        assert_eq!(indexes, ["0", "1", "2", "3"].into_iter().map(String::from).collect());
        assert_eq!(all.len(), 4);
        assert!(seen.lock().unwrap().0 <= 3);
        // Gone 60 s after it finished, with its workloads.
        let finished_at = tokio::time::Instant::now();
        testkit::wait_until("the job deleted", LIMIT, async || {
            api.get_opt("shards").await.unwrap().is_none().then_some(())
        })
        .await;
        let after = finished_at.elapsed();
        assert!(after >= Duration::from_secs(55) && after <= Duration::from_secs(62), "{after:?} ({backend:?})");
        testkit::wait_until("its workloads collected", LIMIT, async || {
            plane.workloads().list(&ListParams::default()).await.unwrap().items.is_empty().then_some(())
        })
        .await;
        watcher.abort();
    }
}
