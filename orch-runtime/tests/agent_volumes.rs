//! The node agent's side of volumes, with real processes: claims wait until bound, their data
//! outlives the instance and the agent, volumes of another node or class are refused, the node
//! advertises its local storage, volumes being deleted are reclaimed once unused, `emptyDir`
//! size limits evict, and a program can run inside its volume.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use orch_core::kinds::{
    AccessMode, ClaimPhase, ClaimReference, Event, Node, NodeStorage, PersistentVolume, Phase, RestartPolicy,
    VOLUME_RECLAIM_FINALIZER, Volume, VolumeClaim, VolumePhase, VolumeSource, Workload, volume_name_for_claim,
};
use orch_core::testkit::wait_until;
use orch_core::{Api, DeleteOptions, ListParams, Object, ObjectMeta, Quantity, Runtime, Store};
use orch_runtime::{Agent, AgentConfig, AgentError, LocalVolumes, ProcessRuntime};
use orch_store::MemoryStore;
use tokio::sync::oneshot;

/// How long a test waits for what it expects (real processes on a loaded machine).
const LIMIT: Duration = Duration::from_secs(20);

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn root() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "orch-agent-volumes-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(data_root: &std::path::Path) -> AgentConfig {
    AgentConfig {
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        resync_interval: Duration::from_millis(200),
        renew_interval: Duration::from_millis(500),
        lease_ttl: Duration::from_secs(3),
        stop_grace: Duration::from_secs(2),
        data_root: data_root.to_path_buf(),
        local_storage: Some("1Gi".parse().unwrap()),
        ..AgentConfig::new("node-1")
    }
}

/// Unmounts what the test's volume providers mounted under `data_root` (each `local` volume is
/// a loop-mounted file system where sizes are enforced), so no test leaves a mount behind.
async fn unmount(data_root: &std::path::Path) {
    for provider in ["local-volumes", "extra"] {
        LocalVolumes::unmount_all(data_root.join(provider)).await.unwrap();
    }
}

type Running = (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), AgentError>>);

fn start(agent: Agent, drain: bool) -> Running {
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(agent.run(
        async move {
            let _ = rx.await;
        },
        drain,
    ));
    (tx, handle)
}

async fn stop((tx, handle): Running) {
    let _ = tx.send(());
    handle.await.unwrap().unwrap();
}

fn workload(name: &str, script: &str, volumes: Vec<Volume>) -> Object<Workload> {
    let mut w = Workload::command("main", &["/bin/sh", "-c", script]);
    w.restart_policy = RestartPolicy::Always;
    w.node_name = Some("node-1".into());
    w.volumes = volumes;
    Object::new(ObjectMeta::named(name), w)
}

fn claim_volume(name: &str, claim: &str) -> Volume {
    Volume { name: name.into(), source: VolumeSource::Claim { claim_name: claim.into() } }
}

/// The workload's status reason and message once the reason is `reason`.
async fn wait_reason(api: &Api<Workload>, name: &str, reason: &str) -> String {
    wait_until(&format!("{name} says {reason}"), LIMIT, async || {
        let w = api.get(name).await.ok()?;
        (w.status.reason == reason).then_some(w.status.message)
    })
    .await
}

/// Creates the claim `name` (100Mi, `class`).
async fn create_claim(store: &Arc<dyn Store>, name: &str, class: &str) -> Object<VolumeClaim> {
    let claims: Api<VolumeClaim> = Api::namespaced(store.clone(), "default");
    let spec = VolumeClaim {
        size: "100Mi".parse().unwrap(),
        access_mode: AccessMode::ReadWriteOnce,
        volume_class: class.into(),
        ..Default::default()
    };
    claims.create(&Object::new(ObjectMeta::named(name), spec)).await.unwrap()
}

/// Does what the volume binder does: a PV for the claim on `node`, with the reclaim finalizer,
/// then the claim bound to it. Returns the PV's name.
async fn bind(store: &Arc<dyn Store>, claim: &Object<VolumeClaim>, node: &str) -> String {
    let pvs: Api<PersistentVolume> = Api::all(store.clone());
    let name = volume_name_for_claim(&claim.metadata.uid);
    let mut meta = ObjectMeta::named(&name);
    meta.finalizers = vec![VOLUME_RECLAIM_FINALIZER.into()];
    let spec = PersistentVolume {
        capacity: claim.spec.size,
        access_modes: vec![claim.spec.access_mode],
        volume_class: claim.spec.volume_class.clone(),
        reclaim_policy: claim.spec.reclaim_policy,
        node_name: Some(node.into()),
        claim_ref: Some(ClaimReference {
            namespace: "default".into(),
            name: claim.metadata.name.clone(),
            uid: claim.metadata.uid.clone(),
        }),
    };
    let mut pv = pvs.create(&Object::new(meta, spec)).await.unwrap();
    pv.status.phase = VolumePhase::Bound;
    pvs.replace_status(&pv).await.unwrap();
    let claims: Api<VolumeClaim> = Api::namespaced(store.clone(), "default");
    let mut bound = claims.get(&claim.metadata.name).await.unwrap();
    bound.status.phase = ClaimPhase::Bound;
    bound.status.volume_name = Some(name.clone());
    claims.replace_status(&bound).await.unwrap();
    name
}

/// Counts its starts in `count` on its volume, so each start reads what the last one wrote.
const COUNTER: &str =
    "n=$(cat \"$ORCH_VOLUME_DATA/count\" 2>/dev/null || echo 0); echo $((n+1)) > \"$ORCH_VOLUME_DATA/count\"; sleep 60";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_until_bound_and_its_data_outlives_the_instance_and_the_agent() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    let agent = start(Agent::new(config(&data_root), store.clone(), runtime.clone()), true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&workload("db", COUNTER, vec![claim_volume("data", "db-data")])).await.unwrap();

    // No claim yet, then a claim not bound: it waits, saying which and why, and never runs.
    let message = wait_reason(&api, "db", "WaitingForVolume").await;
    assert_eq!(message, "spec.volumes[0] (\"data\"): claim \"db-data\" does not exist in namespace \"default\"");
    let claim = create_claim(&store, "db-data", "local").await;
    let message = wait_until("the pending claim named", LIMIT, async || {
        let w = api.get("db").await.ok()?;
        w.status.message.contains("is Pending").then_some(w.status.message)
    })
    .await;
    assert_eq!(message, "spec.volumes[0] (\"data\"): claim \"db-data\" is Pending, not bound to a volume yet");
    let w = api.get("db").await.unwrap();
    assert_eq!(w.status.phase, Phase::Pending);
    assert!(runtime.list().await.unwrap().is_empty(), "it never runs without its data");

    // Bound to a volume of this node: it starts, on the volume's directory.
    let pv = bind(&store, &claim, "node-1").await;
    let count = data_root.join("local-volumes").join(&pv).join("data").join("count");
    let read = || std::fs::read_to_string(&count).ok().map(|s| s.trim().to_string());
    wait_until("the first start counted on the volume", LIMIT, async || (read()? == "1").then_some(())).await;
    // The agent enforces its sizes where loop mounts work (required in CI): the volume's
    // directory is then a file system of its own.
    if std::env::var("ORCH_REQUIRE_LOOP").as_deref() == Ok("1") {
        let dir = std::fs::canonicalize(count.parent().unwrap()).unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            info.lines().any(|l| l.split(' ').nth(4) == Some(dir.to_string_lossy().as_ref())),
            "{} is a mount point",
            dir.display()
        );
    }
    let running = wait_until("db running", LIMIT, async || {
        let w = api.get("db").await.ok()?;
        (w.status.phase == Phase::Running).then_some(w)
    })
    .await;
    assert_eq!((running.status.reason.as_str(), running.status.message.as_str()), ("", ""), "the wait is over");

    // The agent restarts the instance: the new one reads what the last one wrote.
    let handles = runtime.list().await.unwrap();
    kill(Pid::from_raw(handles[0].data["pid"].as_i64().unwrap() as i32), Signal::SIGKILL).unwrap();
    wait_until("the restart counted on the volume", LIMIT, async || (read()? == "2").then_some(())).await;

    // The agent itself restarts (draining: its instance stops) on the same data root: the
    // volume is found again, with its data.
    stop(agent).await;
    assert!(runtime.list().await.unwrap().is_empty());
    let agent = start(Agent::new(config(&data_root), store.clone(), runtime.clone()), true);
    wait_until("the start after the agent's restart counted", LIMIT, async || (read()? == "3").then_some(())).await;

    // Deleting the volume while the workload uses it: the reclaim waits, data and finalizer kept.
    let pvs: Api<PersistentVolume> = Api::all(store.clone());
    pvs.delete(&pv, &DeleteOptions::default()).await.unwrap();
    let deleting = pvs.get(&pv).await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    // Several reclaim rounds (one per resync, 200 ms) go by.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = pvs.get(&pv).await.unwrap();
    assert_eq!(still.metadata.finalizers, vec![VOLUME_RECLAIM_FINALIZER.to_string()], "in use: not reclaimed");
    assert_eq!(read().as_deref(), Some("3"), "in use: the data stays");

    // The workload goes: its volume is unpublished, then reclaimed: data deleted, PV gone.
    api.delete("db", &DeleteOptions::default()).await.unwrap();
    wait_until("the volume reclaimed", LIMIT, async || pvs.get_opt(&pv).await.unwrap().is_none().then_some(())).await;
    assert!(!data_root.join("local-volumes").join(&pv).exists(), "the volume's data is deleted");
    assert!(runtime.list().await.unwrap().is_empty());
    stop(agent).await;
    unmount(&data_root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaim_left_pending_is_finished_by_the_restarted_agent() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    // The volume exists at the provider, as an earlier run of the agent left it.
    let claim = create_claim(&store, "old-data", "local").await;
    let pv = bind(&store, &claim, "node-1").await;
    let local = LocalVolumes::open(data_root.join("local-volumes"), "node-1", "1Gi".parse().unwrap()).await.unwrap();
    let create = orch_core::storage::CreateVolume {
        name: pv.clone(),
        capacity: claim.spec.size,
        access_mode: AccessMode::ReadWriteOnce,
        node: Some("node-1".into()),
    };
    orch_core::VolumeProvider::create(&local, &create).await.unwrap();
    drop(local);
    assert!(data_root.join("local-volumes").join(&pv).join("data").is_dir());
    // Deleted while no agent runs.
    let pvs: Api<PersistentVolume> = Api::all(store.clone());
    pvs.delete(&pv, &DeleteOptions::default()).await.unwrap();
    assert!(pvs.get_opt(&pv).await.unwrap().is_some(), "held by the reclaim finalizer");

    let agent = start(Agent::new(config(&data_root), store.clone(), runtime.clone()), true);
    wait_until("the volume reclaimed", LIMIT, async || pvs.get_opt(&pv).await.unwrap().is_none().then_some(())).await;
    assert!(!data_root.join("local-volumes").join(&pv).exists(), "its data is deleted");
    stop(agent).await;
    unmount(&data_root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_being_deleted_keeps_its_data_while_another_finalizer_holds_it() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    let claim = create_claim(&store, "kept-data", "local").await;
    let pv = bind(&store, &claim, "node-1").await;
    let pvs: Api<PersistentVolume> = Api::all(store.clone());
    // Held as the binder holds a bound volume while its claim exists.
    const HELD: &str = "orch.dev/test-protection";
    pvs.retry_on_conflict(&pv, |o| {
        o.metadata.finalizers.push(HELD.into());
        Ok(())
    })
    .await
    .unwrap();
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&workload("db", COUNTER, vec![claim_volume("data", "kept-data")])).await.unwrap();
    let agent = start(Agent::new(config(&data_root), store.clone(), runtime.clone()), true);
    let count = data_root.join("local-volumes").join(&pv).join("data").join("count");
    wait_until("the workload wrote to its volume", LIMIT, async || count.exists().then_some(())).await;
    api.delete("db", &DeleteOptions::default()).await.unwrap();
    wait_until("the workload gone", LIMIT, async || api.get_opt("db").await.unwrap().is_none().then_some(())).await;

    pvs.delete(&pv, &DeleteOptions::default()).await.unwrap();
    // Several reclaim rounds (one per resync, 200 ms) go by: unused, but still held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = pvs.get(&pv).await.unwrap();
    assert!(held.metadata.finalizers.iter().any(|f| f == VOLUME_RECLAIM_FINALIZER), "not reclaimed while held");
    assert!(count.exists(), "the data stays while another finalizer holds the volume");

    pvs.retry_on_conflict(&pv, |o| {
        o.metadata.finalizers.retain(|f| f != HELD);
        Ok(())
    })
    .await
    .unwrap();
    wait_until("the volume reclaimed", LIMIT, async || pvs.get_opt(&pv).await.unwrap().is_none().then_some(())).await;
    assert!(!data_root.join("local-volumes").join(&pv).exists(), "its data is deleted");
    stop(agent).await;
    unmount(&data_root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_of_another_node_or_class_are_refused_and_the_node_lists_its_storage() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    let extra = LocalVolumes::open(data_root.join("extra"), "node-1", "5Gi".parse().unwrap()).await.unwrap();
    let agent =
        Agent::new(config(&data_root), store.clone(), runtime.clone()).with_volume_provider("extra", Arc::new(extra));
    let agent = start(agent, true);

    // The node lists each class it provides, with its room and access modes.
    let nodes: Api<Node> = Api::all(store.clone());
    let node = wait_until("node registered", LIMIT, async || nodes.get_opt("node-1").await.unwrap()).await;
    let storage = |class: &str, size: &str| NodeStorage {
        volume_class: class.into(),
        capacity: size.parse::<Quantity>().unwrap(),
        access_modes: vec![AccessMode::ReadWriteOnce],
    };
    assert_eq!(node.status.storage, vec![storage("extra", "5Gi"), storage("local", "1Gi")]);

    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let elsewhere = create_claim(&store, "far-data", "local").await;
    let far = bind(&store, &elsewhere, "node-2").await;
    api.create(&workload("far", COUNTER, vec![claim_volume("data", "far-data")])).await.unwrap();
    let message = wait_reason(&api, "far", "VolumeNodeConflict").await;
    assert_eq!(
        message,
        format!(
            "spec.volumes[0] (\"data\"): claim \"far-data\" is bound to volume {far:?}, which lives on node \
             \"node-2\", not on this node \"node-1\""
        )
    );

    let fast = create_claim(&store, "fast-data", "fast").await;
    let fast_pv = bind(&store, &fast, "node-1").await;
    api.create(&workload("fast", COUNTER, vec![claim_volume("data", "fast-data")])).await.unwrap();
    let message = wait_reason(&api, "fast", "VolumeClassUnavailable").await;
    assert_eq!(
        message,
        format!(
            "spec.volumes[0] (\"data\"): claim \"fast-data\" is bound to volume {fast_pv:?} of class \"fast\", which \
             node \"node-1\" does not provide (it provides: extra, local)"
        )
    );
    // Bound away from its volume's node, it can never run here: refused for good. A class the
    // node lacks may come with a new provider: that one waits, saying why.
    let far = api.get("far").await.unwrap();
    assert_eq!(far.status.phase, Phase::Failed);
    let fast = api.get("fast").await.unwrap();
    assert_eq!(fast.status.phase, Phase::Pending);
    let waiting = format!("{:?}", fast.status.container_statuses[0].state);
    assert!(waiting.contains(&fast.status.reason), "the container says why too: {waiting}");
    assert!(runtime.list().await.unwrap().is_empty(), "nothing runs without its data");
    // Said once each, as events.
    let events: Api<Event> = Api::namespaced(store.clone(), "default");
    wait_until("the refusals as events", LIMIT, async || {
        let reasons: Vec<String> =
            events.list(&ListParams::default()).await.unwrap().items.into_iter().map(|e| e.spec.reason).collect();
        (reasons.iter().any(|r| r == "VolumeNodeConflict") && reasons.iter().any(|r| r == "VolumeClassUnavailable"))
            .then_some(())
    })
    .await;
    stop(agent).await;
    unmount(&data_root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_dir_over_its_size_limit_is_evicted_and_one_within_it_runs_on() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    let agent = start(Agent::new(config(&data_root), store.clone(), runtime.clone()), true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let sized = |limit: &str| {
        vec![Volume {
            name: "scratch".into(),
            source: VolumeSource::EmptyDir { size_limit: Some(limit.parse().unwrap()) },
        }]
    };
    // 200 KiB, past its 64Ki limit, moved in at once (the usage the agent sees is exact).
    let greedy = "head -c 204800 /dev/zero > \"$ORCH_VOLUME_SCRATCH/../big\" && mv \"$ORCH_VOLUME_SCRATCH/../big\" \
                  \"$ORCH_VOLUME_SCRATCH/big\"; sleep 60";
    api.create(&workload("greedy", greedy, sized("64Ki"))).await.unwrap();
    let modest = "head -c 1000 /dev/zero > \"$ORCH_VOLUME_SCRATCH/small\"; sleep 60";
    api.create(&workload("modest", modest, sized("64Ki"))).await.unwrap();

    let evicted = wait_until("greedy evicted", LIMIT, async || {
        let w = api.get("greedy").await.ok()?;
        (w.status.phase == Phase::Failed).then_some(w)
    })
    .await;
    assert_eq!(evicted.status.reason, "Evicted");
    assert_eq!(evicted.status.message, "emptyDir \"scratch\" uses 200Ki, over its sizeLimit 64Ki");
    let events: Api<Event> = Api::namespaced(store.clone(), "default");
    wait_until("the eviction as an event", LIMIT, async || {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        list.iter()
            .any(|e| {
                e.spec.reason == "Evicted"
                    && e.spec.message == evicted.status.message
                    && e.spec.involved_object.name == "greedy"
            })
            .then_some(())
    })
    .await;
    // Its instance is stopped and gone, its emptyDir removed; it is not started again.
    wait_until("greedy's instance removed", LIMIT, async || {
        let ids: Vec<String> = runtime.list().await.unwrap().into_iter().map(|h| h.id).collect();
        (!ids.iter().any(|id| id.contains(".greedy."))).then_some(())
    })
    .await;
    let scratch = data_root.join("volumes").join("default").join("greedy");
    wait_until("greedy's emptyDir removed", LIMIT, async || (!scratch.exists()).then_some(())).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = api.get("greedy").await.unwrap();
    assert_eq!((later.status.phase, later.status.reason.as_str()), (Phase::Failed, "Evicted"), "evicted for good");
    assert!(!runtime.list().await.unwrap().iter().any(|h| h.id.contains(".greedy.")), "never started again");

    let modest = api.get("modest").await.unwrap();
    assert_eq!(modest.status.phase, Phase::Running, "within its limit it runs on");
    stop(agent).await;
    unmount(&data_root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_runs_inside_its_volume_when_asked_and_other_expansions_are_refused() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    let agent = start(Agent::new(config(&data_root), store.clone(), runtime.clone()), true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let claim = create_claim(&store, "home", "local").await;
    let pv = bind(&store, &claim, "node-1").await;
    let mut w = workload("inside", "pwd > where && sleep 60", vec![claim_volume("data", "home")]);
    w.spec.containers[0].working_dir = Some("$(ORCH_VOLUME_DATA)".into());
    api.create(&w).await.unwrap();
    let volume_dir = data_root.join("local-volumes").join(&pv).join("data");
    let where_ = volume_dir.join("where");
    // The shell makes the file before it writes the line: wait for the whole line.
    let wrote = wait_until("the program wrote into its working directory", LIMIT, async || {
        std::fs::read_to_string(&where_).ok().filter(|s| s.ends_with('\n'))
    })
    .await;
    assert_eq!(std::path::Path::new(wrote.trim()).canonicalize().unwrap(), volume_dir.canonicalize().unwrap());

    // Refused when written, naming the field.
    for (dir, says) in [
        (
            "$(ORCH_VOLUME_OTHER)",
            "$(ORCH_VOLUME_OTHER) names none of the workload's volumes (it has: ORCH_VOLUME_DATA)",
        ),
        ("$(HOME)/x", "only the whole of $(ORCH_VOLUME_<NAME>) is expanded"),
    ] {
        let mut bad = workload("bad", "true", vec![claim_volume("data", "home")]);
        bad.spec.containers[0].working_dir = Some(dir.into());
        let e = api.create(&bad).await.unwrap_err().to_string();
        assert!(e.contains("spec.containers[0].workingDir") && e.contains(says), "{dir}: {e}");
    }
    stop(agent).await;
    unmount(&data_root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_workload_starts_as_soon_as_its_claim_is_bound_not_on_a_timer() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    // Timers far beyond the test's limit: only the claim and volume watches can wake it.
    let slow = AgentConfig {
        resync_interval: Duration::from_secs(600),
        backoff_base: Duration::from_secs(600),
        ..config(&data_root)
    };
    let agent = start(Agent::new(slow, store.clone(), runtime.clone()), true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let claim = create_claim(&store, "db-data", "local").await;
    api.create(&workload("db", COUNTER, vec![claim_volume("data", "db-data")])).await.unwrap();
    wait_reason(&api, "db", "WaitingForVolume").await;
    bind(&store, &claim, "node-1").await;
    wait_until("db running", LIMIT, async || (api.get("db").await.ok()?.status.phase == Phase::Running).then_some(()))
        .await;
    stop(agent).await;
    unmount(&data_root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_shared_cache_reclaims_on_its_timer() {
    use orch_core::{Cache, CacheConfig};
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    let shared: Cache<Workload> = Cache::spawn(store.clone(), CacheConfig::default());
    let agent = Agent::new(config(&data_root), store.clone(), runtime.clone()).with_shared_cache(shared);
    let agent = start(agent, true);
    // A workload writes to its claim's volume, then goes; then the volume is deleted.
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let claim = create_claim(&store, "db-data", "local").await;
    let pv = bind(&store, &claim, "node-1").await;
    api.create(&workload("db", COUNTER, vec![claim_volume("data", "db-data")])).await.unwrap();
    let count = data_root.join("local-volumes").join(&pv).join("data").join("count");
    wait_until("the program wrote to its volume", LIMIT, async || count.is_file().then_some(())).await;
    api.delete("db", &DeleteOptions::default()).await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(store.clone());
    pvs.delete(&pv, &DeleteOptions::default()).await.unwrap();
    wait_until("the volume reclaimed", LIMIT, async || pvs.get_opt(&pv).await.unwrap().is_none().then_some(())).await;
    assert!(!data_root.join("local-volumes").join(&pv).exists(), "its data is deleted");
    stop(agent).await;
    unmount(&data_root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_deleted_while_the_agent_is_down_is_unpublished_by_the_next_agent() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    let agent = start(Agent::new(config(&data_root), store.clone(), runtime.clone()), true);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let claim = create_claim(&store, "db-data", "local").await;
    let pv = bind(&store, &claim, "node-1").await;
    let db = api.create(&workload("db", COUNTER, vec![claim_volume("data", "db-data")])).await.unwrap();
    let volume = data_root.join("local-volumes").join(&pv);
    let consumers = || -> Vec<String> {
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(volume.join("volume.json")).unwrap()).unwrap();
        serde_json::from_value(record["consumers"].clone()).unwrap()
    };
    wait_until("the program wrote to its volume", LIMIT, async || volume.join("data/count").is_file().then_some(()))
        .await;
    assert_eq!(consumers(), vec![db.metadata.uid.clone()], "published for the workload's uid");
    stop(agent).await;
    api.delete("db", &DeleteOptions::default()).await.unwrap();
    assert!(api.get_opt("db").await.unwrap().is_none(), "gone while no agent runs");

    let agent = start(Agent::new(config(&data_root), store.clone(), runtime.clone()), true);
    wait_until("the volume unpublished", LIMIT, async || consumers().is_empty().then_some(())).await;
    assert!(volume.join("data/count").is_file(), "unpublishing keeps the data");
    stop(agent).await;
    unmount(&data_root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_too_large_for_the_node_waits_with_the_providers_reason() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
    let data_root = root();
    let agent = start(Agent::new(config(&data_root), store.clone(), runtime.clone()), true);
    let claims: Api<VolumeClaim> = Api::namespaced(store.clone(), "default");
    let spec = VolumeClaim { size: "2Gi".parse().unwrap(), volume_class: "local".into(), ..Default::default() };
    let claim = claims.create(&Object::new(ObjectMeta::named("huge"), spec)).await.unwrap();
    let pv = bind(&store, &claim, "node-1").await;
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&workload("db", COUNTER, vec![claim_volume("data", "huge")])).await.unwrap();
    let message = wait_reason(&api, "db", "VolumeUnavailable").await;
    assert_eq!(
        message,
        format!(
            "spec.volumes[0] (\"data\"): claim \"huge\" (volume {pv:?}): creating its volume: volume {pv:?} needs 2Gi \
             but node \"node-1\" (local capacity 1Gi) has only 1Gi left"
        )
    );
    assert_eq!(api.get("db").await.unwrap().status.phase, Phase::Pending);
    assert!(runtime.list().await.unwrap().is_empty(), "nothing runs without its data");
    assert!(!data_root.join("local-volumes").join(&pv).exists(), "nothing is left of the refused volume");
    stop(agent).await;
    unmount(&data_root).await;
}
