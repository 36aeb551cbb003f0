//! # orch-store
//!
//! [`Store`](orch_core::Store) backends for orch.
//!
//! | backend | feature | durability | use it for |
//! |---|---|---|---|
//! | [`MemoryStore`] | always on | none: state lives in the process | tests, simulations, single-process control planes that rebuild state on start |
//! | [`RedbStore`] | `redb` (default) | one file on local disk; every acknowledged write survives a crash (group commit) | the default: single-machine control planes that must remember their state across restarts |
//! | `EtcdStore` | `etcd` | etcd's (replicated, on disk) | control planes with replicas on several machines, or several clusters sharing one etcd under their own prefixes |
//!
//! Every backend passes `orch_core::testkit::store`, so code written against one runs unchanged
//! on another. The `local-etcd` feature adds `etcd::LocalEtcd`, which starts a throwaway etcd on
//! loopback for tests and benches.
//!
//! ```
//! use std::sync::Arc;
//! use orch_core::{Api, Object, ObjectMeta, Store, kinds::Node};
//! use orch_store::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> orch_core::Result<()> {
//! let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
//! let nodes: Api<Node> = Api::all(store);
//! nodes.create(&Object::new(ObjectMeta::named("node-1"), Node::default())).await?;
//! assert_eq!(nodes.list(&Default::default()).await?.items.len(), 1);
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(any(feature = "server", feature = "remote"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "server", feature = "remote"))))]
pub mod api;
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub mod etcd;
pub mod memory;
#[cfg(feature = "redb")]
#[cfg_attr(docsrs, doc(cfg(feature = "redb")))]
pub mod redb;

#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub use api::ApiServer;
#[cfg(feature = "remote")]
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
pub use api::RemoteStore;
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub use etcd::{EtcdStore, EtcdStoreBuilder};
pub use memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redb")]
#[cfg_attr(docsrs, doc(cfg(feature = "redb")))]
pub use redb::{RedbStore, RedbStoreBuilder};
