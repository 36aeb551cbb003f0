//! A control plane on simulated nodes in virtual time, for the workload controllers' tests: a
//! store (memory or embedded), a manager with the scheduler and the given controllers, and an
//! agent per simulated node.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use orch_core::kinds::{
    ConditionStatus, Deployment, EnvVar, Phase, Probe, ProbeAction, Resources, TEMPLATE_HASH_LABEL, Workload,
    find_condition,
};
use orch_core::{Api, Event, ListParams, Manager, Runnable, Runtime, Store, Timestamp, TokioClock};
use orch_runtime::{Agent, AgentConfig, SharedRenewals, SimCluster};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::{MemoryStore, RedbStore};

/// Something to add to the manager.
pub type Component = Box<dyn FnOnce(&mut Manager)>;

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Embedded,
}

pub const BACKENDS: [Backend; 2] = [Backend::Memory, Backend::Embedded];

pub fn store(backend: Backend, name: &str, clock: Arc<TokioClock>) -> Arc<dyn Store> {
    match backend {
        Backend::Memory => Arc::new(MemoryStore::builder().clock(clock).build()),
        Backend::Embedded => {
            let dir = std::env::temp_dir().join(format!("orch-controllers-tests-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path: PathBuf = dir.join(format!("{name}.redb"));
            let _ = std::fs::remove_file(&path);
            // Virtual time stands still while the disk commits (see `testkit::Paced`).
            Arc::new(orch_core::testkit::Paced::new(Arc::new(RedbStore::builder().clock(clock).open(&path).unwrap())))
        }
    }
}

pub struct Plane {
    pub store: Arc<dyn Store>,
    pub clock: Arc<TokioClock>,
    pub cluster: SimCluster,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    manager: Option<tokio::task::JoinHandle<orch_core::Result<()>>>,
    agents: Vec<tokio::task::JoinHandle<()>>,
}

impl Plane {
    /// A control plane with `components` on `nodes` simulated nodes.
    pub async fn start(backend: Backend, name: &str, nodes: usize, components: Vec<Component>) -> Plane {
        let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
        let store = store(backend, name, clock.clone());
        Plane::start_on(store, clock, nodes, components).await
    }

    pub async fn start_on(
        store: Arc<dyn Store>,
        clock: Arc<TokioClock>,
        nodes: usize,
        components: Vec<Component>,
    ) -> Plane {
        let mut manager = Manager::new(store.clone()).with_clock(clock.clone());
        manager.add(SchedulerService::new(Profile::default_profile()));
        for add in components {
            add(&mut manager);
        }
        let workloads = manager.cache::<Workload>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(manager.run(async move {
            let _ = stopped.await;
        }));
        let renewals = SharedRenewals::spawn(store.clone(), Duration::from_secs(10));
        let cluster = SimCluster::new();
        let capacity: Resources =
            [("cpu", "32"), ("memory", "128Gi"), ("pods", "110")].map(|(k, v)| (k.into(), v.parse().unwrap())).into();
        let mut agents = Vec::new();
        for n in 0..nodes {
            let name = format!("sim-{n:04}");
            let mut config = AgentConfig::new(&name);
            config.capacity = Some(capacity.clone());
            let runtime: Arc<dyn Runtime> = Arc::new(cluster.node(&name));
            let agent = Agent::new(config, store.clone(), runtime)
                .with_clock(clock.clone())
                .with_shared_cache(workloads.clone())
                .with_shared_renewals(renewals.clone());
            agents.push(tokio::spawn(async move {
                let _ = agent.run(std::future::pending::<()>(), false).await;
            }));
        }
        Plane { store, clock, cluster, stop: Some(stop), manager: Some(running), agents }
    }

    /// Stops the manager (its controllers) but leaves the agents running.
    pub async fn stop_manager(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(m) = self.manager.take() {
            let _ = m.await;
        }
    }

    pub fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.store.clone(), "default")
    }

    pub fn workloads(&self) -> Api<Workload> {
        Api::namespaced(self.store.clone(), "default")
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        for a in &self.agents {
            a.abort();
        }
        if let Some(m) = &self.manager {
            m.abort();
        }
    }
}

/// Adds a runnable to the manager (for `Plane::start`).
pub fn with<R: Runnable + 'static>(make: impl FnOnce() -> R + 'static) -> Component {
    Box::new(move |m: &mut Manager| {
        m.add(make());
    })
}

/// The workload controllers a deployment needs.
pub fn deployment_controllers() -> Vec<Component> {
    vec![with(orch_controllers::DeploymentController::builder), with(orch_controllers::ReplicaSetController::builder)]
}

/// A simulated service: runs until stopped, ready (by an exec probe) once running.
pub fn service(version: &str) -> Workload {
    let mut w = Workload::command("main", &["serve"]);
    w.containers[0].env = vec![EnvVar { name: "VERSION".into(), value: version.into() }];
    w.containers[0].readiness_probe = Some(Probe {
        action: ProbeAction::Exec { command: vec!["check".into()] },
        initial_delay_seconds: 0,
        period_seconds: 1,
        timeout_seconds: 1,
        failure_threshold: 1,
        success_threshold: 1,
    });
    w
}

/// Sets a simulated behaviour variable on the first container.
pub fn sim(mut w: Workload, name: &str, value: &str) -> Workload {
    w.containers[0].env.push(EnvVar { name: name.into(), value: value.into() });
    w
}

pub fn is_ready(w: &orch_core::Object<Workload>) -> bool {
    w.status.phase == Phase::Running
        && find_condition(&w.status.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
}

/// What a watcher of every workload saw: at each event, how many existed and how many were
/// ready; the extremes over the whole watch.
#[derive(Debug, Default, Clone)]
pub struct Extremes {
    pub max_total: usize,
    pub min_ready: usize,
    pub events: usize,
    /// Events at which workloads of more than one template existed (for recreate).
    pub overlaps: usize,
    /// Workloads, and ready ones, after the last event.
    pub total: usize,
    pub ready: usize,
}

/// Watches every workload of the namespace from `from` and keeps the extremes; stop it by
/// dropping the handle.
pub struct Watcher {
    pub seen: Arc<std::sync::Mutex<Extremes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// The extremes since the last call (or the start), then starts over from the current state.
    pub fn take(&self) -> Extremes {
        let mut s = self.seen.lock().unwrap();
        let out = s.clone();
        s.max_total = s.total;
        s.min_ready = s.ready;
        s.events = 0;
        s.overlaps = 0;
        out
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn watch_workloads(store: Arc<dyn Store>) -> Watcher {
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let listed = api.list(&ListParams::default()).await.unwrap();
    let mut state: HashMap<String, (String, bool)> = listed
        .items
        .iter()
        .map(|w| {
            (
                w.metadata.name.clone(),
                (w.metadata.labels.get(TEMPLATE_HASH_LABEL).cloned().unwrap_or_default(), is_ready(w)),
            )
        })
        .collect();
    let ready = state.values().filter(|s| s.1).count();
    let seen = Arc::new(std::sync::Mutex::new(Extremes {
        max_total: state.len(),
        min_ready: ready,
        total: state.len(),
        ready,
        ..Default::default()
    }));
    let mut stream = api.watch(&ListParams::default(), Some(listed.revision + 1)).await.unwrap();
    let out = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(e)) = stream.next().await {
            match e {
                Event::Added(w) | Event::Modified(w) => {
                    let hash = w.metadata.labels.get(TEMPLATE_HASH_LABEL).cloned().unwrap_or_default();
                    state.insert(w.metadata.name.clone(), (hash, is_ready(&w)));
                }
                Event::Deleted(w) => {
                    state.remove(&w.metadata.name);
                }
                Event::Progress(_) => continue,
            }
            let mut s = out.lock().unwrap();
            s.events += 1;
            s.total = state.len();
            s.ready = state.values().filter(|v| v.1).count();
            s.max_total = s.max_total.max(s.total);
            s.min_ready = s.min_ready.min(s.ready);
            let hashes: std::collections::HashSet<&String> = state.values().map(|v| &v.0).collect();
            if hashes.len() > 1 {
                s.overlaps += 1;
            }
        }
    });
    Watcher { seen, task }
}

/// Waits until the deployment's rollout of its current template is complete: every replica
/// updated and available, nothing else left, and the status observed the latest generation.
pub async fn wait_complete(api: &Api<Deployment>, name: &str, limit: Duration) -> orch_core::Object<Deployment> {
    orch_core::testkit::wait_until(&format!("deployment {name} complete"), limit, async || {
        let d = api.get(name).await.ok()?;
        let s = &d.status;
        let done = s.observed_generation == d.metadata.generation
            && s.updated_replicas == d.spec.replicas
            && s.replicas == d.spec.replicas
            && s.available_replicas == d.spec.replicas
            && find_condition(&s.conditions, "Progressing").is_some_and(|c| c.reason == "NewRevisionAvailable");
        done.then_some(d)
    })
    .await
}

/// The template hashes of the workloads that exist now, with how many of each.
pub async fn hashes(api: &Api<Workload>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for w in api.list(&ListParams::default()).await.unwrap().items {
        *out.entry(w.metadata.labels.get(TEMPLATE_HASH_LABEL).cloned().unwrap_or_default()).or_insert(0) += 1;
    }
    out
}
