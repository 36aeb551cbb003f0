//! The node proxy: serves every service's cluster address (and node ports) on this node, in user
//! space, balancing new connections over the ready endpoints.
//!
//! For each service that is not headless and has a cluster address, it listens on that address
//! at each service port (TCP or UDP), and for node-port services also on the node's addresses at
//! the node port. Listeners follow services as they come and go. Each new connection goes to the
//! less loaded of two random ready endpoints (power of two choices on open connections); a
//! refused connect is retried on another endpoint, and an endpoint that refused is tried only when
//! no other is left for a few seconds (UDP too: a datagram answered with "port unreachable"); with
//! no ready endpoint the connection is closed at once. An endpoint that stops being ready or starts terminating gets no new
//! connection from the moment its slice change reaches the proxy; its open connections get the
//! grace period to finish, then are closed; so do open TCP connections when the proxy stops.
//!
//! An IPv4 cluster address outside `127.0.0.0/8` (a cluster range such as `10.96.0.0/16`, which
//! a container on a Docker bridge network reaches through its gateway, this machine) is made
//! local with a [`LocalRoute`] on the loopback interface while a listener uses it (one a killed
//! run left is taken over), and the route is removed the grace period after its last listener
//! closed, so open connections to the address can finish, or when the proxy has stopped
//! ([`ProxyConfig::local_routes`]; this takes `CAP_NET_ADMIN`).
//!
//! A port that cannot be bound (taken by another program, or an address this machine does not
//! have and could not be given) is logged, counted in `orch_proxy_bind_failures_total`, listed by
//! [`ProxyStatus::failed`], and tried again every [`ProxyConfig::rebind_interval`]; the proxy
//! keeps serving everything else.

mod balance;
mod tcp;
mod udp;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_core::ObjectRef;
use orch_core::kinds::{Protocol, ServiceType};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::balance::Pool;
use super::resolver::{ResolvedService, Resolver, ServiceChange};
use super::route::LocalRoute;

/// How the node proxy behaves.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where node ports listen (default: every address of the node, `0.0.0.0`).
    pub node_addresses: Vec<IpAddr>,
    /// How long open connections to an endpoint that left may go on (default 30 s).
    pub grace: Duration,
    /// How long a connect to an endpoint may take before another is tried (default 2 s).
    pub connect_timeout: Duration,
    /// Endpoints tried for one connection, refused ones included (default 3).
    pub connect_attempts: usize,
    /// A UDP session without a reply for this long ends (default 30 s).
    pub udp_idle_timeout: Duration,
    /// How often ports that could not be bound are tried again (default 5 s).
    pub rebind_interval: Duration,
    /// Make a cluster address that this machine does not have local (a route of type `local`
    /// on the loopback interface) while the proxy listens on it (default on). Without it, or
    /// without `CAP_NET_ADMIN`, only cluster addresses the machine has (all of `127/8`) can be
    /// served.
    pub local_routes: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            node_addresses: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            grace: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            connect_attempts: 3,
            udp_idle_timeout: Duration::from_secs(30),
            rebind_interval: Duration::from_secs(5),
            local_routes: true,
        }
    }
}

/// One address the proxy listens on: where and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Frontend {
    /// The address and port.
    pub addr: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// A port the proxy should serve but could not bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindFailure {
    /// Where.
    pub frontend: Frontend,
    /// For which service.
    pub service: ObjectRef,
    /// Why (the bind error, or the service that holds it).
    pub reason: String,
}

struct Listener {
    service: ObjectRef,
    pool: Arc<Pool>,
    task: JoinHandle<()>,
    /// Whether it holds a use of its address's local route.
    routed: bool,
}

/// A local route the proxy holds and how many listeners use it. One that no listener uses is
/// kept for the grace period (since `idle_since`), for the connections still open to it.
struct HeldRoute {
    _route: LocalRoute,
    users: usize,
    idle_since: Option<tokio::time::Instant>,
}

impl Listener {
    /// Stops accepting and waits until the socket is closed (an aborted task drops its future,
    /// and with it the socket, only when the runtime next looks at it).
    async fn close(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        self.pool.close();
    }
}

#[derive(Default)]
struct Table {
    listeners: HashMap<Frontend, Listener>,
    by_service: HashMap<ObjectRef, Vec<Frontend>>,
    failed: HashMap<Frontend, BindFailure>,
    /// The local routes the proxy holds.
    routes: HashMap<IpAddr, HeldRoute>,
}

impl Table {
    /// Takes `f`'s listener out; its address's local route starts its grace period when this
    /// was its last listener.
    fn remove(&mut self, f: &Frontend) -> Option<Listener> {
        let l = self.listeners.remove(f)?;
        if l.routed
            && let Some(r) = self.routes.get_mut(&f.addr.ip())
        {
            r.users -= 1;
            if r.users == 0 {
                r.idle_since = Some(tokio::time::Instant::now());
            }
        }
        Some(l)
    }

    /// Removes the routes no listener has used for `grace`.
    fn sweep(&mut self, grace: Duration) {
        self.routes.retain(|_, r| r.users > 0 || r.idle_since.is_none_or(|t| t.elapsed() < grace));
    }
}

/// A read handle on what a running [`NodeProxy`] serves: for tests, status pages and benches.
#[derive(Clone)]
pub struct ProxyStatus {
    table: Arc<Mutex<Table>>,
    applied: watch::Receiver<u64>,
}

impl std::fmt::Debug for ProxyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyStatus").field("applied", &*self.applied.borrow()).finish()
    }
}

impl ProxyStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where it listens now.
    pub fn listening(&self) -> Vec<Frontend> {
        let mut v: Vec<Frontend> = self.lock().listeners.keys().copied().collect();
        v.sort_by_key(|f| (f.addr, f.protocol == Protocol::UDP));
        v
    }

    /// The addresses it holds local with a [`LocalRoute`] (see [`ProxyConfig::local_routes`]),
    /// those whose last listener closed less than the grace period ago included.
    pub fn routed(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.lock().routes.keys().copied().collect();
        v.sort();
        v
    }

    /// Ports it should serve but could not bind, with the reasons.
    pub fn failed(&self) -> Vec<BindFailure> {
        self.lock().failed.values().cloned().collect()
    }

    /// The endpoints taking new connections at `frontend` (`None` when it does not listen there).
    pub fn endpoints(&self, frontend: Frontend) -> Option<Vec<SocketAddr>> {
        let t = self.lock();
        let l = t.listeners.get(&frontend)?;
        Some(l.pool.snapshot().iter().map(|b| b.addr).collect())
    }

    /// How many service changes it has applied (ready with the initial set at 1 or more); wait
    /// on [`changed`](Self::changed) to follow it.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the proxy applied another change (or stopped: then `false`).
    pub async fn changed(&mut self) -> bool {
        self.applied.changed().await.is_ok()
    }
}

/// The node proxy. Build it with the services to serve, then [`run`](NodeProxy::run) it.
///
/// ```no_run
/// # async fn demo(store: std::sync::Arc<dyn orch_core::Store>) {
/// use orch_runtime::net::{NodeProxy, ProxyConfig, Resolver};
///
/// let resolver = Resolver::from_store(store);
/// let proxy = NodeProxy::new(ProxyConfig::default(), resolver);
/// let status = proxy.status();
/// // Serves until ctrl-c.
/// proxy.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
/// println!("stopped; could not bind: {:?}", status.failed());
/// # }
/// ```
pub struct NodeProxy {
    config: Arc<ProxyConfig>,
    resolver: Resolver,
    table: Arc<Mutex<Table>>,
    applied: watch::Sender<u64>,
    open: tcp::OpenConnections,
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy").field("config", &self.config).finish()
    }
}

/// What one service wants served: each frontend with the port name and its endpoints.
fn wanted(svc: &ResolvedService, config: &ProxyConfig) -> Vec<(Frontend, Vec<SocketAddr>)> {
    let mut out = Vec::new();
    if svc.headless {
        return out;
    }
    let Some(cluster) = svc.cluster_address else { return out };
    for p in &svc.ports {
        let endpoints: Vec<SocketAddr> = svc
            .ready_endpoints()
            .filter_map(|e| {
                let ep = e.ports.iter().find(|ep| ep.name == p.name)?;
                Some(SocketAddr::new(*e.addresses.first()?, ep.port))
            })
            .collect();
        out.push((Frontend { addr: SocketAddr::new(cluster, p.port), protocol: p.protocol }, endpoints.clone()));
        if svc.service_type == ServiceType::NodePort
            && let Some(np) = p.node_port
        {
            for a in &config.node_addresses {
                out.push((Frontend { addr: SocketAddr::new(*a, np), protocol: p.protocol }, endpoints.clone()));
            }
        }
    }
    out
}

impl NodeProxy {
    /// A proxy for the services `resolver` knows.
    pub fn new(config: ProxyConfig, resolver: Resolver) -> Self {
        NodeProxy {
            config: Arc::new(config),
            resolver,
            table: Arc::new(Mutex::new(Table::default())),
            applied: watch::channel(0).0,
            open: Arc::new(watch::channel(0).0),
        }
    }

    /// A handle on what it serves (valid before, during and after [`run`](Self::run)).
    pub fn status(&self) -> ProxyStatus {
        ProxyStatus { table: self.table.clone(), applied: self.applied.subscribe() }
    }

    /// Serves until `stop` resolves; then closes every listener and gives open TCP connections
    /// the grace period: it returns once they have all finished, or when the grace period is
    /// over (they are closed then).
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        tokio::select! {
            _ = self.resolver.ready() => {}
            _ = &mut stop => return,
        }
        let (initial, mut changes) = self.resolver.subscribe();
        for svc in initial {
            self.apply(&svc.key(), Some(&svc)).await;
        }
        self.applied.send_modify(|n| *n += 1);
        let mut rebind = tokio::time::interval(self.config.rebind_interval);
        rebind.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rebind.reset();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                change = changes.recv() => {
                    let Some(ServiceChange { service, current }) = change else { break };
                    self.apply(&service, current.as_deref()).await;
                    // Take whatever else is queued before announcing: a burst is applied at once.
                    while let Ok(ServiceChange { service, current }) = changes.try_recv() {
                        self.apply(&service, current.as_deref()).await;
                    }
                    self.applied.send_modify(|n| *n += 1);
                }
                _ = rebind.tick() => {
                    self.table.lock().unwrap_or_else(|e| e.into_inner()).sweep(self.config.grace);
                    let services: Vec<ObjectRef> = {
                        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
                        let mut v: Vec<ObjectRef> = t.failed.values().map(|f| f.service.clone()).collect();
                        v.dedup();
                        v
                    };
                    for s in services {
                        let current = self.resolver.get(&s);
                        self.apply(&s, current.as_deref()).await;
                    }
                }
            }
        }
        let closed: Vec<Listener> = {
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            t.by_service.clear();
            t.listeners.drain().map(|(_, l)| l).collect()
        };
        for l in closed {
            l.close().await;
        }
        self.applied.send_modify(|n| *n += 1);
        // Closing the listeners drained their endpoints: each open connection ends by itself, at
        // the latest when the grace period is over. Their addresses stay local until then.
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(self.config.grace, open.wait_for(|n| *n == 0)).await;
        self.table.lock().unwrap_or_else(|e| e.into_inner()).routes.clear();
        metrics::gauge!("orch_proxy_local_routes").set(0.0);
    }

    /// Brings one service's listeners in line with its current state.
    async fn apply(&self, service: &ObjectRef, current: Option<&ResolvedService>) {
        let want = current.map(|s| wanted(s, &self.config)).unwrap_or_default();
        let mut to_bind: Vec<(Frontend, Vec<SocketAddr>)> = Vec::new();
        let mut closed: Vec<Listener> = Vec::new();
        {
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let t = &mut *t;
            let had = t.by_service.remove(service).unwrap_or_default();
            for f in &had {
                if !want.iter().any(|(w, _)| w == f)
                    && t.listeners.get(f).is_some_and(|l| &l.service == service)
                    && let Some(l) = t.remove(f)
                {
                    closed.push(l);
                }
            }
            t.failed.retain(|f, b| &b.service != service || want.iter().any(|(w, _)| w == f));
            let mut mine = Vec::with_capacity(want.len());
            for (f, endpoints) in want {
                match t.listeners.get(&f) {
                    Some(l) if &l.service == service => {
                        l.pool.set(&endpoints);
                        mine.push(f);
                    }
                    Some(l) => {
                        let reason = format!("already served for service {}", l.service);
                        tracing::warn!(service = %service, addr = %f.addr, protocol = ?f.protocol, %reason, "proxy cannot serve a port");
                        metrics::counter!("orch_proxy_bind_failures_total").increment(1);
                        t.failed.insert(f, BindFailure { frontend: f, service: service.clone(), reason });
                    }
                    None => to_bind.push((f, endpoints)),
                }
            }
            t.by_service.insert(service.clone(), mine);
        }
        for l in closed {
            l.close().await;
        }
        for (f, endpoints) in to_bind {
            let pool = Arc::new(Pool::default());
            pool.set(&endpoints);
            let cluster = current.and_then(|s| s.cluster_address) == Some(f.addr.ip());
            let (bound, route) = self.bind(f, cluster, &pool).await;
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            match bound {
                Ok(task) => {
                    t.failed.remove(&f);
                    let routed = match (t.routes.get_mut(&f.addr.ip()), route) {
                        (Some(held), _) => {
                            held.users += 1;
                            held.idle_since = None;
                            true
                        }
                        (None, Some(route)) => {
                            tracing::info!(service = %service, addr = %f.addr.ip(), "proxy made a cluster address local");
                            t.routes.insert(f.addr.ip(), HeldRoute { _route: route, users: 1, idle_since: None });
                            true
                        }
                        (None, None) => false,
                    };
                    t.listeners.insert(f, Listener { service: service.clone(), pool, task, routed });
                    t.by_service.entry(service.clone()).or_default().push(f);
                    tracing::debug!(service = %service, addr = %f.addr, protocol = ?f.protocol, "proxy listening");
                }
                Err(e) => {
                    let reason = e.to_string();
                    if t.failed.get(&f).is_none_or(|b| b.reason != reason) {
                        tracing::warn!(service = %service, addr = %f.addr, protocol = ?f.protocol, error = %e, "proxy cannot bind a service port");
                    }
                    metrics::counter!("orch_proxy_bind_failures_total").increment(1);
                    t.failed.insert(f, BindFailure { frontend: f, service: service.clone(), reason });
                }
            }
        }
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        metrics::gauge!("orch_proxy_local_routes").set(t.routes.len() as f64);
        metrics::gauge!("orch_proxy_listeners").set(t.listeners.len() as f64);
        metrics::gauge!("orch_proxy_bind_failed_ports").set(t.failed.len() as f64);
    }

    /// Binds `f` and starts serving it. An IPv4 cluster address outside 127/8 is made local
    /// first when the config allows and no route is held for it yet: the new route is returned
    /// (dropped, and so removed, when the bind fails anyway). Where the route cannot be added
    /// the bind is still tried: the address may be one of the machine's own.
    async fn bind(
        &self,
        f: Frontend,
        cluster: bool,
        pool: &Arc<Pool>,
    ) -> (std::io::Result<JoinHandle<()>>, Option<LocalRoute>) {
        let ip = f.addr.ip();
        let routable = cluster && self.config.local_routes && ip.is_ipv4() && !ip.is_loopback();
        let held = self.table.lock().unwrap_or_else(|e| e.into_inner()).routes.contains_key(&ip);
        let (route, refused) = match routable && !held {
            true => match LocalRoute::add(ip) {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e)),
            },
            false => (None, None),
        };
        let bound = match f.protocol {
            Protocol::TCP => tokio::net::TcpListener::bind(f.addr)
                .await
                .map(|l| tokio::spawn(tcp::serve(l, pool.clone(), self.config.clone(), self.open.clone()))),
            Protocol::UDP => tokio::net::UdpSocket::bind(f.addr)
                .await
                .map(|s| tokio::spawn(udp::serve(s, pool.clone(), self.config.clone()))),
        };
        match (bound, refused) {
            (Err(e), Some(why)) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                let reason = format!(
                    "{e}; making it local failed: {why} (a cluster address outside 127.0.0.0/8 takes CAP_NET_ADMIN)"
                );
                (Err(std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, reason)), None)
            }
            (bound, _) => (bound, route),
        }
    }
}
