//! The volumes of a workload, made available on the node before its instances start: a
//! `hostPath` is the node's directory, an `emptyDir` a fresh directory of the workload under the
//! agent's data root, removed with the workload. What the agent cannot provide (a `claim`, which
//! no volume provider binds yet, or an `emptyDir` size limit, which it cannot enforce) is refused
//! with the reason: the workload never runs without its data.

use std::path::{Path, PathBuf};

use orch_core::ObjectRef;
use orch_core::kinds::{Volume, VolumeSource};
use orch_core::runtime::HostVolume;

/// The directory holding the `emptyDir` volumes of one workload (all its incarnations).
pub(super) fn workload_dir(data_root: &Path, key: &ObjectRef) -> PathBuf {
    data_root.join("volumes").join(&key.namespace).join(&key.name)
}

/// Resolves `volumes` to host directories for the workload incarnation tagged `uid_tag`,
/// creating its `emptyDir`s; or says why one cannot be provided.
pub(super) fn resolve(
    data_root: &Path,
    key: &ObjectRef,
    uid_tag: &str,
    volumes: &[Volume],
) -> Result<Vec<HostVolume>, String> {
    let mut resolved = Vec::with_capacity(volumes.len());
    let own = workload_dir(data_root, key);
    for (i, v) in volumes.iter().enumerate() {
        let host_path = match &v.source {
            VolumeSource::HostPath { path } => PathBuf::from(path),
            VolumeSource::EmptyDir { size_limit: Some(limit) } => {
                return Err(format!(
                    "spec.volumes[{i}] ({:?}): emptyDir.sizeLimit {limit} cannot be enforced on this node",
                    v.name
                ));
            }
            VolumeSource::EmptyDir { size_limit: None } => {
                let dir = own.join(uid_tag).join(&v.name);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("spec.volumes[{i}] ({:?}): creating {}: {e}", v.name, dir.display()))?;
                dir
            }
            VolumeSource::Claim { claim_name } => {
                return Err(format!(
                    "spec.volumes[{i}] ({:?}): claim {claim_name:?} is not provided: no volume provider binds claims",
                    v.name
                ));
            }
        };
        resolved.push(HostVolume { name: v.name.clone(), host_path });
    }
    // Directories of earlier incarnations of this workload (deleted and created again under the
    // same name) go.
    if let Ok(entries) = std::fs::read_dir(&own) {
        for entry in entries.flatten() {
            if entry.file_name() != uid_tag {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(resolved)
}

/// Removes every `emptyDir` of the workload (it is gone from this node).
pub(super) fn remove(data_root: &Path, key: &ObjectRef) {
    let dir = workload_dir(data_root, key);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(workload = %key, dir = %dir.display(), error = %e, "cannot remove the workload's volumes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, source: VolumeSource) -> Volume {
        Volume { name: name.into(), source }
    }

    #[test]
    fn host_paths_and_empty_dirs_resolve_and_earlier_incarnations_go() {
        let root = std::env::temp_dir().join(format!("orch-volumes-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let key = ObjectRef::new("default", "db");
        let volumes = [
            vol("host", VolumeSource::HostPath { path: "/srv/data".into() }),
            vol("scratch", VolumeSource::EmptyDir { size_limit: None }),
        ];
        let old = resolve(&root, &key, "aaaa", &volumes).unwrap();
        assert!(old[1].host_path.is_dir());
        let new = resolve(&root, &key, "bbbb", &volumes).unwrap();
        assert_eq!(new[0].host_path, PathBuf::from("/srv/data"));
        assert_eq!(new[1].host_path, workload_dir(&root, &key).join("bbbb").join("scratch"));
        assert!(!old[1].host_path.exists(), "the earlier incarnation's emptyDir is removed");
        remove(&root, &key);
        assert!(!workload_dir(&root, &key).exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn what_the_agent_cannot_provide_is_refused_naming_the_volume() {
        let root = std::env::temp_dir().join(format!("orch-volumes-unit-refused-{}", std::process::id()));
        let key = ObjectRef::new("default", "db");
        let claim = [vol("data", VolumeSource::Claim { claim_name: "db-data".into() })];
        let e = resolve(&root, &key, "t", &claim).unwrap_err();
        assert!(e.contains("spec.volumes[0]") && e.contains("\"db-data\" is not provided"), "{e}");
        let sized = [vol("cache", VolumeSource::EmptyDir { size_limit: Some("1Gi".parse().unwrap()) })];
        let e = resolve(&root, &key, "t", &sized).unwrap_err();
        assert!(e.contains("sizeLimit 1Gi cannot be enforced"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
