//! The endpoints controller: keeps, for every [`Service`], the endpoints of the workloads its
//! selector picks, in [`EndpointSlice`]s of at most
//! [`endpoints_per_slice`](EndpointsConfig::endpoints_per_slice) endpoints, and gives each
//! service its cluster address and node ports.
//!
//! - An endpoint is a workload of the service's namespace carrying every selector label that
//!   runs on a node (its status has the node's address): its address, the host port each
//!   service port reaches (the target port by number or by container-port name, looked up in
//!   the workload's status), and its conditions: `ready` (its `Ready` condition holds and it is
//!   not being deleted), `serving` (ready, deleted or not), `terminating` (being deleted).
//! - Slices are owned by their service (the garbage collector removes them with it) and carry
//!   [`SERVICE_NAME_LABEL`]. An endpoint that did not change is never written; a change rewrites
//!   only the slice holding it (see [`slices::plan`]).
//! - Problems are conditions on the service, never failures: `EndpointsReady` is false with
//!   `NoMatchingWorkloads` when the selector matches nothing and `PortNotFound` when a matching
//!   workload lacks a target port (it is left out); `PortsAllocated` is false with
//!   `NodePortConflict`, `NodePortOutOfRange` (a fixed `nodePort` outside
//!   [`EndpointsConfig::node_port_range`]), `NodePortRangeEmpty` (a range whose start is after
//!   its end), `ClusterAddressConflict` or an exhausted range.
//! - Cluster addresses (from [`EndpointsConfig::cluster_range`], default `127.64.0.0/16`; a
//!   headless service has none) and node ports (for `NodePort` services, from
//!   [`EndpointsConfig::node_port_range`], default 30000-32767, or as `ports[].nodePort`
//!   fixes them) are unique in the cluster and stay with their service across restarts of the
//!   controller (read back from the services' statuses).
//! - A service with an empty selector gets its address and ports but no slices from this
//!   controller: its application keeps them. When a selector becomes empty, the slices this
//!   controller wrote for the service (those whose controller owner reference is the service)
//!   are deleted; an application's slices (no controller owner reference to the service; a
//!   plain owner reference is fine) are left alone.

mod allocate;
pub mod slices;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_core::cache::ObjectRef;
use orch_core::controller::{Action, Context, Controller, ControllerBuilder};
use orch_core::error::Error;
use orch_core::kinds::{
    Condition, ConditionStatus, EndpointSlice, SERVICE_NAME_LABEL, Service, ServiceStatus, ServiceType, Workload,
    set_condition,
};
use orch_core::meta::ObjectMeta;
use orch_core::object::Object;
use orch_core::store::DeleteOptions;

pub use allocate::AddressRange;
use allocate::{Allocations, Holder};

use crate::workloads::{WriteGate, name_prefix, random_suffix};

/// Where cluster addresses come from unless configured: all of 127/8 is loopback on Linux, so
/// every node proxy can serve them without setup.
pub const DEFAULT_CLUSTER_RANGE: &str = "127.64.0.0/16";

/// Where node ports come from unless configured.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// Settings of the endpoints controller.
#[derive(Debug, Clone)]
pub struct EndpointsConfig {
    /// The most endpoints in one slice (default
    /// [`DEFAULT_ENDPOINTS_PER_SLICE`](orch_core::kinds::DEFAULT_ENDPOINTS_PER_SLICE)).
    pub endpoints_per_slice: usize,
    /// Cluster addresses are given from this block.
    pub cluster_range: AddressRange,
    /// Node ports are given from this range; a fixed `nodePort` outside it is refused, and a
    /// range whose start is after its end gives none (`NodePortRangeEmpty`).
    pub node_port_range: RangeInclusive<u16>,
}

impl Default for EndpointsConfig {
    fn default() -> Self {
        EndpointsConfig {
            endpoints_per_slice: orch_core::kinds::DEFAULT_ENDPOINTS_PER_SLICE,
            cluster_range: AddressRange::default(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
        }
    }
}

/// Which services to reconcile when a workload changes: those whose selector matches it now,
/// and those whose slices hold it (it may have stopped matching).
#[derive(Debug, Default)]
struct Index {
    /// Service → its selector.
    selectors: HashMap<ObjectRef, BTreeMap<String, String>>,
    /// Namespace → `key=value` → the services whose selector has that pair (a workload's labels
    /// find their candidate services without a look at every service).
    by_pair: HashMap<String, HashMap<String, HashSet<String>>>,
    /// Workload → services whose slices hold it.
    members: HashMap<ObjectRef, HashSet<String>>,
    /// Service → the workloads its slices hold.
    held: HashMap<ObjectRef, HashSet<String>>,
}

impl Index {
    fn services_for(&self, w: &Object<Workload>) -> Vec<ObjectRef> {
        let ns = &w.metadata.namespace;
        let mut out: HashSet<&str> = HashSet::new();
        if let Some(pairs) = self.by_pair.get(ns) {
            for (k, v) in w.metadata.labels.iter() {
                let Some(candidates) = pairs.get(&format!("{k}={v}")) else { continue };
                for name in candidates {
                    let selector = self.selectors.get(&ObjectRef::new(ns.clone(), name.clone()));
                    if selector.is_some_and(|sel| {
                        sel.iter().all(|(k, v)| w.metadata.labels.get(k).is_some_and(|have| have == v))
                    }) {
                        out.insert(name);
                    }
                }
            }
        }
        if let Some(held) = self.members.get(&ObjectRef::of(w)) {
            out.extend(held.iter().map(String::as_str));
        }
        out.into_iter().map(|s| ObjectRef::new(ns.clone(), s)).collect()
    }

    fn update(&mut self, service: &ObjectRef, selector: &BTreeMap<String, String>, workloads: HashSet<String>) {
        if self.selectors.get(service) != Some(selector) {
            let pairs = self.by_pair.entry(service.namespace.clone()).or_default();
            if let Some(old) = self.selectors.insert(service.clone(), selector.clone()) {
                for (k, v) in old {
                    if let Some(set) = pairs.get_mut(&format!("{k}={v}")) {
                        set.remove(&service.name);
                    }
                }
            }
            for (k, v) in selector {
                pairs.entry(format!("{k}={v}")).or_default().insert(service.name.clone());
            }
        }
        let before = self.held.remove(service).unwrap_or_default();
        for gone in before.difference(&workloads) {
            let key = ObjectRef::new(service.namespace.clone(), gone.clone());
            if let Some(set) = self.members.get_mut(&key) {
                set.remove(&service.name);
                if set.is_empty() {
                    self.members.remove(&key);
                }
            }
        }
        for added in workloads.difference(&before) {
            let key = ObjectRef::new(service.namespace.clone(), added.clone());
            self.members.entry(key).or_default().insert(service.name.clone());
        }
        self.held.insert(service.clone(), workloads);
    }
}

/// The controller (register it with [`EndpointsController::builder`]).
#[derive(Debug)]
pub struct EndpointsController {
    config: EndpointsConfig,
    gate: WriteGate,
    allocations: Mutex<Allocations>,
    index: Arc<Mutex<Index>>,
}

impl EndpointsController {
    /// The controller wired to its triggers: services, the slices they own, and workloads (a
    /// workload's change reconciles the services that select it or hold it).
    pub fn builder(config: EndpointsConfig) -> ControllerBuilder<EndpointsController> {
        let index: Arc<Mutex<Index>> = Default::default();
        let lookup = index.clone();
        ControllerBuilder::new(
            "endpoints",
            EndpointsController { config, gate: WriteGate::default(), allocations: Default::default(), index },
        )
        .owns::<EndpointSlice>()
        .watches::<Workload>(move |w| lookup.lock().unwrap_or_else(|e| e.into_inner()).services_for(w))
    }
}

fn holder_of(svc: &Object<Service>) -> Holder {
    Holder { namespace: svc.metadata.namespace.clone(), name: svc.metadata.name.clone(), uid: svc.metadata.uid.clone() }
}

/// What allocating a service's address and node ports came to.
struct Allocated {
    address: Option<String>,
    node_ports: BTreeMap<String, u32>,
    problem: Option<(&'static str, String)>,
}

impl EndpointsController {
    fn allocate(&self, svc: &Object<Service>, ctx: &Context) -> Allocated {
        let services = ctx.cache::<Service>().expect("the controller's own kind");
        let alive = |h: &Holder| {
            services.get(&ObjectRef::new(h.namespace.clone(), h.name.clone())).is_some_and(|s| s.metadata.uid == h.uid)
        };
        let mut all = self.allocations.lock().unwrap_or_else(|e| e.into_inner());
        if !all.loaded {
            let mut existing = services.list();
            existing.sort_by_key(|s| s.metadata.create_revision);
            for s in existing {
                all.adopt(&holder_of(&s), s.status.cluster_address.as_deref(), &s.status.node_ports);
            }
            all.loaded = true;
        }
        let holder = holder_of(svc);
        let mut problem = None;
        let address = if svc.spec.headless {
            None
        } else {
            match all.address(&holder, svc.status.cluster_address.as_deref(), &self.config.cluster_range, &alive) {
                Ok((a, conflict)) => {
                    problem = conflict.map(|c| (c.reason, c.message));
                    Some(a)
                }
                Err(c) => {
                    problem = Some((c.reason, c.message));
                    None
                }
            }
        };
        let mut node_ports = BTreeMap::new();
        if svc.spec.type_ == ServiceType::NodePort {
            for p in &svc.spec.ports {
                let had = svc.status.node_ports.get(&p.name).copied();
                match all.node_port(&holder, p.node_port, had, &self.config.node_port_range, &alive) {
                    Ok(port) => {
                        node_ports.insert(p.name.clone(), u32::from(port));
                    }
                    Err(c) => {
                        let which = if p.name.is_empty() { format!("port {}", p.port) } else { p.name.clone() };
                        problem = Some((c.reason, format!("{which}: {}", c.message)));
                    }
                }
            }
        }
        let kept: Vec<u16> = node_ports.values().filter_map(|p| u16::try_from(*p).ok()).collect();
        all.release_except(&holder, address, &kept);
        Allocated { address: address.map(|a| a.to_string()), node_ports, problem }
    }
}

#[async_trait::async_trait]
impl Controller for EndpointsController {
    type Kind = Service;
    type Error = Error;

    async fn reconcile(&self, svc: Arc<Object<Service>>, ctx: &Context) -> Result<Action, Error> {
        let key = ObjectRef::of(&svc);
        if svc.metadata.is_being_deleted() {
            // Its slices go with it (owner references).
            self.gate.forget(&key);
            return Ok(Action::Done);
        }
        let slices = ctx.cache::<EndpointSlice>().expect("registered by the builder");
        let workloads = ctx.cache::<Workload>().expect("registered by the builder");
        if !self.gate.caught_up(&key, slices.revision()) {
            return Ok(Action::RequeueAfter(Duration::from_millis(20)));
        }
        let allocated = self.allocate(&svc, ctx);
        let now = ctx.clock().now();
        let mut status = ServiceStatus {
            observed_generation: svc.metadata.generation,
            cluster_address: allocated.address,
            node_ports: allocated.node_ports,
            conditions: svc.status.conditions.clone(),
            ..Default::default()
        };
        let ports = match allocated.problem {
            None => Condition::new("PortsAllocated", ConditionStatus::True, "Allocated"),
            Some((reason, message)) => {
                Condition { message, ..Condition::new("PortsAllocated", ConditionStatus::False, reason) }
            }
        };
        set_condition(&mut status.conditions, ports, now);

        let ns = &svc.metadata.namespace;
        let mut workloads_held = HashSet::new();
        // This controller's slices: those whose controller owner is the service (an
        // application's slices of a selector-less service must not name it as controller).
        let mut existing: Vec<Arc<Object<EndpointSlice>>> = slices
            .owned_by(&svc.metadata.uid)
            .into_iter()
            .filter(|s| s.metadata.controller_owner().is_some_and(|o| o.uid == svc.metadata.uid))
            .collect();
        existing.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        if svc.spec.selector.is_empty() {
            // The selector went away: the slices this controller wrote for it go too (stale
            // endpoints must leave the proxies and DNS); the application's slices stay.
            let plan = slices::SlicePlan {
                delete: existing.iter().map(|s| s.metadata.name.clone()).collect(),
                ..Default::default()
            };
            let written = self.apply(&svc, &existing, plan, ctx).await;
            if written.is_err() {
                // A workload leaving must still find this service until its slices are gone.
                workloads_held
                    .extend(existing.iter().flat_map(|s| s.spec.endpoints.iter().map(|e| e.workload.clone())));
            }
            self.index.lock().unwrap_or_else(|e| e.into_inner()).update(&key, &svc.spec.selector, workloads_held);
            written?;
            set_condition(
                &mut status.conditions,
                Condition {
                    message: "the service has no selector: its endpoint slices are kept by its application".into(),
                    ..Condition::new("EndpointsReady", ConditionStatus::Unknown, "NoSelector")
                },
                now,
            );
        } else {
            // The candidates: the workloads carrying the selector's rarest label (the cache's
            // label index), not every workload of the cluster.
            let candidates = svc
                .spec
                .selector
                .iter()
                .map(|(k, v)| workloads.by_index(orch_core::cache::LABEL_INDEX, &format!("{k}={v}")))
                .min_by_key(Vec::len)
                .unwrap_or_default();
            let selected =
                slices::select(&svc.spec, candidates.iter().filter(|w| &w.metadata.namespace == ns).map(|w| &**w));
            let current: Vec<(String, Vec<_>)> =
                existing.iter().map(|s| (s.metadata.name.clone(), s.spec.endpoints.clone())).collect();
            let plan = slices::plan(&current, selected.endpoints.clone(), self.config.endpoints_per_slice);
            let written = self.apply(&svc, &existing, plan, ctx).await;
            // The index learns of the slices' workloads even when a write failed: a workload
            // leaving later must still find this service.
            workloads_held.extend(current.iter().flat_map(|(_, e)| e.iter().map(|e| e.workload.clone())));
            workloads_held.extend(selected.endpoints.iter().map(|e| e.workload.clone()));
            self.index.lock().unwrap_or_else(|e| e.into_inner()).update(&key, &svc.spec.selector, workloads_held);
            written?;
            status.endpoints = selected.endpoints.len() as u32;
            status.ready_endpoints = selected.endpoints.iter().filter(|e| e.conditions.ready).count() as u32;
            let selector = svc.spec.selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
            let endpoints = if selected.matched == 0 {
                Condition {
                    message: format!("no workload in namespace {ns} carries {selector}"),
                    ..Condition::new("EndpointsReady", ConditionStatus::False, "NoMatchingWorkloads")
                }
            } else if !selected.missing_ports.is_empty() {
                let list: Vec<String> =
                    selected.missing_ports.iter().take(5).map(|(w, p)| format!("{w} has no port {p}")).collect();
                let more = selected.missing_ports.len().saturating_sub(5);
                let more = if more > 0 { format!(" (and {more} more)") } else { String::new() };
                Condition {
                    message: format!("left out: {}{more}", list.join(", ")),
                    ..Condition::new("EndpointsReady", ConditionStatus::False, "PortNotFound")
                }
            } else if status.ready_endpoints == 0 {
                Condition {
                    message: format!("{} workloads match, none is ready", selected.matched),
                    ..Condition::new("EndpointsReady", ConditionStatus::False, "NoReadyEndpoints")
                }
            } else {
                Condition::new("EndpointsReady", ConditionStatus::True, "EndpointsFound")
            };
            set_condition(&mut status.conditions, endpoints, now);
        }
        if status != svc.status {
            match ctx.api::<Service>(ns).write_status(&svc.metadata, &status).await {
                Ok(_) => {}
                // A newer version is on its way: its event reconciles again.
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Action::Done)
    }
}

impl EndpointsController {
    /// Writes a slice plan; notes the last write's revision for the gate.
    async fn apply(
        &self,
        svc: &Object<Service>,
        existing: &[Arc<Object<EndpointSlice>>],
        plan: slices::SlicePlan,
        ctx: &Context,
    ) -> Result<(), Error> {
        if plan.is_empty() {
            return Ok(());
        }
        let key = ObjectRef::of(svc);
        let api = ctx.api::<EndpointSlice>(&svc.metadata.namespace);
        let mut last = 0u64;
        let result = async {
            for (name, endpoints) in plan.update {
                let Some(old) = existing.iter().find(|s| s.metadata.name == name) else { continue };
                let mut slice = (**old).clone();
                slice.spec.endpoints = endpoints;
                let written = api.replace(&slice).await?;
                last = last.max(written.metadata.resource_version);
            }
            for endpoints in plan.create {
                let mut meta = ObjectMeta::namespaced(
                    svc.metadata.namespace.clone(),
                    format!("{}-{}", name_prefix(&svc.metadata.name, 240), random_suffix(5)),
                );
                meta.labels.insert(SERVICE_NAME_LABEL, svc.metadata.name.clone());
                meta.owner_references = vec![svc.controller_ref()];
                let slice = Object::new(meta, EndpointSlice { service: svc.metadata.name.clone(), endpoints });
                let written = api.create(&slice).await?;
                last = last.max(written.metadata.resource_version);
            }
            for name in plan.delete {
                match api.delete(&name, &DeleteOptions::default()).await {
                    Ok(orch_core::api::Deleted::Gone(o) | orch_core::api::Deleted::Pending(o)) => {
                        last = last.max(o.metadata.resource_version)
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
        .await;
        self.gate.wrote(&key, last);
        result
    }
}
