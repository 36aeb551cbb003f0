//! The framing of an interactive exec's byte stream (protocol `orch-exec.v1`), the same on both
//! hops (command line to API server, API server to agent; the server relays the bytes as they
//! are).
//!
//! A frame is its kind (one byte), the length of its payload (four bytes, big-endian) and the
//! payload. From the caller: `Stdin` (bytes), `StdinEnd` (none), `Resize` (rows and columns, two
//! big-endian `u16`s). From the agent: `Stdout` and `Stderr` (bytes), then one `Exit` (the exit
//! code, a big-endian `i32`) or one `Error` (a UTF-8 message), after which it closes.

use bytes::Bytes;
use orch_core::runtime::TerminalSize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol named in `Upgrade:`.
pub(crate) const PROTOCOL: &str = "orch-exec.v1";

/// The largest payload a frame may carry (1 MiB); a larger one ends the session.
pub(crate) const MAX_PAYLOAD: usize = 1 << 20;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// Input for the command.
    Stdin(Bytes),
    /// The end of the input.
    StdinEnd,
    /// The caller's terminal has a new size.
    Resize(TerminalSize),
    /// What the command wrote on its standard output (its terminal, with one).
    Stdout(Bytes),
    /// What it wrote on its standard error.
    Stderr(Bytes),
    /// It ended with this exit code.
    Exit(i32),
    /// The session failed on the agent's side.
    Error(String),
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Stdin(_) => 0,
            Frame::StdinEnd => 1,
            Frame::Resize(_) => 2,
            Frame::Stdout(_) => 3,
            Frame::Stderr(_) => 4,
            Frame::Exit(_) => 5,
            Frame::Error(_) => 6,
        }
    }

    /// The frame's bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let payload: &[u8] = match self {
            Frame::Stdin(b) | Frame::Stdout(b) | Frame::Stderr(b) => b,
            Frame::StdinEnd => &[],
            Frame::Resize(s) => &[s.rows.to_be_bytes(), s.cols.to_be_bytes()].concat(),
            Frame::Exit(code) => &code.to_be_bytes(),
            Frame::Error(m) => m.as_bytes(),
        };
        // Larger payloads are cut: no sender makes them (reads are smaller, messages short).
        let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(self.kind());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Writes the frame and flushes it.
    pub(crate) async fn write(&self, w: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
        w.write_all(&self.encode()).await?;
        w.flush().await
    }

    /// Reads one frame; `None` when the stream ends between frames. Not cancel-safe: a reader
    /// owns its stream.
    pub(crate) async fn read(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Frame>> {
        let mut head = [0u8; 5];
        if r.read(&mut head[..1]).await? == 0 {
            return Ok(None);
        }
        r.read_exact(&mut head[1..]).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        if len > MAX_PAYLOAD {
            return Err(bad(format!("an exec frame of {len} bytes (at most {MAX_PAYLOAD})")));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        let fixed = |n: usize| {
            if len == n { Ok(()) } else { Err(bad(format!("an exec frame of kind {} with {len} bytes", head[0]))) }
        };
        Ok(Some(match head[0] {
            0 => Frame::Stdin(payload.into()),
            1 => fixed(0).map(|()| Frame::StdinEnd)?,
            2 => fixed(4).map(|()| {
                Frame::Resize(TerminalSize {
                    rows: u16::from_be_bytes([payload[0], payload[1]]),
                    cols: u16::from_be_bytes([payload[2], payload[3]]),
                })
            })?,
            3 => Frame::Stdout(payload.into()),
            4 => Frame::Stderr(payload.into()),
            5 => {
                fixed(4).map(|()| Frame::Exit(i32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])))?
            }
            6 => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
            other => return Err(bad(format!("an exec frame of unknown kind {other}"))),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_frame_reads_back_as_written_and_the_end_is_none() {
        let frames = vec![
            Frame::Stdin(Bytes::from_static(b"a\nb\n")),
            Frame::Stdin(Bytes::new()),
            Frame::StdinEnd,
            Frame::Resize(TerminalSize { rows: 50, cols: 300 }),
            Frame::Stdout(Bytes::from(vec![0u8, 255, 10])),
            Frame::Stderr(Bytes::from_static(b"oops")),
            Frame::Exit(-3),
            Frame::Exit(130),
            Frame::Error("the runtime is gone".into()),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut r = bytes.as_slice();
        for f in &frames {
            assert_eq!(Frame::read(&mut r).await.unwrap().as_ref(), Some(f));
        }
        assert_eq!(Frame::read(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_cut_oversized_or_unknown_frame_is_an_error() {
        let whole = Frame::Stdout(Bytes::from_static(b"hello")).encode();
        let mut cut = &whole[..whole.len() - 1];
        assert!(Frame::read(&mut cut).await.is_err(), "the stream ends inside a frame");
        let mut huge: &[u8] = &[3, 0x7f, 0xff, 0xff, 0xff];
        let e = Frame::read(&mut huge).await.unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        let mut unknown: &[u8] = &[9, 0, 0, 0, 0];
        assert!(Frame::read(&mut unknown).await.unwrap_err().to_string().contains("unknown kind 9"));
        let mut short_exit: &[u8] = &[5, 0, 0, 0, 1, 7];
        assert!(Frame::read(&mut short_exit).await.is_err(), "an exit code is four bytes");
    }
}
