//! `orch logs`: a workload's output, read by its node's agent and relayed by the API server.
//!
//! The path is the Kubernetes one, `GET /apis/orch.dev/v1/namespaces/{ns}/workloads/{name}/log`
//! (`container`, `follow`, `previous`, `tailLines`). The server checks the caller exactly as for
//! reading the workload (`ApiServer::check_access`: the caller's token or client certificate,
//! the rules, the audit log), finds the workload's node, and
//! relays the request to the address that node's agent published (the `orch.dev/agent-api`
//! annotation, set by `orch agent --listen`).
//!
//! The caller's token never reaches a node: the server hands the agent a ticket instead, a
//! random single-use value good for 30 seconds and for this one workload on this one node. The
//! agent redeems it with the server (`POST /orch/v1/log-tickets/{ticket}`) before it answers,
//! so it serves only what the server has authorized, and a node that published a false address
//! learns nothing it could use elsewhere.
//!
//! In an https cluster the agent serves its API over https with its node certificate, and the
//! server verifies it as the certificate of the workload's node (`send_to_agent`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use orch_core::kinds::{Node, Workload};
use orch_core::runtime::LogOptions;
use orch_core::{Api, Error, Runtime, Store};
use orch_store::api::auth::Access;
use orch_store::api::wire::{Status, encode_query, encode_segment};
use orch_store::api::{ApiServer, CertificateIdentity, RemoteStore};
use serde::Deserialize;

use super::BoxError;
use super::client::{Client as ApiClient, ConnArgs, split_targets};

/// The node annotation holding the address of its agent's API.
pub(crate) const AGENT_API_ANNOTATION: &str = "orch.dev/agent-api";

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch logs web-6d5f8c-x2k4q
  orch logs wl/web-6d5f8c-x2k4q -c sidecar --tail 20
  orch logs web-6d5f8c-x2k4q -f              # follow until it exits (Ctrl-C to stop)
  orch logs web-6d5f8c-x2k4q --previous      # the instance before the last restart")]
pub(crate) struct LogsArgs {
    /// The workload (`NAME` or `workload/NAME`).
    #[arg(required = true)]
    target: Vec<String>,
    /// The container (needed when the workload has several).
    #[arg(short = 'c', long)]
    container: Option<String>,
    /// Keep printing new lines until the container exits.
    #[arg(short = 'f', long)]
    follow: bool,
    /// The output of the container's previous instance (before its last restart or
    /// replacement), as its agent kept it (the last 10,000 lines).
    #[arg(long, conflicts_with = "follow")]
    previous: bool,
    /// Only the last N lines of each stream (standard output, standard error).
    #[arg(long)]
    tail: Option<usize>,
}

/// The query both hops take.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LogQuery {
    container: Option<String>,
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    previous: bool,
    tail_lines: Option<usize>,
}

impl LogQuery {
    fn to_query(&self) -> String {
        let mut q = Vec::new();
        if let Some(c) = &self.container {
            q.push(format!("container={}", encode_query(c)));
        }
        if self.follow {
            q.push("follow=true".into());
        }
        if self.previous {
            q.push("previous=true".into());
        }
        if let Some(n) = self.tail_lines {
            q.push(format!("tailLines={n}"));
        }
        if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) }
    }
}

/// A refusal, ready to be answered (boxed: a response is large).
pub(crate) type Refused = Box<Response>;

/// [`failure`], boxed for a `Result`.
pub(crate) fn refuse(code: u16, reason: &str, message: impl Into<String>) -> Refused {
    Box::new(failure(code, reason, message))
}

pub(crate) fn failure(code: u16, reason: &str, message: impl Into<String>) -> Response {
    let s = Status::failure(code, reason, message);
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "application/json")], serde_json::to_string(&s).unwrap_or_default())
        .into_response()
}

/// An API error as the answer it deserves.
pub(crate) fn error_response(e: &Error) -> Response {
    let s = Status::from_error(e);
    // A refused credential travels as `Unavailable` with the server's own message.
    let text = e.to_string();
    let code = if e.is_not_found() {
        404
    } else if text.contains("401") {
        401
    } else if text.contains("403") {
        403
    } else {
        s.code
    };
    failure(code, &s.reason, text)
}

/// Checks the caller as the API checks its own calls (its token or client certificate, the
/// rules and node authorizer, the audit log) for `verb` on the workload `ns/name`, then reads it.
/// `Err` is the answer to send.
pub(crate) async fn checked_workload(
    relay: &Relay,
    headers: &HeaderMap,
    identity: Option<&CertificateIdentity>,
    verb: &str,
    ns: &str,
    name: &str,
) -> Result<orch_core::Object<Workload>, Response> {
    let access = Access { verb, kind: "Workload", namespace: ns, name };
    if let Err(st) = relay.api.check_access(headers, identity, access).await {
        return Err(failure(st.code, &st.reason, format!("{} {}: {}", st.code, st.reason, st.message)));
    }
    Api::<Workload>::namespaced(relay.store.clone(), ns).get(name).await.map_err(|e| error_response(&e))
}

/// Sends `req` to the agent of `node` at `addr`: over https, verified as that node's agent by
/// its node certificate (signed by the cluster CA, named after the node), when the cluster
/// serves https; over plain http only in a cluster that does (`--insecure-http`). A failure is
/// the answer to give the caller.
pub(crate) async fn send_to_agent<B>(
    relay: &Relay,
    node: &str,
    addr: &str,
    req: hyper::Request<B>,
) -> Result<hyper::Response<hyper::body::Incoming>, Response>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let unreachable = |e: &dyn std::fmt::Display| {
        failure(502, "BadGateway", format!("cannot reach the agent of node {node} at {addr}: {e}"))
    };
    let https = addr.starts_with("https://");
    match &relay.agent_ca {
        Some(ca) if https => {
            let config = orch_store::api::agent_client_config(ca, node).map_err(|e| unreachable(&e))?;
            let connector =
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
            let client: Client<_, B> = Client::builder(TokioExecutor::new()).build(connector);
            client.request(req).await.map_err(|e| unreachable(&e))
        }
        Some(_) => Err(failure(
            502,
            "BadGateway",
            format!(
                "the agent of node {node} serves plain http at {addr}; this cluster's agents serve https with their \
                 node certificates (an agent that joined with a join token does)"
            ),
        )),
        None if https => Err(failure(
            502,
            "BadGateway",
            format!(
                "the agent of node {node} serves https at {addr}, but this server has no cluster CA (--insecure-http)"
            ),
        )),
        None => {
            let client: Client<_, B> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
            client.request(req).await.map_err(|e| unreachable(&e))
        }
    }
}

/// Relays a response body as it arrives.
fn stream_body(body: hyper::body::Incoming) -> Body {
    Body::from_stream(body.into_data_stream())
}

// ---------------------------------------------------------------------------------------------
// The server's relay

/// What a ticket grants: one read of one workload's logs on one node (`action` `logs`), or
/// one run of one command in it (`exec`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Grant {
    pub(crate) action: String,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) node: String,
    #[serde(default)]
    pub(crate) command: Vec<String>,
}

/// How long a ticket may wait to be redeemed.
const TICKET_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The header that carries a ticket from the server to an agent.
pub(crate) const TICKET_HEADER: &str = "x-orch-log-ticket";

type Tickets = Arc<std::sync::Mutex<std::collections::HashMap<String, (Grant, tokio::time::Instant)>>>;

#[derive(Clone)]
pub(crate) struct Relay {
    /// This server's API: it checks callers.
    pub(crate) api: ApiServer,
    pub(crate) store: Arc<dyn Store>,
    tickets: Tickets,
    /// The cluster CA (PEM) agents' certificates chain to; `None` on a plain http server.
    agent_ca: Option<Vec<u8>>,
}

impl Relay {
    /// A ticket for `grant`, good once for 30 seconds.
    pub(crate) fn issue(&self, grant: Grant) -> String {
        let ticket = new_ticket();
        let now = tokio::time::Instant::now();
        let mut tickets = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        // Tickets never redeemed (an agent out of reach) go once they expire.
        tickets.retain(|_, (_, expires)| *expires > now);
        tickets.insert(ticket.clone(), (grant, now + TICKET_TTL));
        ticket
    }

    /// The agent API address of the node a workload runs on, or the answer saying why there
    /// is none.
    pub(crate) async fn agent_of(&self, w: &orch_core::Object<Workload>) -> Result<(String, String), Refused> {
        let (ns, name) = (&w.metadata.namespace, &w.metadata.name);
        let Some(node) = w.spec.node_name.clone() else {
            return Err(refuse(400, "BadRequest", format!("workload {ns}/{name} is not placed on a node yet")));
        };
        let nodes: Api<Node> = Api::all(self.store.clone());
        match nodes.get(&node).await {
            Ok(n) => match n.metadata.annotations.get(AGENT_API_ANNOTATION) {
                Some(addr) => Ok((node, addr.clone())),
                None => Err(refuse(
                    503,
                    "ServiceUnavailable",
                    format!("node {node} serves no API: start its agent with `orch agent --listen ADDR`"),
                )),
            },
            Err(e) => Err(Box::new(error_response(&e))),
        }
    }
}

/// A fresh unguessable ticket (244 random bits).
fn new_ticket() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// The relay route, merged into the API server's router (it is more specific than the API's
/// own catch-all, so it wins for this one path).
pub(crate) fn relay_routes(api: ApiServer, store: Arc<dyn Store>, agent_ca: Option<Vec<u8>>) -> Router {
    let relay = Relay { api, store, tickets: Tickets::default(), agent_ca };
    Router::new()
        .route("/apis/orch.dev/v1/namespaces/{ns}/workloads/{name}/log", get(relay_logs))
        .route("/orch/v1/log-tickets/{ticket}", axum::routing::post(redeem))
        .route(
            "/apis/orch.dev/v1/namespaces/{ns}/workloads/{name}/exec",
            axum::routing::post(super::exec::relay_exec).get(super::exec::relay_exec_stream),
        )
        .with_state(relay)
}

/// An agent redeems a ticket: answered once, with what it grants.
async fn redeem(State(relay): State<Relay>, Path(ticket): Path<String>) -> Response {
    let now = tokio::time::Instant::now();
    let grant = {
        let mut tickets = relay.tickets.lock().unwrap_or_else(|e| e.into_inner());
        tickets.retain(|_, (_, expires)| *expires > now);
        tickets.remove(&ticket)
    };
    match grant {
        Some((g, _)) => ([(header::CONTENT_TYPE, "application/json")], serde_json::to_string(&g).unwrap_or_default())
            .into_response(),
        None => failure(403, "Forbidden", "no such log ticket (each is good once, for 30 seconds)"),
    }
}

async fn relay_logs(
    State(relay): State<Relay>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
    identity: Option<Extension<CertificateIdentity>>,
    headers: HeaderMap,
) -> Response {
    let w = match checked_workload(&relay, &headers, identity.as_ref().map(|e| &e.0), "get", &ns, &name).await {
        Ok(w) => w,
        Err(answer) => return answer,
    };
    let (node, addr) = match relay.agent_of(&w).await {
        Ok(found) => found,
        Err(answer) => return *answer,
    };
    let uri = format!("{addr}/logs/{}/{}{}", encode_segment(&ns), encode_segment(&name), q.to_query());
    let grant = Grant {
        action: "logs".into(),
        namespace: ns.clone(),
        name: name.clone(),
        node: node.clone(),
        command: Vec::new(),
    };
    let ticket = relay.issue(grant);
    let Ok(req) = hyper::Request::get(&uri).header(TICKET_HEADER, ticket).body(Empty::<Bytes>::new()) else {
        return failure(500, "InternalError", format!("bad agent address {addr:?} on node {node}"));
    };
    match send_to_agent(&relay, &node, &addr, req).await {
        Ok(resp) => {
            let status = resp.status();
            let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
            let mut out = Response::new(stream_body(resp.into_body()));
            *out.status_mut() = status;
            if let Some(ct) = ct {
                out.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            out
        }
        Err(answer) => answer,
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's side

#[derive(Clone)]
pub(crate) struct NodeApi {
    pub(crate) node: String,
    /// The API server, reached with no credential: a ticket is its own.
    server: RemoteStore,
    /// The store as the agent reaches it (with the node's token).
    pub(crate) store: Arc<dyn Store>,
    pub(crate) runtime: Arc<dyn Runtime>,
    data_root: std::path::PathBuf,
}

impl NodeApi {
    /// Redeems the request's ticket with the server: only what the server granted, exactly.
    pub(crate) async fn redeem(&self, headers: &HeaderMap, wanted: &Grant) -> Result<(), Refused> {
        let Some(ticket) = headers.get(TICKET_HEADER).and_then(|v| v.to_str().ok()) else {
            return Err(refuse(401, "Unauthorized", "ask the API server (this node answers only on its tickets)"));
        };
        let granted = match self
            .server
            .raw("POST", &format!("/orch/v1/log-tickets/{}", encode_segment(ticket)), None)
            .await
        {
            Ok(body) => serde_json::from_slice::<Grant>(&body).ok(),
            Err(e) => {
                return Err(refuse(403, "Forbidden", format!("the API server did not vouch for this request: {e}")));
            }
        };
        if granted.as_ref() != Some(wanted) {
            return Err(refuse(
                403,
                "Forbidden",
                format!(
                    "the ticket is not for this {} of workload {}/{} on node {}",
                    wanted.action, wanted.namespace, wanted.name, self.node
                ),
            ));
        }
        Ok(())
    }
}

/// The agent's API: `GET /logs/{ns}/{name}`, answered only on a ticket from the server.
pub(crate) fn agent_routes(
    node: String,
    api_url: String,
    ca: Option<Vec<u8>>,
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    data_root: std::path::PathBuf,
) -> Result<Router, BoxError> {
    let mut server = RemoteStore::builder(api_url);
    if let Some(ca) = ca {
        server = server.ca_pem(ca);
    }
    let server = server.build()?;
    let state = NodeApi { node, server, store, runtime, data_root };
    Ok(Router::new()
        .route("/logs/{ns}/{name}", get(agent_logs))
        .route("/exec/{ns}/{name}", axum::routing::post(super::exec::agent_exec).get(super::exec::agent_exec_stream))
        .with_state(state))
}

async fn agent_logs(
    State(api): State<NodeApi>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Response {
    let wanted = Grant {
        action: "logs".into(),
        namespace: ns.clone(),
        name: name.clone(),
        node: api.node.clone(),
        command: Vec::new(),
    };
    if let Err(answer) = api.redeem(&headers, &wanted).await {
        return *answer;
    }
    let w = match Api::<Workload>::namespaced(api.store.clone(), &ns).get(&name).await {
        Ok(w) => w,
        Err(e) => return error_response(&e),
    };
    if w.spec.node_name.as_deref() != Some(api.node.as_str()) {
        return failure(404, "NotFound", format!("workload {ns}/{name} does not run on node {}", api.node));
    }
    let container = match pick_container(&w, q.container.as_deref()) {
        Ok(c) => c,
        Err(answer) => return *answer,
    };
    if q.previous {
        let path = orch_runtime::previous_logs_path(&api.data_root, &ns, &name, &container);
        return match tokio::fs::read_to_string(&path).await {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let skip = q.tail_lines.map_or(0, |n| lines.len().saturating_sub(n));
                let body: String = lines[skip..].iter().map(|l| format!("{l}\n")).collect();
                ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
            }
            Err(_) => failure(
                404,
                "NotFound",
                format!("container {container} of workload {ns}/{name} has no previous instance on node {}", api.node),
            ),
        };
    }
    let instances = match orch_runtime::instances_of(api.runtime.as_ref(), &ns, &name).await {
        Ok(i) => i,
        Err(e) => return failure(500, "InternalError", format!("the runtime cannot list its instances: {e}")),
    };
    let Some((_, _, handle)) = instances.into_iter().rev().find(|(c, _, _)| *c == container) else {
        return failure(404, "NotFound", format!("container {container} of workload {ns}/{name} has not started yet"));
    };
    let options = LogOptions { tail: q.tail_lines, follow: q.follow };
    match api.runtime.logs(&handle, options).await {
        Ok(stream) => {
            let body = stream.map(|l| Ok::<_, std::convert::Infallible>(Bytes::from(format!("{}\n", l.line))));
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(body)).into_response()
        }
        Err(e) => failure(500, "InternalError", format!("the runtime cannot read the logs: {e}")),
    }
}

/// The container a request names, or the workload's only one.
pub(crate) fn pick_container(w: &orch_core::Object<Workload>, wanted: Option<&str>) -> Result<String, Refused> {
    let (ns, name) = (&w.metadata.namespace, &w.metadata.name);
    let names: Vec<&str> = w.spec.containers.iter().map(|c| c.name.as_str()).collect();
    match (wanted, names.as_slice()) {
        (Some(c), _) if names.contains(&c) => Ok(c.to_string()),
        (Some(c), _) => Err(refuse(
            400,
            "BadRequest",
            format!("workload {ns}/{name} has no container {c:?} (it has {})", names.join(", ")),
        )),
        (None, [only]) => Ok(only.to_string()),
        (None, _) => Err(refuse(
            400,
            "BadRequest",
            format!("workload {ns}/{name} has several containers: choose one of {} with -c", names.join(", ")),
        )),
    }
}

/// Publishes the agent's API address on its node once the node is registered.
pub(crate) async fn publish_address(store: Arc<dyn Store>, node: String, url: String) {
    let nodes: Api<Node> = Api::all(store);
    for _ in 0..600 {
        match nodes
            .retry_on_conflict(&node, |n| {
                n.metadata.annotations.insert(AGENT_API_ANNOTATION, url.clone());
                Ok(())
            })
            .await
        {
            Ok(_) => return,
            Err(e) if e.is_not_found() => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish the agent's API address; orch logs will not reach this node");
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The command

pub(crate) async fn run(conn: &ConnArgs, args: LogsArgs) -> Result<(), BoxError> {
    let client = ApiClient::connect(conn).await?;
    let (word, names) = if args.target.len() == 1 && !args.target[0].contains('/') {
        ("workload".to_string(), args.target.clone())
    } else {
        split_targets(&args.target)?
    };
    if client.kind(&word)?.kind != "Workload" {
        return Err("logs are of workloads: `orch logs NAME` or `orch logs workload/NAME`".into());
    }
    let [name] = names.as_slice() else { return Err("name one workload".into()) };
    let q = LogQuery { container: args.container, follow: args.follow, previous: args.previous, tail_lines: args.tail };
    let path = format!(
        "/apis/orch.dev/v1/namespaces/{}/workloads/{}/log{}",
        encode_segment(&client.namespace),
        encode_segment(name),
        q.to_query()
    );
    // Through the client's connection: its TLS, its certificate or token.
    let (status, mut body) = client
        .remote
        .raw_response("GET", &path, None)
        .await
        .map_err(|e| format!("cannot reach {}{path}: {e}", client.remote.server()))?;
    if !(200..300).contains(&status) {
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        let message = serde_json::from_slice::<Status>(&bytes)
            .map(|s| s.message)
            .unwrap_or_else(|_| format!("the server answered {status}: {}", String::from_utf8_lossy(&bytes)));
        return Err(message.into());
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = body.next().await {
        let data = chunk?;
        match out.write_all(&data).and_then(|()| out.flush()) {
            Ok(()) => {}
            // The reader has gone (`orch logs -f w | head`): done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> Relay {
        let store: Arc<dyn Store> = Arc::new(orch_store::MemoryStore::new());
        Relay {
            api: orch_store::api::ApiServer::new(store.clone()),
            store,
            tickets: Tickets::default(),
            agent_ca: None,
        }
    }

    fn grant() -> Grant {
        Grant { action: "logs".into(), namespace: "ns".into(), name: "w".into(), node: "n".into(), command: Vec::new() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_ticket_is_good_once_and_only_within_its_time() {
        let relay = relay();
        let t = relay.issue(grant());
        assert_eq!(t.len(), 64, "two random v4 uuids");
        let first = redeem(State(relay.clone()), Path(t.clone())).await;
        assert_eq!(first.status(), StatusCode::OK);
        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(serde_json::from_slice::<Grant>(&body).unwrap(), grant());
        assert_eq!(redeem(State(relay.clone()), Path(t)).await.status(), StatusCode::FORBIDDEN, "used once");

        let late = relay.issue(grant());
        tokio::time::advance(TICKET_TTL + std::time::Duration::from_secs(1)).await;
        assert_eq!(redeem(State(relay.clone()), Path(late)).await.status(), StatusCode::FORBIDDEN, "expired");
        assert!(relay.tickets.lock().unwrap().is_empty(), "expired tickets are dropped");
    }
}
