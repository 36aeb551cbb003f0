//! [`SchedulerError`]: why the scheduler refused its configuration.

use orch_core::ValidationError;

/// Why a scheduler could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// A profile's configuration was refused: unknown or repeated plugins, bad weights or plugin
    /// arguments, each named with its field (`plugins[2].args: ...`).
    #[error("invalid scheduler profile: {0}")]
    InvalidProfile(#[source] ValidationError),
}
