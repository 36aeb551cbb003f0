//! [`AgentError`]: why a node agent could not do its work, told apart by where it failed.

use orch_core::RuntimeError;

/// Why the agent could not register, heartbeat or bring a workload in line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The store refused a call or could not serve it.
    #[error(transparent)]
    Store(#[from] orch_core::Error),
    /// The runtime failed (listing, reading, stopping or starting an instance).
    #[error("runtime {runtime}: {what}: {source}")]
    Runtime {
        /// The runtime's name (`process`, `docker`, `simulated`...).
        runtime: String,
        /// What the agent was doing, and for which workload.
        what: String,
        /// The runtime's own error.
        #[source]
        source: RuntimeError,
    },
    /// A volume provider could not be set up (the default `local` one could not open its
    /// directory, or a provider was given for a class that is not a valid name).
    #[error("volume class {class:?}: {source}")]
    Volume {
        /// The volume class of the provider.
        class: String,
        /// The provider's error.
        #[source]
        source: orch_core::VolumeError,
    },
}
