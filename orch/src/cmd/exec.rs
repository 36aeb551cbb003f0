//! `orch exec`: runs a command in a workload's container.
//!
//! Without `-i`/`-t` it is a call like any other: the command gets no input and no terminal,
//! and its output (at most 4 MiB of each stream) comes back once it ends, with its exit code.
//! With `-i` (the caller's standard input becomes the command's) or `-t` (the command gets a
//! terminal) it is a session: an HTTP/1.1 upgrade to a byte stream on both hops, framed as
//! [`frame`] says, the output shown as it is written (see [`interactive`]).
//!
//! The way is that of `orch logs` (see there): the API server checks the caller, hands the
//! node's agent a single-use ticket for this command in this workload, and the agent redeems it
//! before it runs anything. Running a command needs more than reading the workload: the
//! server checks that the caller may update it.

mod frame;
mod interactive;
mod terminal;

pub(crate) use interactive::{agent_exec_stream, relay_exec_stream};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full};
use orch_core::Api;
use orch_core::kinds::Workload;
use orch_store::api::CertificateIdentity;
use orch_store::api::auth::Access;
use orch_store::api::wire::{Status, encode_segment};
use serde::{Deserialize, Serialize};

use super::client::{Client as ApiClient, ConnArgs, split_targets};
use super::logs::{
    Grant, NodeApi, Refused, Relay, TICKET_HEADER, checked_workload, error_response, failure, pick_container, refuse,
};
use super::{BoxError, Exit};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch exec web-6d5f8c-x2k4q -- cat /etc/hostname
  orch exec wl/web-6d5f8c-x2k4q -c main --timeout 10 -- sh -c 'ls; env'
  orch exec -i -t web-6d5f8c-x2k4q -- sh          # a shell, on a terminal
  printf 'b\\na\\n' | orch exec -i web-6d5f8c-x2k4q -- sort
The command's exit code is orch's. Without -i/-t it gets no input and no terminal, and its output
comes once it ends. With -i it reads orch's standard input (whose end closes the command's), and
its output comes as it is written. With -t it runs on a terminal of its own, sized as orch's: when
orch's standard input is a terminal, that is in raw mode for the session (keys such as Ctrl-C go
to the command) and resizes follow; when it is not, orch warns and the command gets its terminal
all the same (as `docker exec -t` does; kubectl drops the terminal instead).")]
pub(crate) struct ExecArgs {
    /// The workload (`NAME` or `workload/NAME`).
    target: String,
    /// The container (needed when the workload has several).
    #[arg(short = 'c', long)]
    container: Option<String>,
    /// Pass orch's standard input to the command, and its output as it comes.
    #[arg(short = 'i', long)]
    stdin: bool,
    /// Run the command on a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Kill the command after this many seconds (without -i/-t: a session lasts as long as the
    /// command).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// What `orch exec` sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExecRequest {
    #[serde(default)]
    container: Option<String>,
    command: Vec<String>,
    timeout_seconds: u64,
}

/// What it gets back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExecAnswer {
    exit_code: i32,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

/// The longest a command may run (an hour).
const MAX_TIMEOUT_SECONDS: u64 = 3600;

fn parse_request(body: &[u8]) -> Result<ExecRequest, Refused> {
    let req: ExecRequest = serde_json::from_slice(body)
        .map_err(|e| refuse(400, "BadRequest", format!("the exec request does not read: {e}")))?;
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(refuse(422, "Invalid", "command: must not be empty"));
    }
    if req.timeout_seconds == 0 || req.timeout_seconds > MAX_TIMEOUT_SECONDS {
        return Err(refuse(422, "Invalid", format!("timeoutSeconds: must be 1-{MAX_TIMEOUT_SECONDS}")));
    }
    Ok(req)
}

/// Checks that the caller may run a command in workload `ns/name` (read it and update it),
/// then reads it. `Err` is the answer to send.
async fn authorized(
    relay: &Relay,
    headers: &HeaderMap,
    identity: Option<&CertificateIdentity>,
    ns: &str,
    name: &str,
) -> Result<orch_core::Object<Workload>, Response> {
    let w = checked_workload(relay, headers, identity, "get", ns, name).await?;
    // May the caller change this workload? The server's own authorization says (and its audit
    // log records it).
    let access = Access { verb: "update", kind: "Workload", namespace: ns, name };
    if let Err(st) = relay.api.check_access(headers, identity, access).await {
        let message = if st.code == 403 {
            format!(
                "running a command in workload {ns}/{name} needs the right to update it: 403 Forbidden: {}",
                st.message
            )
        } else {
            format!("{} {}: {}", st.code, st.reason, st.message)
        };
        return Err(failure(st.code, &st.reason, message));
    }
    Ok(w)
}

/// What both kinds of exec do before they reach the agent: the caller may update the workload,
/// its node's agent is found, and a single-use ticket is issued for this command there.
/// Answers the node, the agent's address and the ticket.
pub(super) async fn ticket_for(
    relay: &Relay,
    headers: &HeaderMap,
    identity: Option<&CertificateIdentity>,
    (ns, name): (&str, &str),
    command: Vec<String>,
) -> Result<(String, String, String), Response> {
    let w = authorized(relay, headers, identity, ns, name).await?;
    let (node, addr) = relay.agent_of(&w).await.map_err(|answer| *answer)?;
    let grant = Grant { action: "exec".into(), namespace: ns.into(), name: name.into(), node: node.clone(), command };
    Ok((node, addr, relay.issue(grant)))
}

/// The newest instance of the container a request names (or the workload's only one) on this
/// node: the container's name and the instance's handle. `Err` is the answer to send.
async fn newest_instance(
    api: &NodeApi,
    ns: &str,
    name: &str,
    container: Option<&str>,
) -> Result<(String, orch_core::Handle), Response> {
    let w = Api::<Workload>::namespaced(api.store.clone(), ns).get(name).await.map_err(|e| error_response(&e))?;
    if w.spec.node_name.as_deref() != Some(api.node.as_str()) {
        return Err(failure(404, "NotFound", format!("workload {ns}/{name} does not run on node {}", api.node)));
    }
    let container = pick_container(&w, container).map_err(|answer| *answer)?;
    let instances = orch_runtime::instances_of(api.runtime.as_ref(), ns, name)
        .await
        .map_err(|e| failure(500, "InternalError", format!("the runtime cannot list its instances: {e}")))?;
    let Some((_, _, handle)) = instances.into_iter().rev().find(|(c, _, _)| *c == container) else {
        return Err(failure(409, "Conflict", format!("container {container} of workload {ns}/{name} is not running")));
    };
    Ok((container, handle))
}

/// The server's side: check, ticket, relay.
pub(crate) async fn relay_exec(
    State(relay): State<Relay>,
    Path((ns, name)): Path<(String, String)>,
    identity: Option<Extension<CertificateIdentity>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match parse_request(&body) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let identity = identity.as_ref().map(|e| &e.0);
    let (node, addr, ticket) = match ticket_for(&relay, &headers, identity, (&ns, &name), req.command).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let uri = format!("{addr}/exec/{}/{}", encode_segment(&ns), encode_segment(&name));
    let Ok(forward) = hyper::Request::post(&uri)
        .header(TICKET_HEADER, ticket)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
    else {
        return failure(500, "InternalError", format!("bad agent address {addr:?} on node {node}"));
    };
    match super::logs::send_to_agent(&relay, &node, &addr, forward).await {
        Ok(resp) => {
            let status = resp.status();
            let mut out = Response::new(Body::from_stream(resp.into_body().into_data_stream()));
            *out.status_mut() = status;
            out.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            out
        }
        Err(answer) => answer,
    }
}

/// The agent's side: redeem, then run in the container's newest instance.
pub(crate) async fn agent_exec(
    State(api): State<NodeApi>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match parse_request(&body) {
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
    let timeout = std::time::Duration::from_secs(req.timeout_seconds);
    match api.runtime.exec_output(&handle, &req.command, timeout).await {
        Ok(out) => {
            let answer = ExecAnswer {
                exit_code: out.exit_code,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                timed_out: out.timed_out,
            };
            ([(header::CONTENT_TYPE, "application/json")], serde_json::to_string(&answer).unwrap_or_default())
                .into_response()
        }
        Err(e) => failure(422, "Invalid", format!("cannot run {:?} in {container}: {e}", req.command[0])),
    }
}

pub(crate) async fn run(conn: &ConnArgs, args: ExecArgs) -> Result<(), BoxError> {
    let client = ApiClient::connect(conn).await?;
    let target = vec![args.target.clone()];
    let (word, names) =
        if args.target.contains('/') { split_targets(&target)? } else { ("workload".to_string(), target.clone()) };
    if client.kind(&word)?.kind != "Workload" {
        return Err("exec runs in workloads: `orch exec NAME -- CMD` or `orch exec workload/NAME -- CMD`".into());
    }
    let [name] = names.as_slice() else { return Err("name one workload".into()) };
    if args.stdin || args.tty {
        return interactive::run(&client, name, args).await;
    }
    let req = ExecRequest { container: args.container, command: args.command, timeout_seconds: args.timeout };
    let path = format!(
        "/apis/orch.dev/v1/namespaces/{}/workloads/{}/exec",
        encode_segment(&client.namespace),
        encode_segment(name)
    );
    // Through the client's connection: its TLS, its certificate or token.
    let (status, mut body) = client
        .remote
        .raw_response("POST", &path, Some(serde_json::to_vec(&req)?))
        .await
        .map_err(|e| format!("cannot reach {}{path}: {e}", client.remote.server()))?;
    let mut bytes = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        bytes.extend_from_slice(&chunk?);
    }
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<Status>(&bytes)
            .map(|s| s.message)
            .unwrap_or_else(|_| format!("the server answered {status}: {}", String::from_utf8_lossy(&bytes)));
        return Err(message.into());
    }
    let answer: ExecAnswer = serde_json::from_slice(&bytes)?;
    out!("{}", answer.stdout);
    eprint!("{}", answer.stderr);
    if answer.timed_out {
        return Err(format!("the command did not finish within {}s: it was killed", req.timeout_seconds).into());
    }
    match answer.exit_code {
        0 => Ok(()),
        code => Err(Box::new(Exit(u8::try_from(code).unwrap_or(1)))),
    }
}
