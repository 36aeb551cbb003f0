//! How a node shows it is alive: it registers its `Node` (capacity, labels, taints, storage) and keeps a
//! `NodeLease` on a store lease, renewed on a timer ([`SharedRenewals`], one per process or one
//! per agent); a failed renewal starts a new heartbeat.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_core::kinds::{Condition, ConditionStatus, NODE_LEASE_NAMESPACE, Node, NodeLease, Resources, set_condition};
use orch_core::{Api, Error, LeaseId, Object, ObjectMeta, Result, Store};
use tokio::time::Instant;

use super::Agent;

/// One renewal timer for the agents of one process (a simulation of thousands of nodes; an agent
/// without one runs its own): every
/// `interval` it keeps each registered agent's heartbeat lease alive, one store renewal per
/// agent as before, but from one task on one timer instead of one per agent. An agent whose
/// renewal fails is told, and starts a new heartbeat as it would on its own.
#[derive(Clone)]
pub struct SharedRenewals {
    agents: Arc<Mutex<RenewalTable>>,
}

#[derive(Default)]
struct RenewalTable {
    next: u64,
    /// Agent number → its lease and how to tell it that a renewal failed (gone with the agent:
    /// an agent that died without unregistering is dropped, its lease left to lapse).
    leases: std::collections::BTreeMap<u64, (LeaseId, std::sync::Weak<tokio::sync::Notify>)>,
}

impl std::fmt::Debug for SharedRenewals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.agents.lock().unwrap_or_else(|e| e.into_inner()).leases.len();
        f.debug_struct("SharedRenewals").field("agents", &n).finish()
    }
}

impl SharedRenewals {
    /// Starts the renewal task: every `interval`, each registered lease is kept alive in `store`.
    /// It ends when every handle is dropped.
    pub fn spawn(store: Arc<dyn Store>, interval: Duration) -> Self {
        let agents: Arc<Mutex<RenewalTable>> = Default::default();
        let weak = Arc::downgrade(&agents);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut due: Vec<(u64, LeaseId)> = Vec::new();
            loop {
                tick.tick().await;
                let Some(agents) = weak.upgrade() else { return };
                due.clear();
                {
                    let mut table = agents.lock().unwrap_or_else(|e| e.into_inner());
                    // Agents that ended without unregistering (their task was dropped or aborted)
                    // are dropped before anything is renewed: their leases lapse.
                    table.leases.retain(|_, (_, f)| f.strong_count() > 0);
                    due.extend(table.leases.iter().map(|(a, (l, _))| (*a, *l)));
                }
                for &(agent, lease) in &due {
                    // One stuck renewal must not hold up everybody else's.
                    let renewed = tokio::time::timeout(interval, store.keep_alive(lease)).await;
                    if matches!(renewed, Ok(Ok(_))) {
                        continue;
                    }
                    let mut table = agents.lock().unwrap_or_else(|e| e.into_inner());
                    match table.leases.get(&agent).map(|(l, failed)| (*l, failed.upgrade())) {
                        // Still this lease (not already replaced): the agent starts a new
                        // heartbeat; repeated failures before it does coalesce into one.
                        Some((current, Some(failed))) if current == lease => failed.notify_one(),
                        Some((_, None)) => {
                            table.leases.remove(&agent);
                        }
                        _ => {}
                    }
                }
            }
        });
        SharedRenewals { agents }
    }

    pub(super) fn register(&self, lease: LeaseId, failed: &Arc<tokio::sync::Notify>) -> u64 {
        let mut table = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        table.next += 1;
        let n = table.next;
        table.leases.insert(n, (lease, Arc::downgrade(failed)));
        n
    }

    pub(super) fn set_lease(&self, agent: u64, lease: LeaseId) {
        if let Some(entry) = self.agents.lock().unwrap_or_else(|e| e.into_inner()).leases.get_mut(&agent) {
            entry.0 = lease;
        }
    }

    /// Takes the agent out; returns its current lease.
    pub(super) fn unregister(&self, agent: u64) -> Option<LeaseId> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner()).leases.remove(&agent).map(|(lease, _)| lease)
    }
}

impl Agent {
    /// Registers (or updates) this node's `Node` object: capacity, addresses, the volume classes
    /// it provides (`status.storage`), `Ready`.
    pub(super) async fn register(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.store.clone());
        let capacity = self.config.capacity.clone().unwrap_or_else(host_capacity);
        let storage = self.node_storage();
        let now = self.clock.now();
        loop {
            let existing = nodes.get_opt(&self.config.node_name).await?;
            let mut node = existing.clone().unwrap_or_else(|| {
                let mut meta = ObjectMeta::named(&self.config.node_name);
                meta.labels = self.config.labels.clone();
                Object::new(meta, Node { taints: self.config.taints.clone(), ..Default::default() })
            });
            node.status.capacity = capacity.clone();
            node.status.allocatable = capacity.clone();
            node.status.storage = storage.clone();
            node.status.addresses = vec![orch_core::kinds::NodeAddress {
                type_: "InternalIP".into(),
                address: self.config.address.to_string(),
            }];
            set_condition(
                &mut node.status.conditions,
                Condition::new("Ready", ConditionStatus::True, "AgentReady"),
                now,
            );
            let result = match existing {
                None => nodes.create(&node).await.map(|_| ()),
                Some(_) => nodes.replace_status(&node).await.map(|_| ()),
            };
            match result {
                Err(e) if e.is_conflict() || matches!(e, Error::AlreadyExists(_)) => continue,
                other => return other,
            }
        }
    }

    /// Creates the heartbeat object on a fresh store lease; returns the lease id.
    pub(super) async fn heartbeat(&self) -> Result<u64> {
        let lease = self.store.grant_lease(self.config.lease_ttl).await?;
        let leases: Api<NodeLease> = Api::namespaced(self.store.clone(), NODE_LEASE_NAMESPACE);
        let mut meta = ObjectMeta::named(&self.config.node_name);
        meta.lease = Some(lease.id);
        let hb = Object::new(meta, NodeLease { holder: self.config.node_name.clone() });
        loop {
            match leases.create(&hb).await {
                Ok(_) => return Ok(lease.id),
                // A heartbeat of a previous run of this agent: replace it.
                Err(Error::AlreadyExists(_)) => {
                    let _ = leases.delete(&self.config.node_name, &Default::default()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// What this host offers when the config does not say: its CPUs and memory, 110 workloads.
fn host_capacity() -> Resources {
    let mut r = Resources::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    r.insert(orch_core::kinds::resource::CPU.into(), orch_core::Quantity::from_units(cpus));
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
    });
    if let Some(kib) = mem_kib {
        r.insert(orch_core::kinds::resource::MEMORY.into(), orch_core::Quantity::from_bytes(kib * 1024));
    }
    r.insert(orch_core::kinds::resource::PODS.into(), orch_core::Quantity::from_units(110));
    r
}
