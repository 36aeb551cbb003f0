//! [`Manager`]: runs many controllers on one store, over shared caches, under one leadership.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cache::{Cache, CacheConfig, CacheRegistry};
use crate::controller::leader::{LeaderElectionConfig, campaign};
use crate::error::Result;
use crate::meta::{Clock, TokioClock};
use crate::object::Resource;
use crate::runnable::{Leadership, RunParts, Runnable};
use crate::store::Store;

/// Runs controllers: starts the caches they need, reports readiness once every cache has its
/// first list, runs reconciles only while this replica leads, and drains in-flight reconciles
/// on shutdown.
pub struct Manager {
    store: Arc<dyn Store>,
    caches: CacheRegistry,
    controllers: Vec<Box<dyn Runnable>>,
    election: Option<LeaderElectionConfig>,
    ready: watch::Sender<bool>,
    leadership: watch::Sender<Leadership>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("controllers", &self.controllers.iter().map(|c| c.name().to_string()).collect::<Vec<_>>())
            .field("election", &self.election)
            .finish()
    }
}

impl Manager {
    /// A manager over `store`, with no controllers yet.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Manager {
            store,
            caches: CacheRegistry::default(),
            controllers: Vec::new(),
            election: None,
            ready: watch::channel(false).0,
            leadership: watch::channel(Leadership::Standby).0,
            clock: Arc::new(TokioClock::from_system_time()),
        }
    }

    /// The clock every component of this manager uses for the timestamps it writes (default:
    /// the system's time, advancing with `tokio::time`, so on a paused runtime the whole control
    /// plane runs in virtual time).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The manager's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The shared cache of kind `K`, started on first use.
    ///
    /// # Panics
    /// Outside a tokio runtime, on first use of a kind.
    pub fn cache<K: Resource>(&self) -> Cache<K> {
        self.caches.get_or_start::<K>(&self.store)
    }

    /// Starts the shared cache of `K` with custom indexes, before any controller asks for it.
    pub fn cache_with<K: Resource>(&self, config: CacheConfig<K>) -> Cache<K> {
        if let Some(c) = self.caches.get::<K>() {
            return c;
        }
        self.caches.insert(Cache::spawn(self.store.clone(), config))
    }

    /// Adds a component: a controller (a [`ControllerBuilder`](crate::ControllerBuilder)), the
    /// scheduler service, the node provisioner, or anything else that implements [`Runnable`].
    /// Each runs only while this replica leads, and its writes carry the leader's fencing token.
    pub fn add(&mut self, component: impl Runnable) -> &mut Self {
        self.controllers.push(Box::new(component));
        self
    }

    /// Runs controllers only while this replica holds the lock described by `config`.
    pub fn with_leader_election(mut self, config: LeaderElectionConfig) -> Self {
        self.election = Some(config);
        self
    }

    /// Turns true once every cache has its first list.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// This replica's leadership as it changes.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    /// Runs until `shutdown` completes, then stops taking work and waits for in-flight
    /// reconciles to finish.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        for c in &mut self.controllers {
            c.prepare(&self.caches, &self.store);
        }
        // Readiness, then cache sizes for metrics, until the manager stops.
        let (ready, caches) = (self.ready.clone(), self.caches.clone());
        // Held in join sets so that dropping this future (a killed manager) stops them too.
        let mut reporter = JoinSet::new();
        reporter.spawn(async move {
            futures::future::join_all(caches.ready_futures()).await;
            ready.send_replace(true);
            loop {
                for (kind, n) in caches.sizes() {
                    metrics::gauge!("orch_cache_objects", "kind" => kind).set(n as f64);
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        // The election stops only after the controllers have drained, so in-flight reconciles
        // finish under a lock that is still held.
        let (resign_tx, resign_rx) = watch::channel(false);
        let mut election = JoinSet::new();
        match self.election.clone() {
            Some(config) => {
                election.spawn(campaign(self.store.clone(), config, self.leadership.clone(), resign_rx));
            }
            None => {
                self.leadership.send_replace(Leadership::Leading(None));
            }
        }
        let mut controllers = JoinSet::new();
        for c in self.controllers.drain(..) {
            let parts = RunParts {
                store: self.store.clone(),
                caches: self.caches.clone(),
                leader: self.leadership.subscribe(),
                shutdown: stop_rx.clone(),
                clock: self.clock.clone(),
            };
            controllers.spawn(c.run(parts));
        }
        shutdown.await;
        stop_tx.send_replace(true);
        while controllers.join_next().await.is_some() {}
        resign_tx.send_replace(true);
        // The election releases the lock (revokes its lease) so a standby need not wait out the TTL.
        let _ = tokio::time::timeout(Duration::from_secs(5), election.join_all()).await;
        reporter.shutdown().await;
        Ok(())
    }
}
