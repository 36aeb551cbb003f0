//! # orch
//!
//! A toolkit for building container orchestrators. This crate is the front door: it re-exports
//! the crates orch is made of, each behind a feature, so an application adds one dependency and
//! picks the parts it wants (as the `kube` crate does for kube-core, kube-runtime and
//! kube-client).
//!
//! | module | crate | feature | what it is for |
//! |---|---|---|---|
//! | [`core`] | `orch-core` | always | object model, `Store` / `Runtime` / `Controller` traits, typed `Api`, caches, the reconcile loop, `Manager`, leader election |
//! | `store` | `orch-store` | `store` (default), `etcd` | state backends: in-memory, embedded durable (redb, the default), etcd |
//! | `runtime` | `orch-runtime` | `runtime` (default), `docker`, `dns` | the node: process, simulated and Docker runtimes, the node agent, `LocalNodes`; service traffic (`runtime::net`: the resolver, the node proxy, and with `dns` the cluster DNS server) |
//! | `scheduler` | `orch-scheduler` | `scheduler` (default) | placement: the `Scheduler` trait, plugin framework, default plugins, queue, scheduler service |
//! | `controllers` | `orch-controllers` | `controllers` (default) | control-plane controllers: node lifecycle, node provisioner |
//!
//! A control plane in one process: a store, the scheduler and the node lifecycle controller in
//! a [`Manager`], and an agent running this machine's processes as a node.
//!
//! ```no_run
//! # #[cfg(all(feature = "store", feature = "runtime", feature = "scheduler", feature = "controllers"))]
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use orch::controllers::NodeLifecycle;
//! use orch::runtime::{Agent, AgentConfig, ProcessRuntime};
//! use orch::scheduler::{Profile, SchedulerService};
//! use orch::store::RedbStore;
//! use orch::{Manager, Store};
//!
//! let store: Arc<dyn Store> = Arc::new(RedbStore::open("orch.redb")?);
//! let mut manager = Manager::new(store.clone());
//! manager.add(SchedulerService::new(Profile::default_profile()));
//! manager.add(NodeLifecycle::builder(Default::default()));
//! let runtime = Arc::new(ProcessRuntime::new("/tmp/orch-node-1")?);
//! let agent = Agent::new(AgentConfig::new("node-1"), store, runtime);
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
//!     let _ = rx.wait_for(|s| *s).await;
//! };
//! let plane = tokio::spawn(manager.run(until_stopped(stopped.clone())));
//! let node = tokio::spawn(agent.run(until_stopped(stopped), true));
//! tokio::signal::ctrl_c().await?;
//! stop.send_replace(true);
//! plane.await??;
//! node.await??;
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use orch_core as core;
pub use orch_core::{
    Api, Cache, Controller, ControllerBuilder, Error, Manager, Object, ObjectMeta, Resource, Result, Runnable, Runtime,
    Store, kinds,
};

#[cfg(feature = "store")]
#[cfg_attr(docsrs, doc(cfg(feature = "store")))]
pub use orch_store as store;

#[cfg(feature = "runtime")]
#[cfg_attr(docsrs, doc(cfg(feature = "runtime")))]
pub use orch_runtime as runtime;

#[cfg(feature = "scheduler")]
#[cfg_attr(docsrs, doc(cfg(feature = "scheduler")))]
pub use orch_scheduler as scheduler;

#[cfg(feature = "controllers")]
#[cfg_attr(docsrs, doc(cfg(feature = "controllers")))]
pub use orch_controllers as controllers;

#[cfg(feature = "manifest")]
#[cfg_attr(docsrs, doc(cfg(feature = "manifest")))]
pub mod manifest;
