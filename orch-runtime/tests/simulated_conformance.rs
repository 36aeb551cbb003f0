//! The simulated runtime against the runtime conformance suite: each case's shell snippet is
//! described as the `SIM_*` behaviour that matches it (`Fixture::simulated`), and each case gets
//! a fresh simulated cluster (a second runtime from the same factory is the agent after its
//! restart, seeing the same cluster).

#![cfg(feature = "simulated")]

orch_core::runtime_conformance!(
    || {
        let cluster = orch_runtime::SimCluster::new();
        move || cluster.node("sim-1")
    },
    orch_core::testkit::runtime::Fixture::simulated()
);
