//! The runtime conformance suite: the [`Runtime`] contract as named cases, run against real
//! instances (processes, containers) through a shell the backend provides.
//!
//! Run it through [`runtime_conformance!`](crate::runtime_conformance) or [`run_case`].

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest a case waits for something that should happen promptly; long enough that a loaded
/// machine never reaches it, so only a wrong behaviour does.
const PATIENCE: Duration = Duration::from_secs(30);

use futures::FutureExt;
use futures::StreamExt;
use futures::future::LocalBoxFuture;

use crate::kinds::{Container, EnvVar};
use crate::runtime::{Handle, InstanceSpec, InstanceState, LogLine, LogOptions, LogStream, Runtime, RuntimeError};

/// How the suite runs shell snippets on a backend.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The command prefix that runs a script given as one more argument, e.g. `["/bin/sh", "-c"]`.
    pub shell: Vec<String>,
    /// The image to run them in, for container backends.
    pub image: Option<String>,
}

impl Fixture {
    /// `/bin/sh -c`, no image: for backends that run host processes.
    pub fn host_shell() -> Self {
        Fixture { shell: vec!["/bin/sh".into(), "-c".into()], image: None }
    }

    /// For backends that run no programs (the simulated runtime): each case's instance is
    /// described by the `SIM_*` environment that makes a simulated instance behave like the
    /// case's shell snippet (exit code, run time, output, ignoring the polite signal). An empty
    /// `shell` is what selects this.
    pub fn simulated() -> Self {
        Fixture { shell: Vec::new(), image: Some("sim".into()) }
    }

    /// Whether the backend runs real programs (with a real filesystem).
    pub fn runs_programs(&self) -> bool {
        !self.shell.is_empty()
    }
}

/// The `SIM_*` environment equivalent to each of the suite's snippets.
fn simulated_env(script: &str) -> Vec<(&'static str, &'static str)> {
    match script {
        "exit 3" => vec![("SIM_RUN", "0"), ("SIM_EXIT_CODE", "3")],
        "exit 7" => vec![("SIM_RUN", "0"), ("SIM_EXIT_CODE", "7")],
        "true" | "" => vec![("SIM_RUN", "0")],
        "sleep 60" => vec![("SIM_RUN", "60")],
        "trap '' TERM; echo ready; while true; do sleep 0.05; done" => {
            vec![("SIM_STDOUT", "ready"), ("SIM_IGNORE_TERM", "1")]
        }
        "echo out1; echo err1 >&2; echo out2; echo err2 >&2" => {
            vec![("SIM_STDOUT", "out1\nout2"), ("SIM_STDERR", "err1\nerr2"), ("SIM_RUN", "0")]
        }
        "for i in 1 2 3 4; do echo tick$i; sleep 0.2; done" => {
            vec![("SIM_STDOUT", "tick1\ntick2\ntick3\ntick4"), ("SIM_LINE_INTERVAL", "0.2"), ("SIM_RUN", "0.8")]
        }
        "echo \"$GREETING\"; pwd" => vec![("SIM_STDOUT", "$GREETING\n$PWD"), ("SIM_RUN", "0")],
        other => panic!("the runtime suite has no simulated form of {other:?}"),
    }
}

/// Makes runtime handles over one shared state: calling it twice in a case is how the suite
/// simulates an agent restart.
pub type Factory = Arc<dyn Fn() -> Arc<dyn Runtime> + Send + Sync>;

type CaseFn = fn(Factory, Fixture) -> LocalBoxFuture<'static, ()>;

macro_rules! make_cases {
    (() $($name:ident),* $(,)?) => {
        /// Every case of the suite, by name.
        pub const CASES: &[(&str, CaseFn)] = &[$((stringify!($name), |f, x| $name(f, x).boxed_local())),*];
    };
}

/// Hands the list of runtime case names to `$callback!{ (args) name, … }`.
#[doc(hidden)]
#[macro_export]
macro_rules! __runtime_cases {
    ($callback:path, ($($args:tt)*)) => {
        $callback! { ($($args)*)
            exit_codes_are_reported,
            wait_after_exit_returns_at_once,
            stop_asks_politely_first,
            stop_kills_after_the_grace_period,
            stop_is_idempotent,
            logs_keep_streams_apart_and_tail,
            logs_follow_until_exit,
            env_and_working_dir_are_applied,
            recover_finds_running_instances,
            list_and_remove,
            bad_specs_are_refused,
            foreign_handles_are_refused
        }
    };
}

__runtime_cases!(make_cases, ());

/// Runs one named case on a multi-thread tokio runtime. `make` is called once per case and
/// returns the factory the case uses (so each case gets fresh state, e.g. its own directory).
///
/// # Panics
/// When the case fails, or no case has that name.
pub fn run_case<M, F, R>(name: &str, make: M, fixture: Fixture)
where
    M: FnOnce() -> F,
    F: Fn() -> R + Send + Sync + 'static,
    R: Runtime,
{
    let case = CASES.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no runtime case named {name}")).1;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime");
    rt.block_on(async move {
        let make_one = make();
        let factory: Factory = Arc::new(move || Arc::new(make_one()) as Arc<dyn Runtime>);
        case(factory, fixture).await
    });
}

/// Generates one `#[test]` per runtime conformance case.
///
/// `$make` is an expression returning a closure that makes runtimes over one fresh state;
/// `$fixture` says how to run shell snippets.
///
/// ```no_run
/// orch_core::runtime_conformance!(
///     || { let dir = std::env::temp_dir().join("x"); move || orch_runtime::ProcessRuntime::new(&dir).unwrap() },
///     orch_core::testkit::runtime::Fixture::host_shell()
/// );
/// ```
#[macro_export]
macro_rules! runtime_conformance {
    ($make:expr, $fixture:expr) => {
        $crate::__runtime_cases!($crate::__runtime_case_tests, ($make, $fixture));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __runtime_case_tests {
    (($make:expr, $fixture:expr) $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                $crate::testkit::runtime::run_case(stringify!($name), $make, $fixture);
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------

fn spec(fx: &Fixture, id: &str, script: &str) -> InstanceSpec {
    let (command, env) = if fx.runs_programs() {
        let mut command = fx.shell.clone();
        command.push(script.to_string());
        (command, Vec::new())
    } else {
        let env = simulated_env(script)
            .into_iter()
            .map(|(name, value)| EnvVar { name: name.into(), value: value.into() })
            .collect();
        (vec!["sim".to_string()], env)
    };
    InstanceSpec {
        id: id.to_string(),
        container: Container { name: "main".into(), image: fx.image.clone(), command, env, ..Default::default() },
        volumes: Vec::new(),
        labels: Default::default(),
    }
}

async fn wait(rt: &dyn Runtime, h: &Handle) -> crate::runtime::ExitStatus {
    tokio::time::timeout(Duration::from_secs(30), rt.wait(h)).await.expect("exited within 30 s").expect("wait")
}

async fn all_logs(rt: &dyn Runtime, h: &Handle, options: LogOptions) -> Vec<LogLine> {
    let stream = rt.logs(h, options).await.expect("logs");
    tokio::time::timeout(Duration::from_secs(30), stream.collect::<Vec<_>>()).await.expect("logs end")
}

fn lines(logs: &[LogLine], stream: LogStream) -> Vec<String> {
    logs.iter().filter(|l| l.stream == stream).map(|l| l.line.clone()).collect()
}

async fn exit_codes_are_reported(f: Factory, fx: Fixture) {
    let rt = f();
    let three = rt.start(&spec(&fx, "exit-three", "exit 3")).await.unwrap();
    let ok = rt.start(&spec(&fx, "exit-zero", "true")).await.unwrap();
    let e = wait(&*rt, &three).await;
    assert_eq!((e.code, e.signal), (Some(3), None));
    assert!(!e.success());
    assert!(wait(&*rt, &ok).await.success());
    match rt.status(&three).await.unwrap() {
        InstanceState::Exited(x) => assert_eq!(x.code, Some(3)),
        other => panic!("expected Exited, got {other:?}"),
    }
}

async fn wait_after_exit_returns_at_once(f: Factory, fx: Fixture) {
    let rt = f();
    let h = rt.start(&spec(&fx, "quick", "exit 7")).await.unwrap();
    let first = wait(&*rt, &h).await;
    // A wait that blocked would block for good (nothing is left to exit): a generous deadline
    // tells the two apart on any machine.
    let again =
        tokio::time::timeout(PATIENCE, rt.wait(&h)).await.expect("wait on an exited instance must not block").unwrap();
    assert_eq!(again, first);
}

async fn stop_asks_politely_first(f: Factory, fx: Fixture) {
    let rt = f();
    let h = rt.start(&spec(&fx, "polite", "sleep 60")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The grace period is longer than the patience: a stop that did not ask politely first (or
    // whose polite signal did not end it) would end by the kill, after the patience, and fail
    // either way.
    tokio::time::timeout(PATIENCE, rt.stop(&h, PATIENCE * 2))
        .await
        .expect("a process that honours SIGTERM stops without waiting for the kill")
        .unwrap();
    let e = wait(&*rt, &h).await;
    assert!(e.signal == Some(15) || e.code == Some(143), "ended by the polite signal: {e:?}");
}

async fn stop_kills_after_the_grace_period(f: Factory, fx: Fixture) {
    let rt = f();
    let h =
        rt.start(&spec(&fx, "stubborn", "trap '' TERM; echo ready; while true; do sleep 0.05; done")).await.unwrap();
    // Wait until the trap is in place.
    let deadline = Instant::now() + PATIENCE;
    while !lines(&all_logs(&*rt, &h, LogOptions::default()).await, LogStream::Stdout).contains(&"ready".to_string()) {
        assert!(Instant::now() < deadline, "the stubborn instance never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The kill comes no sooner than the grace period (a floor that load cannot break: it only
    // makes things later), and it comes: a stubborn process never ends by itself.
    let started = Instant::now();
    tokio::time::timeout(PATIENCE, rt.stop(&h, Duration::from_millis(800)))
        .await
        .expect("the kill comes after the grace period")
        .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(750), "killed before the grace period ended ({took:?})");
    let e = wait(&*rt, &h).await;
    assert!(e.signal == Some(9) || e.code == Some(137), "ended by the kill: {e:?}");
}

async fn stop_is_idempotent(f: Factory, fx: Fixture) {
    let rt = f();
    let h = rt.start(&spec(&fx, "twice", "sleep 60")).await.unwrap();
    rt.stop(&h, Duration::from_secs(5)).await.unwrap();
    rt.stop(&h, Duration::from_secs(5)).await.unwrap();
    let done = rt.start(&spec(&fx, "already-done", "true")).await.unwrap();
    wait(&*rt, &done).await;
    rt.stop(&done, Duration::from_secs(5)).await.unwrap();
    assert!(matches!(rt.status(&done).await.unwrap(), InstanceState::Exited(e) if e.success()));
}

async fn logs_keep_streams_apart_and_tail(f: Factory, fx: Fixture) {
    let rt = f();
    let h = rt.start(&spec(&fx, "talker", "echo out1; echo err1 >&2; echo out2; echo err2 >&2")).await.unwrap();
    wait(&*rt, &h).await;
    let all = all_logs(&*rt, &h, LogOptions::default()).await;
    assert_eq!(lines(&all, LogStream::Stdout), ["out1", "out2"]);
    assert_eq!(lines(&all, LogStream::Stderr), ["err1", "err2"]);
    let tail = all_logs(&*rt, &h, LogOptions { tail: Some(1), follow: false }).await;
    assert_eq!(lines(&tail, LogStream::Stdout), ["out2"]);
    assert_eq!(lines(&tail, LogStream::Stderr), ["err2"]);
}

async fn logs_follow_until_exit(f: Factory, fx: Fixture) {
    let rt = f();
    let h = rt.start(&spec(&fx, "ticker", "for i in 1 2 3 4; do echo tick$i; sleep 0.2; done")).await.unwrap();
    let followed = all_logs(&*rt, &h, LogOptions { tail: None, follow: true }).await;
    assert_eq!(lines(&followed, LogStream::Stdout), ["tick1", "tick2", "tick3", "tick4"]);
}

async fn env_and_working_dir_are_applied(f: Factory, fx: Fixture) {
    let rt = f();
    let mut s = spec(&fx, "env", "echo \"$GREETING\"; pwd");
    s.container.env.push(EnvVar { name: "GREETING".into(), value: "hello there".into() });
    s.container.working_dir = Some("/tmp".into());
    let h = rt.start(&s).await.unwrap();
    wait(&*rt, &h).await;
    let out = lines(&all_logs(&*rt, &h, LogOptions::default()).await, LogStream::Stdout);
    assert_eq!(out, ["hello there", "/tmp"]);
}

async fn recover_finds_running_instances(f: Factory, fx: Fixture) {
    let first = f();
    let h = first.start(&spec(&fx, "survivor", "sleep 60")).await.unwrap();
    // The handle is all the agent keeps across its restart.
    let stored = serde_json::to_string(&h).unwrap();
    drop(first);
    let second = f();
    let h: Handle = serde_json::from_str(&stored).unwrap();
    assert!(matches!(second.recover(&h).await.unwrap(), InstanceState::Running { .. }), "recover must find it running");
    assert!(second.list().await.unwrap().iter().any(|x| x.id == "survivor"));
    second.stop(&h, Duration::from_secs(5)).await.unwrap();
    let state = second.status(&h).await.unwrap();
    assert!(!matches!(state, InstanceState::Running { .. }), "still running after stop: {state:?}");
}

async fn list_and_remove(f: Factory, fx: Fixture) {
    let rt = f();
    let a = rt.start(&spec(&fx, "list-a", "sleep 60")).await.unwrap();
    let b = rt.start(&spec(&fx, "list-b", "true")).await.unwrap();
    let ids: Vec<String> = rt.list().await.unwrap().into_iter().map(|h| h.id).collect();
    assert!(ids.contains(&"list-a".to_string()) && ids.contains(&"list-b".to_string()), "{ids:?}");
    rt.remove(&a).await.unwrap();
    wait(&*rt, &b).await;
    rt.remove(&b).await.unwrap();
    assert!(matches!(rt.status(&a).await.unwrap_err(), RuntimeError::NotFound(_)));
    let ids: Vec<String> = rt.list().await.unwrap().into_iter().map(|h| h.id).collect();
    assert!(!ids.contains(&"list-a".to_string()) && !ids.contains(&"list-b".to_string()), "{ids:?}");
    // The id is free again.
    let again = rt.start(&spec(&fx, "list-a", "true")).await.unwrap();
    wait(&*rt, &again).await;
}

async fn bad_specs_are_refused(f: Factory, fx: Fixture) {
    let rt = f();
    let field = |e: RuntimeError| match e {
        RuntimeError::InvalidSpec { field, .. } => field,
        other => panic!("expected InvalidSpec, got {other}"),
    };
    assert_eq!(field(rt.start(&spec(&fx, "Bad Id!", "true")).await.unwrap_err()), "id");
    let taken = rt.start(&spec(&fx, "taken", "sleep 60")).await.unwrap();
    assert_eq!(field(rt.start(&spec(&fx, "taken", "true")).await.unwrap_err()), "id");
    let mut nothing = spec(&fx, "nothing", "");
    nothing.container.command.clear();
    nothing.container.image = None;
    assert!(field(rt.start(&nothing).await.unwrap_err()).starts_with("container."));
    if fx.runs_programs() {
        let mut missing_dir = spec(&fx, "missing-dir", "true");
        missing_dir.container.working_dir = Some("/no/such/dir/orch-test".into());
        let e = rt.start(&missing_dir).await;
        // A backend may refuse it up front or fail the instance; it must not succeed silently.
        match e {
            Err(e) => assert_eq!(field(e), "container.workingDir"),
            Ok(h) => assert!(!wait(&*rt, &h).await.success()),
        }
    }
    rt.stop(&taken, Duration::from_secs(5)).await.unwrap();
}

async fn foreign_handles_are_refused(f: Factory, fx: Fixture) {
    let rt = f();
    let h = rt.start(&spec(&fx, "mine", "true")).await.unwrap();
    let foreign = Handle { runtime: "someone-else".into(), ..h.clone() };
    assert!(matches!(rt.status(&foreign).await.unwrap_err(), RuntimeError::BadHandle { .. }));
    let future = Handle { version: h.version + 100, ..h.clone() };
    assert!(matches!(rt.status(&future).await.unwrap_err(), RuntimeError::BadHandle { .. }));
    let unknown = Handle { id: "never-started".into(), ..h.clone() };
    assert!(matches!(rt.status(&unknown).await.unwrap_err(), RuntimeError::NotFound(_)));
    wait(&*rt, &h).await;
}
