//! Node providers: the backend that knows about machines. A [`NodeProvider`] launches and
//! terminates the machine behind a node of a [`NodePool`]'s shape: a cloud's API, a pool of spare
//! hosts, or `orch_runtime::LocalNodes`, which runs each node as an agent in this process. The
//! node provisioner of `orch-controllers` decides when to ask for one.

use std::time::Duration;

use async_trait::async_trait;

use crate::kinds::{Resources, Taint};
use crate::labels::Labels;

/// The label naming the pool a provisioned node belongs to.
pub const POOL_LABEL: &str = "node.orch.dev/pool";

/// A shape of node the provisioner may ask for, and how many of them at most.
#[derive(Debug, Clone)]
pub struct NodePool {
    /// Names the pool (a label value; nodes are named `<pool>-<suffix>`).
    pub name: String,
    /// Labels of its nodes (the pool label is added).
    pub labels: Labels,
    /// Taints of its nodes.
    pub taints: Vec<Taint>,
    /// What each node offers (`cpu`, `memory`, `pods`, `gpu`…).
    pub capacity: Resources,
    /// Most nodes of this pool at once, launching or running.
    pub max_nodes: usize,
    /// Give back a node that has run no workload this long (`None`: keep it).
    pub empty_after: Option<Duration>,
}

impl NodePool {
    /// A pool of nodes offering `capacity`, at most `max_nodes` of them, kept when empty.
    pub fn new(name: impl Into<String>, capacity: Resources, max_nodes: usize) -> Self {
        NodePool {
            name: name.into(),
            labels: Labels::new(),
            taints: Vec::new(),
            capacity,
            max_nodes,
            empty_after: None,
        }
    }

    /// Gives back nodes that stay empty for `after`.
    pub fn empty_after(mut self, after: Duration) -> Self {
        self.empty_after = Some(after);
        self
    }

    /// Adds a label to its nodes.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key, value);
        self
    }

    /// Adds a taint to its nodes.
    pub fn taint(mut self, taint: Taint) -> Self {
        self.taints.push(taint);
        self
    }
}

/// Why a provider could not launch or terminate a machine (a cloud API's refusal, a quota, a
/// lost connection); the provider's own error travels as the source.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    /// What failed, in the provider's words.
    pub message: String,
    /// The provider's own error.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProviderError {
    /// An error with a message and no source.
    pub fn new(message: impl Into<String>) -> Self {
        ProviderError { message: message.into(), source: None }
    }

    /// An error caused by `source`.
    pub fn with_source(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        ProviderError { message: message.into(), source: Some(Box::new(source)) }
    }
}

/// Launches and terminates the machines behind provisioned nodes.
///
/// # To ensure correctness
/// - `launch` starts a machine whose agent registers as node `name` (the node object already
///   exists, cordoned; the agent fills in its status). It may return before the machine is up:
///   the provisioner waits for the node to turn `Ready`, and terminates it after
///   `launch_timeout`.
/// - `terminate` must succeed for a machine that is already gone, or was never launched.
#[async_trait]
pub trait NodeProvider: Send + Sync + 'static {
    /// Starts a machine of `pool`'s shape that registers as node `name`; returns its provider id
    /// (recorded in the node's `spec.providerId`).
    async fn launch(&self, name: &str, pool: &NodePool) -> Result<String, ProviderError>;

    /// Stops the machine of node `name`.
    async fn terminate(&self, name: &str, pool: &NodePool) -> Result<(), ProviderError>;
}
