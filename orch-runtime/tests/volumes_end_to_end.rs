//! Volumes end to end with the control plane's parts: the scheduler with volume binding places a
//! workload with a pending claim on the node that has room for it, the volume binder provides
//! the volume there, the node's agent creates and publishes it, and once the claim is deleted
//! (policy `Delete`) the binder deletes the volume and the agent reclaims its data.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use orch_controllers::VolumeBinder;
use orch_core::kinds::{PersistentVolume, Phase, RestartPolicy, Volume, VolumeClaim, VolumeSource, Workload};
use orch_core::testkit::wait_until;
use orch_core::{Api, DeleteOptions, Manager, Object, ObjectMeta, Runtime, Store};
use orch_runtime::{Agent, AgentConfig, ProcessRuntime};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::MemoryStore;

const LIMIT: Duration = Duration::from_secs(30);

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn root() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "orch-volumes-e2e-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_provided_on_the_node_with_room_and_its_data_reclaimed_when_deleted() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut manager = Manager::new(store.clone());
    manager.add(SchedulerService::with_volumes(Profile::default_profile(), manager.cache(), manager.cache()));
    manager.add(VolumeBinder::builder());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let plane = tokio::spawn(manager.run(until_stopped(stopped.clone())));

    // node-1 has room for the claim's 100Mi of local storage, node-2 only 10Mi.
    let mut agents = Vec::new();
    let mut roots = Vec::new();
    for (name, room) in [("node-1", "1Gi"), ("node-2", "10Mi")] {
        let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root()).unwrap());
        let config = AgentConfig {
            resync_interval: Duration::from_millis(200),
            backoff_base: Duration::from_millis(200),
            stop_grace: Duration::from_secs(2),
            data_root: root(),
            local_storage: Some(room.parse().unwrap()),
            ..AgentConfig::new(name)
        };
        roots.push(config.data_root.clone());
        let agent = Agent::new(config, store.clone(), runtime);
        agents.push(tokio::spawn(agent.run(until_stopped(stopped.clone()), true)));
    }

    let claims: Api<VolumeClaim> = Api::namespaced(store.clone(), "default");
    let spec = VolumeClaim { size: "100Mi".parse().unwrap(), volume_class: "local".into(), ..Default::default() };
    let claim = claims.create(&Object::new(ObjectMeta::named("db-data"), spec)).await.unwrap();
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let mut w = Workload::command("main", &["/bin/sh", "-c", "echo kept > \"$ORCH_VOLUME_DATA/file\"; sleep 60"]);
    w.restart_policy = RestartPolicy::Always;
    w.volumes = vec![Volume { name: "data".into(), source: VolumeSource::Claim { claim_name: "db-data".into() } }];
    api.create(&Object::new(ObjectMeta::named("db"), w)).await.unwrap();

    let running = wait_until("db running", LIMIT, async || {
        let w = api.get("db").await.ok()?;
        (w.status.phase == Phase::Running).then_some(w)
    })
    .await;
    assert_eq!(running.spec.node_name.as_deref(), Some("node-1"), "placed where the claim fits");
    let pv = orch_core::kinds::volume_name_for_claim(&claim.metadata.uid);
    let data = roots[0].join("local-volumes").join(&pv);
    let file = data.join("data").join("file");
    wait_until("the program wrote to its volume on node-1", LIMIT, async || file.is_file().then_some(())).await;

    // The claim goes with policy Delete: once its workload is gone, the binder deletes the
    // volume and node-1's agent deletes its data.
    claims.delete("db-data", &DeleteOptions::default()).await.unwrap();
    api.delete("db", &DeleteOptions::default()).await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(store.clone());
    wait_until("the volume reclaimed", LIMIT, async || pvs.get_opt(&pv).await.unwrap().is_none().then_some(())).await;
    assert!(!data.exists(), "its data is deleted on node-1");
    wait_until("the claim gone", LIMIT, async || claims.get_opt("db-data").await.unwrap().is_none().then_some(()))
        .await;

    let _ = stop.send(true);
    for a in agents {
        a.await.unwrap().unwrap();
    }
    for root in &roots {
        // Each `local` volume is a loop-mounted file system where sizes are enforced.
        orch_runtime::LocalVolumes::unmount_all(root.join("local-volumes")).await.unwrap();
    }
    plane.await.unwrap().unwrap();
}
