//! The pure half of the endpoints controller: which workloads are a service's endpoints (and
//! where each port is reached on them), and how to lay them into slices of bounded size with as
//! few writes as possible. No store, no clock: the property tests drive these directly.

use std::collections::{HashMap, HashSet};

use orch_core::kinds::{
    ConditionStatus, Endpoint, EndpointConditions, EndpointPort, Phase, PortTarget, Service, Workload, find_condition,
};
use orch_core::object::Object;
use orch_core::validation;

/// What selecting a service's endpoints found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Selected {
    /// The endpoints, one per workload, in workload-name order.
    pub endpoints: Vec<Endpoint>,
    /// Workloads the selector matched (running on a node with an address or not).
    pub matched: usize,
    /// Matching workloads that lack one of the service's target ports, each with the port
    /// (service port name or number) it lacks.
    pub missing_ports: Vec<(String, String)>,
}

/// True when `w` carries every label of the service's selector (same namespace is the caller's
/// business).
pub fn selects(service: &Service, w: &Object<Workload>) -> bool {
    !service.selector.is_empty()
        && service.selector.iter().all(|(k, v)| w.metadata.labels.get(k).is_some_and(|have| have == v))
}

fn is_ready(w: &Object<Workload>) -> bool {
    w.status.phase == Phase::Running
        && find_condition(&w.status.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
}

/// The endpoint of workload `w` for `service`: `None` when it has no address yet (not running
/// on a node) or finished; `Err(port)` naming a service port it does not have.
pub fn endpoint(service: &Service, w: &Object<Workload>) -> Option<Result<Endpoint, String>> {
    if w.status.address.is_empty() || matches!(w.status.phase, Phase::Succeeded | Phase::Failed) {
        return None;
    }
    let mut ports = Vec::with_capacity(service.ports.len());
    for p in &service.ports {
        let found = w.status.ports.iter().find(|s| {
            s.protocol == p.protocol
                && match p.target() {
                    PortTarget::Number(n) => s.container_port == n,
                    PortTarget::Name(ref name) => s.name.as_deref() == Some(name.as_str()),
                }
        });
        match found {
            Some(s) => ports.push(EndpointPort { name: p.name.clone(), port: s.host_port, protocol: p.protocol }),
            None => {
                let which = match p.target() {
                    PortTarget::Number(n) => n.to_string(),
                    PortTarget::Name(n) => n,
                };
                return Some(Err(which));
            }
        }
    }
    let terminating = w.metadata.is_being_deleted();
    let serving = is_ready(w);
    let ready = if service.publish_not_ready { !terminating } else { serving && !terminating };
    let name = &w.metadata.name;
    Some(Ok(Endpoint {
        addresses: vec![w.status.address.clone()],
        ports,
        hostname: if validation::dns1123_label(name).is_ok() { name.clone() } else { String::new() },
        node_name: w.spec.node_name.clone().unwrap_or_default(),
        workload: name.clone(),
        conditions: EndpointConditions { ready, serving, terminating },
    }))
}

/// The endpoints of `service` among `workloads` (all of its namespace, or more: other
/// namespaces are skipped by the caller).
pub fn select<'a>(service: &Service, workloads: impl IntoIterator<Item = &'a Object<Workload>>) -> Selected {
    let mut out = Selected::default();
    for w in workloads {
        if !selects(service, w) {
            continue;
        }
        out.matched += 1;
        match endpoint(service, w) {
            Some(Ok(e)) => out.endpoints.push(e),
            Some(Err(port)) => out.missing_ports.push((w.metadata.name.clone(), port)),
            None => {}
        }
    }
    out.endpoints.sort_by(|a, b| a.workload.cmp(&b.workload));
    out.missing_ports.sort();
    out
}

/// The writes that bring a service's slices to the wanted endpoints.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SlicePlan {
    /// Existing slices to rewrite with these endpoints (by slice name).
    pub update: Vec<(String, Vec<Endpoint>)>,
    /// New slices to create, each with these endpoints.
    pub create: Vec<Vec<Endpoint>>,
    /// Slices to delete (left empty).
    pub delete: Vec<String>,
}

impl SlicePlan {
    /// True when nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.update.is_empty() && self.create.is_empty() && self.delete.is_empty()
    }
}

/// Lays `wanted` (one endpoint per workload) into slices of at most `max` endpoints, starting
/// from `existing` (slice name and endpoints): an endpoint that did not change stays where it
/// is, a changed one is rewritten in place, so only the slices holding changes are written; new
/// endpoints fill slices that are written anyway first, then slices with room, then new slices;
/// slices left empty are deleted. A workload found in two slices (an interrupted earlier
/// write) is kept in the first.
pub fn plan(existing: &[(String, Vec<Endpoint>)], wanted: Vec<Endpoint>, max: usize) -> SlicePlan {
    let max = max.max(1);
    let mut wanted: HashMap<String, Endpoint> = wanted.into_iter().map(|e| (e.workload.clone(), e)).collect();
    let mut placed: HashSet<String> = HashSet::new();
    // Each slice's new content and whether it changed.
    let mut slices: Vec<(String, Vec<Endpoint>, bool)> = Vec::with_capacity(existing.len());
    for (name, endpoints) in existing {
        let mut kept = Vec::with_capacity(endpoints.len());
        let mut changed = false;
        for e in endpoints {
            match wanted.get(&e.workload) {
                Some(w) if !placed.contains(&e.workload) => {
                    if kept.len() >= max {
                        // Over the bound (it was lowered): moves elsewhere.
                        changed = true;
                        continue;
                    }
                    if w != e {
                        changed = true;
                    }
                    kept.push(w.clone());
                    placed.insert(e.workload.clone());
                }
                _ => changed = true,
            }
        }
        slices.push((name.clone(), kept, changed));
    }
    // What is left to place, in a stable order.
    let mut rest: Vec<Endpoint> = wanted.drain().filter(|(k, _)| !placed.contains(k)).map(|(_, e)| e).collect();
    rest.sort_by(|a, b| a.workload.cmp(&b.workload));
    let mut rest = rest.into_iter().peekable();
    // Slices written anyway first, then the others with room.
    for pass in [true, false] {
        for (_, endpoints, changed) in slices.iter_mut().filter(|s| s.2 == pass) {
            while endpoints.len() < max {
                let Some(e) = rest.next() else { break };
                endpoints.push(e);
                *changed = true;
            }
        }
    }
    let mut out = SlicePlan::default();
    for (name, endpoints, changed) in slices {
        if endpoints.is_empty() {
            out.delete.push(name);
        } else if changed {
            out.update.push((name, endpoints));
        }
    }
    let rest: Vec<Endpoint> = rest.collect();
    out.create = rest.chunks(max).map(<[Endpoint]>::to_vec).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, ready: bool) -> Endpoint {
        Endpoint {
            addresses: vec!["127.0.0.1".into()],
            workload: name.into(),
            conditions: EndpointConditions { ready, serving: ready, terminating: false },
            ..Default::default()
        }
    }

    #[test]
    fn only_the_slice_holding_a_change_is_written() {
        let existing = vec![
            ("s-a".to_string(), vec![ep("a", true), ep("b", true)]),
            ("s-b".to_string(), vec![ep("c", true), ep("d", true)]),
        ];
        let same = vec![ep("a", true), ep("b", true), ep("c", true), ep("d", true)];
        assert!(plan(&existing, same, 2).is_empty(), "unchanged endpoints write nothing");
        let one_change = vec![ep("a", true), ep("b", true), ep("c", false), ep("d", true)];
        let p = plan(&existing, one_change, 2);
        assert_eq!(p.update, vec![("s-b".to_string(), vec![ep("c", false), ep("d", true)])]);
        assert!(p.create.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn new_endpoints_fill_written_slices_then_slices_with_room_then_new_ones() {
        let existing = vec![
            ("s-a".to_string(), vec![ep("a", true), ep("b", true)]),
            ("s-b".to_string(), vec![ep("c", true)]),
            ("s-c".to_string(), vec![ep("d", true)]),
        ];
        // b leaves; e, f, g and h arrive.
        let wanted = ["a", "c", "d", "e", "f", "g", "h"].map(|n| ep(n, true)).to_vec();
        let p = plan(&existing, wanted, 2);
        assert_eq!(
            p.update,
            vec![
                ("s-a".to_string(), vec![ep("a", true), ep("e", true)]),
                ("s-b".to_string(), vec![ep("c", true), ep("f", true)]),
                ("s-c".to_string(), vec![ep("d", true), ep("g", true)]),
            ]
        );
        assert_eq!(p.create, vec![vec![ep("h", true)]]);
        // Everything leaves: the slices go.
        let p = plan(&existing, Vec::new(), 2);
        assert_eq!(p.delete, vec!["s-a".to_string(), "s-b".to_string(), "s-c".to_string()]);
    }

    #[test]
    fn a_workload_in_two_slices_is_kept_once_and_a_lowered_bound_splits_slices() {
        let existing = vec![
            ("s-a".to_string(), vec![ep("a", true), ep("b", true), ep("c", true)]),
            ("s-b".to_string(), vec![ep("a", true)]),
        ];
        let p = plan(&existing, vec![ep("a", true), ep("b", true), ep("c", true)], 2);
        assert_eq!(
            p.update,
            vec![("s-a".to_string(), vec![ep("a", true), ep("b", true)]), ("s-b".to_string(), vec![ep("c", true)]),]
        );
        assert!(p.delete.is_empty() && p.create.is_empty());
    }
}
