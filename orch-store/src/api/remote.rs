//! [`RemoteStore`]: a [`Store`] that is an API server somewhere else.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use orch_core::store::LeaseInfo;
use orch_core::store::semantics::check_selection;
use orch_core::{
    DeleteOptions, DeleteOutcome, DynamicObject, Error, Guard, LeaseId, ListRequest, ListResponse, ObjectKey,
    Propagation, Result, Selection, Store, WatchEvent, WatchRequest, WatchStream, WriteOptions,
};
use serde::Deserialize;
use tokio::sync::watch;

use super::tls;
use super::wire::{self, ListIn, Status, WatchLineIn, encode_query};

/// Builds a [`RemoteStore`].
#[derive(Clone)]
pub struct RemoteStoreBuilder {
    base: String,
    token: Option<String>,
    reconnect_for: Duration,
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RemoteStoreBuilder {
    // The token and the key stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStoreBuilder")
            .field("server", &self.base)
            .field("token", &self.token.as_ref().map(|_| "REDACTED"))
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl RemoteStoreBuilder {
    /// Trusts the CA of this PEM certificate (the cluster CA, `ca.crt` in the server's data
    /// directory) for an `https://` server: a server whose certificate it did not sign is
    /// refused. An `https://` server needs it.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this client certificate and key (PEM) to an `https://` server: the server
    /// takes the user from its `CN` and the groups from its `O`s.
    pub fn client_identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How long a watch keeps trying to reconnect (resuming from the last revision it
    /// delivered) after its connection is lost, before it ends with `Unavailable`. Default 60 s:
    /// long enough for a server to restart.
    pub fn reconnect_for(mut self, d: Duration) -> Self {
        self.reconnect_for = d;
        self
    }

    /// The store. No connection is made until the first call.
    pub fn build(self) -> Result<RemoteStore> {
        let base = self.base.trim_end_matches('/').to_string();
        let https = base.starts_with("https://");
        if !https && !base.starts_with("http://") {
            return Err(Error::invalid(
                "RemoteStore",
                "server",
                format!("must be an https:// or http:// URL (with scheme, host and port), not {base:?}"),
            ));
        }
        if https && self.ca_pem.is_none() {
            return Err(Error::invalid(
                "RemoteStore",
                "ca",
                format!("{base} is https: give the cluster CA's certificate to trust (the server's ca.crt)"),
            ));
        }
        if !https && (self.ca_pem.is_some() || self.identity.is_some()) {
            return Err(Error::invalid(
                "RemoteStore",
                "server",
                format!("{base} is plain http: a CA or client certificate would be sent nowhere; use https://"),
            ));
        }
        let tls = self.ca_pem.map(|ca| Tls { ca });
        let identity = self.identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
        let client = connect(tls.as_ref(), identity)?;
        let upgrades = connect_http1(tls.as_ref(), identity)?;
        let (closer, _) = watch::channel(());
        Ok(RemoteStore {
            inner: Arc::new(Inner {
                client: RwLock::new(client),
                upgrades: RwLock::new(upgrades),
                tls,
                base,
                token: self.token,
                reconnect_for: self.reconnect_for,
            }),
            closer: Arc::new(closer),
        })
    }
}

/// What a client's TLS is built from (kept to build it again with a renewed certificate).
struct Tls {
    ca: Vec<u8>,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn tcp() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http
}

fn tls_config(tls: Option<&Tls>, identity: Option<(&[u8], &[u8])>) -> Result<rustls::ClientConfig> {
    Ok(match tls {
        Some(t) => tls::client_config(&t.ca, identity)?,
        // Never used for an http:// server, but the connector wants one.
        None => rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| unavailable("TLS versions", e))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    })
}

/// The client for protocol upgrades ([`RemoteStore::upgrade`]): HTTP/1.1 only, since HTTP/2
/// has no `Upgrade`; each upgrade takes a connection of its own.
fn connect_http1(tls: Option<&Tls>, identity: Option<(&[u8], &[u8])>) -> Result<HttpClient> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(tls, identity)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp());
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

fn connect(tls: Option<&Tls>, identity: Option<(&[u8], &[u8])>) -> Result<HttpClient> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(tls, identity)?)
        .https_or_http()
        .enable_http2()
        .wrap_connector(tcp());
    // HTTP/2 (with prior knowledge over plain http, by ALPN over TLS): every call and every
    // watch of this store share one connection, multiplexed.
    // An idle watcher holds back at most its stream's window of the connection's: with the
    // connection's window far larger than a stream's, an unread watch never stalls the
    // other calls that share the connection.
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(1 << 20)
        .http2_initial_connection_window_size(i32::MAX as u32)
        .http2_max_concurrent_reset_streams(1 << 16)
        .build(connector))
}

/// A [`Store`] whose calls go to an orch API server ([`ApiServer`](super::ApiServer)): the
/// controllers, schedulers and agents of other processes and machines use it exactly as they
/// would a local store. It passes the store conformance suite against servers backed by every
/// backend.
///
/// Watches survive a lost connection: the stream reconnects and resumes from the last revision
/// it delivered (for up to [`RemoteStoreBuilder::reconnect_for`]), so a server restart costs a
/// watcher nothing but time. Dropping the last clone of the store ends its watches with
/// `Unavailable` ("store closed").
#[derive(Clone)]
pub struct RemoteStore {
    inner: Arc<Inner>,
    closer: Arc<watch::Sender<()>>,
}

struct Inner {
    /// Replaced whole when the client certificate is: new calls open a new connection with it.
    client: RwLock<HttpClient>,
    /// The HTTP/1.1 client of [`RemoteStore::upgrade`], replaced with `client`.
    upgrades: RwLock<HttpClient>,
    tls: Option<Tls>,
    base: String,
    token: Option<String>,
    reconnect_for: Duration,
}

/// What [`RemoteStore::upgrade`] got back.
#[derive(Debug)]
pub enum Upgrade {
    /// The server switched protocols: the connection, to read and write both ways.
    Switched(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>),
    /// The server answered without switching: its status code and body (usually a `Status`).
    Answered(u16, Bytes),
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore").field("server", &self.inner.base).finish()
    }
}

fn unavailable(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Unavailable { message: message.into(), source: Some(Box::new(source)) }
}

fn closed() -> Error {
    Error::Unavailable { message: "store closed".into(), source: None }
}

fn guard_query(q: &mut Vec<String>, guard: &Option<Guard>) {
    if let Some(g) = guard {
        let text = format!("{}/{}/{}@{}", g.key.kind, g.key.namespace, g.key.name, g.resource_version);
        q.push(format!("guard={}", encode_query(&text)));
    }
}

fn with_query(path: String, q: &[String]) -> String {
    if q.is_empty() { path } else { format!("{path}?{}", q.join("&")) }
}

fn selection_query(q: &mut Vec<String>, sel: &Selection) {
    if !sel.labels.is_empty() {
        q.push(format!("labelSelector={}", encode_query(&sel.labels.to_string())));
    }
    if !sel.fields.is_empty() {
        q.push(format!("fieldSelector={}", encode_query(&sel.fields.to_string())));
    }
}

fn decode(body: &[u8]) -> Result<DynamicObject> {
    wire::decode_object(body, None).map_err(|e| Error::Unavailable {
        message: format!("the server answered an object that cannot be read: {e}"),
        source: None,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseOut {
    id: LeaseId,
    ttl_ms: u64,
    remaining_ms: u64,
}

impl From<LeaseOut> for LeaseInfo {
    fn from(l: LeaseOut) -> Self {
        LeaseInfo { id: l.id, ttl: Duration::from_millis(l.ttl_ms), remaining: Duration::from_millis(l.remaining_ms) }
    }
}

fn read<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| unavailable(format!("the server's {what} cannot be read"), e))
}

impl RemoteStore {
    /// A store speaking to the server at `url` (`http://host:port`).
    pub fn builder(url: impl Into<String>) -> RemoteStoreBuilder {
        RemoteStoreBuilder {
            base: url.into(),
            token: None,
            reconnect_for: Duration::from_secs(60),
            ca_pem: None,
            identity: None,
        }
    }

    /// A store speaking to the server at `url` with the default settings.
    pub fn new(url: impl Into<String>) -> Result<Self> {
        RemoteStore::builder(url).build()
    }

    /// The server's base URL.
    pub fn server(&self) -> &str {
        &self.inner.base
    }

    /// Sends one request like [`raw`](RemoteStore::raw), and answers the status code and the
    /// body as it arrives, whatever the code (a followed log, for one, or a command's own
    /// reading of a `Status`). Only a failure to reach the server is an error.
    pub async fn raw_response(
        &self,
        method: &str,
        path_and_query: &str,
        json_body: Option<Vec<u8>>,
    ) -> Result<(u16, futures::stream::BoxStream<'static, Result<Bytes>>)> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| Error::invalid("RemoteStore", "method", format!("{method:?} is not an HTTP method")))?;
        let body = json_body.map(|b| (Bytes::from(b), "application/json"));
        let req = self.inner.request(method, path_and_query, body);
        let what = format!("{} {}", req.method(), req.uri().path());
        let resp = self.inner.inner_client().request(req).await.map_err(|e| match tls::explain(&e) {
            Some(why) => unavailable(format!("{what}: {why}"), e),
            None => unavailable(format!("{what}: cannot reach the server"), e),
        })?;
        let code = resp.status().as_u16();
        let body = resp
            .into_body()
            .into_data_stream()
            .map(move |r| r.map_err(|e| unavailable(format!("{what}: the answer was cut off"), e)))
            .boxed();
        Ok((code, body))
    }

    /// Presents this certificate and key (PEM) from now on, as an agent does after renewing its
    /// node certificate: calls that follow go over a new connection that presents it (open
    /// watches keep theirs until they reconnect). Only for an `https://` store.
    pub fn set_client_identity(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<()> {
        let Some(tls) = &self.inner.tls else {
            return Err(Error::invalid(
                "RemoteStore",
                "server",
                "plain http: there is no TLS to present a certificate on",
            ));
        };
        let client = connect(Some(tls), Some((cert_pem, key_pem)))?;
        let upgrades = connect_http1(Some(tls), Some((cert_pem, key_pem)))?;
        *self.inner.client.write().unwrap_or_else(|e| e.into_inner()) = client;
        *self.inner.upgrades.write().unwrap_or_else(|e| e.into_inner()) = upgrades;
        Ok(())
    }

    /// Asks the server to switch this one request's connection to `protocol` (an HTTP/1.1
    /// `GET` with `Connection: Upgrade`, `Upgrade: protocol`), with the store's TLS and
    /// credential: on `101 Switching Protocols` the connection is then a byte stream both ways
    /// (`orch exec -i` speaks its own framing on it). Any other answer comes back as it is, its
    /// status code and body; only a failure to reach the server is an error.
    pub async fn upgrade(&self, path_and_query: &str, protocol: &str) -> Result<Upgrade> {
        let mut req = self.inner.request(Method::GET, path_and_query, None);
        let value = header::HeaderValue::from_str(protocol)
            .map_err(|_| Error::invalid("RemoteStore", "protocol", format!("{protocol:?} is not a header value")))?;
        req.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("upgrade"));
        req.headers_mut().insert(header::UPGRADE, value);
        let what = format!("GET {}", req.uri().path());
        let client = self.inner.upgrades.read().unwrap_or_else(|e| e.into_inner()).clone();
        let resp = client.request(req).await.map_err(|e| match tls::explain(&e) {
            Some(why) => unavailable(format!("{what}: {why}"), e),
            None => unavailable(format!("{what}: cannot reach the server"), e),
        })?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upgraded = hyper::upgrade::on(resp)
                .await
                .map_err(|e| unavailable(format!("{what}: the protocol switch failed"), e))?;
            return Ok(Upgrade::Switched(hyper_util::rt::TokioIo::new(upgraded)));
        }
        let code = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unavailable(format!("{what}: the answer was cut off"), e))?
            .to_bytes();
        Ok(Upgrade::Answered(code, body))
    }

    /// Sends one request to any path of the server (with its query, e.g.
    /// `/apis/orch.dev/v1/namespaces/ns/deployments?dryRun=All`) and answers the body of a
    /// success; a failure is the [`Error`] its `Status` describes, as for every other call. For
    /// what the `Store` trait does not say: discovery, dry runs.
    pub async fn raw(&self, method: &str, path_and_query: &str, json_body: Option<Vec<u8>>) -> Result<Bytes> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| Error::invalid("RemoteStore", "method", format!("{method:?} is not an HTTP method")))?;
        let body = json_body.map(|b| (Bytes::from(b), "application/json"));
        let (_, bytes) = self.inner.call(method, path_and_query, body).await?;
        Ok(bytes)
    }
}

impl Inner {
    fn inner_client(&self) -> HttpClient {
        self.client.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn request(&self, method: Method, path: &str, body: Option<(Bytes, &'static str)>) -> Request<Full<Bytes>> {
        let mut b = Request::builder().method(method).uri(format!("{}{path}", self.base));
        b = b.header(header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some((bytes, ct)) => {
                b = b.header(header::CONTENT_TYPE, ct);
                Full::new(bytes)
            }
            None => Full::new(Bytes::new()),
        };
        b.body(body).expect("a request from valid parts")
    }

    /// Sends a request and answers the response, with its body, once it is a success.
    async fn send(&self, req: Request<Full<Bytes>>) -> Result<hyper::Response<Incoming>> {
        let what = format!("{} {}", req.method(), req.uri().path());
        let client = self.inner_client();
        let resp = client.request(req).await.map_err(|e| match tls::explain(&e) {
            Some(why) => unavailable(format!("{what}: {why}"), e),
            None => unavailable(format!("{what}: cannot reach the server"), e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let code = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unavailable(format!("{what}: the answer was cut off"), e))?
            .to_bytes();
        Err(status_error(code, &body))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<(StatusCode, Bytes)> {
        let resp = self.send(self.request(method, path, body)).await?;
        let code = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unavailable(format!("{path}: the answer was cut off"), e))?
            .to_bytes();
        Ok((code, bytes))
    }

    async fn open_watch(&self, sel: &Selection, from: u64, progress: Option<Duration>) -> Result<Incoming> {
        let mut q = vec!["watch=true".to_string()];
        selection_query(&mut q, sel);
        // Kubernetes' resourceVersion is exclusive ("after N"); the store's from_revision is
        // inclusive.
        q.push(format!("resourceVersion={}", from.saturating_sub(1)));
        if let Some(p) = progress {
            q.push(format!("progressIntervalMs={}", p.as_millis().max(1)));
        }
        let path = with_query(wire::collection_path(&sel.kind, sel.namespace.as_deref()), &q);
        Ok(self.send(self.request(Method::GET, &path, None)).await?.into_body())
    }
}

fn status_error(code: StatusCode, body: &[u8]) -> Error {
    match serde_json::from_slice::<Status>(body) {
        Ok(s) => s.into_error(),
        Err(_) => Error::Unavailable {
            message: format!("the server answered {code}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])),
            source: None,
        },
    }
}

#[async_trait::async_trait]
impl Store for RemoteStore {
    async fn get(&self, key: &ObjectKey) -> Result<Arc<DynamicObject>> {
        let (_, body) = self.inner.call(Method::GET, &wire::object_path(key), None).await?;
        Ok(Arc::new(decode(&body)?))
    }

    async fn list(&self, req: &ListRequest) -> Result<ListResponse> {
        check_selection(&req.selection)?;
        let mut q = Vec::new();
        selection_query(&mut q, &req.selection);
        if let Some(n) = req.limit {
            q.push(format!("orchLimit={n}"));
        }
        if let Some(c) = &req.continue_token {
            q.push(format!("continue={}", encode_query(c)));
        }
        if let Some(r) = req.revision {
            q.push(format!("resourceVersion={r}"));
            q.push("resourceVersionMatch=Exact".into());
        }
        let path = with_query(wire::collection_path(&req.selection.kind, req.selection.namespace.as_deref()), &q);
        let (_, body) = self.inner.call(Method::GET, &path, None).await?;
        let list: ListIn = read(&body, "list")?;
        let revision =
            list.metadata.resource_version.parse().map_err(|e| unavailable("the list's resourceVersion", e))?;
        let mut items = Vec::with_capacity(list.items.len());
        for raw in &list.items {
            items.push(Arc::new(decode(raw.get().as_bytes())?));
        }
        Ok(ListResponse { items, revision, continue_token: list.metadata.continue_token })
    }

    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        let mut q = Vec::new();
        guard_query(&mut q, &opts.guard);
        let ns = (!obj.metadata.namespace.is_empty()).then_some(obj.metadata.namespace.as_str());
        let path = with_query(wire::collection_path(&obj.kind, ns), &q);
        let body = Bytes::from(wire::object_json(&obj));
        let (_, body) = self.inner.call(Method::POST, &path, Some((body, "application/json"))).await?;
        Ok(Arc::new(decode(&body)?))
    }

    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        self.put(obj, opts, false).await
    }

    async fn update_many(&self, objs: Vec<DynamicObject>, opts: &WriteOptions) -> Vec<Result<Arc<DynamicObject>>> {
        let n = objs.len();
        match self.batch(objs, opts).await {
            Ok(results) => results,
            Err(e) => {
                let status = Status::from_error(&e);
                (0..n).map(|_| Err(status.clone().into_error())).collect()
            }
        }
    }

    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> Result<Arc<DynamicObject>> {
        self.put(obj, opts, true).await
    }

    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> Result<DeleteOutcome> {
        let mut q = Vec::new();
        guard_query(&mut q, &opts.guard);
        let path = with_query(wire::object_path(key), &q);
        let propagation = match opts.propagation {
            Propagation::Background => None,
            Propagation::Foreground => Some("Foreground"),
            Propagation::Orphan => Some("Orphan"),
        };
        let body = (opts.resource_version.is_some() || opts.uid.is_some() || propagation.is_some()).then(|| {
            let mut text = serde_json::json!({"kind": "DeleteOptions", "apiVersion": "v1"});
            if let Some(rv) = opts.resource_version {
                text["preconditions"]["resourceVersion"] = serde_json::json!(rv.to_string());
            }
            if let Some(uid) = &opts.uid {
                text["preconditions"]["uid"] = serde_json::json!(uid);
            }
            if let Some(p) = propagation {
                text["propagationPolicy"] = serde_json::json!(p);
            }
            (Bytes::from(text.to_string()), "application/json")
        });
        let (code, body) = self.inner.call(Method::DELETE, &path, body).await?;
        let obj = Arc::new(decode(&body)?);
        Ok(if code == StatusCode::ACCEPTED { DeleteOutcome::Pending(obj) } else { DeleteOutcome::Deleted(obj) })
    }

    async fn watch(&self, req: &WatchRequest) -> Result<WatchStream> {
        check_selection(&req.selection)?;
        let from = match req.from_revision {
            Some(r) => r,
            None => self.current_revision().await? + 1,
        };
        let body = self.inner.open_watch(&req.selection, from, req.progress_interval).await?;
        let state = WatchState {
            inner: self.inner.clone(),
            selection: req.selection.clone(),
            progress: req.progress_interval,
            closed: self.closer.subscribe(),
            body: Some(body),
            buf: BytesMut::new(),
            resume_from: from,
            seen_at_resume: 0,
            skip: 0,
            ended: false,
        };
        Ok(futures::stream::unfold(state, |mut st| async move {
            if st.ended {
                return None;
            }
            let item = st.next().await;
            if item.is_err() {
                st.ended = true;
            }
            Some((item, st))
        })
        .boxed())
    }

    async fn current_revision(&self) -> Result<u64> {
        #[derive(Deserialize)]
        struct Rev {
            revision: u64,
        }
        let (_, body) = self.inner.call(Method::GET, "/orch/v1/revision", None).await?;
        Ok(read::<Rev>(&body, "revision")?.revision)
    }

    async fn compact(&self, revision: u64) -> Result<()> {
        let body = Bytes::from(serde_json::json!({ "revision": revision }).to_string());
        self.inner.call(Method::POST, "/orch/v1/compact", Some((body, "application/json"))).await?;
        Ok(())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseInfo> {
        let ms = ttl.as_millis().min(u64::MAX as u128) as u64;
        if ms == 0 {
            // Zero after rounding to the wire's milliseconds: say so here, as a store would.
            return Err(Error::invalid("Lease", "ttl", format!("must be at least 1 ms, not {ttl:?}")));
        }
        let body = Bytes::from(serde_json::json!({ "ttlMs": ms }).to_string());
        let (_, body) = self.inner.call(Method::POST, "/orch/v1/leases", Some((body, "application/json"))).await?;
        Ok(read::<LeaseOut>(&body, "lease")?.into())
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<LeaseInfo> {
        let (_, body) = self.inner.call(Method::PUT, &format!("/orch/v1/leases/{id}"), None).await?;
        Ok(read::<LeaseOut>(&body, "lease")?.into())
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        self.inner.call(Method::DELETE, &format!("/orch/v1/leases/{id}"), None).await?;
        Ok(())
    }

    async fn lease(&self, id: LeaseId) -> Result<LeaseInfo> {
        let (_, body) = self.inner.call(Method::GET, &format!("/orch/v1/leases/{id}"), None).await?;
        Ok(read::<LeaseOut>(&body, "lease")?.into())
    }
}

impl RemoteStore {
    async fn put(&self, obj: DynamicObject, opts: &WriteOptions, status: bool) -> Result<Arc<DynamicObject>> {
        let mut q = Vec::new();
        guard_query(&mut q, &opts.guard);
        let mut path = wire::object_path(&obj.key());
        if status {
            path.push_str("/status");
        }
        let body = Bytes::from(wire::object_json(&obj));
        let (_, body) = self.inner.call(Method::PUT, &with_query(path, &q), Some((body, "application/json"))).await?;
        Ok(Arc::new(decode(&body)?))
    }

    async fn batch(&self, objs: Vec<DynamicObject>, opts: &WriteOptions) -> Result<Vec<Result<Arc<DynamicObject>>>> {
        #[derive(Deserialize)]
        struct Out {
            results: Vec<One>,
        }
        #[derive(Deserialize)]
        struct One {
            object: Option<Box<serde_json::value::RawValue>>,
            status: Option<Status>,
        }
        let mut q = Vec::new();
        guard_query(&mut q, &opts.guard);
        let mut text = String::from("{\"items\":[");
        for (i, o) in objs.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&wire::object_json(o));
        }
        text.push_str("]}");
        let path = with_query("/orch/v1/batch/update".into(), &q);
        let (_, body) = self.inner.call(Method::POST, &path, Some((Bytes::from(text), "application/json"))).await?;
        let out: Out = read(&body, "batch answer")?;
        if out.results.len() != objs.len() {
            return Err(Error::Unavailable {
                message: format!("the server answered {} results for {} updates", out.results.len(), objs.len()),
                source: None,
            });
        }
        Ok(out
            .results
            .into_iter()
            .map(|r| match (r.object, r.status) {
                (Some(o), _) => decode(o.get().as_bytes()).map(Arc::new),
                (None, Some(s)) => Err(s.into_error()),
                (None, None) => Err(Error::Unavailable { message: "an empty batch result".into(), source: None }),
            })
            .collect())
    }
}

/// A watch in progress: the open response body, what was read of it, and where to resume.
struct WatchState {
    inner: Arc<Inner>,
    selection: Selection,
    progress: Option<Duration>,
    closed: watch::Receiver<()>,
    body: Option<Incoming>,
    buf: BytesMut,
    /// The revision to reconnect from (inclusive): the last event's revision while its
    /// revision may have more events, otherwise one past it.
    resume_from: u64,
    /// Events already delivered at `resume_from` (skipped on reconnect).
    seen_at_resume: usize,
    /// Events at `resume_from` still to skip after a reconnect.
    skip: usize,
    ended: bool,
}

impl WatchState {
    async fn next(&mut self) -> Result<WatchEvent> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let line = &line[..line.len() - 1];
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                match self.on_line(line)? {
                    Some(e) => return Ok(e),
                    None => continue,
                }
            }
            if self.closed.has_changed().is_err() {
                return Err(closed());
            }
            let Some(body) = self.body.as_mut() else {
                self.reconnect().await?;
                continue;
            };
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = self.closed.changed() => return Err(closed()),
            };
            match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                // The connection ended or broke: resume where the last event left off.
                Some(Err(_)) | None => {
                    self.body = None;
                    self.buf.clear();
                }
            }
        }
    }

    /// One line of the stream: an event to deliver, `None` for one to pass over, or the
    /// stream's final error.
    fn on_line(&mut self, line: &[u8]) -> Result<Option<WatchEvent>> {
        let parsed: WatchLineIn = serde_json::from_slice(line)
            .map_err(|e| unavailable("the server sent a watch event that cannot be read", e))?;
        let object = || decode(parsed.object.get().as_bytes()).map(Arc::new);
        let event = match parsed.kind.as_str() {
            "ADDED" => WatchEvent::Added(object()?),
            "MODIFIED" => WatchEvent::Modified(object()?),
            "DELETED" => WatchEvent::Deleted(object()?),
            "BOOKMARK" => {
                let r = wire::bookmark_revision(parsed.object.get()).unwrap_or(0);
                if r + 1 > self.resume_from {
                    self.resume_from = r + 1;
                    self.seen_at_resume = 0;
                    self.skip = 0;
                }
                return Ok(self.progress.map(|_| WatchEvent::Progress(r)));
            }
            "ERROR" => {
                let status: Status = serde_json::from_str(parsed.object.get())
                    .map_err(|e| unavailable("the server sent a watch error that cannot be read", e))?;
                let e = status.into_error();
                if matches!(e, Error::Unavailable { .. }) {
                    // The server's store hiccuped: reconnect and resume, as for a lost
                    // connection.
                    self.body = None;
                    self.buf.clear();
                    return Ok(None);
                }
                return Err(e);
            }
            other => {
                return Err(Error::Unavailable {
                    message: format!("unknown watch event type {other:?}"),
                    source: None,
                });
            }
        };
        let rev = event.revision();
        if rev == self.resume_from && self.skip > 0 {
            self.skip -= 1;
            return Ok(None);
        }
        if rev == self.resume_from {
            self.seen_at_resume += 1;
        } else {
            self.resume_from = rev;
            self.seen_at_resume = 1;
        }
        self.skip = 0;
        Ok(Some(event))
    }

    /// Opens the watch again from where it left off, retrying until it works, the store is
    /// dropped, or `reconnect_for` has passed.
    async fn reconnect(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.inner.reconnect_for;
        let mut pause = Duration::from_millis(50);
        loop {
            if self.closed.has_changed().is_err() {
                return Err(closed());
            }
            match self.inner.open_watch(&self.selection, self.resume_from, self.progress).await {
                Ok(body) => {
                    self.body = Some(body);
                    self.skip = self.seen_at_resume;
                    return Ok(());
                }
                Err(e @ Error::Unavailable { .. }) => {
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, from = self.resume_from, "watch: reconnecting");
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.closed.changed() => return Err(closed()),
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}
