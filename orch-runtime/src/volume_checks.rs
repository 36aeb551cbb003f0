//! What every node-local volume provider of this crate checks the same way ([`LocalVolumes`]
//! and, with feature `docker`, `DockerVolumes`): names, sizes, access modes, the node, a repeated
//! create, and room left. Each returns the [`VolumeError`] the provider contract asks for.
//!
//! [`LocalVolumes`]: crate::LocalVolumes

use orch_core::kinds::AccessMode;
use orch_core::storage::CreateVolume;
use orch_core::{Quantity, VolumeError, validation};

const NANOS_PER_BYTE: i128 = 1_000_000_000;

/// A quantity in whole bytes (any fraction dropped; sizes are checked to be whole first).
pub(crate) fn bytes(q: &Quantity) -> i128 {
    q.nanos() / NANOS_PER_BYTE
}

/// A node's capacity for volumes, given when a provider is made: whole bytes, zero or more.
pub(crate) fn check_node_capacity(capacity: &Quantity) -> Result<(), VolumeError> {
    if capacity.is_negative() || capacity.nanos() % NANOS_PER_BYTE != 0 {
        return Err(VolumeError::Invalid {
            field: "capacity".into(),
            reason: format!("must be a whole number of bytes >= 0 (is {capacity})"),
        });
    }
    Ok(())
}

/// A volume name: a DNS-1123 subdomain.
pub(crate) fn check_name(name: &str) -> Result<(), VolumeError> {
    validation::dns1123_subdomain(name).map_err(|reason| VolumeError::Invalid { field: "name".into(), reason })
}

/// `asked` is the node `volume` lives on (`own`), else `Refused` naming its node.
pub(crate) fn check_node(volume: &str, own: &str, asked: &str) -> Result<(), VolumeError> {
    if asked != own {
        return Err(VolumeError::Refused {
            volume: volume.to_string(),
            reason: format!("it lives on node {own:?}, not {asked:?}"),
        });
    }
    Ok(())
}

/// A create for a node-local, `ReadWriteOnce`-only provider (`kind`, e.g. "local volumes") of
/// node `node`: a valid name, a whole positive size, the one access mode, this node if one is
/// named.
pub(crate) fn check_create(req: &CreateVolume, kind: &str, node: &str) -> Result<(), VolumeError> {
    check_name(&req.name)?;
    let c = &req.capacity;
    if c.is_negative() || c.is_zero() || c.nanos() % NANOS_PER_BYTE != 0 {
        return Err(VolumeError::Invalid {
            field: "capacity".into(),
            reason: format!("must be a whole number of bytes more than 0 (is {c})"),
        });
    }
    if req.access_mode != AccessMode::ReadWriteOnce {
        return Err(VolumeError::Refused {
            volume: req.name.clone(),
            reason: format!("{kind} offer ReadWriteOnce only, not {}", req.access_mode),
        });
    }
    if let Some(asked) = &req.node {
        check_node(&req.name, node, asked)?;
    }
    Ok(())
}

/// A create of a volume that exists with `capacity` and `access_mode`: the same parameters, or
/// `Refused` (never resized or replaced).
pub(crate) fn check_same(req: &CreateVolume, capacity: &Quantity, access_mode: AccessMode) -> Result<(), VolumeError> {
    if *capacity != req.capacity || access_mode != req.access_mode {
        return Err(VolumeError::Refused {
            volume: req.name.clone(),
            reason: format!(
                "exists with capacity {capacity} and {access_mode}, not {} and {}",
                req.capacity, req.access_mode
            ),
        });
    }
    Ok(())
}

/// Bytes of `capacity` not given to volumes of `used` bytes in all.
pub(crate) fn free_bytes(capacity: &Quantity, used: i128) -> i128 {
    (bytes(capacity) - used).max(0)
}

/// Whether `req` fits in `free` bytes; else `InsufficientCapacity` saying what is left of
/// `where_` (`node "n1" (local capacity 10Gi)`).
pub(crate) fn check_fits(req: &CreateVolume, free: i128, where_: impl FnOnce() -> String) -> Result<(), VolumeError> {
    if bytes(&req.capacity) > free {
        return Err(VolumeError::InsufficientCapacity {
            volume: req.name.clone(),
            requested: req.capacity,
            available: Quantity::from_bytes(free as i64),
            where_: where_(),
        });
    }
    Ok(())
}
