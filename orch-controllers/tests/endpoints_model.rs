//! A model check of the endpoints controller's slicing: for any sequence of workload adds,
//! removals, relabellings and readiness changes, after each reconcile every matching workload
//! with the port is in exactly one slice with its current state, no slice exceeds the bound, no
//! endpoint of a non-matching or removed workload remains, and no slice is written without a
//! change.

use std::collections::BTreeMap;

use orch_controllers::endpoints::slices::{plan, select};
use orch_core::kinds::{
    Condition, ConditionStatus, Endpoint, Phase, PortStatus, Service, ServicePort, Workload, set_condition,
};
use orch_core::{Object, ObjectMeta, Timestamp};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Add { id: u8, matching: bool, has_port: bool, ready: bool },
    Remove { id: u8 },
    Ready { id: u8, ready: bool },
    Relabel { id: u8, matching: bool },
    Terminate { id: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..24, any::<bool>(), prop::bool::weighted(0.8), any::<bool>())
            .prop_map(|(id, matching, has_port, ready)| Op::Add { id, matching, has_port, ready }),
        1 => (0u8..24).prop_map(|id| Op::Remove { id }),
        2 => (0u8..24, any::<bool>()).prop_map(|(id, ready)| Op::Ready { id, ready }),
        1 => (0u8..24, any::<bool>()).prop_map(|(id, matching)| Op::Relabel { id, matching }),
        1 => (0u8..24).prop_map(|id| Op::Terminate { id }),
    ]
}

fn workload(id: u8, matching: bool, has_port: bool, ready: bool) -> Object<Workload> {
    let meta =
        ObjectMeta::namespaced("default", format!("w-{id}")).with_label("app", if matching { "web" } else { "db" });
    let mut w = Object::new(meta, Workload::command("main", &["serve"]));
    w.spec.node_name = Some("n".into());
    w.status.phase = Phase::Running;
    w.status.address = "127.0.0.1".into();
    w.status.ports = vec![PortStatus {
        container: "main".into(),
        name: Some(if has_port { "http" } else { "other" }.into()),
        container_port: 8080,
        host_port: 20000 + u32::from(id),
        ..Default::default()
    }];
    set_ready(&mut w, ready);
    w
}

fn set_ready(w: &mut Object<Workload>, ready: bool) {
    let s = if ready { ConditionStatus::True } else { ConditionStatus::False };
    set_condition(&mut w.status.conditions, Condition::new("Ready", s, "Test"), Timestamp(1));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn every_matching_workload_is_in_exactly_one_bounded_slice(ops in prop::collection::vec(op(), 1..60), max in 1usize..5) {
        let svc = Service::selecting(&[("app", "web")], vec![ServicePort::to_named(80, "http")]);
        let mut workloads: BTreeMap<u8, Object<Workload>> = BTreeMap::new();
        let mut slices: Vec<(String, Vec<Endpoint>)> = Vec::new();
        let mut next_slice = 0;
        for op in ops {
            match op {
                Op::Add { id, matching, has_port, ready } => {
                    workloads.entry(id).or_insert_with(|| workload(id, matching, has_port, ready));
                }
                Op::Remove { id } => {
                    workloads.remove(&id);
                }
                Op::Ready { id, ready } => {
                    if let Some(w) = workloads.get_mut(&id) {
                        set_ready(w, ready);
                    }
                }
                Op::Relabel { id, matching } => {
                    if let Some(w) = workloads.get_mut(&id) {
                        w.metadata.labels.insert("app", if matching { "web" } else { "db" });
                    }
                }
                Op::Terminate { id } => {
                    if let Some(w) = workloads.get_mut(&id) {
                        w.metadata.deletion_timestamp = Some(Timestamp(5));
                    }
                }
            }
            // One reconcile.
            let selected = select(&svc, workloads.values());
            let p = plan(&slices, selected.endpoints.clone(), max);
            for (name, endpoints) in p.update {
                let slot = slices.iter_mut().find(|(n, _)| *n == name).expect("updates an existing slice");
                prop_assert_ne!(&slot.1, &endpoints, "a slice written without a change");
                slot.1 = endpoints;
            }
            slices.retain(|(n, _)| !p.delete.contains(n));
            for endpoints in p.create {
                slices.push((format!("s-{next_slice}"), endpoints));
                next_slice += 1;
            }
            // The invariants.
            let mut seen: BTreeMap<String, Endpoint> = BTreeMap::new();
            for (name, endpoints) in &slices {
                prop_assert!(!endpoints.is_empty(), "empty slice {} kept", name);
                prop_assert!(endpoints.len() <= max, "slice {} holds {} > {}", name, endpoints.len(), max);
                for e in endpoints {
                    prop_assert!(seen.insert(e.workload.clone(), e.clone()).is_none(), "{} in two slices", e.workload);
                }
            }
            for w in workloads.values() {
                let name = &w.metadata.name;
                let matching = w.metadata.labels.get("app").is_some_and(|v| v == "web");
                let has_port = w.status.ports[0].name.as_deref() == Some("http");
                match seen.get(name) {
                    Some(e) => {
                        prop_assert!(matching && has_port, "{} is listed but does not match or lacks the port", name);
                        let ready = w.status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True);
                        let terminating = w.metadata.deletion_timestamp.is_some();
                        prop_assert_eq!(e.conditions.serving, ready);
                        prop_assert_eq!(e.conditions.ready, ready && !terminating);
                        prop_assert_eq!(e.conditions.terminating, terminating);
                        prop_assert_eq!(e.ports[0].port, w.status.ports[0].host_port);
                    }
                    None => prop_assert!(!(matching && has_port), "{} matches with the port but is missing", name),
                }
            }
            for name in seen.keys() {
                prop_assert!(workloads.values().any(|w| &w.metadata.name == name), "{} was removed but remains", name);
            }
        }
    }
}
