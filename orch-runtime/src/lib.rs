//! # orch-runtime
//!
//! [`Runtime`](orch_core::Runtime) backends for orch: they run the containers and processes of
//! the workloads a node agent is given.
//!
//! | backend | feature | what it runs |
//! |---|---|---|
//! | [`ProcessRuntime`] | `process` (default) | real OS processes, each in its own process group, with per-instance directories and log files; survives an agent restart |
//!
//! The Docker Engine and simulated-node backends are not built yet. Every backend passes
//! `orch_core::testkit::runtime`.

#[cfg(feature = "process")]
pub mod process;

#[cfg(feature = "process")]
pub use process::ProcessRuntime;
