//! The node lifecycle controller: notices nodes whose agents stopped heartbeating, marks them
//! not ready and tainted, and after an eviction timeout deletes their workloads so that their
//! owners replace them elsewhere. Evictions are rate-limited and pause when a large share of the
//! cluster is unhealthy (a network blip must not empty a zone).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use orch_core::api::Api;
use orch_core::cache::{NODE_INDEX, ObjectRef};
use orch_core::controller::{Action, Context, Controller, ControllerBuilder, predicate};
use orch_core::error::Error;
use orch_core::kinds::{
    Condition, ConditionStatus, EventType, NODE_LEASE_NAMESPACE, Node, NodeLease, ObjectReference, PRE_STOP_FINALIZER,
    Phase, Taint, TaintEffect, Workload, find_condition, set_condition,
};
use orch_core::meta::{Clock, Timestamp};
use orch_core::object::Object;
use orch_core::rate::RateLimiter;
use orch_core::store::DeleteOptions;

use crate::workloads::LazyRecorder;

/// The condition an evicted workload carries in its last state: why it was deleted.
pub const DISRUPTION_CONDITION: &str = "DisruptionTarget";

/// The taint put on a node whose heartbeat lapsed.
pub const UNREACHABLE_TAINT: &str = "node.orch.dev/unreachable";

/// Settings of the node lifecycle controller.
#[derive(Debug, Clone)]
pub struct NodeLifecycleConfig {
    /// How long a node stays unreachable before its workloads are evicted (default 5 min).
    pub eviction_timeout: Duration,
    /// Sustained evictions (whole nodes) per second (default 0.1: one node every 10 s).
    pub evictions_per_second: f64,
    /// Pause evictions while more than this share of nodes is not ready (default 0.55).
    pub unhealthy_threshold: f64,
    /// After the controller starts, wait this long before judging heartbeats, so agents get a
    /// chance to renew (default 40 s, the default heartbeat TTL).
    pub startup_grace: Duration,
    /// A heartbeat must be missing this long before the node is marked (default 10 s): an agent
    /// that restarts replaces its heartbeat within that time.
    pub missing_grace: Duration,
}

impl Default for NodeLifecycleConfig {
    fn default() -> Self {
        NodeLifecycleConfig {
            eviction_timeout: Duration::from_secs(300),
            evictions_per_second: 0.1,
            unhealthy_threshold: 0.55,
            startup_grace: Duration::from_secs(40),
            missing_grace: Duration::from_secs(10),
        }
    }
}

/// The controller (register it with [`NodeLifecycle::builder`]).
pub struct NodeLifecycle {
    config: NodeLifecycleConfig,
    /// Set by `new`; otherwise the manager's.
    clock: Option<Arc<dyn Clock>>,
    started: Instant,
    /// Evictions: `evictions_per_second`, one node at a time.
    limiter: RateLimiter,
    /// When each node's heartbeat was first seen missing.
    missing_since: Mutex<std::collections::HashMap<String, Instant>>,
    /// Events: a node marked not ready or ready again, each eviction.
    recorder: LazyRecorder,
}

impl std::fmt::Debug for NodeLifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLifecycle").field("config", &self.config).finish()
    }
}

impl NodeLifecycle {
    /// The controller with `config`, using `clock` for taint timestamps instead of the manager's.
    pub fn new(config: NodeLifecycleConfig, clock: Arc<dyn Clock>) -> Self {
        let mut this = NodeLifecycle::on_managers_clock(config);
        this.clock = Some(clock);
        this
    }

    /// The controller with `config`, on its manager's clock.
    fn on_managers_clock(config: NodeLifecycleConfig) -> Self {
        NodeLifecycle {
            clock: None,
            started: Instant::now(),
            limiter: RateLimiter::clamped(config.evictions_per_second, 1),
            missing_since: Mutex::new(Default::default()),
            recorder: LazyRecorder::new("node-lifecycle-controller"),
            config,
        }
    }

    /// The controller on its manager's clock, wired to its triggers.
    pub fn builder(config: NodeLifecycleConfig) -> ControllerBuilder<NodeLifecycle> {
        NodeLifecycle::on_managers_clock(config).into_builder()
    }

    /// This controller wired to its triggers: nodes (their spec: a status write, its own
    /// included, changes nothing it decides on), and their heartbeat leases.
    pub fn into_builder(self) -> ControllerBuilder<NodeLifecycle> {
        ControllerBuilder::new("node-lifecycle", self)
            .predicate(predicate::generation_changed())
            .reads::<Workload>()
            .watches::<NodeLease>(|l: &Object<NodeLease>| vec![ObjectRef::new("", l.metadata.name.clone())])
    }

    /// Takes an eviction token, or says how long until one is due.
    fn take_token(&self) -> Result<(), Duration> {
        self.limiter.check().map_err(|next| next.saturating_duration_since(Instant::now()))
    }
}

/// Marks the workloads on an unreachable node `Unknown`, with the reason: nothing reports on them
/// until the node comes back (its agent then writes their status again) or they are evicted.
async fn mark_unknown(ctx: &Context, node: &str, now: Timestamp) -> Result<(), Error> {
    let Some(cache) = ctx.cache::<Workload>() else { return Ok(()) };
    for w in cache.by_index(NODE_INDEX, node) {
        if matches!(w.status.phase, Phase::Succeeded | Phase::Failed | Phase::Unknown) {
            continue;
        }
        let mut next = (*w).clone();
        next.status.phase = Phase::Unknown;
        let mut c = Condition::new("Ready", ConditionStatus::Unknown, "NodeUnreachable");
        c.message = format!("node {node} stopped reporting; its agent's heartbeat lapsed");
        set_condition(&mut next.status.conditions, c, now);
        match ctx.api::<Workload>(&w.metadata.namespace).replace_status(&next).await {
            // Changed or gone meanwhile: whoever changed it knows better.
            Ok(_) | Err(Error::NotFound(_)) | Err(Error::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn is_ready(node: &Object<Node>) -> bool {
    find_condition(&node.status.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
}

#[async_trait::async_trait]
impl Controller for NodeLifecycle {
    type Kind = Node;
    type Error = Error;

    async fn reconcile(&self, node: Arc<Object<Node>>, ctx: &Context) -> Result<Action, Error> {
        let nodes: Api<Node> = ctx.api_all();
        let leases = ctx.cache::<NodeLease>().expect("registered by the builder");
        let alive = leases.get(&ObjectRef::new(NODE_LEASE_NAMESPACE, node.metadata.name.clone())).is_some();
        let now = self.clock.as_ref().unwrap_or(ctx.clock()).now();
        let tainted = node.spec.taints.iter().find(|t| t.key == UNREACHABLE_TAINT).cloned();
        if alive {
            self.missing_since.lock().unwrap_or_else(|e| e.into_inner()).remove(&node.metadata.name);
            // Back (or never gone): clear the mark.
            if let Some(_t) = &tainted {
                let mut n = (*node).clone();
                n.spec.taints.retain(|t| t.key != UNREACHABLE_TAINT);
                let n = nodes.replace(&n).await?;
                let mut s = n.clone();
                set_condition(
                    &mut s.status.conditions,
                    Condition::new("Ready", ConditionStatus::True, "HeartbeatResumed"),
                    now,
                );
                nodes.replace_status(&s).await?;
                tracing::info!(node = %node.metadata.name, "node is reachable again");
                self.recorder.get(ctx).record(
                    &ObjectReference::of(&*node),
                    EventType::Normal,
                    "NodeReady",
                    "the node's agent renews its heartbeat again; the unreachable taint is removed",
                );
            }
            return Ok(Action::Done);
        }
        let since_start = self.started.elapsed();
        if since_start < self.config.startup_grace {
            return Ok(Action::RequeueAfter(self.config.startup_grace - since_start));
        }
        let Some(taint) = tainted else {
            let first_missing = *self
                .missing_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(node.metadata.name.clone())
                .or_insert_with(Instant::now);
            let missing_for = first_missing.elapsed();
            if missing_for < self.config.missing_grace {
                return Ok(Action::RequeueAfter(self.config.missing_grace - missing_for));
            }
            let mut n = (*node).clone();
            n.spec.taints.push(Taint {
                key: UNREACHABLE_TAINT.into(),
                value: String::new(),
                effect: TaintEffect::NoExecute,
                time_added: Some(now),
            });
            let n = nodes.replace(&n).await?;
            let mut s = n.clone();
            let mut c = Condition::new("Ready", ConditionStatus::Unknown, "HeartbeatLapsed");
            c.message = "the node's agent stopped renewing its heartbeat lease".into();
            set_condition(&mut s.status.conditions, c, now);
            nodes.replace_status(&s).await?;
            tracing::warn!(node = %node.metadata.name, "node unreachable; evicting its workloads after the timeout");
            self.recorder.get(ctx).record(
                &ObjectReference::of(&*node),
                EventType::Warning,
                "NodeNotReady",
                format!(
                    "the node's agent stopped renewing its heartbeat lease; its workloads are evicted after {}s",
                    self.config.eviction_timeout.as_secs()
                ),
            );
            mark_unknown(ctx, &node.metadata.name, now).await?;
            return Ok(Action::RequeueAfter(self.config.eviction_timeout));
        };
        let unreachable_for = now.since(taint.time_added.unwrap_or(now));
        if unreachable_for < self.config.eviction_timeout {
            return Ok(Action::RequeueAfter(self.config.eviction_timeout - unreachable_for));
        }
        // Pause when much of the cluster looks down: more likely our view is broken than the nodes.
        if let Some(all) = ctx.cache::<Node>() {
            let total = all.len().max(1);
            let down = all.list().iter().filter(|n| !is_ready(n)).count();
            if down as f64 / total as f64 > self.config.unhealthy_threshold {
                tracing::warn!(down, total, "too many nodes unhealthy; evictions paused");
                return Ok(Action::RequeueAfter(Duration::from_secs(10)));
            }
        }
        // The node's workloads from the shared cache's node index: the cost follows the node's
        // workloads, not every workload of the cluster.
        let on_node =
            ctx.cache::<Workload>().expect("registered by the builder").by_index(NODE_INDEX, &node.metadata.name);
        // Workloads that tolerate the taint stay (for `toleration_seconds`, or for good).
        let mut wait_for: Option<Duration> = None;
        let victims: Vec<_> = on_node
            .into_iter()
            .filter(|w| !w.metadata.is_being_deleted())
            .filter(|w| {
                let Some(tol) = w.spec.tolerations.iter().find(|t| t.tolerates(&taint)) else { return true };
                match tol.toleration_seconds.map(Duration::from_secs) {
                    None => false,
                    Some(limit) if unreachable_for >= limit => true,
                    Some(limit) => {
                        let left = limit - unreachable_for;
                        wait_for = Some(wait_for.map_or(left, |w| w.min(left)));
                        false
                    }
                }
            })
            .collect();
        if victims.is_empty() {
            return Ok(wait_for.map_or(Action::Done, Action::RequeueAfter));
        }
        if let Err(wait) = self.take_token() {
            return Ok(Action::RequeueAfter(wait));
        }
        for w in victims {
            let api: Api<Workload> = ctx.api(&w.metadata.namespace);
            // Why it goes, on the workload itself, before it goes: watchers see it in the
            // deletion's last state.
            let mut marked = (*w).clone();
            let mut c = Condition::new(DISRUPTION_CONDITION, ConditionStatus::True, "NodeUnreachableEviction");
            c.message = format!(
                "evicted: node {} stopped reporting {}s ago (eviction timeout {}s)",
                node.metadata.name,
                unreachable_for.as_secs(),
                self.config.eviction_timeout.as_secs()
            );
            let message = c.message.clone();
            set_condition(&mut marked.status.conditions, c, now);
            match api.replace_status(&marked).await {
                Ok(_) | Err(Error::NotFound(_)) | Err(Error::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
            match api.delete(&w.metadata.name, &DeleteOptions::default()).await {
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            if w.metadata.finalizers.iter().any(|f| f == PRE_STOP_FINALIZER) {
                // Its agent, which would wait out the pre-stop delay and remove this, is gone.
                let dropped = api
                    .retry_on_conflict(&w.metadata.name, |o| {
                        o.metadata.finalizers.retain(|f| f != PRE_STOP_FINALIZER);
                        Ok(())
                    })
                    .await;
                match dropped {
                    Ok(_) | Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            metrics::counter!("orch_node_evictions_total").increment(1);
            tracing::info!(node = %node.metadata.name, workload = %w.key(), "evicted");
            self.recorder.get(ctx).record(&ObjectReference::of(&*w), EventType::Warning, "Evicted", message);
        }
        Ok(wait_for.map_or(Action::Done, Action::RequeueAfter))
    }
}
