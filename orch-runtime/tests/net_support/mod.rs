//! Shared by the service-traffic tests: a memory store with Service and EndpointSlice objects
//! written straight into it (as the endpoints controller would), and a resolver over it.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use orch_core::kinds::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, SERVICE_NAME_LABEL, Service, ServicePort,
    ServiceType,
};
use orch_core::{Api, DeleteOptions, Object, ObjectMeta, Store};
use orch_runtime::net::Resolver;
use orch_store::MemoryStore;

pub const NS: &str = "default";

/// Longest wait for anything in these tests.
pub const LIMIT: Duration = Duration::from_secs(10);

pub struct Cluster {
    pub store: Arc<dyn Store>,
    pub services: Api<Service>,
    pub slices: Api<EndpointSlice>,
    pub resolver: Resolver,
}

impl Cluster {
    pub async fn new() -> Self {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let resolver = Resolver::from_store(store.clone());
        resolver.ready().await;
        Cluster {
            services: Api::namespaced(store.clone(), NS),
            slices: Api::namespaced(store.clone(), NS),
            store,
            resolver,
        }
    }

    /// Creates a service with its status as the endpoints controller would write it.
    pub async fn service(&self, name: &str, spec: Service, cluster_address: Option<&str>) -> Object<Service> {
        let created = self.services.create(&Object::new(ObjectMeta::namespaced(NS, name), spec.clone())).await.unwrap();
        let mut with_status = created.clone();
        with_status.status.cluster_address = cluster_address.map(str::to_string);
        if spec.type_ == ServiceType::NodePort {
            for p in &spec.ports {
                if let Some(np) = p.node_port {
                    with_status.status.node_ports.insert(p.name.clone(), np);
                }
            }
        }
        self.services.replace_status(&with_status).await.unwrap()
    }

    /// Creates or replaces one slice of `service`.
    pub async fn slice(&self, service: &str, slice: &str, endpoints: Vec<Endpoint>) {
        let spec = EndpointSlice { service: service.into(), endpoints };
        match self.slices.get_opt(slice).await.unwrap() {
            Some(mut cur) => {
                cur.spec = spec;
                self.slices.replace(&cur).await.unwrap();
            }
            None => {
                let meta = ObjectMeta::namespaced(NS, slice).with_label(SERVICE_NAME_LABEL, service);
                self.slices.create(&Object::new(meta, spec)).await.unwrap();
            }
        }
    }

    pub async fn delete_slice(&self, slice: &str) {
        self.slices.delete(slice, &DeleteOptions::default()).await.unwrap();
    }

    pub async fn delete_service(&self, name: &str) {
        self.services.delete(name, &DeleteOptions::default()).await.unwrap();
    }
}

/// A service with one TCP port per `(name, port)`.
pub fn service_spec(ports: &[(&str, u16)]) -> Service {
    Service {
        ports: ports
            .iter()
            .map(|(n, p)| ServicePort { name: n.to_string(), port: u32::from(*p), ..Default::default() })
            .collect(),
        ..Default::default()
    }
}

/// An endpoint at `addr` serving each `(port name, port)`.
pub fn endpoint(addr: &str, ports: &[(&str, u16)], ready: bool) -> Endpoint {
    endpoint_with(addr, ports, Protocol::TCP, EndpointConditions { ready, serving: ready, terminating: false })
}

pub fn endpoint_with(
    addr: &str,
    ports: &[(&str, u16)],
    protocol: Protocol,
    conditions: EndpointConditions,
) -> Endpoint {
    Endpoint {
        addresses: vec![addr.to_string()],
        ports: ports.iter().map(|(n, p)| EndpointPort { name: n.to_string(), port: u32::from(*p), protocol }).collect(),
        workload: format!("w-{}", addr.replace(['.', ':'], "-")),
        conditions,
        ..Default::default()
    }
}
