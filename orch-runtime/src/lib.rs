//! # orch-runtime
//!
//! Runtime backends for orch: they run the containers and processes of the workloads the node
//! agent is given. This crate is the home of the local-process, Docker Engine and simulated-node
//! backends; none has landed yet (the `Runtime` trait they implement is not in `orch-core` yet
//! either), so the crate exports nothing so far.
