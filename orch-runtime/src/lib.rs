//! # orch-runtime
//!
//! [`Runtime`](orch_core::Runtime) backends for orch: they run the containers and processes of
//! the workloads a node agent is given.
//!
//! | backend | feature | what it runs |
//! |---|---|---|
//! | [`ProcessRuntime`] | `process` (default) | real OS processes, each in its own process group, with per-instance directories and log files; survives an agent restart |
//! | [`SimulatedRuntime`] | `simulated` (default) | virtual instances on virtual nodes with declarative behaviour and fault injection, in `tokio::time` (virtual time on a paused runtime) |
//! | `DockerRuntime` | `docker` | containers on a Docker Engine over its API (bollard), labelled per node and instance; survives an agent restart |
//!
//! The process and Docker runtimes pass `orch_core::testkit::runtime`; the simulated one runs no
//! shell, so it has tests of its own.

#[cfg(feature = "process")]
pub mod cgroup;
#[cfg(feature = "docker")]
pub mod docker;
#[cfg(feature = "process")]
pub mod process;

#[cfg(feature = "simulated")]
pub mod simulated;

#[cfg(feature = "docker")]
pub use docker::{DockerConfig, DockerError, DockerRuntime};
#[cfg(feature = "process")]
pub use process::ProcessRuntime;
#[cfg(feature = "simulated")]
pub use simulated::{Behaviour, SimCluster, SimulatedRuntime};
