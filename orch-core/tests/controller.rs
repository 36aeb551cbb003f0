//! The reconcile loop end to end on the in-memory store, on a paused clock: convergence, owner
//! triggers, finalizers, backoff, requeue, panics, timeouts, concurrency, shutdown, leader
//! hand-over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_core::Leadership;
use orch_core::controller::ReconcileError;
use orch_core::controller::finalizer::{FinalizerEvent, finalizer};
use orch_core::controller::leader::LeaderElectionConfig;
use orch_core::controller::queue::QueueConfig;
use orch_core::testkit::{eventually, wait_until};
use orch_core::{
    Action, Api, Context, Controller, ControllerBuilder, DeleteOptions, Error, Guard, ListParams, Manager, Object,
    ObjectMeta, ObjectRef, Resource, Scope, Store, Validator, WriteOptions,
};
use orch_store::MemoryStore;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Echo {
    message: String,
    replicas: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct EchoStatus {
    ready: u32,
}

impl Resource for Echo {
    const KIND: &'static str = "Echo";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = EchoStatus;
    fn validate(&self, v: &mut Validator) {
        v.check(self.replicas <= 100, || "spec.replicas".into(), "must be <= 100");
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct EchoReplica {
    message: String,
}

impl Resource for EchoReplica {
    const KIND: &'static str = "EchoReplica";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = ();
}

const FINALIZER: &str = "echo.orch.dev/cleanup";

struct EchoController;

#[async_trait::async_trait]
impl Controller for EchoController {
    type Kind = Echo;
    type Error = Error;

    async fn reconcile(&self, echo: Arc<Object<Echo>>, ctx: &Context) -> Result<Action, Error> {
        let ns = echo.metadata.namespace.clone();
        let echoes: Api<Echo> = ctx.api(&ns);
        let replicas: Api<EchoReplica> = ctx.api(&ns);
        let children = ctx.cache::<EchoReplica>().expect("owned kinds are cached");
        let status_api = echoes.clone();
        finalizer(&echoes, FINALIZER, echo, |event| async move {
            match event {
                FinalizerEvent::Apply(echo) => {
                    let mine = children.owned_by(&echo.metadata.uid);
                    for i in 0..echo.spec.replicas {
                        let name = format!("{}-{i}", echo.metadata.name);
                        if mine.iter().any(|c| c.metadata.name == name) {
                            continue;
                        }
                        let mut meta = ObjectMeta::named(name);
                        meta.owner_references = vec![echo.controller_ref()];
                        match replicas
                            .create(&Object::new(meta, EchoReplica { message: echo.spec.message.clone() }))
                            .await
                        {
                            Ok(_) | Err(Error::AlreadyExists(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    for extra in mine.iter().filter(|c| {
                        c.metadata
                            .name
                            .rsplit_once('-')
                            .and_then(|(_, i)| i.parse::<u32>().ok())
                            .is_none_or(|i| i >= echo.spec.replicas)
                    }) {
                        match replicas.delete(&extra.metadata.name, &DeleteOptions::default()).await {
                            Ok(_) | Err(Error::NotFound(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    let ready = children.owned_by(&echo.metadata.uid).len() as u32;
                    if echo.status.ready != ready {
                        let mut s = (*echo).clone();
                        s.status.ready = ready;
                        status_api.replace_status(&s).await?;
                    }
                    Ok(Action::Done)
                }
                FinalizerEvent::Cleanup(echo) => {
                    for c in children.owned_by(&echo.metadata.uid) {
                        let _ = replicas.delete(&c.metadata.name, &DeleteOptions::default()).await;
                    }
                    Ok(Action::Done)
                }
            }
        })
        .await
        .map_err(|e| Error::Unavailable { message: e.to_string(), source: None })
    }
}

fn echo(name: &str, replicas: u32) -> Object<Echo> {
    Object::new(ObjectMeta::named(name), Echo { message: "hi".into(), replicas })
}

/// Runs `manager` until the returned sender fires (or is dropped).
fn start(manager: Manager) -> (oneshot::Sender<()>, tokio::task::JoinHandle<orch_core::Result<()>>) {
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(manager.run(async move {
        let _ = rx.await;
    }));
    (tx, handle)
}

#[tokio::test(start_paused = true)]
async fn echo_operator_converges_and_cleans_up() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let echoes: Api<Echo> = Api::namespaced(store.clone(), "default");
    let replicas: Api<EchoReplica> = Api::namespaced(store.clone(), "default");
    let mut manager = Manager::new(store.clone());
    manager.add(ControllerBuilder::new("echo", EchoController).owns::<EchoReplica>());
    let mut ready = manager.readiness();
    let (stop, handle) = start(manager);
    ready.wait_for(|r| *r).await.unwrap();

    echoes.create(&echo("hello", 3)).await.unwrap();
    let count = || async { replicas.list(&ListParams::default()).await.unwrap().items.len() };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count().await != 3 || echoes.get("hello").await.unwrap().status.ready != 3 {
        assert!(Instant::now() < deadline, "did not converge to 3 replicas");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = echoes.get("hello").await.unwrap();
    assert_eq!(e.metadata.finalizers, [FINALIZER]);
    let child = replicas.get("hello-0").await.unwrap();
    assert_eq!(child.metadata.controller_owner().unwrap().uid, e.metadata.uid);

    // A child deleted behind the controller's back comes back (owner trigger).
    replicas.delete("hello-1", &DeleteOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(replicas.get("hello-1").await.is_ok(), "hello-1 was not re-created");

    // Scaling down removes the extras.
    echoes.patch("hello", &serde_json::json!({"spec": {"replicas": 1}})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count().await, 1);
    assert_eq!(echoes.get("hello").await.unwrap().status.ready, 1);

    // Deleting runs the cleanup, then the finalizer comes off and the object goes.
    echoes.delete("hello", &DeleteOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(echoes.get("hello").await.unwrap_err().is_not_found());
    assert_eq!(count().await, 0);

    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

/// A controller that records when each key was reconciled and fails, panics or sleeps as told.
#[derive(Default)]
struct Scripted {
    /// Per object name: what to do on attempt n (0-based); past the end, succeed.
    script: HashMap<String, Vec<Step>>,
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
    in_flight: Mutex<HashMap<String, usize>>,
    max_same_key: AtomicUsize,
    max_total: AtomicUsize,
    total: AtomicUsize,
    errors: Mutex<Vec<String>>,
    finished: AtomicUsize,
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Fail,
    Panic,
    Sleep(Duration),
    Requeue(Duration),
}

/// The controller face of a shared [`Scripted`].
struct ScriptedCtl(Arc<Scripted>);

impl std::ops::Deref for ScriptedCtl {
    type Target = Scripted;
    fn deref(&self) -> &Scripted {
        &self.0
    }
}

#[async_trait::async_trait]
impl Controller for ScriptedCtl {
    type Kind = Echo;
    type Error = Error;

    async fn reconcile(&self, obj: Arc<Object<Echo>>, _ctx: &Context) -> Result<Action, Error> {
        let name = obj.metadata.name.clone();
        let n = {
            let mut a = self.attempts.lock().unwrap();
            let v = a.entry(name.clone()).or_default();
            v.push(Instant::now());
            v.len() - 1
        };
        {
            let mut f = self.in_flight.lock().unwrap();
            let c = f.entry(name.clone()).or_default();
            *c += 1;
            self.max_same_key.fetch_max(*c, Ordering::SeqCst);
        }
        let total = self.total.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_total.fetch_max(total, Ordering::SeqCst);
        let step = self.script.get(&name).and_then(|s| s.get(n)).copied();
        let result = match step {
            Some(Step::Fail) => Err(Error::Unavailable { message: "scripted failure".into(), source: None }),
            Some(Step::Panic) => {
                *self.in_flight.lock().unwrap().get_mut(&name).unwrap() -= 1;
                self.total.fetch_sub(1, Ordering::SeqCst);
                panic!("scripted panic");
            }
            Some(Step::Sleep(d)) => {
                tokio::time::sleep(d).await;
                Ok(Action::Done)
            }
            Some(Step::Requeue(d)) => Ok(Action::RequeueAfter(d)),
            None => Ok(Action::Done),
        };
        *self.in_flight.lock().unwrap().get_mut(&name).unwrap() -= 1;
        self.total.fetch_sub(1, Ordering::SeqCst);
        self.finished.fetch_add(1, Ordering::SeqCst);
        result
    }

    fn error_policy(&self, _obj: &Object<Echo>, error: &ReconcileError<Error>, _ctx: &Context) -> Action {
        self.errors.lock().unwrap().push(error.to_string());
        Action::Retry
    }
}

impl Scripted {
    fn attempts(&self, name: &str) -> Vec<Instant> {
        self.attempts.lock().unwrap().get(name).cloned().unwrap_or_default()
    }
}

async fn run_scripted(
    script: Scripted,
    builder: impl FnOnce(ControllerBuilder<ScriptedCtl>) -> ControllerBuilder<ScriptedCtl>,
    objects: &[&str],
) -> (Arc<Scripted>, Api<Echo>, oneshot::Sender<()>, tokio::task::JoinHandle<orch_core::Result<()>>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let api: Api<Echo> = Api::namespaced(store.clone(), "default");
    for name in objects {
        api.create(&echo(name, 1)).await.unwrap();
    }
    let scripted = Arc::new(script);
    let mut manager = Manager::new(store);
    manager.add(builder(ControllerBuilder::new("scripted", ScriptedCtl(scripted.clone()))));
    let (stop, handle) = start(manager);
    (scripted, api, stop, handle)
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_and_panics_are_contained() {
    let script = Scripted {
        script: HashMap::from([("flaky".into(), vec![Step::Panic, Step::Fail, Step::Fail, Step::Fail])]),
        ..Default::default()
    };
    let queue = QueueConfig { base_backoff: Duration::from_millis(100), ..Default::default() };
    let (s, _api, stop, handle) = run_scripted(script, |b| b.queue(queue), &["flaky", "steady"]).await;
    eventually(Duration::from_secs(10), "flaky finally succeeds", || s.attempts("flaky").len() == 5).await;
    let g = gaps(&s.attempts("flaky"));
    let ms: Vec<u128> = g.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, [100, 200, 400, 800], "backoff doubles from the base");
    assert_eq!(s.attempts("steady").len(), 1, "other keys are unaffected");
    let errors = s.errors.lock().unwrap().clone();
    assert!(errors[0].contains("panicked: scripted panic"), "{errors:?}");
    assert!(errors[1].contains("scripted failure"), "{errors:?}");
    // After the success the backoff is reset: nothing more happens.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(s.attempts("flaky").len(), 5);
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn requeue_after_reconciles_again_without_changes() {
    let script = Scripted {
        script: HashMap::from([("tick".into(), vec![Step::Requeue(Duration::from_secs(10)); 3])]),
        ..Default::default()
    };
    let (s, _api, stop, handle) = run_scripted(script, |b| b, &["tick"]).await;
    eventually(Duration::from_secs(60), "three requeues", || s.attempts("tick").len() == 4).await;
    assert_eq!(gaps(&s.attempts("tick")), [Duration::from_secs(10); 3]);
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn one_key_never_runs_twice_at_once_and_concurrency_is_bounded() {
    let names: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    let script = Scripted {
        script: names.iter().map(|n| (n.clone(), vec![Step::Sleep(Duration::from_millis(300)); 4])).collect(),
        ..Default::default()
    };
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (s, api, stop, handle) = run_scripted(script, |b| b.concurrency(2), &refs).await;
    // Change one key three times while it is being reconciled.
    eventually(Duration::from_secs(30), "k0 starts", || s.attempts("k0").len() == 1).await;
    for i in 0..3 {
        api.patch("k0", &serde_json::json!({"spec": {"message": format!("m{i}")}})).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(Duration::from_secs(30), "all keys reconciled", || names.iter().all(|n| !s.attempts(n).is_empty()))
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(s.max_same_key.load(Ordering::SeqCst), 1, "a key ran twice at once");
    assert_eq!(s.max_total.load(Ordering::SeqCst), 2, "concurrency bound not used or exceeded");
    // The changes are neither lost nor each a reconcile of their own: they merge into one more.
    assert_eq!(s.attempts("k0").len(), 2, "changes during a reconcile");
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn slow_reconciles_time_out() {
    let script = Scripted {
        script: HashMap::from([("slow".into(), vec![Step::Sleep(Duration::from_secs(30))])]),
        ..Default::default()
    };
    let (s, _api, stop, handle) = run_scripted(script, |b| b.timeout(Duration::from_secs(2)), &["slow"]).await;
    eventually(Duration::from_secs(10), "retried after the timeout", || s.attempts("slow").len() == 2).await;
    assert_eq!(gaps(&s.attempts("slow"))[0].as_millis(), 2_005, "timeout plus the first backoff");
    assert!(s.errors.lock().unwrap()[0].contains("timed out after 2s"));
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_in_flight_reconciles() {
    let script = Scripted {
        script: HashMap::from([("long".into(), vec![Step::Sleep(Duration::from_secs(5))])]),
        ..Default::default()
    };
    let (s, _api, stop, handle) = run_scripted(script, |b| b, &["long"]).await;
    eventually(Duration::from_secs(5), "started", || s.attempts("long").len() == 1).await;
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    assert_eq!(s.finished.load(Ordering::SeqCst), 1, "run() returned before the reconcile finished");
}

/// Which replica reconciled, under which fencing token.
type LeaderLog = Arc<Mutex<Vec<(&'static str, Option<Guard>)>>>;

/// Records which replica reconciled, and writes through the fenced Api.
struct Marker {
    replica: &'static str,
    log: LeaderLog,
}

#[async_trait::async_trait]
impl Controller for Marker {
    type Kind = Echo;
    type Error = Error;
    async fn reconcile(&self, obj: Arc<Object<Echo>>, ctx: &Context) -> Result<Action, Error> {
        self.log.lock().unwrap().push((self.replica, ctx.guard().cloned()));
        // Converges (writes once), so it does not trigger itself; the periodic requeue shows
        // who is acting.
        if obj.status.ready == 0 {
            let mut s = (*obj).clone();
            s.status.ready = 1;
            ctx.api::<Echo>(&obj.metadata.namespace).replace_status(&s).await?;
        }
        Ok(Action::RequeueAfter(Duration::from_secs(1)))
    }
}

#[tokio::test(start_paused = true)]
async fn standby_takes_over_when_the_leader_dies_and_the_old_leader_is_fenced() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let api: Api<Echo> = Api::namespaced(store.clone(), "default");
    api.create(&echo("work", 1)).await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let election = |id: &str| LeaderElectionConfig {
        lease_ttl: Duration::from_secs(6),
        retry_period: Duration::from_millis(500),
        ..LeaderElectionConfig::new("orch-system", "controllers", id)
    };
    let mut a = Manager::new(store.clone()).with_leader_election(election("a"));
    a.add(ControllerBuilder::new("marker", Marker { replica: "a", log: log.clone() }));
    let mut a_leads = a.leadership();
    let (_stop_a, run_a) = start(a);
    a_leads.wait_for(|l| matches!(l, Leadership::Leading(_))).await.unwrap();

    let mut b = Manager::new(store.clone()).with_leader_election(election("b"));
    b.add(ControllerBuilder::new("marker", Marker { replica: "b", log: log.clone() }));
    let b_leads = b.leadership();
    let (stop_b, run_b) = start(b);

    tokio::time::sleep(Duration::from_secs(5)).await;
    // Kill the leader outright: no graceful release, its lease must run out.
    run_a.abort();
    assert!(run_a.await.unwrap_err().is_cancelled());
    let killed_at = Instant::now();
    let before: Vec<_> = log.lock().unwrap().clone();
    assert!(before.len() >= 3, "the leader keeps reconciling");
    assert!(before.iter().all(|(r, _)| *r == "a"), "the standby must not act: {before:?}");
    assert_eq!(*b_leads.borrow(), Leadership::Standby);
    let old_guard = before[0].1.clone().expect("an elected leader writes with a guard");

    let mut b_leads = b_leads;
    b_leads.wait_for(|l| matches!(l, Leadership::Leading(_))).await.unwrap();
    let took = killed_at.elapsed();
    assert!(took <= Duration::from_secs(7), "takeover took {took:?}, longer than the lease TTL plus a retry");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<_> = log.lock().unwrap()[before.len()..].to_vec();
    assert!(!after.is_empty() && after.iter().all(|(r, _)| *r == "b"), "{after:?}");
    let new_guard = after[0].1.clone().unwrap();
    assert!(new_guard.resource_version > old_guard.resource_version, "a new fencing token");

    // The deposed leader's token no longer opens the store.
    let mut w = api.get("work").await.unwrap();
    w.status.ready = 999;
    let fenced = api.replace_status_with(&w, &WriteOptions { guard: Some(old_guard) }).await.unwrap_err();
    assert!(matches!(fenced, Error::PreconditionFailed { .. }), "{fenced}");
    assert_ne!(api.get("work").await.unwrap().status.ready, 999);

    // A graceful stop releases the lock at once.
    stop_b.send(()).unwrap();
    run_b.await.unwrap().unwrap();
    let lock = orch_core::ObjectKey::new("LeaderLock", "orch-system", "controllers");
    assert!(store.get(&lock).await.unwrap_err().is_not_found());
    let _ = ObjectRef::new("", "");
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_lock_is_taken_away_steps_down_and_campaigns_again() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let config = LeaderElectionConfig {
        lease_ttl: Duration::from_secs(3),
        retry_period: Duration::from_millis(200),
        ..LeaderElectionConfig::new("orch-system", "solo", "only")
    };
    let lock = config.lock_key();
    let manager = Manager::new(store.clone()).with_leader_election(config);
    let mut leads = manager.leadership();
    let (stop, run) = start(manager);
    let first = leads.wait_for(|l| matches!(l, Leadership::Leading(_))).await.unwrap().clone();
    let token = |l: &Leadership| match l {
        Leadership::Leading(Some(g)) => g.resource_version,
        _ => 0,
    };
    let first = token(&first);
    assert!(first > 0);
    store.delete(&lock, &DeleteOptions::default()).await.unwrap();
    // It notices within a renewal period, steps down, and wins a new term with a new token.
    let second = tokio::time::timeout(Duration::from_secs(5), leads.wait_for(|l| token(l) > first))
        .await
        .expect("a new term within one renewal and one retry")
        .unwrap()
        .clone();
    assert_eq!(store.get(&lock).await.unwrap().metadata.resource_version, token(&second));
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_finalizer_stays_until_cleanup_says_done() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let api: Api<Echo> = Api::namespaced(store.clone(), "default");
    let mut e = echo("slow-cleanup", 1);
    e.metadata.finalizers = vec![FINALIZER.into()];
    api.create(&e).await.unwrap();
    api.delete("slow-cleanup", &DeleteOptions::default()).await.unwrap();
    let marked = Arc::new(api.get("slow-cleanup").await.unwrap());
    let not_yet = finalizer(&api, FINALIZER, marked.clone(), |_| async {
        Ok::<_, Error>(Action::RequeueAfter(Duration::from_secs(5)))
    })
    .await
    .unwrap();
    assert_eq!(not_yet, Action::RequeueAfter(Duration::from_secs(5)));
    assert_eq!(api.get("slow-cleanup").await.unwrap().metadata.finalizers, [FINALIZER], "kept while cleanup continues");
    let done = finalizer(&api, FINALIZER, marked, |_| async { Ok::<_, Error>(Action::Done) }).await.unwrap();
    assert_eq!(done, Action::Done);
    assert!(api.get("slow-cleanup").await.unwrap_err().is_not_found());
}

/// Writes `status.ready = spec.replicas` on every reconcile and counts its reconciles.
struct StatusWriter {
    reconciles: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl Controller for StatusWriter {
    type Kind = Echo;
    type Error = Error;

    async fn reconcile(&self, echo: Arc<Object<Echo>>, ctx: &Context) -> Result<Action, Error> {
        self.reconciles.fetch_add(1, Ordering::SeqCst);
        if echo.status.ready != echo.spec.replicas {
            let mut next = (*echo).clone();
            next.status.ready = echo.spec.replicas;
            ctx.api::<Echo>(&echo.metadata.namespace).replace_status(&next).await?;
        }
        Ok(Action::Done)
    }
}

/// Runs a status-writing controller (with or without the generation predicate) through a
/// create and two spec changes; returns how many reconciles it took.
async fn reconciles_for_spec_changes(predicate: bool) -> usize {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let reconciles = Arc::new(AtomicUsize::new(0));
    let mut builder = ControllerBuilder::new("status-writer", StatusWriter { reconciles: reconciles.clone() });
    if predicate {
        builder = builder.predicate(orch_core::controller::predicate::generation_changed());
    }
    let mut manager = Manager::new(store.clone());
    manager.add(builder);
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(manager.run(async move {
        let _ = stopped.await;
    }));
    let api: Api<Echo> = Api::namespaced(store, "default");
    let mut echo = api.create(&Object::new(ObjectMeta::named("e"), Echo { message: "hi".into(), replicas: 1 })).await;
    for replicas in [2, 3] {
        let current = echo.unwrap();
        let want = current.spec.replicas;
        wait_until("status caught up", Duration::from_secs(10), async || {
            api.get("e").await.is_ok_and(|e| e.status.ready == want)
        })
        .await;
        let mut next = api.get("e").await.unwrap();
        next.spec.replicas = replicas;
        echo = api.replace(&next).await;
    }
    wait_until("last status", Duration::from_secs(10), async || api.get("e").await.is_ok_and(|e| e.status.ready == 3))
        .await;
    // Whatever else would come has come by now.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _ = stop.send(());
    run.await.unwrap().unwrap();
    reconciles.load(Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn the_generation_predicate_skips_the_controllers_own_status_writes() {
    let without = reconciles_for_spec_changes(false).await;
    let with = reconciles_for_spec_changes(true).await;
    // A create and two spec changes: three reconciles, none for the three status writes.
    assert_eq!(with, 3, "one reconcile per spec change");
    assert_eq!(without, 6, "without the predicate, each status write wakes the controller again");
}
