//! The Docker runtime against the runtime conformance suite, on the real engine: every case on
//! a node of its own (so cases run side by side on one daemon), shell snippets run by busybox in
//! a locally imported image. Containers and the image are removed when a case ends, even when
//! it fails. Without an engine each case says it is skipped and returns (see `docker_support`).

#![cfg(feature = "docker")]

mod docker_support;

use docker_support::{Scope, skip};
use orch_core::testkit::runtime::{Fixture, run_case};
use orch_runtime::DockerRuntime;

macro_rules! docker_cases {
    (() $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if skip(stringify!($name)) {
                    return;
                }
                let scope = Scope::new(stringify!($name));
                let fixture = Fixture { shell: vec!["/bin/sh".into(), "-c".into()], image: Some(scope.image.clone()) };
                let config = scope.config();
                run_case(
                    stringify!($name),
                    // The scope lives as long as the case's runtimes, and cleans up after them.
                    move || move || {
                        let _ = &scope;
                        DockerRuntime::new(config.clone()).expect("a valid configuration")
                    },
                    fixture,
                );
            }
        )*
    };
}

orch_core::__runtime_cases!(docker_cases, ());
