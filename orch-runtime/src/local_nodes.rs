//! [`LocalNodes`]: a [`NodeProvider`] that runs each node as an [`Agent`] in this process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use orch_core::provider::{NodePool, NodeProvider, POOL_LABEL, ProviderError};
use orch_core::{Runtime, Store};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::agent::{Agent, AgentConfig, AgentError};

/// A [`NodeProvider`] that starts each node as an [`Agent`] in this process, on a runtime made
/// for it: for simulated clusters (with the simulated runtime), tests, and one machine split into
/// several nodes. Terminating a node drains its agent (its instances are stopped).
pub struct LocalNodes {
    store: Arc<dyn Store>,
    runtime_for: RuntimeFor,
    configure: Box<dyn Fn(AgentConfig) -> AgentConfig + Send + Sync>,
    running: Mutex<HashMap<String, Running>>,
}

type RuntimeFor = Box<dyn Fn(&str) -> Arc<dyn Runtime> + Send + Sync>;
type Running = (oneshot::Sender<()>, JoinHandle<Result<(), AgentError>>);

impl std::fmt::Debug for LocalNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNodes").field("running", &self.running().len()).finish()
    }
}

impl LocalNodes {
    /// Nodes whose agents use `store`, each on the runtime `runtime_for` makes for its name.
    pub fn new(store: Arc<dyn Store>, runtime_for: impl Fn(&str) -> Arc<dyn Runtime> + Send + Sync + 'static) -> Self {
        LocalNodes {
            store,
            runtime_for: Box::new(runtime_for),
            configure: Box::new(|c| c),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Adjusts each agent's settings (heartbeat, resync…) before it starts.
    pub fn configure(mut self, f: impl Fn(AgentConfig) -> AgentConfig + Send + Sync + 'static) -> Self {
        self.configure = Box::new(f);
        self
    }

    /// Names of the nodes whose agents run.
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        names.sort();
        names
    }
}

#[async_trait]
impl NodeProvider for LocalNodes {
    async fn launch(&self, name: &str, pool: &NodePool) -> Result<String, ProviderError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if !running.contains_key(name) {
            let mut config = AgentConfig::new(name);
            config.labels = pool.labels.clone();
            config.labels.insert(POOL_LABEL, pool.name.clone());
            config.taints = pool.taints.clone();
            config.capacity = Some(pool.capacity.clone());
            let agent = Agent::new((self.configure)(config), self.store.clone(), (self.runtime_for)(name));
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(agent.run(
                async move {
                    let _ = stopped.await;
                },
                true,
            ));
            running.insert(name.to_string(), (stop, task));
        }
        Ok(format!("local://{name}"))
    }

    async fn terminate(&self, name: &str, _pool: &NodePool) -> Result<(), ProviderError> {
        let entry = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        if let Some((stop, task)) = entry {
            let _ = stop.send(());
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(node = %name, error = %e, "agent stopped with an error"),
                Err(e) => tracing::warn!(node = %name, error = %e, "agent task failed"),
            }
        }
        Ok(())
    }
}
