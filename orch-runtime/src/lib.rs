//! # orch-runtime
//!
//! Everything that runs on a node: the [`Agent`] that turns the workloads bound to its node into
//! running instances, and the [`Runtime`](orch_core::Runtime) backends it drives.
//!
//! | part | feature | what it does |
//! |---|---|---|
//! | [`Agent`] | always | registers its node, keeps a heartbeat lease, runs the workloads bound to the node with restart policies, crash-loop backoff, probes and log rotation; makes their volumes available (claims through volume providers, `local` by default), evicts past `emptyDir` size limits, reclaims its node's volumes; adopts what runs after its own restart |
//! | [`net`] | always (`dns` for the DNS server) | service traffic on a node: the in-process [`Resolver`](net::Resolver), the [`NodeProxy`](net::NodeProxy) (TCP and UDP, power of two choices over ready endpoints), the cluster DNS server on hickory-server |
//! | [`LocalNodes`] | always | a [`NodeProvider`](orch_core::provider::NodeProvider) that runs each node as an agent in this process (simulated clusters, tests) |
//! | [`LocalVolumes`] | always | a [`VolumeProvider`](orch_core::VolumeProvider) for a node's local storage: a directory per volume under a data root, sizes accounted against the node's capacity and enforced where loop mounts work (an ext4 image per volume, [`Enforcement`]) |
//! | [`ProcessRuntime`] | `process` (default) | real OS processes, each in its own process group, with per-instance directories and log files, limits through cgroups; survives an agent restart |
//! | [`SimulatedRuntime`] | `simulated` (default) | virtual instances on virtual nodes with declarative behaviour and fault injection, in `tokio::time` (virtual time on a paused runtime) |
//! | `DockerRuntime` | `docker` | containers on a Docker Engine over its API (bollard), labelled per node and instance; survives an agent restart |
//! | `DockerVolumes` | `docker` | a [`VolumeProvider`](orch_core::VolumeProvider) of Docker named volumes (driver `local`) on the node's engine, labelled with their size and access mode, sizes accounted against the node's capacity (not enforced) |
//!
//! The process, simulated and Docker runtimes pass `orch_core::testkit::runtime`; [`LocalVolumes`]
//! and `DockerVolumes` pass `orch_core::testkit::volume`.
//!
//! ```no_run
//! # #[cfg(feature = "process")]
//! # async fn run(store: std::sync::Arc<dyn orch_core::Store>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use orch_runtime::{Agent, AgentConfig, ProcessRuntime};
//!
//! let runtime = Arc::new(ProcessRuntime::new("/var/lib/orch/node-1")?);
//! let agent = Agent::new(AgentConfig::new("node-1"), store, runtime);
//! // Runs until ctrl-c, then stops its instances (drain = true).
//! agent.run(async { let _ = tokio::signal::ctrl_c().await; }, true).await?;
//! # Ok(())
//! # }
//! ```
//!
//! The scheduler lives in `orch-scheduler`, the control plane's controllers in
//! `orch-controllers`, the stores in `orch-store`.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod agent;
#[cfg(feature = "process")]
#[cfg_attr(docsrs, doc(cfg(feature = "process")))]
pub mod cgroup;
#[cfg(feature = "docker")]
#[cfg_attr(docsrs, doc(cfg(feature = "docker")))]
pub mod docker;
pub mod local_nodes;
pub mod local_volumes;
mod loop_fs;
pub mod net;
#[cfg(feature = "process")]
#[cfg_attr(docsrs, doc(cfg(feature = "process")))]
pub mod process;
#[cfg(feature = "process")]
mod pty;
#[cfg(feature = "simulated")]
#[cfg_attr(docsrs, doc(cfg(feature = "simulated")))]
pub mod simulated;
mod volume_checks;

pub use agent::{Agent, AgentConfig, AgentError, SharedRenewals, instances_of, previous_logs_path};
#[cfg(feature = "docker")]
#[cfg_attr(docsrs, doc(cfg(feature = "docker")))]
pub use docker::{ContainerDns, DockerConfig, DockerError, DockerRuntime, DockerVolumes};
pub use local_nodes::LocalNodes;
pub use local_volumes::{Enforcement, LocalVolumes, LocalVolumesBuilder};
#[cfg(feature = "process")]
#[cfg_attr(docsrs, doc(cfg(feature = "process")))]
pub use process::ProcessRuntime;
#[cfg(feature = "simulated")]
#[cfg_attr(docsrs, doc(cfg(feature = "simulated")))]
pub use simulated::{Behaviour, SimCluster, SimulatedRuntime};
