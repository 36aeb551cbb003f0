//! Pseudo-terminals for interactive execs ([`Runtime::exec_stream`](orch_core::Runtime) with a
//! terminal): the master side as async I/O, and its size.
//!
//! Everything here is safe code: the pair comes from `nix::pty::openpty`, the size is set with
//! `rustix::termios::tcsetwinsize` (nix has no safe call for it), and the master is read and
//! written through tokio's pipe ends, which take any non-blocking descriptor.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use orch_core::runtime::{RuntimeError, TerminalSize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;

/// A new terminal of `size`: its master side, to read ([`Output`]) and to write ([`Input`]),
/// another descriptor of the master (for [`resize`]), and its slave side, the file the command
/// gets as its standard streams.
pub(crate) fn open(size: TerminalSize) -> Result<(Output, Input, OwnedFd, OwnedFd), RuntimeError> {
    let failed = |e: io::Error| RuntimeError::io("opening a pseudo-terminal", e);
    let winsize = nix::pty::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    let pair = nix::pty::openpty(&winsize, None).map_err(|e| failed(e.into()))?;
    fcntl(&pair.master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|e| failed(e.into()))?;
    let eof = nix::sys::termios::tcgetattr(&pair.slave)
        .map(|t| t.control_chars[nix::sys::termios::SpecialCharacterIndices::VEOF as usize])
        .unwrap_or(4);
    let (writer, resizer) = (pair.master.try_clone().map_err(failed)?, pair.master.try_clone().map_err(failed)?);
    // tokio's pipe ends watch any non-blocking descriptor (this one is a character device,
    // which they read and write just as they would a pipe).
    let output = Output(pipe::Receiver::from_owned_fd_unchecked(pair.master).map_err(failed)?);
    let input = Input { tx: pipe::Sender::from_owned_fd_unchecked(writer).map_err(failed)?, eof };
    Ok((output, input, resizer, pair.slave))
}

/// Sets the size of the terminal `fd` belongs to (either side); the command's foreground
/// process group gets `SIGWINCH`.
pub(crate) fn resize(fd: impl AsFd, size: TerminalSize) -> Result<(), RuntimeError> {
    let winsize = rustix::termios::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    rustix::termios::tcsetwinsize(fd, winsize)
        .map_err(|e| RuntimeError::io("resizing a pseudo-terminal", io::Error::from(e)))
}

/// What the terminal shows, read from its master side.
#[derive(Debug)]
pub(crate) struct Output(pipe::Receiver);

impl AsyncRead for Output {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.0).poll_read(cx, buf)) {
            // Linux answers EIO once every descriptor of the slave side is closed: the command,
            // and all it started on the terminal, are gone. That is the end.
            Err(e) if e.raw_os_error() == Some(Errno::EIO as i32) => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

/// What is typed on the terminal, written to its master side.
#[derive(Debug)]
pub(crate) struct Input {
    tx: pipe::Sender,
    /// The terminal's end-of-file character (`VEOF`, usually Ctrl-D).
    eof: u8,
}

impl AsyncWrite for Input {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tx).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tx).poll_flush(cx)
    }

    /// The end of the input, on a terminal: its end-of-file character, as a user types it (a
    /// terminal cannot be closed for reading while the command still writes to it).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let eof = [self.eof];
        match ready!(Pin::new(&mut self.tx).poll_write(cx, &eof))? {
            0 => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            _ => Poll::Ready(Ok(())),
        }
    }
}
