//! [`SimulatedRuntime`]: virtual instances on virtual nodes, for research and scale tests.
//!
//! Nothing is executed. Each instance follows a declarative [`Behaviour`] (start delay, run
//! time, exit code, whether it ignores the polite stop signal, jitter) read from its container's
//! `SIM_*` environment variables, and all timing goes through `tokio::time`: on a paused
//! runtime an hour of cluster life passes in milliseconds. A [`SimCluster`] shared by every
//! simulated node injects faults (a node lost with everything on it, slow starts).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use orch_core::runtime::{
    Capabilities, ExitStatus, Handle, InstanceSpec, InstanceState, LogLine, LogOptions, LogStream, Runtime,
    RuntimeError,
};
use orch_core::{Clock, Timestamp, TokioClock};
use tokio::sync::Notify;
use tokio::time::Instant;

const NAME: &str = "simulated";
/// Version 2: `data` is the node's name, a plain string.
const HANDLE_VERSION: u32 = 2;

/// How a simulated instance behaves, from its container's environment:
/// `SIM_START_DELAY` and `SIM_RUN` in seconds (`SIM_RUN` absent: runs until stopped),
/// `SIM_EXIT_CODE` (default 0), `SIM_IGNORE_TERM=1` (only a kill stops it), `SIM_JITTER` (a
/// fraction: delay and run time vary by up to this much, the same for the same instance id),
/// `SIM_STDOUT` and `SIM_STDERR` (lines it prints, separated by newlines; `$NAME` and `${NAME}`
/// expand from its environment, `$PWD` to its working directory) and `SIM_LINE_INTERVAL`
/// (seconds between lines; line `k` of each stream comes `k` intervals after it starts running).
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    /// Time from start until it runs.
    pub start_delay: Duration,
    /// Time it runs before exiting by itself; `None` for forever.
    pub run_for: Option<Duration>,
    /// Its exit code when it exits by itself.
    pub exit_code: i32,
    /// It ignores the polite stop signal, so a stop waits out the grace period and kills it.
    pub ignores_term: bool,
    /// Lines it prints on stdout.
    pub stdout: Vec<String>,
    /// Lines it prints on stderr.
    pub stderr: Vec<String>,
    /// Time between two lines of one stream.
    pub line_interval: Duration,
}

/// Expands `$NAME`, `${NAME}` and `$PWD` in a declared output line.
fn expand(line: &str, spec: &InstanceSpec) -> String {
    let lookup = |name: &str| -> String {
        if name == "PWD" {
            return spec.container.working_dir.clone().unwrap_or_else(|| "/".into());
        }
        spec.container.env.iter().find(|e| e.name == name).map(|e| e.value.clone()).unwrap_or_default()
    };
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let braced = chars.peek() == Some(&'{');
        if braced {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphanumeric() || n == '_' {
                name.push(n);
                chars.next();
            } else {
                break;
            }
        }
        if braced && chars.peek() == Some(&'}') {
            chars.next();
        }
        if name.is_empty() {
            out.push('$');
        } else {
            out.push_str(&lookup(&name));
        }
    }
    out
}

impl Behaviour {
    /// Reads the behaviour of a spec (see the type docs); a bad value is an `InvalidSpec`.
    pub fn of(spec: &InstanceSpec) -> Result<Behaviour, RuntimeError> {
        let env = |name: &str| spec.container.env.iter().find(|e| e.name == name).map(|e| e.value.as_str());
        let secs = |name: &str| -> Result<Option<f64>, RuntimeError> {
            env(name)
                .map(|v| {
                    v.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).ok_or_else(|| {
                        RuntimeError::invalid(
                            format!("container.env[{name}]"),
                            format!("{v:?} is not a number of seconds >= 0"),
                        )
                    })
                })
                .transpose()
        };
        let jitter = secs("SIM_JITTER")?.unwrap_or(0.0).min(1.0);
        // The same instance id always gets the same jitter.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        spec.id.hash(&mut h);
        let unit = (h.finish() % 10_000) as f64 / 10_000.0; // in [0, 1)
        let scale = 1.0 + jitter * (2.0 * unit - 1.0);
        let dur = |s: f64| Duration::from_secs_f64(s * scale);
        let exit_code = match env("SIM_EXIT_CODE") {
            Some(v) => v.parse().map_err(|_| {
                RuntimeError::invalid("container.env[SIM_EXIT_CODE]", format!("{v:?} is not an integer"))
            })?,
            None => 0,
        };
        let lines = |name: &str| -> Vec<String> {
            env(name).map(|v| v.split('\n').map(|l| expand(l, spec)).collect()).unwrap_or_default()
        };
        Ok(Behaviour {
            start_delay: dur(secs("SIM_START_DELAY")?.unwrap_or(0.0)),
            run_for: secs("SIM_RUN")?.map(dur),
            exit_code,
            ignores_term: matches!(env("SIM_IGNORE_TERM"), Some("1" | "true")),
            stdout: lines("SIM_STDOUT"),
            stderr: lines("SIM_STDERR"),
            line_interval: Duration::from_secs_f64(secs("SIM_LINE_INTERVAL")?.unwrap_or(0.0)),
        })
    }
}

#[derive(Debug)]
struct Instance {
    behaviour: Behaviour,
    started: Instant,
    started_at: Timestamp,
    exit: Option<ExitStatus>,
    /// When it exited, on the runtime's clock.
    exited: Option<Instant>,
    changed: Arc<Notify>,
}

impl Instance {
    /// Its output as printed so far: (when, stream, line), in order.
    fn output(&self, now: Instant) -> Vec<(Instant, LogStream, String)> {
        let b = &self.behaviour;
        let until = self.exited.map_or(now, |e| e.min(now));
        let at = |k: usize| self.started + b.start_delay + b.line_interval * k as u32;
        let mut lines = Vec::new();
        for k in 0..b.stdout.len().max(b.stderr.len()) {
            for (stream, source) in [(LogStream::Stdout, &b.stdout), (LogStream::Stderr, &b.stderr)] {
                if let Some(l) = source.get(k)
                    && at(k) <= until
                {
                    lines.push((at(k), stream, l.clone()));
                }
            }
        }
        lines
    }

    /// When the next line comes, if any is still to come.
    fn next_line_at(&self, printed: usize) -> Option<Instant> {
        let b = &self.behaviour;
        (0..b.stdout.len().max(b.stderr.len()))
            .flat_map(|k| {
                let at = self.started + b.start_delay + b.line_interval * k as u32;
                (k < b.stdout.len()).then_some(at).into_iter().chain((k < b.stderr.len()).then_some(at))
            })
            .nth(printed)
    }
}

#[derive(Debug, Default)]
struct ClusterState {
    down: HashSet<String>,
    slow: HashMap<String, Duration>,
    /// node → instance id → instance.
    instances: HashMap<String, HashMap<String, Instance>>,
}

/// The shared world of simulated nodes, and its fault injection.
#[derive(Debug, Clone, Default)]
pub struct SimCluster {
    state: Arc<Mutex<ClusterState>>,
}

impl SimCluster {
    /// An empty simulated cluster.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClusterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A runtime for one simulated node of this cluster.
    pub fn node(&self, name: impl Into<String>) -> SimulatedRuntime {
        SimulatedRuntime {
            node: name.into(),
            cluster: self.clone(),
            clock: Arc::new(TokioClock::starting_at(Timestamp(0))),
        }
    }

    /// Loses a node: everything on it is `Lost` and it accepts nothing until restored.
    pub fn fail_node(&self, node: &str) {
        let mut st = self.lock();
        st.down.insert(node.to_string());
        for i in st.instances.get(node).into_iter().flat_map(|m| m.values()) {
            i.changed.notify_waiters();
        }
    }

    /// Brings a lost node back, empty (what ran there is gone).
    pub fn restore_node(&self, node: &str) {
        let mut st = self.lock();
        st.down.remove(node);
        st.instances.remove(node);
    }

    /// Adds `extra` to every later start on `node`.
    pub fn slow_starts(&self, node: &str, extra: Duration) {
        self.lock().slow.insert(node.to_string(), extra);
    }

    /// Instances on all nodes, for reports.
    pub fn instance_count(&self) -> usize {
        self.lock().instances.values().map(HashMap::len).sum()
    }
}

/// One simulated node's runtime (make it with [`SimCluster::node`]).
#[derive(Debug, Clone)]
pub struct SimulatedRuntime {
    node: String,
    cluster: SimCluster,
    clock: Arc<dyn Clock>,
}

impl SimulatedRuntime {
    /// Uses `clock` for the wall timestamps it reports.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn check(&self, handle: &Handle) -> Result<(), RuntimeError> {
        if handle.runtime != NAME || handle.version != HANDLE_VERSION || handle.data != self.node.as_str() {
            return Err(RuntimeError::BadHandle {
                id: handle.id.clone(),
                runtime: NAME.into(),
                reason: "made by another runtime, version or node".into(),
            });
        }
        Ok(())
    }

    /// The state now, settling a natural exit whose time has come.
    fn state(&self, handle: &Handle) -> Result<(InstanceState, Option<Instant>, Arc<Notify>), RuntimeError> {
        self.check(handle)?;
        let mut st = self.cluster.lock();
        let down = st.down.contains(&self.node);
        let inst = st
            .instances
            .get_mut(&self.node)
            .and_then(|m| m.get_mut(&handle.id))
            .ok_or_else(|| RuntimeError::NotFound(handle.id.clone()))?;
        if down {
            return Ok((InstanceState::Lost, None, inst.changed.clone()));
        }
        let b = &inst.behaviour;
        let exits_at = b.run_for.map(|r| inst.started + b.start_delay + r);
        if inst.exit.is_none() && exits_at.is_some_and(|t| t <= Instant::now()) {
            let after = b.start_delay + b.run_for.unwrap_or_default();
            inst.exit = Some(ExitStatus {
                code: Some(b.exit_code),
                signal: None,
                oom_killed: false,
                finished_at: inst.started_at.plus(after),
            });
            inst.exited = exits_at;
        }
        let state = match inst.exit {
            Some(e) => InstanceState::Exited(e),
            None => InstanceState::Running { started_at: inst.started_at.plus(inst.behaviour.start_delay) },
        };
        Ok((state, exits_at, inst.changed.clone()))
    }

    /// Output printed so far (settling an exit first).
    fn printed(&self, handle: &Handle) -> Result<Vec<(Instant, LogStream, String)>, RuntimeError> {
        self.state(handle)?;
        let st = self.cluster.lock();
        let inst = st
            .instances
            .get(&self.node)
            .and_then(|m| m.get(&handle.id))
            .ok_or_else(|| RuntimeError::NotFound(handle.id.clone()))?;
        Ok(inst.output(Instant::now()))
    }

    fn next_line_at(&self, handle: &Handle, printed: usize) -> Option<Instant> {
        let st = self.cluster.lock();
        st.instances.get(&self.node).and_then(|m| m.get(&handle.id)).and_then(|i| i.next_line_at(printed))
    }

    fn end(&self, id: &str, signal: i32) {
        let now = self.clock.now();
        let mut st = self.cluster.lock();
        if let Some(inst) = st.instances.get_mut(&self.node).and_then(|m| m.get_mut(id))
            && inst.exit.is_none()
        {
            inst.exit = Some(ExitStatus { code: None, signal: Some(signal), oom_killed: false, finished_at: now });
            inst.exited = Some(Instant::now());
            inst.changed.notify_waiters();
        }
    }
}

#[async_trait]
impl Runtime for SimulatedRuntime {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        // Nothing is enforced (nothing runs); images are accepted by name.
        Capabilities {
            resource_limits: false,
            images: true,
            recover: true,
            exit_code_after_recover: true,
            log_files: false,
            published_ports: false,
        }
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<Handle, RuntimeError> {
        orch_core::runtime::check_instance_id(&spec.id)?;
        if spec.container.command.is_empty() && spec.container.image.as_deref().is_none_or(str::is_empty) {
            return Err(RuntimeError::invalid("container.command", "an image or a command is required"));
        }
        let mut behaviour = Behaviour::of(spec)?;
        let mut st = self.cluster.lock();
        if st.down.contains(&self.node) {
            return Err(RuntimeError::Unavailable {
                message: format!("simulated node {} is down", self.node),
                source: None,
            });
        }
        behaviour.start_delay += st.slow.get(&self.node).copied().unwrap_or_default();
        let node = st.instances.entry(self.node.clone()).or_default();
        if node.contains_key(&spec.id) {
            return Err(RuntimeError::invalid("id", format!("{} is already in use", spec.id)));
        }
        node.insert(
            spec.id.clone(),
            Instance {
                behaviour,
                started: Instant::now(),
                started_at: self.clock.now(),
                exit: None,
                exited: None,
                changed: Arc::new(Notify::new()),
            },
        );
        Ok(Handle {
            runtime: NAME.into(),
            version: HANDLE_VERSION,
            id: spec.id.clone(),
            data: serde_json::Value::String(self.node.clone()),
        })
    }

    async fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), RuntimeError> {
        let (state, _, _) = self.state(handle)?;
        if !matches!(state, InstanceState::Running { .. }) {
            return Ok(());
        }
        let ignores = self
            .cluster
            .lock()
            .instances
            .get(&self.node)
            .and_then(|m| m.get(&handle.id))
            .is_some_and(|i| i.behaviour.ignores_term);
        if ignores {
            // It shrugs off the polite signal; the kill comes when the grace period ends, unless
            // it exits by itself first.
            let (_, exits_at, _) = self.state(handle)?;
            let kill_at = Instant::now() + grace;
            tokio::time::sleep_until(exits_at.map_or(kill_at, |e| e.min(kill_at))).await;
            if matches!(self.state(handle)?.0, InstanceState::Running { .. }) {
                self.end(&handle.id, 9);
            }
        } else {
            self.end(&handle.id, 15);
        }
        Ok(())
    }

    async fn remove(&self, handle: &Handle) -> Result<(), RuntimeError> {
        self.check(handle)?;
        let removed = self.cluster.lock().instances.get_mut(&self.node).and_then(|m| m.remove(&handle.id));
        match removed {
            Some(i) => {
                i.changed.notify_waiters();
                Ok(())
            }
            None => Err(RuntimeError::NotFound(handle.id.clone())),
        }
    }

    async fn status(&self, handle: &Handle) -> Result<InstanceState, RuntimeError> {
        Ok(self.state(handle)?.0)
    }

    async fn wait(&self, handle: &Handle) -> Result<ExitStatus, RuntimeError> {
        loop {
            let (state, exits_at, changed) = self.state(handle)?;
            let notified = changed.notified();
            match state {
                InstanceState::Exited(e) => return Ok(e),
                InstanceState::Lost => {
                    return Ok(ExitStatus {
                        code: None,
                        signal: None,
                        oom_killed: false,
                        finished_at: self.clock.now(),
                    });
                }
                InstanceState::Running { .. } => match exits_at {
                    Some(t) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(t) => {}
                            _ = notified => {}
                        }
                    }
                    None => notified.await,
                },
            }
        }
    }

    async fn list(&self) -> Result<Vec<Handle>, RuntimeError> {
        let st = self.cluster.lock();
        let mut ids: Vec<&String> = st.instances.get(&self.node).map(|m| m.keys().collect()).unwrap_or_default();
        ids.sort();
        Ok(ids
            .into_iter()
            .map(|id| Handle {
                runtime: NAME.into(),
                version: HANDLE_VERSION,
                id: id.clone(),
                data: serde_json::Value::String(self.node.clone()),
            })
            .collect())
    }

    async fn logs(&self, handle: &Handle, options: LogOptions) -> Result<BoxStream<'static, LogLine>, RuntimeError> {
        let (state, _, _) = self.state(handle)?;
        let declared = {
            let st = self.cluster.lock();
            st.instances
                .get(&self.node)
                .and_then(|m| m.get(&handle.id))
                .is_some_and(|i| !i.behaviour.stdout.is_empty() || !i.behaviour.stderr.is_empty())
        };
        if !declared {
            // Nothing declared: a line for the start and one for the exit.
            let mut lines =
                vec![LogLine { stream: LogStream::Stdout, line: format!("simulated instance {} started", handle.id) }];
            if let InstanceState::Exited(e) = state {
                lines.push(LogLine {
                    stream: LogStream::Stderr,
                    line: format!("exited: code {:?}, signal {:?}", e.code, e.signal),
                });
            }
            let skip = options.tail.map_or(0, |n| lines.len().saturating_sub(n));
            return Ok(futures::stream::iter(lines.into_iter().skip(skip)).boxed());
        }
        let printed = self.printed(handle)?;
        // The tail counts per stream, as a file per stream would.
        let mut first: Vec<LogLine> = Vec::new();
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let mine: Vec<&(Instant, LogStream, String)> = printed.iter().filter(|l| l.1 == stream).collect();
            let skip = options.tail.map_or(0, |n| mine.len().saturating_sub(n));
            first.extend(mine.into_iter().skip(skip).map(|l| LogLine { stream, line: l.2.clone() }));
        }
        if !options.follow {
            return Ok(futures::stream::iter(first).boxed());
        }
        // Follow: what is printed from now on, until the instance exits (or goes away).
        let this = self.clone();
        let handle = handle.clone();
        let rest = futures::stream::unfold((this, handle, printed.len()), |(this, handle, seen)| async move {
            loop {
                let printed = this.printed(&handle).ok()?;
                if let Some(l) = printed.get(seen) {
                    let line = LogLine { stream: l.1, line: l.2.clone() };
                    return Some((line, (this, handle, seen + 1)));
                }
                let (state, exits_at, changed) = this.state(&handle).ok()?;
                if !matches!(state, InstanceState::Running { .. }) {
                    return None;
                }
                let notified = changed.notified();
                // Wake for the next line or the natural exit, whichever comes first.
                let next = match (this.next_line_at(&handle, seen), exits_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                match next {
                    Some(t) => tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        _ = notified => {}
                    },
                    None => notified.await,
                }
            }
        });
        Ok(futures::stream::iter(first).chain(rest).boxed())
    }

    async fn recover(&self, handle: &Handle) -> Result<InstanceState, RuntimeError> {
        Ok(self.state(handle)?.0)
    }

    async fn exec(&self, handle: &Handle, _command: &[String], _timeout: Duration) -> Result<i32, RuntimeError> {
        // A simulated instance is healthy while it runs, once its start delay is over (a probe
        // of a slow starter fails until then, as a real one would).
        let running = matches!(self.state(handle)?.0, InstanceState::Running { .. });
        let started = self
            .cluster
            .lock()
            .instances
            .get(&self.node)
            .and_then(|m| m.get(&handle.id))
            .is_some_and(|i| Instant::now() >= i.started + i.behaviour.start_delay);
        Ok(if running && started { 0 } else { 1 })
    }

    /// Refused: a simulated instance runs no program to attach to.
    async fn exec_stream(
        &self,
        handle: &Handle,
        command: &[String],
        _options: orch_core::runtime::ExecStreamOptions,
    ) -> Result<orch_core::ExecSession, RuntimeError> {
        self.state(handle)?;
        let program = command.first().map_or("", String::as_str);
        Err(RuntimeError::Unsupported {
            message: format!(
                "simulated instance {} runs no program: {program:?} cannot run in it interactively (run the \
                 workload on a node with the process or Docker runtime)",
                handle.id
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::kinds::{Container, EnvVar};

    fn spec(id: &str, env: &[(&str, &str)]) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            container: Container {
                name: "main".into(),
                image: Some("sim".into()),
                env: env.iter().map(|(k, v)| EnvVar { name: k.to_string(), value: v.to_string() }).collect(),
                ..Default::default()
            },
            volumes: Vec::new(),
            labels: Default::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn behaviour_plays_out_in_virtual_time() {
        let rt = SimCluster::new().node("n1");
        let h = rt
            .start(&spec("job", &[("SIM_START_DELAY", "2"), ("SIM_RUN", "10"), ("SIM_EXIT_CODE", "3")]))
            .await
            .unwrap();
        let began = Instant::now();
        let e = rt.wait(&h).await.unwrap();
        assert_eq!(began.elapsed(), Duration::from_secs(12));
        assert_eq!(e.code, Some(3));
        assert!(rt.wait(&h).await.is_ok(), "wait after exit returns at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_fails_until_the_start_delay_is_over() {
        let rt = SimCluster::new().node("n1");
        let h = rt.start(&spec("slow", &[("SIM_START_DELAY", "5")])).await.unwrap();
        let check = |rt: SimulatedRuntime, h: Handle| async move {
            rt.exec(&h, &["check".into()], Duration::from_secs(1)).await.unwrap()
        };
        assert_eq!(check(rt.clone(), h.clone()).await, 1, "still starting");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(check(rt.clone(), h.clone()).await, 0, "running");
    }

    #[tokio::test(start_paused = true)]
    async fn an_interactive_exec_is_refused_saying_why() {
        let rt = SimCluster::new().node("n1");
        let h = rt.start(&spec("w", &[])).await.unwrap();
        let options = orch_core::runtime::ExecStreamOptions { stdin: true, tty: None };
        let e = rt.exec_stream(&h, &["sh".into()], options).await.unwrap_err();
        assert!(matches!(e, RuntimeError::Unsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("simulated instance w runs no program"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn stops_are_polite_or_wait_out_the_grace_period() {
        let rt = SimCluster::new().node("n1");
        let polite = rt.start(&spec("polite", &[])).await.unwrap();
        let stubborn = rt.start(&spec("stubborn", &[("SIM_IGNORE_TERM", "1")])).await.unwrap();
        rt.stop(&polite, Duration::from_secs(30)).await.unwrap();
        assert_eq!(rt.wait(&polite).await.unwrap().signal, Some(15));
        let began = Instant::now();
        rt.stop(&stubborn, Duration::from_secs(30)).await.unwrap();
        assert_eq!(began.elapsed(), Duration::from_secs(30));
        assert_eq!(rt.wait(&stubborn).await.unwrap().signal, Some(9));
        rt.stop(&stubborn, Duration::from_secs(30)).await.unwrap(); // idempotent
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_node_loses_everything_on_it_and_refuses_starts() {
        let cluster = SimCluster::new();
        let (n1, n2) = (cluster.node("n1"), cluster.node("n2"));
        let a = n1.start(&spec("a", &[])).await.unwrap();
        let b = n2.start(&spec("b", &[])).await.unwrap();
        cluster.fail_node("n1");
        assert_eq!(n1.status(&a).await.unwrap(), InstanceState::Lost);
        assert!(matches!(n2.status(&b).await.unwrap(), InstanceState::Running { .. }));
        assert!(matches!(n1.start(&spec("c", &[])).await.unwrap_err(), RuntimeError::Unavailable { .. }));
        assert!(matches!(n2.status(&a).await.unwrap_err(), RuntimeError::BadHandle { .. }), "handles are per node");
        cluster.restore_node("n1");
        assert!(matches!(n1.status(&a).await.unwrap_err(), RuntimeError::NotFound(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_is_bounded_and_repeatable_and_bad_values_are_refused() {
        let rt = SimCluster::new().node("n1");
        let s = spec("j1", &[("SIM_RUN", "100"), ("SIM_JITTER", "0.2")]);
        let b = Behaviour::of(&s).unwrap();
        assert_eq!(b, Behaviour::of(&s).unwrap());
        let run = b.run_for.unwrap().as_secs_f64();
        assert!((80.0..=120.0).contains(&run), "{run}");
        let e = rt.start(&spec("bad", &[("SIM_RUN", "soon")])).await.unwrap_err();
        assert!(e.to_string().contains("container.env[SIM_RUN]"), "{e}");
    }
}
