//! The Docker runtime's interactive exec: `docker exec`'s attach, with the Engine's terminal
//! when asked for one.

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::ExecConfig;
use futures::StreamExt;
use orch_core::runtime::{ExecSession, ExecStreamOptions, Handle, RuntimeError, TerminalSize};

use super::DockerRuntime;

impl DockerRuntime {
    /// What [`exec_stream`](orch_core::Runtime::exec_stream) does for Docker.
    pub(super) async fn exec_session(
        &self,
        handle: &Handle,
        command: &[String],
        options: ExecStreamOptions,
    ) -> Result<ExecSession, RuntimeError> {
        let (container, _) = self.find(handle).await?;
        if command.first().is_none_or(String::is_empty) {
            return Err(RuntimeError::invalid("command", "must not be empty"));
        }
        let docker = self.docker().await?;
        let tty = options.tty.is_some();
        let config = ExecConfig {
            cmd: Some(command.to_vec()),
            attach_stdin: Some(options.stdin),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(tty),
            ..Default::default()
        };
        let action = format!("exec in {}", handle.id);
        let exec = docker.create_exec(&container, config).await.map_err(|e| self.api_error(action.clone(), e))?;
        let start = bollard::exec::StartExecOptions { detach: false, tty, output_capacity: None };
        let (mut output, input) = match docker.start_exec(&exec.id, Some(start)).await {
            Ok(bollard::exec::StartExecResults::Attached { output, input }) => (output, input),
            Ok(bollard::exec::StartExecResults::Detached) => {
                return Err(RuntimeError::Unavailable {
                    message: format!("{action}: the Engine started the exec detached"),
                    source: None,
                });
            }
            Err(e) => return Err(self.api_error(action, e)),
        };
        if let Some(size) = options.tty {
            let size = bollard::exec::ResizeExecOptions { height: size.rows, width: size.cols };
            if let Err(e) = docker.resize_exec(&exec.id, size).await {
                // A command that has already ended has no terminal left to size.
                tracing::debug!(exec = %exec.id, error = %e, "cannot size the exec's terminal");
            }
        }
        // The Engine sends both streams on one connection: parted here into two pipes.
        let (out_r, mut out_w) = tokio::io::duplex(64 << 10);
        let (err_r, mut err_w) = tokio::io::duplex(64 << 10);
        let pump = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(frame) = output.next().await {
                let written = match frame {
                    Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                        out_w.write_all(&message).await
                    }
                    Ok(LogOutput::StdErr { message }) => err_w.write_all(&message).await,
                    Ok(LogOutput::StdIn { .. }) => Ok(()),
                    Err(e) => return Err(e),
                };
                if written.is_err() {
                    break; // the caller has gone
                }
            }
            Ok(())
        });
        let (docker2, exec_id, rt) = (docker.clone(), exec.id.clone(), self.clone());
        let exit = Box::pin(async move {
            let pumped = pump.await.map_err(|e| RuntimeError::Unavailable {
                message: format!("{action}: the output relay stopped"),
                source: Some(Box::new(e)),
            })?;
            pumped.map_err(|e| rt.api_error(action.clone(), e))?;
            // The stream ends when the command does; the Engine may take a moment to record it.
            for _ in 0..100 {
                let done = docker2.inspect_exec(&exec_id).await.map_err(|e| rt.api_error(action.clone(), e))?;
                if done.running != Some(true) {
                    return Ok(done.exit_code.map_or(-1, |c| c as i32));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(RuntimeError::Unavailable {
                message: format!("{action}: the output ended but the Engine still reports the command running"),
                source: None,
            })
        });
        let resize: Option<orch_core::runtime::Resize> = tty.then(|| {
            let (docker, id) = (docker.clone(), exec.id.clone());
            Box::new(move |size: TerminalSize| {
                let (docker, id) = (docker.clone(), id.clone());
                Box::pin(async move {
                    let size = bollard::exec::ResizeExecOptions { height: size.rows, width: size.cols };
                    docker.resize_exec(&id, size).await.map_err(|e| RuntimeError::Unavailable {
                        message: format!("resizing the terminal of exec {id}"),
                        source: Some(Box::new(e)),
                    })
                }) as futures::future::BoxFuture<'static, _>
            }) as orch_core::runtime::Resize
        });
        Ok(ExecSession {
            stdin: options.stdin.then(|| Box::pin(EngineInput { inner: input, tty, eof_typed: false }) as _),
            stdout: Box::pin(out_r),
            stderr: (!tty).then(|| Box::pin(err_r) as _),
            resize,
            exit,
        })
    }
}

/// An exec's input on the Engine's connection: `shutdown` closes the connection's writing half,
/// which closes the command's standard input. On a terminal it types the end-of-file character
/// instead and leaves the connection open: there the Engine answers a closed input by ending
/// the output, while the command goes on.
struct EngineInput {
    inner: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    /// On a terminal.
    tty: bool,
    /// The end-of-file character has been typed.
    eof_typed: bool,
}

impl tokio::io::AsyncWrite for EngineInput {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.tty {
            if !self.eof_typed {
                std::task::ready!(self.inner.as_mut().poll_write(cx, &[4]))?;
                self.eof_typed = true;
            }
            return self.inner.as_mut().poll_flush(cx);
        }
        self.inner.as_mut().poll_shutdown(cx)
    }
}
