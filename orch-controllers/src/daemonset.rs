//! The daemon set controller: one workload of a [`DaemonSet`]'s template on every node its
//! `nodeSelector` matches and whose `NoSchedule`/`NoExecute` taints its tolerations accept,
//! bound to the node directly; a node that joins gets one, a node that leaves (or stops
//! matching) loses it; a changed template rolls out node by node, never more than
//! `maxUnavailable` nodes without an available workload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_core::cache::ObjectRef;
use orch_core::controller::{Action, Context, Controller, ControllerBuilder};
use orch_core::error::Error;
use orch_core::kinds::{
    DaemonSet, DaemonSetStatus, DaemonSetUpdate, EventType, Node, ObjectReference, TEMPLATE_HASH_LABEL, TaintEffect,
    Workload,
};
use orch_core::meta::ObjectMeta;
use orch_core::object::Object;
use orch_core::store::DeleteOptions;

use crate::workloads::{LazyRecorder, WriteGate, available_at, is_active, is_ready, name_prefix, random_suffix};

/// The controller (register it with [`DaemonSetController::builder`]).
#[derive(Debug)]
pub struct DaemonSetController {
    gate: WriteGate,
    recorder: LazyRecorder,
}

/// The daemon sets seen so far, so a node's change can wake them all.
type Known = Arc<Mutex<Vec<ObjectRef>>>;

impl DaemonSetController {
    /// The controller wired to its triggers: daemon sets, their workloads, and nodes.
    pub fn builder() -> ControllerBuilder<DaemonSetController> {
        let known: Known = Arc::default();
        let seen = known.clone();
        ControllerBuilder::new(
            "daemonset",
            DaemonSetController { gate: WriteGate::default(), recorder: LazyRecorder::new("daemonset-controller") },
        )
        .owns::<Workload>()
        .watches::<DaemonSet>(move |ds: &Object<DaemonSet>| {
            let r = ObjectRef::of(ds);
            let mut k = seen.lock().unwrap_or_else(|e| e.into_inner());
            if !k.contains(&r) {
                k.push(r.clone());
            }
            vec![r]
        })
        .watches::<Node>(move |_n: &Object<Node>| known.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// True when `ds` should run on `node`.
pub fn wants(ds: &DaemonSet, node: &Object<Node>) -> bool {
    let t = &ds.template.spec;
    let labels_ok = t.node_selector.iter().all(|(k, v)| node.metadata.labels.get(k) == Some(v));
    let taints_ok = node
        .spec
        .taints
        .iter()
        .filter(|taint| taint.effect != TaintEffect::PreferNoSchedule)
        .all(|taint| t.tolerations.iter().any(|tol| tol.tolerates(taint)));
    labels_ok && taints_ok
}

#[async_trait::async_trait]
impl Controller for DaemonSetController {
    type Kind = DaemonSet;
    type Error = Error;

    async fn reconcile(&self, ds: Arc<Object<DaemonSet>>, ctx: &Context) -> Result<Action, Error> {
        let key = ObjectRef::of(&ds);
        if ds.metadata.is_being_deleted() {
            self.gate.forget(&key);
            return Ok(Action::Done);
        }
        let workloads = ctx.cache::<Workload>().expect("registered by the builder");
        let nodes = ctx.cache::<Node>().expect("registered by the builder");
        if !self.gate.caught_up(&key, workloads.revision()) {
            return Ok(Action::RequeueAfter(Duration::from_millis(100)));
        }
        let now = ctx.clock().now();
        let min_ready = Duration::from_secs(u64::from(ds.spec.min_ready_seconds));
        let hash = ds.spec.template.hash();
        let api = ctx.api::<Workload>(&ds.metadata.namespace);
        let me = ObjectReference::of(&*ds);
        let wanted: HashMap<String, Arc<Object<Node>>> = nodes
            .list()
            .into_iter()
            .filter(|n| !n.metadata.is_being_deleted() && wants(&ds.spec, n))
            .map(|n| (n.metadata.name.clone(), n))
            .collect();
        let mut by_node: HashMap<String, Vec<Arc<Object<Workload>>>> = HashMap::new();
        for w in workloads.owned_by(&ds.metadata.uid) {
            if w.metadata.controller_owner().is_none_or(|o| o.uid != ds.metadata.uid) || !is_active(&w) {
                continue;
            }
            by_node.entry(w.spec.node_name.clone().unwrap_or_default()).or_default().push(w);
        }
        let mut deletes: Vec<Arc<Object<Workload>>> = Vec::new();
        let mut status = DaemonSetStatus {
            observed_generation: ds.metadata.generation,
            desired_number_scheduled: wanted.len() as u32,
            ..Default::default()
        };
        // Nodes that should not run it (or are gone) lose their workloads; extra copies go.
        let mut current: HashMap<String, Arc<Object<Workload>>> = HashMap::new();
        for (node, mut ws) in by_node {
            if !wanted.contains_key(&node) {
                status.number_misscheduled += 1;
                deletes.extend(ws);
                continue;
            }
            ws.sort_by_key(|w| {
                (
                    w.metadata.labels.get(TEMPLATE_HASH_LABEL) != Some(&hash),
                    !is_ready(w),
                    std::cmp::Reverse(w.metadata.create_revision),
                )
            });
            let keep = ws.remove(0);
            deletes.extend(ws);
            current.insert(node, keep);
        }
        let mut next_available = None;
        let mut unavailable = 0u32;
        for node in wanted.keys() {
            match current.get(node) {
                Some(w) => {
                    status.current_number_scheduled += 1;
                    status.number_ready += u32::from(is_ready(w));
                    status.updated_number_scheduled +=
                        u32::from(w.metadata.labels.get(TEMPLATE_HASH_LABEL) == Some(&hash));
                    match available_at(w, min_ready) {
                        Some(t) if t <= now => status.number_available += 1,
                        Some(t) => {
                            unavailable += 1;
                            next_available = Some(next_available.map_or(t, |n: orch_core::Timestamp| n.min(t)));
                        }
                        None => unavailable += 1,
                    }
                }
                None => unavailable += 1,
            }
        }
        // The rolling update: old workloads go, not-ready ones first, within the budget.
        if let DaemonSetUpdate::RollingUpdate(r) = ds.spec.update_strategy {
            let max = r.max_unavailable.resolve(wanted.len() as u32, false).max(1);
            let mut budget = max.saturating_sub(unavailable);
            let mut old: Vec<Arc<Object<Workload>>> = current
                .values()
                .filter(|w| w.metadata.labels.get(TEMPLATE_HASH_LABEL) != Some(&hash))
                .cloned()
                .collect();
            old.sort_by_key(|w| (available_at(w, min_ready).is_some_and(|t| t <= now), w.metadata.name.clone()));
            for w in old {
                let available = available_at(&w, min_ready).is_some_and(|t| t <= now);
                if available {
                    if budget == 0 {
                        break;
                    }
                    budget -= 1;
                }
                let node = w.spec.node_name.clone().unwrap_or_default();
                current.remove(&node);
                deletes.push(w);
            }
        }
        for w in &deletes {
            match api.delete(&w.metadata.name, &DeleteOptions::default()).await {
                Ok(orch_core::api::Deleted::Gone(o) | orch_core::api::Deleted::Pending(o)) => {
                    self.gate.wrote(&key, o.metadata.resource_version)
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        // Every wanted node without a workload gets one (a node whose old workload was just
        // deleted gets its new one on the next pass, once the deletion is seen).
        let deleted_nodes: std::collections::HashSet<String> =
            deletes.iter().filter_map(|w| w.spec.node_name.clone()).collect();
        let mut created = 0;
        let mut names: Vec<&String> = wanted.keys().collect();
        names.sort();
        for node in names {
            if current.contains_key(node) || deleted_nodes.contains(node) {
                continue;
            }
            let mut meta = ObjectMeta::namespaced(
                ds.metadata.namespace.clone(),
                format!("{}-{}", name_prefix(&ds.metadata.name, 230), random_suffix(5)),
            );
            meta.labels = ds.spec.template.metadata.labels.clone();
            meta.labels.insert(TEMPLATE_HASH_LABEL, hash.clone());
            meta.annotations = ds.spec.template.metadata.annotations.clone();
            meta.owner_references = vec![ds.controller_ref()];
            let mut spec = ds.spec.template.spec.clone();
            spec.node_name = Some(node.clone());
            match api.create(&Object::new(meta, spec)).await {
                Ok(w) => {
                    self.gate.wrote(&key, w.metadata.resource_version);
                    created += 1;
                }
                Err(e) => {
                    self.recorder.get(ctx).record(
                        &me,
                        EventType::Warning,
                        "FailedCreate",
                        format!("on node {node}: {e}"),
                    );
                    return Err(e);
                }
            }
        }
        if created > 0 || !deletes.is_empty() {
            self.recorder.get(ctx).record(
                &me,
                EventType::Normal,
                "Synced",
                format!("created {created} and deleted {} workloads over {} nodes", deletes.len(), wanted.len()),
            );
        }
        if status != ds.status {
            match ctx.api::<DaemonSet>(&ds.metadata.namespace).write_status(&ds.metadata, &status).await {
                Ok(_) => {}
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(next_available.map_or(Action::Done, |t| Action::RequeueAfter(t.since(now).max(Duration::from_millis(1)))))
    }
}
