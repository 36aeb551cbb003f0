//! # orch-core
//!
//! The contracts of orch, a toolkit for building container orchestrators, and the machinery every
//! part of it shares. Every backend and every application depends on this crate, and it depends
//! on nothing else of orch:
//!
//! - the object model: [`Object<K>`](Object) and [`ObjectMeta`], the [`Resource`] trait for your
//!   own kinds, the built-in [`kinds`] (`Node`, `NodeLease`, `Workload`), selectors, quantities and
//!   [`validation`] that names every bad field;
//! - the backend traits: [`Store`] (with its rules in [`store`] and typed access through
//!   [`Api`]), [`Runtime`], [`provider::NodeProvider`] and [`VolumeProvider`];
//! - the reconcile machinery: shared indexed [`Cache`]s, the work queue, the [`Controller`] trait
//!   and its loop, the [`Manager`] that runs any [`Runnable`] under one leadership, and leader
//!   election with fencing;
//! - [`events`]: the [`Recorder`](events::Recorder) every component uses to tell people why
//!   something happened (deduplicated, rate-limited, expiring `Event`s);
//! - behind the `testkit` feature, the conformance suites every backend must pass and helpers
//!   for tests that wait.
//!
//! The parts built on it live in their own crates: `orch-store` (memory, embedded, etcd
//! stores), `orch-runtime` (the node agent and the process, simulated and Docker runtimes),
//! `orch-scheduler` (the `Scheduler` trait, plugin framework and scheduler service) and
//! `orch-controllers` (node lifecycle, node provisioner). The `orch` crate re-exports them all.
//!
//! ```no_run
//! use std::sync::Arc;
//! use orch_core::{Api, Object, ObjectMeta, Store, kinds::Workload};
//!
//! async fn run(store: Arc<dyn Store>) -> orch_core::Result<()> {
//!     let workloads: Api<Workload> = Api::namespaced(store, "default");
//!     let w = Object::new(ObjectMeta::named("hello"), Workload::command("main", &["/bin/echo", "hi"]));
//!     let created = workloads.create(&w).await?;
//!     println!("created at revision {}", created.metadata.resource_version);
//!     Ok(())
//! }
//! ```
//!
//! | feature   | what it adds |
//! |-----------|--------------|
//! | `testkit` | `store_conformance!`, `runtime_conformance!` and `testkit::volume::suite`: the suites every backend must pass; `testkit::wait_until`, `testkit::eventually`, `testkit::FlakyStore` |
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod api;
pub mod backoff;
pub mod cache;
pub mod controller;
mod dynamic;
pub mod error;
pub mod events;
pub mod hash;
mod json;
pub mod kinds;
pub mod labels;
pub mod manager;
pub mod meta;
pub mod object;
pub mod provider;
pub mod quantity;
pub mod rate;
pub mod runnable;
pub mod runtime;
pub mod selector;
pub mod storage;
pub mod store;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
pub mod validation;

pub use api::{Api, Deleted, Event, ListParams, ObjectList, Patch};
pub use cache::{Cache, CacheConfig, CacheEvent, CacheRegistry, ObjectRef};
pub use controller::{Action, Context, Controller, ControllerBuilder};
pub use error::{Error, Result};
pub use labels::Labels;
pub use manager::Manager;
pub use meta::{Clock, LeaseId, ObjectMeta, OwnerReference, SystemClock, Timestamp, TokioClock};
pub use object::{API_VERSION, DynamicObject, JsonError, Object, ObjectKey, RawJson, Resource, Scope};
pub use quantity::Quantity;
pub use runnable::{Leadership, RunParts, Runnable};
pub use runtime::{
    ExecOutput, ExecSession, ExecStreamOptions, Handle, InstanceSpec, InstanceState, Runtime, RuntimeError,
    TerminalSize,
};
pub use selector::{FieldSelector, LabelSelector, Requirement};
pub use storage::{VolumeError, VolumeProvider};
pub use store::{
    DeleteOptions, DeleteOutcome, Guard, LeaseInfo, ListRequest, ListResponse, Propagation, Selection, Store,
    WatchEvent, WatchRequest, WatchStream, WriteOptions,
};
pub use validation::{FieldError, ValidationError, Validator};
