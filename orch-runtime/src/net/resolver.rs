//! The in-process resolver: services and their endpoints, merged from the shared caches of
//! `Service` and `EndpointSlice` objects, for applications that embed orch and for the node
//! proxy and the DNS server.
//!
//! Every change is incremental: a slice change rebuilds the view of its own service only (its
//! slices, not the cluster's), so the cost of a change does not grow with the number of
//! services.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use orch_core::kinds::{
    EndpointConditions, EndpointSlice, Protocol, SERVICE_NAME_LABEL, Service, ServiceStatus, ServiceType,
};
use orch_core::{Cache, CacheConfig, CacheEvent, Object, ObjectRef, Store};
use tokio::sync::{mpsc, watch};

/// The namespace a name without one (`resolve("web")`) is looked up in.
pub const DEFAULT_NAMESPACE: &str = "default";

/// One port of a resolved service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPort {
    /// The port's name (empty for a service's only, unnamed port).
    pub name: String,
    /// The port clients dial at the cluster address.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// For node-port services: the port on every node, once allocated.
    pub node_port: Option<u16>,
}

/// Where one service port is reached on one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpointPort {
    /// The service port's name.
    pub name: String,
    /// The port to dial at the endpoint's address.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// One endpoint of a resolved service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    /// Its addresses (those that parse; the API server refuses others).
    pub addresses: Vec<IpAddr>,
    /// Where each service port is reached on it.
    pub ports: Vec<ResolvedEndpointPort>,
    /// Its DNS label, if it has one.
    pub hostname: String,
    /// The node it runs on.
    pub node_name: String,
    /// The workload behind it.
    pub workload: String,
    /// Ready, serving, terminating.
    pub conditions: EndpointConditions,
}

impl ResolvedEndpoint {
    /// The port to dial for the service port named `name`.
    pub fn port(&self, name: &str) -> Option<u16> {
        self.ports.iter().find(|p| p.name == name).map(|p| p.port)
    }

    /// Where to dial the service port named `name`: its first address and that port.
    pub fn socket_addr(&self, name: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(*self.addresses.first()?, self.port(name)?))
    }
}

/// A service as clients see it: its address, ports and endpoints, merged from all its slices.
/// Immutable: a change publishes a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedService {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Cluster-internal or node port.
    pub service_type: ServiceType,
    /// No cluster address; DNS answers with the endpoints.
    pub headless: bool,
    /// Endpoints that are not ready still take traffic (not terminating ones).
    pub publish_not_ready: bool,
    /// The address the node proxies serve it on, once allocated.
    pub cluster_address: Option<IpAddr>,
    /// Its ports.
    pub ports: Vec<ResolvedPort>,
    /// Every endpoint, ready or not, in slice order (an address listed by two slices once).
    pub endpoints: Vec<ResolvedEndpoint>,
}

impl ResolvedService {
    /// Whether `e` gets traffic: ready and not terminating (with `publish_not_ready`, any endpoint
    /// that is not terminating).
    pub fn takes_traffic(&self, e: &ResolvedEndpoint) -> bool {
        !e.conditions.terminating && (e.conditions.ready || self.publish_not_ready)
    }

    /// The endpoints that get traffic (see [`takes_traffic`](Self::takes_traffic)).
    pub fn ready_endpoints(&self) -> impl Iterator<Item = &ResolvedEndpoint> {
        self.endpoints.iter().filter(|e| self.takes_traffic(e))
    }

    /// The port named `name` (`""` for a single unnamed port).
    pub fn port(&self, name: &str) -> Option<&ResolvedPort> {
        self.ports.iter().find(|p| p.name == name)
    }

    /// Where the ready endpoints serve the port named `name`.
    pub fn addresses(&self, port_name: &str) -> Vec<SocketAddr> {
        self.ready_endpoints().filter_map(|e| e.socket_addr(port_name)).collect()
    }

    /// Its reference (namespace and name).
    pub fn key(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

/// A service changed: its new view, or `None` once it is gone.
#[derive(Debug, Clone)]
pub struct ServiceChange {
    /// Which service.
    pub service: ObjectRef,
    /// Its new state; `None` when deleted.
    pub current: Option<Arc<ResolvedService>>,
}

type Watchers = HashMap<ObjectRef, watch::Sender<Option<Arc<ResolvedService>>>>;

struct Shared {
    services: RwLock<HashMap<ObjectRef, Arc<ResolvedService>>>,
    /// Held while a change is published, so a new subscriber's snapshot and its stream meet
    /// without a gap.
    subscribers: Mutex<Vec<mpsc::UnboundedSender<ServiceChange>>>,
    watchers: Mutex<Watchers>,
    ready: watch::Sender<bool>,
    changes: AtomicU64,
}

/// Dropped with the last [`Resolver`] handle: stops the task that follows the caches.
struct Alive(#[allow(dead_code)] watch::Sender<()>);

/// Services and their endpoints, always current, for code in this process: look a service up by
/// name, watch its endpoints, or follow every change (the node proxy and the DNS server do).
///
/// ```no_run
/// # async fn demo(store: std::sync::Arc<dyn orch_core::Store>) {
/// use orch_runtime::net::Resolver;
///
/// let resolver = Resolver::from_store(store);
/// resolver.ready().await;
/// if let Some(web) = resolver.resolve("web.default") {
///     println!("cluster address {:?}", web.cluster_address);
///     for addr in web.addresses("http") {
///         println!("ready endpoint at {addr}");
///     }
/// }
/// // Every change of one service's endpoints:
/// let mut watch = resolver.watch("web.default");
/// while watch.changed().await.is_ok() {
///     let ready = watch.borrow().as_ref().map(|s| s.ready_endpoints().count()).unwrap_or(0);
///     println!("web now has {ready} ready endpoints");
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct Resolver {
    shared: Arc<Shared>,
    _alive: Arc<Alive>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("services", &self.len()).field("ready", &self.is_ready()).finish()
    }
}

impl Resolver {
    /// Follows the given caches (shared with other components of the process). Spawns its task
    /// on the current tokio runtime; it ends when the last handle is dropped.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(services: Cache<Service>, slices: Cache<EndpointSlice>) -> Self {
        let shared = Arc::new(Shared::default());
        let (alive, dropped) = watch::channel(());
        // Subscribe before listing, so nothing between the list and the stream is missed
        // (applying an object twice is harmless).
        let service_events = services.subscribe();
        let slice_events = slices.subscribe();
        let follower = Follower { shared: shared.clone(), ..Default::default() };
        tokio::spawn(follower.run(services, slices, service_events, slice_events, dropped));
        Resolver { shared, _alive: Arc::new(Alive(alive)) }
    }

    /// Starts its own caches of services and endpoint slices on `store`.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn from_store(store: Arc<dyn Store>) -> Self {
        Self::new(Cache::spawn(store.clone(), CacheConfig::default()), Cache::spawn(store, CacheConfig::default()))
    }

    /// True once both caches were listed and merged.
    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Waits until both caches were listed and merged; before that a miss means nothing.
    pub async fn ready(&self) {
        let mut rx = self.shared.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// A service by name: `"web.default"` (name, then namespace), `"web"` (in `default`), or a
    /// DNS name `"web.default.svc.cluster.local"` (anything after `.svc` is ignored).
    pub fn resolve(&self, name: &str) -> Option<Arc<ResolvedService>> {
        self.get(&parse_name(name))
    }

    /// A service by reference.
    pub fn get(&self, service: &ObjectRef) -> Option<Arc<ResolvedService>> {
        self.shared.services.read().unwrap_or_else(|e| e.into_inner()).get(service).cloned()
    }

    /// Every service (in no order).
    pub fn services(&self) -> Vec<Arc<ResolvedService>> {
        self.shared.services.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.shared.services.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when no service is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many service changes were published so far (each slice or service change counts once).
    pub fn changes(&self) -> u64 {
        self.shared.changes.load(Ordering::Relaxed)
    }

    /// The current state of one service (named as in [`resolve`](Self::resolve)) and every later
    /// one; `None` while it does not exist.
    pub fn watch(&self, name: &str) -> watch::Receiver<Option<Arc<ResolvedService>>> {
        let key = parse_name(name);
        // Under the subscribers lock, so no change is published between reading and watching.
        let _publishing = self.shared.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let mut watchers = self.shared.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(|_, tx| tx.receiver_count() > 0);
        if let Some(tx) = watchers.get(&key) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(self.get(&key));
        watchers.insert(key, tx);
        rx
    }

    /// Every service now, and every later change, with no gap between them.
    pub fn subscribe(&self) -> (Vec<Arc<ResolvedService>>, mpsc::UnboundedReceiver<ServiceChange>) {
        let mut subs = self.shared.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, rx) = mpsc::unbounded_channel();
        subs.push(tx);
        (self.services(), rx)
    }
}

/// `"web.default"`, `"web"`, `"web.default.svc.cluster.local"`.
fn parse_name(name: &str) -> ObjectRef {
    let name = name.trim_end_matches('.');
    let mut parts = name.split('.');
    let service = parts.next().unwrap_or_default();
    let namespace = parts.next().filter(|s| !s.is_empty()).unwrap_or(DEFAULT_NAMESPACE);
    ObjectRef::new(namespace, service)
}

/// The task that merges cache events into views; the only writer.
#[derive(Default)]
struct Follower {
    shared: Arc<Shared>,
    services: HashMap<ObjectRef, Arc<Object<Service>>>,
    /// Service → its slices by slice name (sorted, for a stable endpoint order).
    slices: HashMap<ObjectRef, BTreeMap<String, Arc<Object<EndpointSlice>>>>,
    /// Slice → the service it was filed under.
    slice_owner: HashMap<ObjectRef, ObjectRef>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            services: RwLock::new(HashMap::new()),
            subscribers: Mutex::new(Vec::new()),
            watchers: Mutex::new(HashMap::new()),
            ready: watch::channel(false).0,
            changes: AtomicU64::new(0),
        }
    }
}

fn slice_service(slice: &Object<EndpointSlice>) -> ObjectRef {
    let name = if slice.spec.service.is_empty() {
        slice.metadata.labels.get(SERVICE_NAME_LABEL).cloned().unwrap_or_default()
    } else {
        slice.spec.service.clone()
    };
    ObjectRef::new(&slice.metadata.namespace, name)
}

impl Follower {
    async fn run(
        mut self,
        services: Cache<Service>,
        slices: Cache<EndpointSlice>,
        mut service_events: mpsc::UnboundedReceiver<CacheEvent<Service>>,
        mut slice_events: mpsc::UnboundedReceiver<CacheEvent<EndpointSlice>>,
        mut dropped: watch::Receiver<()>,
    ) {
        tokio::select! {
            _ = async { services.ready().await; slices.ready().await } => {}
            _ = dropped.changed() => return,
        }
        for s in slices.list() {
            self.put_slice(s, false);
        }
        for s in services.list() {
            self.services.insert(ObjectRef::of(&s), s);
        }
        let keys: Vec<ObjectRef> = self.services.keys().cloned().collect();
        for k in keys {
            self.publish(&k);
        }
        self.shared.ready.send_replace(true);
        loop {
            tokio::select! {
                biased;
                _ = dropped.changed() => return,
                Some(e) = service_events.recv() => self.on_service(e),
                Some(e) = slice_events.recv() => self.on_slice(e),
                else => return,
            }
        }
    }

    fn on_service(&mut self, event: CacheEvent<Service>) {
        let key = ObjectRef::of(event.object());
        match event {
            CacheEvent::Applied(s) => {
                if self.services.get(&key).is_some_and(|cur| same_view(cur, &s)) {
                    self.services.insert(key, s);
                    return;
                }
                self.services.insert(key.clone(), s);
            }
            CacheEvent::Deleted(_) => {
                self.services.remove(&key);
            }
        }
        self.publish(&key);
    }

    fn on_slice(&mut self, event: CacheEvent<EndpointSlice>) {
        match event {
            CacheEvent::Applied(s) => {
                let touched = self.put_slice(s, true);
                for k in touched {
                    self.publish(&k);
                }
            }
            CacheEvent::Deleted(s) => {
                let slice = ObjectRef::of(&s);
                if let Some(owner) = self.slice_owner.remove(&slice) {
                    if let Some(m) = self.slices.get_mut(&owner) {
                        m.remove(&slice.name);
                        if m.is_empty() {
                            self.slices.remove(&owner);
                        }
                    }
                    self.publish(&owner);
                }
            }
        }
    }

    /// Files a slice under its service; returns the services whose views changed.
    fn put_slice(&mut self, slice: Arc<Object<EndpointSlice>>, check: bool) -> Vec<ObjectRef> {
        let key = ObjectRef::of(&slice);
        let owner = slice_service(&slice);
        let mut touched = Vec::with_capacity(2);
        if let Some(prev) = self.slice_owner.insert(key.clone(), owner.clone())
            && prev != owner
        {
            if let Some(m) = self.slices.get_mut(&prev) {
                m.remove(&key.name);
                if m.is_empty() {
                    self.slices.remove(&prev);
                }
            }
            touched.push(prev);
        }
        let by_name = self.slices.entry(owner.clone()).or_default();
        let unchanged = check && by_name.get(&key.name).is_some_and(|cur| cur.spec == slice.spec);
        by_name.insert(key.name, slice);
        if !unchanged {
            touched.push(owner);
        }
        touched
    }

    /// Rebuilds one service's view from its spec, status and slices, and publishes it.
    fn publish(&mut self, key: &ObjectRef) {
        let view = self.services.get(key).map(|svc| Arc::new(build(svc, self.slices.get(key))));
        let shared = &self.shared;
        let mut subs = shared.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut map = shared.services.write().unwrap_or_else(|e| e.into_inner());
            let same = match (&view, map.get(key)) {
                (Some(new), Some(old)) => new == old,
                (None, None) => true,
                _ => false,
            };
            if same {
                return;
            }
            match &view {
                Some(v) => map.insert(key.clone(), v.clone()),
                None => map.remove(key),
            };
        }
        shared.changes.fetch_add(1, Ordering::Relaxed);
        let change = ServiceChange { service: key.clone(), current: view.clone() };
        subs.retain(|tx| tx.send(change.clone()).is_ok());
        drop(subs);
        let watchers = shared.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = watchers.get(key) {
            tx.send_replace(view);
        }
    }
}

/// Whether two versions of a service give the same view (a status write that changed only its
/// counts or conditions changes nothing a client sees).
fn same_view(a: &Object<Service>, b: &Object<Service>) -> bool {
    fn seen(s: &ServiceStatus) -> (&Option<String>, &BTreeMap<String, u32>) {
        (&s.cluster_address, &s.node_ports)
    }
    a.spec == b.spec && seen(&a.status) == seen(&b.status)
}

fn port16(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn build(svc: &Object<Service>, slices: Option<&BTreeMap<String, Arc<Object<EndpointSlice>>>>) -> ResolvedService {
    let ports = svc
        .spec
        .ports
        .iter()
        .filter_map(|p| {
            Some(ResolvedPort {
                name: p.name.clone(),
                port: port16(p.port)?,
                protocol: p.protocol,
                node_port: if svc.spec.type_ == ServiceType::NodePort {
                    svc.status.node_ports.get(&p.name).copied().or(p.node_port).and_then(port16)
                } else {
                    None
                },
            })
        })
        .collect();
    let mut endpoints: Vec<ResolvedEndpoint> = Vec::new();
    // An address listed twice (a workload moving between slices) counts once, ready if either is.
    let mut seen: HashMap<(IpAddr, String), usize> = HashMap::new();
    for slice in slices.into_iter().flat_map(|m| m.values()) {
        for e in &slice.spec.endpoints {
            let addresses: Vec<IpAddr> = e.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            let Some(first) = addresses.first().copied() else { continue };
            let resolved = ResolvedEndpoint {
                addresses,
                ports: e
                    .ports
                    .iter()
                    .filter_map(|p| {
                        Some(ResolvedEndpointPort { name: p.name.clone(), port: port16(p.port)?, protocol: p.protocol })
                    })
                    .collect(),
                hostname: e.hostname.clone(),
                node_name: e.node_name.clone(),
                workload: e.workload.clone(),
                conditions: e.conditions,
            };
            match seen.get(&(first, e.workload.clone())) {
                Some(&i) => {
                    if e.conditions.ready && !endpoints[i].conditions.ready {
                        endpoints[i] = resolved;
                    }
                }
                None => {
                    seen.insert((first, e.workload.clone()), endpoints.len());
                    endpoints.push(resolved);
                }
            }
        }
    }
    ResolvedService {
        namespace: svc.metadata.namespace.clone(),
        name: svc.metadata.name.clone(),
        service_type: svc.spec.type_,
        headless: svc.spec.headless,
        publish_not_ready: svc.spec.publish_not_ready,
        cluster_address: if svc.spec.headless {
            None
        } else {
            svc.status.cluster_address.as_deref().and_then(|a| a.parse().ok())
        },
        ports,
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_service_then_namespace() {
        assert_eq!(parse_name("web.shop"), ObjectRef::new("shop", "web"));
        assert_eq!(parse_name("web"), ObjectRef::new("default", "web"));
        assert_eq!(parse_name("web.shop.svc.cluster.local."), ObjectRef::new("shop", "web"));
    }
}
