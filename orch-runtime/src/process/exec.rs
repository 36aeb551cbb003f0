//! The process runtime's interactive exec: a command in an instance's directory on pipes or on a
//! pseudo-terminal, its group killed when the session is abandoned.

use std::path::Path;

use nix::sys::signal::Signal;
use orch_core::runtime::{ExecSession, Handle, RuntimeError, TerminalSize};

use super::{ProcessRuntime, find_program, shell_code, signal_group};

/// Kills the process group of an exec that was abandoned (its session dropped) before it ended.
struct AbandonGuard {
    group: i32,
    ended: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.ended {
            signal_group(self.group, Signal::SIGKILL);
        }
    }
}

/// A child's standard input whose `shutdown` closes the pipe (tokio's does nothing), so the
/// command reads end-of-file.
struct ClosingStdin(Option<tokio::process::ChildStdin>);

impl tokio::io::AsyncWrite for ClosingStdin {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.0.as_mut() {
            Some(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            None => std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(w) => std::pin::Pin::new(w).poll_flush(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0 = None;
        std::task::Poll::Ready(Ok(()))
    }
}

impl ProcessRuntime {
    /// The command of an exec: `program` and its arguments, run like
    /// [`exec_output`](Runtime::exec_output) runs it (in the instance's directory, with the
    /// agent's environment).
    pub(super) fn exec_command(
        &self,
        handle: &Handle,
        command: &[String],
    ) -> Result<tokio::process::Command, RuntimeError> {
        let Some(program) = command.first().filter(|p| !p.is_empty()) else {
            return Err(RuntimeError::invalid("command", "must not be empty"));
        };
        let dir = self.dir(&handle.id);
        if find_program(program, &orch_core::kinds::Container::default(), &dir).is_none() {
            return Err(RuntimeError::invalid("command[0]", format!("cannot run {program}: not found")));
        }
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&command[1..]).current_dir(dir).kill_on_drop(true);
        Ok(cmd)
    }

    /// An exec on pipes: standard input (when asked for), output and error kept apart.
    pub(super) fn exec_piped(
        &self,
        handle: &Handle,
        command: &[String],
        stdin: bool,
    ) -> Result<ExecSession, RuntimeError> {
        use std::process::Stdio;
        let mut cmd = self.exec_command(handle, command)?;
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so an abandoned session kills whatever it started too.
            .process_group(0);
        let mut child =
            cmd.spawn().map_err(|e| RuntimeError::invalid("command[0]", format!("cannot run {}: {e}", command[0])))?;
        let group = child.id().and_then(|id| i32::try_from(id).ok()).unwrap_or(0);
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(RuntimeError::invalid("command", "its output could not be captured"));
        };
        let input = child.stdin.take().map(|w| Box::pin(ClosingStdin(Some(w))) as _);
        Ok(ExecSession {
            stdin: input,
            stdout: Box::pin(stdout),
            stderr: Some(Box::pin(stderr)),
            resize: None,
            exit: wait_exec(child, group, command[0].clone()),
        })
    }

    /// An exec on a pseudo-terminal of its own: a new session whose controlling terminal it is
    /// (through `setsid -c`, so that Ctrl-C and job control reach the command as on a login
    /// terminal), its standard streams all that terminal.
    pub(super) fn exec_on_tty(
        &self,
        handle: &Handle,
        command: &[String],
        size: TerminalSize,
    ) -> Result<ExecSession, RuntimeError> {
        let mut cmd = self.exec_command(handle, command)?;
        let (reader, writer, resizer, slave) = crate::pty::open(size)?;
        let io = |e| RuntimeError::io("sharing a pseudo-terminal", e);
        let (out, err) = (slave.try_clone().map_err(io)?, slave.try_clone().map_err(io)?);
        let setsid = find_program("setsid", &orch_core::kinds::Container::default(), Path::new("/"));
        if let Some(setsid) = &setsid {
            // A new session needs a process that leads no group: this one, spawned in the
            // agent's group, calls setsid(2) itself (no fork), makes the terminal (its standard
            // input) its controlling terminal, and becomes the command: same pid, a group of
            // its own.
            let std = cmd.as_std();
            let mut wrapped = tokio::process::Command::new(setsid);
            wrapped.arg("-c").arg("--").arg(std.get_program()).args(std.get_args());
            if let Some(dir) = std.get_current_dir() {
                wrapped.current_dir(dir);
            }
            wrapped.kill_on_drop(true);
            cmd = wrapped;
        } else {
            tracing::warn!(
                "setsid (util-linux or busybox) is not on the agent's PATH: the exec's terminal is not its \
                 controlling terminal (Ctrl-C does not interrupt it)"
            );
            cmd.process_group(0);
        }
        cmd.stdin(slave).stdout(out).stderr(err);
        let spawned = cmd.spawn();
        // The command holds the terminal's slave side now; ours go, so that the master reads
        // its end once the command (and all it started there) has closed it.
        drop(cmd);
        let child =
            spawned.map_err(|e| RuntimeError::invalid("command[0]", format!("cannot run {}: {e}", command[0])))?;
        let group = child.id().and_then(|id| i32::try_from(id).ok()).unwrap_or(0);
        Ok(ExecSession {
            stdin: Some(Box::pin(writer)),
            stdout: Box::pin(reader),
            stderr: None,
            resize: Some(Box::new(move |size| {
                let done = crate::pty::resize(&resizer, size);
                Box::pin(async move { done })
            })),
            exit: wait_exec(child, group, command[0].clone()),
        })
    }
}

/// Waits for an exec's command; dropped before it ends, kills the command's group.
fn wait_exec(
    mut child: tokio::process::Child,
    group: i32,
    program: String,
) -> futures::future::BoxFuture<'static, Result<i32, RuntimeError>> {
    let guard = AbandonGuard { group, ended: false };
    Box::pin(async move {
        // The whole guard moves in (not just its flag): dropped with the future, it kills.
        let mut guard = guard;
        let status = child.wait().await;
        guard.ended = true;
        status.map(shell_code).map_err(|e| RuntimeError::io(format!("waiting for {program}"), e))
    })
}
