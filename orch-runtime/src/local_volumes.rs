//! [`LocalVolumes`]: a [`VolumeProvider`] for one node's local storage, a directory per volume
//! under a data root.
//!
//! Each volume is `<root>/<name>/` holding `data/` (what consumers see) and `volume.json` (its
//! size, access mode and current consumers), so a restarted agent finds its volumes, their sizes
//! and who uses them. The node's local capacity is given; the sizes of its volumes are accounted
//! against it, and a volume that does not fit is refused with what is left.
//!
//! Sizes are also enforced where the machine allows it ([`Enforcement`]): each volume is then
//! an ext4 file system in a sparse image file `<root>/<name>/image`, loop-mounted on
//! `<root>/<name>/data`, so a consumer writing past the volume's size gets `ENOSPC`. The image
//! is sized so that the capacity is usable (the rule is in `loop_fs`: the file system offers
//! the capacity plus `64 KiB + capacity / 1024`, and at most `64 KiB + capacity / 256` more).
//! Only the capacity counts in the node's accounting, not the file system's overhead. A
//! re-opened provider mounts its volumes that are not mounted (after a reboot), and a delete
//! unmounts (detaching the loop device) before it removes anything. Without enforcement
//! ([`Enforcement::Off`], or [`Enforcement::Auto`] where loop mounts do not work) sizes are only
//! accounted: a consumer can write past its volume's size
//! ([`capabilities`](VolumeProvider::capabilities) says `enforces_size: false`).
//!
//! A volume found damaged at open (its `volume.json` unreadable, or its file system not
//! mountable) is left untouched, data and all, and refused for every use, saying why and where
//! it is; the provider serves the others. Its size is not known, so it is not accounted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, OnceLock};

use async_trait::async_trait;
use orch_core::kinds::AccessMode;
use orch_core::storage::{CreateVolume, ProvidedVolume, Published, VolumeCapabilities};
use orch_core::{Quantity, VolumeError, VolumeProvider};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::loop_fs;
use crate::volume_checks::{
    bytes, check_create, check_fits, check_name, check_node, check_node_capacity, check_same, free_bytes,
};

const RECORD: &str = "volume.json";
const DATA: &str = "data";
const IMAGE: &str = "image";
/// Directories being deleted are first renamed to a name starting with this (never a valid
/// volume name), so a crash mid-delete leaves nothing that looks like a volume.
const DELETING: &str = ".deleting-";
/// The probe of [`Enforcement::Auto`] and [`Enforcement::Required`] works in a directory
/// named so (never a valid volume name); one left by a crash is removed by the next open.
const PROBE: &str = ".probe-";

/// Whether [`LocalVolumes`] enforces the sizes of the volumes it creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enforcement {
    /// Enforce where loop-mounted file systems work under the root (checked by making,
    /// formatting and mounting a tiny one, once per file system in a process); else only
    /// account, saying why in the log.
    #[default]
    Auto,
    /// Enforce; opening fails, saying what does not work, where loop mounts do not.
    Required,
    /// Only account: a volume is a plain directory.
    Off,
}

impl std::fmt::Display for Enforcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Enforcement::Auto => "auto",
            Enforcement::Required => "required",
            Enforcement::Off => "off",
        })
    }
}

impl std::str::FromStr for Enforcement {
    type Err = String;

    /// `auto`, `required` or `off`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Enforcement::Auto),
            "required" => Ok(Enforcement::Required),
            "off" => Ok(Enforcement::Off),
            other => Err(format!("must be auto, required or off (is {other:?})")),
        }
    }
}

/// What `volume.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    capacity: Quantity,
    access_mode: AccessMode,
    #[serde(default)]
    consumers: BTreeSet<String>,
    /// The size of the image file in bytes, for a volume that is a loop-mounted file system;
    /// absent for a plain directory (sizes not enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_size: Option<u64>,
}

/// Node-local volumes: a directory per volume under a data root, sizes accounted against the
/// node's local capacity and, where loop mounts work, enforced. Volumes offer `ReadWriteOnce`
/// only and are published on their node only.
pub struct LocalVolumes {
    root: PathBuf,
    node: String,
    capacity: Quantity,
    mkfs: PathBuf,
    /// Whether new volumes are loop-mounted file systems.
    enforcing: bool,
    /// Whether every volume's size is enforced (enforcing, and no plain directory left by an
    /// earlier open without enforcement).
    enforces_size: bool,
    volumes: Mutex<BTreeMap<String, Record>>,
    /// Volumes found at open whose record could not be read or whose file system could not be
    /// mounted, with why: left untouched (their data may be recoverable), refused for every use.
    damaged: BTreeMap<String, String>,
}

impl std::fmt::Debug for LocalVolumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalVolumes")
            .field("root", &self.root)
            .field("node", &self.node)
            .field("capacity", &self.capacity)
            .field("enforcing", &self.enforcing)
            .finish_non_exhaustive()
    }
}

fn backend(volume: &str, message: String, e: io::Error) -> VolumeError {
    VolumeError::Backend { volume: volume.to_string(), message, source: Box::new(e) }
}

/// Runs blocking file system work (subprocesses, mounts) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

/// What the probe found, by file system (its device number) and `mkfs` program: `Err` says what
/// did not work.
type Probes = HashMap<(u64, PathBuf), Arc<OnceLock<Result<(), String>>>>;

static PROBES: LazyLock<std::sync::Mutex<Probes>> = LazyLock::new(Default::default);

/// Whether loop-mounted file systems made with `mkfs` work under `root` (which exists): probed
/// once per file system and program in a process, so the agents of many simulated nodes, whose
/// roots share one file system, make one probe between them. The others wait for its answer on
/// blocking threads of their own, so a runtime with paused time does not move its clock past
/// the wait.
async fn loop_mounts_work(root: &Path, mkfs: &Path) -> io::Result<()> {
    let (root, mkfs) = (root.to_path_buf(), mkfs.to_path_buf());
    blocking(move || {
        let dev = std::fs::metadata(&root)?.dev();
        let cell = {
            let mut probes = PROBES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            probes.entry((dev, mkfs.clone())).or_default().clone()
        };
        let found = cell.get_or_init(|| {
            let probe_dir = root.join(format!("{PROBE}{:016x}", fastrand::u64(..)));
            loop_fs::probe(&mkfs, &probe_dir).map_err(|e| e.to_string())
        });
        found.clone().map_err(io::Error::other)
    })
    .await
}

/// How to open [`LocalVolumes`]: made by [`LocalVolumes::builder`].
#[derive(Debug, Clone)]
pub struct LocalVolumesBuilder {
    root: PathBuf,
    node: String,
    capacity: Quantity,
    enforcement: Enforcement,
    mkfs: PathBuf,
}

impl LocalVolumesBuilder {
    /// Whether to enforce sizes ([`Enforcement::Auto`] unless told).
    pub fn enforcement(mut self, enforcement: Enforcement) -> Self {
        self.enforcement = enforcement;
        self
    }

    /// The program that formats a volume's image (`mkfs.ext4`, looked up on `PATH`, unless told).
    pub fn mkfs_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.mkfs = program.into();
        self
    }

    /// Opens the provider: see [`LocalVolumes::open`]. With [`Enforcement::Required`] it fails,
    /// saying what does not work, where loop-mounted file systems cannot be made under the root.
    pub async fn open(self) -> Result<LocalVolumes, VolumeError> {
        let LocalVolumesBuilder { root, node, capacity, enforcement, mkfs } = self;
        check_node_capacity(&capacity)?;
        let at = |e| backend("", format!("opening the volume root {}", root.display()), e);
        tokio::fs::create_dir_all(&root).await.map_err(at)?;
        let mut volumes = BTreeMap::new();
        let mut damaged = BTreeMap::new();
        let mut entries = tokio::fs::read_dir(&root).await.map_err(at)?;
        while let Some(entry) = entries.next_entry().await.map_err(at)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !entry.file_type().await.map_err(at)?.is_dir() {
                continue;
            }
            if name.starts_with(DELETING) || name.starts_with(PROBE) {
                let doomed = path.clone();
                blocking(move || loop_fs::remove_volume_dir(&doomed)).await.map_err(|e| {
                    backend(&name, format!("removing the remains of a deleted volume at {}", path.display()), e)
                })?;
                continue;
            }
            let Ok(text) = tokio::fs::read(path.join(RECORD)).await else {
                // A directory without a record is a create that did not finish: it goes (its
                // file system unmounted first, if it got that far).
                let doomed = path.clone();
                blocking(move || loop_fs::remove_volume_dir(&doomed))
                    .await
                    .map_err(|e| backend(&name, format!("removing the unfinished volume at {}", path.display()), e))?;
                continue;
            };
            // One damaged volume does not keep the node from serving the others.
            let mut skip = |why: String| {
                tracing::warn!(volume = %name, %why, "a local volume is damaged; it is left untouched and refused");
                damaged.insert(name.clone(), why);
            };
            let record: Record = match serde_json::from_slice(&text) {
                Ok(record) => record,
                Err(e) => {
                    skip(format!("its record {} is unreadable: {e}", path.join(RECORD).display()));
                    continue;
                }
            };
            if record.image_size.is_some() {
                // After a reboot nothing is mounted: the volume's file system is mounted again.
                let (image, data) = (path.join(IMAGE), path.join(DATA));
                let mounted =
                    blocking(
                        move || if loop_fs::is_mountpoint(&data)? { Ok(()) } else { loop_fs::mount(&image, &data) },
                    )
                    .await;
                if let Err(e) = mounted {
                    skip(format!("its file system {} cannot be mounted: {e}", path.join(IMAGE).display()));
                    continue;
                }
            }
            volumes.insert(name, record);
        }
        let enforcing = match enforcement {
            Enforcement::Off => false,
            Enforcement::Auto | Enforcement::Required => match loop_mounts_work(&root, &mkfs).await {
                Ok(()) => {
                    tracing::info!(root = %root.display(), "local volume sizes are enforced (loop-mounted ext4)");
                    true
                }
                Err(e) if enforcement == Enforcement::Required => {
                    return Err(backend(
                        "",
                        format!(
                            "size enforcement is required but loop-mounted file systems \
                                 (made with {}, mounted with mount -o loop) do not work under {}",
                            mkfs.display(),
                            root.display()
                        ),
                        e,
                    ));
                }
                Err(e) => {
                    tracing::warn!(
                        root = %root.display(),
                        reason = %e,
                        "local volume sizes are accounted, not enforced: loop-mounted file systems do not work here"
                    );
                    false
                }
            },
        };
        let enforces_size = enforcing && volumes.values().all(|r| r.image_size.is_some());
        Ok(LocalVolumes { root, node, capacity, mkfs, enforcing, enforces_size, volumes: Mutex::new(volumes), damaged })
    }
}

impl LocalVolumes {
    /// Opens (creating it if needed) the data root of node `node`, whose local storage for
    /// volumes is `capacity` bytes, and finds the volumes already there, mounting the file
    /// systems of those that are not mounted. Leftovers of a create or a delete interrupted by
    /// a crash are removed. Sizes are enforced where loop mounts work ([`Enforcement::Auto`]);
    /// [`builder`](Self::builder) chooses otherwise.
    pub async fn open(
        root: impl Into<PathBuf>,
        node: impl Into<String>,
        capacity: Quantity,
    ) -> Result<LocalVolumes, VolumeError> {
        Self::builder(root, node, capacity).open().await
    }

    /// How to open the data root of node `node` with `capacity` bytes for volumes, with
    /// [`Enforcement::Auto`] and `mkfs.ext4` unless told otherwise.
    pub fn builder(root: impl Into<PathBuf>, node: impl Into<String>, capacity: Quantity) -> LocalVolumesBuilder {
        LocalVolumesBuilder {
            root: root.into(),
            node: node.into(),
            capacity,
            enforcement: Enforcement::Auto,
            mkfs: PathBuf::from("mkfs.ext4"),
        }
    }

    /// Unmounts the file systems of the volumes under `root` (for a node shutting down, or a
    /// test cleaning up); their data stays in their images and the next
    /// [`open`](Self::open) mounts them again. Fails, leaving it mounted, on a file system still
    /// in use.
    pub async fn unmount_all(root: impl AsRef<Path>) -> Result<(), VolumeError> {
        let root = root.as_ref().to_path_buf();
        let at = |e| backend("", format!("reading the volume root {}", root.display()), e);
        let mut entries = match tokio::fs::read_dir(&root).await {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other.map_err(at)?,
        };
        while let Some(entry) = entries.next_entry().await.map_err(at)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let data = entry.path().join(DATA);
            let shown = data.display().to_string();
            blocking(move || loop_fs::unmount(&data))
                .await
                .map_err(|e| backend(&name, format!("unmounting {shown}"), e))?;
        }
        Ok(())
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

    /// Refuses a volume found damaged at open (its data is left for an operator).
    fn check_sound(&self, name: &str) -> Result<(), VolumeError> {
        match self.damaged.get(name) {
            None => Ok(()),
            Some(why) => Err(VolumeError::Refused {
                volume: name.to_string(),
                reason: format!(
                    "damaged and left untouched: {why}; repair or move {} by hand, then restart the agent",
                    self.dir(name).display()
                ),
            }),
        }
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

    /// Makes the directory of a new volume `name` (empty, nothing left of an earlier one): its
    /// `data/` and, when enforcing, its image mounted there. Answers the image's size.
    async fn make(&self, name: &str, capacity: u64) -> Result<Option<u64>, VolumeError> {
        let dir = self.dir(name);
        // A directory left by a create that crashed before its record: start it afresh, so a
        // new volume is empty.
        let doomed = dir.clone();
        blocking(move || loop_fs::remove_volume_dir(&doomed))
            .await
            .map_err(|e| backend(name, format!("clearing {}", dir.display()), e))?;
        let data = dir.join(DATA);
        tokio::fs::create_dir_all(&data).await.map_err(|e| backend(name, format!("creating {}", data.display()), e))?;
        if !self.enforcing {
            return Ok(None);
        }
        let (mkfs, image) = (self.mkfs.clone(), dir.join(IMAGE));
        let made = blocking(move || loop_fs::make(&mkfs, &image, &data, capacity)).await;
        made.map(Some).map_err(|e| backend(name, format!("making the file system of {}", dir.join(IMAGE).display()), e))
    }
}

#[async_trait]
impl VolumeProvider for LocalVolumes {
    fn capabilities(&self) -> VolumeCapabilities {
        VolumeCapabilities {
            access_modes: vec![AccessMode::ReadWriteOnce],
            enforces_size: self.enforces_size,
            node_local: true,
            capacity: Some(self.capacity),
        }
    }

    async fn create(&self, req: &CreateVolume) -> Result<ProvidedVolume, VolumeError> {
        check_create(req, "local volumes", &self.node)?;
        self.check_sound(&req.name)?;
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
        let capacity = u64::try_from(bytes(&req.capacity)).expect("checked positive");
        // The record comes last: until it is written, nothing here looks like a volume.
        let made = match self.make(&req.name, capacity).await {
            Ok(image_size) => {
                let record = Record {
                    capacity: req.capacity,
                    access_mode: req.access_mode,
                    consumers: BTreeSet::new(),
                    image_size,
                };
                self.write_record(&req.name, &record).await.map(|()| record)
            }
            Err(e) => Err(e),
        };
        let record = match made {
            Ok(record) => record,
            Err(e) => {
                let dir = self.dir(&req.name);
                let _ = blocking(move || loop_fs::remove_volume_dir(&dir)).await;
                return Err(e);
            }
        };
        volumes.insert(req.name.clone(), record);
        Ok(provided)
    }

    async fn delete(&self, name: &str) -> Result<(), VolumeError> {
        check_name(name)?;
        self.check_sound(name)?;
        let mut volumes = self.volumes.lock().await;
        let Some(record) = volumes.get(name) else { return Ok(()) };
        if !record.consumers.is_empty() {
            return Err(VolumeError::InUse {
                volume: name.to_string(),
                consumers: record.consumers.iter().cloned().collect(),
            });
        }
        let dir = self.dir(name);
        // Unmounted first (detaching its loop device): a file system still in use fails here,
        // the volume kept as it was.
        let data = dir.join(DATA);
        blocking(move || loop_fs::unmount(&data))
            .await
            .map_err(|e| backend(name, format!("unmounting {}", dir.join(DATA).display()), e))?;
        let doomed = self.root.join(format!("{DELETING}{name}-{:016x}", fastrand::u64(..)));
        tokio::fs::rename(&dir, &doomed).await.map_err(|e| backend(name, format!("deleting {}", dir.display()), e))?;
        volumes.remove(name);
        drop(volumes);
        // The volume is gone once renamed; the removal of its data may take a while and is
        // finished by `open` should it be interrupted.
        let removing = doomed.clone();
        blocking(move || loop_fs::remove_volume_dir(&removing))
            .await
            .map_err(|e| backend(name, format!("removing the data of {}", doomed.display()), e))
    }

    async fn publish(&self, name: &str, node: &str, consumer: &str) -> Result<Published, VolumeError> {
        check_name(name)?;
        if consumer.is_empty() {
            return Err(VolumeError::Invalid { field: "consumer".into(), reason: "must not be empty".into() });
        }
        self.check_sound(name)?;
        let mut volumes = self.volumes.lock().await;
        let Some(record) = volumes.get(name) else { return Err(VolumeError::NotFound { volume: name.to_string() }) };
        check_node(name, &self.node, node)?;
        let data = self.dir(name).join(DATA);
        if record.image_size.is_some() {
            // Mounted since open, unless something unmounted it: a consumer never gets the
            // empty directory under the file system.
            let (image, at) = (self.dir(name).join(IMAGE), data.clone());
            blocking(move || if loop_fs::is_mountpoint(&at)? { Ok(()) } else { loop_fs::mount(&image, &at) })
                .await
                .map_err(|e| backend(name, format!("mounting {}", data.display()), e))?;
        }
        if !record.consumers.contains(consumer) {
            let mut next = record.clone();
            next.consumers.insert(consumer.to_string());
            self.write_record(name, &next).await?;
            volumes.insert(name.to_string(), next);
        }
        Ok(Published { path: data })
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
