//! [`Runnable`]: anything a [`Manager`](crate::Manager) runs. Controllers are one kind; the
//! scheduler service, the node provisioner and an application's own components are others, and
//! all of them go in through the same [`Manager::add`](crate::Manager::add).

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::cache::CacheRegistry;
use crate::meta::Clock;
use crate::store::{Guard, Store};

/// Whether this process may act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// Another replica leads: keep caches warm, act on nothing.
    Standby,
    /// This replica leads; writes carry the fencing token when there is one (there is none
    /// without leader election).
    Leading(Option<Guard>),
}

/// What a manager hands a component when it starts it.
#[derive(Debug)]
#[non_exhaustive]
pub struct RunParts {
    /// The store the manager runs on.
    pub store: Arc<dyn Store>,
    /// The manager's shared caches: one per kind, started on first use.
    pub caches: CacheRegistry,
    /// This replica's leadership as it changes: act only while it is `Leading`, and carry its
    /// guard on every write.
    pub leader: watch::Receiver<Leadership>,
    /// Turns true when the manager shuts down: finish what is in flight, then return.
    pub shutdown: watch::Receiver<bool>,
    /// The manager's clock, for every timestamp a component writes: one clock for the whole
    /// control plane, so that on a paused runtime all of it runs in virtual time.
    pub clock: Arc<dyn Clock>,
}

/// A component a [`Manager`](crate::Manager) runs (controller-runtime's `Runnable`).
///
/// # To ensure correctness
/// - `prepare` starts every cache the component will read (through `caches`), so the manager's
///   readiness waits for them; it must not block.
/// - `run` acts only while `parts.leader` says `Leading`, carries that leadership's guard on its
///   writes (so a deposed replica's writes are refused), and returns once `parts.shutdown` turns
///   true and its in-flight work has finished.
pub trait Runnable: Send + 'static {
    /// Names it in logs and metrics.
    fn name(&self) -> &str;

    /// Registers the caches it needs before anything runs.
    fn prepare(&mut self, caches: &CacheRegistry, store: &Arc<dyn Store>) {
        let _ = (caches, store);
    }

    /// Runs until `parts.shutdown` turns true.
    fn run(self: Box<Self>, parts: RunParts) -> BoxFuture<'static, ()>;
}

/// Finishes once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
