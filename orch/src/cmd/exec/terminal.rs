//! The caller's side of `orch exec -t`: raw mode on orch's own terminal for the session, and
//! the terminal's size.

use orch_core::runtime::TerminalSize;
use rustix::termios::{OptionalActions, Termios, tcgetattr, tcgetwinsize, tcsetattr};

/// The size given when orch has no terminal to read one from.
pub(crate) const DEFAULT_SIZE: TerminalSize = TerminalSize { rows: 24, cols: 80 };

/// The size of orch's terminal (its standard input's, output's or error's, the first that is
/// one).
pub(crate) fn size() -> Option<TerminalSize> {
    let sizes = [tcgetwinsize(std::io::stdin()), tcgetwinsize(std::io::stdout()), tcgetwinsize(std::io::stderr())];
    sizes
        .into_iter()
        .flatten()
        .find(|w| w.ws_row > 0 && w.ws_col > 0)
        .map(|w| TerminalSize { rows: w.ws_row, cols: w.ws_col })
}

/// Orch's standard input in raw mode (every key passed as it is typed, Ctrl-C included, no
/// echo: the command's terminal echoes) until this is dropped, which restores it, on an error
/// or a panic too.
pub(crate) struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal of orch's standard input in raw mode.
    pub(crate) fn enable() -> std::io::Result<RawMode> {
        let saved = tcgetattr(std::io::stdin())?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(std::io::stdin(), OptionalActions::Now, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Drain: output still queued for the terminal is written in the mode it was meant for.
        let _ = tcsetattr(std::io::stdin(), OptionalActions::Drain, &self.saved);
    }
}
