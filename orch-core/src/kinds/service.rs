//! [`Service`]: a stable name and port in front of the workloads its selector picks, and
//! [`EndpointSlice`]: where those workloads can be reached, kept by the endpoints controller in
//! slices of bounded size.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{Condition, Protocol, validate_conditions};
use crate::object::{Resource, Scope};
use crate::validation::{self, Validator};

/// The label every endpoint slice carries: the name of its service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "orch.dev/service-name";

/// The most endpoints one slice holds unless its controller is told otherwise.
pub const DEFAULT_ENDPOINTS_PER_SLICE: usize = 100;

/// How a service is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceType {
    /// From inside the cluster: at its cluster address (one per service, served by the node
    /// proxy on every node) and by DNS name.
    #[default]
    ClusterInternal,
    /// Also on every node's addresses at a node port (from the node-port range, or fixed by
    /// `ports[].nodePort`).
    NodePort,
}

/// The port a service forwards to on each endpoint: a number, or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortTarget {
    /// The container port with this number.
    Number(u32),
    /// The container port with this name (`ports[].name` in the workload's containers).
    Name(String),
}

/// One port of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServicePort {
    /// Required when the service has more than one port; a DNS-1123 label. DNS SRV records and
    /// endpoint ports are named by it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The port clients connect to (on the service's cluster address), 1-65535.
    pub port: u32,
    /// Where traffic goes on each endpoint; defaults to `port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<PortTarget>,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// For `NodePort` services: the port on every node (allocated when unset; when set, it must
    /// lie in the endpoints controller's node-port range, or `PortsAllocated` is false with
    /// `NodePortOutOfRange`). Refused on other types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u32>,
}

impl ServicePort {
    /// The port clients use for `port`, forwarding to the same port number on each endpoint.
    pub fn tcp(port: u32) -> Self {
        ServicePort { port, ..Default::default() }
    }

    /// The port clients use for `port`, forwarding to each endpoint's container port named
    /// `target` (whatever number it has there).
    pub fn to_named(port: u32, target: &str) -> Self {
        ServicePort { port, target_port: Some(PortTarget::Name(target.into())), ..Default::default() }
    }

    /// The target, with the default (`port`) applied.
    pub fn target(&self) -> PortTarget {
        self.target_port.clone().unwrap_or(PortTarget::Number(self.port))
    }
}

/// A name and ports in front of the workloads whose labels match `selector`. Clients find it by
/// DNS (`<name>.<namespace>.svc.<cluster domain>`), through the in-process resolver, or at its
/// cluster address; only ready workloads get traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Service {
    /// Labels a workload must carry (all of them) to be an endpoint. Empty: the service has no
    /// endpoints kept for it (the application manages its slices itself).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Its ports; at least one unless headless.
    pub ports: Vec<ServicePort>,
    /// How it is reached.
    #[serde(rename = "type")]
    pub type_: ServiceType,
    /// No cluster address and no proxying: DNS answers with every ready endpoint's address.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub headless: bool,
    /// Also publish endpoints that are not ready (for peers that must find each other before
    /// they are ready, as a stateful set's members do).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub publish_not_ready: bool,
}

impl Service {
    /// A cluster-internal service with `ports` in front of the workloads carrying every label of
    /// `selector`.
    pub fn selecting(selector: &[(&str, &str)], ports: Vec<ServicePort>) -> Self {
        Service {
            selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ports,
            ..Default::default()
        }
    }
}

/// What the endpoints controller observes about a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceStatus {
    /// The generation of the spec this status reflects.
    pub observed_generation: u64,
    /// The address the node proxies serve it on (none for a headless service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_address: Option<String>,
    /// The node port of each port, by port name (for `NodePort` services).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_ports: BTreeMap<String, u32>,
    /// Endpoints that are ready.
    pub ready_endpoints: u32,
    /// All endpoints, ready or not.
    pub endpoints: u32,
    /// `EndpointsReady` (with `NoMatchingWorkloads`, `PortNotFound`…) and `PortsAllocated`
    /// (with `NodePortConflict`…).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl Resource for Service {
    const KIND: &'static str = "Service";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = ServiceStatus;

    fn validate(&self, v: &mut Validator) {
        for (k, val) in &self.selector {
            v.check_with(|| format!("spec.selector.{k}"), validation::qualified_name(k));
            v.check_with(|| format!("spec.selector.{k}"), validation::label_value(val));
        }
        if self.ports.is_empty() && !self.headless {
            v.reject("spec.ports", "must name at least one port (only a headless service may have none)");
        }
        let mut names = HashSet::new();
        let mut numbers = HashSet::new();
        let mut node_ports = HashSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            let f = |s: &str| format!("spec.ports[{i}].{s}");
            if self.ports.len() > 1 && p.name.is_empty() {
                v.reject(f("name"), "required when a service has more than one port");
            }
            if !p.name.is_empty() {
                v.check_with(|| f("name"), validation::dns1123_label(&p.name));
                if !names.insert(p.name.as_str()) {
                    v.reject(f("name"), format!("duplicate port name {:?}", p.name));
                }
            }
            if !(1..=65535).contains(&p.port) {
                v.reject(f("port"), format!("must be 1-65535 (is {})", p.port));
            } else if !numbers.insert((p.port, p.protocol)) {
                v.reject(f("port"), format!("duplicate {:?} port {}", p.protocol, p.port));
            }
            match &p.target_port {
                Some(PortTarget::Number(n)) if !(1..=65535).contains(n) => {
                    v.reject(f("targetPort"), format!("must be 1-65535 or a port name (is {n})"))
                }
                Some(PortTarget::Name(n)) => v.check_with(|| f("targetPort"), validation::dns1123_label(n)),
                _ => {}
            }
            if let Some(np) = p.node_port {
                if self.type_ != ServiceType::NodePort {
                    v.reject(f("nodePort"), "only a NodePort service has node ports");
                } else if !(1..=65535).contains(&np) {
                    v.reject(f("nodePort"), format!("must be 1-65535 (is {np})"));
                } else if !node_ports.insert((np, p.protocol)) {
                    v.reject(f("nodePort"), format!("duplicate node port {np}"));
                }
            }
        }
        if self.headless && self.type_ == ServiceType::NodePort {
            v.reject("spec.headless", "a headless service has no proxy, so it cannot be a NodePort service");
        }
    }

    fn validate_status(status: &ServiceStatus, v: &mut Validator) {
        if let Some(a) = &status.cluster_address
            && a.parse::<std::net::IpAddr>().is_err()
        {
            v.reject("status.clusterAddress", format!("{a:?} is not an IP address"));
        }
        validate_conditions("status.conditions", &status.conditions, v);
    }
}

/// An endpoint's state, as a proxy uses it: new connections go to endpoints that are `ready`;
/// `serving` and `terminating` say why one that is not ready still exists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointConditions {
    /// Passing its readiness probe and not terminating: gets new traffic.
    pub ready: bool,
    /// Passing its readiness probe (terminating or not).
    pub serving: bool,
    /// Being stopped: takes no new traffic; open connections may finish.
    pub terminating: bool,
}

/// Where one service port is reached on one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointPort {
    /// The service port's name (empty for a service's only, unnamed port).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The port to dial at the endpoint's address, 1-65535.
    pub port: u32,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// One workload behind a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Endpoint {
    /// Its IP addresses (the node's, for workloads that share the node's network).
    pub addresses: Vec<String>,
    /// Where each service port is reached on it. Ports are per endpoint, not per slice: a
    /// workload sharing its node's network gets its own host ports.
    pub ports: Vec<EndpointPort>,
    /// A DNS label for it: a headless service answers `<hostname>.<service>.<namespace>.svc…`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// The node it runs on.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node_name: String,
    /// The workload's name (same namespace).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub workload: String,
    /// Whether it takes traffic.
    pub conditions: EndpointConditions,
}

/// Part of the endpoints of one service (at most a bounded number, so a big service does not
/// rewrite one huge object on every change). Labelled with [`SERVICE_NAME_LABEL`] and owned by
/// its service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointSlice {
    /// The service it belongs to, in the same namespace.
    pub service: String,
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
}

impl Resource for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = ();

    fn validate(&self, v: &mut Validator) {
        v.check_with(|| "spec.service".into(), validation::dns1123_label(&self.service));
        for (i, e) in self.endpoints.iter().enumerate() {
            if e.addresses.is_empty() {
                v.reject(format!("spec.endpoints[{i}].addresses"), "must hold at least one address");
            }
            for (j, a) in e.addresses.iter().enumerate() {
                if a.parse::<std::net::IpAddr>().is_err() {
                    v.reject(format!("spec.endpoints[{i}].addresses[{j}]"), format!("{a:?} is not an IP address"));
                }
            }
            for (j, p) in e.ports.iter().enumerate() {
                if !(1..=65535).contains(&p.port) {
                    v.reject(
                        format!("spec.endpoints[{i}].ports[{j}].port"),
                        format!("must be 1-65535 (is {})", p.port),
                    );
                }
            }
            if !e.hostname.is_empty() {
                v.check_with(|| format!("spec.endpoints[{i}].hostname"), validation::dns1123_label(&e.hostname));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::ObjectMeta;
    use crate::object::Object;

    fn invalid_fields<K: Resource>(spec: K) -> crate::validation::ValidationError {
        let err = Object::new(ObjectMeta::namespaced("default", "web"), spec).validate().unwrap_err();
        let crate::Error::Invalid { source, .. } = err else { panic!("{err}") };
        source
    }

    #[test]
    fn service_validation_names_each_bad_field() {
        let svc = Service {
            selector: [("app".to_string(), "web server".to_string())].into(),
            ports: vec![
                ServicePort { port: 0, ..Default::default() },
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: Some(PortTarget::Name("Not_A_Label".into())),
                    node_port: Some(30080),
                    ..Default::default()
                },
                ServicePort { name: "http".into(), port: 80, ..Default::default() },
            ],
            ..Default::default()
        };
        let e = invalid_fields(svc);
        for f in [
            "spec.selector.app",
            "spec.ports[0].name",
            "spec.ports[0].port",
            "spec.ports[1].targetPort",
            "spec.ports[1].nodePort",
            "spec.ports[2].name",
            "spec.ports[2].port",
        ] {
            assert!(e.has_field(f), "missing {f} in {e}");
        }
    }

    #[test]
    fn a_service_needs_ports_unless_headless() {
        assert!(invalid_fields(Service::default()).has_field("spec.ports"));
        let headless = Service { headless: true, ..Default::default() };
        Object::new(ObjectMeta::namespaced("default", "db"), headless).validate().unwrap();
    }

    #[test]
    fn target_port_reads_a_number_or_a_name() {
        let p: ServicePort = serde_json::from_str(r#"{"port":80,"targetPort":8080}"#).unwrap();
        assert_eq!(p.target(), PortTarget::Number(8080));
        let p: ServicePort = serde_json::from_str(r#"{"port":80,"targetPort":"http"}"#).unwrap();
        assert_eq!(p.target(), PortTarget::Name("http".into()));
        let p: ServicePort = serde_json::from_str(r#"{"port":80}"#).unwrap();
        assert_eq!(p.target(), PortTarget::Number(80));
    }

    #[test]
    fn endpoint_slice_validation_names_each_bad_field() {
        let slice = EndpointSlice {
            service: "Web".into(),
            endpoints: vec![
                Endpoint { addresses: vec!["10.0.0.300".into()], ..Default::default() },
                Endpoint {
                    addresses: vec![],
                    ports: vec![EndpointPort { port: 70000, ..Default::default() }],
                    hostname: "a.b".into(),
                    ..Default::default()
                },
            ],
        };
        let e = invalid_fields(slice);
        for f in [
            "spec.service",
            "spec.endpoints[0].addresses[0]",
            "spec.endpoints[1].addresses",
            "spec.endpoints[1].ports[0].port",
            "spec.endpoints[1].hostname",
        ] {
            assert!(e.has_field(f), "missing {f} in {e}");
        }
    }
}
