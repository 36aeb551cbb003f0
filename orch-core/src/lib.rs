//! # orch-core
//!
//! The core of orch, a toolkit for building container orchestrators: the object model, the
//! [`Store`] trait every state backend implements, typed access through [`Api`], and the
//! conformance kits every backend must pass.
//!
//! An application picks a store backend (for example `orch_store::MemoryStore`), wraps it in
//! `Arc<dyn Store>`, and works with typed kinds through [`Api`]:
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
//! Define your own kinds by implementing [`Resource`] on a spec type; they get the same typed,
//! validated access and the same store semantics as the built-in [`kinds::Node`] and
//! [`kinds::Workload`].
//!
//! | feature   | what it adds |
//! |-----------|--------------|
//! | `testkit` | `testkit::store`: the store conformance suite with its model check |

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod api;
pub mod cache;
pub mod controller;
mod dynamic;
pub mod error;
mod json;
pub mod kinds;
pub mod labels;
pub mod manager;
pub mod meta;
pub mod object;
pub mod provider;
pub mod quantity;
pub mod runnable;
pub mod runtime;
pub mod selector;
pub mod store;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
pub mod validation;

pub use api::{Api, Deleted, Event, ListParams, ObjectList};
pub use cache::{Cache, CacheConfig, CacheEvent, CacheRegistry, ObjectRef};
pub use controller::{Action, Context, Controller, ControllerBuilder};
pub use error::{Error, Result};
pub use labels::Labels;
pub use manager::Manager;
pub use meta::{Clock, LeaseId, ObjectMeta, OwnerReference, SystemClock, Timestamp, TokioClock};
pub use object::{DynamicObject, JsonError, Object, ObjectKey, RawJson, Resource, Scope};
pub use quantity::Quantity;
pub use runnable::{Leadership, RunParts, Runnable};
pub use runtime::{Handle, InstanceSpec, InstanceState, Runtime, RuntimeError};
pub use selector::{FieldSelector, LabelSelector, Requirement};
pub use store::{
    DeleteOptions, DeleteOutcome, Guard, LeaseInfo, ListRequest, ListResponse, Selection, Store, WatchEvent,
    WatchRequest, WatchStream, WriteOptions,
};
pub use validation::{FieldError, ValidationError, Validator};
