//! The volumes of a workload, made available on the node before its instances start:
//!
//! - a `hostPath` is the node's directory;
//! - an `emptyDir` a fresh directory of the workload under the agent's data root, removed with
//!   the workload; one with a `sizeLimit` is measured on every resync and its workload evicted
//!   when it grows past it (as kubelet does);
//! - a `claim` is the volume its claim is bound to, from the [`VolumeProvider`] of the volume's
//!   class on this node: created there if need be (idempotent), then published for the workload
//!   (its uid is the consumer), and unpublished once the workload is gone from the node.
//!
//! What the agent cannot provide yet (a claim missing or not bound) makes the workload wait, with
//! the reason in its status; what it cannot provide at all here (a volume living on another node,
//! a class without a provider here) is refused with the reason. Either way the workload never
//! runs without its data.
//!
//! The agent also reclaims the volumes of its node: a `PersistentVolume` of this node being
//! deleted, whose only finalizer left is [`VOLUME_RECLAIM_FINALIZER`], is deleted at its
//! provider, then the finalizer goes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use orch_core::cache::{Cache, CacheConfig};
use orch_core::controller::queue::WorkQueue;
use orch_core::kinds::{
    ClaimPhase, NodeStorage, PersistentVolume, VOLUME_RECLAIM_FINALIZER, Volume, VolumeClaim, VolumeSource, Workload,
};
use orch_core::runtime::HostVolume;
use orch_core::storage::CreateVolume;
use orch_core::{
    Api, FieldSelector, ListParams, Object, ObjectRef, Quantity, Resource, Selection, VolumeError, VolumeProvider,
};
use serde::{Deserialize, Serialize};

use super::{Agent, AgentError};

/// The volume class every agent provides unless given another provider for it: directories
/// under `<data_root>/local-volumes/` ([`LocalVolumes`](crate::LocalVolumes)).
pub(super) const LOCAL_CLASS: &str = "local";

/// The claim is missing, not bound yet, or its volume is not ready: the workload waits.
pub(super) const WAITING_FOR_VOLUME: &str = "WaitingForVolume";
/// The claim's volume lives on another node: it cannot run here.
pub(super) const VOLUME_NODE_CONFLICT: &str = "VolumeNodeConflict";
/// No provider of the volume's class on this node.
pub(super) const VOLUME_CLASS_UNAVAILABLE: &str = "VolumeClassUnavailable";
/// The volume could not be made available (a directory could not be created, the provider
/// refused or failed).
pub(super) const VOLUME_UNAVAILABLE: &str = "VolumeUnavailable";
/// The workload was stopped for using more than an `emptyDir` size limit.
pub(super) const EVICTED: &str = "Evicted";

/// Whether the workload waits for its volumes (its status says one of the reasons above).
pub(super) fn waits_for_volumes(status: &orch_core::kinds::WorkloadStatus) -> bool {
    [WAITING_FOR_VOLUME, VOLUME_NODE_CONFLICT, VOLUME_CLASS_UNAVAILABLE, VOLUME_UNAVAILABLE]
        .contains(&status.reason.as_str())
}

/// Why a workload's volumes cannot be made available now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Unavailable {
    /// A CamelCase reason (one of the constants above).
    pub(super) reason: &'static str,
    /// For people: the volume, the claim, and why.
    pub(super) message: String,
}

impl Unavailable {
    fn new(reason: &'static str, message: String) -> Self {
        Unavailable { reason, message }
    }
}

/// The directory holding the `emptyDir` volumes of one workload (all its incarnations).
pub(super) fn workload_dir(data_root: &Path, key: &ObjectRef) -> PathBuf {
    data_root.join("volumes").join(&key.namespace).join(&key.name)
}

/// Resolves the `hostPath` and `emptyDir` volumes of `volumes` to host directories for the
/// workload incarnation tagged `uid_tag`, creating its `emptyDir`s; by index in `volumes`.
/// Claims are left to the agent (they need the store and a provider).
fn resolve_local(
    data_root: &Path,
    dirs: &WorkloadDirs,
    key: &ObjectRef,
    uid_tag: &str,
    volumes: &[Volume],
) -> Result<Vec<(usize, HostVolume)>, String> {
    let mut resolved = Vec::with_capacity(volumes.len());
    let own = workload_dir(data_root, key);
    // Earlier incarnations can only have left a directory the record knows of.
    let earlier = dirs.has(key);
    for (i, v) in volumes.iter().enumerate() {
        let host_path = match &v.source {
            VolumeSource::HostPath { path } => PathBuf::from(path),
            // A size limit is watched on every resync, not here.
            VolumeSource::EmptyDir { .. } => {
                let dir = own.join(uid_tag).join(&v.name);
                // Recorded first: a directory half made is still removed with the workload.
                dirs.add(key);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("spec.volumes[{i}] ({:?}): creating {}: {e}", v.name, dir.display()))?;
                dir
            }
            VolumeSource::Claim { .. } => continue,
        };
        resolved.push((i, HostVolume { name: v.name.clone(), host_path }));
    }
    // Directories of earlier incarnations of this workload (deleted and created again under the
    // same name) go.
    if earlier && let Ok(entries) = std::fs::read_dir(&own) {
        for entry in entries.flatten() {
            if entry.file_name() != uid_tag {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(resolved)
}

/// Removes every `emptyDir` of the workload (it is gone from this node).
pub(super) fn remove(data_root: &Path, dirs: &WorkloadDirs, key: &ObjectRef) {
    if !dirs.take(key) {
        return;
    }
    let dir = workload_dir(data_root, key);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(workload = %key, dir = %dir.display(), error = %e, "cannot remove the workload's volumes");
    }
}

/// The workloads that have a directory under `<data_root>/volumes` (their `emptyDir`s), kept in
/// memory so that starting or removing a workload without one touches no file. Read from disk
/// when the agent starts, then kept by [`resolve_local`] and [`remove`], the only code that makes
/// or removes those directories.
#[derive(Debug)]
pub(super) struct WorkloadDirs {
    root: PathBuf,
    held: Mutex<HashSet<ObjectRef>>,
}

impl WorkloadDirs {
    pub(super) fn new(data_root: &Path) -> Self {
        WorkloadDirs { root: data_root.join("volumes"), held: Default::default() }
    }

    /// Reads which workloads have a directory, left by earlier runs of the agent.
    pub(super) fn load(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(namespaces) = std::fs::read_dir(&self.root) else { return };
        for ns in namespaces.flatten() {
            let Ok(names) = std::fs::read_dir(ns.path()) else { continue };
            for name in names.flatten() {
                held.insert(ObjectRef::new(ns.file_name().to_string_lossy(), name.file_name().to_string_lossy()));
            }
        }
    }

    /// Whether `key` may have a directory.
    pub(super) fn has(&self, key: &ObjectRef) -> bool {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).contains(key)
    }

    fn add(&self, key: &ObjectRef) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if !held.contains(key) {
            held.insert(key.clone());
        }
    }

    /// Forgets `key`; whether it may have had a directory.
    fn take(&self, key: &ObjectRef) -> bool {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(key)
    }
}

/// The bytes of the files under `dir`, walked without following symbolic links (what `du
/// --apparent-size` counts); 0 when it does not exist. Files vanishing during the walk are
/// skipped.
pub(super) fn usage(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total = total.saturating_add(meta.len());
            }
        }
    }
    total
}

/// `bytes` for people, in binary units: `12Mi`, `10.5Mi`, `300`.
pub(super) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    let mut unit = None;
    let mut scale = 1u64;
    for (i, _) in UNITS.iter().enumerate() {
        let next = 1u64 << (10 * (i + 1));
        if bytes >= next {
            unit = Some(i);
            scale = next;
        }
    }
    match unit {
        None => bytes.to_string(),
        Some(i) if bytes.is_multiple_of(scale) => format!("{}{}", bytes / scale, UNITS[i]),
        Some(i) => format!("{:.1}{}", bytes as f64 / scale as f64, UNITS[i]),
    }
}

/// The sized `emptyDir`s of a workload incarnation: (volume name, limit, directory).
pub(super) fn sized_empty_dirs(
    data_root: &Path,
    key: &ObjectRef,
    uid_tag: &str,
    volumes: &[Volume],
) -> Vec<(String, Quantity, PathBuf)> {
    volumes
        .iter()
        .filter_map(|v| match &v.source {
            VolumeSource::EmptyDir { size_limit: Some(limit) } => {
                Some((v.name.clone(), *limit, workload_dir(data_root, key).join(uid_tag).join(&v.name)))
            }
            _ => None,
        })
        .collect()
}

/// The first sized `emptyDir` over its limit, as the eviction message; `None` when all fit.
/// Walks directories: run it off the async threads.
pub(super) fn over_limit(dirs: &[(String, Quantity, PathBuf)]) -> Option<String> {
    dirs.iter().find_map(|(name, limit, dir)| {
        let used = usage(dir);
        let limit_bytes = u64::try_from(limit.nanos().div_euclid(1_000_000_000)).unwrap_or(0);
        (used > limit_bytes)
            .then(|| format!("emptyDir {name:?} uses {}, over its sizeLimit {limit}", human_bytes(used)))
    })
}

/// One volume published by the agent for a workload.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Publication {
    /// The class of its provider.
    pub(super) class: String,
    /// The volume (the `PersistentVolume`'s name).
    pub(super) volume: String,
    /// The workload uid it is published for.
    pub(super) consumer: String,
}

/// What the agent published for each workload, in memory and in
/// `<data_root>/published/<namespace>/<name>.json`, written before a publish and after an
/// unpublish, so an agent restarted after a workload left (deleted while the agent was down)
/// still unpublishes its volumes.
#[derive(Debug)]
pub(super) struct Publications {
    dir: PathBuf,
    held: Mutex<HashMap<ObjectRef, BTreeSet<Publication>>>,
}

impl Publications {
    pub(super) fn new(data_root: &Path) -> Self {
        Publications { dir: data_root.join("published"), held: Default::default() }
    }

    fn file(&self, key: &ObjectRef) -> PathBuf {
        self.dir.join(&key.namespace).join(format!("{}.json", key.name))
    }

    /// Reads what earlier runs of the agent published; returns the workloads concerned.
    pub(super) fn load(&self) -> Vec<ObjectRef> {
        let mut found = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(&self.dir) else { return found };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for ns in namespaces.flatten() {
            let Ok(files) = std::fs::read_dir(ns.path()) else { continue };
            for file in files.flatten() {
                let path = file.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else {
                    continue;
                };
                let read = std::fs::read(&path).map_err(|e| e.to_string());
                let set: BTreeSet<Publication> =
                    match read.and_then(|t| serde_json::from_slice(&t).map_err(|e| e.to_string())) {
                        Ok(set) => set,
                        Err(error) => {
                            tracing::warn!(file = %path.display(), %error, "unreadable record of published volumes");
                            continue;
                        }
                    };
                let key = ObjectRef::new(ns.file_name().to_string_lossy(), name);
                found.push(key.clone());
                held.insert(key, set);
            }
        }
        found
    }

    pub(super) fn get(&self, key: &ObjectRef) -> BTreeSet<Publication> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned().unwrap_or_default()
    }

    /// The workloads that hold publications.
    pub(super) fn keys(&self) -> Vec<ObjectRef> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// Records `set` as the workload's publications (an empty set removes the record).
    pub(super) fn set(&self, key: &ObjectRef, set: &BTreeSet<Publication>) -> std::io::Result<()> {
        let file = self.file(key);
        if set.is_empty() {
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
            return Ok(());
        }
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(set).expect("a publication always encodes"))?;
        std::fs::rename(&tmp, &file)?;
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), set.clone());
        Ok(())
    }
}

/// The volume a claim volume resolves to, and how to get it.
struct Target {
    /// Index of the volume in the workload's spec.
    index: usize,
    provider: Arc<dyn VolumeProvider>,
    create: CreateVolume,
    publication: Publication,
    /// `spec.volumes[i] ("data"): claim "db-data"`, for messages.
    about: String,
}

/// The free space of the file system holding `dir`, in bytes (`statvfs`: blocks available to
/// unprivileged users times the fragment size).
fn free_space(dir: &Path) -> Result<Quantity, std::io::Error> {
    std::fs::create_dir_all(dir)?;
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let bytes = u128::from(st.blocks_available()) * u128::from(st.fragment_size());
    Ok(Quantity::from_bytes(i64::try_from(bytes).unwrap_or(i64::MAX)))
}

/// Where the default local capacity is kept once measured.
const CAPACITY_FILE: &str = "local-capacity";

/// The default local capacity of the node: the free space of the data root's file system when
/// first measured, kept in `<data_root>/local-capacity` so that the node advertises the same
/// room on every start (the space its volumes use later is part of it, not taken from it).
fn default_capacity(data_root: &Path) -> Result<Quantity, (String, std::io::Error)> {
    let file = data_root.join(CAPACITY_FILE);
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            return text.trim().parse::<Quantity>().map_err(|e| {
                let e = std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
                (format!("reading the local capacity kept in {} (remove it to measure again)", file.display()), e)
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err((format!("reading {}", file.display()), e)),
    }
    let measured =
        free_space(data_root).map_err(|e| (format!("reading the free space of {}", data_root.display()), e))?;
    // A temporary file of its own: agents sharing a data root (simulated ones, in one process)
    // may measure at once; the last rename wins, and each keeps what it measured.
    let tmp = data_root.join(format!(".{CAPACITY_FILE}.{:016x}", fastrand::u64(..)));
    let kept = std::fs::write(&tmp, format!("{measured}\n")).and_then(|()| std::fs::rename(&tmp, &file));
    if let Err(e) = kept {
        let _ = std::fs::remove_file(&tmp);
        return Err((format!("keeping the local capacity in {}", file.display()), e));
    }
    Ok(measured)
}

impl Agent {
    /// Opens the default `local` provider unless one was given for the class, and checks the
    /// class names.
    pub(super) async fn open_volume_providers(&mut self) -> Result<(), AgentError> {
        for class in self.providers.keys() {
            orch_core::validation::dns1123_subdomain(class).map_err(|reason| AgentError::Volume {
                class: class.clone(),
                source: VolumeError::Invalid { field: "volume class".into(), reason },
            })?;
        }
        if self.providers.contains_key(LOCAL_CLASS) {
            return Ok(());
        }
        let class = || LOCAL_CLASS.to_string();
        let capacity = match self.config.local_storage {
            Some(q) => q,
            None => default_capacity(&self.config.data_root).map_err(|(message, e)| AgentError::Volume {
                class: class(),
                source: VolumeError::Backend { volume: String::new(), message, source: Box::new(e) },
            })?,
        };
        let root = self.config.data_root.join("local-volumes");
        let local = crate::LocalVolumes::builder(root, self.config.node_name.clone(), capacity)
            .enforcement(self.config.local_storage_enforcement)
            .open()
            .await
            .map_err(|source| AgentError::Volume { class: class(), source })?;
        self.providers.insert(class(), Arc::new(local));
        Ok(())
    }

    /// What the node reports in `status.storage`: each class it provides, with its room and
    /// access modes. A provider without a bound on its room reports the largest quantity.
    pub(super) fn node_storage(&self) -> Vec<NodeStorage> {
        self.providers
            .iter()
            .filter_map(|(class, p)| {
                let caps = p.capabilities();
                if caps.access_modes.is_empty() {
                    tracing::warn!(class, "a volume provider offers no access mode; the node does not list it");
                    return None;
                }
                Some(NodeStorage {
                    volume_class: class.clone(),
                    capacity: caps.capacity.unwrap_or(Quantity::from_bytes(i64::MAX)),
                    access_modes: caps.access_modes,
                })
            })
            .collect()
    }

    /// Resolves every volume of `workload` to a host directory, in the spec's order: creates its
    /// `emptyDir`s, and creates and publishes the volumes its claims are bound to; or says why
    /// it cannot (then nothing of its claims is published anew).
    pub(super) async fn resolve_volumes(
        &self,
        key: &ObjectRef,
        workload: &Object<Workload>,
        uid_tag: &str,
    ) -> Result<Vec<HostVolume>, Unavailable> {
        let volumes = &workload.spec.volumes;
        // No reclaim runs between reading a claim's volume and publishing it.
        let _ops = match volumes.iter().any(|v| matches!(v.source, VolumeSource::Claim { .. })) {
            true => Some(self.volume_ops.lock().await),
            false => None,
        };
        let mut targets = Vec::new();
        for (i, v) in volumes.iter().enumerate() {
            if let VolumeSource::Claim { claim_name } = &v.source {
                targets.push(self.claim_target(i, v, claim_name, key, &workload.metadata.uid).await?);
            }
        }
        let mut resolved = resolve_local(&self.config.data_root, &self.dirs, key, uid_tag, volumes)
            .map_err(|m| Unavailable::new(VOLUME_UNAVAILABLE, m))?;
        let before = self.publications.get(key);
        let wanted: BTreeSet<Publication> = targets.iter().map(|t| t.publication.clone()).collect();
        // Recorded before publishing, so what is published is never forgotten.
        let all: BTreeSet<Publication> = before.union(&wanted).cloned().collect();
        if all != before {
            self.publications.set(key, &all).map_err(|e| {
                Unavailable::new(VOLUME_UNAVAILABLE, format!("cannot record the volumes published for {key}: {e}"))
            })?;
        }
        let node = self.config.node_name.as_str();
        for t in targets {
            let failed =
                |what: &str, e: VolumeError| Unavailable::new(VOLUME_UNAVAILABLE, format!("{}: {what}: {e}", t.about));
            t.provider.create(&t.create).await.map_err(|e| failed("creating its volume", e))?;
            let published = t
                .provider
                .publish(&t.create.name, node, &t.publication.consumer)
                .await
                .map_err(|e| failed("publishing its volume", e))?;
            resolved.push((t.index, HostVolume { name: volumes[t.index].name.clone(), host_path: published.path }));
        }
        // What an earlier incarnation or spec of this workload used, and this one does not.
        let mut kept = wanted.clone();
        for p in before.difference(&wanted) {
            if !self.unpublish(key, p).await {
                kept.insert(p.clone());
            }
        }
        if kept != all
            && let Err(e) = self.publications.set(key, &kept)
        {
            tracing::warn!(workload = %key, error = %e, "cannot record the volumes published for it");
        }
        resolved.sort_by_key(|(i, _)| *i);
        Ok(resolved.into_iter().map(|(_, v)| v).collect())
    }

    /// The volume the claim `claim_name` of volume `v` (at index `i`) is bound to, if it can be
    /// provided on this node.
    async fn claim_target(
        &self,
        i: usize,
        v: &Volume,
        claim_name: &str,
        key: &ObjectRef,
        uid: &str,
    ) -> Result<Target, Unavailable> {
        let about = format!("spec.volumes[{i}] ({:?}): claim {claim_name:?}", v.name);
        let wait = |why: String| Unavailable::new(WAITING_FOR_VOLUME, format!("{about} {why}"));
        let unreadable = |what: &str, e: orch_core::Error| {
            Unavailable::new(VOLUME_UNAVAILABLE, format!("{about}: cannot read {what}: {e}"))
        };
        let claims: Api<VolumeClaim> = Api::namespaced(self.store.clone(), &key.namespace);
        let claim = match claims.get_opt(claim_name).await {
            Ok(Some(c)) => c,
            Ok(None) => return Err(wait(format!("does not exist in namespace {:?}", key.namespace))),
            Err(e) => return Err(unreadable("the claim", e)),
        };
        if claim.metadata.is_being_deleted() {
            return Err(wait("is being deleted".into()));
        }
        let pv_name = match (&claim.status.phase, &claim.status.volume_name) {
            (ClaimPhase::Bound, Some(name)) => name.clone(),
            (ClaimPhase::Lost, Some(name)) => return Err(wait(format!("is Lost: its volume {name:?} is gone"))),
            (phase, _) => return Err(wait(format!("is {phase:?}, not bound to a volume yet"))),
        };
        let pvs: Api<PersistentVolume> = Api::all(self.store.clone());
        let pv = match pvs.get_opt(&pv_name).await {
            Ok(Some(pv)) => pv,
            Ok(None) => return Err(wait(format!("is bound to volume {pv_name:?}, which does not exist"))),
            Err(e) => return Err(unreadable(&format!("volume {pv_name:?}"), e)),
        };
        if pv.metadata.is_being_deleted() {
            return Err(wait(format!("is bound to volume {pv_name:?}, which is being deleted")));
        }
        let ours = pv.spec.claim_ref.as_ref().is_some_and(|r| {
            r.namespace == key.namespace && r.name == claim_name && (r.uid.is_empty() || r.uid == claim.metadata.uid)
        });
        if !ours {
            return Err(wait(format!("is bound to volume {pv_name:?}, which is bound to another claim")));
        }
        let me = self.config.node_name.as_str();
        if let Some(node) = pv.spec.node_name.as_deref().filter(|n| *n != me) {
            return Err(Unavailable::new(
                VOLUME_NODE_CONFLICT,
                format!(
                    "{about} is bound to volume {pv_name:?}, which lives on node {node:?}, not on this node {me:?}"
                ),
            ));
        }
        let class = &pv.spec.volume_class;
        let Some(provider) = self.providers.get(class) else {
            let provided: Vec<&str> = self.providers.keys().map(String::as_str).collect();
            return Err(Unavailable::new(
                VOLUME_CLASS_UNAVAILABLE,
                format!(
                    "{about} is bound to volume {pv_name:?} of class {class:?}, which node {me:?} does not provide \
                     (it provides: {})",
                    if provided.is_empty() { "none".to_string() } else { provided.join(", ") }
                ),
            ));
        };
        let refused = |why: String| Unavailable::new(VOLUME_UNAVAILABLE, format!("{about}: volume {pv_name:?} {why}"));
        // The volume's own mode: the claim's when the volume offers it.
        let access_mode = match pv.spec.access_modes.as_slice() {
            [] => claim.spec.access_mode,
            modes if modes.contains(&claim.spec.access_mode) => claim.spec.access_mode,
            modes => {
                return Err(refused(format!(
                    "offers {modes:?}, not the claim's access mode {:?}",
                    claim.spec.access_mode
                )));
            }
        };
        if pv.spec.node_name.is_none() && provider.capabilities().node_local {
            // Each node would make its own copy: the volume must say where its data lives.
            return Err(refused(format!("of node-local class {class:?} names no node (spec.nodeName)")));
        }
        Ok(Target {
            index: i,
            provider: provider.clone(),
            create: CreateVolume {
                name: pv_name.clone(),
                capacity: pv.spec.capacity,
                access_mode,
                node: Some(me.to_string()),
            },
            publication: Publication { class: class.clone(), volume: pv_name, consumer: uid.to_string() },
            about: format!("{about} (volume {:?})", pv.metadata.name),
        })
    }

    /// Withdraws one publication; false when the provider failed (it is kept to try again).
    async fn unpublish(&self, key: &ObjectRef, p: &Publication) -> bool {
        let Some(provider) = self.providers.get(&p.class) else {
            // Nothing here can withdraw it any more (the provider is gone with an agent restart).
            tracing::warn!(workload = %key, volume = %p.volume, class = %p.class,
                "no provider of the volume's class on this node; forgetting its publication");
            return true;
        };
        match provider.unpublish(&p.volume, &self.config.node_name, &p.consumer).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(workload = %key, volume = %p.volume, error = %e, "cannot unpublish a volume");
                false
            }
        }
    }

    /// Unpublishes every claim volume of the workload `key` (it is gone from this node); what
    /// fails stays recorded, for a later sync.
    pub(super) async fn unpublish_all(&self, key: &ObjectRef) {
        let held = self.publications.get(key);
        if held.is_empty() {
            return;
        }
        let mut kept = BTreeSet::new();
        for p in &held {
            if !self.unpublish(key, p).await {
                kept.insert(p.clone());
            }
        }
        if let Err(e) = self.publications.set(key, &kept) {
            tracing::warn!(workload = %key, error = %e, "cannot record the volumes published for it");
        }
    }

    /// Reclaims the volumes of this node being deleted (on each change of one, and on the resync
    /// timer while one waits, in use); a restarted agent so finishes what the last one left.
    /// A change of a volume of this node, or of a claim, wakes the workloads waiting for their
    /// volumes.
    ///
    /// Agents sharing a workload cache (thousands in one process, where a watch per agent would
    /// wake every agent on every write) open no watch: they read their node's volumes from the
    /// store on the resync timer, and their waiting workloads look again on their own timer.
    pub(super) async fn watch_volumes(
        self: Arc<Self>,
        queue: WorkQueue<ObjectRef>,
        mine: impl Fn() -> Vec<Arc<Object<Workload>>> + Send + 'static,
    ) {
        let of_node = FieldSelector::equals("spec.nodeName", self.config.node_name.clone());
        let watched = self.shared.is_none().then(|| {
            let selection = Selection::kind(PersistentVolume::KIND).with_fields(of_node.clone());
            let pvs: Cache<PersistentVolume> =
                Cache::spawn(self.store.clone(), CacheConfig { selection, ..CacheConfig::default() });
            let claims: Cache<VolumeClaim> = Cache::spawn(self.store.clone(), CacheConfig::default());
            let changes = (pvs.subscribe(), claims.subscribe());
            (pvs, claims, changes)
        });
        let (pvs, _claims, mut changes) = match watched {
            Some((pvs, claims, changes)) => {
                pvs.ready().await;
                (Some(pvs), Some(claims), Some(changes))
            }
            None => (None, None, None),
        };
        let every = self.config.resync_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let api: Api<PersistentVolume> = Api::all(self.store.clone());
        loop {
            let current = match &pvs {
                Some(pvs) => pvs.list(),
                None => {
                    let params = ListParams { fields: of_node.clone(), ..ListParams::default() };
                    match api.list(&params).await {
                        Ok(list) => list.items.into_iter().map(Arc::new).collect(),
                        Err(e) => {
                            tracing::warn!(node = %self.config.node_name, error = %e, "cannot list the node's volumes");
                            Vec::new()
                        }
                    }
                }
            };
            self.reclaim(&current).await;
            let changed = match changes.as_mut() {
                Some((pv_changes, claim_changes)) => {
                    let changed = tokio::select! {
                        change = pv_changes.recv() => match change {
                            Some(_) => true,
                            None => return,
                        },
                        change = claim_changes.recv() => match change {
                            Some(_) => true,
                            None => return,
                        },
                        _ = tick.tick() => false,
                    };
                    while pv_changes.try_recv().is_ok() {}
                    while claim_changes.try_recv().is_ok() {}
                    changed
                }
                None => {
                    tick.tick().await;
                    false
                }
            };
            if changed {
                for w in mine().iter().filter(|w| waits_for_volumes(&w.status)) {
                    queue.add(ObjectRef::of(w));
                }
            }
        }
    }

    /// Reclaims the volumes of this node that are being deleted and hold no finalizer but
    /// [`VOLUME_RECLAIM_FINALIZER`]: each is deleted at its provider, then that finalizer goes (an update on its resource version,
    /// so a newer state is never overwritten). A volume still in use waits for the next round.
    pub(super) async fn reclaim(&self, pvs: &[Arc<Object<PersistentVolume>>]) {
        let me = self.config.node_name.as_str();
        let api: Api<PersistentVolume> = Api::all(self.store.clone());
        for pv in pvs {
            let name = &pv.metadata.name;
            // The data goes last: only once every other finalizer (the protection held while its
            // claim exists among them) has gone.
            if !pv.metadata.is_being_deleted()
                || pv.spec.node_name.as_deref() != Some(me)
                || !pv.metadata.finalizers.iter().any(|f| f == VOLUME_RECLAIM_FINALIZER)
                || pv.metadata.finalizers.iter().any(|f| f != VOLUME_RECLAIM_FINALIZER)
            {
                continue;
            }
            let Some(provider) = self.providers.get(&pv.spec.volume_class) else {
                tracing::warn!(volume = %name, class = %pv.spec.volume_class,
                    "cannot reclaim a volume of this node: no provider of its class here");
                continue;
            };
            let deleted = {
                let _ops = self.volume_ops.lock().await;
                provider.delete(name).await
            };
            match deleted {
                Ok(()) => {}
                Err(VolumeError::InUse { consumers, .. }) => {
                    tracing::info!(volume = %name, ?consumers, "volume still in use; its reclaim waits");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "cannot delete a volume being reclaimed; retrying");
                    continue;
                }
            }
            let mut next = (**pv).clone();
            next.metadata.finalizers.retain(|f| f != VOLUME_RECLAIM_FINALIZER);
            match api.replace(&next).await {
                Ok(_) => tracing::info!(volume = %name, "volume reclaimed"),
                // Gone already, or changed meanwhile: the cache brings the newer state.
                Err(e) if e.is_not_found() || e.is_conflict() => {}
                Err(e) => tracing::warn!(volume = %name, error = %e, "cannot remove the reclaim finalizer; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, source: VolumeSource) -> Volume {
        Volume { name: name.into(), source }
    }

    fn scratch_root(what: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("orch-volumes-unit-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        root
    }

    #[test]
    fn host_paths_and_empty_dirs_resolve_and_earlier_incarnations_go() {
        let root = scratch_root("resolve");
        let key = ObjectRef::new("default", "db");
        let volumes = [
            vol("host", VolumeSource::HostPath { path: "/srv/data".into() }),
            vol("data", VolumeSource::Claim { claim_name: "db-data".into() }),
            vol("scratch", VolumeSource::EmptyDir { size_limit: Some("1Gi".parse().unwrap()) }),
        ];
        let dirs = WorkloadDirs::new(&root);
        let old = resolve_local(&root, &dirs, &key, "aaaa", &volumes).unwrap();
        assert_eq!(old.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 2], "claims are the agent's");
        assert!(old[1].1.host_path.is_dir());
        let new = resolve_local(&root, &dirs, &key, "bbbb", &volumes).unwrap();
        assert_eq!(new[0].1.host_path, PathBuf::from("/srv/data"));
        assert_eq!(new[1].1.host_path, workload_dir(&root, &key).join("bbbb").join("scratch"));
        assert!(!old[1].1.host_path.exists(), "the earlier incarnation's emptyDir is removed");
        remove(&root, &dirs, &key);
        assert!(!workload_dir(&root, &key).exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn directories_left_by_an_earlier_run_are_known_and_go() {
        let root = scratch_root("earlier-run");
        let key = ObjectRef::new("default", "db");
        let scratch = [vol("scratch", VolumeSource::EmptyDir { size_limit: None })];
        let before = WorkloadDirs::new(&root);
        let old = resolve_local(&root, &before, &key, "aaaa", &scratch).unwrap();
        assert!(old[0].1.host_path.is_dir());
        // A new run of the agent: the record starts empty and is read from disk.
        let dirs = WorkloadDirs::new(&root);
        assert!(!dirs.has(&key));
        dirs.load();
        assert!(dirs.has(&key), "the directory of the earlier run is known");
        // The next incarnation has no emptyDir, yet the earlier one's directory goes.
        resolve_local(&root, &dirs, &key, "bbbb", &[]).unwrap();
        assert!(!old[0].1.host_path.exists(), "the earlier incarnation's emptyDir is removed");
        remove(&root, &dirs, &key);
        assert!(!workload_dir(&root, &key).exists());
        assert!(!dirs.has(&key));
        let _ = std::fs::remove_dir_all(&root);
    }

    /// Every answer of `claim_target`, in the order a binder makes them.
    #[cfg(feature = "simulated")]
    #[tokio::test]
    async fn a_claim_resolves_only_once_bound_to_a_volume_of_this_node_of_a_class_it_provides() {
        use orch_core::Store;
        use orch_core::kinds::ClaimReference;
        let store: Arc<dyn Store> = Arc::new(orch_store::MemoryStore::new());
        let root = scratch_root("claims");
        let local =
            crate::LocalVolumes::open(root.join("local"), "node-1", Quantity::from_bytes(1 << 30)).await.unwrap();
        let config = super::super::AgentConfig { data_root: root.clone(), ..super::super::AgentConfig::new("node-1") };
        let agent = Agent::new(config, store.clone(), Arc::new(crate::SimCluster::new().node("node-1")))
            .with_volume_provider(LOCAL_CLASS, Arc::new(local));
        let key = ObjectRef::new("default", "db");
        let v = vol("data", VolumeSource::Claim { claim_name: "c".into() });
        let answer = async || match agent.claim_target(0, &v, "c", &key, "uid-1").await {
            Ok(t) => Ok((t.create, t.publication)),
            Err(u) => Err((
                u.reason,
                u.message.trim_start_matches("spec.volumes[0] (\"data\"): claim \"c\"").trim_start().to_string(),
            )),
        };
        let waits = |why: &str| Err((WAITING_FOR_VOLUME, why.to_string()));
        assert_eq!(answer().await, waits("does not exist in namespace \"default\""));

        let claims: Api<VolumeClaim> = Api::namespaced(store.clone(), "default");
        let spec = VolumeClaim { size: "1Mi".parse().unwrap(), volume_class: "local".into(), ..Default::default() };
        let claim = claims.create(&Object::new(orch_core::ObjectMeta::named("c"), spec)).await.unwrap();
        assert_eq!(answer().await, waits("is Pending, not bound to a volume yet"));
        let mut bound = claim.clone();
        bound.status.phase = ClaimPhase::Bound;
        bound.status.volume_name = Some("pv-1".into());
        let bound = claims.replace_status(&bound).await.unwrap();
        assert_eq!(answer().await, waits("is bound to volume \"pv-1\", which does not exist"));

        let pvs: Api<PersistentVolume> = Api::all(store.clone());
        let uid = claim.metadata.uid.clone();
        let claim_ref = |name: &str, uid: &str| {
            Some(ClaimReference { namespace: "default".into(), name: name.into(), uid: uid.into() })
        };
        // Where a volume lives, its class and modes cannot change: each case is a volume anew.
        let put = async |f: &dyn Fn(&mut PersistentVolume)| {
            let mut pv = PersistentVolume {
                capacity: "1Mi".parse().unwrap(),
                access_modes: vec![orch_core::kinds::AccessMode::ReadWriteOnce],
                volume_class: "local".into(),
                node_name: Some("node-1".into()),
                claim_ref: claim_ref("c", &uid),
                ..Default::default()
            };
            f(&mut pv);
            if pvs.get_opt("pv-1").await.unwrap().is_some() {
                pvs.delete("pv-1", &orch_core::DeleteOptions::default()).await.unwrap();
            }
            pvs.create(&Object::new(orch_core::ObjectMeta::named("pv-1"), pv)).await.unwrap();
        };
        put(&|pv| {
            pv.node_name = Some("node-2".into());
            pv.claim_ref = claim_ref("other", "");
        })
        .await;
        assert_eq!(answer().await, waits("is bound to volume \"pv-1\", which is bound to another claim"));
        put(&|pv| pv.node_name = Some("node-2".into())).await;
        assert_eq!(
            answer().await,
            Err((
                VOLUME_NODE_CONFLICT,
                "is bound to volume \"pv-1\", which lives on node \"node-2\", not on this node \"node-1\"".into()
            ))
        );
        put(&|pv| pv.volume_class = "fast".into()).await;
        assert_eq!(
            answer().await,
            Err((
                VOLUME_CLASS_UNAVAILABLE,
                "is bound to volume \"pv-1\" of class \"fast\", which node \"node-1\" does not provide (it provides: \
                 local)"
                    .into()
            ))
        );
        // A node-local volume must say which node holds it; the claim's mode must be the volume's.
        put(&|pv| pv.node_name = None).await;
        let refused = |why: &str| Err((VOLUME_UNAVAILABLE, format!(": volume \"pv-1\" {why}")));
        assert_eq!(answer().await, refused("of node-local class \"local\" names no node (spec.nodeName)"));
        put(&|pv| {
            pv.node_name = None;
            pv.access_modes = vec![orch_core::kinds::AccessMode::ReadOnlyMany];
        })
        .await;
        assert_eq!(answer().await, refused("offers [ReadOnlyMany], not the claim's access mode ReadWriteOnce"));
        put(&|_| {}).await;
        let (create, publication) = answer().await.unwrap();
        assert_eq!(
            create,
            CreateVolume {
                name: "pv-1".into(),
                capacity: "1Mi".parse().unwrap(),
                access_mode: orch_core::kinds::AccessMode::ReadWriteOnce,
                node: Some("node-1".into()),
            }
        );
        assert_eq!(publication, Publication { class: "local".into(), volume: "pv-1".into(), consumer: "uid-1".into() });

        let mut lost = bound;
        lost.status.phase = ClaimPhase::Lost;
        claims.replace_status(&lost).await.unwrap();
        assert_eq!(answer().await, waits("is Lost: its volume \"pv-1\" is gone"));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn usage_sums_the_files_of_a_tree_and_the_limit_check_names_volume_usage_and_limit() {
        let root = scratch_root("usage");
        let dir = root.join("scratch");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("one"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.join("a/b/two"), vec![0u8; 2048]).unwrap();
        std::os::unix::fs::symlink("/usr", dir.join("a/link")).unwrap();
        let used = usage(&dir);
        assert!((3048..3048 + 64).contains(&used), "3048 bytes of files and a short link, not /usr: {used}");
        assert_eq!(usage(&root.join("absent")), 0);
        let fits = [("scratch".to_string(), Quantity::from_bytes(4096), dir.clone())];
        assert_eq!(over_limit(&fits), None);
        let tight = [("scratch".to_string(), "2Ki".parse().unwrap(), dir.clone())];
        let message = over_limit(&tight).unwrap();
        assert!(message.starts_with("emptyDir \"scratch\" uses 3.0Ki"), "{message}");
        assert!(message.ends_with("over its sizeLimit 2Ki"), "{message}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_default_local_capacity_is_measured_once_and_kept() {
        let root = scratch_root("capacity");
        std::fs::create_dir_all(&root).unwrap();
        let measured = default_capacity(&root).unwrap();
        assert!(measured.nanos() > 0);
        let kept = std::fs::read_to_string(root.join(CAPACITY_FILE)).unwrap();
        assert_eq!(kept.trim().parse::<Quantity>().unwrap(), measured);
        // Later starts read what was kept, not the file system's free space now.
        std::fs::write(root.join(CAPACITY_FILE), "3Gi\n").unwrap();
        assert_eq!(default_capacity(&root).unwrap(), "3Gi".parse::<Quantity>().unwrap());
        std::fs::write(root.join(CAPACITY_FILE), "lots").unwrap();
        let (message, _) = default_capacity(&root).unwrap_err();
        assert!(message.contains("local-capacity (remove it to measure again)"), "{message}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(human_bytes(300), "300");
        assert_eq!(human_bytes(12 << 20), "12Mi");
        assert_eq!(human_bytes((10 << 20) + (1 << 19)), "10.5Mi");
        assert_eq!(human_bytes(3 << 30), "3Gi");
    }

    #[test]
    fn publications_survive_a_restart_and_an_empty_set_removes_the_record() {
        let root = scratch_root("published");
        let key = ObjectRef::new("default", "db.v2");
        let first = Publications::new(&root);
        let p = Publication { class: "local".into(), volume: "pvc-1".into(), consumer: "uid-1".into() };
        first.set(&key, &BTreeSet::from([p.clone()])).unwrap();
        let again = Publications::new(&root);
        assert_eq!(again.load(), vec![key.clone()]);
        assert_eq!(again.get(&key), BTreeSet::from([p]));
        again.set(&key, &BTreeSet::new()).unwrap();
        assert!(again.keys().is_empty());
        assert!(Publications::new(&root).load().is_empty(), "the record is gone from disk too");
        let _ = std::fs::remove_dir_all(&root);
    }
}
