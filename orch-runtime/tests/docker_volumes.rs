//! `DockerVolumes` on the real engine: the volume provider suite, labels and what a restarted
//! agent finds, capacity accounting, Docker volumes orch did not make, and data that one
//! container writes into a published volume and the next one reads. Skipped with a note where no
//! engine answers, failed instead with `ORCH_REQUIRE_DOCKER=1` (see `docker_support`).

#![cfg(feature = "docker")]

mod docker_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use docker_support::{Scope, skip};
use futures::StreamExt;
use orch_core::kinds::{Container, VolumeMount};
use orch_core::runtime::{HostVolume, InstanceSpec, LogOptions, Runtime};
use orch_core::testkit::volume::{request, suite};
use orch_core::{Quantity, VolumeError, VolumeProvider};
use orch_runtime::{DockerRuntime, DockerVolumes};

/// A fresh, empty state directory (removed by the test that made it, when it passes).
fn fresh_state(test: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("orch-docker-volumes-{test}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn q(s: &str) -> Quantity {
    s.parse().unwrap()
}

async fn open(scope: &Scope, state: &Path, capacity: &str) -> DockerVolumes {
    let runtime = DockerRuntime::new(scope.config()).unwrap();
    DockerVolumes::open(runtime, state, q(capacity)).await.unwrap()
}

fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_defaults().unwrap()
}

/// The engine's view of a Docker volume, `None` when it has none of that name.
async fn inspect(name: &str) -> Option<bollard::models::Volume> {
    match docker().inspect_volume(name).await {
        Ok(v) => Some(v),
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => None,
        Err(e) => panic!("inspect {name}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_volumes_pass_the_volume_provider_suite() {
    if skip("docker_volumes_pass_the_volume_provider_suite") {
        return;
    }
    // One node for every case (the suite names it once); each case's provider starts with a
    // state of its own, and the scope removes the node's Docker volumes at the end.
    let scope = Scope::new("volume-suite");
    let config = scope.config();
    let states = Arc::new(std::sync::Mutex::new(Vec::new()));
    let made = states.clone();
    suite(
        move || {
            let state = fresh_state("suite");
            made.lock().unwrap().push(state.clone());
            let runtime = DockerRuntime::new(config.clone()).unwrap();
            async move { Arc::new(DockerVolumes::open(runtime, state, q("1Gi")).await.unwrap()) as Arc<dyn VolumeProvider> }
        },
        &scope.node,
    )
    .await;
    for state in states.lock().unwrap().iter() {
        let _ = std::fs::remove_dir_all(state);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_labelled_docker_volumes_that_a_reopened_provider_finds_with_their_consumers() {
    if skip("volumes_are_labelled_docker_volumes_that_a_reopened_provider_finds_with_their_consumers") {
        return;
    }
    let scope = Scope::new("volume-reopen");
    let state = fresh_state("reopen");
    let p = open(&scope, &state, "10Gi").await;
    let caps = p.capabilities();
    assert_eq!(
        (caps.access_modes, caps.enforces_size, caps.node_local, caps.capacity),
        (vec![orch_core::kinds::AccessMode::ReadWriteOnce], false, true, Some(q("10Gi")))
    );
    let made = p.create(&request("db", "3Gi", &scope.node)).await.unwrap();
    assert_eq!(made.node.as_deref(), Some(scope.node.as_str()));
    let name = p.docker_name("db");
    assert_eq!(name, format!("orch_{}_db", scope.node));
    let volume = inspect(&name).await.expect("the Docker volume exists");
    assert_eq!(volume.driver, "local");
    let labels: Vec<(&str, &str)> = {
        let mut l: Vec<_> = volume.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        l.sort();
        l
    };
    assert_eq!(
        labels,
        [
            ("orch.dev/access-mode", "ReadWriteOnce"),
            ("orch.dev/capacity", "3221225472"),
            ("orch.dev/managed-by", "orch"),
            ("orch.dev/node", scope.node.as_str()),
            ("orch.dev/provided-volume", "db"),
        ]
    );
    let path = p.publish("db", &scope.node, "db-0").await.unwrap().path;
    assert_eq!(path, PathBuf::from(&volume.mountpoint), "publish answers the volume's mount point");
    std::fs::write(path.join("counter"), "7").unwrap();
    drop(p);

    let p = open(&scope, &state, "10Gi").await;
    assert_eq!(p.available().await.unwrap(), q("7Gi"), "the volume's size is still accounted");
    match p.delete("db").await {
        Err(VolumeError::InUse { consumers, .. }) => assert_eq!(consumers, ["db-0"]),
        other => panic!("the consumer must survive the restart: {other:?}"),
    }
    let again = p.publish("db", &scope.node, "db-0").await.unwrap().path;
    assert_eq!(std::fs::read_to_string(again.join("counter")).unwrap(), "7");
    // The same parameters answer the same volume; others are refused, naming what it has.
    p.create(&request("db", "3Gi", &scope.node)).await.unwrap();
    let err = p.create(&request("db", "4Gi", &scope.node)).await.unwrap_err();
    assert_eq!(err.to_string(), "volume \"db\": exists with capacity 3Gi and ReadWriteOnce, not 4Gi and ReadWriteOnce");

    // Another node on the same engine has volumes of its own: none of this node's.
    let other = Scope::new("volume-reopen-other");
    let other_volumes = open(&other, &fresh_state("reopen-other"), "10Gi").await;
    assert_eq!(other_volumes.available().await.unwrap(), q("10Gi"));
    assert!(matches!(other_volumes.publish("db", &other.node, "c").await, Err(VolumeError::NotFound { .. })));

    p.unpublish("db", &scope.node, "db-0").await.unwrap();
    p.delete("db").await.unwrap();
    assert!(inspect(&name).await.is_none(), "delete removes the Docker volume");
    assert!(!path.exists(), "and its data");
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_accounted_and_a_volume_that_does_not_fit_is_refused_with_what_is_left() {
    if skip("capacity_is_accounted_and_a_volume_that_does_not_fit_is_refused_with_what_is_left") {
        return;
    }
    let scope = Scope::new("volume-capacity");
    let state = fresh_state("capacity");
    let p = open(&scope, &state, "10Gi").await;
    p.create(&request("a", "6Gi", &scope.node)).await.unwrap();
    assert_eq!(p.available().await.unwrap(), q("4Gi"));
    let err = p.create(&request("b", "5Gi", &scope.node)).await.unwrap_err();
    match &err {
        VolumeError::InsufficientCapacity { volume, requested, available, .. } => {
            assert_eq!((volume.as_str(), *requested, *available), ("b", q("5Gi"), q("4Gi")));
        }
        other => panic!("expected InsufficientCapacity, got {other}"),
    }
    assert_eq!(
        err.to_string(),
        format!("volume \"b\" needs 5Gi but node \"{}\" (Docker volume capacity 10Gi) has only 4Gi left", scope.node)
    );
    assert!(inspect(&p.docker_name("b")).await.is_none(), "a refused volume leaves nothing behind");
    // A repeated create takes no more room; exactly what is left fits; a delete gives it back.
    p.create(&request("a", "6Gi", &scope.node)).await.unwrap();
    p.create(&request("c", "4Gi", &scope.node)).await.unwrap();
    assert_eq!(p.available().await.unwrap(), Quantity::ZERO);
    p.delete("a").await.unwrap();
    assert_eq!(p.available().await.unwrap(), q("6Gi"));
    p.create(&request("b", "5Gi", &scope.node)).await.unwrap();
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_overcommit() {
    if skip("concurrent_creates_never_overcommit") {
        return;
    }
    let scope = Scope::new("volume-concurrent");
    let state = fresh_state("concurrent");
    let p = Arc::new(open(&scope, &state, "5Gi").await);
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (p, node) = (p.clone(), scope.node.clone());
            tokio::spawn(async move { p.create(&request(&format!("v{i}"), "1Gi", &node)).await })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => created += 1,
            Err(VolumeError::InsufficientCapacity { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(created, 5, "exactly as many 1Gi volumes as fit in 5Gi");
    assert_eq!(p.available().await.unwrap(), Quantity::ZERO);
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_is_refused_naming_where_the_volume_lives() {
    if skip("another_node_is_refused_naming_where_the_volume_lives") {
        return;
    }
    let scope = Scope::new("volume-node");
    let state = fresh_state("node");
    let p = open(&scope, &state, "1Gi").await;
    let err = p.create(&request("a", "1Mi", "elsewhere")).await.unwrap_err();
    assert_eq!(err.to_string(), format!("volume \"a\": it lives on node \"{}\", not \"elsewhere\"", scope.node));
    assert!(inspect(&p.docker_name("a")).await.is_none(), "a refused create leaves nothing behind");
    p.create(&request("a", "1Mi", &scope.node)).await.unwrap();
    let err = p.publish("a", "elsewhere", "c1").await.unwrap_err();
    assert_eq!(err.to_string(), format!("volume \"a\": it lives on node \"{}\", not \"elsewhere\"", scope.node));
    // Unpublishing on another node withdraws nothing: the publication on this node stays.
    p.publish("a", &scope.node, "c1").await.unwrap();
    p.unpublish("a", "elsewhere", "c1").await.unwrap();
    assert!(matches!(p.delete("a").await, Err(VolumeError::InUse { .. })));
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_volumes_orch_did_not_make_and_names_docker_cannot_hold_are_refused() {
    if skip("docker_volumes_orch_did_not_make_and_names_docker_cannot_hold_are_refused") {
        return;
    }
    let scope = Scope::new("volume-foreign");
    let state = fresh_state("foreign");
    let p = open(&scope, &state, "1Gi").await;
    // Someone else's volume under the name orch would use (labelled with the node only, so the
    // scope removes it).
    let name = p.docker_name("squat");
    let body = bollard::models::VolumeCreateRequest {
        name: Some(name.clone()),
        labels: Some(HashMap::from([("orch.dev/node".to_string(), scope.node.clone())])),
        ..Default::default()
    };
    docker().create_volume(body).await.unwrap();
    std::fs::write(PathBuf::from(inspect(&name).await.unwrap().mountpoint).join("theirs"), "x").unwrap();
    for (what, got) in [
        ("create", p.create(&request("squat", "1Mi", &scope.node)).await.map(|_| ())),
        ("publish", p.publish("squat", &scope.node, "c1").await.map(|_| ())),
        ("delete", p.delete("squat").await),
    ] {
        match got {
            Err(VolumeError::Refused { reason, .. }) => {
                assert!(reason.contains("orch did not make it"), "{what}: {reason}")
            }
            other => panic!("{what}: expected Refused, got {other:?}"),
        }
    }
    let kept = inspect(&name).await.expect("their volume is kept");
    assert!(!kept.labels.contains_key("orch.dev/provided-volume"), "and not relabelled");
    assert!(PathBuf::from(kept.mountpoint).join("theirs").exists(), "with their data");
    assert_eq!(p.available().await.unwrap(), q("1Gi"), "and not counted");

    // A valid orch name whose Docker name would be longer than a directory name.
    let long = format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(60));
    match p.create(&request(&long, "1Mi", &scope.node)).await {
        Err(VolumeError::Refused { reason, .. }) => assert!(reason.contains("more than the 255"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_mounting_the_volume_by_name_keeps_it_and_is_named() {
    if skip("a_container_mounting_the_volume_by_name_keeps_it_and_is_named") {
        return;
    }
    let scope = Scope::new("volume-user");
    let state = fresh_state("user");
    let p = open(&scope, &state, "1Gi").await;
    p.create(&request("shared", "1Mi", &scope.node)).await.unwrap();
    // A container (created, never started) mounting the Docker volume by name.
    let container = format!("orch-test-user-{}", scope.node);
    let body = bollard::models::ContainerCreateBody {
        image: Some(scope.image.clone()),
        cmd: Some(vec!["true".into()]),
        labels: Some(HashMap::from([("orch.dev/node".to_string(), scope.node.clone())])),
        host_config: Some(bollard::models::HostConfig {
            mounts: Some(vec![bollard::models::Mount {
                target: Some("/data".into()),
                source: Some(p.docker_name("shared")),
                typ: Some(bollard::models::MountType::VOLUME),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = bollard::query_parameters::CreateContainerOptionsBuilder::default().name(&container).build();
    docker().create_container(Some(options), body).await.unwrap();
    match p.delete("shared").await {
        Err(VolumeError::InUse { consumers, .. }) => assert_eq!(consumers, [format!("container {container}")]),
        other => panic!("expected InUse naming the container, got {other:?}"),
    }
    assert!(inspect(&p.docker_name("shared")).await.is_some(), "the volume is kept");
    docker().remove_container(&container, None::<bollard::query_parameters::RemoveContainerOptions>).await.unwrap();
    p.delete("shared").await.unwrap();
    assert!(inspect(&p.docker_name("shared")).await.is_none());
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test]
async fn a_bad_node_capacity_is_refused() {
    let runtime = DockerRuntime::new(orch_runtime::DockerConfig::new("n1")).unwrap();
    let err = DockerVolumes::open(runtime, fresh_state("bad-capacity"), q("-1")).await.unwrap_err();
    assert!(matches!(&err, VolumeError::Invalid { field, .. } if field == "capacity"), "{err}");
}

#[tokio::test]
async fn without_an_engine_open_fails_saying_what_to_do() {
    let mut config = orch_runtime::DockerConfig::new("n1");
    config.host = Some("unix:///nonexistent/orch-test/docker.sock".into());
    let runtime = DockerRuntime::new(config).unwrap();
    let state = fresh_state("no-engine");
    let err = DockerVolumes::open(runtime, &state, q("1Gi")).await.unwrap_err();
    let VolumeError::Backend { message, source, .. } = &err else { panic!("expected Backend, got {err:?}") };
    assert!(message.contains("no Docker daemon answers at unix:///nonexistent/orch-test/docker.sock"), "{message}");
    let runtime_error = source.downcast_ref::<orch_core::RuntimeError>().expect("the runtime's error is the source");
    assert!(
        matches!(
            orch_runtime::DockerError::of(runtime_error),
            Some(orch_runtime::DockerError::DaemonNotRunning { .. })
        ),
        "{runtime_error:?}"
    );
    let _ = std::fs::remove_dir_all(&state);
}

fn sh(scope: &Scope, id: &str, script: &str, data: &Path) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        container: Container {
            name: "main".into(),
            image: Some(scope.image.clone()),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            volume_mounts: vec![VolumeMount { name: "data".into(), mount_path: "/data".into(), read_only: false }],
            ..Default::default()
        },
        volumes: vec![HostVolume { name: "data".into(), host_path: data.to_path_buf() }],
        labels: [("orch.dev/workload", "db")].into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_one_container_writes_to_a_published_volume_the_next_one_reads_until_the_volume_is_deleted() {
    if skip("data_one_container_writes_to_a_published_volume_the_next_one_reads_until_the_volume_is_deleted") {
        return;
    }
    let scope = Scope::new("volume-mount");
    let state = fresh_state("mount");
    let rt = DockerRuntime::connect(scope.config()).await.unwrap();
    let p = DockerVolumes::open(rt.clone(), &state, q("1Gi")).await.unwrap();
    p.create(&request("db-data", "64Mi", &scope.node)).await.unwrap();

    let path = p.publish("db-data", &scope.node, "writer-uid").await.unwrap().path;
    let writer = rt.start(&sh(&scope, "writer", "echo 42 > /data/counter", &path)).await.unwrap();
    assert!(rt.wait(&writer).await.unwrap().success());
    rt.remove(&writer).await.unwrap();
    p.unpublish("db-data", &scope.node, "writer-uid").await.unwrap();

    let path = p.publish("db-data", &scope.node, "reader-uid").await.unwrap().path;
    let reader = rt.start(&sh(&scope, "reader", "cat /data/counter", &path)).await.unwrap();
    assert!(rt.wait(&reader).await.unwrap().success());
    let out: Vec<String> = rt.logs(&reader, LogOptions::default()).await.unwrap().map(|l| l.line).collect().await;
    assert_eq!(out, ["42"], "the second container reads what the first wrote");
    match p.delete("db-data").await {
        Err(VolumeError::InUse { consumers, .. }) => assert_eq!(consumers, ["reader-uid"]),
        other => panic!("a published volume must be InUse, got {other:?}"),
    }
    rt.remove(&reader).await.unwrap();
    p.unpublish("db-data", &scope.node, "reader-uid").await.unwrap();
    p.delete("db-data").await.unwrap();
    assert!(inspect(&p.docker_name("db-data")).await.is_none(), "the Docker volume is gone");
    assert!(!path.exists(), "and its data");
    let _ = std::fs::remove_dir_all(&state);
}
