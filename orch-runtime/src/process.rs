//! [`ProcessRuntime`]: workloads as real OS processes.
//!
//! Each instance gets a directory under the runtime's root holding its handle, its output
//! (`stdout.log`, `stderr.log`) and, once it exits while the runtime watches, its exit record.
//! The process runs in a process group of its own, so a stop reaches its children too. The
//! handle records the pid together with the process's start time from `/proc`, so a recovered
//! handle never adopts an unrelated process that reused the pid.
//!
//! Memory and CPU limits (`resources.limits`) are enforced through control groups where the
//! host allows it (see [`crate::cgroup`]; [`ProcessRuntime::limit_support`] says whether and why
//! not, and [`Capabilities::resource_limits`] follows it); an instance killed by the OOM killer
//! exits with `oom_killed` set. Where the host does not allow it, limits are not enforced.
//!
//! Refused by this backend, with the field and the reason: images, volume mounts (a volume's
//! host directory is given to the process as `ORCH_VOLUME_<NAME>` instead, and a `workingDir` of
//! `$(ORCH_VOLUME_<NAME>)` runs the program inside it), and limits on a host where they cannot be
//! enforced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use orch_core::runtime::{
    Capabilities, ExecSession, ExecStreamOptions, ExitStatus, Handle, InstanceSpec, InstanceState, LogLine, LogOptions,
    LogStream, Runtime, RuntimeError,
};
use orch_core::{Clock, SystemClock, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cgroup::{JOIN_SCRIPT, LimitSupport, Limits};

mod exec;

const NAME: &str = "process";
const HANDLE_VERSION: u32 = 1;

/// What a handle's `data` holds for this backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProcessData {
    pid: i32,
    /// Start time of the process in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    start_ticks: u64,
    started_at: Timestamp,
}

/// Runs instances as processes on this machine.
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    root: PathBuf,
    clock: Arc<dyn Clock>,
    /// Exit watchers of the processes this runtime spawned (and so reaps).
    children: Arc<Mutex<HashMap<String, watch::Receiver<Option<ExitStatus>>>>>,
    /// How limits are enforced here, if they are.
    limits: Arc<LimitSupport>,
}

impl ProcessRuntime {
    /// A runtime keeping its instance directories under `root` (created if missing). A runtime
    /// made later over the same root finds the instances again.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, RuntimeError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| RuntimeError::io(format!("creating {}", root.display()), e))?;
        let limits = LimitSupport::detect(&std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone()));
        if let LimitSupport::Unsupported(reason) = &limits {
            tracing::info!(%reason, "process runtime: memory and CPU limits are not enforced on this host");
        }
        Ok(ProcessRuntime {
            root,
            clock: Arc::new(SystemClock),
            children: Default::default(),
            limits: Arc::new(limits),
        })
    }

    /// Whether this runtime enforces memory and CPU limits on this host, how, or why not.
    pub fn limit_support(&self) -> &LimitSupport {
        &self.limits
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn data(&self, handle: &Handle) -> Result<ProcessData, RuntimeError> {
        let bad = |reason: String| RuntimeError::BadHandle { id: handle.id.clone(), runtime: NAME.into(), reason };
        if handle.runtime != NAME {
            return Err(bad(format!("it was made by the {} runtime", handle.runtime)));
        }
        if handle.version != HANDLE_VERSION {
            return Err(bad(format!("unknown handle version {}", handle.version)));
        }
        check_id(&handle.id).map_err(|e| bad(e.to_string()))?;
        if !self.dir(&handle.id).is_dir() {
            return Err(RuntimeError::NotFound(handle.id.clone()));
        }
        let data: ProcessData = serde_json::from_value(handle.data.clone()).map_err(|e| bad(e.to_string()))?;
        if data.pid <= 1 {
            return Err(bad(format!("pid {} cannot be an instance", data.pid)));
        }
        Ok(data)
    }

    fn recorded_exit(&self, id: &str) -> Option<ExitStatus> {
        let text = std::fs::read_to_string(self.dir(id).join("exit.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The state, from the reaper when this runtime spawned it, else from `/proc` and the
    /// exit record.
    fn state(&self, handle: &Handle, data: &ProcessData) -> InstanceState {
        if let Some(rx) = self.children.lock().unwrap_or_else(|e| e.into_inner()).get(&handle.id) {
            return match *rx.borrow() {
                Some(exit) => InstanceState::Exited(exit),
                None => InstanceState::Running { started_at: data.started_at },
            };
        }
        if let Some(exit) = self.recorded_exit(&handle.id) {
            return InstanceState::Exited(exit);
        }
        if is_alive(data.pid, data.start_ticks) {
            InstanceState::Running { started_at: data.started_at }
        } else {
            InstanceState::Lost
        }
    }

    /// Waits until the leader has exited and no process of its group is left.
    /// Waits until the leader has exited and no process of its group, or of its cgroups (where
    /// limits put it in some: a process that left the group with `setsid` is still there), is
    /// left.
    async fn wait_group_gone(&self, handle: &Handle, data: &ProcessData) -> Result<(), RuntimeError> {
        self.wait_exit(handle, data).await?;
        while group_alive(data.pid) || !self.limits.members(&handle.id).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Signals the instance's process group and every process in its cgroups.
    fn signal_all(&self, handle: &Handle, data: &ProcessData, signal: Signal) {
        signal_group(data.pid, signal);
        for pid in self.limits.members(&handle.id) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    async fn wait_exit(&self, handle: &Handle, data: &ProcessData) -> Result<ExitStatus, RuntimeError> {
        let rx = self.children.lock().unwrap_or_else(|e| e.into_inner()).get(&handle.id).cloned();
        if let Some(mut rx) = rx {
            let exit = rx.wait_for(Option::is_some).await.map_err(|_| RuntimeError::Unavailable {
                message: format!("the reaper of {} stopped", handle.id),
                source: None,
            })?;
            return Ok(exit.expect("waited for Some"));
        }
        // Not our child (found again after a restart): watch /proc until it is gone.
        loop {
            match self.state(handle, data) {
                InstanceState::Running { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
                InstanceState::Exited(exit) => return Ok(exit),
                InstanceState::Lost => {
                    return Ok(ExitStatus {
                        code: None,
                        signal: None,
                        oom_killed: false,
                        finished_at: self.clock.now(),
                    });
                }
            }
        }
    }
}

/// The directory a program runs in: `dir` as given, or for `$(ORCH_VOLUME_<NAME>)` the host
/// directory of that volume (the one form expanded; any other `$(` is refused).
fn working_dir(dir: &str, volumes: &[orch_core::runtime::HostVolume]) -> Result<PathBuf, RuntimeError> {
    if !dir.contains("$(") {
        return Ok(PathBuf::from(dir));
    }
    let var = dir.strip_prefix("$(").and_then(|r| r.strip_suffix(')')).filter(|v| v.starts_with("ORCH_VOLUME_"));
    let Some(var) = var else {
        return Err(RuntimeError::invalid(
            "container.workingDir",
            format!("{dir:?}: only the whole of $(ORCH_VOLUME_<NAME>) is expanded"),
        ));
    };
    match volumes.iter().find(|v| orch_core::kinds::Volume::env_var(&v.name) == var) {
        Some(v) => Ok(v.host_path.clone()),
        None => Err(RuntimeError::invalid(
            "container.workingDir",
            format!(
                "$({var}) names none of the instance's volumes (it has: {})",
                volumes.iter().map(|v| orch_core::kinds::Volume::env_var(&v.name)).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Where `program` would be found: a path as given, or the first match on the `PATH` the process
/// gets (the container's own `PATH` when it sets one).
fn find_program(program: &str, c: &orch_core::kinds::Container, work_dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let p = if program.starts_with('/') { PathBuf::from(program) } else { work_dir.join(program) };
        return runnable(&p).then_some(p);
    }
    let path = c
        .env
        .iter()
        .rev()
        .find(|e| e.name == "PATH")
        .map(|e| e.value.clone())
        .or_else(|| std::env::var("PATH").ok())?;
    path.split(':').map(|d| Path::new(d).join(program)).find(|p| runnable(p))
}

fn check_id(id: &str) -> Result<(), RuntimeError> {
    orch_core::runtime::check_instance_id(id)
}

/// The start time (field 22 of `/proc/<pid>/stat`) of a live, non-zombie process.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn is_alive(pid: i32, ticks: u64) -> bool {
    start_ticks(pid) == Some(ticks)
}

/// True while any process of the instance's group exists. A group id cannot be reused while
/// the group has members, so this never mistakes another group for ours.
fn group_alive(pid: i32) -> bool {
    pid > 1 && kill(Pid::from_raw(-pid), None).is_ok()
}

fn signal_group(pid: i32, signal: Signal) {
    if pid <= 1 {
        return; // never signal init's group or "every process"
    }
    // The instance leads its own process group, so the negative pid reaches its children too.
    // ESRCH (already gone) is the expected outcome of a stop racing an exit.
    let _ = kill(Pid::from_raw(-pid), signal);
}

fn exit_from(status: std::process::ExitStatus, finished_at: Timestamp) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus { code: status.code(), signal: status.signal(), oom_killed: false, finished_at }
}

/// An exit code as a shell reports it: 128 + the signal's number when a signal ended it.
fn shell_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(-1)
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            resource_limits: self.limits.enforced(),
            images: false,
            recover: true,
            exit_code_after_recover: false,
            log_files: true,
            published_ports: false,
        }
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<Handle, RuntimeError> {
        check_id(&spec.id)?;
        let c = &spec.container;
        let Some(program) = c.command.first().filter(|p| !p.is_empty()) else {
            return Err(RuntimeError::invalid(
                "container.command",
                "required: the process runtime runs commands, not images",
            ));
        };
        // What this backend cannot honour is refused, never ignored.
        if let Some(image) = &c.image {
            return Err(RuntimeError::invalid(
                "container.image",
                format!(
                    "{image}: the process runtime runs commands, not images (run it on a node with a container runtime)"
                ),
            ));
        }
        if let Some(i) = (!c.volume_mounts.is_empty()).then_some(0) {
            return Err(RuntimeError::invalid(
                format!("container.volumeMounts[{i}]"),
                "the process runtime cannot mount volumes at paths: it gives each of the workload's volumes to \
                 the program as ORCH_VOLUME_<NAME> (drop the mounts, or run it on a node with a container runtime)",
            ));
        }
        if let LimitSupport::Unsupported(reason) = &*self.limits
            && !c.resources.limits.is_empty()
        {
            return Err(RuntimeError::invalid(
                "container.resources.limits",
                format!("this node cannot enforce limits ({reason})"),
            ));
        }
        let work_dir = match &c.working_dir {
            Some(dir) => {
                let expanded = working_dir(dir, &spec.volumes)?;
                if !expanded.is_dir() {
                    return Err(RuntimeError::invalid(
                        "container.workingDir",
                        format!("{} is not a directory", expanded.display()),
                    ));
                }
                expanded
            }
            None => self.dir(&spec.id),
        };
        // Limits reach this point only where they are enforced (refused above elsewhere).
        let limits = if self.limits.enforced() { Limits::of(c)? } else { Limits::default() };
        let limited = self.limits.enforced() && !limits.is_empty();
        if limited && find_program(program, c, &work_dir).is_none() {
            // Run directly, the spawn itself says this; through the group-joining shell it would be
            // an exit code instead.
            return Err(RuntimeError::invalid("container.command[0]", format!("cannot run {program}: not found")));
        }
        for (i, v) in spec.volumes.iter().enumerate() {
            if !v.host_path.is_dir() {
                return Err(RuntimeError::invalid(
                    format!("volumes[{i}].hostPath"),
                    format!("{} is not a directory", v.host_path.display()),
                ));
            }
        }
        let dir = self.dir(&spec.id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::invalid("id", format!("{} is already in use", spec.id)));
            }
            Err(e) => return Err(RuntimeError::io(format!("creating {}", dir.display()), e)),
        }
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .map_err(|e| RuntimeError::io(format!("opening {name} of {}", spec.id), e))
        };
        let (stdout, stderr) = (open("stdout.log")?, open("stderr.log")?);
        let mut cmd = if limited {
            let procs = match self.limits.create(&spec.id, &limits) {
                Ok(procs) => procs,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            };
            // The shell joins the instance's groups, then becomes the program (same pid, same
            // process group): the program never runs outside its limits.
            let mut cmd = tokio::process::Command::new("/bin/sh");
            cmd.arg("-c").arg(JOIN_SCRIPT).arg("orch-join").arg(procs.len().to_string()).args(&procs).arg(program);
            cmd
        } else {
            tokio::process::Command::new(program)
        };
        cmd.args(&c.command[1..])
            .args(&c.args)
            .env("ORCH_INSTANCE_ID", &spec.id)
            .current_dir(&work_dir)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false);
        for e in &c.env {
            cmd.env(&e.name, &e.value);
        }
        for v in &spec.volumes {
            cmd.env(orch_core::kinds::Volume::env_var(&v.name), &v.host_path);
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                self.limits.remove(&spec.id);
                return Err(RuntimeError::invalid("container.command[0]", format!("cannot run {program}: {e}")));
            }
        };
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            // Already reaped (tokio reads no pid after that): undo the start.
            let _ = child.wait().await;
            let _ = std::fs::remove_dir_all(&dir);
            self.limits.remove(&spec.id);
            return Err(RuntimeError::Unavailable {
                message: format!("{} exited before its pid could be read", spec.id),
                source: None,
            });
        };
        let started_at = self.clock.now();
        // A process that already exited has no stat; its start time then no longer matters.
        let data = ProcessData { pid, start_ticks: start_ticks(pid).unwrap_or(0), started_at };
        let handle = Handle {
            runtime: NAME.into(),
            version: HANDLE_VERSION,
            id: spec.id.clone(),
            data: serde_json::to_value(&data).expect("plain data serializes"),
        };
        let handle_json = serde_json::to_vec_pretty(&handle).expect("plain data serializes");
        if let Err(e) = std::fs::write(dir.join("handle.json"), handle_json) {
            // Without its handle on disk the instance could not be found again: undo the start.
            signal_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            let _ = std::fs::remove_dir_all(&dir);
            self.limits.remove(&spec.id);
            return Err(RuntimeError::io("writing handle.json", e));
        }
        // The reaper: waits on the child (so it never lingers as a zombie) and records the exit.
        let (tx, rx) = watch::channel(None);
        self.children.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.id.clone(), rx);
        let (clock, groups, id) = (self.clock.clone(), self.limits.clone(), spec.id.clone());
        tokio::spawn(async move {
            let mut exit = match child.wait().await {
                Ok(status) => exit_from(status, clock.now()),
                Err(_) => ExitStatus { code: None, signal: None, oom_killed: false, finished_at: clock.now() },
            };
            exit.oom_killed = limited && groups.oom_killed(&id);
            if let Ok(json) = serde_json::to_vec(&exit) {
                let _ = std::fs::write(dir.join("exit.json"), json);
            }
            tx.send_replace(Some(exit));
        });
        Ok(handle)
    }

    async fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), RuntimeError> {
        let data = self.data(handle)?;
        let leader_running = matches!(self.state(handle, &data), InstanceState::Running { .. });
        // Children left behind by an exited leader (`sh -c 'server &'`) still count: the stop
        // is done when the whole group is gone.
        if !leader_running && !group_alive(data.pid) && self.limits.members(&handle.id).is_empty() {
            return Ok(());
        }
        self.signal_all(handle, &data, Signal::SIGTERM);
        if let Ok(done) = tokio::time::timeout(grace, self.wait_group_gone(handle, &data)).await {
            return done;
        }
        self.signal_all(handle, &data, Signal::SIGKILL);
        tokio::time::timeout(Duration::from_secs(10), self.wait_group_gone(handle, &data)).await.map_err(|_| {
            RuntimeError::Unavailable { message: format!("{} survived SIGKILL for 10 s", handle.id), source: None }
        })?
    }

    async fn remove(&self, handle: &Handle) -> Result<(), RuntimeError> {
        self.stop(handle, Duration::ZERO).await?;
        self.children.lock().unwrap_or_else(|e| e.into_inner()).remove(&handle.id);
        let limits = self.limits.clone();
        let id = handle.id.clone();
        let _ = tokio::task::spawn_blocking(move || limits.remove(&id)).await;
        let dir = self.dir(&handle.id);
        std::fs::remove_dir_all(&dir).map_err(|e| RuntimeError::io(format!("removing {}", dir.display()), e))
    }

    async fn status(&self, handle: &Handle) -> Result<InstanceState, RuntimeError> {
        let data = self.data(handle)?;
        Ok(self.state(handle, &data))
    }

    async fn wait(&self, handle: &Handle) -> Result<ExitStatus, RuntimeError> {
        let data = self.data(handle)?;
        self.wait_exit(handle, &data).await
    }

    async fn list(&self) -> Result<Vec<Handle>, RuntimeError> {
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| RuntimeError::io(format!("reading {}", self.root.display()), e))?;
        let mut handles = Vec::new();
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("handle.json")) else { continue };
            match serde_json::from_str::<Handle>(&text) {
                Ok(h) => handles.push(h),
                Err(e) => tracing::warn!(path = %entry.path().display(), error = %e, "skipping an unreadable handle"),
            }
        }
        handles.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(handles)
    }

    async fn logs(&self, handle: &Handle, options: LogOptions) -> Result<BoxStream<'static, LogLine>, RuntimeError> {
        let data = self.data(handle)?;
        let dir = self.dir(&handle.id);
        let mut lines = Vec::new();
        let mut offsets = [0usize; 2];
        for (i, (stream, file)) in
            [(LogStream::Stdout, "stdout.log"), (LogStream::Stderr, "stderr.log")].into_iter().enumerate()
        {
            let text = String::from_utf8_lossy(&std::fs::read(dir.join(file)).unwrap_or_default()).into_owned();
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            offsets[i] = complete.len();
            let all: Vec<&str> = complete.lines().collect();
            let skip = options.tail.map_or(0, |n| all.len().saturating_sub(n));
            lines.extend(all[skip..].iter().map(|l| LogLine { stream, line: l.to_string() }));
        }
        let head = futures::stream::iter(lines);
        if !options.follow {
            return Ok(head.boxed());
        }
        // Follow: poll both files for complete new lines until the instance has exited and the
        // files are drained.
        let this = self.clone();
        let handle = handle.clone();
        let tail = futures::stream::unfold((offsets, false), move |(mut offsets, mut done)| {
            let (this, handle, dir, data) = (this.clone(), handle.clone(), dir.clone(), data.clone());
            async move {
                loop {
                    let mut batch = Vec::new();
                    for (i, (stream, file)) in
                        [(LogStream::Stdout, "stdout.log"), (LogStream::Stderr, "stderr.log")].into_iter().enumerate()
                    {
                        let text =
                            String::from_utf8_lossy(&std::fs::read(dir.join(file)).unwrap_or_default()).into_owned();
                        if text.len() < offsets[i] {
                            offsets[i] = 0; // rotated (truncated) under us: start over
                        }
                        if text.len() > offsets[i] {
                            let fresh = &text[offsets[i]..];
                            let complete = &fresh[..fresh.rfind('\n').map_or(0, |j| j + 1)];
                            offsets[i] += complete.len();
                            batch.extend(complete.lines().map(|l| LogLine { stream, line: l.to_string() }));
                        }
                    }
                    if !batch.is_empty() {
                        return Some((futures::stream::iter(batch), (offsets, done)));
                    }
                    if done {
                        return None;
                    }
                    if !matches!(this.state(&handle, &data), InstanceState::Running { .. }) {
                        done = true; // one more pass picks up the last lines
                        continue;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
        .flatten();
        Ok(head.chain(tail).boxed())
    }

    async fn recover(&self, handle: &Handle) -> Result<InstanceState, RuntimeError> {
        let data = self.data(handle)?;
        Ok(self.state(handle, &data))
    }

    /// Copy-then-truncate rotation: the process keeps its file open in append mode, so the
    /// current file is copied to `.1` (older ones shift up) and truncated in place.
    async fn rotate_logs(&self, handle: &Handle, max_bytes: u64, keep: usize) -> Result<(), RuntimeError> {
        self.data(handle)?;
        let dir = self.dir(&handle.id);
        for file in ["stdout.log", "stderr.log"] {
            let path = dir.join(file);
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if size <= max_bytes {
                continue;
            }
            let io = |e| RuntimeError::io(format!("rotating {}", path.display()), e);
            if keep == 0 {
                std::fs::File::options().write(true).open(&path).and_then(|f| f.set_len(0)).map_err(io)?;
                continue;
            }
            let numbered = |k: usize| dir.join(format!("{file}.{k}"));
            let _ = std::fs::remove_file(numbered(keep));
            for k in (1..keep).rev() {
                let _ = std::fs::rename(numbered(k), numbered(k + 1));
            }
            // Copied aside, then truncated, then named: `<file>.1` appears whole, and only once
            // the current file starts over.
            let aside = dir.join(format!(".{file}.rotating"));
            std::fs::copy(&path, &aside).map_err(io)?;
            std::fs::File::options().write(true).open(&path).and_then(|f| f.set_len(0)).map_err(io)?;
            std::fs::rename(&aside, numbered(1)).map_err(io)?;
        }
        Ok(())
    }

    /// Runs the command on the host in the instance's directory: for a host process that is
    /// "inside" it.
    async fn exec_output(
        &self,
        handle: &Handle,
        command: &[String],
        timeout: Duration,
    ) -> Result<orch_core::ExecOutput, RuntimeError> {
        use tokio::io::AsyncReadExt;
        self.data(handle)?;
        let Some(program) = command.first() else {
            return Err(RuntimeError::invalid("command", "must not be empty"));
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&command[1..])
            .current_dir(self.dir(&handle.id))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own group, so a timeout kills whatever it started too.
            .process_group(0)
            .kill_on_drop(true);
        let mut child =
            cmd.spawn().map_err(|e| RuntimeError::invalid("command[0]", format!("cannot run {program}: {e}")))?;
        let group = child.id().and_then(|id| i32::try_from(id).ok());
        let limit = orch_core::runtime::EXEC_OUTPUT_LIMIT as u64;
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(RuntimeError::invalid("command", "its output could not be captured"));
        };
        let run = async {
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            // Read at most the limit of each; what is beyond goes to a sink so the command
            // never blocks on a full pipe.
            let drain = |r: tokio::process::ChildStdout| async move {
                let mut r = r;
                let mut buf = Vec::new();
                (&mut r).take(limit).read_to_end(&mut buf).await.ok();
                tokio::io::copy(&mut r, &mut tokio::io::sink()).await.ok();
                buf
            };
            let drain_err = |r: tokio::process::ChildStderr| async move {
                let mut r = r;
                let mut buf = Vec::new();
                (&mut r).take(limit).read_to_end(&mut buf).await.ok();
                tokio::io::copy(&mut r, &mut tokio::io::sink()).await.ok();
                buf
            };
            let (o, e, status) = tokio::join!(drain(out), drain_err(err), child.wait());
            stdout.extend(o);
            stderr.extend(e);
            (stdout, stderr, status)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok((stdout, stderr, Ok(status))) => {
                Ok(orch_core::ExecOutput { exit_code: status.code().unwrap_or(-1), stdout, stderr, timed_out: false })
            }
            Ok((_, _, Err(e))) => Err(RuntimeError::io(format!("waiting for {program}"), e)),
            Err(_) => {
                if let Some(g) = group {
                    let _ = kill(Pid::from_raw(-g), Signal::SIGKILL);
                }
                let _ = child.wait().await;
                Ok(orch_core::ExecOutput { exit_code: -1, timed_out: true, ..Default::default() })
            }
        }
    }

    /// Runs the command as [`exec_output`](Runtime::exec_output) does (on the host, in the
    /// instance's directory, with the agent's environment), on pipes or, with a terminal, on a
    /// pseudo-terminal that is its controlling terminal.
    async fn exec_stream(
        &self,
        handle: &Handle,
        command: &[String],
        options: ExecStreamOptions,
    ) -> Result<ExecSession, RuntimeError> {
        self.data(handle)?;
        match options.tty {
            None => self.exec_piped(handle, command, options.stdin),
            Some(size) => {
                let mut session = self.exec_on_tty(handle, command, size)?;
                if !options.stdin {
                    session.stdin = None;
                }
                Ok(session)
            }
        }
    }

    async fn exec(&self, handle: &Handle, command: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        self.data(handle)?;
        let Some(program) = command.first() else {
            return Err(RuntimeError::invalid("command", "must not be empty"));
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&command[1..])
            .current_dir(self.dir(&handle.id))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child =
            cmd.spawn().map_err(|e| RuntimeError::invalid("command[0]", format!("cannot run {program}: {e}")))?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => Ok(status.code().unwrap_or(-1)),
            Ok(Err(e)) => Err(RuntimeError::io(format!("waiting for {program}"), e)),
            Err(_) => {
                let _ = child.kill().await;
                Ok(-1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::kinds::Container;
    use orch_core::runtime::TerminalSize;

    fn runtime(tag: &str) -> ProcessRuntime {
        let root = std::env::temp_dir().join(format!("orch-process-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        ProcessRuntime::new(root).unwrap()
    }

    fn sh(id: &str, script: &str) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            container: Container {
                name: "main".into(),
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
            volumes: Vec::new(),
            labels: Default::default(),
        }
    }

    #[tokio::test]
    async fn what_it_cannot_honour_is_refused_naming_the_field() {
        let mut rt = runtime("refused");
        let mut image = sh("image", "true");
        image.container.image = Some("busybox".into());
        let field = |e: RuntimeError| match e {
            RuntimeError::InvalidSpec { field, .. } => field,
            other => panic!("expected InvalidSpec, got {other}"),
        };
        assert_eq!(field(rt.start(&image).await.unwrap_err()), "container.image");
        let mut mounted = sh("mounted", "true");
        mounted.container.volume_mounts =
            vec![orch_core::kinds::VolumeMount { name: "data".into(), mount_path: "/data".into(), read_only: false }];
        let e = rt.start(&mounted).await.unwrap_err();
        assert!(e.to_string().contains("ORCH_VOLUME_<NAME>"), "{e}");
        assert_eq!(field(e), "container.volumeMounts[0]");
        // A host where limits cannot be enforced refuses them instead of running without them.
        rt.limits = Arc::new(LimitSupport::Unsupported("no cgroup file system".into()));
        let mut limited = sh("limited", "true");
        limited.container.resources.limits.insert("memory".into(), "64Mi".parse().unwrap());
        let e = rt.start(&limited).await.unwrap_err();
        assert!(e.to_string().contains("no cgroup file system"), "{e}");
        assert_eq!(field(e), "container.resources.limits");
        assert!(rt.list().await.unwrap().is_empty(), "nothing was started");
    }

    #[tokio::test]
    async fn a_reused_pid_is_not_mistaken_for_the_instance() {
        let rt = runtime("pid-reuse");
        let h = rt.start(&sh("victim", "sleep 60")).await.unwrap();
        // The same pid with another start time is another process (the pid was reused).
        let mut forged = h.clone();
        let mut data: ProcessData = serde_json::from_value(h.data.clone()).unwrap();
        data.start_ticks += 1;
        forged.data = serde_json::to_value(&data).unwrap();
        let fresh = ProcessRuntime::new(&rt.root).unwrap();
        assert_eq!(fresh.recover(&forged).await.unwrap(), InstanceState::Lost);
        assert!(matches!(fresh.recover(&h).await.unwrap(), InstanceState::Running { .. }));
        rt.stop(&h, Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn stop_reaches_the_whole_process_group_and_leaves_no_zombie() {
        let rt = runtime("group");
        let h = rt.start(&sh("family", "sleep 60 & sleep 60 & echo $! > kid.pid; wait")).await.unwrap();
        let kid_file = rt.dir("family").join("kid.pid");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let kid: i32 = loop {
            if let Some(pid) = std::fs::read_to_string(&kid_file).ok().and_then(|s| s.trim().parse().ok()) {
                break pid;
            }
            assert!(std::time::Instant::now() < deadline, "the child never wrote its pid");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let data: ProcessData = serde_json::from_value(h.data.clone()).unwrap();
        rt.stop(&h, Duration::from_secs(5)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(start_ticks(kid).is_none(), "a grandchild survived the stop");
        // Reaped: no zombie left behind under our pid.
        assert!(!std::path::Path::new(&format!("/proc/{}", data.pid)).exists() || start_ticks(data.pid).is_none());
        let exit = rt.wait(&h).await.unwrap();
        assert_eq!(exit.signal, Some(15));
    }

    #[tokio::test]
    async fn volumes_and_instance_id_reach_the_process() {
        let rt = runtime("volumes");
        let vol = rt.root.join("shared-data");
        std::fs::create_dir_all(&vol).unwrap();
        let mut spec = sh("vol", "echo \"$ORCH_INSTANCE_ID $ORCH_VOLUME_DATA_DIR\"");
        spec.volumes = vec![orch_core::runtime::HostVolume { name: "data-dir".into(), host_path: vol.clone() }];
        let h = rt.start(&spec).await.unwrap();
        rt.wait(&h).await.unwrap();
        let out: Vec<LogLine> = rt.logs(&h, LogOptions::default()).await.unwrap().collect().await;
        assert_eq!(out[0].line, format!("vol {}", vol.display()));
        let mut missing = sh("vol2", "true");
        missing.volumes = vec![orch_core::runtime::HostVolume { name: "x".into(), host_path: "/no/such/orch".into() }];
        assert!(
            matches!(rt.start(&missing).await.unwrap_err(), RuntimeError::InvalidSpec { field, .. } if field == "volumes[0].hostPath")
        );
    }

    #[tokio::test]
    async fn the_working_dir_can_be_a_volume_and_other_expansions_are_refused() {
        let rt = runtime("workdir");
        let vol = rt.root.join("db-data");
        std::fs::create_dir_all(&vol).unwrap();
        let volumes = vec![orch_core::runtime::HostVolume { name: "db-data".into(), host_path: vol.clone() }];
        let mut spec = sh("inside", "pwd && echo here > relative.txt");
        spec.container.working_dir = Some("$(ORCH_VOLUME_DB_DATA)".into());
        spec.volumes = volumes.clone();
        let h = rt.start(&spec).await.unwrap();
        rt.wait(&h).await.unwrap();
        let out: Vec<LogLine> = rt.logs(&h, LogOptions::default()).await.unwrap().collect().await;
        assert_eq!(Path::new(&out[0].line).canonicalize().unwrap(), vol.canonicalize().unwrap());
        assert_eq!(
            std::fs::read_to_string(vol.join("relative.txt")).unwrap().trim(),
            "here",
            "it ran inside its volume"
        );

        for (i, (dir, says)) in [
            ("$(ORCH_VOLUME_OTHER)", "names none of the instance's volumes (it has: ORCH_VOLUME_DB_DATA)"),
            ("$(HOME)", "only the whole of $(ORCH_VOLUME_<NAME>) is expanded"),
            ("$(ORCH_VOLUME_DB_DATA)/sub", "only the whole of $(ORCH_VOLUME_<NAME>) is expanded"),
        ]
        .into_iter()
        .enumerate()
        {
            let mut bad = sh(&format!("bad{i}"), "true");
            bad.container.working_dir = Some(dir.into());
            bad.volumes = volumes.clone();
            match rt.start(&bad).await.unwrap_err() {
                RuntimeError::InvalidSpec { field, reason } => {
                    assert_eq!(field, "container.workingDir");
                    assert!(reason.contains(says), "{dir}: {reason}");
                }
                e => panic!("{dir}: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_spec_error() {
        let rt = runtime("missing");
        let mut spec = sh("ghost", "");
        spec.container.command = vec!["/no/such/program".into()];
        let e = rt.start(&spec).await.unwrap_err();
        assert!(e.to_string().contains("container.command[0]: cannot run /no/such/program"), "{e}");
        assert!(!rt.dir("ghost").exists(), "a failed start leaves nothing behind");
    }

    #[tokio::test]
    async fn stop_reaches_children_left_by_an_exited_leader() {
        let rt = runtime("orphans");
        let h = rt.start(&sh("orphans", "sleep 60 & echo $! > kid.pid")).await.unwrap();
        assert!(rt.wait(&h).await.unwrap().success(), "the leader exits at once");
        let kid: i32 = std::fs::read_to_string(rt.dir("orphans").join("kid.pid")).unwrap().trim().parse().unwrap();
        assert!(start_ticks(kid).is_some(), "the background child outlives its leader");
        rt.stop(&h, Duration::from_secs(5)).await.unwrap();
        assert!(start_ticks(kid).is_none(), "stop must reach what the leader left behind");
        rt.remove(&h).await.unwrap();
        let forged = Handle { data: serde_json::json!({"pid": 1, "start_ticks": 1, "started_at": 0}), ..h };
        std::fs::create_dir_all(rt.dir("orphans")).unwrap();
        assert!(matches!(rt.stop(&forged, Duration::ZERO).await.unwrap_err(), RuntimeError::BadHandle { .. }));
    }

    #[tokio::test]
    async fn logs_rotate_by_copy_and_truncate_and_follow_survives_it() {
        let rt = runtime("rotate");
        // The program writes its second line only once the test has rotated (it waits for the
        // file `rotated`), so no timing decides which file a line lands in.
        let script = "head -c 5000 /dev/zero | tr '\\0' 'x'; echo; \
                      while [ ! -e rotated ]; do sleep 0.02; done; echo after-rotation; sleep 0.3";
        let h = rt.start(&sh("chatty", script)).await.unwrap();
        let follow = rt.logs(&h, LogOptions { tail: None, follow: true }).await.unwrap();
        let collector = tokio::spawn(follow.collect::<Vec<LogLine>>());
        let dir = rt.dir("chatty");
        orch_core::testkit::wait_until("the first line written", Duration::from_secs(30), async || {
            std::fs::metadata(dir.join("stdout.log")).is_ok_and(|m| m.len() == 5001)
        })
        .await;
        rt.rotate_logs(&h, 1000, 2).await.unwrap();
        std::fs::write(dir.join("rotated"), b"").unwrap();
        assert_eq!(std::fs::metadata(dir.join("stdout.log.1")).unwrap().len(), 5001, "the old content moved to .1");
        assert!(std::fs::metadata(dir.join("stdout.log")).unwrap().len() < 1000, "the current file was truncated");
        rt.rotate_logs(&h, 1000, 2).await.unwrap(); // small now: nothing to do
        assert!(!dir.join("stdout.log.2").exists());
        let lines: Vec<String> = collector.await.unwrap().into_iter().map(|l| l.line).collect();
        assert_eq!(
            lines.last().map(String::as_str),
            Some("after-rotation"),
            "following goes on after a rotation: {:?}",
            lines.len()
        );
        rt.wait(&h).await.unwrap();
    }

    #[tokio::test]
    async fn exec_output_returns_what_the_command_printed_and_a_timeout_kills_its_group() {
        let rt = runtime("exec-output");
        let h = rt.start(&sh("svc", "echo ready > state; exec sleep 30")).await.unwrap();
        let cmd = |s: &str| vec!["/bin/sh".to_string(), "-c".to_string(), s.to_string()];
        orch_core::testkit::wait_until("the instance wrote its state", Duration::from_secs(30), async || {
            rt.dir("svc").join("state").exists()
        })
        .await;
        // It runs in the instance's directory: it reads the file the instance wrote.
        let out = rt.exec_output(&h, &cmd("cat state; echo oops >&2; exit 3"), Duration::from_secs(30)).await.unwrap();
        assert_eq!((out.exit_code, out.stdout.as_slice(), out.stderr.as_slice()), (3, &b"ready\n"[..], &b"oops\n"[..]));
        assert!(!out.timed_out);
        // A timeout kills the command and what it started (the sleep writes its pid first).
        let out =
            rt.exec_output(&h, &cmd("sleep 60 & echo $! > child; wait"), Duration::from_millis(500)).await.unwrap();
        assert!(out.timed_out && out.exit_code == -1, "{out:?}");
        let pid: i32 = std::fs::read_to_string(rt.dir("svc").join("child")).unwrap().trim().parse().unwrap();
        orch_core::testkit::wait_until("the command's child is gone", Duration::from_secs(10), async || {
            kill(Pid::from_raw(pid), None).is_err()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
        })
        .await;
        rt.remove(&h).await.unwrap();
    }

    /// Reads `r` into `seen` until `pattern` has appeared in all that was read so far.
    async fn read_until(r: &mut (impl tokio::io::AsyncRead + Unpin), seen: &mut Vec<u8>, pattern: &str) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(seen).contains(pattern) {
            // Long enough that only a wrong behaviour reaches it; then it says what came.
            let n = tokio::time::timeout(Duration::from_secs(60), r.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {pattern:?} in a minute: {:?}", String::from_utf8_lossy(seen)))
                .unwrap();
            assert!(n > 0, "the stream ended before {pattern:?}: {:?}", String::from_utf8_lossy(seen));
            seen.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exec_stream_passes_input_and_output_live_and_the_exit_code() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = runtime("exec-stream");
        let h = rt.start(&sh("svc", "exec sleep 30")).await.unwrap();
        let cmd = |s: &str| vec!["/bin/sh".to_string(), "-c".to_string(), s.to_string()];
        let options = ExecStreamOptions { stdin: true, tty: None };
        // Each line comes back while the command still runs (it waits for the next one).
        let mut s = rt
            .exec_stream(&h, &cmd("while read l; do echo got-$l; echo err-$l >&2; done; exit 3"), options)
            .await
            .unwrap();
        assert!(s.resize.is_none(), "no terminal, nothing to resize");
        let mut stdin = s.stdin.take().unwrap();
        let mut stderr = s.stderr.take().unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        stdin.write_all(b"a\n").await.unwrap();
        read_until(&mut s.stdout, &mut out, "got-a\n").await;
        read_until(&mut stderr, &mut err, "err-a\n").await;
        stdin.write_all(b"b\n").await.unwrap();
        read_until(&mut s.stdout, &mut out, "got-b\n").await;
        assert_eq!((out.as_slice(), err.as_slice()), (&b"got-a\ngot-b\n"[..], &b"err-a\n"[..]));
        // The end of the input ends the loop.
        stdin.shutdown().await.unwrap();
        let mut rest = String::new();
        s.stdout.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "");
        assert_eq!(s.exit.await.unwrap(), 3);

        // Without stdin the command reads end-of-file at once.
        let s = rt.exec_stream(&h, &cmd("cat; echo done"), ExecStreamOptions::default()).await.unwrap();
        assert!(s.stdin.is_none());
        let mut out = String::new();
        let mut stdout = s.stdout;
        stdout.read_to_string(&mut out).await.unwrap();
        assert_eq!((out.as_str(), s.exit.await.unwrap()), ("done\n", 0));

        // A program that cannot run is refused, not an exit code; so is an empty command.
        let e = rt.exec_stream(&h, &["/no/such/program".to_string()], options).await.unwrap_err();
        assert!(e.to_string().contains("cannot run /no/such/program"), "{e}");
        assert!(rt.exec_stream(&h, &[], options).await.is_err());

        // An abandoned session (its caller gone) kills the command and what it started.
        let mut s = rt.exec_stream(&h, &cmd("sleep 60 & echo $!; wait"), options).await.unwrap();
        let mut line = Vec::new();
        read_until(&mut s.stdout, &mut line, "\n").await;
        let pid: i32 = String::from_utf8(line).unwrap().trim().parse().unwrap();
        drop(s);
        orch_core::testkit::wait_until("the abandoned command's child is gone", Duration::from_secs(10), async || {
            kill(Pid::from_raw(pid), None).is_err()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
        })
        .await;
        rt.remove(&h).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exec_stream_on_a_terminal_sizes_it_and_makes_it_the_controlling_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = runtime("exec-tty");
        let h = rt.start(&sh("svc", "exec sleep 30")).await.unwrap();
        let cmd = |s: &str| vec!["/bin/sh".to_string(), "-c".to_string(), s.to_string()];
        let options = ExecStreamOptions { stdin: true, tty: Some(TerminalSize { rows: 33, cols: 101 }) };
        let script = "test -t 0 && test -t 1 && test -t 2 && echo on-a-tty; stty size; \
                      read l; stty size; { : </dev/tty; } 2>&1 && echo controlling; cat; echo after-eof; exit 5";
        let mut s = rt.exec_stream(&h, &cmd(script), options).await.unwrap();
        assert!(s.stderr.is_none(), "one terminal, one stream");
        let mut stdin = s.stdin.take().unwrap();
        let mut resize = s.resize.take().expect("a terminal can be resized");
        // Terminal output ends lines with CR LF.
        let mut seen = Vec::new();
        read_until(&mut s.stdout, &mut seen, "on-a-tty\r\n33 101\r\n").await;
        resize(TerminalSize { rows: 40, cols: 120 }).await.unwrap();
        stdin.write_all(b"go\n").await.unwrap();
        // What is typed is echoed, as on any terminal, then the new size shows.
        read_until(&mut s.stdout, &mut seen, "40 120\r\n").await;
        // /dev/tty opens only on a controlling terminal.
        read_until(&mut s.stdout, &mut seen, "controlling\r\n").await;
        stdin.write_all(b"typed\n").await.unwrap();
        read_until(&mut s.stdout, &mut seen, "typed\r\ntyped\r\n").await;
        // The end of the input is the end-of-file character: cat ends, the script goes on.
        stdin.shutdown().await.unwrap();
        let mut rest = String::new();
        s.stdout.read_to_string(&mut rest).await.unwrap();
        assert!(rest.contains("after-eof"), "{rest:?}");
        assert_eq!(s.exit.await.unwrap(), 5);
        rt.remove(&h).await.unwrap();
    }
}
