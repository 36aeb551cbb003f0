//! [`ProvisionerError`]: why a pass of the node provisioner stopped, told apart by where it failed.

use orch_core::provider::ProviderError;

/// Why a provisioner pass could not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionerError {
    /// The store refused a call or could not serve it.
    #[error(transparent)]
    Store(#[from] orch_core::Error),
    /// The node provider could not terminate a machine (a failed launch is not an error of the
    /// pass: its pool is passed over for a while instead).
    #[error("terminating node {node}: {source}")]
    Terminate {
        /// The node whose machine it was.
        node: String,
        /// The provider's error.
        #[source]
        source: ProviderError,
    },
}
