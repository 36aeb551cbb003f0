//! Conformance kits: the contract every backend must meet, as runnable tests.
//!
//! A backend is correct when its ~20-line test file passes the suite:
//!
//! ```no_run
//! // orch-store/tests/memory.rs
//! orch_core::store_conformance!(orch_store::MemoryStore::new(), paused_time = true);
//! ```
//!
//! which expands to one `#[test]` per case (so each shows up by name in the test report), each
//! on a fresh store from the given expression, evaluated inside the case's tokio runtime.

mod paced;
pub mod runtime;
pub mod store;
pub mod volume;
mod wait;

pub use paced::Paced;
pub use wait::{FlakyStore, Outcome, eventually, wait_for_phase, wait_until};
