//! `orch exec -i`/`-t`: a session with the command, on all three of its hops.
//!
//! The command line asks the API server (with its TLS and its certificate or token, as every
//! call) to upgrade `GET /apis/orch.dev/v1/namespaces/{ns}/workloads/{name}/exec?command=…` to
//! [`PROTOCOL`]. The server checks the caller as for `orch exec` (the right to update the
//! workload), hands the agent a single-use ticket for this command, makes the same upgrade to
//! the agent (`GET /exec/{ns}/{name}?…`), and once both have switched copies the bytes between
//! them. The agent redeems the ticket, starts the command with [`Runtime::exec_stream`], and
//! speaks [`Frame`]s: output as the command writes it, then its exit code.
//!
//! [`Runtime::exec_stream`]: orch_core::Runtime::exec_stream

use std::io::{IsTerminal, Read, Write};

use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use orch_core::runtime::{ExecSession, ExecStreamOptions, RuntimeError, TerminalSize};
use orch_store::api::wire::{Status, encode_query, encode_segment};
use orch_store::api::{CertificateIdentity, Upgrade};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::super::BoxError;
use super::super::client::Client as ApiClient;
use super::super::logs::{Grant, NodeApi, Refused, Relay, TICKET_HEADER, failure, refuse};
use super::frame::{Frame, PROTOCOL};
use super::terminal::{DEFAULT_SIZE, RawMode};
use super::{ExecArgs, newest_instance, ticket_for};

/// What a session asks for, in the query of both hops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionRequest {
    container: Option<String>,
    command: Vec<String>,
    stdin: bool,
    /// A terminal of this size.
    tty: Option<TerminalSize>,
}

impl SessionRequest {
    /// `command=…&command=…&stdin=true&tty=true&rows=…&cols=…&container=…`, as Kubernetes
    /// spells an exec's.
    fn to_query(&self) -> String {
        let mut q: Vec<String> = self.command.iter().map(|c| format!("command={}", encode_query(c))).collect();
        if let Some(c) = &self.container {
            q.push(format!("container={}", encode_query(c)));
        }
        if self.stdin {
            q.push("stdin=true".into());
        }
        if let Some(size) = self.tty {
            q.push(format!("tty=true&rows={}&cols={}", size.rows, size.cols));
        }
        q.join("&")
    }

    fn parse(query: &str) -> Result<SessionRequest, Refused> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|e| refuse(400, "BadRequest", format!("the exec query does not read: {e}")))?;
        let mut req = SessionRequest { container: None, command: Vec::new(), stdin: false, tty: None };
        let (mut tty, mut rows, mut cols) = (false, None, None);
        let flag = |k: &str, v: &str| match v {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(refuse(422, "Invalid", format!("{k}: must be true or false, not {v:?}"))),
        };
        let cells = |k: &str, v: &str| match v.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(refuse(422, "Invalid", format!("{k}: must be 1-65535, not {v:?}"))),
        };
        for (k, v) in pairs {
            match k.as_str() {
                "command" => req.command.push(v),
                "container" => req.container = Some(v),
                "stdin" => req.stdin = flag(&k, &v)?,
                "tty" => tty = flag(&k, &v)?,
                "rows" => rows = Some(cells(&k, &v)?),
                "cols" => cols = Some(cells(&k, &v)?),
                other => return Err(refuse(400, "BadRequest", format!("{other}: not a parameter of an exec"))),
            }
        }
        if req.command.first().is_none_or(String::is_empty) {
            return Err(refuse(422, "Invalid", "command: must not be empty"));
        }
        if tty {
            let (Some(rows), Some(cols)) = (rows, cols) else {
                return Err(refuse(422, "Invalid", "rows, cols: a terminal needs its size"));
            };
            req.tty = Some(TerminalSize { rows, cols });
        }
        Ok(req)
    }
}

/// Whether a request asks to switch to [`PROTOCOL`]; `Err` is the answer when it does not.
fn check_upgrade(headers: &HeaderMap) -> Result<(), Refused> {
    let asked = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok());
    if asked.is_some_and(|p| p.eq_ignore_ascii_case(PROTOCOL)) {
        return Ok(());
    }
    let mut answer = failure(
        426,
        "UpgradeRequired",
        format!("an interactive exec is an HTTP/1.1 upgrade to {PROTOCOL} (`orch exec -i`/`-t`)"),
    );
    answer.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(PROTOCOL));
    Err(Box::new(answer))
}

/// The answer that completes an upgrade.
fn switching() -> Response {
    let mut answer = Response::new(Body::empty());
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    answer.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    answer.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(PROTOCOL));
    answer
}

// ---------------------------------------------------------------------------------------------
// The server's relay

/// The server's side: check, ticket, upgrade to the agent, then to the caller, and copy.
pub(crate) async fn relay_exec_stream(
    State(relay): State<Relay>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    identity: Option<Extension<CertificateIdentity>>,
    headers: HeaderMap,
    mut request: Request,
) -> Response {
    if let Err(answer) = check_upgrade(&headers) {
        return *answer;
    }
    let query = query.unwrap_or_default();
    let req = match SessionRequest::parse(&query) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let identity = identity.as_ref().map(|e| &e.0);
    let (node, addr, ticket) = match ticket_for(&relay, &headers, identity, (&ns, &name), req.command).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let uri = format!("{addr}/exec/{}/{}?{query}", encode_segment(&ns), encode_segment(&name));
    let Ok(forward) = hyper::Request::get(&uri)
        .header(TICKET_HEADER, ticket)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Empty::<Bytes>::new())
    else {
        return failure(500, "InternalError", format!("bad agent address {addr:?} on node {node}"));
    };
    let unreachable = |e: &dyn std::fmt::Display| {
        failure(502, "BadGateway", format!("cannot reach the agent of node {node} at {addr}: {e}"))
    };
    let resp = match super::super::logs::send_to_agent(&relay, &node, &addr, forward).await {
        Ok(resp) => resp,
        Err(answer) => return answer,
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The agent's refusal (a ticket, a container, a command it cannot run), as it is.
        let status = resp.status();
        let mut out = Response::new(Body::from_stream(resp.into_body().into_data_stream()));
        *out.status_mut() = status;
        out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return out;
    }
    let agent = match hyper::upgrade::on(resp).await {
        Ok(io) => io,
        Err(e) => return unreachable(&e),
    };
    let caller = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match caller.await {
            Ok(caller) => {
                let (mut caller, mut agent) = (TokioIo::new(caller), TokioIo::new(agent));
                // Ends when both sides have; either one closing ends the session.
                if let Err(e) = tokio::io::copy_bidirectional(&mut caller, &mut agent).await {
                    tracing::debug!(error = %e, "exec session relay ended");
                }
            }
            Err(e) => tracing::debug!(error = %e, "the caller of an exec did not switch protocols"),
        }
    });
    switching()
}

// ---------------------------------------------------------------------------------------------
// The agent's side

/// The agent's side: redeem, start the command, switch, and run the session.
pub(crate) async fn agent_exec_stream(
    State(api): State<NodeApi>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    mut request: Request,
) -> Response {
    if let Err(answer) = check_upgrade(&headers) {
        return *answer;
    }
    let req = match SessionRequest::parse(&query.unwrap_or_default()) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let wanted = Grant {
        action: "exec".into(),
        namespace: ns.clone(),
        name: name.clone(),
        node: api.node.clone(),
        command: req.command.clone(),
    };
    if let Err(answer) = api.redeem(&headers, &wanted).await {
        return *answer;
    }
    let (container, handle) = match newest_instance(&api, &ns, &name, req.container.as_deref()).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let options = ExecStreamOptions { stdin: req.stdin, tty: req.tty };
    let session = match api.runtime.exec_stream(&handle, &req.command, options).await {
        Ok(s) => s,
        Err(e) => {
            let (code, reason) =
                if matches!(e, RuntimeError::Unsupported { .. }) { (501, "NotImplemented") } else { (422, "Invalid") };
            return failure(code, reason, format!("cannot run {:?} in {container}: {e}", req.command[0]));
        }
    };
    let caller = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match caller.await {
            Ok(io) => serve_session(TokioIo::new(io), session).await,
            // The session is dropped: the runtime stops the command if it can.
            Err(e) => tracing::debug!(error = %e, "the server did not switch protocols for an exec"),
        }
    });
    switching()
}

/// Sends what `r` yields as frames made by `wrap`, until it ends or the session does.
async fn forward(mut r: std::pin::Pin<Box<dyn AsyncRead + Send>>, tx: mpsc::Sender<Frame>, wrap: fn(Bytes) -> Frame) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(wrap(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs one session on the agent: the caller's frames to the command, its output back as it
/// comes, then its exit code. The caller going away ends it (and drops the command's session,
/// which stops the command where the runtime can).
async fn serve_session(io: impl AsyncRead + AsyncWrite + Send + 'static, session: ExecSession) {
    let ExecSession { stdin, stdout, stderr, resize, exit } = session;
    let (mut from_caller, mut to_caller) = tokio::io::split(io);
    let (tx, mut rx) = mpsc::channel::<Frame>(16);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if frame.write(&mut to_caller).await.is_err() {
                return;
            }
        }
        let _ = to_caller.shutdown().await;
    });
    let output = {
        let tx = tx.clone();
        async move {
            let err = stderr.map(|e| forward(e, tx.clone(), Frame::Stderr));
            let out = forward(stdout, tx.clone(), Frame::Stdout);
            match err {
                Some(err) => {
                    tokio::join!(out, err);
                }
                None => out.await,
            }
            exit.await
        }
    };
    let input = async move {
        let (mut stdin, mut resize) = (stdin, resize);
        loop {
            match Frame::read(&mut from_caller).await {
                Ok(Some(Frame::Stdin(bytes))) => {
                    // A command that closed its input gets no more; the session goes on.
                    if let Some(w) = stdin.as_mut()
                        && (w.write_all(&bytes).await.is_err() || w.flush().await.is_err())
                    {
                        stdin = None;
                    }
                }
                Ok(Some(Frame::StdinEnd)) => {
                    if let Some(mut w) = stdin.take() {
                        let _ = w.shutdown().await;
                    }
                }
                Ok(Some(Frame::Resize(size))) => {
                    if let Some(resize) = resize.as_mut()
                        && let Err(e) = resize(size).await
                    {
                        tracing::debug!(error = %e, "cannot resize an exec's terminal");
                    }
                }
                Ok(Some(other)) => {
                    tracing::debug!(frame = ?other, "an exec's caller sent a frame only the agent sends");
                    return;
                }
                Ok(None) | Err(_) => return,
            }
        }
    };
    tokio::select! {
        ended = output => {
            let last = match ended {
                Ok(code) => Frame::Exit(code),
                Err(e) => Frame::Error(format!("the command's end cannot be read: {e}")),
            };
            let _ = tx.send(last).await;
        }
        () = input => {}
    }
    drop(tx);
    let _ = writer.await;
}

// ---------------------------------------------------------------------------------------------
// The command

/// `orch exec -i`/`-t NAME -- CMD…`: the session, its exit code as orch's.
pub(crate) async fn run(client: &ApiClient, name: &str, args: ExecArgs) -> Result<(), BoxError> {
    let input_is_terminal = std::io::stdin().is_terminal();
    if args.tty && !input_is_terminal {
        eprintln!(
            "orch: warning: -t: standard input is not a terminal; the command gets a terminal of its own all the \
             same, and what orch reads is passed on as it is"
        );
    }
    let tty = args.tty.then(|| super::terminal::size().unwrap_or(DEFAULT_SIZE));
    let req = SessionRequest { container: args.container, command: args.command, stdin: args.stdin, tty };
    let path = format!(
        "/apis/orch.dev/v1/namespaces/{}/workloads/{}/exec?{}",
        encode_segment(&client.namespace),
        encode_segment(name),
        req.to_query()
    );
    let io = match client
        .remote
        .upgrade(&path, PROTOCOL)
        .await
        .map_err(|e| format!("cannot reach {}{path}: {e}", client.remote.server()))?
    {
        Upgrade::Switched(io) => io,
        Upgrade::Answered(status, body) => {
            let message = serde_json::from_slice::<Status>(&body)
                .map(|s| s.message)
                .unwrap_or_else(|_| format!("the server answered {status}: {}", String::from_utf8_lossy(&body)));
            return Err(message.into());
        }
    };
    // Raw only where keys are typed: with -i, on a terminal.
    let raw = if args.stdin && tty.is_some() && input_is_terminal {
        Some(RawMode::enable().map_err(|e| format!("cannot put the terminal in raw mode: {e}"))?)
    } else {
        None
    };
    // SIGWINCH comes only where orch has a terminal; its size is read from whichever stream is one.
    let ended = session(io, args.stdin, tty.is_some()).await;
    // The terminal is itself again before anything more is printed.
    drop(raw);
    match ended? {
        0 => Ok(()),
        code => Err(Box::new(super::super::Exit(u8::try_from(code).unwrap_or(1)))),
    }
}

/// Reads orch's standard input on a thread of its own (a read cannot be cancelled, and the
/// process must not wait for one when the session ends): chunks, then `None` at its end.
fn read_stdin() -> mpsc::Receiver<Option<Bytes>> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(Bytes::copy_from_slice(&buf[..n]))).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Writes `bytes` to orch's standard output or error at once. A reader that has gone ends the
/// session quietly (`Ok(false)`).
fn show(bytes: &[u8], stderr: bool) -> Result<bool, BoxError> {
    let written = if stderr {
        let mut e = std::io::stderr().lock();
        e.write_all(bytes).and_then(|()| e.flush())
    } else {
        let mut o = std::io::stdout().lock();
        o.write_all(bytes).and_then(|()| o.flush())
    };
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The caller's side of a session: standard input out (when `send_stdin`), resizes out (when
/// `follow_size`), output in, until the exit code comes.
async fn session(
    io: impl AsyncRead + AsyncWrite + Send + 'static,
    send_stdin: bool,
    follow_size: bool,
) -> Result<i32, BoxError> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut from_agent, mut to_agent) = tokio::io::split(io);
    // Frames are read by a task of their own: a read cut short in a `select!` would lose one.
    let (frames_tx, mut frames) = mpsc::channel(16);
    let reader = tokio::spawn(async move {
        loop {
            let frame = Frame::read(&mut from_agent).await;
            let last = !matches!(frame, Ok(Some(_)));
            if frames_tx.send(frame).await.is_err() || last {
                return;
            }
        }
    });
    let mut input = if send_stdin { Some(read_stdin()) } else { None };
    let mut winch = if follow_size { Some(signal(SignalKind::window_change())?) } else { None };
    let (mut term, mut hup) = (signal(SignalKind::terminate())?, signal(SignalKind::hangup())?);
    let result = loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(Some(Frame::Stdout(b)))) => {
                    if !show(&b, false)? {
                        break Ok(0);
                    }
                }
                Some(Ok(Some(Frame::Stderr(b)))) => {
                    show(&b, true)?;
                }
                Some(Ok(Some(Frame::Exit(code)))) => break Ok(code),
                Some(Ok(Some(Frame::Error(message)))) => break Err(message.into()),
                Some(Ok(Some(other))) => break Err(format!("the server sent a frame only a caller sends: {other:?}").into()),
                Some(Err(e)) => break Err(format!("the session was cut: {e}").into()),
                Some(Ok(None)) | None => break Err("the session ended before the command did".into()),
            },
            chunk = async { input.as_mut().expect("guarded").recv().await }, if input.is_some() => {
                let frame = match chunk {
                    Some(Some(bytes)) => Frame::Stdin(bytes),
                    _ => {
                        input = None;
                        Frame::StdinEnd
                    }
                };
                if let Err(e) = frame.write(&mut to_agent).await {
                    break Err(format!("the session was cut: {e}").into());
                }
            }
            _ = async { winch.as_mut().expect("guarded").recv().await }, if winch.is_some() => {
                if let Some(size) = super::terminal::size()
                    && let Err(e) = Frame::Resize(size).write(&mut to_agent).await
                {
                    break Err(format!("the session was cut: {e}").into());
                }
            }
            _ = term.recv() => break Err("terminated".into()),
            _ = hup.recv() => break Err("hung up".into()),
        }
    };
    reader.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_request_reads_back_from_its_query() {
        let req = SessionRequest {
            container: Some("main".into()),
            command: vec!["sh".into(), "-c".into(), "echo a&b=c; printf 'é %s\\n' \"$x\"".into(), String::new()],
            stdin: true,
            tty: Some(TerminalSize { rows: 50, cols: 200 }),
        };
        assert_eq!(SessionRequest::parse(&req.to_query()).unwrap(), req);
        let bare = SessionRequest { container: None, command: vec!["true".into()], stdin: false, tty: None };
        assert_eq!(bare.to_query(), "command=true");
        assert_eq!(SessionRequest::parse(&bare.to_query()).unwrap(), bare);
    }

    #[test]
    fn a_bad_session_request_is_refused_naming_the_parameter() {
        let message = |q: &str| {
            let answer = *SessionRequest::parse(q).unwrap_err();
            (answer.status().as_u16(), format!("{:?}", answer.into_body()))
        };
        for (q, code) in [
            ("", 422),
            ("command=", 422),
            ("command=ls&stdin=yes", 422),
            ("command=ls&tty=true", 422),
            ("command=ls&tty=true&rows=0&cols=80", 422),
            ("command=ls&tty=true&rows=24&cols=99999", 422),
            ("command=ls&user=root", 400),
        ] {
            assert_eq!(message(q).0, code, "{q}");
        }
    }
}
