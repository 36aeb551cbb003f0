//! The endpoints controller on the memory store in virtual time. The workloads' statuses are
//! written by the test (as node agents would write them), so every address, port and readiness
//! is exact: endpoints follow workloads into bounded slices owned by their service, only the
//! slice holding a change is written, problems are conditions, and cluster addresses and node
//! ports are unique and survive a restart of the controller.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use orch_controllers::GarbageCollector;
use orch_controllers::endpoints::{AddressRange, EndpointsConfig, EndpointsController};
use orch_core::kinds::{
    Condition, ConditionStatus, EndpointSlice, Phase, PortStatus, PortTarget, SERVICE_NAME_LABEL, Service, ServicePort,
    ServiceType, Workload, find_condition, set_condition,
};
use orch_core::testkit::wait_until;
use orch_core::{Api, DeleteOptions, ListParams, Manager, Object, ObjectMeta, Store, Timestamp, TokioClock};
use orch_store::MemoryStore;

const LIMIT: Duration = Duration::from_secs(600);

struct Plane {
    store: Arc<dyn Store>,
    clock: Arc<TokioClock>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    manager: Option<tokio::task::JoinHandle<orch_core::Result<()>>>,
}

impl Plane {
    fn new() -> Plane {
        let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
        Plane { store, clock, stop: None, manager: None }
    }

    fn start(&mut self, config: EndpointsConfig) {
        let mut manager = Manager::new(self.store.clone()).with_clock(self.clock.clone());
        manager.add(EndpointsController::builder(config));
        manager.add(GarbageCollector::builtin());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.manager = Some(tokio::spawn(manager.run(async move {
            let _ = stopped.await;
        })));
        self.stop = Some(stop);
    }

    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(m) = self.manager.take() {
            m.await.unwrap().unwrap();
        }
    }

    fn workloads(&self) -> Api<Workload> {
        Api::namespaced(self.store.clone(), "default")
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.store.clone(), "default")
    }

    fn slices(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.store.clone(), "default")
    }

    /// A workload labelled `app=<app>` on `node`, running with its `http` port (container port
    /// 8080) at host port `host_port`, ready or not.
    async fn workload(&self, name: &str, app: &str, host_port: u32, ready: bool) {
        let mut w = Workload::command("main", &["serve"]);
        w.node_name = Some("node-1".into());
        let meta = ObjectMeta::named(name).with_label("app", app);
        let created = self.workloads().create(&Object::new(meta, w)).await.unwrap();
        let mut status = created.status.clone();
        status.phase = Phase::Running;
        status.address = "127.0.0.1".into();
        status.ports = vec![PortStatus {
            container: "main".into(),
            name: Some("http".into()),
            container_port: 8080,
            host_port,
            ..Default::default()
        }];
        let cond = if ready { ConditionStatus::True } else { ConditionStatus::False };
        set_condition(&mut status.conditions, Condition::new("Ready", cond, "Test"), Timestamp(1));
        self.workloads().write_status(&created.metadata, &status).await.unwrap();
    }

    async fn set_ready(&self, name: &str, ready: bool) {
        let w = self.workloads().get(name).await.unwrap();
        let mut status = w.status.clone();
        let cond = if ready { ConditionStatus::True } else { ConditionStatus::False };
        set_condition(&mut status.conditions, Condition::new("Ready", cond, "Test"), Timestamp(2));
        self.workloads().write_status(&w.metadata, &status).await.unwrap();
    }

    /// Every endpoint of `service` as (workload, ready, serving, terminating, port), sorted, and
    /// the slices' sizes.
    async fn endpoints(&self, service: &str) -> (Vec<(String, bool, bool, bool, u32)>, Vec<usize>) {
        let params =
            ListParams { labels: format!("{SERVICE_NAME_LABEL}={service}").parse().unwrap(), ..Default::default() };
        let slices = self.slices().list(&params).await.unwrap().items;
        let mut out: Vec<_> = slices
            .iter()
            .flat_map(|s| s.spec.endpoints.iter())
            .map(|e| {
                let c = e.conditions;
                (e.workload.clone(), c.ready, c.serving, c.terminating, e.ports.first().map_or(0, |p| p.port))
            })
            .collect();
        out.sort();
        (out, slices.iter().map(|s| s.spec.endpoints.len()).collect())
    }

    async fn condition(&self, service: &str, type_: &str) -> Option<Condition> {
        let s = self.services().get(service).await.unwrap();
        find_condition(&s.status.conditions, type_).cloned()
    }
}

fn web_service(selector: &str, target: PortTarget) -> Service {
    Service {
        selector: [("app".to_string(), selector.to_string())].into(),
        ports: vec![ServicePort { name: "http".into(), port: 80, target_port: Some(target), ..Default::default() }],
        ..Default::default()
    }
}

/// Counts the writes to endpoint slices, as a watch sees them.
fn count_slice_writes(store: Arc<dyn Store>) -> Arc<Mutex<Vec<String>>> {
    let seen: Arc<Mutex<Vec<String>>> = Default::default();
    let out = seen.clone();
    tokio::spawn(async move {
        let api: Api<EndpointSlice> = Api::namespaced(store, "default");
        let mut events = api.watch(&ListParams::default(), None).await.unwrap();
        while let Some(Ok(e)) = events.next().await {
            out.lock().unwrap().push(format!("{e:?}").chars().take(200).collect());
        }
    });
    seen
}

#[tokio::test(start_paused = true)]
async fn endpoints_follow_workloads_in_bounded_slices_and_only_changed_slices_are_written() {
    let mut plane = Plane::new();
    plane.start(EndpointsConfig { endpoints_per_slice: 2, ..Default::default() });
    for i in 0..5 {
        plane.workload(&format!("web-{i}"), "web", 20000 + i, true).await;
    }
    plane.workload("other", "db", 21000, true).await;
    let svc = plane
        .services()
        .create(&Object::new(ObjectMeta::named("web"), web_service("web", PortTarget::Name("http".into()))))
        .await
        .unwrap();

    let (eps, sizes) = wait_until("five endpoints", LIMIT, async || {
        let (eps, sizes) = plane.endpoints("web").await;
        (eps.len() == 5).then_some((eps, sizes))
    })
    .await;
    assert!(sizes.iter().all(|&n| n <= 2) && sizes.len() == 3, "slices of at most 2: {sizes:?}");
    assert_eq!(eps[0], ("web-0".to_string(), true, true, false, 20000), "the host port the workload listens on");
    assert!(eps.iter().all(|e| e.0 != "other"), "only matching workloads");
    let slices = plane.slices().list(&ListParams::default()).await.unwrap().items;
    for s in &slices {
        assert_eq!(s.metadata.controller_owner().map(|o| o.uid.as_str()), Some(svc.metadata.uid.as_str()));
        assert_eq!(s.spec.service, "web");
    }
    let status = wait_until("status", LIMIT, async || {
        let s = plane.services().get("web").await.unwrap();
        (s.status.endpoints == 5).then_some(s.status)
    })
    .await;
    assert_eq!(status.ready_endpoints, 5);
    let address: std::net::Ipv4Addr = status.cluster_address.as_deref().unwrap().parse().unwrap();
    assert_eq!(address.octets()[..2], [127, 64], "from the default cluster range");
    assert_eq!(find_condition(&status.conditions, "EndpointsReady").unwrap().status, ConditionStatus::True);

    // One workload turns unready: one slice write. A change nobody routes by (a restart count)
    // writes nothing; the next real change is the barrier that shows it.
    let writes = count_slice_writes(plane.store.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = writes.lock().unwrap().len();
    plane.set_ready("web-3", false).await;
    wait_until("web-3 unready", LIMIT, async || {
        plane.endpoints("web").await.0.iter().any(|e| e.0 == "web-3" && !e.1 && !e.2).then_some(())
    })
    .await;
    let w = plane.workloads().get("web-1").await.unwrap();
    let mut status = w.status.clone();
    status.restart_count = 7;
    plane.workloads().write_status(&w.metadata, &status).await.unwrap();
    plane.set_ready("web-3", true).await;
    wait_until("web-3 ready again", LIMIT, async || {
        plane.endpoints("web").await.0.iter().any(|e| e.0 == "web-3" && e.1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        writes.lock().unwrap().len() - before,
        2,
        "one write per readiness change: {:?}",
        writes.lock().unwrap()
    );

    // Terminating: out of ready, still serving, marked terminating (a finalizer holds it).
    let mut w = plane.workloads().get("web-4").await.unwrap();
    w.metadata.finalizers.push("test/hold".into());
    plane.workloads().replace(&w).await.unwrap();
    plane.workloads().delete("web-4", &DeleteOptions::default()).await.unwrap();
    wait_until("web-4 terminating", LIMIT, async || {
        plane
            .endpoints("web")
            .await
            .0
            .iter()
            .any(|e| *e == ("web-4".to_string(), false, true, true, 20004))
            .then_some(())
    })
    .await;
    // Relabelled away, or gone: out of the slices.
    let mut w = plane.workloads().get("web-0").await.unwrap();
    w.metadata.labels.insert("app", "old");
    plane.workloads().replace(&w).await.unwrap();
    plane.workloads().delete("web-1", &DeleteOptions::default()).await.unwrap();
    let (eps, _) = wait_until("web-0 and web-1 gone", LIMIT, async || {
        let (eps, sizes) = plane.endpoints("web").await;
        (eps.len() == 3).then_some((eps, sizes))
    })
    .await;
    assert_eq!(eps.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), vec!["web-2", "web-3", "web-4"]);

    // The service goes: its slices go with it.
    plane.services().delete("web", &DeleteOptions::default()).await.unwrap();
    wait_until("slices collected", LIMIT, async || {
        plane.slices().list(&ListParams::default()).await.unwrap().items.is_empty().then_some(())
    })
    .await;
    plane.stop().await;
}

#[tokio::test(start_paused = true)]
async fn problems_are_conditions_and_allocations_survive_a_restart() {
    let mut plane = Plane::new();
    let config = EndpointsConfig {
        cluster_range: AddressRange::parse("127.65.0.0/28").unwrap(),
        node_port_range: 31000..=31002,
        ..Default::default()
    };
    plane.start(config.clone());
    plane.workload("web-0", "web", 20000, true).await;

    // Selects nothing.
    plane
        .services()
        .create(&Object::new(ObjectMeta::named("nobody"), web_service("none", PortTarget::Number(8080))))
        .await
        .unwrap();
    // Targets a port the workload does not have (by name and by number).
    let mut missing = web_service("web", PortTarget::Name("admin".into()));
    missing.ports.push(ServicePort {
        name: "x".into(),
        port: 81,
        target_port: Some(PortTarget::Number(9999)),
        ..Default::default()
    });
    plane.services().create(&Object::new(ObjectMeta::named("missing"), missing)).await.unwrap();
    // Two node-port services asking for the same node port, and one taking any.
    let node_port = |fixed: Option<u32>| Service {
        type_: ServiceType::NodePort,
        ports: vec![ServicePort {
            port: 80,
            target_port: Some(PortTarget::Number(8080)),
            node_port: fixed,
            ..Default::default()
        }],
        ..web_service("web", PortTarget::Number(8080))
    };
    plane.services().create(&Object::new(ObjectMeta::named("np-a"), node_port(Some(31002)))).await.unwrap();
    plane.services().create(&Object::new(ObjectMeta::named("np-b"), node_port(Some(31002)))).await.unwrap();
    plane.services().create(&Object::new(ObjectMeta::named("np-c"), node_port(None))).await.unwrap();
    // A fixed node port outside the controller's range is refused, naming the range.
    plane.services().create(&Object::new(ObjectMeta::named("np-out"), node_port(Some(30080)))).await.unwrap();
    let headless = Service { headless: true, ..web_service("web", PortTarget::Number(8080)) };
    plane.services().create(&Object::new(ObjectMeta::named("headless"), headless)).await.unwrap();

    let c = wait_until("NoMatchingWorkloads", LIMIT, async || plane.condition("nobody", "EndpointsReady").await).await;
    assert_eq!((c.status, c.reason.as_str()), (ConditionStatus::False, "NoMatchingWorkloads"));
    assert!(c.message.contains("app=none"), "{}", c.message);
    let c = wait_until("PortNotFound", LIMIT, async || plane.condition("missing", "EndpointsReady").await).await;
    assert_eq!((c.status, c.reason.as_str()), (ConditionStatus::False, "PortNotFound"));
    assert!(c.message.contains("web-0 has no port admin"), "{}", c.message);
    assert!(plane.endpoints("missing").await.0.is_empty(), "a workload without the port is left out");
    let c = wait_until("np-out refused", LIMIT, async || plane.condition("np-out", "PortsAllocated").await).await;
    assert_eq!((c.status, c.reason.as_str()), (ConditionStatus::False, "NodePortOutOfRange"));
    assert!(c.message.contains("30080") && c.message.contains("31000-31002"), "{}", c.message);
    assert!(plane.services().get("np-out").await.unwrap().status.node_ports.is_empty());
    // Whichever of np-a and np-b is reconciled first holds 31002; the other says who does.
    let (a, b) = wait_until("both node-port services reconciled", LIMIT, async || {
        Some((plane.condition("np-a", "PortsAllocated").await?, plane.condition("np-b", "PortsAllocated").await?))
    })
    .await;
    let (holder, loser, c) = if a.status == ConditionStatus::True { ("np-a", "np-b", b) } else { ("np-b", "np-a", a) };
    assert_eq!((c.status, c.reason.as_str()), (ConditionStatus::False, "NodePortConflict"), "{loser}");
    assert!(c.message.contains("31002") && c.message.contains(&format!("default/{holder}")), "{}", c.message);
    let held = plane.services().get(holder).await.unwrap();
    assert_eq!(held.status.node_ports.get(""), Some(&31002), "keyed by port name, \"\" for a single unnamed port");
    assert!(plane.services().get(loser).await.unwrap().status.node_ports.is_empty());
    let c_port = wait_until("np-c", LIMIT, async || {
        let s = plane.services().get("np-c").await.unwrap();
        s.status.node_ports.get("").copied()
    })
    .await;
    assert!((31000..=31001).contains(&c_port), "31002 is np-a's or np-b's");
    // Endpoints of a node-port service work as any: np-a has web-0.
    wait_until("np-a endpoints", LIMIT, async || (plane.endpoints("np-a").await.0.len() == 1).then_some(())).await;
    let h = wait_until("headless reconciled", LIMIT, async || {
        let s = plane.services().get("headless").await.unwrap();
        (s.status.endpoints == 1).then_some(s)
    })
    .await;
    assert_eq!(h.status.cluster_address, None, "a headless service has no cluster address");

    // Addresses are unique; a new controller keeps every allocation and gives nothing twice.
    let before: Vec<(String, Option<String>, std::collections::BTreeMap<String, u32>)> =
        wait_until("all addressed", LIMIT, async || {
            let all = plane.services().list(&ListParams::default()).await.unwrap().items;
            let out: Vec<_> = all
                .iter()
                .map(|s| (s.metadata.name.clone(), s.status.cluster_address.clone(), s.status.node_ports.clone()))
                .collect();
            out.iter().filter(|(n, a, _)| n != "headless" && a.is_none()).count().eq(&0).then_some(out)
        })
        .await;
    let mut addresses: Vec<_> = before.iter().filter_map(|(_, a, _)| a.clone()).collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), 6, "unique cluster addresses: {before:?}");
    plane.stop().await;
    plane.start(config);
    plane.services().create(&Object::new(ObjectMeta::named("late"), node_port(None))).await.unwrap();
    let late = wait_until("late allocated", LIMIT, async || {
        let s = plane.services().get("late").await.unwrap();
        s.status.conditions.iter().any(|c| c.type_ == "PortsAllocated").then_some(s)
    })
    .await;
    // The range of node ports (3) holds np-c's and the fixed 31002: one left.
    let late_port = late.status.node_ports.get("").copied();
    assert!(late_port.is_some_and(|p| p != c_port), "no node port twice: {late_port:?} vs {c_port}");
    assert!(!addresses.contains(late.status.cluster_address.as_ref().unwrap()), "no address twice");
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (name, address, ports) in before {
        let s = plane.services().get(&name).await.unwrap();
        assert_eq!((s.status.cluster_address, s.status.node_ports), (address, ports), "{name} kept its allocation");
    }
    plane.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_selector_made_empty_takes_the_controllers_slices_and_leaves_the_applications() {
    let mut plane = Plane::new();
    plane.start(EndpointsConfig::default());
    plane.workload("web-0", "web", 20000, true).await;
    let svc = plane
        .services()
        .create(&Object::new(ObjectMeta::named("web"), web_service("web", PortTarget::Number(8080))))
        .await
        .unwrap();
    wait_until("one endpoint", LIMIT, async || (plane.endpoints("web").await.0.len() == 1).then_some(())).await;
    // The application's own slice for the service: a plain (non-controller) owner reference.
    let mut meta = ObjectMeta::named("web-by-app").with_label(SERVICE_NAME_LABEL, "web");
    let mut owner = svc.controller_ref();
    owner.controller = false;
    meta.owner_references = vec![owner];
    let app_slice = EndpointSlice { service: "web".into(), endpoints: vec![] };
    plane.slices().create(&Object::new(meta, app_slice)).await.unwrap();

    let mut svc = plane.services().get("web").await.unwrap();
    svc.spec.selector.clear();
    plane.services().replace(&svc).await.unwrap();
    let left = wait_until("the controller's slices gone", LIMIT, async || {
        let all = plane.slices().list(&ListParams::default()).await.unwrap().items;
        (all.len() == 1).then_some(all)
    })
    .await;
    assert_eq!(left[0].metadata.name, "web-by-app", "the application's slice stays");
    let c = wait_until("NoSelector", LIMIT, async || {
        plane.condition("web", "EndpointsReady").await.filter(|c| c.reason == "NoSelector")
    })
    .await;
    assert_eq!(c.status, ConditionStatus::Unknown);

    // The index forgot web-0: its changes no longer bring slices back.
    plane.set_ready("web-0", false).await;
    plane.set_ready("web-0", true).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let all = plane.slices().list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all.len(), 1, "no slice written for a selector-less service: {all:?}");
    plane.stop().await;
}
