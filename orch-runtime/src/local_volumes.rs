//! [`LocalVolumes`]: a [`VolumeProvider`] for one node's local storage, a directory per volume
//! under a data root.
//!
//! Each volume is `<root>/<name>/` holding `data/` (what consumers see) and `volume.json` (its
//! size, access mode and current consumers), so a restarted agent finds its volumes, their sizes
//! and who uses them. The node's local capacity is given; the sizes of its volumes are accounted
//! against it, and a volume that does not fit is refused with what is left. Sizes are only
//! accounted, not enforced: a consumer can write past its volume's size
//! ([`capabilities`](VolumeProvider::capabilities) says `enforces_size: false`). Enforcing
//! them (project quotas on XFS or ext4, or a loop-mounted file system per volume) is not built.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;

use async_trait::async_trait;
use orch_core::kinds::AccessMode;
use orch_core::storage::{CreateVolume, ProvidedVolume, Published, VolumeCapabilities};
use orch_core::{Quantity, VolumeError, VolumeProvider};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::volume_checks::{
    bytes, check_create, check_fits, check_name, check_node, check_node_capacity, check_same, free_bytes,
};

const RECORD: &str = "volume.json";
const DATA: &str = "data";
/// Directories being deleted are first renamed to a name starting with this (never a valid
/// volume name), so a crash mid-delete leaves nothing that looks like a volume.
const DELETING: &str = ".deleting-";

/// What `volume.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    capacity: Quantity,
    access_mode: AccessMode,
    #[serde(default)]
    consumers: BTreeSet<String>,
}

/// Node-local volumes: a directory per volume under a data root, sizes accounted against the
/// node's local capacity. Volumes offer `ReadWriteOnce` only and are published on their node only.
pub struct LocalVolumes {
    root: PathBuf,
    node: String,
    capacity: Quantity,
    volumes: Mutex<BTreeMap<String, Record>>,
}

impl std::fmt::Debug for LocalVolumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalVolumes")
            .field("root", &self.root)
            .field("node", &self.node)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn backend(volume: &str, message: String, e: io::Error) -> VolumeError {
    VolumeError::Backend { volume: volume.to_string(), message, source: Box::new(e) }
}

impl LocalVolumes {
    /// Opens (creating it if needed) the data root of node `node`, whose local storage for
    /// volumes is `capacity` bytes, and finds the volumes already there. Leftovers of a delete
    /// interrupted by a crash are removed.
    pub async fn open(
        root: impl Into<PathBuf>,
        node: impl Into<String>,
        capacity: Quantity,
    ) -> Result<LocalVolumes, VolumeError> {
        let root = root.into();
        let node = node.into();
        check_node_capacity(&capacity)?;
        let at = |e| backend("", format!("opening the volume root {}", root.display()), e);
        tokio::fs::create_dir_all(&root).await.map_err(at)?;
        let mut volumes = BTreeMap::new();
        let mut entries = tokio::fs::read_dir(&root).await.map_err(at)?;
        while let Some(entry) = entries.next_entry().await.map_err(at)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(DELETING) {
                tokio::fs::remove_dir_all(entry.path()).await.map_err(|e| {
                    backend(&name, format!("removing the remains of a deleted volume at {}", entry.path().display()), e)
                })?;
                continue;
            }
            // A directory without a record is a create that did not finish: the next create
            // of that name starts it afresh.
            let Ok(text) = tokio::fs::read(entry.path().join(RECORD)).await else { continue };
            let record: Record = serde_json::from_slice(&text).map_err(|e| VolumeError::Backend {
                volume: name.clone(),
                message: format!("reading {}", entry.path().join(RECORD).display()),
                source: Box::new(e),
            })?;
            volumes.insert(name, record);
        }
        Ok(LocalVolumes { root, node, capacity, volumes: Mutex::new(volumes) })
    }

    /// The node whose storage this is.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node's local capacity for volumes, in bytes: what it advertises.
    pub fn capacity(&self) -> Quantity {
        self.capacity
    }

    /// Bytes not yet given to a volume.
    pub async fn available(&self) -> Quantity {
        let volumes = self.volumes.lock().await;
        Quantity::from_bytes(self.free_bytes(&volumes) as i64)
    }

    fn free_bytes(&self, volumes: &BTreeMap<String, Record>) -> i128 {
        free_bytes(&self.capacity, volumes.values().map(|r| bytes(&r.capacity)).sum())
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Writes a volume's record atomically (a crash leaves the old record or the new one).
    async fn write_record(&self, name: &str, record: &Record) -> Result<(), VolumeError> {
        let dir = self.dir(name);
        let tmp = dir.join(format!("{RECORD}.tmp"));
        let text = serde_json::to_vec_pretty(record).expect("a record always encodes");
        let at = |e| backend(name, format!("writing {}", dir.join(RECORD).display()), e);
        tokio::fs::write(&tmp, text).await.map_err(at)?;
        tokio::fs::rename(&tmp, dir.join(RECORD)).await.map_err(at)
    }
}

#[async_trait]
impl VolumeProvider for LocalVolumes {
    fn capabilities(&self) -> VolumeCapabilities {
        VolumeCapabilities {
            access_modes: vec![AccessMode::ReadWriteOnce],
            enforces_size: false,
            node_local: true,
            capacity: Some(self.capacity),
        }
    }

    async fn create(&self, req: &CreateVolume) -> Result<ProvidedVolume, VolumeError> {
        check_create(req, "local volumes", &self.node)?;
        let provided = ProvidedVolume {
            name: req.name.clone(),
            capacity: req.capacity,
            access_mode: req.access_mode,
            node: Some(self.node.clone()),
        };
        let mut volumes = self.volumes.lock().await;
        if let Some(existing) = volumes.get(&req.name) {
            check_same(req, &existing.capacity, existing.access_mode)?;
            return Ok(ProvidedVolume { capacity: existing.capacity, ..provided });
        }
        check_fits(req, self.free_bytes(&volumes), || {
            format!("node {:?} (local capacity {})", self.node, self.capacity)
        })?;
        let dir = self.dir(&req.name);
        // A directory left by a create that crashed before its record: start it afresh, so a
        // new volume is empty.
        if tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(|e| backend(&req.name, format!("clearing {}", dir.display()), e))?;
        }
        tokio::fs::create_dir_all(dir.join(DATA))
            .await
            .map_err(|e| backend(&req.name, format!("creating {}", dir.join(DATA).display()), e))?;
        let record = Record { capacity: req.capacity, access_mode: req.access_mode, consumers: BTreeSet::new() };
        if let Err(e) = self.write_record(&req.name, &record).await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        volumes.insert(req.name.clone(), record);
        Ok(provided)
    }

    async fn delete(&self, name: &str) -> Result<(), VolumeError> {
        check_name(name)?;
        let mut volumes = self.volumes.lock().await;
        let Some(record) = volumes.get(name) else { return Ok(()) };
        if !record.consumers.is_empty() {
            return Err(VolumeError::InUse {
                volume: name.to_string(),
                consumers: record.consumers.iter().cloned().collect(),
            });
        }
        let dir = self.dir(name);
        let doomed = self.root.join(format!("{DELETING}{name}-{:016x}", fastrand::u64(..)));
        tokio::fs::rename(&dir, &doomed).await.map_err(|e| backend(name, format!("deleting {}", dir.display()), e))?;
        volumes.remove(name);
        drop(volumes);
        // The volume is gone once renamed; the removal of its data may take a while and is
        // finished by `open` should it be interrupted.
        tokio::fs::remove_dir_all(&doomed)
            .await
            .map_err(|e| backend(name, format!("removing the data of {}", doomed.display()), e))
    }

    async fn publish(&self, name: &str, node: &str, consumer: &str) -> Result<Published, VolumeError> {
        check_name(name)?;
        if consumer.is_empty() {
            return Err(VolumeError::Invalid { field: "consumer".into(), reason: "must not be empty".into() });
        }
        let mut volumes = self.volumes.lock().await;
        let Some(record) = volumes.get(name) else { return Err(VolumeError::NotFound { volume: name.to_string() }) };
        check_node(name, &self.node, node)?;
        if !record.consumers.contains(consumer) {
            let mut next = record.clone();
            next.consumers.insert(consumer.to_string());
            self.write_record(name, &next).await?;
            volumes.insert(name.to_string(), next);
        }
        Ok(Published { path: self.dir(name).join(DATA) })
    }

    async fn unpublish(&self, name: &str, node: &str, consumer: &str) -> Result<(), VolumeError> {
        check_name(name)?;
        let mut volumes = self.volumes.lock().await;
        let Some(record) = volumes.get(name) else { return Ok(()) };
        // Nothing of this node's volumes is ever published on another node: nothing to withdraw.
        if node != self.node {
            return Ok(());
        }
        if record.consumers.contains(consumer) {
            let mut next = record.clone();
            next.consumers.remove(consumer);
            self.write_record(name, &next).await?;
            volumes.insert(name.to_string(), next);
        }
        Ok(())
    }
}
