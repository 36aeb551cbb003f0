//! Volume providers: the backend that creates storage and makes it available on nodes, in the
//! spirit of CSI. A [`VolumeProvider`] creates a volume of a size, deletes it, publishes it on a
//! node for a consumer (answering where its data is on that node) and unpublishes it, and says
//! in [`VolumeCapabilities`] what it supports. `orch_runtime::LocalVolumes` keeps node-local
//! volumes as directories under an agent's data root.
//!
//! A provider depends on `orch-core` only; binding claims to volumes, scheduling by where data
//! lives and mounting into workloads are the callers' work.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::kinds::AccessMode;
use crate::quantity::Quantity;

/// What a provider supports, so callers refuse what it cannot do instead of discovering it late.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeCapabilities {
    /// The access modes it can create volumes with.
    pub access_modes: Vec<AccessMode>,
    /// Whether a volume's size is enforced (writes beyond it fail). When `false` the size is only
    /// accounted: it reserves room but does not stop a consumer from writing more.
    pub enforces_size: bool,
    /// Whether each volume lives on one node and can be published only there.
    pub node_local: bool,
    /// Room for all its volumes in bytes, when it is bounded (a node's local capacity).
    pub capacity: Option<Quantity>,
}

/// A volume to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    /// Its name, unique at the provider: the `PersistentVolume`'s name (a DNS-1123 subdomain).
    pub name: String,
    /// Its size in bytes; more than zero.
    pub capacity: Quantity,
    /// How it will be shared.
    pub access_mode: AccessMode,
    /// For a node-local provider: the node it must live on (the one the scheduler chose). `None`
    /// lets the provider choose.
    pub node: Option<String>,
}

/// A volume the provider holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvidedVolume {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub capacity: Quantity,
    /// How it may be shared.
    pub access_mode: AccessMode,
    /// The node it lives on, for node-local storage.
    pub node: Option<String>,
}

/// Where a published volume's data is on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// A directory on the node holding the volume's data, to hand to the runtime.
    pub path: PathBuf,
}

/// Why a provider refused or failed a call.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume does not exist at this provider.
    #[error("volume {volume:?} not found")]
    NotFound {
        /// The volume asked for.
        volume: String,
    },
    /// A request was malformed: the field and why.
    #[error("{field}: {reason}")]
    Invalid {
        /// The request field at fault (`name`, `capacity`, `consumer`).
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// The provider cannot do this: an unsupported access mode, a node it does not serve, a
    /// create naming an existing volume with other parameters.
    #[error("volume {volume:?}: {reason}")]
    Refused {
        /// The volume concerned.
        volume: String,
        /// Why.
        reason: String,
    },
    /// Not enough room left for the volume.
    #[error("volume {volume:?} needs {requested} but {where_} has only {available} left")]
    InsufficientCapacity {
        /// The volume that did not fit.
        volume: String,
        /// Its size.
        requested: Quantity,
        /// What is left.
        available: Quantity,
        /// Where the room was looked for, with its total (`node "n1" (local capacity 10Gi)`).
        where_: String,
    },
    /// The volume is still published for these consumers.
    #[error("volume {volume:?} is in use by {}", consumers.join(", "))]
    InUse {
        /// The volume concerned.
        volume: String,
        /// Who still has it published.
        consumers: Vec<String>,
    },
    /// The backend failed (a file system error, an unreachable storage API); its error is the
    /// source.
    #[error("volume {volume:?}: {message}")]
    Backend {
        /// The volume concerned.
        volume: String,
        /// What failed.
        message: String,
        /// The backend's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Creates, deletes, publishes and unpublishes volumes.
///
/// Callers may repeat any call after a crash or a lost answer, so every method is idempotent.
#[async_trait]
pub trait VolumeProvider: Send + Sync + 'static {
    /// What it supports.
    ///
    /// # To ensure correctness
    /// - The answer does not change over the provider's life: callers may read it once.
    /// - `enforces_size` is `true` only if a consumer cannot store more than a volume's capacity.
    fn capabilities(&self) -> VolumeCapabilities;

    /// Creates the volume `req.name`, or answers the one that exists.
    ///
    /// # To ensure correctness
    /// - Idempotent: creating a volume that exists with the same capacity and access mode
    ///   answers it, unchanged and with its data; one that exists with other parameters is
    ///   `Refused`, never resized or replaced.
    /// - A capacity that is not a whole positive number of bytes, or a name that is not a
    ///   DNS-1123 subdomain, is `Invalid`; an access mode outside
    ///   [`capabilities`](Self::capabilities) or a node the provider does not serve is `Refused`.
    /// - A volume that does not fit is `InsufficientCapacity` and leaves nothing behind.
    /// - A new volume is empty.
    async fn create(&self, req: &CreateVolume) -> Result<ProvidedVolume, VolumeError>;

    /// Deletes the volume `name` and its data.
    ///
    /// # To ensure correctness
    /// - Idempotent: deleting a volume that does not exist succeeds.
    /// - A volume still published for a consumer is `InUse` and is kept, data and all.
    /// - Once it succeeds, the volume's room is free again and a create of the same name
    ///   answers an empty volume.
    async fn delete(&self, name: &str) -> Result<(), VolumeError>;

    /// Makes the volume `name` available on `node` for `consumer` (a workload instance's id),
    /// answering where its data is.
    ///
    /// # To ensure correctness
    /// - A volume that does not exist is `NotFound`.
    /// - Idempotent: publishing again for the same consumer answers the same path.
    /// - A node-local volume published on another node than its own is `Refused`, naming its node.
    /// - The data is the volume's: what one publication wrote, the next one reads, whatever
    ///   unpublishes came between.
    async fn publish(&self, name: &str, node: &str, consumer: &str) -> Result<Published, VolumeError>;

    /// Withdraws the volume `name` from `consumer` on `node`; its data stays.
    ///
    /// # To ensure correctness
    /// - Idempotent: a consumer that has no publication on `node`, or a volume that no longer exists,
    ///   succeeds (so cleanup after a crash never stalls).
    /// - Once the last consumer is unpublished, `delete` no longer answers `InUse`.
    async fn unpublish(&self, name: &str, node: &str, consumer: &str) -> Result<(), VolumeError>;
}
