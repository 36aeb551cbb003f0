//! The API server: any [`Store`] over HTTP/1.1 and HTTP/2, in the Kubernetes API's conventions.

// `Status` is the error of every handler here: built once for a failed request and sent, never
// on a path that repeats, so its size (a few strings and the details) costs nothing worth boxing.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt};
use orch_core::Clock;
use orch_core::rate::RateLimiter;
use orch_core::{
    DeleteOptions, DeleteOutcome, DynamicObject, Error, FieldSelector, Guard, LabelSelector, ListRequest, ObjectKey,
    Propagation, Selection, Store, WatchEvent, WatchRequest, WatchStream, WriteOptions,
};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::admission::{Admission, AdmissionRequest, BuiltinValidation, Operation, UserInfo};
use super::auth::{Access, AuditLog, AuditRecord, Authorizer, JoinTokens, Tokens};
use super::bearer::{self, BEARER_TOKEN_KIND};
use super::kinds::{self, Kinds};
use super::node_auth::{self, NodeDecision};
use super::pki::{self, CertificateIdentity, ClusterCa};
use super::revocation;
use super::wire::{self, ListMeta, ListOut, Status, WireObject, decode_segment};

mod credentials;
mod nodes;
mod request;
mod watches;
use credentials::{Credentials, Held};
pub use nodes::NodeJoin;
use nodes::{check_certificate, node_certificate};
use request::{Query, Target, parse_query, parse_target, revision_param, selection};
use watches::{LineCache, watch_collection};

/// What protects the server from its clients. A client is told apart by its address.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body read; a larger one is answered `413`.
    pub max_body_bytes: usize,
    /// Largest object (its wire form) written; a larger one is answered `413` naming its size.
    pub max_object_bytes: usize,
    /// Longest label or field selector accepted (`400` beyond).
    pub max_selector_bytes: usize,
    /// Requests one client may have in flight at once (watches not counted); more are answered
    /// `429` at once, so one busy client cannot take every worker (a simple form of Kubernetes'
    /// priority and fairness).
    pub max_in_flight_per_client: usize,
    /// Requests per second one client may start, with bursts of `rate_burst`; `None` for no
    /// limit. Over it, `429` with `Retry-After`.
    pub requests_per_second: Option<f64>,
    /// Burst size of the per-client rate.
    pub rate_burst: u32,
    /// Watches one client may hold at once (`429` beyond).
    pub max_watches_per_client: usize,
    /// Longest a request other than a watch may take (`504` beyond).
    pub request_timeout: Duration,
    /// Longest a watch may last before the server ends it (a client resumes from its last
    /// revision); `None` for no limit. A client's `timeoutSeconds` may ask for less.
    pub max_watch_duration: Option<Duration>,
    /// How often an open watch of a client authenticated by its certificate checks that the
    /// certificate has not been revoked (it ends when it has, and when the certificate
    /// expires).
    pub revocation_check_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 3 * 1024 * 1024,
            max_object_bytes: 1536 * 1024,
            max_selector_bytes: 8 * 1024,
            max_in_flight_per_client: 512,
            requests_per_second: None,
            rate_burst: 100,
            max_watches_per_client: 20_000,
            request_timeout: Duration::from_secs(60),
            max_watch_duration: None,
            revocation_check_interval: Duration::from_secs(10),
        }
    }
}

/// Builds an [`ApiServer`].
pub struct ApiServerBuilder {
    store: Arc<dyn Store>,
    kinds: Kinds,
    limits: Limits,
    admission: Vec<Arc<dyn Admission>>,
    default_bookmark_interval: Duration,
    tokens: Option<Tokens>,
    authorizer: Option<Authorizer>,
    audit: Option<AuditLog>,
    join: Option<NodeJoin>,
}

impl ApiServerBuilder {
    /// Lets nodes join with a join token and renew their certificates (see [`NodeJoin`]).
    /// Serve over TLS ([`ApiServer::serve_tls`]): node certificates are only seen there.
    pub fn node_join(mut self, join: NodeJoin) -> Self {
        self.join = Some(join);
        self
    }

    /// Authenticates clients by bearer token: a request with an unknown token is refused (401);
    /// one without a token is anonymous (`system:anonymous`, group `system:unauthenticated`).
    /// Over TLS, a client certificate the CA signed authenticates its holder as well (`CN` the
    /// user, `O` the groups), with or without this.
    pub fn authentication(mut self, tokens: Tokens) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Authorizes every request by these rules (403 for what no rule allows).
    pub fn authorization(mut self, rules: Authorizer) -> Self {
        self.authorizer = Some(rules);
        self
    }

    /// Records every authorization decision (who, what, allowed or denied) as a JSON line.
    pub fn audit(mut self, log: AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    /// The kinds named in discovery (default: orch's built-in kinds).
    pub fn kinds(mut self, kinds: Kinds) -> Self {
        self.kinds = kinds;
        self
    }

    /// The limits (default: [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Adds an admission hook, run after the built-in validation.
    pub fn admission(mut self, hook: impl Admission) -> Self {
        self.admission.push(Arc::new(hook));
        self
    }

    /// How often a watch that asked for bookmarks (`allowWatchBookmarks`) without saying how
    /// often gets one (default 10 s).
    pub fn bookmark_interval(mut self, every: Duration) -> Self {
        self.default_bookmark_interval = every;
        self
    }

    /// The server.
    pub fn build(self) -> ApiServer {
        let (closing, _) = watch::channel(false);
        ApiServer {
            shared: Arc::new(Shared {
                store: self.store.clone(),
                kinds: self.kinds,
                limits: self.limits,
                admission: self.admission,
                clients: Mutex::new(HashMap::new()),
                default_bookmark_interval: self.default_bookmark_interval,
                closing,
                tokens: self.tokens,
                authorizer: self.authorizer,
                audit: self.audit,
                join: self.join,
                lines: Arc::default(),
                credentials: Credentials::new(self.store.clone()),
            }),
        }
    }
}

/// An API server over a [`Store`]: serve it with [`ApiServer::serve`], or mount
/// [`ApiServer::router`] into an axum application of your own.
///
/// Paths follow Kubernetes: `/apis/orch.dev/v1/namespaces/{ns}/{resource}[/{name}[/status]]` for
/// namespaced kinds and `/apis/orch.dev/v1/{resource}[/{name}[/status]]` for cluster-scoped ones
/// (and for lists and watches across all namespaces), with discovery at `/api`, `/apis` and
/// `/apis/orch.dev/v1`. orch's own calls (revision, compaction, leases, batched updates) live
/// under `/orch/v1`.
#[derive(Clone)]
pub struct ApiServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("store", &self.shared.store).field("limits", &self.shared.limits).finish()
    }
}

struct Shared {
    store: Arc<dyn Store>,
    kinds: Kinds,
    limits: Limits,
    admission: Vec<Arc<dyn Admission>>,
    clients: Mutex<HashMap<String, Arc<ClientState>>>,
    default_bookmark_interval: Duration,
    /// Turns true when the server stops: open watches end (their clients resume elsewhere).
    closing: watch::Sender<bool>,
    tokens: Option<Tokens>,
    authorizer: Option<Authorizer>,
    audit: Option<AuditLog>,
    join: Option<NodeJoin>,
    lines: Arc<LineCache>,
    /// Stored bearer tokens and revoked certificates, from caches.
    credentials: Credentials,
}

/// What the server keeps per client.
struct ClientState {
    in_flight: Arc<Semaphore>,
    watches: AtomicUsize,
    rate: Option<RateLimiter>,
}

/// A running server: its address, and how to stop it.
#[derive(Debug)]
pub struct RunningServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    tls: bool,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// The base URL (`https://127.0.0.1:port`, or `http://` without TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// Stops accepting, ends open watches, waits for requests in flight, and returns.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.stop.send_replace(true);
        self.task.await.map_err(std::io::Error::other)?
    }

    /// Stops at once, dropping open connections (as a crash would, for tests).
    pub fn abort(self) {
        self.task.abort();
    }
}

impl ApiServer {
    /// A server over `store` with the default kinds, limits and admission.
    pub fn builder(store: Arc<dyn Store>) -> ApiServerBuilder {
        ApiServerBuilder {
            store,
            kinds: Kinds::default(),
            limits: Limits::default(),
            admission: vec![Arc::new(BuiltinValidation)],
            default_bookmark_interval: Duration::from_secs(10),
            tokens: None,
            authorizer: None,
            audit: None,
            join: None,
        }
    }

    /// A server over `store` with every default.
    pub fn new(store: Arc<dyn Store>) -> Self {
        ApiServer::builder(store).build()
    }

    /// The routes, for mounting in an application of your own (it needs
    /// `into_make_service_with_connect_info::<SocketAddr>` to tell clients apart).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/api", get(|| async { json_response(StatusCode::OK, &kinds::core_versions()) }))
            .route("/api/v1", get(|| async { json_response(StatusCode::OK, &kinds::core_resources()) }))
            .route("/apis", get(|| async { json_response(StatusCode::OK, &kinds::group_list()) }))
            .route("/apis/orch.dev", get(|| async { json_response(StatusCode::OK, &kinds::group()) }))
            .route(
                "/apis/orch.dev/v1",
                get(|State(s): State<Arc<Shared>>| async move { json_response(StatusCode::OK, &s.kinds.resource_list()) }),
            )
            .route(
                "/version",
                get(|| async {
                    json_response(
                        StatusCode::OK,
                        &json!({"major": "1", "minor": "33", "gitVersion": format!("v1.33.0-orch-{}", env!("CARGO_PKG_VERSION")), "platform": "orch"}),
                    )
                }),
            )
            // kubectl reads the OpenAPI v3 documents before `apply`, to learn that the server
            // validates writes itself (the `fieldValidation` parameter). orch's kinds publish no
            // schema: the server checks every write and answers 422 naming each field.
            // Older kubectl (1.20, Debian's) reads the v2 document as protobuf instead: an empty
            // message is a valid, empty document, and kinds it does not describe go unchecked on
            // its side.
            .route(
                "/openapi/v2",
                get(|headers: HeaderMap| async move {
                    let proto = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
                    let wants_proto =
                        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains(proto));
                    if wants_proto {
                        ([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], Vec::<u8>::new()).into_response()
                    } else {
                        json_response(
                            StatusCode::OK,
                            &json!({"swagger": "2.0", "info": {"title": "orch", "version": "v1"}, "paths": {}}),
                        )
                    }
                }),
            )
            .route("/openapi/v3", get(|| async { json_response(StatusCode::OK, &kinds::openapi_root()) }))
            .route("/openapi/v3/apis/orch.dev/v1", get(|State(s): State<Arc<Shared>>| async move {
                json_response(StatusCode::OK, &s.kinds.openapi_group())
            }))
            .fallback(handle)
            .method_not_allowed_fallback(|method: Method, uri: axum::http::Uri| async move {
                status_response(Status::failure(
                    405,
                    "MethodNotAllowed",
                    format!("{method} is not supported on {}: it is read with GET", uri.path()),
                ))
            })
            .with_state(self.shared.clone())
    }

    /// Serves on `listener` (HTTP/1.1, and HTTP/2 with prior knowledge) until `shutdown`
    /// resolves, then ends open watches and waits for requests in flight.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self.router().into_make_service_with_connect_info::<SocketAddr>();
        let closing = self.shared.closing.clone();
        // Small responses go out at once (Nagle's delay would add tens of milliseconds).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                closing.send_replace(true);
            })
            .await
    }

    /// Serves on `listener` over TLS (HTTP/2 and HTTP/1.1 by ALPN) until `shutdown` resolves;
    /// clients may authenticate with certificates of the CA `tls` trusts (see
    /// [`ClusterCa::server_config`]).
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let closing = self.shared.closing.clone();
        pki::serve_tls(listener, self.router(), tls, async move {
            shutdown.await;
            closing.send_replace(true);
        })
        .await
    }

    /// Authenticates a request to a route of one's own merged into [`router`](ApiServer::router)
    /// (its bearer token, or the client certificate [`serve_tls`](ApiServer::serve_tls)
    /// attached to it) and authorizes `access` by the server's rules and node authorizer,
    /// recording the decision in the audit log: the checks the API's own routes make. Answers
    /// the user, or the `Status` (401, 403) to answer. A node's write that the node authorizer
    /// would decide from the stored object is refused here.
    pub async fn check_access(
        &self,
        headers: &HeaderMap,
        identity: Option<&CertificateIdentity>,
        access: Access<'_>,
    ) -> Result<UserInfo, Status> {
        let s = &self.shared;
        let (user, _) = s.authenticate(headers, identity).await?;
        let Some(rules) = &s.authorizer else { return Ok(user) };
        let node =
            user.groups.iter().any(|g| g == pki::NODES).then(|| node_auth::decide(pki::node_of(&user), &access, false));
        let allowed = node == Some(NodeDecision::Allow) || rules.allows(&user, &access);
        s.audit_record(&user, access, allowed);
        if !allowed {
            let what = if access.name.is_empty() { String::new() } else { format!(" {:?}", access.name) };
            let ns = if access.namespace.is_empty() {
                String::new()
            } else {
                format!(" in namespace {:?}", access.namespace)
            };
            return Err(Status::failure(
                403,
                "Forbidden",
                format!("user {:?} cannot {} {}{what}{ns}", user.name, access.verb, access.kind),
            ));
        }
        Ok(user)
    }

    /// Binds `addr` and serves over TLS in a task of its own until [`RunningServer::shutdown`].
    pub async fn spawn_tls(&self, addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> std::io::Result<RunningServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let server = self.clone();
        let task = tokio::spawn(async move {
            server
                .serve_tls(listener, tls, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        Ok(RunningServer { addr, tls: true, stop, task })
    }

    /// Ends every open watch (their clients resume elsewhere or after a restart), as a stop
    /// does: a graceful shutdown of a server mounted through [`router`](ApiServer::router)
    /// calls this first, or open watches hold it forever.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Binds `addr` and serves in a task of its own until [`RunningServer::shutdown`].
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<RunningServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let server = self.clone();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        Ok(RunningServer { addr, tls: false, stop, task })
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

fn json_response(code: StatusCode, body: &impl serde::Serialize) -> Response {
    let bytes = serde_json::to_vec(body).expect("responses serialize");
    (code, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
}

fn text_json_response(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

fn status_response(s: Status) -> Response {
    let code = StatusCode::from_u16(s.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let retry = s.details.retry_after_seconds;
    let mut r = json_response(code, &s);
    if let Some(secs) = retry {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

type Answer = Result<Response, Status>;

impl Shared {
    fn client(&self, id: &str) -> Arc<ClientState> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(ClientState {
                    in_flight: Arc::new(Semaphore::new(self.limits.max_in_flight_per_client)),
                    watches: AtomicUsize::new(0),
                    rate: self.limits.requests_per_second.map(|r| RateLimiter::clamped(r, self.limits.rate_burst)),
                })
            })
            .clone()
    }

    fn admit(
        &self,
        op: Operation,
        key: &ObjectKey,
        user: &UserInfo,
        dry_run: bool,
        obj: &mut DynamicObject,
    ) -> Result<(), Error> {
        let req = AdmissionRequest { operation: op, key, user, dry_run };
        for hook in &self.admission {
            hook.admit(&req, obj).map_err(|e| match e {
                // A spec that does not decode is the client's input at fault, not the server.
                Error::Serialization { path, source, .. } => Error::invalid(
                    key.kind.clone(),
                    if path.is_empty() { "spec".to_string() } else { path },
                    source.to_string(),
                ),
                e => e,
            })?;
        }
        // After validation: a token that does not decode is refused as bad input first.
        if self.authorizer.is_some()
            && key.kind == BEARER_TOKEN_KIND
            && matches!(op, Operation::Create | Operation::Update)
        {
            bearer::check_identity(user, obj)?;
        }
        Ok(())
    }

    /// Who the client is: its client certificate's user (refused when expired or revoked), the
    /// user of its bearer token (from the token file, or kept in the store; refused when
    /// unknown, expired or revoked), or anonymous. With it, what an open watch must go on
    /// holding: a certificate, or a stored token.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        cert: Option<&CertificateIdentity>,
    ) -> Result<(UserInfo, Option<Held>), Status> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match (cert, &self.tokens, token) {
            // A client certificate the CA signed (the handshake checked that) names the user.
            (Some(id), _, _) => {
                check_certificate(self, id).await.map(|()| (id.user.clone(), Some(Held::Certificate(id.clone()))))
            }
            (None, Some(tokens), Some(t)) => {
                let digest = super::auth::hash(t);
                match tokens.by_digest(&digest) {
                    Some(u) => Ok((u.clone(), None)),
                    None => match self.credentials.stored_token(&digest).await.map_err(|e| Status::from_error(&e))? {
                        Some((u, held)) => Ok((u, Some(held))),
                        // The token itself is never echoed or logged.
                        None => Err(Status::failure(401, "Unauthorized", "the bearer token is not valid")),
                    },
                }
            }
            _ => Ok((UserInfo::anonymous(), None)),
        }
    }

    fn audit_record(&self, user: &UserInfo, access: Access<'_>, allowed: bool) {
        if let Some(log) = &self.audit {
            log.record(&AuditRecord {
                time: orch_core::SystemClock.now(),
                user: &user.name,
                groups: &user.groups,
                access,
                allowed,
            });
        }
    }

    fn check_size(&self, obj: &DynamicObject) -> Result<(), Status> {
        let size = obj.spec.len()
            + obj.status.len()
            + obj.metadata.annotations.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if size > self.limits.max_object_bytes {
            let mut s = Status::failure(
                413,
                "RequestEntityTooLarge",
                format!(
                    "{}: object is {size} bytes (spec, status and annotations), more than the limit of {}",
                    obj.key(),
                    self.limits.max_object_bytes
                ),
            );
            s.details.kind = obj.kind.clone();
            s.details.name = obj.metadata.name.clone();
            return Err(s);
        }
        Ok(())
    }
}

/// Every request that is not discovery comes here.
async fn handle(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    let cert = req.extensions().get::<CertificateIdentity>().cloned();
    let (user, held) = match s.authenticate(req.headers(), cert.as_ref()).await {
        Ok(u) => u,
        Err(st) => return status_response(st),
    };
    let client_id = if (s.tokens.is_some() || cert.is_some()) && user != UserInfo::anonymous() {
        format!("user {}", user.name)
    } else {
        peer.unwrap_or_else(|| "local".into())
    };
    let client = s.client(&client_id);
    if let Some(rate) = &client.rate
        && let Err(at) = rate.check()
    {
        let wait = at.saturating_duration_since(tokio::time::Instant::now());
        let mut st = Status::failure(
            429,
            "TooManyRequests",
            format!(
                "client {client_id}: more than {} requests per second",
                s.limits.requests_per_second.unwrap_or(0.0)
            ),
        );
        st.details.retry_after_seconds = Some(wait.as_secs().max(1));
        return status_response(st);
    }
    let (parts, body) = req.into_parts();
    let target = match parse_target(&s.kinds, parts.uri.path()) {
        Ok(t) => t,
        Err(st) => return status_response(st),
    };
    let query = match parse_query(parts.uri.query(), &s.limits) {
        Ok(q) => q,
        Err(st) => return status_response(st),
    };
    // Joining is what a node without credentials does (its join token is checked there);
    // renewing checks that the client is the node.
    let own_checks = matches!(target, Target::Join | Target::Renew);
    // A node's writes that depend on the body and the stored object are decided once the body
    // is read.
    let mut node_pending: Option<NodeDecision> = None;
    // A node the rules do not allow more than the node authorizer does: the store leases its
    // writes attach objects to must be its own.
    let mut restricted_node: Option<String> = None;
    if let Some(rules) = s.authorizer.as_ref().filter(|_| !own_checks) {
        let access = access_of(&parts.method, &target, query.watch);
        let status_write = matches!(target, Target::Object { status: true, .. });
        // Nodes get what the node authorizer gives them, and whatever the rules add.
        let node = user
            .groups
            .iter()
            .any(|g| g == pki::NODES)
            .then(|| node_auth::decide(pki::node_of(&user), &access, status_write));
        let by_rules = rules.allows(&user, &access);
        if node.is_some() && !by_rules {
            restricted_node = pki::node_of(&user).map(str::to_string);
        }
        let (allowed, why) = match node {
            Some(NodeDecision::Allow) => (true, None),
            Some(NodeDecision::Deny(why)) => (by_rules, Some(why)),
            Some(pending) => {
                if !by_rules {
                    node_pending = Some(pending);
                }
                (true, None)
            }
            None => (by_rules, None),
        };
        if node_pending.is_none() {
            s.audit_record(&user, access, allowed);
        }
        if !allowed {
            let message = why.unwrap_or_else(|| {
                let what = if access.name.is_empty() { String::new() } else { format!(" {:?}", access.name) };
                let ns = if access.namespace.is_empty() {
                    String::new()
                } else {
                    format!(" in namespace {:?}", access.namespace)
                };
                format!("user {:?} cannot {} {}{what}{ns}", user.name, access.verb, access.kind)
            });
            return status_response(Status::failure(403, "Forbidden", message));
        }
    }
    let is_watch = parts.method == Method::GET && query.watch && matches!(target, Target::Collection { .. });
    if is_watch {
        return match watch_collection(&s, &client, target, &query, held).await {
            Ok(r) => r,
            Err(st) => status_response(st),
        };
    }
    let Ok(_permit): Result<OwnedSemaphorePermit, _> = client.in_flight.clone().try_acquire_owned() else {
        let mut st = Status::failure(
            429,
            "TooManyRequests",
            format!("client {client_id}: more than {} requests in flight", s.limits.max_in_flight_per_client),
        );
        st.details.retry_after_seconds = Some(1);
        return status_response(st);
    };
    let limit = s.limits.max_body_bytes;
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return status_response(Status::failure(
                413,
                "RequestEntityTooLarge",
                format!("request body is larger than the limit of {limit} bytes"),
            ));
        }
    };
    if let Some(decision) = &node_pending {
        let key = match &target {
            Target::Object { key, .. } => Some(key),
            _ => None,
        };
        let node = pki::node_of(&user).unwrap_or_default();
        let checked = match (decision, &target) {
            (NodeDecision::OwnLease, Target::Lease(id)) => node_auth::check_lease(&*s.store, node, *id).await,
            _ => node_auth::check(&*s.store, node, decision, key, parts.method == Method::PATCH, &body).await,
        };
        s.audit_record(&user, access_of(&parts.method, &target, query.watch), checked.is_ok());
        if let Err(why) = checked {
            return status_response(Status::failure(403, "Forbidden", why));
        }
    }
    let writes_object = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
        && matches!(target, Target::Object { .. } | Target::Collection { .. });
    if let Some(node) = restricted_node.as_deref().filter(|_| writes_object)
        && let Err(why) = node_auth::check_body_leases(&*s.store, node, &body).await
    {
        s.audit_record(&user, access_of(&parts.method, &target, query.watch), false);
        return status_response(Status::failure(403, "Forbidden", why));
    }
    if own_checks {
        if parts.method != Method::POST {
            return status_response(Status::failure(
                405,
                "MethodNotAllowed",
                format!("{} is answered to POST only", parts.uri.path()),
            ));
        }
        return match node_certificate(&s, &target, cert.as_ref(), &body).await {
            Ok(r) => r,
            Err(st) => status_response(st),
        };
    }
    // A write of a credential (a token, a revocation) holds for this server's next request.
    let credential = (parts.method != Method::GET).then(|| credentials::written(&target, &body)).flatten();
    let work = dispatch(&s, &user, parts.method, &parts.headers, target, query, body);
    match tokio::time::timeout(s.limits.request_timeout, work).await {
        Ok(Ok(r)) => {
            if let Some((kind, name)) = credential.filter(|_| r.status().is_success()) {
                s.credentials.settle(kind, &name).await;
            }
            r
        }
        Ok(Err(st)) => status_response(st),
        Err(_) => {
            let mut st =
                Status::failure(504, "Timeout", format!("the request took longer than {:?}", s.limits.request_timeout));
            st.details.retry_after_seconds = Some(1);
            status_response(st)
        }
    }
}

/// What a request does, for the rules.
fn access_of<'a>(method: &Method, target: &'a Target, watch: bool) -> Access<'a> {
    let verb = match *method {
        Method::GET => match target {
            Target::Collection { .. } if watch => "watch",
            Target::Collection { .. } => "list",
            _ => "get",
        },
        Method::POST => match target {
            Target::BatchUpdate => "update",
            _ => "create",
        },
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "unknown",
    };
    let (kind, namespace, name): (&str, &str, &str) = match target {
        Target::Collection { kind, namespace } => (kind, namespace.as_deref().unwrap_or(""), ""),
        Target::Object { key, .. } => (&key.kind, &key.namespace, &key.name),
        Target::Revision => ("Revision", "", ""),
        Target::Compact => ("Compaction", "", ""),
        Target::Leases | Target::Lease(_) => ("Lease", "", ""),
        // A batch may touch any kind: only a rule for every kind allows it.
        Target::BatchUpdate => ("*", "", ""),
        Target::Join | Target::Renew => ("NodeCertificate", "", ""),
    };
    Access { verb, kind, namespace, name }
}

fn object_response(code: StatusCode, obj: &DynamicObject) -> Response {
    text_json_response(code, wire::object_json(obj))
}

fn decode_body(body: &[u8], kind: &str) -> Result<DynamicObject, Status> {
    decode_body_versioned(body, kind).map(|(o, _)| o)
}

fn decode_body_versioned(body: &[u8], kind: &str) -> Result<(DynamicObject, Option<u64>), Status> {
    if body.is_empty() {
        return Err(Status::bad_request("request body is empty: expected an object"));
    }
    wire::decode_object_versioned(body, Some(kind)).map_err(|e| {
        let mut s = Status::bad_request(format!("request body: {e}"));
        s.details.kind = kind.to_string();
        if !e.field.is_empty() {
            s.details.causes = vec![wire::StatusCause {
                reason: "FieldValueInvalid".into(),
                message: e.reason.clone(),
                field: e.field,
            }];
        }
        s
    })
}

fn content_type(headers: &HeaderMap) -> &str {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").split(';').next().unwrap_or("").trim()
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DeleteBody {
    preconditions: Option<Preconditions>,
    propagation_policy: Option<String>,
    dry_run: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Preconditions {
    resource_version: Option<String>,
    uid: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseBody {
    ttl_ms: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompactBody {
    revision: u64,
}

fn lease_json(l: &orch_core::store::LeaseInfo) -> serde_json::Value {
    json!({"id": l.id, "ttlMs": l.ttl.as_millis() as u64, "remainingMs": l.remaining.as_millis() as u64})
}

fn read_json<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T, Status> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        Status::bad_request(format!(
            "{what}: {}{}",
            if path == "." { String::new() } else { format!("{path}: ") },
            e.into_inner()
        ))
    })
}

async fn dispatch(
    s: &Shared,
    user: &UserInfo,
    method: Method,
    headers: &HeaderMap,
    target: Target,
    q: Query,
    body: Bytes,
) -> Answer {
    let store = &s.store;
    let wopts = WriteOptions { guard: q.guard.clone() };
    let err = |e: Error| Status::from_error(&e);
    match (method, target) {
        (Method::GET, Target::Revision) => {
            let rev = store.current_revision().await.map_err(err)?;
            Ok(json_response(StatusCode::OK, &json!({"revision": rev})))
        }
        (Method::POST, Target::Compact) => {
            let b: CompactBody = read_json(&body, "compaction")?;
            store.compact(b.revision).await.map_err(err)?;
            Ok(json_response(StatusCode::OK, &json!({"revision": b.revision})))
        }
        (Method::POST, Target::Leases) => {
            let b: LeaseBody = read_json(&body, "lease")?;
            let l = store.grant_lease(Duration::from_millis(b.ttl_ms)).await.map_err(err)?;
            // A node's lease is recorded as its own; without the record, no lease.
            if let Some(node) = pki::node_of(user).filter(|_| user.groups.iter().any(|g| g == pki::NODES))
                && let Err(e) = node_auth::record_lease_owner(&**store, l.id, node).await
            {
                let _ = store.revoke_lease(l.id).await;
                return Err(err(e));
            }
            Ok(json_response(StatusCode::CREATED, &lease_json(&l)))
        }
        (Method::GET, Target::Lease(id)) => {
            Ok(json_response(StatusCode::OK, &lease_json(&store.lease(id).await.map_err(err)?)))
        }
        (Method::PUT, Target::Lease(id)) => {
            Ok(json_response(StatusCode::OK, &lease_json(&store.keep_alive(id).await.map_err(err)?)))
        }
        (Method::DELETE, Target::Lease(id)) => {
            store.revoke_lease(id).await.map_err(err)?;
            Ok(json_response(StatusCode::OK, &json!({"id": id})))
        }
        (Method::POST, Target::BatchUpdate) => batch_update(s, user, &body, &wopts).await,
        (Method::GET, Target::Collection { kind, namespace }) => list(s, &kind, namespace.as_deref(), &q).await,
        (Method::GET, Target::Object { key, .. }) => {
            let obj = store.get(&key).await.map_err(err)?;
            Ok(object_response(StatusCode::OK, &obj))
        }
        (Method::POST, Target::Collection { kind, namespace }) => {
            let mut obj = decode_body(&body, &kind)?;
            if let Some(ns) = &namespace {
                if obj.metadata.namespace.is_empty() {
                    obj.metadata.namespace = ns.clone();
                } else if obj.metadata.namespace != *ns {
                    return Err(Status::invalid_field(
                        &kind,
                        "metadata.namespace",
                        format!("is {:?} but the path names namespace {ns:?}", obj.metadata.namespace),
                    ));
                }
            }
            let key = obj.key();
            s.check_size(&obj)?;
            s.admit(Operation::Create, &key, user, q.dry_run, &mut obj).map_err(named(&key))?;
            if q.dry_run {
                return match store.get(&key).await {
                    Ok(_) => Err(err(Error::AlreadyExists(key))),
                    Err(e) if e.is_not_found() => Ok(object_response(StatusCode::CREATED, &obj)),
                    Err(e) => Err(err(e)),
                };
            }
            let created = store.create(obj, &wopts).await.map_err(named(&key))?;
            Ok(object_response(StatusCode::CREATED, &created))
        }
        (Method::PUT, Target::Object { key, status }) => {
            let (obj, expected) = decode_body_versioned(&body, &key.kind)?;
            check_same_key(&obj, &key)?;
            s.check_size(&obj)?;
            if !q.dry_run && expected.is_some() {
                // A plain replace needs no read: the store checks the version.
                return replace(s, user, key, status, obj, &q).await;
            }
            write(s, user, key, status, expected, &q, move |_| Ok(obj.clone())).await
        }
        (Method::PATCH, Target::Object { key, status }) => {
            let kind = content_type(headers).to_string();
            let patch: serde_json::Value = read_json(&body, "patch")?;
            let patch_kind = match kind.as_str() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/json-patch+json" => PatchKind::Json(
                    serde_json::from_value(patch.clone())
                        .map_err(|e| Status::bad_request(format!("JSON patch: {e}")))?,
                ),
                other => {
                    return Err(Status::failure(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "patch type {other:?} is not supported: use application/merge-patch+json or application/json-patch+json"
                        ),
                    ));
                }
            };
            // A patch naming a resource version is compare-and-swap on it; without, the
            // server applies it to the current object, retrying on a conflict.
            let pinned = patch.pointer("/metadata/resourceVersion").and_then(|v| match v {
                serde_json::Value::String(t) => t.parse().ok(),
                serde_json::Value::Number(n) => n.as_u64(),
                _ => None,
            });
            let key2 = key.clone();
            write(s, user, key, status, pinned, &q, move |current| {
                let mut doc: serde_json::Value =
                    serde_json::from_str(&wire::object_json(current)).expect("object JSON reads back");
                match &patch_kind {
                    PatchKind::Merge => json_patch::merge(&mut doc, &patch),
                    PatchKind::Json(p) => json_patch::patch(&mut doc, p)
                        .map_err(|e| Status::invalid_field(&key2.kind, "patch", e.to_string()))?,
                }
                let text = serde_json::to_vec(&doc).expect("values serialize");
                let obj = decode_body(&text, &key2.kind)?;
                check_same_key(&obj, &key2)?;
                s.check_size(&obj)?;
                Ok(obj)
            })
            .await
        }
        (Method::DELETE, Target::Object { key, status: false }) => {
            let b: DeleteBody =
                if body.is_empty() { DeleteBody::default() } else { read_json(&body, "delete options")? };
            let dry_run = q.dry_run || b.dry_run.as_ref().is_some_and(|d| d.iter().any(|x| x == "All"));
            let propagation = match b.propagation_policy.as_deref() {
                None | Some("Background") => Propagation::Background,
                Some("Foreground") => Propagation::Foreground,
                Some("Orphan") => Propagation::Orphan,
                Some(p) => {
                    return Err(Status::invalid_field(
                        &key.kind,
                        "propagationPolicy",
                        format!("must be Background, Foreground or Orphan, not {p:?}"),
                    ));
                }
            };
            let pre = b.preconditions.unwrap_or_default();
            let rv = match pre.resource_version.as_deref() {
                None | Some("") => None,
                Some(v) => Some(v.parse::<u64>().map_err(|_| {
                    Status::invalid_field(
                        &key.kind,
                        "preconditions.resourceVersion",
                        format!("must be a revision, not {v:?}"),
                    )
                })?),
            };
            let mut probe =
                DynamicObject::new(key.kind.clone(), orch_core::ObjectMeta::namespaced(&key.namespace, &key.name));
            s.admit(Operation::Delete, &key, user, dry_run, &mut probe).map_err(err)?;
            if dry_run {
                let cur = store.get(&key).await.map_err(err)?;
                if pre.uid.as_ref().is_some_and(|uid| *uid != cur.metadata.uid) {
                    return Err(err(Error::NotFound(key)));
                }
                if let Some(rv) = rv
                    && rv != cur.metadata.resource_version
                {
                    return Err(err(Error::Conflict { key, expected: rv, current: Some(cur) }));
                }
                return Ok(object_response(StatusCode::OK, &cur));
            }
            let opts = DeleteOptions { resource_version: rv, uid: pre.uid, guard: q.guard.clone(), propagation };
            match store.delete(&key, &opts).await.map_err(err)? {
                DeleteOutcome::Deleted(o) => Ok(object_response(StatusCode::OK, &o)),
                DeleteOutcome::Pending(o) => Ok(object_response(StatusCode::ACCEPTED, &o)),
            }
        }
        (m, t) => Err(Status::failure(405, "MethodNotAllowed", format!("{m} is not supported on {t:?}"))),
    }
}

enum PatchKind {
    Merge,
    Json(json_patch::Patch),
}

fn check_same_key(obj: &DynamicObject, key: &ObjectKey) -> Result<(), Status> {
    if obj.metadata.name != key.name {
        return Err(Status::invalid_field(
            &key.kind,
            "metadata.name",
            format!("is {:?} but the path names {:?}", obj.metadata.name, key.name),
        ));
    }
    if obj.metadata.namespace != key.namespace {
        return Err(Status::invalid_field(
            &key.kind,
            "metadata.namespace",
            format!("is {:?} but the path names {:?}", obj.metadata.namespace, key.namespace),
        ));
    }
    Ok(())
}

/// An update, status update or patch: `make` builds the object to write from the current one
/// (a replace ignores it). `expected` is the resource version the write is conditioned on;
/// `None` means "the current one" (a write without a version, retried on conflict).
async fn write(
    s: &Shared,
    user: &UserInfo,
    key: ObjectKey,
    status: bool,
    expected: Option<u64>,
    q: &Query,
    mut make: impl FnMut(&DynamicObject) -> Result<DynamicObject, Status>,
) -> Answer {
    let store = &s.store;
    let err = |e: Error| Status::from_error(&e);
    let op = if status { Operation::UpdateStatus } else { Operation::Update };
    let wopts = WriteOptions { guard: q.guard.clone() };
    for _ in 0..16 {
        // A replace does not need the current object unless it is a dry run.
        let current = store.get(&key).await;
        let mut obj = match &current {
            Ok(cur) => make(cur)?,
            Err(e) if e.is_not_found() => return Err(err(Error::NotFound(key))),
            Err(e) => return Err(err(clone_error(e))),
        };
        let cur = current.expect("checked above");
        obj.metadata.resource_version = expected.unwrap_or(cur.metadata.resource_version);
        s.admit(op, &key, user, q.dry_run, &mut obj).map_err(named(&key))?;
        if q.dry_run {
            if obj.metadata.resource_version != cur.metadata.resource_version {
                return Err(err(Error::Conflict { key, expected: obj.metadata.resource_version, current: Some(cur) }));
            }
            return Ok(object_response(StatusCode::OK, &obj));
        }
        let result = if status { store.update_status(obj, &wopts).await } else { store.update(obj, &wopts).await };
        match result {
            Ok(o) => return Ok(object_response(StatusCode::OK, &o)),
            Err(e) if e.is_conflict() && expected.is_none() => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Err(Status::failure(409, "Conflict", format!("{key}: the object kept changing; patch gave up after 16 tries")))
}

async fn replace(
    s: &Shared,
    user: &UserInfo,
    key: ObjectKey,
    status: bool,
    mut obj: DynamicObject,
    q: &Query,
) -> Answer {
    let op = if status { Operation::UpdateStatus } else { Operation::Update };
    s.admit(op, &key, user, false, &mut obj).map_err(named(&key))?;
    let wopts = WriteOptions { guard: q.guard.clone() };
    let result = if status { s.store.update_status(obj, &wopts).await } else { s.store.update(obj, &wopts).await };
    result.map(|o| object_response(StatusCode::OK, &o)).map_err(named(&key))
}

/// The `Status` of an error about the object `key`: an `Invalid` names the object too, as
/// kubectl shows it (`The Workload "web" is invalid`).
fn named(key: &ObjectKey) -> impl Fn(Error) -> Status + '_ {
    move |e| {
        let mut s = Status::from_error(&e);
        if s.details.name.is_empty() {
            s.details.name = key.name.clone();
            s.details.namespace = key.namespace.clone();
        }
        s
    }
}

fn clone_error(e: &Error) -> Error {
    Status::from_error(e).into_error()
}

async fn batch_update(s: &Shared, user: &UserInfo, body: &[u8], opts: &WriteOptions) -> Answer {
    #[derive(Deserialize)]
    struct Batch {
        items: Vec<Box<serde_json::value::RawValue>>,
    }
    let batch: Batch = read_json(body, "batch")?;
    let mut objs = Vec::with_capacity(batch.items.len());
    for (i, raw) in batch.items.iter().enumerate() {
        let mut obj = wire::decode_object(raw.get().as_bytes(), None)
            .map_err(|e| Status::bad_request(format!("items[{i}]: {e}")))?;
        s.check_size(&obj)?;
        let key = obj.key();
        s.admit(Operation::Update, &key, user, false, &mut obj).map_err(|e| Status::from_error(&e))?;
        objs.push(obj);
    }
    let results = s.store.update_many(objs, opts).await;
    let mut out = String::from("{\"results\":[");
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match r {
            Ok(o) => {
                out.push_str("{\"object\":");
                out.push_str(&wire::object_json(o));
                out.push('}');
            }
            Err(e) => {
                out.push_str("{\"status\":");
                out.push_str(&serde_json::to_string(&Status::from_error(e)).expect("status serializes"));
                out.push('}');
            }
        }
    }
    out.push_str("]}");
    Ok(text_json_response(StatusCode::OK, out))
}

async fn list(s: &Shared, kind: &str, namespace: Option<&str>, q: &Query) -> Answer {
    let sel = selection(kind, namespace, q)?;
    let exact = q.resource_version_match.as_deref() == Some("Exact");
    let revision = if exact { revision_param(q)? } else { None };
    if !exact {
        // `NotOlderThan` (the default) and "any": the current state is never older.
        revision_param(q)?;
    }
    let req = ListRequest { selection: sel, limit: q.limit, continue_token: q.continue_token.clone(), revision };
    let page = s.store.list(&req).await.map_err(|e| Status::from_error(&e))?;
    let out = ListOut {
        api_version: wire::API_VERSION,
        kind: format!("{kind}List"),
        metadata: ListMeta { resource_version: page.revision.to_string(), continue_token: page.continue_token },
        items: page.items.iter().map(|o| WireObject(o)).collect(),
    };
    Ok(json_response(StatusCode::OK, &out))
}
