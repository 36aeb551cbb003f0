//! The [`Runtime`] trait: how a node agent starts, stops and observes the instances (containers
//! or processes) of the workloads bound to its node.
//!
//! The contract, checked for every backend by `testkit::runtime`
//! (feature `testkit`):
//! - `start` returns a serializable, versioned [`Handle`]: the agent stores it, and after a
//!   restart gives it to `recover` to find the instance again;
//! - `stop(grace)` asks politely (the stop signal), waits up to `grace`, then kills; stopping an
//!   instance that has exited or was stopped already succeeds and changes nothing;
//! - `wait` on an exited instance returns its exit at once;
//! - `remove` frees what the instance held (its directory, its logs); the handle is then unknown;
//! - a spec the backend cannot run is refused with [`RuntimeError::InvalidSpec`] naming the field.
//!
//! Restart policies, crash-loop backoff, probes and log rotation live in the node agent, not
//! here, so every runtime gets them.

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::kinds::Container;
use crate::labels::Labels;
use crate::meta::Timestamp;

/// What to run: one container of one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Unique on the node for the instance's whole life (a restart is a new instance), a
    /// DNS-1123 label-like string such as `default.web-0.main.3`.
    pub id: String,
    /// The container to run.
    pub container: Container,
    /// Volumes resolved to host paths by the agent, by volume name.
    pub volumes: Vec<HostVolume>,
    /// Labels identifying the workload, its node and the agent, recorded with the instance.
    pub labels: Labels,
}

/// A volume already resolved to a directory on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVolume {
    /// The workload's volume name, as mounts refer to it.
    pub name: String,
    /// The directory on the host.
    pub host_path: PathBuf,
}

/// A reference to a started instance that survives the agent: serialize it, store it, and pass
/// it to [`Runtime::recover`] after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    /// The runtime that made it (`process`, `docker`, `simulated`).
    pub runtime: String,
    /// The format version of `data`, so an old handle is read correctly or refused clearly.
    pub version: u32,
    /// The instance id from its spec.
    pub id: String,
    /// Backend-specific facts (a pid and its start time, a container id…).
    pub data: serde_json::Value,
}

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, when it exited by itself (or when the backend can tell).
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Killed for using more memory than its limit.
    pub oom_killed: bool,
    /// When it ended.
    pub finished_at: Timestamp,
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// What an instance is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Running since `started_at`.
    Running {
        /// When it started.
        started_at: Timestamp,
    },
    /// Ended.
    Exited(ExitStatus),
    /// The backend cannot find it any more (its process or container is gone without a trace).
    Lost,
}

/// What a backend can do; the agent adapts (no limits enforced, no exec probes…).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// Memory and CPU limits are enforced.
    pub resource_limits: bool,
    /// Images are run (otherwise `command` is required).
    pub images: bool,
    /// A running instance survives the agent and `recover` finds it.
    pub recover: bool,
    /// The exit code of a recovered instance can still be read.
    pub exit_code_after_recover: bool,
    /// Output goes to files the backend never trims: the agent calls
    /// [`Runtime::rotate_logs`] on every resync.
    pub log_files: bool,
    /// Instances have a network of their own and the backend publishes each container port's
    /// `hostPort` on the node (the program listens on its container port). Without it, instances
    /// share the node's network and the program listens on the host port itself.
    #[serde(default)]
    pub published_ports: bool,
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What a command run in an instance ([`Runtime::exec_output`]) printed, and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecOutput {
    /// Its exit code (-1 when it was killed at the timeout).
    pub exit_code: i32,
    /// What it wrote on standard output (at most [`EXEC_OUTPUT_LIMIT`] bytes).
    pub stdout: Vec<u8>,
    /// What it wrote on standard error (at most [`EXEC_OUTPUT_LIMIT`] bytes).
    pub stderr: Vec<u8>,
    /// True when it was killed at the timeout.
    pub timed_out: bool,
}

/// The most of each stream [`Runtime::exec_output`] keeps (4 MiB); the rest is dropped.
pub const EXEC_OUTPUT_LIMIT: usize = 4 << 20;

/// The size of a terminal, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How [`Runtime::exec_stream`] runs a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExecStreamOptions {
    /// The command gets a standard input the caller writes to ([`ExecSession::stdin`]);
    /// without it, it reads end-of-file at once (or, on a terminal, nothing ever).
    pub stdin: bool,
    /// The command runs on a terminal of its own, of this size: its standard input, output and
    /// error are that terminal, so its output is one stream (as on any terminal) and what the
    /// caller writes is typed on it.
    pub tty: Option<TerminalSize>,
}

/// Changes the size of an exec's terminal ([`ExecSession::resize`]).
pub type Resize = Box<dyn FnMut(TerminalSize) -> BoxFuture<'static, Result<(), RuntimeError>> + Send>;

/// A command started by [`Runtime::exec_stream`], its streams open. Dropping the session
/// abandons the command: a backend that can stop it does (the process runtime kills its
/// process group).
pub struct ExecSession {
    /// Its standard input (when [`ExecStreamOptions::stdin`] asked for one). What is written
    /// reaches the command; `shutdown` ends the input: the command reads end-of-file (on a
    /// terminal, the end-of-file character is typed, as a user would).
    pub stdin: Option<Pin<Box<dyn tokio::io::AsyncWrite + Send>>>,
    /// Its standard output; on a terminal, everything the terminal shows. It ends once the
    /// command and whatever it started that holds the stream have closed it.
    pub stdout: Pin<Box<dyn tokio::io::AsyncRead + Send>>,
    /// Its standard error; `None` on a terminal, where it is part of `stdout`.
    pub stderr: Option<Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
    /// Resizes its terminal; `None` without one.
    pub resize: Option<Resize>,
    /// Resolves to the command's exit code once it has ended (128 + the signal's number when a
    /// signal ended it, as a shell reports it).
    pub exit: BoxFuture<'static, Result<i32, RuntimeError>>,
}

impl fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecSession")
            .field("stdin", &self.stdin.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("tty", &self.resize.is_some())
            .finish_non_exhaustive()
    }
}

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Its stream.
    pub stream: LogStream,
    /// The text, without the line break.
    pub line: String,
}

/// Which log lines to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogOptions {
    /// Only the last this many lines of each stream (all when `None`).
    pub tail: Option<usize>,
    /// Keep streaming new lines until the instance exits.
    pub follow: bool,
}

/// Why a runtime call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The spec cannot be run by this backend; the field and the reason say why.
    #[error("invalid instance spec: {field}: {reason}")]
    InvalidSpec {
        /// Path of the offending field, e.g. `container.command`.
        field: String,
        /// Why.
        reason: String,
    },
    /// No instance with this handle (never started, removed, or from another runtime).
    #[error("instance {0} not found")]
    NotFound(String),
    /// A handle this backend cannot read (another runtime, or an unknown version).
    #[error("handle for {id} is not usable by the {runtime} runtime: {reason}")]
    BadHandle {
        /// The instance id.
        id: String,
        /// This runtime.
        runtime: String,
        /// Why.
        reason: String,
    },
    /// The backend cannot work now (daemon down, permission denied…); the message says what
    /// to do.
    #[error("runtime unavailable: {message}")]
    Unavailable {
        /// What failed and what to do about it.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// This backend cannot do what was asked (an interactive exec on simulated nodes, say);
    /// the message says what and where it can be done.
    #[error("{message}")]
    Unsupported {
        /// What cannot be done, and why.
        message: String,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks an instance id the way every backend must accept it: 1-255 of `a-z`, `0-9`, `-`, `.`,
/// `_`, not starting with `.` (so it is safe as a file name, a container name, a label value).
pub fn check_instance_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && !id.starts_with('.')
        && id.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::invalid(
            "id",
            format!("{id:?} must be 1-255 of a-z, 0-9, '-', '.', '_', not starting with '.'"),
        ))
    }
}

impl RuntimeError {
    /// An `InvalidSpec` error.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        RuntimeError::InvalidSpec { field: field.into(), reason: reason.into() }
    }

    /// An `Io` error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io { context: context.into(), source }
    }
}

/// Runs instances on one node. Implementations: local processes, the Docker Engine, simulated
/// nodes (crate `orch-runtime`).
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + fmt::Debug + 'static {
    /// The backend's name, recorded in its handles.
    fn name(&self) -> &str;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Starts an instance.
    ///
    /// # To ensure correctness
    /// Refuses a spec it cannot run with `InvalidSpec` before starting anything; an id already
    /// in use is `InvalidSpec` on `id`. On success the instance is running or has already
    /// exited, never half-started.
    async fn start(&self, spec: &InstanceSpec) -> Result<Handle, RuntimeError>;

    /// Stops an instance: the polite signal, up to `grace` to exit, then a kill.
    ///
    /// # To ensure correctness
    /// Idempotent: stopping an exited or stopped instance succeeds. Returns once it has exited.
    async fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), RuntimeError>;

    /// Frees everything the instance held, killing it first if it still runs.
    async fn remove(&self, handle: &Handle) -> Result<(), RuntimeError>;

    /// What the instance is doing now.
    async fn status(&self, handle: &Handle) -> Result<InstanceState, RuntimeError>;

    /// Waits for the instance to exit; returns at once if it has.
    async fn wait(&self, handle: &Handle) -> Result<ExitStatus, RuntimeError>;

    /// Handles of every instance this runtime manages on the node (including ones started
    /// before the agent restarted).
    async fn list(&self) -> Result<Vec<Handle>, RuntimeError>;

    /// Output lines (see [`LogOptions`]).
    async fn logs(&self, handle: &Handle, options: LogOptions) -> Result<BoxStream<'static, LogLine>, RuntimeError>;

    /// Finds an instance again after the agent restarted: its current state, or `Lost`.
    ///
    /// # To ensure correctness
    /// Never restarts anything, and never mistakes a different process or container that
    /// happens to reuse an id or pid for the instance.
    async fn recover(&self, handle: &Handle) -> Result<InstanceState, RuntimeError>;

    /// Runs `command` inside the instance (for exec health probes) and returns its exit code.
    /// Backends that cannot do this keep the default, which refuses.
    async fn exec(&self, handle: &Handle, command: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        let _ = (command, timeout);
        Err(RuntimeError::Unavailable {
            message: format!("the {} runtime cannot exec into {}", self.name(), handle.id),
            source: None,
        })
    }

    /// Runs `command` inside the instance, as [`exec`](Self::exec) does, and answers what it
    /// printed on standard output and standard error (no input; at most
    /// [`EXEC_OUTPUT_LIMIT`] bytes of each) with its exit code: what `orch exec` shows. Backends
    /// that cannot capture an exec's output keep the default, which refuses.
    ///
    /// # To ensure correctness
    /// The call returns once `timeout` passes (then `timed_out` is true), and a backend that can
    /// kill the command does (the process runtime kills its whole process group; the Docker
    /// Engine has no call that stops an exec, so there it goes on in the container).
    async fn exec_output(
        &self,
        handle: &Handle,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let _ = (command, timeout);
        Err(RuntimeError::Unavailable {
            message: format!("the {} runtime cannot run a command in {} and return its output", self.name(), handle.id),
            source: None,
        })
    }

    /// Starts `command` inside the instance, as [`exec_output`](Self::exec_output) would run it,
    /// with its streams open to the caller while it runs: what `orch exec -i -t` drives. Backends
    /// that cannot keep the default, which refuses with [`RuntimeError::Unsupported`].
    ///
    /// # To ensure correctness
    /// A command that cannot be started (an empty command, a missing program) is refused here
    /// where the backend can tell before it starts anything (the Docker Engine cannot: it
    /// reports a missing program as output and exit code 126 or 127, as `docker exec` does). Output is handed over as the command writes it, never
    /// held until it ends. [`ExecSession::exit`] resolves only once the command has ended; a
    /// caller that reads both output streams to their end and then awaits it has seen all the
    /// output. With [`ExecStreamOptions::tty`] the command's standard streams are a terminal
    /// of that size, and [`ExecSession::resize`] is `Some`.
    async fn exec_stream(
        &self,
        handle: &Handle,
        command: &[String],
        options: ExecStreamOptions,
    ) -> Result<ExecSession, RuntimeError> {
        let _ = (command, options);
        Err(RuntimeError::Unsupported {
            message: format!("the {} runtime cannot run an interactive command in {}", self.name(), handle.id),
        })
    }

    /// Rotates the instance's log files once one is larger than `max_bytes`, keeping `keep`
    /// older files. The agent calls it periodically; backends whose logs are not files keep the
    /// default, which does nothing.
    async fn rotate_logs(&self, handle: &Handle, max_bytes: u64, keep: usize) -> Result<(), RuntimeError> {
        let _ = (handle, max_bytes, keep);
        Ok(())
    }

    /// The address at which the instance's ports are reached from the node (for HTTP and TCP
    /// probes); the default is the loopback address, right for host processes.
    fn address(&self, handle: &Handle) -> std::net::IpAddr {
        let _ = handle;
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    }
}
