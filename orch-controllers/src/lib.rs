//! # orch-controllers
//!
//! The control plane's own controllers, built on `orch-core`'s reconcile loop and
//! [`Manager`](orch_core::Manager) like any controller an application writes:
//!
//! - [`node_lifecycle`]: notices nodes whose agents stopped heartbeating, marks them not ready
//!   and tainted, and after a timeout evicts their workloads, rate-limited;
//! - [`provisioner`]: asks a [`NodeProvider`](orch_core::provider::NodeProvider) for new nodes
//!   when workloads fit nowhere (packing them with the scheduler's own plugins), and gives back
//!   nodes that stay empty;
//! - the workload controllers: [`deployment`] (rolling update, recreate, proportional scaling,
//!   rollback by hand and by itself) with [`replicaset`], [`daemonset`], [`statefulset`]
//!   (stable names, a claim per replica, ordered start, partitioned rolling update), [`job`] and
//!   [`workflow`];
//! - [`endpoints`]: keeps each service's endpoints in bounded slices and gives services their
//!   cluster addresses and node ports;
//! - [`volumes`]: provides a volume for each claim on the node of its first workload, binds
//!   them, and reclaims volumes when their claims go;
//! - [`gc`]: the garbage collector, following owner references (background, foreground and
//!   orphan deletes).
//!
//! Each goes into a manager through [`Manager::add`](orch_core::Manager::add):
//!
//! ```no_run
//! use std::sync::Arc;
//! use orch_controllers::NodeLifecycle;
//! use orch_core::{Manager, Store};
//!
//! # async fn run(store: Arc<dyn Store>) -> orch_core::Result<()> {
//! let mut manager = Manager::new(store);
//! manager.add(NodeLifecycle::builder(Default::default()));
//! manager.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! The scheduler lives in `orch-scheduler`, the node agent in `orch-runtime`.

pub mod daemonset;
pub mod deployment;
pub mod endpoints;
mod error;
pub mod gc;
pub mod job;
pub mod node_lifecycle;
pub mod provisioner;
pub mod replicaset;
pub mod statefulset;
pub mod volumes;
pub mod workflow;
mod workloads;

pub use daemonset::DaemonSetController;
pub use deployment::DeploymentController;
pub use endpoints::{EndpointsConfig, EndpointsController};
pub use error::ProvisionerError;
pub use gc::GarbageCollector;
pub use job::JobController;
pub use node_lifecycle::{NodeLifecycle, NodeLifecycleConfig};
pub use provisioner::{PassReport, Provisioner, ProvisionerConfig};
pub use replicaset::ReplicaSetController;
pub use statefulset::StatefulSetController;
pub use volumes::VolumeBinder;
pub use workflow::WorkflowController;
