//! The agent on the Docker runtime with `DockerVolumes` as its `docker` volume class, on the real
//! engine: a workload's claim volume, bind-mounted at its `volumeMounts` path, keeps its data
//! across a container killed behind the agent's back and across an agent restart; once the
//! workload is gone the volume is reclaimed (the Docker volume removed). Skipped with a note where
//! no engine answers, failed instead with `ORCH_REQUIRE_DOCKER=1` (see `docker_support`).

#![cfg(feature = "docker")]

mod docker_support;

use std::sync::Arc;
use std::time::Duration;

use docker_support::{Scope, skip};
use futures::StreamExt;
use orch_core::kinds::{
    AccessMode, ClaimPhase, ClaimReference, PersistentVolume, Phase, RestartPolicy, VOLUME_RECLAIM_FINALIZER, Volume,
    VolumeClaim, VolumeMount, VolumePhase, VolumeSource, Workload, volume_name_for_claim,
};
use orch_core::runtime::LogOptions;
use orch_core::testkit::wait_until;
use orch_core::{Api, DeleteOptions, Object, ObjectMeta, Runtime, Store};
use orch_runtime::{Agent, AgentConfig, AgentError, DockerRuntime, DockerVolumes};
use orch_store::MemoryStore;
use tokio::sync::oneshot;

/// How long a test waits for what it expects (containers on a loaded machine).
const LIMIT: Duration = Duration::from_secs(30);

type Running = (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), AgentError>>);

/// An agent for the scope's node on a fresh runtime, with `DockerVolumes` (state in `state`) as
/// its `docker` class.
async fn start(scope: &Scope, store: &Arc<dyn Store>, data_root: &std::path::Path) -> (Arc<dyn Runtime>, Running) {
    let runtime = DockerRuntime::connect(scope.config()).await.unwrap();
    let volumes =
        DockerVolumes::open(runtime.clone(), data_root.join("docker-volumes"), "1Gi".parse().unwrap()).await.unwrap();
    let config = AgentConfig {
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        resync_interval: Duration::from_millis(200),
        renew_interval: Duration::from_millis(500),
        lease_ttl: Duration::from_secs(5),
        stop_grace: Duration::from_secs(2),
        data_root: data_root.to_path_buf(),
        local_storage: Some("1Gi".parse().unwrap()),
        ..AgentConfig::new(&scope.node)
    };
    let runtime: Arc<dyn Runtime> = Arc::new(runtime);
    let agent = Agent::new(config, store.clone(), runtime.clone()).with_volume_provider("docker", Arc::new(volumes));
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(agent.run(
        async move {
            let _ = rx.await;
        },
        true,
    ));
    (runtime, (tx, handle))
}

async fn stop((tx, handle): Running) {
    let _ = tx.send(());
    handle.await.unwrap().unwrap();
}

/// The lines the newest instance of workload `db` printed.
async fn newest_logs(runtime: &Arc<dyn Runtime>) -> Vec<String> {
    let Ok(instances) = orch_runtime::instances_of(&**runtime, "default", "db").await else { return Vec::new() };
    let Some((_, _, handle)) = instances.last() else { return Vec::new() };
    match runtime.logs(handle, LogOptions::default()).await {
        Ok(stream) => stream.map(|l| l.line).collect().await,
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_volume_keeps_its_data_across_container_and_agent_restarts_and_is_reclaimed() {
    if skip("a_docker_volume_keeps_its_data_across_container_and_agent_restarts_and_is_reclaimed") {
        return;
    }
    let scope = Scope::new("agent-volumes");
    let node = scope.node.clone();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let data_root = std::env::temp_dir().join(format!("orch-docker-agent-volumes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_root);
    let (runtime, agent) = start(&scope, &store, &data_root).await;

    // The claim, bound by hand (as the binder does) to a `docker` volume of this node.
    let claims: Api<VolumeClaim> = Api::namespaced(store.clone(), "default");
    let spec = VolumeClaim {
        size: "64Mi".parse().unwrap(),
        access_mode: AccessMode::ReadWriteOnce,
        volume_class: "docker".into(),
        ..Default::default()
    };
    let claim = claims.create(&Object::new(ObjectMeta::named("db-data"), spec)).await.unwrap();
    let pv_name = volume_name_for_claim(&claim.metadata.uid);
    let pvs: Api<PersistentVolume> = Api::all(store.clone());
    let mut meta = ObjectMeta::named(&pv_name);
    meta.finalizers = vec![VOLUME_RECLAIM_FINALIZER.into()];
    let pv = PersistentVolume {
        capacity: claim.spec.size,
        access_modes: vec![AccessMode::ReadWriteOnce],
        volume_class: "docker".into(),
        node_name: Some(node.clone()),
        claim_ref: Some(ClaimReference {
            namespace: "default".into(),
            name: "db-data".into(),
            uid: claim.metadata.uid.clone(),
        }),
        ..Default::default()
    };
    let mut pv = pvs.create(&Object::new(meta, pv)).await.unwrap();
    pv.status.phase = VolumePhase::Bound;
    pvs.replace_status(&pv).await.unwrap();
    let mut bound = claim.clone();
    bound.status.phase = ClaimPhase::Bound;
    bound.status.volume_name = Some(pv_name.clone());
    claims.replace_status(&bound).await.unwrap();

    // The "database" counts its starts in /data, its claim's volume.
    let script = "n=$(( $(cat /data/count 2>/dev/null || echo 0) + 1 )); echo $n > /data/count; echo \"count $n\"; \
                  exec sleep 600";
    let mut w = Workload::command("main", &["/bin/sh", "-c", script]);
    w.containers[0].image = Some(scope.image.clone());
    w.containers[0].volume_mounts =
        vec![VolumeMount { name: "data".into(), mount_path: "/data".into(), read_only: false }];
    w.volumes = vec![Volume { name: "data".into(), source: VolumeSource::Claim { claim_name: "db-data".into() } }];
    w.restart_policy = RestartPolicy::Always;
    w.node_name = Some(node.clone());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&Object::new(ObjectMeta::named("db"), w)).await.unwrap();
    let counted = async |runtime: &Arc<dyn Runtime>, n: u32| {
        let want = format!("count {n}");
        wait_until(&format!("the container counted {n}"), LIMIT, async || {
            newest_logs(runtime).await.contains(&want).then_some(())
        })
        .await;
    };
    counted(&runtime, 1).await;
    wait_until("db running", LIMIT, async || (api.get("db").await.ok()?.status.phase == Phase::Running).then_some(()))
        .await;

    // Killed behind the agent's back: the next container reads what the last one wrote.
    let handles = runtime.list().await.unwrap();
    let container = handles[0].data["container"].as_str().unwrap().to_string();
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let sigkill = bollard::query_parameters::KillContainerOptionsBuilder::default().signal("SIGKILL").build();
    docker.kill_container(&container, Some(sigkill)).await.unwrap();
    counted(&runtime, 2).await;

    // The agent restarts (draining: its container stops) with a new runtime and provider.
    stop(agent).await;
    let (runtime, agent) = start(&scope, &store, &data_root).await;
    counted(&runtime, 3).await;

    // The workload goes, then the volume: the agent unpublishes and reclaims it.
    api.delete("db", &DeleteOptions::default()).await.unwrap();
    pvs.delete(&pv_name, &DeleteOptions::default()).await.unwrap();
    wait_until("the volume reclaimed", LIMIT, async || pvs.get_opt(&pv_name).await.unwrap().is_none().then_some(()))
        .await;
    let left = docker
        .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
        .await
        .unwrap()
        .volumes
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.name.contains(&pv_name))
        .count();
    assert_eq!(left, 0, "the Docker volume is removed");
    stop(agent).await;
    let _ = std::fs::remove_dir_all(&data_root);
}
