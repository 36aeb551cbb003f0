//! [`DockerVolumes`]: a [`VolumeProvider`] of Docker named volumes on one node's engine.
//!
//! - **Volumes.** Orch volume `name` of node `node` is the Docker volume `orch_<node>_<name>` of
//!   driver `local`, labelled with [`labels::MANAGED_BY`], [`labels::NODE`],
//!   [`labels::PROVIDED_VOLUME`] (the orch name), [`labels::CAPACITY`] (bytes) and
//!   [`labels::ACCESS_MODE`]. The labels are what the engine keeps: a restarted agent finds its
//!   volumes and their sizes there, a repeated create compares them, and a Docker volume of that
//!   name without them (not made by orch for this node) is refused, never taken over. The engine
//!   answers an existing volume unchanged to a create whatever its labels, so they are checked
//!   after every create too.
//! - **Capacity.** The node's capacity for these volumes is given; the sizes of its volumes are
//!   accounted against it. Sizes are not enforced: the `local` driver has no quota.
//! - **Publish.** Answers the volume's `Mountpoint` on the node (`/var/lib/docker/volumes/…/_data`),
//!   which the agent hands to the [`DockerRuntime`] (or any runtime on the node) as a host path.
//! - **Consumers.** Who has a volume published is kept in `docker-volumes-<node>.json` in the state
//!   directory given to [`DockerVolumes::open`], written atomically. Docker's own idea of use
//!   (containers mounting the volume) cannot serve: publish comes before the workload's container
//!   exists, a consumer is a workload instance rather than a container, and the runtime
//!   bind-mounts the directory, which Docker does not count as a use of the volume. Labels cannot
//!   hold it either, as Docker volume labels are fixed at creation. A container that does mount
//!   the volume by name still keeps it: the engine refuses to remove it and `delete` answers
//!   `InUse` naming the containers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{Volume, VolumeCreateRequest};
use bollard::query_parameters::{ListContainersOptionsBuilder, ListVolumesOptionsBuilder, RemoveVolumeOptions};
use orch_core::kinds::AccessMode;
use orch_core::storage::{CreateVolume, ProvidedVolume, Published, VolumeCapabilities};
use orch_core::{Quantity, VolumeError, VolumeProvider};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{DockerError, DockerRuntime, error, labels};
use crate::volume_checks::{
    bytes, check_create, check_fits, check_name, check_node, check_node_capacity, check_same, free_bytes,
};

/// The longest Docker volume name the `local` driver can hold: a directory name.
const MAX_DOCKER_NAME: usize = 255;
const DRIVER: &str = "local";

/// Who has which volume published, as the state file holds it.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    #[serde(default)]
    consumers: BTreeMap<String, BTreeSet<String>>,
}

/// A volume of ours, as its Docker volume's labels describe it.
#[derive(Debug)]
struct Found {
    capacity: Quantity,
    access_mode: AccessMode,
    mountpoint: String,
}

/// Node-local volumes as Docker named volumes (driver `local`) on the node's Docker Engine, for
/// nodes running the [`DockerRuntime`]; sizes accounted against the node's capacity. Volumes
/// offer `ReadWriteOnce` only and are published on their node only.
///
/// ```no_run
/// use std::sync::Arc;
/// use orch_core::VolumeProvider;
/// use orch_runtime::{DockerConfig, DockerRuntime, DockerVolumes};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let runtime = DockerRuntime::connect(DockerConfig::new("node-1")).await?;
/// let volumes: Arc<dyn VolumeProvider> = Arc::new(
///     DockerVolumes::open(runtime.clone(), "/var/lib/orch/node-1/docker-volumes", "100Gi".parse()?).await?,
/// );
/// assert!(volumes.capabilities().node_local);
/// # Ok(()) }
/// ```
pub struct DockerVolumes {
    runtime: DockerRuntime,
    capacity: Quantity,
    state_file: PathBuf,
    /// Also serialises every change, so concurrent creates never overcommit the capacity.
    consumers: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl std::fmt::Debug for DockerVolumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerVolumes")
            .field("node", &self.node())
            .field("capacity", &self.capacity)
            .field("state_file", &self.state_file)
            .finish_non_exhaustive()
    }
}

fn backend(volume: &str, message: String, source: impl std::error::Error + Send + Sync + 'static) -> VolumeError {
    VolumeError::Backend { volume: volume.to_string(), message, source: Box::new(source) }
}

impl DockerVolumes {
    /// Volumes of `runtime`'s node on its engine, with `capacity` bytes for them all, keeping
    /// who has them published in `state_dir` (created if needed; the node's own, kept across
    /// agent restarts). Answers once the engine has answered.
    pub async fn open(
        runtime: DockerRuntime,
        state_dir: impl Into<PathBuf>,
        capacity: Quantity,
    ) -> Result<DockerVolumes, VolumeError> {
        check_node_capacity(&capacity)?;
        let state_dir = state_dir.into();
        let state_file = state_dir.join(format!("docker-volumes-{}.json", runtime.node()));
        let at = |e| backend("", format!("reading the volume state {}", state_file.display()), e);
        tokio::fs::create_dir_all(&state_dir).await.map_err(at)?;
        let consumers = match tokio::fs::read(&state_file).await {
            Ok(text) => {
                let state: State = serde_json::from_slice(&text)
                    .map_err(|e| backend("", format!("reading the volume state {}", state_file.display()), e))?;
                state.consumers
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(at(e)),
        };
        let volumes = DockerVolumes { runtime, capacity, state_file, consumers: Mutex::new(consumers) };
        volumes.docker("").await?;
        Ok(volumes)
    }

    /// The node whose volumes these are.
    pub fn node(&self) -> &str {
        self.runtime.node()
    }

    /// The node's capacity for these volumes, in bytes: what it advertises.
    pub fn capacity(&self) -> Quantity {
        self.capacity
    }

    /// The Docker volume holding orch volume `name`: `orch_<node>_<name>`.
    pub fn docker_name(&self, name: &str) -> String {
        format!("orch_{}_{name}", self.node())
    }

    /// Bytes not yet given to a volume, as the engine's volumes say.
    pub async fn available(&self) -> Result<Quantity, VolumeError> {
        let _changes = self.consumers.lock().await;
        Ok(Quantity::from_bytes(free_bytes(&self.capacity, self.used().await?) as i64))
    }

    async fn docker(&self, volume: &str) -> Result<&Docker, VolumeError> {
        self.runtime.docker().await.map_err(|e| backend(volume, e.to_string(), e))
    }

    fn api_error(&self, volume: &str, action: String, e: bollard::errors::Error) -> VolumeError {
        let e = DockerError::classify(&self.runtime.inner.address, action, e);
        backend(volume, e.to_string(), e)
    }

    /// Orch volume `name` as its Docker volume describes it; `None` if there is none.
    async fn find(&self, name: &str) -> Result<Option<Found>, VolumeError> {
        let docker_name = self.docker_name(name);
        match self.docker(name).await?.inspect_volume(&docker_name).await {
            Ok(volume) => self.read(name, &volume).map(Some),
            Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 404) => Ok(None),
            Err(e) => Err(self.api_error(name, format!("inspect the volume {docker_name}"), e)),
        }
    }

    /// What a Docker volume holds for orch volume `name`, refusing one orch did not make for it.
    fn read(&self, name: &str, volume: &Volume) -> Result<Found, VolumeError> {
        let label = |k: &str| volume.labels.get(k).map(String::as_str);
        if label(labels::MANAGED_BY) != Some(labels::MANAGED_BY_VALUE)
            || label(labels::NODE) != Some(self.node())
            || label(labels::PROVIDED_VOLUME) != Some(name)
        {
            return Err(VolumeError::Refused {
                volume: name.to_string(),
                reason: format!(
                    "the Docker volume {} exists but orch did not make it for node {:?} (labels {:?}): remove or rename it",
                    volume.name,
                    self.node(),
                    volume.labels
                ),
            });
        }
        let malformed = |key: &str, e: Box<dyn std::error::Error + Send + Sync>| VolumeError::Backend {
            volume: name.to_string(),
            message: format!("the Docker volume {} has a malformed {key} label", volume.name),
            source: e,
        };
        let capacity = label(labels::CAPACITY)
            .unwrap_or_default()
            .parse::<i64>()
            .map_err(|e| malformed(labels::CAPACITY, Box::new(e)))?;
        let access_mode =
            serde_json::from_value(serde_json::Value::from(label(labels::ACCESS_MODE).unwrap_or_default()))
                .map_err(|e| malformed(labels::ACCESS_MODE, Box::new(e)))?;
        Ok(Found { capacity: Quantity::from_bytes(capacity), access_mode, mountpoint: volume.mountpoint.clone() })
    }

    /// Bytes given to this node's volumes.
    async fn used(&self) -> Result<i128, VolumeError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
                format!("{}={}", labels::NODE, self.node()),
                labels::PROVIDED_VOLUME.to_string(),
            ],
        )]);
        let options = ListVolumesOptionsBuilder::default().filters(&filters).build();
        let listed = self
            .docker("")
            .await?
            .list_volumes(Some(options))
            .await
            .map_err(|e| self.api_error("", "list the node's volumes".into(), e))?;
        let mut used = 0;
        for volume in listed.volumes.unwrap_or_default() {
            let name = volume.labels.get(labels::PROVIDED_VOLUME).cloned().unwrap_or_default();
            used += bytes(&self.read(&name, &volume)?.capacity);
        }
        Ok(used)
    }

    /// Writes who has what published, atomically (a crash leaves the old state or the new one).
    async fn save(&self, volume: &str, consumers: &BTreeMap<String, BTreeSet<String>>) -> Result<(), VolumeError> {
        let state = State { consumers: consumers.clone() };
        let text = serde_json::to_vec_pretty(&state).expect("the state always encodes");
        let tmp = self.state_file.with_extension("json.tmp");
        let at = |e| backend(volume, format!("writing the volume state {}", self.state_file.display()), e);
        tokio::fs::write(&tmp, text).await.map_err(at)?;
        tokio::fs::rename(&tmp, &self.state_file).await.map_err(at)
    }

    /// The names of the containers that mount Docker volume `docker_name` (by name).
    async fn containers_using(&self, volume: &str, docker_name: &str) -> Result<Vec<String>, VolumeError> {
        let filters = HashMap::from([("volume".to_string(), vec![docker_name.to_string()])]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let found = self
            .docker(volume)
            .await?
            .list_containers(Some(options))
            .await
            .map_err(|e| self.api_error(volume, format!("list the containers using {docker_name}"), e))?;
        Ok(found
            .into_iter()
            .map(|c| {
                let name = c.names.and_then(|n| n.into_iter().next()).map(|n| n.trim_start_matches('/').to_string());
                format!("container {}", name.or(c.id).unwrap_or_default())
            })
            .collect())
    }
}

#[async_trait]
impl VolumeProvider for DockerVolumes {
    fn capabilities(&self) -> VolumeCapabilities {
        VolumeCapabilities {
            access_modes: vec![AccessMode::ReadWriteOnce],
            enforces_size: false,
            node_local: true,
            capacity: Some(self.capacity),
        }
    }

    async fn create(&self, req: &CreateVolume) -> Result<ProvidedVolume, VolumeError> {
        check_create(req, "Docker volumes", self.node())?;
        let docker_name = self.docker_name(&req.name);
        if docker_name.len() > MAX_DOCKER_NAME {
            return Err(VolumeError::Refused {
                volume: req.name.clone(),
                reason: format!(
                    "its Docker volume name {docker_name} would have {} characters, more than the {MAX_DOCKER_NAME} Docker can hold",
                    docker_name.len()
                ),
            });
        }
        let provided = ProvidedVolume {
            name: req.name.clone(),
            capacity: req.capacity,
            access_mode: req.access_mode,
            node: Some(self.node().to_string()),
        };
        let mut consumers = self.consumers.lock().await;
        if let Some(found) = self.find(&req.name).await? {
            check_same(req, &found.capacity, found.access_mode)?;
            return Ok(provided);
        }
        check_fits(req, free_bytes(&self.capacity, self.used().await?), || {
            format!("node {:?} (Docker volume capacity {})", self.node(), self.capacity)
        })?;
        // Publications recorded for an earlier volume of this name, removed behind orch's back,
        // are not the new volume's.
        if consumers.contains_key(&req.name) {
            let mut next = consumers.clone();
            next.remove(&req.name);
            self.save(&req.name, &next).await?;
            *consumers = next;
        }
        let access_mode = serde_json::to_value(req.access_mode).expect("an access mode encodes");
        let body = VolumeCreateRequest {
            name: Some(docker_name.clone()),
            driver: Some(DRIVER.into()),
            labels: Some(HashMap::from([
                (labels::MANAGED_BY.to_string(), labels::MANAGED_BY_VALUE.to_string()),
                (labels::NODE.to_string(), self.node().to_string()),
                (labels::PROVIDED_VOLUME.to_string(), req.name.clone()),
                (labels::CAPACITY.to_string(), bytes(&req.capacity).to_string()),
                (labels::ACCESS_MODE.to_string(), access_mode.as_str().unwrap_or_default().to_string()),
            ])),
            ..Default::default()
        };
        let created = self
            .docker(&req.name)
            .await?
            .create_volume(body)
            .await
            .map_err(|e| self.api_error(&req.name, format!("create the volume {docker_name}"), e))?;
        // The engine answers a volume made meanwhile by someone else unchanged: it must be ours.
        let found = self.read(&req.name, &created)?;
        check_same(req, &found.capacity, found.access_mode)?;
        Ok(provided)
    }

    async fn delete(&self, name: &str) -> Result<(), VolumeError> {
        check_name(name)?;
        let mut consumers = self.consumers.lock().await;
        if self.find(name).await?.is_some() {
            if let Some(published) = consumers.get(name).filter(|c| !c.is_empty()) {
                return Err(VolumeError::InUse {
                    volume: name.to_string(),
                    consumers: published.iter().cloned().collect(),
                });
            }
            let docker_name = self.docker_name(name);
            let removed = self.docker(name).await?.remove_volume(&docker_name, None::<RemoveVolumeOptions>).await;
            match removed {
                Ok(()) => {}
                Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 404) => {}
                Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 409) => {
                    let containers = self.containers_using(name, &docker_name).await?;
                    if containers.is_empty() {
                        return Err(self.api_error(name, format!("remove the volume {docker_name}"), e));
                    }
                    return Err(VolumeError::InUse { volume: name.to_string(), consumers: containers });
                }
                Err(e) => return Err(self.api_error(name, format!("remove the volume {docker_name}"), e)),
            }
        }
        if consumers.contains_key(name) {
            let mut next = consumers.clone();
            next.remove(name);
            self.save(name, &next).await?;
            *consumers = next;
        }
        Ok(())
    }

    async fn publish(&self, name: &str, node: &str, consumer: &str) -> Result<Published, VolumeError> {
        check_name(name)?;
        if consumer.is_empty() {
            return Err(VolumeError::Invalid { field: "consumer".into(), reason: "must not be empty".into() });
        }
        let mut consumers = self.consumers.lock().await;
        let Some(found) = self.find(name).await? else {
            return Err(VolumeError::NotFound { volume: name.to_string() });
        };
        check_node(name, self.node(), node)?;
        if found.mountpoint.is_empty() {
            return Err(VolumeError::Refused {
                volume: name.to_string(),
                reason: format!("the engine reports no mount point for the Docker volume {}", self.docker_name(name)),
            });
        }
        if !consumers.get(name).is_some_and(|c| c.contains(consumer)) {
            let mut next = consumers.clone();
            next.entry(name.to_string()).or_default().insert(consumer.to_string());
            self.save(name, &next).await?;
            *consumers = next;
        }
        Ok(Published { path: PathBuf::from(found.mountpoint) })
    }

    async fn unpublish(&self, name: &str, node: &str, consumer: &str) -> Result<(), VolumeError> {
        check_name(name)?;
        // Nothing of this node's volumes is ever published on another node: nothing to withdraw.
        if node != self.node() {
            return Ok(());
        }
        let mut consumers = self.consumers.lock().await;
        if consumers.get(name).is_some_and(|c| c.contains(consumer)) {
            let mut next = consumers.clone();
            if let Some(c) = next.get_mut(name) {
                c.remove(consumer);
                if c.is_empty() {
                    next.remove(name);
                }
            }
            self.save(name, &next).await?;
            *consumers = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DockerConfig;

    fn volumes() -> DockerVolumes {
        DockerVolumes {
            runtime: DockerRuntime::new(DockerConfig::new("n1")).unwrap(),
            capacity: "1Gi".parse().unwrap(),
            state_file: PathBuf::from("/nonexistent/state.json"),
            consumers: Mutex::default(),
        }
    }

    fn volume(labels: &[(&str, &str)]) -> Volume {
        Volume {
            name: "orch_n1_db".into(),
            driver: DRIVER.into(),
            mountpoint: "/var/lib/docker/volumes/orch_n1_db/_data".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    const OURS: [(&str, &str); 5] = [
        (labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
        (labels::NODE, "n1"),
        (labels::PROVIDED_VOLUME, "db"),
        (labels::CAPACITY, "1048576"),
        (labels::ACCESS_MODE, "ReadWriteOnce"),
    ];

    #[test]
    fn labels_describe_the_volume_and_only_ours_are_read() {
        let v = volumes();
        let found = v.read("db", &volume(&OURS)).unwrap();
        assert_eq!(
            (found.capacity, found.access_mode, found.mountpoint.as_str()),
            ("1Mi".parse().unwrap(), AccessMode::ReadWriteOnce, "/var/lib/docker/volumes/orch_n1_db/_data")
        );
        // Another node's, another orch volume's, or nobody's: refused, not taken over.
        for (key, value) in [(labels::NODE, "n2"), (labels::PROVIDED_VOLUME, "other"), (labels::MANAGED_BY, "me")] {
            let labels: Vec<_> = OURS.iter().map(|&(k, v)| if k == key { (k, value) } else { (k, v) }).collect();
            let err = v.read("db", &volume(&labels)).unwrap_err();
            assert!(
                matches!(&err, VolumeError::Refused { reason, .. } if reason.contains("orch did not make it")),
                "{err}"
            );
        }
        assert!(matches!(v.read("db", &volume(&[])), Err(VolumeError::Refused { .. })));
    }

    #[test]
    fn malformed_labels_are_a_backend_error_naming_the_label() {
        let v = volumes();
        for (key, value) in [(labels::CAPACITY, "1Mi"), (labels::ACCESS_MODE, "Sometimes")] {
            let labels: Vec<_> = OURS.iter().map(|&(k, v)| if k == key { (k, value) } else { (k, v) }).collect();
            match v.read("db", &volume(&labels)) {
                Err(VolumeError::Backend { message, .. }) => assert!(message.contains(key), "{message}"),
                other => panic!("{key}: expected Backend, got {other:?}"),
            }
        }
    }
}
